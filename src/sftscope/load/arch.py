"""The one place that knows architectures.

For each model family: where the decoder blocks, embeddings, final norm and LM head live, and
the block-relative names of the attention (q/k/v/o, or a fused qkv) and MLP projections.
Unknown models get a generic fallback (the ModuleList of ``num_hidden_layers`` blocks); when
nothing fits, a clear error names the model class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sftscope.errors import SftscopeError

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family (dotted, relative to the ``*ForCausalLM`` object).

    ``attn`` and ``mlp`` map a role (``q``, ``k``, ``v``, ``o``; ``gate``, ``up``, ``down``,
    ``fc_in``, ``fc_out``, ``gate_up``) to a path relative to one block. ``fused_qkv`` names a
    fused projection and ``fused_layout`` its layout: ``concat`` (q, k, v stacked along the
    output dimension, sizes from the config) or ``neox`` (per-head interleaved ``[h, 3, d]``).
    ``conv1d`` marks GPT-2's ``Conv1D`` whose weight is stored ``(in, out)``.
    ``checkpoint_aliases`` maps legacy tensor-name prefixes of saved checkpoints to the names
    transformers loads them as (GPT-NeoX's ``embed_out.`` -> ``lm_head.``); ``config_keys``
    names this family's config keys for ``n_layers`` / ``hidden`` when they are not among the
    common ones (``num_hidden_layers``/``n_layer``/``num_layers``, ``hidden_size``/``n_embd``).
    Adding a family is one entry in ``REGISTRY``.
    """

    family: str
    model_types: tuple[str, ...]
    blocks: str
    embed: str
    final_norm: str
    head: str = "lm_head"
    attn: Mapping[str, str] = field(default_factory=dict)
    mlp: Mapping[str, str] = field(default_factory=dict)
    fused_qkv: str | None = None
    fused_layout: str | None = None
    conv1d: bool = False
    extra_embeds: tuple[str, ...] = ()
    checkpoint_aliases: Mapping[str, str] = field(default_factory=dict)
    config_keys: Mapping[str, str] = field(default_factory=dict)

    def target_modules(self, mlp: bool = False, roles: tuple[str, ...] = ATTN_ROLES) -> list[str]:
        """Leaf module names for PEFT ``target_modules`` (attention, optionally MLP)."""
        names = [self.attn[r] for r in roles if r in self.attn]
        if self.fused_qkv and any(r in roles for r in ("q", "k", "v")):
            names.append(self.fused_qkv)
        if mlp:
            names += list(self.mlp.values())
        return sorted({n.split(".")[-1] for n in names})

    def module_roles(self) -> dict[str, str]:
        """Block-relative path -> role, fused qkv included as ``qkv``."""
        out = {path: role for role, path in {**self.attn, **self.mlp}.items()}
        if self.fused_qkv:
            out[self.fused_qkv] = "qkv"
        return out


_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj"}
_GATED_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}

REGISTRY: list[ArchSpec] = [
    ArchSpec("llama", ("llama", "mistral", "mixtral", "olmo", "olmo2", "olmo3", "qwen2", "qwen3",
                       "gemma", "gemma2", "gemma3_text", "granite", "smollm3", "cohere"),
             blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
             attn=_LLAMA_ATTN, mlp=_GATED_MLP),
    ArchSpec("gpt2", ("gpt2",), blocks="transformer.h", embed="transformer.wte",
             final_norm="transformer.ln_f", attn={"o": "attn.c_proj"},
             mlp={"fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"}, fused_qkv="attn.c_attn",
             fused_layout="concat", conv1d=True, extra_embeds=("transformer.wpe",)),
    ArchSpec("gpt_neox", ("gpt_neox",), blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
             final_norm="gpt_neox.final_layer_norm", attn={"o": "attention.dense"},
             mlp={"fc_in": "mlp.dense_h_to_4h", "fc_out": "mlp.dense_4h_to_h"},
             fused_qkv="attention.query_key_value", fused_layout="neox",
             checkpoint_aliases={"embed_out.": "lm_head."}),
    ArchSpec("phi", ("phi",), blocks="model.layers", embed="model.embed_tokens",
             final_norm="model.final_layernorm",
             attn={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                   "o": "self_attn.dense"},
             mlp={"fc_in": "mlp.fc1", "fc_out": "mlp.fc2"}),
    ArchSpec("phi3", ("phi3",), blocks="model.layers", embed="model.embed_tokens",
             final_norm="model.norm", attn={"o": "self_attn.o_proj"},
             mlp={"gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"},
             fused_qkv="self_attn.qkv_proj", fused_layout="concat"),
]

_BY_TYPE = {t: spec for spec in REGISTRY for t in spec.model_types}

