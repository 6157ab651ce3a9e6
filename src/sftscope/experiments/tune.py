"""Mid-Block Efficient Tuning: LoRA on the blocks a mask selects, at an equal parameter budget;
or full fine-tuning of those blocks (``method="full"``).

- Blocks: a mask over ``K`` depth segments (bottom segment first) or an explicit block list.
- Modules: the attention projections of the architecture map (q, k, v, o; a fused qkv for
  GPT-2 / NeoX / Phi-3), optionally the MLP; given to PEFT as block-relative paths
  (``self_attn.q_proj``, ``attn.c_proj``) with ``layers_to_transform`` + ``layers_pattern``.
  Block-relative paths rather than leaf names because a leaf name can be ambiguous (GPT-2 has
  ``attn.c_proj`` and ``mlp.c_proj``). The adapted modules are checked by walking the model.
- Budget: ``rank`` is the full-depth rank; a mask with ``m`` of ``L`` blocks gets
  ``round(rank * L / m)``, so the trainable parameters stay within a few percent.
- Scale: ``alpha = alpha_ratio * rank`` (constant ``alpha/r``) by default; ``rslora`` uses
  ``alpha = alpha_ratio * sqrt(full rank)`` with PEFT's ``alpha/sqrt(r)`` (equal to the default
  at full depth, rank-stabilised elsewhere); a fixed ``alpha`` (the ``reference`` preset: 128)
  reproduces the research code.
- Training: transformers ``Trainer`` with completion-only loss (labels -100 on prompt and pad).
  Blocks below the lowest adapted block get no backward pass: nothing there requires a gradient
  and input gradients are never forced (gradient checkpointing is non-reentrant, so it does not
  need them either).
- Full fine-tuning (``method="full"``): every weight of the selected blocks trains (norms and
  biases included); embeddings, final norm, head and every other block are frozen, so the
  backward pass stops at the lowest trained block as well. The result is a Hugging Face model
  folder ``RUN/model`` (weights and tokenizer) instead of an adapter. A mask such as ``00111``
  (bottom segment first) is the research code's "freeze the bottom floor(L * ratio) blocks"
  run with ratio 2/5; ``--blocks 8-31`` gives any other split exactly.
- Dynamics: ``RUN/dynamics.csv`` (per block and module: gradient norm and the norm of the
  effective weight's change since step 0), see :mod:`sftscope.experiments.dynamics`.
- Objectives: ``sft`` (this module's completion-only loss) or, through TRL, ``dpo`` and
  ``grpo`` (:mod:`sftscope.experiments.objectives`: data, TRL's config and trainer, rewards,
  what run.json keeps of TRL); everything above applies to every objective.

Large models on several GPUs (``accelerate launch -m sftscope tune ...``): the Trainer takes
DDP, FSDP or DeepSpeed from accelerate's config. Full fine-tuning with FSDP needs
``fsdp_use_orig_params: true`` (only part of the model trains; or FSDP2, ``fsdp_version: 2``)
and ``fsdp_state_dict_type: FULL_STATE_DICT`` so that ``RUN/model`` is one ordinary folder;
DeepSpeed ZeRO-3 needs ``zero3_save_16bit_model: true`` for the same reason.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from sftscope.config.commands import EvalConfig, TuneConfig, check_moe_options
from sftscope.config.core import changed, defaults
from sftscope.errors import Interrupted, SftscopeError, WriteError, first_line
from sftscope.experiments.context import Models, RunContext
from sftscope.experiments.dynamics import DYNAMICS_FILE, DynamicsRecorder
from sftscope.experiments.evaluate import EvalResult
from sftscope.experiments.moe_tune import (
    EXPERT_DROPOUT_NOTE,
    adapted_parts,
    lora_dropout,
    moe_budget_params,
    moe_lora_targets,
    select_experts,
)
from sftscope.experiments.packing import PerExampleAttention, choose_packing
from sftscope.experiments.training import TrainSet, trainable_params
from sftscope.experiments.training import drop_input_grad_hooks as _drop_input_grad_hooks
from sftscope.io import (
    Timer,
    read_json,
    run_record,
    stable_hash,
    write_errno,
    write_json,
    writing,
)
from sftscope.load.adapters import (  # noqa: F401  (re-exported: tune's public API)
    META_FILE,
    adapter_folder,
    check_adapter,
    load_adapter,
    module_in_out,
)
from sftscope.load.arch import ATTN_ROLES, ArchSpec, arch_for, get_blocks, get_experts
from sftscope.load.models import LoadOptions, fingerprint, load_model, load_tokenizer, save_model
from sftscope.parallel import cpu_launch, watched
from sftscope.progress import plan, say, stage, staged, trainer_callback
from sftscope.runs import claim
from sftscope.segments import block_text, mask_blocks, parse_blocks, parse_mask

REFERENCE_ALPHA = 128.0
REFERENCE_MAX_LENGTH = 128


@dataclass
class TuneResult:
    """What was trained, how big it is, how it went, and where it is."""

    out: str
    adapter_dir: str | None
    model: str
    mask: str | None
    segments: int | None
    blocks: list[int]
    n_blocks: int
    full_rank: float | None
    rank: int | None
    alpha: float | None
    scaling: float | None
    rslora: bool
    mlp: bool
    modules: list[str]
    trainable_params: int
    full_depth_params: int
    budget_ratio: float
    seed: int
    dtype: str
    n_train: int
    n_truncated: int
    max_length: int
    longest_example: int
    steps: int
    train_loss: float | None
    loss_history: list[float]
    step_time_s: float | None
    resumed_from: str | None
    timings: dict[str, float] = field(default_factory=dict)
    eval: EvalResult | None = None
    method: str = "lora"
    model_dir: str | None = None
    dynamics: dict[str, Any] | None = None
    merged_dir: str | None = None  # --merge: the base with the adapter merged in (HF folder)
    objective: str = "sft"
    trl: dict[str, Any] | None = None  # DPO/GRPO: TRL's version, settings, reference, histories
    dropout: float | None = None  # the LoRA dropout applied (0 where experts are adapted)
    router: bool = False  # routers trained (--router)
    experts: dict[str, Any] | None = None  # --experts: selection, loads, trained experts

    @property
    def output_dir(self) -> str:
        """What was saved: the adapter folder (LoRA) or the model folder (full)."""
        return str(self.model_dir if self.method == "full" else self.adapter_dir)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneResult:
        """Rebuild from ``asdict`` output (as stored in run.json under ``result``)."""
        d = dict(d)
        if d.get("eval") is not None:
            d["eval"] = EvalResult.from_dict(d["eval"])
        return cls(**d)


# ------------------------------------------------------------------ configuration

def resolve_config(cfg: TuneConfig) -> TuneConfig:
    """Apply the preset to fields left at their defaults and check the plain values."""
    if cfg.preset == "reference":
        d = SimpleNamespace(**defaults(TuneConfig))
        ch: dict[str, Any] = {}
        if cfg.alpha is None and cfg.method == "lora":
            ch["alpha"] = REFERENCE_ALPHA
        if cfg.max_length is None:
            ch["max_length"] = REFERENCE_MAX_LENGTH
        if cfg.completion_only == d.completion_only:
            ch["completion_only"] = False
        if cfg.eval_shots is None:
            ch["eval_shots"] = 0
        if cfg.eval_max_new_tokens == d.eval_max_new_tokens:
            ch["eval_max_new_tokens"] = 64
        if cfg.eval_limit is None:
            ch["eval_limit"] = 100
        cfg = replace(cfg, **ch)
    return cfg


def select_blocks(cfg: TuneConfig, n_blocks: int) -> list[int]:
    """The adapted blocks: from the mask (bottom segment first) or the explicit list."""
    if cfg.mask is not None:
        mask = parse_mask(cfg.mask, cfg.segments)
        blocks = mask_blocks(mask, n_blocks)
    else:
        blocks = parse_blocks(str(cfg.blocks), n_blocks)
    if not blocks:
        raise SftscopeError("the selection adapts no block; set at least one 1 in the mask")
    return blocks


def budget_rank(full_rank: float, n_blocks: int, n_active: int) -> int:
    """``round(full_rank * n_blocks / n_active)`` (half up): the equal-budget rank."""
    if n_active < 1:
        raise SftscopeError("the selection adapts no block; set at least one 1 in the mask")
    exact = full_rank * n_blocks / n_active
    rank = int(math.floor(exact + 0.5))
    if rank < 1:
        raise SftscopeError(f"--rank {full_rank} over {n_blocks} blocks gives rank {exact:.3g} "
                            f"on {n_active} blocks, which rounds to 0; raise --rank")
    return rank


def lora_alpha(cfg: TuneConfig, rank: int) -> tuple[float, float]:
    """``(alpha, scaling)`` for the adapted rank (see the module docstring)."""
    if cfg.alpha is not None:
        alpha = float(cfg.alpha)
    elif cfg.rslora:
        alpha = cfg.alpha_ratio * math.sqrt(cfg.rank)
    else:
        alpha = cfg.alpha_ratio * rank
    scaling = alpha / math.sqrt(rank) if cfg.rslora else alpha / rank
    return alpha, scaling


# ------------------------------------------------------------------ targets and adapters

def target_paths(spec: ArchSpec, mlp: bool = False) -> list[str]:
    """Block-relative paths of the modules LoRA targets (attention; MLP too if asked)."""
    paths = [spec.attn[r] for r in ATTN_ROLES if r in spec.attn]
    if spec.fused_qkv:
        paths.append(spec.fused_qkv)
    if mlp:
        paths += list(spec.mlp.values())
    return sorted(dict.fromkeys(paths))


def lora_targets(model: nn.Module, blocks: list[int], mlp: bool = False,
                 spec: ArchSpec | None = None) -> list[str]:
    """Full module names that will get adapters; fails if the model lacks any of them."""
    spec = spec or arch_for(model)
    rels = target_paths(spec, mlp)
    kind = "attention" + (" or MLP" if mlp else "")
    if not rels:
        raise SftscopeError(f"{type(model).__name__} has no {kind} projections in the "
                            f"architecture map ({spec.family}); add them to "
                            f"sftscope/load/arch.py")
    dense_mlp = set(spec.mlp.values())
    names = []
    for b in blocks:
        sparse = spec.moe is not None and get_experts(model, b, spec) is not None
        for rel in rels:
            if sparse and rel in dense_mlp:  # an MoE block: its MLP is experts (moe_tune)
                continue
            path = f"{spec.blocks}.{b}.{rel}"
            try:
                mod = model.get_submodule(path)
            except AttributeError as e:
                raise SftscopeError(
                    f"{type(model).__name__} has no module {path!r}: the model does not have "
                    f"the {kind} projections LoRA targets ({', '.join(rels)})") from e
            module_in_out(mod)
            names.append(path)
    return names


def full_depth_budget(model: nn.Module, cfg: TuneConfig, spec: ArchSpec, n_blocks: int) -> int:
    """LoRA parameters of every block at the full-depth rank ``cfg.rank``: the budget a mask
    is compared with (on a mixture of experts: each routed expert's pair, the shared expert's
    and the routers' full weights counted too; docs/protocols.md)."""
    every = list(range(n_blocks))
    return (lora_param_count(model, lora_targets(model, every, cfg.mlp, spec), cfg.rank)
            + moe_budget_params(model, moe_lora_targets(model, every, spec, mlp=cfg.mlp,
                                                        router=cfg.router), cfg.rank))


def _parts_summary(names: list[str], spec: ArchSpec) -> str:
    """The adapted paths relative to their block, each once (``self_attn.q_proj, ...``)."""
    pat = re.compile(rf"^{re.escape(spec.blocks)}\.\d+\.")
    return ", ".join(dict.fromkeys(pat.sub("", n) for n in names))


def lora_param_count(model: nn.Module, names: list[str], rank: float) -> int:
    """LoRA parameters of rank ``rank`` on the named modules: ``rank * (in + out)`` each."""
    return int(round(sum(rank * sum(module_in_out(model.get_submodule(n))) for n in names)))


adapted_modules = adapted_parts  # the parts a PEFT model trains (one home: moe_tune)


def apply_lora(model: nn.Module, blocks: list[int], *, rank: int, alpha: float,
               dropout: float = 0.05, mlp: bool = False, rslora: bool = False,
               spec: ArchSpec | None = None, router: bool = False):
    """Wrap ``model`` with LoRA on the target modules of ``blocks``; returns the PEFT model.

    On a mixture of experts, ``mlp`` adapts the routed and shared experts and ``router``
    trains the routers (:mod:`sftscope.experiments.moe_tune`); adapting experts needs
    ``dropout`` 0 (:func:`lora_dropout`). Checks by walking the model that exactly the
    expected modules got adapters, and removes any input-gradient hook PEFT may have added
    (none is needed; see the module docstring).
    """
    from peft import LoraConfig, get_peft_model

    spec = spec or arch_for(model)
    modules = lora_targets(model, blocks, mlp, spec)
    moe = moe_lora_targets(model, blocks, spec, mlp=mlp, router=router)
    modules += moe.modules
    expected = modules + moe.parameters + moe.full
    # only the paths the selected blocks have: PEFT rewrites a target named like a fused
    # expert projection (``mlp.gate_proj`` of Qwen3-MoE/OLMoE) into experts of every block
    prefix = re.compile(rf"^{re.escape(spec.blocks)}\.\d+\.")
    rels = sorted({prefix.sub("", m) for m in modules})
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=rels,
        layers_to_transform=sorted(blocks), layers_pattern=spec.blocks.split(".")[-1],
        bias="none", task_type="CAUSAL_LM", use_rslora=rslora, fan_in_fan_out=spec.conv1d,
        target_parameters=moe.parameters or None, modules_to_save=moe.full or None,
    )
    try:
        with warnings.catch_warnings():  # PEFT reads a deprecated transformers attribute
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise SftscopeError(f"PEFT could not place LoRA on {type(model).__name__}: "
                            f"{first_line(e, 200)}") from e
    _drop_input_grad_hooks(peft_model)
    got = adapted_parts(peft_model)
    if got != sorted(expected):
        extra = sorted(set(got) - set(expected))[:3]
        missing = sorted(set(expected) - set(got))[:3]
        raise SftscopeError(f"LoRA landed on the wrong modules (unexpected: {extra}, missing: "
                            f"{missing}); the architecture map does not fit this model")
    return peft_model


