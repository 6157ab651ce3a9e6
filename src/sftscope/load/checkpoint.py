"""Reading Hugging Face checkpoints without loading a model: safetensors headers and shard
indexes, tensor-by-tensor reads, canonical tensor names and what each tensor is.

``Checkpoint(folder)`` parses ``config.json`` and every safetensors header (sharded
checkpoints through ``model.safetensors.index.json``), checks each file against its header
(a truncated or corrupt file fails before any work), and maps every tensor to its canonical
name (relative to the ``*ForCausalLM`` object: wrapper prefixes stripped, legacy names
aliased, a missing root prefix added). ``classify`` says which block and module a canonical
name belongs to; ``fused_split_ok`` whether a fused qkv tensor can be split into q, k, v.
Pickle checkpoints are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from sftscope.errors import SftscopeError, quoted
from sftscope.load.sources import (  # noqa: F401  (re-exported: the checkpoint reading API)
    PICKLE_SUFFIXES,
    TensorInfo,
    expand,
    looks_like_path,
    pickle_error,
    read_config_json,
    read_header,
    weight_files,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

from sftscope.load.arch import (
    ArchSpec,
    block_re,
    fused_qkv_sizes,
    moe_tensor,
    spec_for_config,
    spec_from_names,
)

_JUNK_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
# Legacy checkpoint names that transformers renames at load time: family -> {old: new}.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


# --------------------------------------------------------------------------- sources


def resolve_source(arg: str | os.PathLike, what: str) -> Path:
    """A local folder for ``arg``: an existing path, else a hub id fetched with
    ``huggingface_hub.snapshot_download`` (config and safetensors files only)."""
    text = str(arg)
    path = Path(expand(text))
    if path.exists():
        if not path.is_dir():
            raise SftscopeError(f"{what} {text} is a file; give the model folder that holds it")
        return path
    if looks_like_path(text):
        raise SftscopeError(f"{what} folder {text} does not exist; check the path")
    try:
        import huggingface_hub

        local = huggingface_hub.snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"],
        )
    except Exception as e:  # offline, unknown id, gated repo, ...: one clear line
        first = (str(e).splitlines() or [""])[0][:160]
        raise SftscopeError(
            f"{what} {text!r} is not a local folder and could not be fetched from the Hugging "
            f"Face Hub ({type(e).__name__}: {first}); pass a local folder (download it where "
            f"there is network, e.g. `hf download {text} --local-dir DIR`)"
        ) from e
    return Path(local)


def read_config(folder: Path) -> Any:
    """The model config (transformers ``AutoConfig``; plain JSON for unknown model types)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SftscopeError(f"{folder} has no config.json; point at a Hugging Face model folder")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception:  # unknown model_type / custom code: the JSON is enough for us
        return SimpleNamespace(**read_config_json(folder))


def canonical_name(name: str, spec: ArchSpec | None) -> str:
    """Checkpoint name -> name relative to the ``*ForCausalLM`` object: strip wrapper prefixes,
    apply legacy aliases, add a missing root prefix (hub GPT-2 files say ``h.0...``)."""
    for p in _JUNK_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    if spec is None:
        return name
    for old, new in spec.checkpoint_aliases.items():
        if name.startswith(old):
            name = new + name[len(old):]
    root = spec.blocks.split(".")[0] + "."
    if "." in spec.blocks and not name.startswith(root) and not name.startswith(spec.head + "."):
        name = root + name
    return name


