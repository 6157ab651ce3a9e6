"""LoRA adapters on disk: finding the folder, reading ``adapter_config.json`` and the factors of
``adapter_model.safetensors``, checking an adapter against a base model, loading it with PEFT.

One reader for everyone: ``weights`` (the change ``s B A`` per module), ``tune`` (writes
adapters and their ``sftscope.json``) and ``evaluate`` (loads them).

PEFT's rules: a module's rank and alpha come from ``rank_pattern`` / ``alpha_pattern`` (a key
matches when the module name ends with it) else ``r`` / ``lora_alpha``; the scale is
``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (``use_rslora``).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftscope.errors import SftscopeError, first_line
from sftscope.io import read_json
from sftscope.load.checkpoint import (
    PICKLE_SUFFIXES,
    TensorInfo,
    canonical_name,
    pickle_error,
    read_header,
)
from sftscope.load.identity import fingerprint
from sftscope.load.sources import (  # noqa: F401  (re-exported: the adapter reading API)
    ADAPTER_CONFIG,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    adapter_folder,
    adapter_label,
    fused_targets,
    read_adapter_config,
)

META_FILE = ADAPTER_META  # written by ``tune`` next to the adapter: base fingerprint, ...
CONFIG_FILE = ADAPTER_CONFIG
WEIGHTS_FILE = ADAPTER_WEIGHTS
_FACTOR = re.compile(r"^(.*)\.lora_(A|B)(?:\.[^.]+)?\.weight$")
_EMBED_FACTOR = re.compile(r"^(.*)\.lora_embedding_(A|B)(?:\.[^.]+)?$")
_B_BIAS = re.compile(r"^(.*)\.lora_B(?:\.[^.]+)?\.bias$")  # PEFT lora_bias=True


def module_path(tensor_name: str) -> str:
    """The adapted module's path (relative to the ``*ForCausalLM`` object) in a tensor name of
    the adapter file: PEFT's ``base_model.model.`` prefix and the ``.lora_*`` suffix removed."""
    for pat in (_FACTOR, _EMBED_FACTOR, _B_BIAS):
        if m := pat.match(tensor_name):
            tensor_name = m.group(1)
            break
    name = canonical_name(tensor_name, None)
    return name.removeprefix("base_model.")


def adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor in the adapter weights (safetensors header, or a ``.bin`` read
    with ``weights_only``), without reading the safetensors data."""
    st = folder / WEIGHTS_FILE
    if st.is_file():
        return {name: info.shape for name, info in read_header(st).items()}
    b = folder / "adapter_model.bin"
    if b.is_file():
        sd = torch.load(b, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in sd.items()}
    raise SftscopeError(f"adapter {folder} has no {WEIGHTS_FILE} or .bin")


def _pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's pattern rule: a key matches when the module name ends with it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class LoraModule:
    """One adapted module: its path, the names of its factors in the adapter file, and the
    rank, alpha and scale the config gives it."""

    path: str  # module path relative to the *ForCausalLM object (canonical once re-rooted)
    a: str  # tensor names in the adapter file: lora_A (r, in) and lora_B (out, r)
    b: str
    embedding: bool  # lora_embedding_A (r, vocab) / lora_embedding_B (dim, r)
    bias: str | None = None  # lora_B bias (lora_bias=True): the module's bias moves by s * bias
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0  # alpha / r, or alpha / sqrt(r) with rsLoRA


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, parsed (headers only; factors are read with ``read``)."""

    folder: Path
    config: dict[str, Any]
    file: Path
    tensors: dict[str, TensorInfo]
    modules: list[LoraModule]
    other: list[str]  # non-LoRA tensors (modules_to_save, trainable tokens)

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", self.rank))

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    def settings(self, path: str, r: int) -> tuple[int, float, float]:
        """``(rank, alpha, scale)`` PEFT gives module ``path`` whose factors have rank ``r``;
        fails when the config's rank disagrees with the tensors."""
        rank = int(_pattern(self.config.get("rank_pattern"), path, self.rank))
        if rank != r:
            raise SftscopeError(f"adapter {path}: {CONFIG_FILE} says rank {rank} but the "
                                f"tensors have rank {r}")
        alpha = float(_pattern(self.config.get("alpha_pattern"), path, self.alpha))
        return rank, alpha, alpha / math.sqrt(r) if self.rslora else alpha / r


