"""Atomic writes and run records: every output says how it was made, and none is half-written."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftscope.errors import SftscopeError, WriteError
from sftscope.version import __version__

if TYPE_CHECKING:
    import pandas as pd

TRACKED_PACKAGES = (
    "torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers",
    "numpy", "pandas",
)


# ----------------------------------------------------------------------------- write failures

DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "the file is too large",
               errno.EIO: "the write failed (input/output error)"}
_STRERRORS = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
              "read-only file system": errno.EROFS, "storagefull": errno.ENOSPC,
              "quotaexceeded": errno.EDQUOT, "readonlyfilesystem": errno.EROFS}
# torch.save reports a failed write without its cause (no errno)
_NO_CAUSE = ("PytorchStreamWriter failed writing", "file write failed")


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def write_errno(error: BaseException, path: str | Path | None = None) -> int | None:
    """The errno of a failed write, from whichever library raised it: an ``OSError`` (Python's
    own writes), safetensors' error text (``... (os error 28)``), torch.save's ``RuntimeError``
    (no cause given: a full disk when ``path``'s file system has no space left, else EIO).
    None when ``error`` is not a failed write (a bug, a bad tensor: not to be disguised)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e.errno
        text = str(e)
        m = re.search(r"os error (\d+)|Os \{ code: (\d+)", text)  # Rust's io::Error
        if m and int(m.group(1) or m.group(2)) in DISK_ERRNOS:
            return int(m.group(1) or m.group(2))
        low = text.lower()
        for words, num in _STRERRORS.items():
            if words in low or words in low.replace(" ", ""):
                return num
        if any(t in text for t in _NO_CAUSE):
            free = _free_bytes(Path(path)) if path is not None else None
            return errno.ENOSPC if free is not None and free < (1 << 20) else errno.EIO
        e = e.__cause__ or e.__context__
    return None


def disk_error(e: BaseException, where: str | Path | None = None, *,
               num: int | None = None) -> WriteError:
    """One line for a failed write: the file (the one being written, never a temporary
    name), what went wrong, and what to do."""
    num = num if num is not None else (e.errno if isinstance(e, OSError) else None)
    what = DISK_ERRNOS.get(num or -1) or getattr(e, "strerror", None) or type(e).__name__
    path = where if where is not None else getattr(e, "filename", None)
    todo = ("free space or choose another --out" if num in (errno.ENOSPC, errno.EDQUOT)
            else "choose another --out")
    return WriteError(str(path) if path is not None else "to the disk", what, todo)


@contextlib.contextmanager
def writing(path: str | Path, *, remove: str | Path | None = None) -> Iterator[None]:
    """Turn a failed write inside into one line naming ``path`` (``disk_error``), whatever
    library wrote (``open``, safetensors, ``torch.save``, ``save_pretrained``); ``remove`` (a
    file or folder) is deleted first, so that nothing half-written is left to be trusted."""
    import shutil

    try:
        yield
    except SftscopeError:
        raise
    except Exception as e:
        num = write_errno(e, path)
        if num is None:
            raise
        if remove is not None:
            r = Path(remove)
            if r.is_dir():
                shutil.rmtree(r, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    r.unlink()
        raise disk_error(e, path, num=num) from e


def _file_mode() -> int:
    """The mode a new file gets under the process umask (``mkstemp`` would give 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success.

    The file gets the mode the umask gives any new file. A failed write (full disk, read-only
    folder) leaves the previous file, if any, untouched.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(path):
            yield tmp_path
            os.chmod(tmp_path, _file_mode())
            os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """Yield ``FOLDER.partial`` (emptied) to write a whole folder into (a model, a tokenizer);
    it replaces ``folder`` only on success, so ``folder`` is either whole or as it was."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with writing(folder):
            yield tmp
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (dataclasses, paths and numpy scalars are converted)."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SftscopeError(f"{path} does not exist") from e
    except json.JSONDecodeError as e:
        raise SftscopeError(f"{path} is not valid JSON ({e.msg}); delete it or fix it") from e


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table atomically; the suffix picks CSV, Parquet or JSON (records)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        elif path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix == ".json":
            df.to_json(tmp, orient="records", indent=1)
        else:
            raise SftscopeError(
                f"unknown table format {path.suffix!r}: use .csv, .parquet or .json")
    return path


def write_tables(df: pd.DataFrame, out_dir: str | Path, stem: str,
                 formats: tuple[str, ...] = ("csv",)) -> list[Path]:
    """Write ``stem.<fmt>`` for each requested format."""
    return [write_table(df, Path(out_dir) / f"{stem}.{fmt}") for fmt in formats]


def package_versions() -> dict[str, str]:
    """Versions of the packages that change numbers, for every run record."""
    from importlib import metadata

    out = {"python": platform.python_version(), "sftscope": _own_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _own_version() -> str:
    return __version__


def run_record(command: str, config: Any, **extra: Any) -> dict[str, Any]:
    """The common header of every ``run.json``: command, config, versions, host, time."""
    return {
        "command": command,
        "argv": sys.argv,
        "config": _jsonable(config),
        "versions": package_versions(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **_jsonable(extra),
    }


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(obj: Any, n: int = 16) -> str:
    """Short hash of any JSON-able object (cache keys, job ids)."""
    blob = json.dumps(_jsonable(obj), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


class Timer:
    """Named wall-clock sections, reported in run records (``with timer("capture"): ...``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