class Checkpoint:
    """One model folder: config, architecture spec and the byte layout of every tensor."""

    def __init__(self, source: str | os.PathLike, what: str = "model") -> None:
        self.folder = resolve_source(source, what)  # cheap when already a resolved folder
        self.what = what
        self.source = str(source)
        self.config = read_config(self.folder)
        self.model_type = str(getattr(self.config, "model_type", "") or "")
        raw = weight_files(self.folder)
        spec = spec_for_config(self.config)
        if spec is not None:
            probe = {canonical_name(n, spec) for n in raw}
            if not any(n.startswith(spec.blocks + ".") for n in probe):
                spec = None  # registry paths do not fit this checkpoint: infer
        if spec is None:
            spec = spec_from_names([canonical_name(n, None) for n in raw], self.config)
        self.spec = spec
        self.tensors: dict[str, TensorInfo] = {}
        for n, info in raw.items():
            c = canonical_name(n, spec)
            if c in self.tensors:
                raise SftscopeError(f"{self.folder}: tensors {self.tensors[c].raw} and {n} "
                                    f"name the same parameter")
            self.tensors[c] = info
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()  # the prefetch thread and the readers open files

    @property
    def tied(self) -> bool:
        """Output head = input embedding (config says so, or no head tensor is stored)."""
        return bool(getattr(self.config, "tie_word_embeddings", False)) or (
            f"{self.spec.head}.weight" not in self.tensors)

    def get(self, name: str) -> Tensor:
        """One tensor, read with ``safe_open`` (memory-mapped, released when dropped)."""
        from safetensors import safe_open

        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(info.raw)
        except Exception as e:  # safetensors raises its own error types on bad files
            raise SftscopeError(
                f"could not read {info.raw} from {info.file} ({type(e).__name__}: "
                f"{str(e)[:160]}); the file is corrupt or truncated: re-download or re-save it"
            ) from e

    def nbytes(self, name: str) -> int:
        """Stored size of one tensor in bytes."""
        info = self.tensors[name]
        return info.end - info.start

    def advise(self, name: str) -> int:
        """Ask the kernel to read a tensor's bytes ahead (overlaps disk reads with compute);
        returns the tensor's size in bytes."""
        info = self.tensors[name]
        if hasattr(os, "posix_fadvise"):
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd(info.file), info.start, info.end - info.start,
                                 os.POSIX_FADV_WILLNEED)
        return info.end - info.start

    def _fd(self, file: Path) -> int:
        """A read-only descriptor of one of the checkpoint's files, opened once."""
        fd = self._fds.get(file)
        if fd is None:
            with self._fds_lock:
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def reader(self, name: str) -> Callable[[int, memoryview], None]:
        """``read(offset, out)``: bytes ``offset ..`` of one tensor's stored data into the
        writable buffer ``out`` (``pread``: no mapping and no allocation, so a caller streams
        a tensor of any size through one small buffer; the GIL is released while the kernel
        copies; threads may share it)."""
        info = self.tensors[name]
        fd = self._fd(info.file)

        def read(offset: int, out: memoryview) -> None:
            pos, n = info.start + offset, len(out)
            if offset < 0 or pos + n > info.end:
                raise ValueError(f"bytes {offset}..{offset + n} are outside {info.raw}")
            done = 0
            while done < n:
                try:
                    k = os.preadv(fd, [out[done:]], pos + done)
                    if k <= 0:
                        raise OSError(f"the file ends at byte {pos + done}")
                except OSError as e:
                    raise SftscopeError(
                        f"could not read {info.raw} from {info.file} ({quoted(e)}); the "
                        f"file is truncated or unreadable: re-download or re-save it") from e
                done += k

        return read

    def close(self) -> None:
        """Close the file descriptors opened for read-ahead."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class Slot:
    """What a tensor is: block (None outside the blocks), module role, parameter name, and
    for one routed expert's tensor (on-disk per-expert layout) the expert's index."""

    block: int | None
    module: str
    param: str  # weight, bias, ...
    expert: int | None = None


def classify(name: str, spec: ArchSpec) -> Slot | None:
    """``(block, module, param[, expert])`` of a canonical tensor name; None for
    non-parameter buffers. MoE tensors of either layout get their role (``arch.MOE_ROLES``); a
    per-expert tensor its expert index, a fused one (all experts) none."""
    path, _, param = name.rpartition(".")
    if param in ("inv_freq", "masked_bias"):
        return None
    m = block_re(spec.blocks).match(path)
    if m:
        sub = m.group(2)
        if spec.conv1d and sub == "attn" and param == "bias":
            return None  # GPT-2's causal-mask buffer in old checkpoints
        moe = moe_tensor(spec, name)
        if moe is not None:
            return Slot(moe.block, moe.role, param, moe.expert)
        return Slot(int(m.group(1)), spec.role_of(sub) or "other", param)
    if path == spec.embed:
        return Slot(None, "embed", param)
    if path in spec.extra_embeds:
        return Slot(None, "pos_embed", param)
    if spec.final_norm and path == spec.final_norm:
        return Slot(None, "final_norm", param)
    if path == spec.head:
        return Slot(None, "lm_head", param)
    return Slot(None, "other", param)


def fused_split_ok(spec: ArchSpec, config: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``split_fused_qkv`` applies to a fused tensor of this shape and config."""
    if spec.fused_layout not in ("concat", "neox") or isinstance(config, SimpleNamespace):
        return False
    rows = shape[1] if (spec.conv1d and len(shape) == 2) else shape[0]
    try:
        if spec.fused_layout == "concat":
            return rows == sum(fused_qkv_sizes(config))
        heads = int(config.num_attention_heads)
        return rows % (3 * heads) == 0
    except (AttributeError, TypeError, ValueError):
        return False
