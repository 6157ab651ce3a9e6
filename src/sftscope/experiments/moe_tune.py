"""Tuning mixtures of experts: what ``tune`` adapts in an MoE block, and how it keeps the rest.

Where each part lives comes from :mod:`sftscope.load.arch` (``ArchSpec.moe``, ``moe_info``);
this module only decides what trains.

- LoRA ``--mlp``: the routed experts of each selected sparse block through PEFT's
  ``target_parameters`` (one LoRA pair per expert on each fused 3-D parameter,
  ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj``; PEFT ignores
  ``layers_to_transform`` there, so every selected block's parameter is named in full) and the
  shared expert's projections (ordinary ``target_modules``); a dense block's MLP as usual.
  PEFT's wrapper of a parameter cannot apply dropout, so such runs use LoRA dropout 0.
- ``--router``: the routers (and Qwen2-MoE's shared-expert gates) of the selected blocks train
  their full weights (PEFT ``modules_to_save``, saved in the adapter): a router is ``E x H``,
  smaller than a LoRA pair of useful rank on it.
- ``--experts`` (``--method full``): only the named routed experts of each selected sparse block
  train. A gradient hook zeroes the other experts' slices of the fused parameters, and with
  weight decay (which AdamW applies to every element, gradient or not) their values are put
  back after every optimizer step, so they stay bit-identical. ``top-load:K`` picks the K
  experts with the highest routing load (share of the top-k slots over the real tokens of the
  training examples, one forward pass before training). PEFT cannot give single experts of a
  fused parameter their own adapter, so LoRA refuses ``--experts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sftscope.errors import SftscopeError
from sftscope.load.arch import (
    ArchSpec,
    get_experts,
    get_router,
    get_shared_expert,
    get_shared_expert_gate,
    moe_info,
)
from sftscope.metrics import routing as R

EXPERT_DROPOUT_NOTE = ("LoRA dropout 0: PEFT's LoRA on fused expert parameters cannot apply "
                       "dropout")


def sparse_blocks(model: nn.Module, blocks: list[int], spec: ArchSpec) -> list[int]:
    """The blocks among ``blocks`` that have routed experts."""
    return [b for b in blocks if get_experts(model, b, spec) is not None]


# ------------------------------------------------------------------ LoRA targets

@dataclass
class MoeLora:
    """What LoRA adapts in the MoE parts of the selected blocks (full paths)."""

    modules: list[str] = field(default_factory=list)     # shared-expert projections
    parameters: list[str] = field(default_factory=list)  # fused expert parameters (3-D)
    full: list[str] = field(default_factory=list)        # routers / shared-expert gates

    @property
    def any(self) -> bool:
        return bool(self.modules or self.parameters or self.full)


def _linear_paths(root: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, m in root.named_modules() if n and isinstance(m, nn.Linear)]


def expert_parameters(experts: nn.Module, spec: ArchSpec) -> list[str]:
    """Names of the experts module's fused 3-D weights (biases of gpt-oss are 2-D: left out,
    as LoRA leaves biases)."""
    assert spec.moe is not None
    return [n for n in spec.moe.fused
            if isinstance(getattr(experts, n, None), torch.Tensor)
            and getattr(experts, n).dim() == 3]


def moe_lora_targets(model: nn.Module, blocks: list[int], spec: ArchSpec, *, mlp: bool,
                     router: bool) -> MoeLora:
    """The MoE parts of ``blocks`` that LoRA (``--mlp``) or full training (``--router``)
    take, by walking the model (see the module docstring)."""
    out = MoeLora()
    if spec.moe is None:
        return out
    for b in blocks:
        experts = get_experts(model, b, spec)
        if experts is None:
            continue
        base = f"{spec.blocks}.{b}"
        if mlp:
            out.parameters += [f"{base}.{spec.moe.experts}.{n}"
                               for n in expert_parameters(experts, spec)]
            shared = get_shared_expert(model, b, spec)
            if shared is not None:
                out.modules += _linear_paths(shared, f"{base}.{spec.moe.shared_expert}")
        if router:
            if get_router(model, b, spec) is not None:
                out.full.append(f"{base}.{spec.moe.router}")
            if get_shared_expert_gate(model, b, spec) is not None:
                out.full.append(f"{base}.{spec.moe.shared_expert_gate}")
    return out


def expert_param_lora_count(param: torch.Tensor, rank: float) -> float:
    """LoRA parameters PEFT gives a fused ``[E, a, b]`` parameter: ``E * r * (a + b)``."""
    e, a, b = param.shape
    return e * rank * (a + b)


def moe_budget_params(model: nn.Module, targets: MoeLora, rank: float) -> int:
    """Trainable parameters of ``targets`` at LoRA rank ``rank``: the experts' per-expert
    pairs, the shared experts' pairs and the full router weights (not rank-scaled)."""
    from sftscope.load.adapters import module_in_out

    total = 0.0
    for path in targets.parameters:
        mod, _, name = path.rpartition(".")
        total += expert_param_lora_count(getattr(model.get_submodule(mod), name), rank)
    for path in targets.modules:
        total += rank * sum(module_in_out(model.get_submodule(path)))
    for path in targets.full:
        total += sum(p.numel() for p in model.get_submodule(path).parameters())
    return int(round(total))


