"""Command-line interface (``app.py``): commands generated from the typed configs
(``build.py``, ``runners.py``), thin over the Python API. This file only re-exports."""

from __future__ import annotations

from sftscope.cli.app import INTERRUPTED, app, main

__all__ = ["INTERRUPTED", "app", "main"]
