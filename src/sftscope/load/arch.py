"""The one place that knows architectures.

For each model family: where the decoder blocks, embeddings, final norm and LM head live, and
the block-relative names of the attention (q/k/v/o, or a fused qkv) and MLP projections,
and for mixture-of-experts families (``ArchSpec.moe``, a ``MoeSpec``) where each block's
router, routed experts and shared expert live, in memory and on disk.
Unknown models get a generic fallback (the ModuleList of ``num_hidden_layers`` blocks); when
nothing fits, a clear error names the model class. The fallback refuses blocks that hold
expert modules (it cannot tell routed from shared experts or find the router).

Mixture of experts, the public API (all other code asks these, never module names):

- ``is_moe(obj)``: a model, config, config dict or spec of an MoE family (with experts).
- ``moe_info(config) -> MoeInfo | None``: expert count, top-k, shared expert, top-k
  renormalisation, router scoring rule and which blocks are sparse.
- ``get_router / get_experts / get_shared_expert / get_shared_expert_gate(model, block,
  spec=None)``: a block's module of that role, or None (dense block, or no such role).
- ``moe_tensor(spec, name) -> MoeTensor | None``: a canonical tensor name of either layout
  (in memory / fused, or on disk / one tensor per expert) -> block, role, expert index and
  the expert projection (``gate``/``up``/``down``) it holds.
- ``expert_slices(spec, param, tensor)``: a fused expert tensor ``[E, ...]`` cut into the
  per-expert, per-projection tensors of the on-disk layout (views, no copies).
- ``ArchSpec.role_of(sub)``: the role of any block-relative module path (inside a shared
  expert, an on-disk ``experts.N.w1``: their MoE role), for tables that file modules by role.
- ``part_paths(spec, part)`` / ``check_part(config, part)``: the modules of a block part
  (``SWAP_PARTS``: all, attention, router, experts, shared_expert) and the one-line refusal of
  a part the model lacks (from a config dict too, before any model loads).

Roles (``MOE_ROLES``): ``router`` (the gate scoring the experts; DeepSeek's score-correction
bias included), ``experts`` (the routed experts, all of them), ``shared_expert`` (the
always-on expert; DeepSeek's ``shared_experts``) and ``shared_expert_gate`` (Qwen2-MoE's
sigmoid gate scaling the shared expert's output).

Layouts (transformers 5.25): in memory a block's routed experts are one module holding fused
3-D parameters, ``gate_up_proj`` ``[E, 2I, H]`` (each expert's gate rows, then its up rows)
and ``down_proj`` ``[E, H, I]``; ``save_pretrained`` writes one tensor per expert and
projection (Mixtral: ``block_sparse_moe.experts.N.w1/w3/w2`` for gate/up/down and
``block_sparse_moe.gate`` for the router, which load as ``mlp.*``; Qwen2/3-MoE, OLMoE and
DeepSeek-V3: ``mlp.experts.N.{gate,up,down}_proj`` and ``mlp.gate``). gpt-oss keeps the fused
tensors (with biases) on disk too, its router is ``mlp.router``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sftscope.errors import SftscopeError

if TYPE_CHECKING:  # torch is imported where used: configs validate with this module, torch-free
    import torch
    from torch import nn

ATTN_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")
MOE_ROLES = ("router", "experts", "shared_expert", "shared_expert_gate")
EXPERT_PROJ = ("gate", "up", "down")
_GATED_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class MoeSpec:
    """Where a mixture-of-experts block keeps its parts (paths relative to one block).

    ``router``, ``experts``, ``shared_expert``, ``shared_expert_gate``: module paths in
    memory (None where the family has no such part). ``disk_aliases`` maps block-relative
    prefixes of saved checkpoints to the in-memory ones (Mixtral ``block_sparse_moe.`` ->
    ``mlp.``). ``expert_proj`` names each projection of one expert on disk
    (``experts.N.<name>.weight``). ``fused`` maps each fused in-memory parameter of the experts
    module to the projections it stacks, in order along dimension 1 (``gate_up_proj``: gate
    rows then up rows); ``disk_fused`` says the checkpoints keep the fused tensors too
    (gpt-oss), which are then never split. ``scoring`` is the router's rule: ``softmax`` (over
    all experts, then top-k), ``topk_softmax`` (top-k logits, then softmax over them) or
    ``sigmoid`` (DeepSeek-V3: sigmoid scores, bias-corrected group-limited top-k);
    ``norm_topk`` whether the top-k weights are renormalised when the config does not say
    (``norm_topk_prob``).
    """

    router: str = "mlp.gate"
    experts: str = "mlp.experts"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    disk_aliases: Mapping[str, str] = field(default_factory=dict)
    expert_proj: Mapping[str, str] = field(default_factory=lambda: dict(_GATED_PROJ))
    fused: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"gate_up_proj": ("gate", "up"), "down_proj": ("down",)})
    disk_fused: bool = False
    scoring: str = "softmax"
    norm_topk: bool = False

    def paths(self) -> dict[str, str]:
        """Role -> in-memory module path, for the roles this family has."""
        out = {"router": self.router, "experts": self.experts,
               "shared_expert": self.shared_expert, "shared_expert_gate": self.shared_expert_gate}
        return {r: p for r, p in out.items() if p}


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
    moe: MoeSpec | None = None

    def target_modules(self, mlp: bool = False, roles: tuple[str, ...] = ATTN_ROLES) -> list[str]:
        """Leaf module names for PEFT ``target_modules`` (attention, optionally MLP)."""
        names = [self.attn[r] for r in roles if r in self.attn]
        if self.fused_qkv and any(r in roles for r in ("q", "k", "v")):
            names.append(self.fused_qkv)
        if mlp:
            names += list(self.mlp.values())
        return sorted({n.split(".")[-1] for n in names})

    def module_roles(self) -> dict[str, str]:
        """Block-relative path -> role, fused qkv included as ``qkv``, MoE parts by role."""
        out = {path: role for role, path in {**self.attn, **self.mlp}.items()}
        if self.fused_qkv:
            out[self.fused_qkv] = "qkv"
        if self.moe is not None:
            out.update({path: role for role, path in self.moe.paths().items()})
        return out

    def role_of(self, sub: str) -> str | None:
        """The role of a block-relative module path of either layout, or None: projections
        exactly, MoE parts and anything inside them (a shared expert's ``gate_proj``, an
        on-disk ``experts.3.w1``) by their MoE role."""
        role = self.module_roles().get(sub)
        if role is not None or self.moe is None:
            return role
        hit = _moe_part(self.moe, sub + ".")
        return hit[0] if hit else None


_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj"}
_GATED_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_MLA_ATTN = {"q_a": "self_attn.q_a_proj", "q_b": "self_attn.q_b_proj",
             "kv_a": "self_attn.kv_a_proj_with_mqa", "kv_b": "self_attn.kv_b_proj",
             "o": "self_attn.o_proj"}
_LLAMA_PATHS: dict[str, Any] = dict(blocks="model.layers", embed="model.embed_tokens",
                                    final_norm="model.norm")

REGISTRY: list[ArchSpec] = [
    ArchSpec("llama", ("llama", "mistral", "olmo", "olmo2", "olmo3", "qwen2", "qwen3",
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
    # Mixtures of experts. ``mlp`` keeps the dense MLP of the blocks that have one (Qwen2-MoE's
    # ``mlp_only_layers``, DeepSeek's first dense blocks); the sparse blocks are ``moe``.
    ArchSpec("mixtral", ("mixtral",), **_LLAMA_PATHS, attn=_LLAMA_ATTN,
             moe=MoeSpec(disk_aliases={"block_sparse_moe.": "mlp."},
                         expert_proj={"gate": "w1", "up": "w3", "down": "w2"}, norm_topk=True)),
    ArchSpec("qwen2_moe", ("qwen2_moe",), **_LLAMA_PATHS, attn=_LLAMA_ATTN, mlp=_GATED_MLP,
             moe=MoeSpec(shared_expert="mlp.shared_expert",
                         shared_expert_gate="mlp.shared_expert_gate")),
    ArchSpec("qwen3_moe", ("qwen3_moe",), **_LLAMA_PATHS, attn=_LLAMA_ATTN, mlp=_GATED_MLP,
             moe=MoeSpec()),
    ArchSpec("olmoe", ("olmoe",), **_LLAMA_PATHS, attn=_LLAMA_ATTN, moe=MoeSpec()),
    ArchSpec("deepseek_v3", ("deepseek_v3",), **_LLAMA_PATHS, attn=_MLA_ATTN, mlp=_GATED_MLP,
             moe=MoeSpec(shared_expert="mlp.shared_experts", scoring="sigmoid")),
    ArchSpec("gpt_oss", ("gpt_oss",), **_LLAMA_PATHS, attn=_LLAMA_ATTN,
             moe=MoeSpec(router="mlp.router", disk_fused=True, scoring="topk_softmax",
                         norm_topk=True,
                         fused={"gate_up_proj": ("gate", "up"), "gate_up_proj_bias": ("gate", "up"),
                                "down_proj": ("down",), "down_proj_bias": ("down",)})),
]

_BY_TYPE = {t: spec for spec in REGISTRY for t in spec.model_types}
_N_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")


# --------------------------------------------------------------------------- mixture of experts


@dataclass(frozen=True)
class MoeInfo:
    """What a config says about its experts: ``n_experts`` routed experts per sparse block,
    ``top_k`` of them per token, ``shared_expert`` (an always-on expert beside them),
    ``norm_topk_prob`` (top-k weights renormalised to sum to 1), the router's ``scoring``
    rule (``MoeSpec.scoring``) and ``sparse_blocks`` (the blocks with experts; the others
    have a dense MLP)."""

    n_experts: int
    top_k: int
    shared_expert: bool
    norm_topk_prob: bool
    scoring: str
    sparse_blocks: tuple[int, ...]


@dataclass(frozen=True)
class MoeTensor:
    """What one MoE tensor is: its ``block``, ``role`` (``MOE_ROLES``), ``expert`` (the
    routed expert's index for a per-expert tensor; None for a fused tensor holding all
    experts and for the other roles) and ``proj`` (``gate``/``up``/``down`` of a per-expert
    tensor; None otherwise)."""

    block: int
    role: str
    expert: int | None = None
    proj: str | None = None


def _cfg_get(cfg: Any, key: str) -> Any:
    from sftscope.load.sources import get_key

    return get_key(cfg, (key,))


def _moe_part(moe: MoeSpec, rel: str) -> tuple[str, int | None, str | None] | None:
    """``(role, expert, proj)`` of a block-relative name (``path.`` or ``path.param``) of
    either layout, or None when it is no MoE part."""
    for old, new in moe.disk_aliases.items():
        if rel.startswith(old):
            rel = new + rel[len(old):]
    for role in ("router", "shared_expert_gate", "shared_expert"):
        path = getattr(moe, role)
        if path and rel.startswith(path + "."):
            return role, None, None
    if not rel.startswith(moe.experts + "."):
        return None
    rest = rel[len(moe.experts) + 1:]
    head, _, tail = rest.partition(".")
    if head.isdigit():  # on disk: experts.N.<proj>.weight
        proj = tail.partition(".")[0]
        by_name = {v: k for k, v in moe.expert_proj.items()}
        return "experts", int(head), by_name.get(proj)
    return "experts", None, None


def moe_tensor(spec: ArchSpec, name: str) -> MoeTensor | None:
    """A canonical tensor name (relative to the ``*ForCausalLM`` object) of either layout ->
    its block, MoE role, expert index and projection; None for anything that is not part of
    an MoE block (attention, norms, a dense block's MLP, outside the blocks)."""
    if spec.moe is None:
        return None
    m = block_re(spec.blocks).match(name)
    if not m:
        return None
    hit = _moe_part(spec.moe, m.group(2))
    return MoeTensor(int(m.group(1)), *hit) if hit else None


def expert_slices(spec: ArchSpec, param: str, tensor: torch.Tensor,
                  ) -> dict[tuple[int, str], torch.Tensor]:
    """A fused expert parameter (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``)
    -> ``{(expert, proj): tensor}`` in the on-disk per-expert layout (views, no copies). For
    families that keep fused tensors on disk too (``disk_fused``), each expert's slice is one
    entry under the parameter's own name (``(e, "gate_up_proj")``), not split."""
    if spec.moe is None or param not in spec.moe.fused:
        raise SftscopeError(f"{param!r} is not a fused expert parameter of {spec.family}")
    projs = spec.moe.fused[param]
    if spec.moe.disk_fused or len(projs) == 1:
        key = param if spec.moe.disk_fused else projs[0]
        return {(e, key): tensor[e] for e in range(tensor.shape[0])}
    if tensor.dim() < 2 or tensor.shape[1] % len(projs):
        raise SftscopeError(f"fused {param} of shape {tuple(tensor.shape)} does not split into "
                            f"{', '.join(projs)}")
    size = tensor.shape[1] // len(projs)
    return {(e, proj): tensor[e, i * size:(i + 1) * size]
            for e in range(tensor.shape[0]) for i, proj in enumerate(projs)}


def moe_info(config: Any) -> MoeInfo | None:
    """The experts of a config (a transformers config or a ``config.json`` dict), or None for
    a dense model (or a family without an MoE entry)."""
    spec = spec_for_config(config)
    if spec is None or spec.moe is None:
        return None
    n = next((v for k in _N_EXPERTS_KEYS if isinstance(v := _cfg_get(config, k), int)), 0)
    if n <= 0:
        return None
    top_k = next((v for k in _TOP_K_KEYS if isinstance(v := _cfg_get(config, k), int)), 0)
    layers = n_layers(config) or 0
    only = set(_cfg_get(config, "mlp_only_layers") or ())
    step = int(_cfg_get(config, "decoder_sparse_step") or 1)
    first_dense = int(_cfg_get(config, "first_k_dense_replace") or 0)
    sparse = tuple(i for i in range(layers)
                   if i not in only and (i + 1) % step == 0 and i >= first_dense)
    shared = bool(spec.moe.shared_expert) and bool(
        _cfg_get(config, "shared_expert_intermediate_size")
        or _cfg_get(config, "n_shared_experts"))
    norm = _cfg_get(config, "norm_topk_prob")
    return MoeInfo(n_experts=n, top_k=top_k, shared_expert=shared,
                   norm_topk_prob=spec.moe.norm_topk if norm is None else bool(norm),
                   scoring=spec.moe.scoring, sparse_blocks=sparse)


def is_moe(obj: Any) -> bool:
    """Whether a model, config, ``config.json`` dict or spec is a mixture of experts."""
    if isinstance(obj, ArchSpec):
        return obj.moe is not None
    return moe_info(getattr(obj, "config", obj)) is not None


SWAP_PARTS = ("all", "attention", "router", "experts", "shared_expert")


def part_paths(spec: ArchSpec, part: str) -> tuple[str, ...]:
    """Block-relative module paths of one part of a block (``SWAP_PARTS``): ``attention`` the
    attention module (its projections and any norms or sinks inside it), ``router``,
    ``experts`` (all routed experts), ``shared_expert`` (with its gate); ``all`` the block
    itself (``""``)."""
    if part == "all":
        return ("",)
    if part == "attention":
        paths = [*spec.attn.values(), *([spec.fused_qkv] if spec.fused_qkv else [])]
        parents = {p.rpartition(".")[0] for p in paths}
        if len(parents) != 1 or not next(iter(parents)):
            raise SftscopeError(f"the attention of {spec.family} is not one module; "
                                f"sftscope/load/arch.py cannot swap it alone")
        return (parents.pop(),)
    if part not in ("router", "experts", "shared_expert"):
        raise SftscopeError(f"unknown block part {part!r}; choose one of {', '.join(SWAP_PARTS)}")
    if spec.moe is None:
        return ()
    if part == "shared_expert":
        return tuple(p for p in (spec.moe.shared_expert, spec.moe.shared_expert_gate) if p)
    return (getattr(spec.moe, part),)


def check_part(config: Any, part: str) -> None:
    """Refuse a block part the model does not have (``router``/``experts`` on a dense model,
    ``shared_expert`` on one without): one line, from a config object or a ``config.json``
    dict, so it can run before any model loads."""
    if part in ("all", "attention"):
        return
    info = moe_info(config)
    mtype = _model_type(config) or "this model"
    if info is None:
        raise SftscopeError(f"--parts {part}: {mtype} is not a mixture of experts (no routers "
                            f"or experts); use --parts all or attention")
    if part == "shared_expert" and not info.shared_expert:
        raise SftscopeError(f"--parts shared_expert: {mtype} has no shared expert; use "
                            f"--parts router or experts")


def _moe_module(model: nn.Module, block: int, role: str, spec: ArchSpec | None) -> nn.Module | None:
    spec = spec or arch_for(model)
    path = spec.moe.paths().get(role) if spec.moe is not None else None
    if path is None:
        return None
    try:
        return get_blocks(model, spec)[block].get_submodule(path)
    except AttributeError:  # a dense block of an MoE model
        return None


def get_router(model: nn.Module, block: int, spec: ArchSpec | None = None) -> nn.Module | None:
    """Block ``block``'s router (its weight ``[E, H]`` scores the experts), or None."""
    return _moe_module(model, block, "router", spec)


def get_experts(model: nn.Module, block: int, spec: ArchSpec | None = None) -> nn.Module | None:
    """Block ``block``'s routed experts (one module with fused 3-D parameters), or None."""
    return _moe_module(model, block, "experts", spec)


def get_shared_expert(model: nn.Module, block: int,
                      spec: ArchSpec | None = None) -> nn.Module | None:
    """Block ``block``'s shared expert (a gated MLP every token passes through), or None."""
    return _moe_module(model, block, "shared_expert", spec)


def get_shared_expert_gate(model: nn.Module, block: int,
                           spec: ArchSpec | None = None) -> nn.Module | None:
    """Block ``block``'s shared-expert gate (Qwen2-MoE), or None."""
    return _moe_module(model, block, "shared_expert_gate", spec)


def _refuse_experts(where: str, subpaths: Iterable[str], model_type: str) -> None:
    """The generic fallback cannot tell routed from shared experts nor find the router: a
    block that holds expert modules or tensors is refused, never analysed without them."""
    hits = [p for p in subpaths if _EXPERT_PATH.search(p)]
    if hits:
        raise SftscopeError(
            f"{where} (model_type {model_type!r}) is a mixture of experts that sftscope does not "
            f"map ({hits[0]}); add an ArchSpec with a MoeSpec (router, experts, shared expert "
            f"paths) for it to sftscope/load/arch.py"
        )

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
_EXPERT_PATH = re.compile(r"(^|\.)(experts?|shared_experts?|shared_expert_gate|block_sparse_moe)"
                          r"(\.|$)")


@functools.lru_cache(maxsize=64)
def block_re(blocks: str) -> re.Pattern[str]:
    """``<blocks>.<i>.<rest>`` -> ``(i, rest)``."""
    return re.compile(rf"^{re.escape(blocks)}\.(\d+)\.(.+)$")


def infer_roles(subpaths: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Block-relative module paths -> ``(attn, mlp)`` role maps by ``ROLE_PATTERNS`` (the first
    path of a role wins; attention roles never match a path inside the MLP; nothing inside an
    expert, shared or routed, is ever taken for the MLP)."""
    attn: dict[str, str] = {}
    mlp: dict[str, str] = {}
    for sub in subpaths:
        if _EXPERT_PATH.search(sub):
            continue
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
    subs = [m.group(1) for p in paths if (m := block_re.match(p))]
    _refuse_experts("the checkpoint", subs, _model_type(config))
    attn, mlp = infer_roles(subs)
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
    for spec in REGISTRY:  # ties: the first entry (dense families come first)
        pat = block_re(spec.blocks)
        n = sum(1 for p in paths if (m := pat.match(p)) and spec.role_of(m.group(2)))
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
    if isinstance(cfg, dict):
        return str(cfg.get("model_type") or "")
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
            blocks = model.get_submodule(spec.blocks)
        except AttributeError:
            if spec.moe is None:
                return _infer_spec(model)
            spec, blocks = _rerooted(model, spec)  # a wrapper (PeftModel) around an MoE
        if spec.moe is not None:
            _check_moe_paths(model, blocks, spec)
        return spec
    return _infer_spec(model)


def _rerooted(model: nn.Module, spec: ArchSpec) -> tuple[ArchSpec, nn.Module]:
    """The spec with every path under the wrapper prefix where its blocks sit
    (``base_model.model.`` of a PeftModel); the generic fallback otherwise."""
    for name, mod in model.named_modules():
        if name.endswith("." + spec.blocks):
            pre = name[: -len(spec.blocks)]
            return replace(spec, blocks=name, embed=pre + spec.embed if spec.embed else "",
                           final_norm=pre + spec.final_norm if spec.final_norm else "",
                           head=pre + spec.head), mod
    return _infer_spec(model), None  # (raises for an MoE: its experts are not mapped)


def _check_moe_paths(model: nn.Module, blocks: nn.Module, spec: ArchSpec) -> None:
    """Every expert module of the blocks sits where the MoE entry says: experts the entry
    does not map are refused, never dropped from an analysis."""
    assert spec.moe is not None
    known = spec.moe.paths().values()
    for i, blk in enumerate(blocks):
        for sub, _ in blk.named_parameters():
            if _EXPERT_PATH.search(sub) and not any(sub.startswith(p + ".") for p in known):
                raise SftscopeError(
                    f"{type(model).__name__} block {i} holds {sub}, which the {spec.family!r} "
                    f"entry of sftscope/load/arch.py does not map; fix its MoeSpec paths"
                )


def _infer_spec(model: nn.Module) -> ArchSpec:
    from torch import nn
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
    _refuse_experts(type(model).__name__,
                    [sub for blk in model.get_submodule(blocks_path)
                     for sub, _ in blk.named_parameters()], _model_type(model))
    attn, mlp = infer_roles(sub for sub, mod in block0.named_modules()
                            if isinstance(mod, nn.Linear))
    return ArchSpec(family=f"generic:{type(model).__name__}", model_types=(_model_type(model),),
                    blocks=blocks_path, embed=embed, final_norm=final_norm, head=head,
                    attn=attn, mlp=mlp)


def get_blocks(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    """The decoder blocks, bottom first."""
    from torch import nn
    spec = spec or arch_for(model)
    blocks = get_submodule(model, spec.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise SftscopeError(f"{spec.blocks} of {type(model).__name__} is not a ModuleList")
    return blocks


def get_final_norm(model: nn.Module, spec: ArchSpec | None = None) -> nn.Module:
    """The norm applied after the last block (identity if the model has none)."""
    from torch import nn
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
    import torch
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
    import torch
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
