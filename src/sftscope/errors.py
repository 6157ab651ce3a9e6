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


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (at most ``limit`` characters), or
    its type's name when the message is empty: error lines quote library exceptions with it."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0] if lines else type(err).__name__)[:limit]


def quoted(err: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, for quoting a library's error inside one line."""
    return f"{type(err).__name__}: {first_line(err, limit)}"


class WriteError(SftscopeError):
    """A file could not be written (full disk, quota, read-only): what, where, what to do, and
    what a rerun does (``then``; a command that knows better, as tune does, replaces it)."""

    def __init__(self, path: str, what: str, todo: str,
                 then: str = "finished work is kept: run the same command again") -> None:
        self.path, self.what, self.todo, self.then = path, what, todo, then
        super().__init__(f"cannot write {path}: {what}; {todo} ({then})")

    def with_then(self, then: str) -> WriteError:
        """The same failure with another account of what the rerun does."""
        return WriteError(self.path, self.what, self.todo, then)


INTERRUPTED_MESSAGE = "interrupted; run the same command again to resume"


class Interrupted(KeyboardInterrupt):
    """A long run stopped by SIGINT/SIGTERM after saving its progress (a checkpoint).

    A ``KeyboardInterrupt`` (so ``except Exception`` never swallows it) whose message is
    ``INTERRUPTED_MESSAGE``; the CLI prints it as one line and exits 130.
    """

    def __init__(self, message: str = INTERRUPTED_MESSAGE) -> None:
        super().__init__(message)
