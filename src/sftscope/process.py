"""Process-wide settings the CLI applies before torch starts (the benchmarks apply them too).

Kept free of torch: they must come before torch is imported.

- ``OMP_WAIT_POLICY=PASSIVE``: waiting OpenMP threads sleep instead of spinning, which costs
  little on an idle machine and saves a lot on a busy one (``load/runtime.py``).
- glibc's malloc keeps freed memory for reuse. By default it returns memory to the system as
  soon as the top of its heap holds more than a small threshold, and serves blocks over 128 KiB
  (a threshold raised as such blocks are freed) with fresh mmap regions, so every large
  temporary torch frees and allocates again costs page faults. Counted on the capture bench
  model's forward pass (llama 8 x 256, batch 8 x 128 tokens, 2 threads): 4,000 to 14,000 page
  faults per batch by default, 0 with blocks up to 32 MiB kept in the heap and trimming only
  past 256 MiB of free top.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter codes


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Make glibc keep freed memory for reuse; True where that took effect (glibc only: not on
    macOS or musl)."""
    import ctypes

    try:  # the process's own symbols: no search for the library (find_library may run ldconfig)
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: mallopt's codes are its own)
    except (OSError, TypeError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def setup_process(malloc: bool = True) -> bool:
    """Apply both settings (an ``OMP_WAIT_POLICY`` already set is kept; ``malloc=False``: the
    wait policy only); returns whether malloc was tuned. Call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return tune_malloc() if malloc else False


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its child processes that have ended
    (the demo pair's training ranks), so a step's CPU counts the work it handed to them."""
    try:
        import resource
    except ImportError:  # not on Unix: this process only
        return time.process_time()
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def process_alive(rec: Mapping[str, Any], *, other_hosts: bool = False) -> bool:
    """Whether the process a record names (its ``pid`` and ``host``) still runs (never this
    process; run-folder locks and the launcher's peers ask). Another host's
    process cannot be asked: ``other_hosts`` says what to assume then."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if rec.get("host") != socket.gethostname():
        return other_hosts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet (a zombie) is not running
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
