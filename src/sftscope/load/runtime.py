"""Runtime helpers every command shares: device, dtype, pad id, input device, releasing a model,
and silencing the libraries' own progress bars and logs while sftscope reports.

One rule each: ``--device auto`` is a visible GPU, else the CPU; ``--dtype auto`` is bfloat16
on a GPU that supports it and float32 otherwise (CPUs compute bf16 slowly and coarsely); the
pad id is the tokenizer's pad token, else its EOS, else 0 (padded positions are masked out of
every metric, so the choice never changes a number).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from sftscope.errors import SftscopeError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a named GPU must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "cpu"
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SftscopeError(f"--device {name}: no CUDA GPU is visible on this machine "
                                f"(CPU-only torch {torch.__version__}?); use --device cpu or auto")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise SftscopeError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are "
                                f"visible")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SftscopeError("--device mps: Apple's MPS backend is not available here; use "
                                "--device cpu or auto")
    elif kind != "cpu" and not hasattr(torch, kind):
        raise SftscopeError(f"--device {name}: this torch build has no {kind} backend")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """A dtype name (``auto`` included) -> the torch dtype the models run in on ``device``."""
    if name == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise SftscopeError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16")
    dt = DTYPES[name]
    if dt is torch.bfloat16 and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise SftscopeError(f"--dtype {name}: this GPU has no bfloat16 support; use float16 "
                            f"or float32")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (run records)."""
    return DTYPE_NAMES.get(dt, str(dt).replace("torch.", ""))


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad token, else EOS, else 0 (padding is always masked)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embedding's device (works with accelerate ``device_map``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def release(nbytes: int = 1 << 30, threshold: int = 1 << 28) -> None:
    """After the last reference to a model is dropped: collect its reference cycles (HF models
    have some) and empty the CUDA cache, when it was big enough to matter (a full collection
    costs about half a second in a large process)."""
    if nbytes >= threshold or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- CPU threads
# torch's OpenMP threads spin while they wait for each other; ``OMP_WAIT_POLICY=PASSIVE`` (set
# by the CLI before torch starts) makes waiting threads sleep. Training never adapts its thread
# count to the machine's load: the count is fixed when a run starts, so that the same seed
# gives the same weights whatever else runs (``demo.pair``).


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch ops on ``n`` CPU threads inside the block (0 or the current count: unchanged),
    then restore the previous count: the one place a command sets torch's thread count for a
    stretch of work."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers', the hub's and datasets' own bars and info logs meanwhile."""
    undo: list[Callable[[], None]] = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        undo.append(lambda: hf_logging.set_verbosity(level))
    except ImportError:
        pass
    try:
        import huggingface_hub.utils as hub_utils
        from huggingface_hub.utils import logging as hub_logging

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            undo.append(hub_utils.enable_progress_bars)
        hub_level = hub_logging.get_verbosity()  # its retry warnings: the error says it all
        hub_logging.set_verbosity_error()
        undo.append(lambda: hub_logging.set_verbosity(hub_level))
    except (ImportError, AttributeError):
        pass
    try:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()
