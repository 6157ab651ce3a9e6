"""Imports every command module so each registers on the app (one line per command)."""

from sftscope.cli import analyze  # noqa: F401
