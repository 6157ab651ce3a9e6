"""Validate ``--dtype`` and ``--device`` before anything heavy runs (no torch import here).

``check_dtype`` / ``check_device`` return the canonical spelling or raise ``SftscopeError``.
Config validation calls them before loading a model or looking up a cache. Whether a CUDA/MPS
device is actually there is checked too once torch has been imported (by the caller or by
``require_torch=True``), so ``--device cuda`` on a CPU-only host fails before any work.
"""

from __future__ import annotations

import re
import sys

from sftscope.errors import SftscopeError

DTYPE_NAMES = {"auto": "auto", "float32": "float32", "fp32": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16",
               "fp16": "float16"}
DEVICE_TYPES = ("auto", "cpu", "cuda", "mps")
_DEVICE = re.compile(r"^(auto|cpu|cuda|mps)(?::(\d+))?$")


def check_dtype(name: str) -> str:
    """The canonical dtype name (``auto``, ``float32``, ``bfloat16``, ``float16``)."""
    key = str(name).strip().lower()
    if key not in DTYPE_NAMES:
        raise SftscopeError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[key]


def check_device(name: str, require_torch: bool = False) -> str:
    """The canonical device (``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    With torch imported (or ``require_torch``), a CUDA/MPS device must also exist here.
    """
    key = str(name).strip().lower()
    m = _DEVICE.match(key)
    if not m or (m.group(2) is not None and m.group(1) in ("auto", "cpu")):
        raise SftscopeError(f"unknown device {name!r}; use cpu, cuda, cuda:N, mps or auto")
    if require_torch or "torch" in sys.modules:
        _check_available(m.group(1), None if m.group(2) is None else int(m.group(2)))
    return key


def _check_available(kind: str, index: int | None) -> None:
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SftscopeError("--device cuda: no CUDA device is available on this machine "
                                "(torch sees none); use --device cpu")
        if index is not None and index >= torch.cuda.device_count():
            raise SftscopeError(f"--device cuda:{index}: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise SftscopeError("--device mps: MPS is not available on this machine; "
                                "use --device cpu")


def device_type(name: str) -> str:
    """``cpu``, ``cuda`` or ``mps`` of a checked device (``auto`` resolved with torch)."""
    kind = check_device(name).split(":")[0]
    if kind == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return kind
