"""Content identity of a model: ``fingerprint`` (for run records and cache keys) and the
file digests behind it, memoised on disk.

Torch-free; its own module so that the adapter checks and the model loader both use it
without importing each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sftscope.io import write_text
from sftscope.load.sources import adapter_base, check_model, expand, source_kind


def default_cache_dir() -> Path:
    """``$SFTSCOPE_CACHE`` or ``~/.cache/sftscope``: captures and the file-digest memo."""
    return Path(os.environ.get("SFTSCOPE_CACHE", "~/.cache/sftscope")).expanduser()


# Files of a model folder that change what the model computes or how text becomes ids:
# weights (every byte), configs and tokenizer files (every byte), remote code.
_FP_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".tiktoken", ".jinja", ".py")
_FP_NAMES = ("merges.txt", "vocab.txt")
_CHUNK = 64 << 20   # tree-hash leaf: files are hashed in 64 MiB pieces, in parallel
_READ = 8 << 20     # bytes per read
_MEMO_NAME = "file-digests.json"
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
# Changes whenever ``hash`` is computed differently: hashes of two schemes never compare.
# (v1, before it: the first and last MiB of each weight file only.)
FINGERPRINT_SCHEME = "content-v2"


def _hash_range(fd: int, start: int, end: int, buf: bytearray) -> bytes:
    h = hashlib.sha256()
    view = memoryview(buf)
    pos = start
    while pos < end:
        n = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
        if n <= 0:
            raise OSError(f"short read at byte {pos}")
        h.update(view[:n])  # hashlib releases the GIL on large updates
        pos += n
    return h.digest()


def file_digest(path: str | Path, workers: int | None = None) -> str:
    """Content digest of one file (every byte): SHA-256 over the SHA-256 of its 64 MiB pieces.

    The pieces are read with ``pread`` and hashed by up to ``workers`` threads (default: the
    CPU count), so a large weight file is hashed at disk speed rather than one core's speed.
    """
    size = os.path.getsize(path)
    n = max(1, -(-size // _CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        def leaf(i: int) -> bytes:
            return _hash_range(fd, i * _CHUNK, min(size, (i + 1) * _CHUNK),
                               bytearray(min(_READ, max(size, 1))))

        workers = min(n, workers or os.cpu_count() or 1)
        if workers > 1:
            with ThreadPoolExecutor(workers) as ex:
                leaves = list(ex.map(leaf, range(n)))
        else:
            leaves = [leaf(i) for i in range(n)]
    finally:
        os.close(fd)
    top = hashlib.sha256(f"sftscope-tree-v1:{size}:{_CHUNK}:".encode())
    for d in leaves:
        top.update(d)
    return top.hexdigest()


class DigestMemo:
    """File digests remembered by (path, size, mtime_ns, ctime_ns, inode, device) in a small
    JSON file, so each weight file is read once; a changed file has another ctime."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("v") == 1 and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
            except (OSError, ValueError):
                self.entries = {}  # a corrupt memo is rebuilt

    @staticmethod
    def _stat_key(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def digest(self, path: Path) -> str:
        real = str(path.resolve())
        st = os.stat(real)
        key = self._stat_key(st)
        got = self.entries.get(real)
        if got is not None and got.get("stat") == key:
            return str(got["digest"])
        digest = file_digest(real)
        if self._stat_key(os.stat(real)) == key:  # unchanged while it was read
            self.entries[real] = {"stat": key, "digest": digest}
            self.dirty = True
        return digest

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        live = {p: e for p, e in self.entries.items() if os.path.exists(p)}
        with contextlib.suppress(OSError):  # a read-only cache costs re-hashing next time
            write_text(self.path, json.dumps({"v": 1, "entries": live}))
        self.dirty = False


def _fingerprint_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()
                  and (p.suffix in _FP_SUFFIXES or p.name in _FP_NAMES))


