"""The helpers that turn library exceptions into one-line errors."""

from __future__ import annotations

import pytest

from sftscope.errors import first_line

pytestmark = pytest.mark.unit


def test_first_line_of_a_message():
    assert first_line(ValueError("bad shape\nmore detail")) == "bad shape"
    assert first_line(ValueError("\n\n  second\nthird")) == "  second"
    assert first_line(ValueError("x" * 300), 10) == "x" * 10


def test_an_empty_message_names_the_type():
    """An exception without a message (``OSError()``) must not raise IndexError and hide the
    real error: the line names its type."""
    assert first_line(OSError()) == "OSError"
    assert first_line(RuntimeError("   \n")) == "RuntimeError"
