"""Imports every command module so each registers on the app."""

from sftscope.cli import (  # noqa: F401
    analyze,
    demo,
    evaluate,
    probe,
    report,
    suggest,
    swap,
    sweep,
    tune,
    weights,
)