def unfreeze_blocks(model: nn.Module, blocks: list[int], spec: ArchSpec | None = None) -> int:
    """Full fine-tuning: every parameter of ``blocks`` trains, every other one (embeddings,
    final norm, head, other blocks) is frozen; returns the trainable parameter count. Nothing
    below the lowest trained block requires a gradient, so the backward pass stops there."""
    spec = spec or arch_for(model)
    layers = get_blocks(model, spec)
    model.requires_grad_(False)
    for b in blocks:
        layers[b].requires_grad_(True)
    _drop_input_grad_hooks(model)
    return trainable_params(model)


def block_param_count(model: nn.Module, blocks: list[int], spec: ArchSpec | None = None) -> int:
    """Parameters of ``blocks`` (each shared tensor once)."""
    layers = get_blocks(model, spec or arch_for(model))
    seen: dict[int, int] = {}
    for b in blocks:
        for p in layers[b].parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def has_input_grad_hook(model: nn.Module) -> bool:
    """True if any sub-model forces its input embeddings to require a gradient."""
    return any(getattr(m, "_require_grads_hooks", None) for m in model.modules())


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing, without forcing input gradients."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _drop_input_grad_hooks(model)


# ------------------------------------------------------------------ data

class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


class PadCollator:
    """Right-pads ``input_ids``; ``labels`` are -100 on padding (and already on the prompt)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, feats: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), width), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_train_set(samples, tokenizer, *, completion_only: bool = True,
                    chat_template: bool = False, max_length: int | None = None,
                    model_max: int | None = None) -> TrainSet:
    """Tokenize ``prompt`` and ``completion`` separately (the boundary is exact), append EOS,
    and mask the prompt from the loss when ``completion_only``. Samples without a prompt
    (plain text) are trained on the whole text. ``max_length=None``: the longest example
    (capped at the model's position limit); truncation and dropped examples are counted."""
    from sftscope.load.data import render

    eos = tokenizer.eos_token_id
    rows: list[tuple[list[int], int]] = []
    for s in samples:
        text, prompt = render(s, tokenizer, chat_template)
        special = not chat_template
        if prompt is not None and text.startswith(prompt):
            p_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
            c_ids = tokenizer(text[len(prompt):], add_special_tokens=False)["input_ids"]
            ids, n_prompt = list(p_ids) + list(c_ids), len(p_ids)
        else:
            ids, n_prompt = list(tokenizer(text, add_special_tokens=special)["input_ids"]), 0
        if eos is not None:
            ids.append(int(eos))
        rows.append((ids, n_prompt if completion_only else 0))
    longest = max((len(r[0]) for r in rows), default=0)
    limit = max_length or longest
    if model_max is not None:
        limit = min(limit, model_max)
    examples, n_cut, n_drop = [], 0, 0
    for ids, n_prompt in rows:
        if len(ids) > limit:
            ids, n_cut = ids[:limit], n_cut + 1
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if all(t == -100 for t in labels[1:]):
            n_drop += 1  # nothing left to learn from (the completion was cut off)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise SftscopeError(f"no training example keeps any completion token at max length "
                            f"{limit}; raise --max-length")
    return TrainSet(examples, limit, longest, n_cut, n_drop)