def adapted_parts(peft_model: nn.Module) -> list[str]:
    """What a PEFT model really trains, from its trainable parameters: LoRA-adapted module
    paths, fused parameters with a LoRA pair (``...experts.gate_up_proj``) and modules trained
    in full (``modules_to_save``); names relative to the base model."""
    from peft.tuners.lora import LoraLayer

    mods = dict(peft_model.named_modules())
    out: set[str] = set()
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_" in name:
            owner = name.split(".lora_")[0]
            layer = mods.get(owner)
            path = _strip(owner)
            pname = getattr(layer, "parameter_name", None) if isinstance(layer, LoraLayer) else None
            out.add(f"{path}.{pname}" if pname else path)
        elif ".modules_to_save." in name:
            out.add(_strip(name.split(".modules_to_save.")[0]))
        else:
            out.add(_strip(name.rpartition(".")[0]))
    return sorted(out)


def _strip(name: str) -> str:
    """A PEFT module name relative to the base model (prefix and ``.base_layer`` removed)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.replace(".base_layer", "")


# ------------------------------------------------------------------ expert selection (full)

def routing_loads(model: nn.Module, examples: list[dict[str, list[int]]], blocks: list[int],
                  spec: ArchSpec, *, batch_size: int = 8) -> dict[int, list[float]]:
    """Per sparse block of ``blocks``: each expert's share of the top-k slots over the real
    tokens of ``examples`` (one forward pass, no gradient; the router's own top-k choice,
    read from its output)."""
    info = moe_info(model.config)
    if info is None:
        return {}
    counts: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    hooks = []
    for b in sparse_blocks(model, blocks, spec):
        counts[b] = torch.zeros(info.n_experts, dtype=torch.float64)

        def hook(_mod, _inp, output, b=b):  # noqa: ANN001
            sel = R.router_selection(output, info.top_k)[1].cpu()
            counts[b] += R.slot_counts(sel[state["mask"].reshape(-1)], info.n_experts).double()
        hooks.append(get_router(model, b, spec).register_forward_hook(hook))
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                ids, mask = _pad([e["input_ids"] for e in examples[i:i + batch_size]])
                state["mask"] = mask.bool()
                model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    # no slot counted (no real token): every load 0, as the counts are
    return {b: np.nan_to_num(R.load_shares(c.numpy())).tolist() for b, c in counts.items()}


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def choose_experts(spec_text: str, loads: dict[int, list[float]],
                   blocks: list[int]) -> dict[int, list[int]]:
    """Per sparse block: the trained experts (``top-load:K``: highest load first, ties by
    index; a list: the same experts in every block)."""
    from sftscope.config.commands import parse_experts

    kind, val = parse_experts(spec_text)
    out: dict[int, list[int]] = {}
    for b in blocks:
        if kind == "list":
            out[b] = list(val)  # type: ignore[arg-type]
        else:
            order = sorted(range(len(loads[b])), key=lambda e: (-loads[b][e], e))
            out[b] = sorted(order[:int(val)])  # type: ignore[arg-type]
    return out


class ExpertFreeze:
    """Keeps the routed experts outside ``chosen`` (block -> trained experts) of full
    fine-tuning unchanged: zeroes their gradient slices (so clipping and the optimizer see
    none) and, when the optimizer decays weights, restores their values after each step."""

    def __init__(self, model: nn.Module, spec: ArchSpec, chosen: dict[int, list[int]],
                 *, weight_decay: float) -> None:
        self.frozen: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, row mask)
        self.saved: list[torch.Tensor] = []
        self.hooks = []
        for b, keep in chosen.items():
            experts = get_experts(model, b, spec)
            assert spec.moe is not None and experts is not None
            for name in spec.moe.fused:
                p = getattr(experts, name, None)
                if not isinstance(p, nn.Parameter) or not p.requires_grad:
                    continue
                rows = torch.ones(p.shape[0], dtype=torch.bool)
                rows[keep] = False
                if not rows.any():
                    continue
                rows = rows.to(p.device)
                self.frozen.append((p, rows))
                self.hooks.append(p.register_hook(lambda g, rows=rows: _zero_rows(g, rows)))
                if weight_decay > 0:
                    self.saved.append(p.detach()[rows].clone())

    @property
    def frozen_params(self) -> int:
        """Elements held fixed (not trained) by this freeze."""
        return sum(p.numel() // p.shape[0] * int(rows.sum()) for p, rows in self.frozen)

    def check(self, model: nn.Module) -> None:
        """Refuse a training setup that replaced the expert parameters after the hooks were
        put on them (FSDP and DeepSpeed shard them into new tensors): the other experts would
        train unnoticed."""
        live = {id(p) for p in model.parameters()}
        if any(id(p) not in live for p, _ in self.frozen):
            raise SftscopeError("--experts needs the expert weights as the model holds them "
                                "(one process or DDP); FSDP/DeepSpeed re-create them, so the "
                                "other experts could not be held fixed: drop --experts or "
                                "use DDP")

    def restore(self) -> None:
        """Put the frozen slices back (after an optimizer step that decayed them)."""
        if not self.saved:
            return
        with torch.no_grad():
            for (p, rows), old in zip(self.frozen, self.saved):
                p[rows] = old

    def callback(self):
        """A TrainerCallback that restores after each optimizer step (before dynamics)."""
        from transformers import TrainerCallback

        freeze = self

        class RestoreFrozenExperts(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001
                if model is not None:
                    freeze.check(model)

            def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ANN001
                freeze.restore()

        return RestoreFrozenExperts()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _zero_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[rows] = 0
    return grad


def lora_dropout(cfg: Any, targets: MoeLora) -> float:
    """The LoRA dropout a run applies: 0 where fused expert parameters are adapted (PEFT's
    parameter wrapper has none; an explicit other ``--dropout`` was refused before loading)."""
    return 0.0 if targets.parameters else float(cfg.dropout)


def select_experts(model: nn.Module, cfg: Any, examples: list[dict[str, list[int]]],
                   blocks: list[int], spec: ArchSpec) -> tuple[ExpertFreeze | None,
                                                                dict[str, Any] | None]:
    """``--experts`` with ``--method full`` (after the blocks are unfrozen): measure the loads
    (``top-load:K``), choose per sparse block, freeze the other experts. Returns the freeze
    and what run.json records (selection, loads, trained experts per block)."""
    if cfg.experts is None:
        return None, None
    sparse = sparse_blocks(model, blocks, spec)
    if not sparse:
        raise SftscopeError(f"--experts {cfg.experts}: none of the selected blocks has routed "
                            f"experts (dense blocks only); select sparse blocks or drop "
                            f"--experts")
    loads = (routing_loads(model, examples, sparse, spec, batch_size=cfg.micro_batch_size)
             if cfg.experts.startswith("top-load") else {})
    chosen = choose_experts(cfg.experts, loads, sparse)
    freeze = ExpertFreeze(model, spec, chosen, weight_decay=cfg.weight_decay)
    record = {"selection": cfg.experts, "trained": {str(b): e for b, e in chosen.items()},
              "loads": {str(b): v for b, v in loads.items()} or None,
              "load_basis": "share of the top-k slots over the training examples' real "
                            "tokens, before training" if loads else None,
              "frozen_params": freeze.frozen_params}
    return freeze, record
