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


INTERRUPTED_MESSAGE = "interrupted; run the same command again to resume"


class Interrupted(KeyboardInterrupt):
    """A long run stopped by SIGINT/SIGTERM after saving its progress (a checkpoint).

    A ``KeyboardInterrupt`` (so ``except Exception`` never swallows it) whose message is
    ``INTERRUPTED_MESSAGE``; the CLI prints it as one line and exits 130.
    """

    def __init__(self, message: str = INTERRUPTED_MESSAGE) -> None:
        super().__init__(message)
