"""Training objectives beyond SFT: DPO and GRPO through TRL (``tune --objective dpo|grpo``).

What is TRL's: the losses, the reference log-probabilities, GRPO's sampling, advantages and
clipping (``DPOTrainer`` / ``GRPOTrainer`` with their own ``DPOConfig`` / ``GRPOConfig``
defaults). ``--beta``, ``--loss-type``, ``--num-generations`` and ``--max-completion-length``
are TRL's arguments of the same names, checked against the values TRL's own config documents.

What sftscope adds, exactly as for SFT (``experiments.tune``): the model is wrapped with
segment LoRA at the equal budget (or the selected blocks unfrozen, ``--method full``) BEFORE
the trainer sees it, so nothing below the lowest tuned block requires a gradient (no input
gradient hook, TRL's gradient checkpointing off: tune's own non-reentrant one is used); the
recorded dynamics, checkpoints and ``--resume``, ``--merge`` and ``run.json``.

The reference model: with LoRA, the starting model with the adapter disabled (one model in
memory). TRL 1.16 adds a frozen copy of a passed-in adapter named ``ref``; sftscope's adapter
is freshly initialised (``B = 0``), so that copy equals the disabled adapter: it is removed and
TRL falls back to disabling the adapter. With ``--method full`` TRL loads a second copy of the
starting model as the reference (DPO; GRPO only when ``beta > 0``).

Budget: one optimizer step sees ``--batch-size`` sequences: DPO pairs (each a chosen and a
rejected sequence), GRPO completions (``batch_size / num_generations`` prompts).

The option checks (TRL present, its loss types, the rewards) live in ``config.objectives``:
the configs run them before any model is loaded. Nothing here imports TRL or torch at module
level: without TRL one line names the package.
"""

from __future__ import annotations

import warnings
from typing import Any

from sftscope.config.objectives import (  # noqa: F401  (rewards, loss types: re-exported)
    completion_text,
    gsm8k_reward,
    loss_types,
    mmlu_reward,
    reward_function,
    trl_classes,
    trl_version,
)
from sftscope.errors import SftscopeError, first_line

# TRL's settings recorded in run.json (beside everything tune records)
SETTINGS = {
    "dpo": ("beta", "loss_type", "loss_weights", "label_smoothing", "max_length",
            "truncation_mode", "disable_dropout", "precompute_ref_log_probs"),
    "grpo": ("beta", "loss_type", "num_generations", "max_completion_length", "temperature",
             "top_p", "top_k", "epsilon", "epsilon_high", "num_iterations", "scale_rewards",
             "generation_batch_size", "steps_per_generation", "mask_truncated_completions",
             "disable_dropout"),
}
HISTORIES = {"dpo": ("rewards/margins", "rewards/accuracies"), "grpo": ("reward", "reward_std")}


# ------------------------------------------------------------------ data

def train_rows(cfg) -> tuple[list[dict], list[str]]:
    """The training records as TRL reads them, validated (line numbers; ``--skip-bad-records``
    skips and counts) and subsampled as SFT's: DPO ``prompt/chosen/rejected``, GRPO ``prompt``
    and ``answer`` (the gold answer text the reward compares to)."""
    from sftscope.load.data import read_samples

    samples, notes = read_samples(cfg.train, text_field=cfg.text_field, n=cfg.n_train or None,
                                  seed=cfg.data_seed, split=cfg.train_split,
                                  skip_bad=cfg.skip_bad_records)
    if cfg.objective == "dpo":
        rows = [dict(s.meta["pair"]) for s in samples]
    else:
        if any(s.prompt is None for s in samples):
            raise SftscopeError(f"--objective grpo needs prompts; {cfg.train} gives plain "
                                f"texts: use gsm8k:FILE, mmlu:FILE or preference:FILE")
        rows = [{"prompt": s.prompt, "answer": (s.answer or "").strip()} for s in samples]
    if cfg.chat_template:
        rows = [_as_chat(r) for r in rows]
    return rows, notes


def _as_chat(row: dict) -> dict:
    """``--chat-template``: plain texts as one user turn and assistant replies (TRL applies
    the tokenizer's template to conversational data)."""
    out = dict(row)
    for k, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
        if isinstance(out.get(k), str):
            out[k] = [{"role": role, "content": out[k]}]
    return out


# ------------------------------------------------------------------ the trainer

def training_arguments(cfg, common: dict[str, Any]):
    """TRL's config for the objective: tune's Trainer arguments plus the objective's own
    (only those given; the rest keep TRL's defaults)."""
    conf, _ = trl_classes(cfg.objective)
    extra: dict[str, Any] = {"beta": cfg.beta, "loss_type": cfg.loss_type,
                             # TRL turns checkpointing back on after each reference forward
                             "activation_checkpointing_kwargs": {"use_reentrant": False}}
    if cfg.objective == "dpo":
        extra.update(max_length=cfg.max_length, remove_unused_columns=True)
        if cfg.loss_type is not None:
            extra["loss_type"] = [cfg.loss_type]
    else:
        extra.update(num_generations=cfg.num_generations,
                     max_completion_length=cfg.max_completion_length,
                     remove_unused_columns=False, log_completions=False)
    given = {k: v for k, v in extra.items() if v is not None or k == "max_length"}
    try:
        return conf(**{**common, **given})
    except ValueError as e:
        raise SftscopeError(f"TRL refused the {cfg.objective.upper()} settings: "
                            f"{first_line(e, 200)}") from e