def _hub_commit(spec: str, revision: str | None) -> str | None:
    """The commit a hub id + revision resolves to: the hub's answer when online, else the
    local Hugging Face cache's; None when neither knows."""
    if revision and _HEX40.match(revision):
        return revision
    try:
        from huggingface_hub import HfApi, constants, try_to_load_from_cache
    except ImportError:
        return None
    if not constants.HF_HUB_OFFLINE:
        try:
            sha = HfApi().model_info(spec, revision=revision, timeout=10).sha
            if sha:
                return str(sha)
        except Exception:  # offline, gated, unknown: fall back to the local cache
            pass
    try:
        hit = try_to_load_from_cache(spec, "config.json", revision=revision or "main")
    except Exception:
        return None
    if isinstance(hit, str):
        commit = Path(hit).parent.name
        return commit if _HEX40.match(commit) else None
    return None


def _files_hash(files: list[Path], memo: DigestMemo, salt: bytes) -> tuple[str, int]:
    h = hashlib.sha256(salt)
    total = 0
    for p in files:
        size = p.stat().st_size
        total += size
        h.update(f"\0{p.name}\0{size}\0{memo.digest(p)}".encode())
    return h.hexdigest()[:24], total


def fingerprint(spec: str, revision: str | None = None,
                memo_dir: str | Path | None = None, *, base: str | None = None,
                base_revision: str | None = None) -> dict[str, Any]:
    """Identify a model by content, for run records and cache keys.

    Local folders: ``hash`` = SHA-256 over name, size and full-content digest of every weight,
    config, tokenizer and code file (``file_digest``; digests memoised in ``memo_dir``, default
    ``default_cache_dir()``, so each file is read once). GGUF: the same over the one ``.gguf``
    file. Adapters: the adapter folder's files and the base's fingerprint (``base``), both in
    ``hash``, plus the ``label`` of the tune run. Hub ids: the revision resolved to a commit
    (``hash`` derives from id + commit; absent when it cannot be resolved).
    """
    kind = source_kind(spec)
    if kind not in ("folder", "gguf", "adapter", "other"):
        commit = _hub_commit(spec, revision)
        out: dict[str, Any] = {"source": spec, "revision": revision, "local": False,
                               "commit": commit}
        if commit:
            out["hash"] = hashlib.sha256(f"hub:{spec}@{commit}".encode()).hexdigest()[:24]
            out["hash_scheme"] = FINGERPRINT_SCHEME
        return out
    memo = DigestMemo(Path(memo_dir).expanduser() / _MEMO_NAME if memo_dir is not None
                      else default_cache_dir() / _MEMO_NAME)
    if kind == "adapter":
        src = check_model(spec, base=base)
        folder = Path(str(src.path))
        files = _fingerprint_files(folder)
        ahash, total = _files_hash(files, memo, b"sftscope-adapter-v1")
        memo.save()
        b, rev = adapter_base(src, revision, base_revision)
        bfp = fingerprint(b.spec, rev, memo_dir)
        out = {"source": str(folder.resolve()), "kind": "adapter", "label": src.label,
               "local": True, "adapter_hash": ahash, "files": len(files), "bytes": total,
               "base": bfp, "hash_scheme": FINGERPRINT_SCHEME}
        bkey = bfp.get("hash") or f"{bfp.get('source')}@{bfp.get('revision')}"
        out["hash"] = hashlib.sha256(f"adapter:{ahash}:on:{bkey}".encode()).hexdigest()[:24]
        return out
    if kind == "gguf":
        src = check_model(spec)
        f = Path(str(src.path))
        ghash, total = _files_hash([f], memo, b"sftscope-gguf-v1")
        memo.save()
        return {"source": str(f.resolve()), "kind": "gguf", "revision": None, "local": True,
                "hash": ghash, "hash_scheme": FINGERPRINT_SCHEME, "files": 1, "bytes": total}
    path = Path(expand(spec))
    files = _fingerprint_files(path) if path.is_dir() else [path]
    h, total = _files_hash(files, memo, b"sftscope-model-v2")
    memo.save()
    return {"source": str(path.resolve()), "revision": revision, "local": True,
            "hash": h, "hash_scheme": FINGERPRINT_SCHEME, "files": len(files),
            "bytes": total}


