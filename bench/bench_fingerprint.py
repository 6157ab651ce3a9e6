"""Model fingerprint throughput: ``file_digest`` (every byte) vs a plain sequential read.

    python bench/bench_fingerprint.py [--size-gib 2 --dir /tmp --repeats 3]

Writes one random file, then for the page cache dropped for that file ("cold", via
``posix_fadvise(DONTNEED)``, no root needed) and kept ("warm"): a plain sequential read (8 MiB
``readinto``), ``file_digest`` (SHA-256 tree over 64 MiB pieces, parallel threads) and a
one-thread streamed SHA-256. Prints MB/s (median of the repeats), the ratio to the plain read,
and the load average.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from sftscope.load.models import file_digest


def plain_read(path: Path, block: int = 8 << 20) -> int:
    buf = bytearray(block)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def sha256_one_thread(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            h.update(view[:k])
    return h.hexdigest()


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--dir", default=None, help="where the test file goes (default: tmp)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = Path(d) / "weights.bin"
        size = int(a.size_gib * (1 << 30))
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 64 << 20))
                f.write(chunk)
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())
        fns = {"plain read": plain_read, "file_digest": file_digest,
               "sha256 1 thread": sha256_one_thread}
        print(f"file {size / 1e6:.0f} MB, {os.cpu_count()} CPUs, load "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for mode in ("cold", "warm"):
            rates: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(a.repeats):
                for name, fn in fns.items():  # interleaved: the load hits all alike
                    if mode == "cold":
                        drop_cache(path)
                    else:
                        plain_read(path)
                    t0 = time.perf_counter()
                    fn(path)
                    rates[name].append(size / 1e6 / (time.perf_counter() - t0))
            ref = statistics.median(rates["plain read"])
            for name, r in rates.items():
                med = statistics.median(r)
                print(f"{mode} {name:16s} {med:8.0f} MB/s  ratio to plain read {med / ref:5.2f}"
                      f"  (runs: {', '.join(f'{x:.0f}' for x in r)})")
        print(f"load after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