def make_trainer(cfg, *, model, args, rows: list[dict], tok, callbacks: list):
    """TRL's trainer on ``model`` (already wrapped or unfrozen by tune); the reference is the
    disabled adapter (LoRA); no input-gradient hook is left. Returns (trainer, data stats)."""
    from datasets import Dataset

    from sftscope.experiments.training import drop_input_grad_hooks, trainable_params
    from sftscope.load.runtime import quiet_libraries

    _, trainer_cls = trl_classes(cfg.objective)
    if any(not isinstance(r["prompt"], str) for r in rows) and not getattr(
            tok, "chat_template", None):
        raise SftscopeError(f"{cfg.train} holds chat messages but the tokenizer has no chat "
                            f"template; give --tokenizer with one, or plain-text records")
    # TRL 1.16 asks transformers 5 a deprecated question at every step: not the user's concern
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated",
                            category=FutureWarning)
    before = trainable_params(model)
    kwargs: dict[str, Any] = {"ref_model": None} if cfg.objective == "dpo" else {
        "reward_funcs": reward_function(str(cfg.reward))}
    try:
        with quiet_libraries():
            trainer = trainer_cls(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tok, callbacks=callbacks, **kwargs)
    except ValueError as e:
        raise SftscopeError(f"TRL's {trainer_cls.__name__} refused the run: "
                            f"{first_line(e, 200)}") from e
    _reference_is_disabled_adapter(trainer.model)
    drop_input_grad_hooks(trainer.model)
    _no_input_gradients(trainer.model)
    if trainable_params(trainer.model) != before:
        raise SftscopeError(f"TRL changed the trainable parameters ({before:,} -> "
                            f"{trainable_params(trainer.model):,}); report this as a bug")
    return trainer, data_stats(cfg, trainer, tok, len(rows))


def _reference_is_disabled_adapter(model) -> None:
    """Remove TRL's ``ref`` copy of the fresh adapter: its output equals the disabled
    adapter's (``B = 0``), which TRL then uses as the reference, without a copy."""
    peft_config = getattr(model, "peft_config", None)
    if peft_config and "ref" in peft_config:
        model.delete_adapter("ref")
        model.set_adapter("default")


def _no_input_gradients(model) -> None:
    """TRL switches gradient checkpointing off around every reference forward and back on
    through transformers, which then forces the input embeddings to require a gradient (for
    PEFT): every block below the lowest tuned one would join the backward pass. The model's
    own ``enable_input_require_grads`` is made a no-op (tune's checkpointing is non-reentrant
    and needs no input gradient), and TRL re-enables it non-reentrant (see
    :func:`training_arguments`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.enable_input_require_grads = lambda: None


def data_stats(cfg, trainer, tok, n_rows: int):
    """What the trainer's data looks like, in tune's terms (``TrainSet`` of TRL's rows):
    DPO: prompt + the longer answer, TRL's ``max_length``, pairs TRL dropped (prompt too long);
    GRPO: the longest prompt plus ``max_completion_length`` (prompts are not truncated)."""
    from sftscope.experiments.training import TrainSet

    ds = trainer.train_dataset
    if cfg.objective == "dpo":
        lens = [len(p) + max(len(c), len(r)) for p, c, r in
                zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        longest = max(lens, default=0)
        limit = trainer.args.max_length or longest
        return TrainSet(ds.to_list(), limit, longest, sum(n > limit for n in lens),
                        n_rows - len(ds))
    prompts = [completion_text(p) if not isinstance(p, str) else p for p in ds["prompt"]]
    longest = max((len(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts),
                  default=0)
    return TrainSet(ds.to_list(), longest + int(trainer.args.max_completion_length), longest, 0,
                    0)


def record(cfg, trainer) -> dict[str, Any]:
    """What run.json keeps of TRL: version, trainer, reference, the settings actually used and
    the objective's logged histories (DPO reward margins, GRPO mean reward)."""
    args = trainer.args
    settings = {k: getattr(args, k) for k in SETTINGS[cfg.objective] if hasattr(args, k)}
    uses_ref = cfg.objective == "dpo" or float(args.beta) != 0.0
    adapters = sorted(getattr(trainer.model, "peft_config", None) or {})
    reference = ("none (beta 0)" if not uses_ref else  # what the trainer actually holds
                 "a second copy of the starting model" if trainer.ref_model is not None else
                 "the starting model with the adapter disabled" if adapters == ["default"] else
                 f"adapters {adapters}")
    logs = trainer.state.log_history
    history = {k: [float(h[k]) for h in logs if k in h] for k in HISTORIES[cfg.objective]}
    out = {"version": trl_version(), "trainer": type(trainer).__name__, "reference": reference,
           "settings": settings, "history": history}
    if cfg.objective == "grpo":
        out["reward"] = cfg.reward
    return out
