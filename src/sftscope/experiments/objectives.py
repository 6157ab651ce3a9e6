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

Nothing here imports TRL or torch at module level: without TRL one line names the package.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError

TRL_MIN = "1.16"
RL_EXTRA = "pip install 'sftscope[rl]'"
BUILTIN_REWARDS = ("gsm8k", "mmlu")
TRAINERS = {"dpo": ("DPOConfig", "DPOTrainer"), "grpo": ("GRPOConfig", "GRPOTrainer")}
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


# ------------------------------------------------------------------ TRL and its settings

def trl_version() -> str:
    """TRL's version; one line naming the package when it is missing or too old."""
    if importlib.util.find_spec("trl") is None:
        raise SftscopeError(f"--objective dpo/grpo needs the trl package (>= {TRL_MIN}): "
                            f"{RL_EXTRA}")
    from importlib.metadata import version

    from packaging.version import Version

    v = version("trl")
    if Version(v) < Version(TRL_MIN):
        raise SftscopeError(f"--objective dpo/grpo needs trl >= {TRL_MIN}, found {v}: "
                            f"{RL_EXTRA}")
    return v


def _trl(objective: str) -> tuple[type, type]:
    """TRL's (config class, trainer class) of an objective."""
    trl_version()
    import trl

    conf, trainer = TRAINERS[objective]
    return getattr(trl, conf), getattr(trl, trainer)


def _field_default(cls: type, name: str) -> Any:
    import dataclasses

    f = cls.__dataclass_fields__[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def loss_types(objective: str) -> tuple[str, ...]:
    """The ``loss_type`` values TRL's config documents for ``objective`` (its help text: the
    one list TRL states; TRL itself still validates at construction)."""
    conf, _ = _trl(objective)
    text = conf.__dataclass_fields__["loss_type"].metadata.get("help", "")
    m = re.search(r"(?:Possible|Supported) values are:?(.*?)(?:\.\s|$)", text, re.S)
    return tuple(dict.fromkeys(re.findall(r"'([a-z_]+)'", m.group(1)))) if m else ()


def check_objective(cfg) -> None:
    """DPO/GRPO options before any model is loaded: TRL present, TRL's loss types, the data
    kind, the reward, and the batch against ``--num-generations``."""
    conf, _ = _trl(cfg.objective)
    if cfg.loss_type is not None:
        allowed = loss_types(cfg.objective)
        if allowed and cfg.loss_type not in allowed:
            raise SftscopeError(f"--loss-type {cfg.loss_type!r} is not one of TRL's "
                                f"{cfg.objective.upper()} losses ({', '.join(allowed)})")
    preference = cfg.train.partition(":")[0] == "preference"
    if cfg.objective == "dpo" and not preference:
        raise SftscopeError("--objective dpo trains on preference pairs: give --train "
                            "preference:FILE (fields prompt, chosen, rejected)")
    if cfg.objective == "grpo":
        if cfg.reward is None:
            raise SftscopeError("--objective grpo needs --reward gsm8k, mmlu or "
                                "python:MODULE:FUNCTION")
        reward_function(cfg.reward)
        g = cfg.num_generations or _field_default(conf, "num_generations")
        if cfg.batch_size % g:
            raise SftscopeError(f"--batch-size {cfg.batch_size} (completions per step) is not a "
                                f"multiple of --num-generations {g}; change one")


# ------------------------------------------------------------------ rewards

def _text(completion: Any) -> str:
    """A completion's text (conversational completions are a list of messages)."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def gsm8k_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion, cut at the task's stop strings, has lm-eval's
    ``flexible_extract`` answer equal to the gold (the evaluation's own scorer), else 0.0."""
    from sftscope.tasks.base import trim_at_stop
    from sftscope.tasks.gsm8k import STOPS, score

    return [float(score(trim_at_stop(_text(c), STOPS), {"answer": a})["flexible_extract"])
            for c, a in zip(completions, answer)]


def mmlu_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
    """1.0 when the completion starts with the gold option letter, else 0.0."""
    from sftscope.tasks.mmlu import answer_letter

    return [float(answer_letter(_text(c)) == a.strip()) for c, a in zip(completions, answer)]


def reward_function(spec: str) -> Callable[..., list[float]]:
    """``gsm8k``, ``mmlu`` or ``python:MODULE:FUNCTION`` (MODULE importable from the working
    directory or the path; FUNCTION called as TRL calls rewards: ``prompts``, ``completions``
    and the data's columns (``answer``) as keywords, one float per completion)."""
    if spec == "gsm8k":
        return gsm8k_reward
    if spec == "mmlu":
        return mmlu_reward
    kind, _, rest = spec.partition(":")
    module, _, name = rest.rpartition(":")
    if kind != "python" or not module or not name:
        raise SftscopeError(f"--reward {spec!r}: use gsm8k, mmlu or python:MODULE:FUNCTION")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module: any import error is theirs to fix
        raise SftscopeError(f"--reward {spec!r}: module {module!r} could not be imported "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise SftscopeError(f"--reward {spec!r}: {module} has no function {name!r}")
    return fn


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
    conf, _ = _trl(cfg.objective)
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
                            f"{str(e).splitlines()[0][:200]}") from e


def make_trainer(cfg, *, model, args, rows: list[dict], tok, callbacks: list):
    """TRL's trainer on ``model`` (already wrapped or unfrozen by tune); the reference is the
    disabled adapter (LoRA); no input-gradient hook is left. Returns (trainer, data stats)."""
    from datasets import Dataset

    from sftscope.experiments.tune import _drop_input_grad_hooks, trainable_params
    from sftscope.progress import quiet_libraries

    _, trainer_cls = _trl(cfg.objective)
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
                            f"{str(e).splitlines()[0][:200]}") from e
    _reference_is_disabled_adapter(trainer.model)
    _drop_input_grad_hooks(trainer.model)
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
    from sftscope.experiments.tune import TrainSet

    ds = trainer.train_dataset
    if cfg.objective == "dpo":
        lens = [len(p) + max(len(c), len(r)) for p, c, r in
                zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
        longest = max(lens, default=0)
        limit = trainer.args.max_length or longest
        return TrainSet(ds.to_list(), limit, longest, sum(n > limit for n in lens),
                        n_rows - len(ds))
    prompts = [_text(p) if not isinstance(p, str) else p for p in ds["prompt"]]
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
