"""The one exception type users see: a clear line, exit status 2, no traceback."""

from __future__ import annotations


class SftscopeError(Exception):
    """Bad input or an impossible request.

    The message says what is wrong and what to do. The CLI prints it as one line and exits 2;
    Python API callers get the exception.
    """


def fail(message: str) -> SftscopeError:
    """Build an error to ``raise``; keeps call sites short: ``raise fail("...")``."""
    return SftscopeError(message)