def read_lora(folder: str | Path) -> LoraAdapter:
    """Parse a LoRA adapter folder: config, safetensors header and the factor pairs of every
    adapted module. Refuses other PEFT types, DoRA (its change depends on the base weights),
    pickle-only folders and incomplete factor pairs."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise SftscopeError(f"{folder} is a {ptype} adapter; --adapter supports LoRA only")
    if cfg.get("use_dora"):
        raise SftscopeError(f"{folder} is a DoRA adapter (use_dora): its change depends on the "
                            f"base weights' column norms; merge it and compare with --sft")
    wfile = folder / WEIGHTS_FILE
    if not wfile.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise pickle_error(folder, pickles[0])
        raise SftscopeError(f"adapter folder {folder} has no {WEIGHTS_FILE}")
    tensors = read_header(wfile)
    factors: dict[str, dict[str, str]] = {}
    other: list[str] = []
    for name in tensors:
        m = _FACTOR.match(name) or _EMBED_FACTOR.match(name)
        mb = _B_BIAS.match(name)
        if m:
            key = m.group(2) + ("e" if "embedding" in name else "")
            factors.setdefault(m.group(1), {})[key] = name
        elif mb:
            factors.setdefault(mb.group(1), {})["bias"] = name
        else:
            other.append(name)
    mods: list[LoraModule] = []
    for path, f in sorted(factors.items()):
        emb = "Ae" in f or "Be" in f
        a, b = (f.get("Ae"), f.get("Be")) if emb else (f.get("A"), f.get("B"))
        if a is None or b is None:
            raise SftscopeError(f"adapter {wfile} has only one LoRA factor of {path}; "
                                f"the file is incomplete")
        mods.append(LoraModule(canonical_name(path, None), a, b, emb, f.get("bias")))
    if not mods:
        raise SftscopeError(f"adapter {wfile} holds no LoRA factors (lora_A/lora_B)")
    return LoraAdapter(folder, cfg, wfile, tensors, mods, other)


# --------------------------------------------------------------------------- against a model


def module_in_out(mod: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or a GPT-2 Conv1D (weight ``(in, out)``)."""
    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features
    w = getattr(mod, "weight", None)
    if type(mod).__name__ == "Conv1D" and w is not None and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    raise SftscopeError(f"{type(mod).__name__} is not a linear layer LoRA can adapt")


def fused_in_out(param: Any) -> tuple[int, int]:
    """``(in, out)`` of a fused expert parameter ``[E, out, in]`` as PEFT adapts it (0, 0 for
    anything else)."""
    if not isinstance(param, torch.Tensor) or param.dim() != 3:
        return 0, 0
    return int(param.shape[2]), int(param.shape[1])


def check_adapter(model: nn.Module, adapter: str | Path, base: str | None = None,
                  revision: str | None = None, allow_other_base: bool = False) -> Path:
    """Refuse an adapter made for another base: compare the target modules and every LoRA
    matrix's shape with ``model``, then the recorded base fingerprint (same shapes, other
    weights). Returns the adapter folder."""
    folder = adapter_folder(adapter)
    cfg = read_adapter_config(folder)
    made_for = cfg.get("base_model_name_or_path")
    names = dict(model.named_modules())
    fused = fused_targets(cfg)
    for key, shape in adapter_shapes(folder).items():
        for tag, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if tag not in key or not key.endswith(".weight"):
                continue
            path = module_path(key).replace(".base_layer", "")
            mod = names.get(path)
            if mod is None:
                raise SftscopeError(
                    f"adapter {adapter} was made for another base ({made_for}): it adapts "
                    f"{path}, which {type(model).__name__} does not have")
            if path in fused:  # fused expert parameters: one of them has this size
                sizes = {fused_in_out(getattr(mod, n, None))[1 - dim] for n in fused[path]}
                if len(shape) != 2 or shape[dim] not in sizes:
                    raise SftscopeError(
                        f"adapter {adapter} was made for another base ({made_for}): the "
                        f"experts {path} have no parameter of {'input' if dim else 'output'} "
                        f"size {shape[dim] if len(shape) == 2 else shape} in this model")
                continue
            fin, fout = module_in_out(mod)
            want = fin if dim == 1 else fout
            if len(shape) != 2 or shape[dim] != want:
                raise SftscopeError(
                    f"adapter {adapter} was made for another base ({made_for}): {path} has "
                    f"{'input' if dim == 1 else 'output'} size {want} in this model but "
                    f"{shape[dim] if len(shape) == 2 else shape} in the adapter")
    meta_path = folder / META_FILE
    if meta_path.is_file() and base is not None and not allow_other_base:
        meta = read_json(meta_path)
        theirs = (meta.get("base_fingerprint") or {}).get("hash")
        ours = fingerprint(base, revision).get("hash")
        if theirs and ours and theirs != ours:
            raise SftscopeError(
                f"adapter {adapter} was trained on another base ({made_for}, fingerprint "
                f"{theirs}) than {base} (fingerprint {ours}); pass the base it was made for, "
                f"or --allow-other-base if the weights are the same model")
    return folder


def load_adapter(model: nn.Module, adapter: str | Path, base: str | None = None, *,
                 revision: str | None = None, allow_other_base: bool = False):
    """Check the adapter against ``model`` and load it (PEFT errors become one clear line)."""
    from peft import PeftModel

    folder = check_adapter(model, adapter, base, revision, allow_other_base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError, AttributeError) as e:
        raise SftscopeError(f"adapter {adapter} does not fit this base model: "
                            f"{first_line(e, 200)}") from e
    peft_model.eval()
    return peft_model