# ------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    """The work a tune run will do: optimizer steps x examples per step x tokens each."""

    steps: int
    batch_size: int
    mean_tokens: float
    tokens: int

    def line(self) -> str:
        """The plan in one sentence (printed before training starts)."""
        return (f"planned work: {self.steps:,} steps x {self.batch_size} examples x "
                f"{self.mean_tokens:.0f} tokens (mean) = about {self.tokens:,} tokens through "
                f"forward and backward passes")


def plan_work(lengths: list[int], batch_size: int, *, epochs: float,
              max_steps: int | None) -> Plan:
    """Steps as the Trainer counts them (``max_steps``, else ``ceil(n / batch) x epochs``,
    at least one) and the tokens they process (mean example length x batch x steps)."""
    n = len(lengths)
    per_epoch = max(1, math.ceil(n / batch_size))
    steps = int(max_steps) if max_steps else max(1, math.ceil(per_epoch * epochs))
    mean = sum(lengths) / n if n else 0.0
    return Plan(steps, batch_size, mean, round(steps * min(batch_size, n) * mean))


def estimate_line(plan: Plan, measured: int, seconds: float, at_step: int) -> str:
    """The time estimate from ``measured`` steps that took ``seconds``, ending at ``at_step``:
    seconds per step x the steps of the plan (and of what is left)."""
    per = seconds / max(measured, 1)
    left = per * max(plan.steps - at_step, 0)
    return (f"measured {per:.2f} s per step over steps {at_step - measured + 1}..{at_step}: "
            f"about {_duration(per * plan.steps)} for {plan.steps:,} steps "
            f"({_duration(left)} left)")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_callback(plan: Plan, after: int = 3):
    """A TrainerCallback that times steps 2..after+1 (the first step pays one-off costs) and
    prints one estimate of the whole run from them."""
    import time

    from transformers import TrainerCallback

    class Estimate(TrainerCallback):
        def __init__(self) -> None:
            self.start: tuple[int, float] | None = None
            self.done = False

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.done or not state.is_world_process_zero:
                return
            if self.start is None:
                self.start = (state.global_step, time.perf_counter())
                return
            n = state.global_step - self.start[0]
            if n >= after or state.global_step >= plan.steps:
                self.done = True
                if state.global_step < plan.steps:
                    _say(estimate_line(plan, n, time.perf_counter() - self.start[1],
                                       state.global_step))

    return Estimate()


# ------------------------------------------------------------------ the run

