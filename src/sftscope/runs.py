"""Run folders: who owns a folder, when a run is finished, and what a rerun may replace.

Protocol (every command that writes a run folder):

0. ``claim`` (the CLI, before any validation; the API in ``check_out``) creates the folder and
   the lock ``.sftscope-lock`` with ``O_EXCL`` (pid, host, start time): of two runs started into
   one folder, exactly one gets it and the other is refused in one line. A lock whose process
   is gone (exited, killed, a zombie) is taken over; ``release`` removes it when the command
   ends, however it ends. Under a launcher rank 0 holds it for every rank.
1. ``check_out`` (torch-free, writes nothing but the claim) runs with the validation: ``--out``
   must not be a file, must be writable, must not be another command's run folder, must not be
   in use by a live process, and a *finished* run of the same command with other settings is
   replaced only with ``--overwrite`` (the error names the first setting that differs).
2. ``start_run`` (after validation) creates the folder, removes the previous run's ``run.json``
   and output files of this command, and writes the marker ``.sftscope-run.json`` (status
   ``running``, pid, host). A killed run leaves the marker without ``run.json``: it never looks
   finished, and the same command restarts (or resumes, where the command can).
3. ``run.json`` is written last (``finish_run``): its presence marks a finished run.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sftscope.config.core import Config, changed
from sftscope.errors import SftscopeError
from sftscope.io import DISK_ERRNOS, disk_error  # noqa: F401  (re-exported)
from sftscope.process import process_alive
from sftscope.progress import command_scope

MARKER = ".sftscope-run.json"
RUN_JSON = "run.json"
LOCK = ".sftscope-lock"
T = TypeVar("T")
# folders this process claimed -> the folders the claim created (the run folder, and parents
# such as sftscope-runs/ that did not exist), innermost first; empty when it existed
_HELD: dict[str, list[Path]] = {}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def folder_command(out: str | Path) -> str | None:
    """The command whose run folder ``out`` is (from run.json or the marker), or None."""
    out = Path(out)
    for name in (RUN_JSON, MARKER):
        rec = _read(out / name)
        if rec and isinstance(rec.get("command"), str):
            return rec["command"]
    return None


_alive = process_alive


def _writable_dir(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (to check that it can be created)."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _can_write(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits do not bind root,
    and a read-only file system shows only on a write). The probe file is gone at once."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_folder(out: str | Path, command: str) -> Path:
    """``out`` can hold a ``command`` run: not a file, writable, not another command's run
    folder, not in use by a live process. Writes nothing."""
    out = Path(os.path.expanduser(str(out)))
    if out.exists() and not out.is_dir():
        raise SftscopeError(f"--out {out} is a file; give a folder for the run")
    anc = _writable_dir(out)
    if anc.exists() and not anc.is_dir():
        raise SftscopeError(f"--out {out}: {anc} is a file, so the folder cannot be made")
    if not _can_write(anc):
        raise SftscopeError(f"--out {out}: {anc} is not writable; choose another folder")
    if not out.is_dir():
        return out
    owner = folder_command(out)
    if owner is not None and owner != command:
        raise SftscopeError(f"--out {out} is a `{owner}` run folder; give `{command}` a folder "
                            f"of its own (e.g. {out.parent / command})")
    marker = _read(out / MARKER)
    if marker and marker.get("status") == "running" and _alive(marker):
        raise SftscopeError(f"--out {out} is in use by process {marker.get('pid')} (started "
                            f"{marker.get('started', '?')}); wait for it or choose another --out")
    if _key(out) not in _HELD and _is_main():
        lock = _read(out / LOCK)
        if lock is not None and _alive(lock, other_hosts=True):
            raise _in_use(out, lock)
    return out


def _key(out: Path) -> str:
    return os.path.abspath(out)


def _is_main() -> bool:
    from sftscope.parallel import is_main

    return is_main()


def _in_use(out: Path, lock: Mapping[str, Any]) -> SftscopeError:
    where = "" if lock.get("host") == socket.gethostname() else f" on {lock.get('host')}"
    return SftscopeError(
        f"--out {out} is in use by process {lock.get('pid')}{where} (`{lock.get('command')}`, "
        f"started {lock.get('started', '?')}); wait for it or choose another --out"
        + (f" (if that run is gone, delete {out / LOCK})" if where else ""))


def claim(out: str | Path, command: str) -> Path:
    """Claim the run folder ``out`` for this process (the module docstring's step 0): create
    it and its lock atomically, take over a lock whose process is gone, refuse a live one.
    Claiming a folder this process holds already is a no-op; other ranks of a launch claim
    nothing (rank 0 does, for all of them)."""
    out = check_folder(out, command)
    key = _key(out)
    if key in _HELD or not _is_main():
        return out
    created = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, out) from e
    rec = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(5):
        try:
            fd = os.open(out / LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over(out)
            continue
        except OSError as e:
            raise disk_error(e, out / LOCK) from e
        try:
            os.write(fd, json.dumps(rec).encode())
        finally:
            os.close(fd)
        _HELD[key] = created
        return out
    raise _in_use(out, _read(out / LOCK) or {})


def _take_over(out: Path) -> None:
    """Remove the lock of a process that is gone; refuse a live one. The stale lock is moved
    aside first (atomic), so of two runs taking it over, one moves it and the other finds the
    winner's lock, which it puts back."""
    lock = out / LOCK
    rec = _read(lock)
    if rec is None:  # just created and not yet written, or emptied: give its writer a moment
        time.sleep(0.2)
        rec = _read(lock)
        if rec is None and lock.exists() and time.time() - lock.stat().st_mtime < 5:
            raise _in_use(out, {"pid": "?", "command": "?"})
    if rec is not None and _alive(rec, other_hosts=True):
        raise _in_use(out, rec)
    aside = out / f"{LOCK}.{os.getpid()}"
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    moved = _read(aside)
    if moved is not None and moved != rec and _alive(moved, other_hosts=True):
        with contextlib.suppress(OSError):
            os.link(aside, lock)  # not ours to take: put it back
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise _in_use(out, moved)
    with contextlib.suppress(OSError):
        os.unlink(aside)


@command_scope  # every staged command (``progress.staged``) runs inside it
@contextlib.contextmanager
def claims_scope() -> Iterator[None]:
    """Release, on the way out, every folder claimed inside (a command called from Python, or
    from another command: the demo's and a sweep's runs); claims held before stay."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in [k for k in _HELD if k not in before]:
            release(key)


def releasing(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a command's Python API: the folders it claims are released when it returns."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with claims_scope():
            return fn(*args, **kwargs)

    return wrapper


def release(out: str | Path | None) -> None:
    """Give up the claim on ``out`` (if this process holds one): remove the lock, and the
    folder itself when the claim created it and nothing else was written there."""
    if out is None:
        return
    out = Path(os.path.expanduser(str(out)))
    created = _HELD.pop(_key(out), None)
    if created is None:
        return
    rec = _read(out / LOCK)
    if rec is not None and rec.get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(out / LOCK)
    for folder in created:  # innermost first; stops at the first that is not empty
        try:
            folder.rmdir()
        except OSError:
            break


def check_out(out: str | Path, command: str, config: Config, *, overwrite: bool = False) -> None:
    """Refuse an unusable ``--out`` before any work (see the module docstring)."""
    settings = config.result_settings()
    volatile = set(config.record()) - set(settings)
    out = claim(out, command)
    if not out.is_dir():
        return
    owner = folder_command(out)
    done = _read(out / RUN_JSON)
    if done is None or owner != command or overwrite:
        return
    old = done.get("config") if isinstance(done.get("config"), dict) else {}
    skip = set(volatile) | {"out"}
    diff = [k for k in changed({k: v for k, v in old.items() if k not in skip},
                               {k: v for k, v in settings.items() if k not in skip})]
    if diff:
        k = diff[0]
        raise SftscopeError(
            f"--out {out} holds a finished `{command}` run made with other settings "
            f"({k}: {old.get(k)!r} there, {settings.get(k)!r} now"
            + (f"; {len(diff) - 1} more differ" if len(diff) > 1 else "")
            + "); add --overwrite to replace it, or choose another --out")


def start_run(out: str | Path, command: str, outputs: Iterable[str] = ()) -> Path:
    """Create the run folder, clear the previous run of this command, write the marker."""
    out = Path(os.path.expanduser(str(out)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in (RUN_JSON, *outputs):
            for p in glob.glob(str(out / pattern)):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(p)
        from sftscope.io import write_json

        write_json(out / MARKER, {"command": command, "status": "running", "pid": os.getpid(),
                                  "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError as e:
        raise disk_error(e, out) from e
    return out


def finish_run(out: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``run.json`` (last, atomically) and mark the run finished."""
    from sftscope.io import write_json

    out = Path(out)
    path = write_json(out / RUN_JSON, record)
    marker = _read(out / MARKER) or {}
    marker.setdefault("command", record.get("command"))
    marker.update(status="finished", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with contextlib.suppress(OSError):
        write_json(out / MARKER, marker)
    return path