# What the generic fallback recognises, from module paths (loaded models) or tensor names
# (checkpoints, adapters): block-relative projection paths by role, embeddings, final norms.
ROLE_PATTERNS: dict[str, re.Pattern[str]] = {
    role: re.compile(pat) for role, pat in {
        "q": r"(^|\.)q_proj$", "k": r"(^|\.)k_proj$", "v": r"(^|\.)v_proj$",
        "o": r"(^|\.)(o_proj|out_proj|dense)$", "gate": r"(^|\.)gate_proj$",
        "up": r"(^|\.)up_proj$", "down": r"(^|\.)down_proj$", "fc_in": r"(^|\.)fc1$",
        "fc_out": r"(^|\.)fc2$",
    }.items()
}
EMBED_PATTERN = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings)$")
FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f",
                    "final_norm")
_BLOCK_CHILD = re.compile(r"^(.*?)\.(\d+)\.")


def infer_roles(subpaths: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Block-relative module paths -> ``(attn, mlp)`` role maps by ``ROLE_PATTERNS`` (the first
    path of a role wins; attention roles never match a path inside the MLP)."""
    attn: dict[str, str] = {}
    mlp: dict[str, str] = {}
    for sub in subpaths:
        for role, pat in ROLE_PATTERNS.items():
            target = mlp if role in MLP_ROLES else attn
            if role in target or (target is attn and "mlp" in sub):
                continue
            if pat.search(sub):
                target[role] = sub
    return attn, mlp


def spec_from_names(names: Iterable[str], config: Any) -> ArchSpec:
    """A spec from tensor names alone (``path.param``), for model types the registry does not
    know: the blocks are the numbered children whose count matches the config's layer count
    (else the most numerous), roles by ``ROLE_PATTERNS``."""
    names = list(names)
    counts: dict[str, set[int]] = {}
    for n in names:
        m = _BLOCK_CHILD.match(n)
        if m:
            counts.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not counts:
        raise SftscopeError(
            f"unknown architecture (model_type {_model_type(config)!r}): no numbered decoder "
            f"blocks among the tensor names; add an ArchSpec to load/arch.py"
        )
    want = n_layers(config)
    blocks = max(counts, key=lambda p: (len(counts[p]) == want, len(counts[p])))
    parent = blocks.rsplit(".", 1)[0] + "." if "." in blocks else ""
    block_re = re.compile(rf"^{re.escape(blocks)}\.\d+\.(.+)$")
    paths = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    attn, mlp = infer_roles(m.group(1) for p in paths if (m := block_re.match(p)))
    embed = next((p for p in paths if not block_re.match(p) and EMBED_PATTERN.search(p)), "")
    norms = {parent + c for c in FINAL_NORM_NAMES}
    final_norm = next((p for p in paths if p in norms), "")
    return ArchSpec(family=f"generic:{_model_type(config)}",
                    model_types=(_model_type(config),), blocks=blocks, embed=embed,
                    final_norm=final_norm, attn=attn, mlp=mlp)


def spec_for_paths(paths: Iterable[str]) -> ArchSpec:
    """The registered spec whose block paths fit these module paths best (e.g. the modules a
    LoRA adapter changes, with no base model at hand), else one inferred from them."""
    paths = list(paths)
    best, score = None, 0
    for spec in REGISTRY:
        roles = spec.module_roles()
        pat = re.compile(rf"^{re.escape(spec.blocks)}\.\d+\.(.+)$")
        n = sum(1 for p in paths if (m := pat.match(p)) and m.group(1) in roles)
        if n > score:
            best, score = spec, n
    if best is None:
        from types import SimpleNamespace

        return spec_from_names([p + ".weight" for p in paths], SimpleNamespace(model_type=""))
    return best


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error that names what is missing."""
    try:
        return root.get_submodule(path)
    except AttributeError as e:
        raise SftscopeError(
            f"{type(root).__name__} has no module {path!r}; the architecture map does not fit "
            f"this model (report it with the model class)"
        ) from e


def _model_type(obj: Any) -> str:
    cfg = getattr(obj, "config", obj)
    return str(getattr(cfg, "model_type", "") or "")


def n_layers(config: Any) -> int | None:
    """Decoder block count from a config, whatever the family calls it."""
    from sftscope.load.sources import BLOCK_KEYS, get_key

    spec = spec_for_config(config)
    key = spec.config_keys.get("n_layers") if spec is not None else None
    val = get_key(config, ((key,) if key else ()) + BLOCK_KEYS)
    return val if isinstance(val, int) else None


def spec_for_config(config: Any) -> ArchSpec | None:
    """The registered spec for a config's ``model_type``, or None."""
    return _BY_TYPE.get(_model_type(config))


def arch_for(model: nn.Module) -> ArchSpec:
    """The spec for a loaded model: registered, else inferred; fails loudly if nothing fits."""
    spec = spec_for_config(model.config)
    if spec is not None:
        try:
            model.get_submodule(spec.blocks)
            return spec
        except AttributeError:
            pass
    return _infer_spec(model)


def _infer_spec(model: nn.Module) -> ArchSpec:
    n_expected = n_layers(model.config)
    blocks_path = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and n_expected is not None and len(mod) == n_expected:
            blocks_path = name
            break
    if blocks_path is None:
        raise SftscopeError(
            f"unknown architecture {type(model).__name__} (model_type "
            f"{_model_type(model)!r}): no list of {n_expected} decoder blocks found; "
            f"add an ArchSpec for it to sftscope/load/arch.py"
        )
    parent = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    final_norm = ""
    for cand in FINAL_NORM_NAMES:
        path = f"{parent}.{cand}" if parent else cand
        try:
            model.get_submodule(path)
            final_norm = path
            break
        except AttributeError:
            continue
    names = {id(m): n for n, m in model.named_modules()}
    embed = names.get(id(model.get_input_embeddings()), "")
    head_mod = model.get_output_embeddings()
    head = names.get(id(head_mod), "lm_head") if head_mod is not None else "lm_head"
    block0 = model.get_submodule(f"{blocks_path}.0")
    attn, mlp = infer_roles(sub for sub, mod in block0.named_modules()
                            if isinstance(mod, nn.Linear))
    return ArchSpec(family=f"generic:{type(model).__name__}", model_types=(_model_type(model),),
                    blocks=blocks_path, embed=embed, final_norm=final_norm, head=head,
                    attn=attn, mlp=mlp)


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The decoder blocks, bottom first."""
    spec = spec or arch_for(model)
    blocks = get_submodule(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise SftscopeError(f"{spec.blocks} of {type(model).__name__} is not a ModuleList")
    return blocks


def get_final_norm(model: nn.Module, spec: ArchSpec | None = None) -> nn.Module:
    """The norm applied after the last block (identity if the model has none)."""
    spec = spec or arch_for(model)
    if not spec.final_norm:
        return nn.Identity()
    return get_submodule(model, spec.final_norm)


def get_head(model: nn.Module, spec: ArchSpec | None = None) -> nn.Module:
    """The LM head (tied or not)."""
    head = model.get_output_embeddings()
    if head is not None:
        return head
    spec = spec or arch_for(model)
    return get_submodule(model, spec.head)


def logit_softcap(config: Any) -> float | None:
    """Final-logit soft-capping value (Gemma 2 style), if the model uses one."""
    cap = getattr(config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def apply_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` when capping is on."""
    if cap is None:
        return logits
    return torch.tanh(logits / cap) * cap


def block_output(output: Any) -> torch.Tensor:
    """A decoder block's hidden-state output: transformers 5 returns a tensor, older a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def fused_qkv_sizes(config: Any) -> tuple[int, int, int]:
    """Output sizes of q, k, v inside a fused ``concat`` projection."""
    hidden = int(getattr(config, "hidden_size", None) or config.n_embd)
    heads = int(getattr(config, "num_attention_heads", None) or config.n_head)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return heads * head_dim, kv_heads * head_dim, kv_heads * head_dim


def split_fused_qkv(weight: torch.Tensor, spec: ArchSpec, config: Any) -> dict[str, torch.Tensor]:
    """Split a fused qkv weight (or bias) into q, k, v in ``(out, ...)`` orientation.

    ``concat``: q|k|v stacked along the output dimension (GPT-2 Conv1D is transposed first).
    ``neox``: output rows grouped per head as ``[heads, 3, head_dim]``.
    """
    w = weight.t() if (spec.conv1d and weight.dim() == 2) else weight
    if spec.fused_layout == "concat":
        q, k, v = fused_qkv_sizes(config)
        if w.shape[0] != q + k + v:
            raise SftscopeError(f"fused qkv has {w.shape[0]} rows, expected {q + k + v}")
        parts = torch.split(w, [q, k, v], dim=0)
        return dict(zip("qkv", parts))
    if spec.fused_layout == "neox":
        heads = int(config.num_attention_heads)
        rest = w.shape[1:]
        grouped = w.reshape(heads, 3, w.shape[0] // (3 * heads), *rest)
        return {r: grouped[:, i].reshape(-1, *rest) for i, r in enumerate("qkv")}
    raise SftscopeError(f"unknown fused layout {spec.fused_layout!r} for {spec.family}")