def finite_loss_callback():
    """A TrainerCallback that stops training with one clear error on a NaN/Inf logged loss."""
    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                raise SftscopeError(
                    f"training loss became {loss} at step {state.global_step}; stopped before "
                    f"saving: check the model's weights and data, lower --lr, or use --dtype "
                    f"float32")

    return FiniteLoss()


def no_final_checkpoint_callback():
    """A TrainerCallback that skips the Trainer's checkpoint at the last step: the model is
    saved right after it, and for full fine-tuning that checkpoint (the whole model and the
    optimizer state) would be written only to be deleted."""
    from transformers import TrainerCallback

    class NoFinalCheckpoint(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if state.max_steps and state.global_step >= state.max_steps:
                control.should_save = False

    return NoFinalCheckpoint()


class StopOnSignal:
    """Ctrl-C / SIGTERM while training: finish the step, save a checkpoint, stop; the run then
    raises :class:`Interrupted` and the same command resumes from that checkpoint. A second
    signal stops at once (the last regular checkpoint stays)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers, while training (only the main thread may set them)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None:
                raise KeyboardInterrupt
            self.signum = signum
            _say("[yellow]stopping:[/] saving a checkpoint at the end of this step "
                 "(signal again to stop at once)")

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def callback(self):
        """The TrainerCallback that asks for the checkpoint and the stop (placed after
        ``no_final_checkpoint_callback``: at the last step the model is saved anyway)."""
        from transformers import TrainerCallback

        stopper = self

        class CheckpointOnSignal(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if stopper.signum is not None and state.global_step < state.max_steps:
                    control.should_save = True
                    control.should_training_stop = True

        return CheckpointOnSignal()


LOSS_FILE = "sftscope-loss.json"


class LossSum:
    """The training loss summed over every step in float64, saved in each checkpoint and taken
    up again on resume, so a resumed run records the ``train_loss`` of an uninterrupted one
    (the Trainer's own average covers only the steps since the resume)."""

    def __init__(self, trainer: Any, resumed_from: str | None) -> None:
        self.total = torch.zeros((), dtype=torch.float64, device=trainer.args.device)
        self.known = True  # False: resumed from a checkpoint without the sum (an older one)
        if resumed_from:
            path = Path(resumed_from) / LOSS_FILE
            self.known = path.is_file()
            if self.known:
                self.total += float(read_json(path)["loss_sum"])
        step = trainer.training_step

        def training_step(*args: Any, **kwargs: Any) -> torch.Tensor:
            loss = step(*args, **kwargs)
            self.total += loss.detach().to(torch.float64)
            return loss

        trainer.training_step = training_step

    def callback(self):
        """Writes the sum into each checkpoint the Trainer saves."""
        from transformers import TrainerCallback

        summed = self

        class SaveLossSum(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir() and is_main_process():
                    write_json(folder / LOSS_FILE, {"loss_sum": summed.total.item(),
                                                    "steps": state.global_step})

        return SaveLossSum()

    def mean(self, steps: int) -> float | None:
        return self.total.item() / steps if steps else None


def is_main_process() -> bool:
    """True on the process that writes files and evaluates (rank 0 under accelerate/torchrun)."""
    from sftscope.parallel import is_main

    return is_main()


def _say(msg: str) -> None:
    if is_main_process():
        say(msg)


def _config_hash(cfg: TuneConfig) -> str:
    return stable_hash(cfg.result_settings())


def _resolve_dtype(name: str) -> str:
    from sftscope.load.runtime import dtype_name, resolve_dtype

    return dtype_name(resolve_dtype(name, "cuda" if torch.cuda.is_available() else "cpu"))


def parse_eval_task(spec: str, flag: str = "--eval-task") -> tuple[str, str | None]:
    """``gsm8k`` / ``gsm8k:PATH`` / ``mmlu:PATH`` / ``perplexity:SOURCE`` -> (task, data)."""
    from sftscope.tasks import get_task, task_names

    name, sep, rest = spec.partition(":")
    if name not in task_names():
        raise SftscopeError(f"{flag} {spec!r}: use gsm8k, gsm8k:PATH, mmlu:PATH or "
                            f"perplexity:SOURCE (tasks: {', '.join(task_names())})")
    if not get_task(name).has_items:
        return name, rest or None
    return name, spec if sep else None


def _check_reporter(name: str) -> list[str]:
    if name == "none":
        return []
    import importlib.util

    mods = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[name]
    if not any(importlib.util.find_spec(m) for m in mods):
        raise SftscopeError(f"--report-to {name} needs the {mods[0]} package; install it or "
                            f"use --report-to none")
    return [name]


def _settings_diff(old: dict[str, Any], cfg: TuneConfig) -> str | None:
    """The first setting that differs from a recorded config (ignoring volatile ones)."""
    new = cfg.result_settings()
    old = {k: v for k, v in old.items() if k in new or k not in cfg.record()}
    # settings added since that run was recorded had their default then
    old = {**{k: v for k, v in defaults(TuneConfig).items() if k in new and k not in old},
           **old}
    diff = changed({k: v for k, v in old.items() if k != "out"},
                   {k: v for k, v in new.items() if k != "out"})
    if not diff:
        return None
    k = diff[0]
    more = f"; {len(diff) - 1} more differ" if len(diff) > 1 else ""
    return f"{k}: {old.get(k)!r} there, {new.get(k)!r} now{more}"


def checkpoint_steps(ckpt_dir: Path) -> list[Path]:
    """Trainer checkpoints, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_ok(path: Path) -> bool:
    """A checkpoint whose files are whole: trainer state parses, safetensors open, zips check."""
    import json
    import zipfile

    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        for f in path.iterdir():
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), "pt") as h:
                    for k in h.keys():  # noqa: SIM118
                        h.get_slice(k)
            elif f.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    if z.testzip() is not None:
                        return False
            elif f.suffix in (".pt", ".pth", ".bin"):
                return False
    except Exception:  # any unreadable piece makes the checkpoint unusable
        return False
    return True


def last_good_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest checkpoint that is whole; a truncated newer one is skipped (and named)."""
    for p in checkpoint_steps(ckpt_dir):
        if checkpoint_ok(p):
            return str(p)
        _say(f"[yellow]note:[/] checkpoint {p.name} is incomplete (killed while saving?); "
             f"falling back to the previous one")
    return None


def _clear(out: Path) -> None:
    """Remove what a previous tune run left in ``out`` (only files tune writes)."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    shutil.rmtree(out / "merged", ignore_errors=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    for name in ("run.json", "tune-config.json", "scores.csv", DYNAMICS_FILE):
        (out / name).unlink(missing_ok=True)
    for p in out.glob("predictions-*.jsonl"):
        p.unlink(missing_ok=True)


def _existing_run(cfg: TuneConfig, out: Path) -> TuneResult | None:
    """A finished run to reuse (--resume, same settings), or None to train; refuses to mix.

    A run killed before its first checkpoint, or refused by validation, blocks nothing: there
    is nothing to lose, so a corrected command simply starts over.
    """
    rec_path = out / "run.json"
    if rec_path.is_file():
        rec = read_json(rec_path)
        if rec.get("command") == "tune" and rec.get("finished"):
            if cfg.overwrite:
                if is_main_process():
                    _clear(out)
                return None
            diff = _settings_diff(rec.get("config") or {}, cfg)
            if diff:
                raise SftscopeError(f"--out {out} holds a finished tune run made with other "
                                    f"settings ({diff}); add --overwrite to replace it, or "
                                    f"choose another --out")
            if not cfg.resume:
                raise SftscopeError(f"--out {out} already holds a finished tune run with these "
                                    f"settings; --resume returns it, --overwrite trains again")
            return TuneResult.from_dict(rec["result"])
    started = out / "tune-config.json"
    if started.is_file() and is_main_process():  # rank 0 writes it: other ranks may see it
        # the checkpoint --resume would take (a partial one, e.g. from a full disk, is not one)
        last = None if cfg.overwrite else last_good_checkpoint(out / "checkpoints")
        if last is None:
            if not cfg.overwrite:
                _say("note: the earlier attempt in this folder saved no usable checkpoint; "
                     "starting over")
            _clear(out)
            return None
        rec = read_json(started)
        diff = _settings_diff(rec.get("config") or {}, cfg)
        step = Path(last).name.split("-")[-1]
        if diff:
            raise SftscopeError(f"--out {out} holds an unfinished tune run (checkpoint at step "
                                f"{step}) made with other settings ({diff}); --overwrite "
                                f"discards it and starts over, or choose another --out")
        if not cfg.resume and not rec.get("interrupted"):
            raise SftscopeError(f"--out {out} holds an unfinished tune run (checkpoint at step "
                                f"{step}); add --resume to continue it, or --overwrite to "
                                f"start over")
    return None


@contextlib.contextmanager
def _checkpoint_writes(trainer: Any, ckpt_dir: Path) -> Iterator[None]:
    """A checkpoint the Trainer could not write (a full disk) is one line naming it, and is
    removed: the rerun and its message then agree on the last whole checkpoint."""
    try:
        yield
    except SftscopeError:
        raise
    except Exception as e:
        folder = ckpt_dir / f"checkpoint-{trainer.state.global_step}"
        if write_errno(e, folder) is None:
            raise
        broken = folder.is_dir() and not checkpoint_ok(folder) and is_main_process()
        with writing(folder, remove=folder if broken else None):
            raise


@contextlib.contextmanager
def _what_a_rerun_does(ckpt_dir: Path) -> Iterator[None]:
    """A failed write (a full disk) while training or saving names the checkpoint a rerun
    with --resume takes, the one the rerun's own refusal names, or says there is none."""
    try:
        yield
    except WriteError as e:
        last = last_good_checkpoint(ckpt_dir) if is_main_process() else None
        then = (f"{Path(last).name} is kept: rerun with --resume to continue from it" if last
                else "no checkpoint was kept: the same command starts over")
        raise e.with_then(then) from e


def _mark_interrupted(out: Path, step: int) -> None:
    """Note in ``tune-config.json`` that Ctrl-C / SIGTERM stopped the run after a checkpoint:
    the same command (without --resume) then continues it, as the message promised."""
    path = out / "tune-config.json"
    if is_main_process() and path.is_file():
        rec = read_json(path)
        write_json(path, {**rec, "interrupted": step})


def _was_interrupted(out: Path) -> bool:
    path = out / "tune-config.json"
    if not path.is_file():
        return False
    try:
        return bool(read_json(path).get("interrupted"))
    except SftscopeError:
        return False


@dataclass(frozen=True)
class Budget:
    """The adapted blocks and their budget: the modules adapted (LoRA) or the blocks (full),
    and the full-depth budget in parameters."""

    n_blocks: int
    blocks: list[int]
    names: list[str]
    full_params: int
    rank: int | None  # LoRA: the equal-budget rank, alpha, scale and dropout (full: None)
    alpha: float | None
    scaling: float | None
    dropout: float | None
    narrow: int  # LoRA: the narrowest adapted projection's width (full: 0)


@dataclass
class TunePlan:
    """What a tune run will do, settled before training: the model and tokenizer loaded, the
    blocks, the equal-budget rank and scale (LoRA) or the blocks' parameters (full), the data."""

    cfg: TuneConfig
    out: Path
    ctx: RunContext  # the model, its tokenizer and pad id
    timer: Timer
    reporters: list[str]
    eval_task: tuple[str, str | None] | None
    dtype: str
    rows: Any = None  # DPO/GRPO: the records TRL trains on (SFT: ``data``)
    model: Any = None
    spec: ArchSpec | None = None
    budget: Budget | None = None
    data: TrainSet | None = None

    @property
    def full(self) -> bool:
        return self.cfg.method == "full"

    @property
    def sft(self) -> bool:
        return self.cfg.objective == "sft"


@dataclass
class Training:
    """What training set up and produced: the Trainer and how it ran (processes, checkpoint
    resumed from, packing), the trained parameters, and the hooks that watched it."""

    n_train_params: int
    freeze: Any = None
    experts_rec: dict[str, Any] | None = None
    recorder: DynamicsRecorder | None = None
    losses: LossSum | None = None
    trainer: Any = None
    args: Any = None
    world: int = 1
    last: str | None = None
    packed: bool = False
    packing_why: str = ""
    stopper: StopOnSignal | None = None
    output: Any = None
    adapter_dir: Path | None = None
    model_dir: Path | None = None
    merged_dir: str | None = None


@staged
def tune(config: TuneConfig, *, callbacks: list | None = None) -> TuneResult:
    """Train segment LoRA (``RUN/adapter``) or fine-tune the selected blocks in full
    (``RUN/model``), record ``RUN/dynamics.csv`` and ``RUN/run.json``, then evaluate.

    Deterministic for a seed (LoRA init, data order, dropout). With ``resume`` a killed run
    continues from its last Trainer checkpoint and a finished run is returned as recorded.
    ``callbacks`` are extra ``transformers.TrainerCallback`` objects.
    """
    cfg = resolve_config(config)
    out = claim(cfg.out, "tune")
    done = _existing_run(cfg, out)
    if done is not None:
        _say(f"{out} is already finished; returning its recorded result")
        return done
    if not cfg.resume and _was_interrupted(out):  # stopped by a signal: the same command resumes
        cfg = replace(cfg, resume=True)
    p = plan_tune(cfg, out)
    run = train(p, callbacks)
    return record_tune(p, run)


# ------------------------------------------------------------------ plan

def plan_tune(cfg: TuneConfig, out: Path) -> TunePlan:
    """Check the settings, load the model and tokenizer, and settle blocks, budget and data."""
    reporters = _check_reporter(cfg.report_to)
    eval_task = parse_eval_task(cfg.eval_task) if cfg.eval_task else None
    if eval_task is None and cfg.train == "gsm8k":
        eval_task = ("gsm8k", None)  # the hub dataset's test split
    ctx = RunContext("tune", out, Models.single(cfg.model, cfg.revision))
    p = TunePlan(cfg, out, ctx, Timer(), reporters, eval_task, dtype="")
    if not p.sft:  # DPO/GRPO records are read and checked before the model is loaded
        from sftscope.experiments import objectives

        p.rows, notes = objectives.train_rows(cfg)
        for note in notes:
            _say(f"[yellow]note:[/] {note}")
    p.dtype = _resolve_dtype(cfg.dtype)
    plan(3 + bool(cfg.merge and cfg.method != "full")
         + bool(cfg.run_eval and eval_task is not None))  # load, train, save(, merge)(, eval)
    stage("load model")
    with p.timer("load_model"):
        ctx.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, revision=cfg.revision)
        p.model = load_model(cfg.model, LoadOptions(revision=cfg.revision, dtype=p.dtype))
    p.spec = arch_for(p.model)
    check_moe_options(cfg, p.model.config)  # a hub model's config is known only now
    p.budget = plan_budget(cfg, p.model, p.spec)
    with p.timer("tokenize"):
        if p.sft:
            p.data = _train_data(cfg, ctx.tokenizer, p.model)
            _say_data(p.data)
    return p


def plan_budget(cfg: TuneConfig, model: nn.Module, spec: ArchSpec) -> Budget:
    """The adapted blocks, and the equal-budget rank, scale and dropout (LoRA) or the blocks'
    parameters (full)."""
    n_blocks = len(get_blocks(model, spec))
    blocks = select_blocks(cfg, n_blocks)
    if cfg.method == "full":
        return Budget(n_blocks, blocks, [f"{spec.blocks}.{b}" for b in blocks],
                      block_param_count(model, list(range(n_blocks)), spec), None, None, None,
                      None, 0)
    rank = budget_rank(cfg.rank, n_blocks, len(blocks))
    alpha, scaling = lora_alpha(cfg, rank)
    names = lora_targets(model, blocks, cfg.mlp, spec)
    dropout = lora_dropout(cfg, moe_lora_targets(model, blocks, spec, mlp=cfg.mlp,
                                                 router=cfg.router))
    narrow = min(min(module_in_out(model.get_submodule(n))) for n in names)
    return Budget(n_blocks, blocks, names, full_depth_budget(model, cfg, spec, n_blocks), rank,
                  alpha, scaling, dropout, narrow)


def _train_data(cfg: TuneConfig, tok: Any, model: nn.Module) -> TrainSet:
    """The SFT examples: loaded, tokenized, masked to their completions, cut to length."""
    from sftscope.experiments.evaluate import max_context
    from sftscope.load.data import load_samples

    samples = load_samples(cfg.train, text_field=cfg.text_field, n=cfg.n_train or None,
                           seed=cfg.data_seed, split=cfg.train_split,
                           skip_bad=cfg.skip_bad_records)
    return build_train_set(samples, tok, completion_only=cfg.completion_only,
                           chat_template=cfg.chat_template, max_length=cfg.max_length,
                           model_max=max_context(model))


# ------------------------------------------------------------------ train

def train(p: TunePlan, callbacks: list | None = None) -> Training:
    """Adapt (or unfreeze) the blocks, build the Trainer, train, and save what was trained."""
    from transformers import set_seed

    cfg = p.cfg
    set_seed(cfg.seed)
    p.model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(p.model)
    p.model, n_train_params, freeze, experts_rec = _adapt(p)
    every = cfg.logging_steps if cfg.dynamics_every is None else cfg.dynamics_every
    recorder = (DynamicsRecorder(p.model, p.spec, p.budget.n_blocks, every=every, method=cfg.method,
                                 path=p.out / DYNAMICS_FILE, write=is_main_process(),
                                 experts=experts_rec["trained"] if experts_rec else None)
                if every > 0 else None)
    ckpt_dir = p.out / "checkpoints"
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the Trainer's checkpoint writes: we report instead
    with _what_a_rerun_does(ckpt_dir):  # a failed write says what the rerun will take
        try:
            # packed batches attend per example while training (the model is as loaded after)
            with PerExampleAttention(p.model, p.sft and cfg.packing != "off") as attention:
                run = _make_trainer(p, Training(n_train_params, freeze, experts_rec, recorder),
                                    callbacks, attention)
                stage("train")
                # one process: a signal checkpoints at the step's end; several (DDP/FSDP)
                # would each see it at another step, so there it stops at once as before
                stop = run.stopper.installed() if run.world == 1 else contextlib.nullcontext()
                with (p.timer("train"), stop, _checkpoint_writes(run.trainer, ckpt_dir),
                      watched(run.world)):
                    run.output = run.trainer.train(resume_from_checkpoint=run.last)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        _check_finished(p, run)
        _save(p, run)
    return run


def _adapt(p: TunePlan) -> tuple[nn.Module, int, Any, dict[str, Any] | None]:
    """The model with its selected blocks trainable (full) or LoRA on them; the trainable
    parameters, and with ``--experts`` the expert freeze and its record."""
    b = p.budget  # the blocks and their budget
    cfg, model, blocks, spec = p.cfg, p.model, b.blocks, p.spec
    sel = (f"mask {cfg.mask} of {len(cfg.mask)} segments" if cfg.mask else
           f"blocks {cfg.blocks}")
    where = f"blocks {block_text(blocks)} ({sel}, {b.n_blocks} blocks)"
    freeze = experts_rec = None
    if p.full:
        n_train_params = unfreeze_blocks(model, blocks, spec)
        if cfg.experts is not None:  # an SFT option: the training examples measure loads
            freeze, experts_rec = select_experts(model, cfg, p.data.examples, blocks, spec)
        _say(f"full fine-tuning of {where}; embeddings, head and the other blocks frozen")
        if freeze is not None and experts_rec is not None:
            n_train_params -= freeze.frozen_params
            _say(f"routed experts trained (--experts {cfg.experts}), per block: "
                 + "; ".join(f"{blk}: {e}" for blk, e in experts_rec["trained"].items())
                 + "; the others stay as they are")
        _say(f"trainable parameters: {n_train_params:,} "
             f"({100 * n_train_params / b.full_params:.1f} % of the {b.full_params:,} in all "
             f"blocks)")
        return model, n_train_params, freeze, experts_rec
    model = apply_lora(model, blocks, rank=b.rank, alpha=b.alpha, dropout=b.dropout,
                       mlp=cfg.mlp, rslora=cfg.rslora, spec=spec, router=cfg.router)
    n_train_params = trainable_params(model)
    names = adapted_parts(model)
    _say(f"LoRA on {where}: {_parts_summary(names, spec)} -> {len(names)} modules and "
         f"parameters")
    if b.dropout != cfg.dropout:
        _say(f"note: {EXPERT_DROPOUT_NOTE}")
    _say(f"rank {b.rank} (full-depth budget rank {cfg.rank:g} x {b.n_blocks} blocks), alpha "
         f"{b.alpha:g}, scale {b.scaling:.4g}{' (rsLoRA)' if cfg.rslora else ''}")
    _say(f"trainable parameters: {n_train_params:,} (full-depth budget {b.full_params:,}; "
         f"{100 * n_train_params / b.full_params:.1f} %)")
    if b.rank > b.narrow:
        _say(f"note: rank {b.rank} exceeds the narrowest adapted projection ({b.narrow}); the "
             f"extra rank adds parameters but no expressiveness")
    return model, n_train_params, freeze, experts_rec


def _training_arguments(p: TunePlan, micro: int, ckpt_dir: Path) -> Any:
    """The Trainer's arguments (TRL's config for DPO/GRPO), gradient accumulation set from
    the batch size, the micro-batch and the processes that train together."""
    from transformers import TrainingArguments

    cfg = p.cfg
    common = dict(
        output_dir=str(ckpt_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=1, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps else -1, learning_rate=cfg.lr,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup_steps, optim="adamw_torch",
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        bf16=p.dtype == "bfloat16", fp16=p.dtype == "float16", logging_steps=cfg.logging_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        report_to=p.reporters, disable_tqdm=True, seed=cfg.seed,
        data_seed=cfg.seed, remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False, activation_checkpointing=False,
        logging_nan_inf_filter=False,  # a NaN loss must show, never be hidden in the average
        use_cpu=cpu_launch(),  # torchrun/accelerate on CPU: DDP over gloo, not N lone runs
    )
    if p.sft:
        return TrainingArguments(**common)
    from sftscope.experiments import objectives

    return objectives.training_arguments(cfg, common)


def _make_trainer(p: TunePlan, run: Training, callbacks: list | None,
                  attention: PerExampleAttention | None = None) -> Training:
    """The Trainer with its callbacks (loss checks, progress, estimates, expert freeze,
    dynamics, signals), the collator (packed, through ``attention`` where it is active, or
    padded) and the checkpoint to resume."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cfg, out = p.cfg, p.out
    micro = min(cfg.micro_batch_size, cfg.batch_size)
    ckpt_dir = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_json(out / "tune-config.json", {"command": "tune", "config": cfg.record(),
                                              "config_hash": _config_hash(cfg)})
    run.last = last_good_checkpoint(ckpt_dir) if cfg.resume else None
    if cfg.resume:
        _say(f"resuming from {run.last}" if run.last else "no checkpoint yet: starting from "
             "step 0")
    run.args = args = _training_arguments(p, micro, ckpt_dir)
    run.world = world = max(1, int(args.world_size))  # processes that really train together
    if cfg.batch_size % (micro * world):
        raise SftscopeError(f"--batch-size {cfg.batch_size} is not a multiple of "
                            f"--micro-batch-size {micro} x {world} processes; change one")
    args.gradient_accumulation_steps = cfg.batch_size // (micro * world)
    work = None
    if p.sft:
        work = plan_work([len(e["input_ids"]) for e in p.data.examples], cfg.batch_size,
                         epochs=cfg.epochs, max_steps=cfg.max_steps)
        _say(work.line() + "; a time estimate follows the first steps (none before: it "
             "depends on the machine)")
    run.stopper = StopOnSignal()
    every = [finite_loss_callback(), trainer_callback("train"),
             *([estimate_callback(work)] if work is not None else []),
             *([run.freeze.callback()] if run.freeze is not None else []),
             *([run.recorder.callback()] if run.recorder else []),
             *([no_final_checkpoint_callback()] if p.full and not cfg.keep_checkpoints
               else []),
             run.stopper.callback(), *(callbacks or [])]
    if p.sft:
        packer, run.packing_why = choose_packing(cfg.packing, p.model, p.data.examples,
                                                 p.ctx.pad_id, micro, attention)
        run.packed = packer is not None
        _say(f"packing {run.packing_why}")
        run.trainer = Trainer(model=p.model, args=args,
                              train_dataset=_ListDataset(p.data.examples),
                              data_collator=packer or PadCollator(p.ctx.pad_id),
                              callbacks=every)
    else:  # TRL pads its own batches
        from sftscope.experiments import objectives

        run.packed, run.packing_why = False, f"off: --objective {cfg.objective} batches are TRL's"
        run.trainer, p.data = objectives.make_trainer(cfg, model=p.model, args=args,
                                                      rows=p.rows, tok=p.ctx.tokenizer,
                                                      callbacks=every)
        _say_data(p.data)
    run.losses = LossSum(run.trainer, run.last) if world == 1 else None
    if run.losses is not None:
        run.trainer.add_callback(run.losses.callback())
    for cb in (PrinterCallback, ProgressCallback):  # raw log dicts and tqdm: we report instead
        run.trainer.remove_callback(cb)
    return run


def _check_finished(p: TunePlan, run: Training) -> None:
    """A signal that stopped training early marks the run interrupted; a non-finite loss
    saves nothing."""
    state, output = run.trainer.state, run.output
    if run.stopper.signum is not None and state.global_step < state.max_steps:
        _mark_interrupted(p.out, int(state.global_step))
        raise Interrupted()
    if output.training_loss is not None and not math.isfinite(output.training_loss):
        raise SftscopeError(f"training loss is {output.training_loss} (not finite); "
                            f"nothing was saved: check the model's weights and data, lower "
                            f"--lr, or use --dtype float32")


def _save(p: TunePlan, run: Training) -> None:
    """``RUN/adapter`` (LoRA) or ``RUN/model`` (full) with its meta file; ``--merge``: the base
    with the adapter merged in, ``RUN/merged``."""
    b = p.budget  # the blocks and their budget
    cfg, out, trainer = p.cfg, p.out, run.trainer
    meta = {"base": cfg.model, "base_fingerprint": fingerprint(cfg.model, cfg.revision),
            "method": cfg.method, "mask": cfg.mask,
            "segments": len(cfg.mask) if cfg.mask else None, "blocks": b.blocks,
            "rank": b.rank, "alpha": b.alpha, "rslora": cfg.rslora if not p.full else None,
            "modules": b.names, "experts": run.experts_rec,
            "full_rank": float(cfg.rank), "seed": cfg.seed, "objective": cfg.objective}
    stage("save")
    with p.timer("save"):
        if p.full:
            from sftscope.load.runtime import quiet_libraries

            run.model_dir = model_dir = out / "model"
            with writing(model_dir, remove=model_dir), quiet_libraries():
                trainer.save_model(str(model_dir))
                if is_main_process():
                    p.ctx.tokenizer.save_pretrained(str(model_dir))
                    write_json(model_dir / META_FILE, meta)
                    # the Trainer's pickled arguments do not belong in a model folder
                    (model_dir / "training_args.bin").unlink(missing_ok=True)
        else:
            run.adapter_dir = adapter_dir = out / "adapter"
            with writing(adapter_dir, remove=adapter_dir):
                trainer.save_model(str(adapter_dir))
                if is_main_process():
                    write_json(adapter_dir / META_FILE, meta)
    if cfg.merge and not p.full and is_main_process():
        stage("merge")
        with p.timer("merge"):
            run.merged_dir = str(save_model(str(run.adapter_dir), out / "merged", LoadOptions(
                dtype=p.dtype, device="cpu", base=cfg.model, base_revision=cfg.revision)))
        _say(f"wrote {run.merged_dir} (the base with the adapter merged in)")


# ------------------------------------------------------------------ record

def _tune_result(p: TunePlan, run: Training, got: list[str]) -> TuneResult:
    """The run's result from its plan and training (``got``: the modules trained)."""
    b = p.budget  # the blocks and their budget
    from sftscope.experiments import objectives

    cfg, trainer, output = p.cfg, run.trainer, run.output
    steps = int(trainer.state.global_step)
    runtime = float(output.metrics.get("train_runtime", 0.0))
    history = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    losses = run.losses
    return TuneResult(
        out=str(p.out), adapter_dir=str(run.adapter_dir) if run.adapter_dir else None,
        model=cfg.model, mask=cfg.mask, segments=len(cfg.mask) if cfg.mask else None,
        blocks=b.blocks, n_blocks=b.n_blocks, full_rank=None if p.full else float(cfg.rank),
        rank=b.rank, alpha=b.alpha, scaling=b.scaling, rslora=cfg.rslora and not p.full,
        mlp=cfg.mlp or p.full, modules=got, trainable_params=run.n_train_params,
        full_depth_params=b.full_params, budget_ratio=run.n_train_params / b.full_params,
        seed=cfg.seed, dtype=p.dtype, n_train=len(p.data.examples),
        n_truncated=p.data.n_truncated, max_length=p.data.max_length,
        longest_example=p.data.longest, steps=steps,
        train_loss=(losses.mean(steps) if losses is not None and losses.known
                    else float(output.training_loss) if output.training_loss is not None
                    else None),
        loss_history=history, step_time_s=runtime / steps if steps else None,
        resumed_from=run.last, timings=p.timer.seconds, method=cfg.method,
        model_dir=str(run.model_dir) if run.model_dir else None,
        dynamics=run.recorder.info() if run.recorder is not None else None,
        merged_dir=run.merged_dir, objective=cfg.objective,
        trl=None if p.sft else objectives.record(cfg, trainer), dropout=b.dropout,
        router=cfg.router, experts=run.experts_rec,
    )


def _write_record(p: TunePlan, run: Training, result: TuneResult, got: list[str]) -> None:
    """``RUN/run.json``: the settings, budget, processes, timings and result."""
    b = p.budget  # the blocks and their budget
    cfg = p.cfg
    result.timings = dict(p.timer.seconds)
    write_json(p.out / "run.json", run_record(
        "tune", cfg.record(), config_hash=_config_hash(cfg), model_fingerprint=fingerprint(
            cfg.model, cfg.revision), n_blocks=b.n_blocks, method=cfg.method,
        objective=cfg.objective, trl=result.trl, mask=cfg.mask,
        blocks=b.blocks,
        rank=b.rank, alpha=b.alpha, modules=got, trainable_params=run.n_train_params,
        full_depth_params=b.full_params, experts=run.experts_rec, seed=cfg.seed,
        processes=run.world, grad_accumulation=run.args.gradient_accumulation_steps,
        timings=result.timings, packing={"used": run.packed, "reason": run.packing_why},
        result=result, finished=True))


def record_tune(p: TunePlan, run: Training) -> TuneResult:
    """The result, recorded in run.json before the evaluation (which may fail), the
    checkpoints removed unless kept, then the evaluation and the record again."""
    cfg, out = p.cfg, p.out
    model = run.trainer.model
    if run.freeze is not None:
        run.freeze.remove()
    got = p.budget.names if p.full else adapted_parts(model)
    if run.recorder is not None:
        for note in run.recorder.notes:
            _say(f"[yellow]note:[/] {note}")
    result = _tune_result(p, run, got)
    if not is_main_process():
        return result
    _write_record(p, run, result, got)
    (out / "tune-config.json").unlink(missing_ok=True)
    if not cfg.keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if not cfg.run_eval:
        return result
    world, trainer = run.world, run.trainer
    if p.eval_task is None:
        _say("no --eval-task given: skipping evaluation")
    elif world > 1 and (getattr(trainer, "is_fsdp_enabled", False)
                        or getattr(trainer, "is_deepspeed_enabled", False)):
        how = (f"--model {run.model_dir}" if p.full else f"--model {cfg.model} --adapter "
               f"{run.adapter_dir}")
        _say(f"evaluation skipped: the model is sharded over {world} processes; run "
             f"`sftscope eval {how}`")
    else:
        stage("evaluate")
        result.eval = _evaluate_after(model, p.ctx.tokenizer, cfg, p.eval_task, p.timer)
        _write_record(p, run, result, got)
    return result


def _say_data(data: TrainSet) -> None:
    _say(f"training data: {len(data.examples)} examples, longest {data.longest} tokens, max "
         f"length {data.max_length}, {data.n_truncated} truncated, {data.n_dropped} dropped "
         f"(no completion token left)")


def _evaluate_after(model, tok, cfg: TuneConfig, eval_task: tuple[str, str | None],
                    timer: Timer) -> EvalResult:
    """Evaluate the model just trained (no reload), into the run folder."""
    from sftscope.experiments.evaluate import evaluate_model, format_scores

    task, data = eval_task
    model.eval()
    model.config.use_cache = True
    full = cfg.method == "full"
    ecfg = EvalConfig(model=str(Path(cfg.out) / "model") if full else cfg.model, task=task,
                      data=data, out=cfg.out,
                      adapter=None if full else str(Path(cfg.out) / "adapter"),
                      shots=cfg.eval_shots,
                      fewshot_data=cfg.eval_fewshot_data, limit=cfg.eval_limit,
                      max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size,
                      chat_template=cfg.chat_template)
    with timer("eval"):
        res = evaluate_model(model, tok, ecfg)
    _say(format_scores(res))
    return res
