"""One config per command, composed from the shared ingredients (torch-free).

``Config -> run -> Result``: each experiment's entry point takes one of these; the CLI builds
its flags from the fields; ``run.json`` records ``config.record()``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from sftscope.config.core import Config, at_least, in_range, opt, positive
from sftscope.config.ingredients import (
    PRESETS,
    Cache,
    Chain,
    DataSpec,
    ModelOrPair,
    OneModel,
    Output,
    PairModels,
    Runtime,
    Stats,
    adapter_opt,
    allow_mixed_opt,
    allow_other_base_opt,
    batch_size_opt,
    bootstrap_opt,
    chat_template_opt,
    check_data_source,
    check_pair_sources,
    device_opt,
    dtype_opt,
    eval_fewshot_opt,
    eval_limit_opt,
    eval_shots_opt,
    formats_opt,
    level_opt,
    limit_opt,
    max_length_opt,
    max_new_tokens_opt,
    out_opt,
    pooling_opt,
    preset_opt,
    segments_opt,
    sft_opt,
    split_opt,
    text_field_opt,
    train_opt,
)
from sftscope.errors import SftscopeError
from sftscope.load.arch import SWAP_PARTS
from sftscope.tasks import shots_help, task_help, task_names, task_spec_help

MASK_GROUPS = ("singles", "paper", "all")


def mask_list(value: str) -> str | None:
    """A check: mask groups (singles, paper, all) or masks such as 01000, comma-separated."""
    items = [p.strip() for p in value.split(",") if p.strip()]
    if not items:
        return "names no mask; use singles, paper, all or masks such as 01000"
    for item in items:
        if item not in MASK_GROUPS and (set(item) - {"0", "1"} or "1" not in item):
            return (f"has {item!r}: valid groups are singles, paper, all; or give masks of 0/1 "
                    f"with at least one 1 (bottom segment first, e.g. 01000)")
    return None


def task_spec(value: str) -> str | None:
    """A check: ``TASK`` or ``TASK:SOURCE`` with a known task."""
    name = value.split(":", 1)[0]
    if name not in task_names():
        from sftscope.config.core import did_you_mean

        return (f"names unknown task {name!r}; use {', '.join(task_names())} (optionally "
                f"TASK:FILE)" + did_you_mean(name, task_names()))
    return None


def check_task_spec(spec: str, *, split: str | None = None) -> None:
    """``TASK`` or ``TASK:SOURCE``: the task's data file is usable (torch-free)."""
    from sftscope.load.items import check_task_data

    name, _, data = spec.partition(":")
    check_task_data(name, data or None, split=split)


# ----------------------------------------------------------------------------- analyze

ENTROPY_NORMS = ("max", "logN", "logD", "logNlogD", "raw")


def entropy_norms(value: tuple[str, ...]) -> str | None:
    """A check: names of entropy normalisations."""
    bad = [v for v in value if v not in ENTROPY_NORMS]
    return f"has unknown normalisation {bad[0]!r}; use {', '.join(ENTROPY_NORMS)}" if bad else None


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig(PairModels, Chain, DataSpec, Runtime, Stats, Output, Cache):
    """Everything ``analyze`` needs (``stages``: a checkpoint chain after ``sft``)."""

    DEFAULT_OUT = True  # results are files only: a default run folder

    OUTPUTS: ClassVar[tuple[str, ...]] = ("metrics.*", "correlation.*", "noise.*", "routing.*")

    limit: int | None = limit_opt(1000)
    n_token: int = opt(100, "Samples (the first of the selection) that also get token-level "
                       "metrics: prompt entropy, sparsity, curvature.", check=at_least(0))
    bootstrap: int = bootstrap_opt(0, "analyze: 0 by default, as an interval of every metric "
                                   "at every layer costs more than the capture itself.")
    preset: str = preset_opt()
    entropy_alpha: float = opt(1.0, "Order alpha of the matrix entropy (1 = von Neumann).",
                               check=at_least(0))
    normalisation: str = opt("max", "Entropy normalisation: max = log min(rows, D), logN, "
                             "logD, logNlogD, raw.", choices=ENTROPY_NORMS)
    entropy_normalisations: tuple[str, ...] = opt((), "Further entropy normalisations reported "
                                                  "in the same run as <metric>_<norm> rows, "
                                                  "e.g. logN,raw.", check=entropy_norms)
    pooling: str = pooling_opt()
    cka_unbiased: bool = opt(False, "Debiased (unbiased HSIC) CKA.")
    router_input: str | None = opt(None, "Mixture-of-experts pairs: the stream the routers "
                                   "read in routing.csv: own (each model's; the default) or "
                                   "base (the SFT's routers on the base's stream: a router's "
                                   "own change, without upstream drift).",
                                   choices=("own", "base"))
    noise_splits: int = opt(20, "Noise floor: every pair metric of the base against itself on "
                            "two disjoint random halves of the data, over this many splits "
                            "(noise.csv: median and 2.5-97.5 % range; the report "
                            "draws it as a band behind the base-vs-SFT curve); 0 = none.",
                            check=at_least(0), metavar="R")


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True, kw_only=True)
class WeightsConfig(Output, Chain):
    """Everything ``weights`` needs (``stages``: a checkpoint chain after ``sft``)."""

    DEFAULT_OUT = True  # results are files only: a default run folder

    OUTPUTS: ClassVar[tuple[str, ...]] = ("weights.*",)

    base: str | None = opt(None, "Base checkpoint: local folder or hub id (optional with "
                           "--adapter: it adds the relative rows).")
    sft: str | None = opt(None, "Fine-tuned checkpoint: local folder or hub id.")
    adapter: str | None = adapter_opt()
    allow_mixed_pair: bool = allow_mixed_opt()
    low_rank: bool = opt(True, "Also measure how low-rank each module's change is (SVD); "
                         "--no-low-rank streams only.")
    top_k: int = opt(8, "Largest singular values reported per module (sv1..svK).",
                     check=at_least(1))
    max_rank: int = opt(64, "Rank of the randomized SVD for matrices larger than --exact-max "
                        "on their smaller side.", check=at_least(1))
    exact_max: int = opt(512, "Exact SVD when a matrix's smaller side is at most this.",
                         check=at_least(1))
    device: str = device_opt()

    def check(self) -> None:
        from sftscope.load.sources import check_folder, source_kind

        if self.sft is None and self.adapter is None:
            raise SftscopeError("give --sft (a fine-tuned checkpoint) or --adapter (a LoRA "
                                "folder)")
        if self.sft is not None and self.adapter is not None:
            raise SftscopeError("give --sft or --adapter, not both")
        if self.sft is not None and self.base is None:
            raise SftscopeError("--sft needs --base (the checkpoint it was fine-tuned from)")
        if self.adapter is not None:
            check_folder(self.adapter, "adapter folder")
        for flag, spec in (("--base", self.base), ("--sft", self.sft)):
            kind = source_kind(spec) if spec else None
            if kind == "adapter":
                raise SftscopeError(f"{flag} {spec} is a PEFT adapter; weights reads adapters "
                                    f"with --adapter")
            if kind == "gguf":
                raise SftscopeError(f"{flag} {spec} is a GGUF file; weights reads safetensors "
                                    f"checkpoints: convert it first (sftscope.load.models."
                                    f"save_model) and pass the folder")
        for stage in self.chain():
            kind = source_kind(stage.spec)
            if kind in ("adapter", "gguf"):
                raise SftscopeError(f"--stages {stage.label}={stage.spec} is a "
                                    f"{'PEFT adapter' if kind == 'adapter' else 'GGUF file'}; "
                                    f"weights compares safetensors checkpoints in a chain: "
                                    f"merge or convert it first (sftscope.load.models."
                                    f"save_model) and pass the folder")
        check_pair_sources(self.base, self.sft, self.allow_mixed_pair)


# ----------------------------------------------------------------------------- probe, swap


def check_one_or_pair(model: str | None, base: str | None, sft: str | None, *,
                      adapter_base: bool = False) -> None:
    """``--model`` (one model) or ``--base`` and ``--sft`` (a pair), never both: the check of
    the commands that take either (probe, ablate). ``adapter_base``: ``--base`` may go with a
    ``--model`` that is an adapter (the model it applies to)."""
    from sftscope.load.sources import check_model, source_kind

    adapter = adapter_base and model is not None and source_kind(model) == "adapter"
    if model is not None and (sft is not None or (base is not None and not adapter)):
        raise SftscopeError("give either --model, or --base and --sft, not both" + (
            " (--base goes with --model only when --model is an adapter)" if adapter_base
            else ""))
    if model is None and (base is None or sft is None):
        raise SftscopeError("give --model, or both --base and --sft")
    if model is not None:
        check_model(model, base=base)


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(ModelOrPair, Chain, DataSpec, Runtime, Stats, Output):
    """Everything ``probe`` needs: one model (``model``) or a pair (``base`` and ``sft``),
    optionally extended by a checkpoint chain (``stages``)."""

    OUTPUTS: ClassVar[tuple[str, ...]] = ("probe.*", "top1.*", "shifts.*")

    model: str | None = opt(None, "One model to probe: local folder or hub id (or give "
                            "--base and --sft).")
    limit: int | None = limit_opt(100)
    tokens: str = opt("all", "Next tokens that accuracy, loss and agreement count: all (every "
                      "real token, the paper's curve) or answer (only the answers' tokens: the "
                      "MMLU letter, the GSM8K final answer after ####; the LM head then runs at "
                      "a few positions per sample instead of every one, several times faster "
                      "on a large vocabulary). answer_prob/answer_rank always score the answer: "
                      "the MMLU letter after the prompt, or for GSM8K the final answer after "
                      "####, given the prompt and the reasoning.",
                      choices=("all", "answer"))
    top1_examples: int = opt(0, "Also write top1.csv: for the first N samples, the lens's top-1 "
                             "token at every layer of every model, at the position that "
                             "predicts the answer's first token (else the sample's last "
                             "position), beside the true next token: what each depth would "
                             "say there (0 = none).", check=at_least(0), metavar="N")
    lens: str = opt("logit", "logit: the logit lens head(final_norm(h_j)); tuned: also the "
                    "tuned lens (Belrose et al. 2023: a trained affine translator per layer "
                    "before the logit lens), every lens metric and kl_to_final for both, rows "
                    "with model 'NAME (tuned lens)'.", choices=("logit", "tuned"))
    lens_train: str | None = opt(None, "Training texts of the tuned lens (a data source as "
                                 "--data; default: --data without the texts the probe "
                                 "scores).")
    lens_train_limit: int = opt(200, "Training texts of the tuned lens (a seeded subsample).",
                                check=at_least(1), metavar="N")
    lens_steps: int = opt(100, "Optimiser steps of the tuned lens (one batch each).",
                          check=at_least(1))
    lens_lr: float = opt(1e-3, "Adam learning rate of the tuned lens.", check=positive)
    translators: str | None = opt(None, "Folder of tuned-lens translators: reused when saved "
                                  "there for the same model content and lens options, else "
                                  "trained and saved there.")
    kl: bool = opt(True, "For a pair: also compare the two models' lens distributions at every "
                   "depth (kl_pair = KL(P_sft,j || P_base,j), kl_to_final per model, and URIAL's "
                   "token-shift shares at the output, with shifts.csv). Both models are then "
                   "resident at once for one extra pass; --no-kl keeps one model at a time.")
    shifts_top: int = opt(50, "How many of the most often shifted tokens shifts.csv lists.",
                          check=at_least(1), metavar="N")
    chunk_elements: int = opt(1 << 24, "Logit elements per lens chunk (memory bound).",
                              check=at_least(1), cli=False, volatile=True)

    def check(self) -> None:
        check_one_or_pair(self.model, self.base, self.sft, adapter_base=True)
        if self.lens == "logit" and (self.translators or self.lens_train):
            raise SftscopeError("--translators and --lens-train are options of the tuned lens; "
                                "add --lens tuned")
        if self.translators and os.path.isfile(os.path.expanduser(self.translators)):
            raise SftscopeError(f"--translators {self.translators} is a file; give a folder")
        if self.lens_train:
            check_data_source(self.lens_train)


def alpha_list(value: tuple[float, ...]) -> str | None:
    """A check: interpolation weights in [0, 1], each once."""
    bad = [a for a in value if not 0.0 <= a <= 1.0]
    if bad:
        return f"has {bad[0]:g}; every alpha is in [0, 1] (0 = base, 1 = SFT)"
    if len(set(value)) != len(value):
        return "repeats an alpha; give each once"
    return None


def parse_mix(item: str) -> tuple[str, float]:
    """``MASK:ALPHA`` -> ``(mask, alpha)``; ValueError saying what is wrong with it."""
    mask, sep, alpha = item.partition(":")
    mask = mask.strip()
    if not sep or not mask or set(mask) - {"0", "1"} or "1" not in mask:
        raise ValueError(f"has {item!r}; write MASK:ALPHA with a mask of 0/1 (bottom segment "
                         f"first, at least one 1) and alpha in [0, 1], e.g. 01000:0.5")
    try:
        a = float(alpha)
    except ValueError:
        raise ValueError(f"has {item!r}: {alpha!r} is not a number; write MASK:ALPHA, e.g. "
                         f"01000:0.5") from None
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"has {item!r}: alpha must be in [0, 1] (0 = base, 1 = SFT)")
    return mask, a


def mix_specs(value: tuple[str, ...]) -> str | None:
    """A check: ``MASK:ALPHA`` items (a mask of 0/1 with a 1, alpha in [0, 1])."""
    for item in value:
        try:
            parse_mix(item)
        except ValueError as e:
            return str(e)
    return None


@dataclass(frozen=True, kw_only=True)
class SwapConfig(PairModels, DataSpec, Runtime, Stats, Output):
    """Everything ``swap`` needs (``alphas``: interpolation of each segment between base and
    SFT; ``save_mix``: such mixes written as model folders)."""

    OUTPUTS: ClassVar[tuple[str, ...]] = ("swap.*", "swap_items.*")

    limit: int | None = limit_opt(100)
    segments: int = segments_opt(5)
    masks: str | None = opt(None, "Extra masks besides the K one-segment masks: 01000,00110 "
                            "(bottom segment first), or paper, all.", check=mask_list)
    head: str = opt("base", "Final norm and LM head of every hybrid: base or sft.",
                    choices=("base", "sft"))
    directions: str = opt("both", "Which hybrids: both, sft-into-base or base-into-sft.",
                          choices=("both", "sft-into-base", "base-into-sft"))
    alphas: tuple[float, ...] = opt(
        (), "Also interpolate: for each segment (and each extra mask) score the base whose "
        "blocks there are (1-alpha) x base + alpha x SFT, at each alpha given, "
        "comma-separated in [0, 1] (e.g. 0.25,0.5,0.75; 1 = the sft-into-base swap, 0 = the "
        "base); rows with direction interpolate and an alpha column.", check=alpha_list,
        factory=tuple, aliases=("alpha",), metavar="A,B")
    save_mix: tuple[str, ...] = opt(
        (), "Write interpolated models as Hugging Face folders RUN/mix-MASK-aALPHA (loadable "
        "by AutoModelForCausalLM): MASK:ALPHA items, comma-separated, e.g. 01000:0.5 (head "
        "and final norm per --head; needs --out).", check=mix_specs, factory=tuple,
        metavar="MASK:ALPHA,...")
    chunk_elements: int = opt(1 << 24, "Logit elements per lens chunk (memory bound).",
                              check=at_least(1), cli=False, volatile=True)
    parts: str = opt("all", "Which parameters of a segment's blocks are swapped (and "
                     "interpolated): all (the whole blocks), attention (the attention module), "
                     "or on a mixture of experts router, experts (all routed experts) or "
                     "shared_expert (with its gate).", choices=SWAP_PARTS)

    def _check(self) -> None:
        """``--parts`` the base model has (runs first: before the data is read)."""
        if self.parts not in ("all", "attention") and self.base:
            from sftscope.load.arch import check_part
            from sftscope.load.sources import check_model

            src = check_model(self.base, "base model")
            config = src.config or (src.base.config if src.base is not None else {})
            if config:  # a hub id: checked once its config is fetched
                check_part(config, self.parts)

    def mixes(self) -> list[tuple[str, float]]:
        """``save_mix`` as ``(mask, alpha)`` pairs, in the order given."""
        return [parse_mix(item) for item in self.save_mix]

    def check(self) -> None:
        for mask, alpha in self.mixes():
            if len(mask) != self.segments:
                raise SftscopeError(f"--save-mix {mask}:{alpha:g}: the mask has {len(mask)} "
                                    f"characters but --segments is {self.segments}")
        if self.save_mix and self.out is None:
            raise SftscopeError("--save-mix writes model folders into the run folder; give "
                                "--out")
        if len(set(self.mixes())) != len(self.mixes()):
            raise SftscopeError("--save-mix repeats a MASK:ALPHA; give each once")


@dataclass(frozen=True, kw_only=True)
class AblateConfig(ModelOrPair, DataSpec, Runtime, Stats, Output):
    """Everything ``ablate`` needs: one model (``model``) whose blocks are ablated one unit at
    a time, or a pair whose SFT gets one unit reverted to the base."""

    OUTPUTS: ClassVar[tuple[str, ...]] = ("ablate.*",)

    model: str | None = opt(None, "One model to ablate: local folder or hub id (or give --base "
                            "and --sft to revert one unit of the SFT to the base).")
    limit: int | None = limit_opt(100)
    segments: int | None = segments_opt(None)  # unset: every block is a unit of its own
    mode: str = opt("zero", "One model: zero (the unit passes its input through: its blocks "
                    "add nothing to the residual stream) or mean (each block adds its mean "
                    "update over the real tokens of --data instead of its own). A pair: the "
                    "unit's blocks of the SFT are the base's (revert; --mode is not used).",
                    choices=("zero", "mean"))
    chunk_elements: int = opt(1 << 24, "Logit elements per lens chunk (memory bound).",
                              check=at_least(1), cli=False, volatile=True)

    def check(self) -> None:
        check_one_or_pair(self.model, self.base, self.sft)

    @property
    def pair(self) -> bool:
        """Revert units of the SFT to the base (else ablate one model)."""
        return self.model is None


# ----------------------------------------------------------------------------- eval


@dataclass(frozen=True, kw_only=True)
class EvalConfig(OneModel, Runtime):
    """Everything ``evaluate`` needs. ``shots=None``: the task's default; ``out=None``: no files.

    The ``reference`` preset reproduces the research code (0-shot, 64 new tokens, 100 items)
    for every field left at its default.
    """

    OUTPUTS: ClassVar[tuple[str, ...]] = ("scores.*", "predictions-*.jsonl")

    model: str | None = opt(None, "Model: local folder or hub id (not needed with --rescore).")
    task: str = opt("gsm8k", f"Task: {task_help()}.",
                    choices=task_names, aliases=("tasks",))
    rescore: str | None = opt(None, "Score saved completions again without loading a model: a "
                              "JSONL file whose lines have completion and answer, or eval's "
                              "own predictions-TASK.jsonl.")
    skip_bad_records: bool = opt(False, "Skip records with missing or empty fields (counted) "
                                 "instead of refusing the data.")
    data: str | None = opt(None, "Items: the hub dataset (default), NAME:FILE or a local FILE "
                           "in the task's fields; perplexity: any text source (default "
                           "wikitext).")
    out: str | None = out_opt()
    formats: tuple[str, ...] = formats_opt()
    overwrite: bool = opt(False, "Replace a finished run in --out that was made with other "
                          "settings.", volatile=True)
    adapter: str | None = adapter_opt()
    split: str | None = split_opt()
    shots: int | None = opt(None, f"Few-shot examples (default: {shots_help()}).",
                            check=at_least(0), aliases=("num_fewshot",))
    fewshot_data: str | None = opt(None, "Shot pool: a local file in the task's fields "
                                   "(default: the hub train/dev split, or the evaluated file "
                                   "without the item itself).", aliases=("train_data",))
    fewshot_seed: int = opt(1234, "Seed of the shot draws (lm-eval: 1234).")
    limit: int | None = opt(None, "Evaluate the first N items only.", check=at_least(1))
    max_new_tokens: int = max_new_tokens_opt(256)
    batch_size: int = batch_size_opt()
    max_length: int = max_length_opt(1024, "eval: 1024 by default, as few-shot prompts and "
                                     "their completions need the room.")
    text_field: str | None = text_field_opt()
    chat_template: bool = chat_template_opt()
    level: float = level_opt()
    allow_other_base: bool = allow_other_base_opt()
    preset: str = opt("default", "default, or reference (0-shot, 64 new tokens, 100 items: the "
                      "research code).", choices=PRESETS)

    def check(self) -> None:
        from sftscope.load.items import check_task_data
        from sftscope.load.sources import check_folder, source_kind

        if self.model is None and self.rescore is None:
            raise SftscopeError("eval needs --model (or --rescore FILE to score saved "
                                "completions)")
        if self.rescore is not None and (self.model is not None or self.adapter is not None):
            raise SftscopeError("--rescore scores saved completions without a model; drop "
                                "--model/--adapter, or drop --rescore to generate anew")
        if self.adapter is not None:
            check_folder(self.adapter, "adapter folder")
            if self.model is not None and source_kind(self.model) == "adapter":
                raise SftscopeError(f"--model {self.model} is itself an adapter; give its base "
                                    f"as --model with --adapter, or drop --adapter")
        check_task_data(self.task, self.data, split=self.split, fewshot_data=self.fewshot_data,
                        text_field=self.text_field, rescore=self.rescore,
                        skip_bad=self.skip_bad_records)


# ----------------------------------------------------------------------------- tune


def check_train_dtype(dtype: str | None) -> None:
    """float16 training is the Trainer's mixed precision, which needs a CUDA GPU: refused on
    a machine without one (before any model is loaded), with what to use instead."""
    if dtype not in ("float16", "fp16"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SftscopeError(f"--dtype {dtype} trains only on a CUDA GPU and none is visible; "
                            f"on the CPU use --dtype float32 (or bfloat16)")

REPORT_TO = ("none", "tensorboard", "wandb")
TUNE_METHODS = ("lora", "full")
OBJECTIVES = ("sft", "dpo", "grpo")
OBJECTIVE_ONLY = {"beta": ("dpo", "grpo"), "loss_type": ("dpo", "grpo"), "reward": ("grpo",),
                  "num_generations": ("grpo",), "max_completion_length": ("grpo",)}
# options with a meaning for some objectives only (refused when changed from the default)
DEFAULT_ONLY = {"completion_only": ("sft",), "preset": ("sft",), "packing": ("sft",),
                "max_length": ("sft", "dpo"), "experts": ("sft",)}
LORA_ONLY = ("rank", "alpha_ratio", "alpha", "rslora", "mlp", "dropout", "merge", "router")


def parse_experts(value: str) -> tuple[str, int | tuple[int, ...]]:
    """``--experts``: ``top-load:K`` -> ``("top-load", K)``; ``3,7`` -> ``("list", (3, 7))``."""
    text = value.strip()
    if text.startswith("top-load:"):
        k = text.partition(":")[2].strip()
        if not k.isdigit() or int(k) < 1:
            raise SftscopeError(f"--experts {value!r}: top-load:K needs a whole number K >= 1 "
                                f"(e.g. top-load:2)")
        return "top-load", int(k)
    items = [p.strip() for p in text.split(",")]
    if not text or not all(p.isdigit() for p in items):
        raise SftscopeError(f"--experts {value!r}: give top-load:K or 0-based expert indices "
                            f"such as 3,7")
    if len(set(items)) != len(items):
        raise SftscopeError(f"--experts {value!r} names an expert twice")
    return "list", tuple(sorted(int(p) for p in items))


def check_moe_flags(model: str | None, opts: Any) -> None:
    """The mixture-of-experts options of tune (``opts``: TuneConfig fields) against the model
    folder's config, before anything loads (a hub model is checked once its config loads).
    Imports torch only when such an option is given."""
    from sftscope.config.core import defaults

    moe_dropout = opts.mlp and opts.dropout not in (0, defaults(TuneConfig)["dropout"])
    if not model or not (opts.router or opts.experts is not None or moe_dropout):
        return
    from sftscope.load.sources import check_model

    src = check_model(model)
    if src.config:
        check_moe_options(opts, src.config)


def check_moe_options(cfg: Any, config: Any) -> None:
    """Refuse ``--router`` / ``--experts`` that cannot apply to this model (its config: a
    transformers config or a ``config.json`` dict); called before the weights load."""
    from sftscope.load.arch import moe_info

    info = moe_info(config)
    mt = (config.get("model_type") if isinstance(config, dict)
          else getattr(config, "model_type", "")) or "?"
    for flag, given in (("--experts", cfg.experts is not None), ("--router", cfg.router)):
        if given and info is None:
            raise SftscopeError(f"{flag} applies to mixture-of-experts models; {cfg.model} "
                                f"(model_type {mt}) has no routed experts: drop {flag}")
    if info is None:
        return
    from sftscope.config.core import defaults

    if cfg.mlp and cfg.method == "lora" and cfg.dropout not in (0, defaults(TuneConfig)["dropout"]):
        raise SftscopeError(f"--dropout {cfg.dropout} with --mlp on a mixture of experts: PEFT's "
                            f"LoRA on fused expert parameters cannot apply dropout; use "
                            f"--dropout 0 (or leave it: such runs use 0)")
    if cfg.experts is None:
        return
    kind, val = parse_experts(cfg.experts)
    n = info.n_experts
    if kind == "top-load" and int(val) > n:
        raise SftscopeError(f"--experts {cfg.experts}: K = {val} is larger than the {n} experts "
                            f"of each block of {cfg.model}; use K <= {n}")
    if kind == "list" and max(val) >= n:
        raise SftscopeError(f"--experts {cfg.experts}: expert {max(val)} is out of range; "
                            f"{cfg.model} has experts 0..{n - 1} per block")
    if cfg.method != "full":
        raise SftscopeError(f"--experts {cfg.experts} with LoRA: PEFT adapts a fused expert "
                            f"parameter for all {n} experts at once and cannot target single "
                            f"experts; use --method full --experts {cfg.experts}")


def experts_spec(value: str) -> str | None:
    """A check of ``--experts`` (syntax only; the model's expert count is checked later)."""
    try:
        parse_experts(value)
    except SftscopeError as e:
        return str(e).partition(": ")[2]
    return None


@dataclass(frozen=True, kw_only=True)
class TuneConfig(OneModel):
    """Everything ``tune`` needs.

    Give ``mask`` (``segments`` = its length by default) or ``blocks`` (``"6-11,14"``).
    ``method``: ``lora`` (segment LoRA at an equal budget; ``rank`` is the full-depth budget)
    or ``full`` (every weight of the selected blocks trains, everything else is frozen; the
    LoRA options do not apply). ``n_train`` examples are a seeded (``data_seed``)
    subsample of ``train`` (0 = all). ``max_length=None`` keeps every example whole.
    The ``reference`` preset sets, for fields left at their defaults: alpha 128, max length
    128, loss on the whole text, and 0-shot / 64-token / 100-item evaluation.
    """

    DEFAULT_OUT = True  # results are files only: a default run folder

    train: str = train_opt()
    out: str | None = out_opt()
    method: str = opt("lora", "lora: segment LoRA at the full-depth budget (RUN/adapter); full: "
                      "train every weight of the selected blocks, everything else frozen "
                      "(RUN/model, a Hugging Face folder).", choices=TUNE_METHODS)
    objective: str = opt("sft", "sft: next-token loss on the answers; dpo: TRL's DPOTrainer on "
                         "preference:FILE pairs; grpo: TRL's GRPOTrainer with --reward "
                         "(needs sftscope[rl]).", choices=OBJECTIVES)
    beta: float | None = opt(None, "DPO/GRPO: TRL's beta (KL strength to the reference; "
                             "default TRL's: DPO 0.1, GRPO 0.0).", check=at_least(0))
    loss_type: str | None = opt(None, "DPO/GRPO: TRL's loss_type (default TRL's: DPO sigmoid, "
                                "GRPO dapo).")
    reward: str | None = opt(None, "GRPO reward: gsm8k (1 when the flexible-extract answer "
                             "equals the gold), mmlu (the letter), or python:MODULE:FUNCTION.")
    num_generations: int | None = opt(None, "GRPO: completions per prompt (TRL's; default 8); "
                                      "--batch-size counts completions.", check=at_least(2))
    max_completion_length: int | None = opt(None, "GRPO: longest completion in tokens (TRL's; "
                                            "default 512).", check=at_least(1))
    skip_bad_records: bool = opt(False, "Skip records with missing or empty fields (counted) "
                                 "instead of refusing the data.")
    mask: str | None = opt(None, "Segments to train, bottom segment first, e.g. 01000 (the "
                           "second fifth); 00111 freezes the bottom 2/5 (the research code's "
                           "frozen-bottom runs). Or use --blocks.")
    segments: int | None = segments_opt(None)
    blocks: str | None = opt(None, "Explicit 0-based blocks instead of a mask, e.g. 6-11,14.")
    rank: float = opt(64, "Full-depth LoRA rank (the budget): m of L blocks get rank "
                      "round(rank*L/m).", check=positive)
    alpha_ratio: float = opt(2.0, "alpha = ratio x rank (constant alpha/r).", check=positive)
    alpha: float | None = opt(None, "Fixed alpha for every mask (the research code's 128; "
                              "overrides --alpha-ratio).", check=positive)
    rslora: bool = opt(False, "Rank-stabilised scale alpha/sqrt(r), alpha = ratio x sqrt(full "
                       "rank).")
    mlp: bool = opt(False, "Adapt the MLP projections too (default: attention q, k, v, o); on "
                    "a mixture of experts: the routed experts (every expert's fused weights) "
                    "and the shared expert.")
    router: bool = opt(False, "Mixture of experts: train the routers (and Qwen2-MoE's shared-"
                       "expert gates) of the selected blocks, their full weights.")
    experts: str | None = opt(None, "Mixture of experts, --method full: train only these "
                              "routed experts per selected block, top-load:K (the K with the "
                              "highest routing load on the training data, measured before "
                              "training) or indices such as 3,7; the others stay bit-identical.",
                              check=experts_spec)
    dropout: float = opt(0.05, "LoRA dropout.", check=in_range(0, 1, hi_open=True))
    lr: float = opt(1e-4, "Learning rate (AdamW, linear decay); full fine-tuning usually "
                    "wants less (the research code: 2e-5).", check=positive)
    epochs: float = opt(1.0, "Epochs over the training examples.", check=at_least(0))
    max_steps: int | None = opt(None, "Stop after this many optimizer steps.",
                                check=at_least(1))
    batch_size: int = opt(32, "Effective batch (micro batch x accumulation x processes).",
                          check=at_least(1))
    micro_batch_size: int = opt(8, "Examples per forward pass per device.", check=at_least(1))
    packing: str = opt("auto", "Padding-free batches (examples concatenated, position ids per "
                       "example, attention confined to each: computed per example on sdpa "
                       "models, one row per micro-batch; by a mask otherwise, rows of the "
                       "longest example): auto = on when a check at start finds the model computes "
                       "the same log-probabilities packed as padded and a forward pass holds "
                       "more than one example; on = refuse a model that fails the check; off "
                       "= pad.", choices=("auto", "on", "off"))
    warmup_steps: float = opt(0, "Warm-up steps (a value < 1 is a ratio of the steps).",
                              check=at_least(0))
    weight_decay: float = opt(0.0, "AdamW weight decay.", check=at_least(0))
    max_grad_norm: float = opt(1.0, "Gradient clipping norm.", check=positive)
    max_length: int | None = max_length_opt(None, "tune: the longest example by default (capped "
                                            "at the model's context), so none is cut.")
    completion_only: bool = opt(True, "Loss on the answer only (prompt tokens masked); "
                                "--no-completion-only trains on all text.")
    chat_template: bool = chat_template_opt()
    n_train: int | None = opt(2000, "Training examples (seeded subsample; 0 = all).",
                              check=at_least(0))
    data_seed: int = opt(0, "Seed of the training subsample.")
    train_split: str = opt("train", "Split of a hub dataset.")
    text_field: str | None = text_field_opt()
    seed: int = opt(0, "Seed of LoRA init, data order and dropout.")
    dtype: str = dtype_opt()
    gradient_checkpointing: bool = opt(False, "Non-reentrant activation checkpointing (no "
                                       "forced input gradients).")
    save_steps: int = opt(100, "Checkpoint every N steps (for --resume).", check=at_least(1),
                          volatile=True)
    save_total_limit: int = opt(2, "Trainer checkpoints kept while training.",
                                check=at_least(1), volatile=True)
    keep_checkpoints: bool = opt(False, "Keep RUN/checkpoints after success.", volatile=True)
    logging_steps: int = opt(10, "Log the loss every N steps.", check=at_least(1),
                             volatile=True)
    dynamics_every: int | None = opt(None, "Record per-block gradient (after clipping) and "
                                     "update norms in "
                                     "RUN/dynamics.csv every N optimizer steps (default: every "
                                     "--logging-steps; 0 = off).", check=at_least(0),
                                     volatile=True)
    resume: bool = opt(False, "Continue a killed run from its last checkpoint (a finished run "
                       "is reused).", volatile=True)
    overwrite: bool = opt(False, "Start over in --out, discarding a finished or unfinished run "
                          "made with other settings.", volatile=True)
    report_to: str = opt("none", "Trainer logging: none, tensorboard or wandb.",
                         choices=REPORT_TO, volatile=True)
    preset: str = opt("default", "default, or reference: the research code (alpha 128, "
                      "128-token truncation, loss on the whole text, 0-shot eval with 64 new "
                      "tokens on 100 items).", choices=PRESETS)
    merge: bool = opt(False, "Also write RUN/merged: the base with the adapter merged in, a "
                      "Hugging Face folder (safetensors + tokenizer).")
    run_eval: bool = opt(True, "Evaluate after training (--no-eval skips it).",
                         aliases=("eval",))
    eval_task: str | None = opt(None, f"Evaluate after training: {task_spec_help()} (default "
                                "gsm8k when training on hub gsm8k).", check=task_spec)
    eval_limit: int | None = eval_limit_opt()
    eval_shots: int | None = eval_shots_opt()
    eval_fewshot_data: str | None = eval_fewshot_opt()
    eval_max_new_tokens: int = opt(256, "Generation budget of the evaluation.",
                                   check=at_least(1))
    eval_batch_size: int = opt(16, "Prompts per generate call.", check=at_least(1))

    def check(self) -> None:
        from sftscope.load.sources import source_kind
        from sftscope.segments import parse_blocks_syntax, parse_mask

        if self.model and source_kind(self.model) == "adapter":
            raise SftscopeError(f"--model {self.model} is a PEFT adapter; tune trains a base "
                                f"model: pass its base, or the folder `tune --merge` wrote "
                                f"(RUN/merged)")
        if (self.mask is None) == (self.blocks is None):
            raise SftscopeError("give either --mask (e.g. 01000) or --blocks (e.g. 6-11), "
                                "not both")
        if self.mask is not None:
            parse_mask(self.mask, self.segments)
        if self.blocks is not None:
            parse_blocks_syntax(self.blocks)
            if self.segments is not None:
                raise SftscopeError("--segments goes with --mask, not with --blocks")
        if self.epochs == 0 and not self.max_steps:
            raise SftscopeError("--epochs 0 without --max-steps trains zero steps; give "
                                "--epochs > 0 or --max-steps N")
        if self.micro_batch_size > self.batch_size:
            raise SftscopeError(f"--micro-batch-size {self.micro_batch_size} is larger than "
                                f"the effective --batch-size {self.batch_size}")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if self.batch_size % (self.micro_batch_size * world):
            raise SftscopeError(f"--batch-size {self.batch_size} is not a multiple of "
                                f"--micro-batch-size {self.micro_batch_size} x {world} "
                                f"processes; change one")
        if self.method == "full":
            from sftscope.config.core import defaults, flag

            d = defaults(TuneConfig)
            given = [k for k in LORA_ONLY if getattr(self, k) != d[k]]
            if given:
                raise SftscopeError(f"{flag(given[0])} is a LoRA option; --method full trains "
                                    f"the blocks' own weights: drop it (or use --method lora)")
        check_train_dtype(self.dtype)
        check_data_source(self.train, split=self.train_split, text_field=self.text_field)
        check_moe_flags(self.model, self)
        if self.eval_task is not None and ":" in self.eval_task:
            check_task_spec(self.eval_task)
        self._check_objective()

    def _check_objective(self) -> None:
        """Options of one objective only with it; DPO/GRPO's own checks (TRL present, its
        loss types, the reward) before any model is loaded."""
        from sftscope.config.core import defaults, flag

        d = defaults(TuneConfig)
        for name, objectives in {**OBJECTIVE_ONLY, **DEFAULT_ONLY}.items():
            if getattr(self, name) != d[name] and self.objective not in objectives:
                raise SftscopeError(f"{flag(name)} is an option of --objective "
                                    f"{' or '.join(objectives)}; drop it or change --objective")
        if self.objective != "sft":
            from sftscope.config.objectives import check_objective

            check_objective(self)


# ----------------------------------------------------------------------------- suggest

SUGGEST_METHODS = ("auto", "pair", "angular", "gradient", "combined")


@dataclass(frozen=True, kw_only=True)
class SuggestConfig(PairModels, DataSpec, Runtime):
    """Everything ``suggest`` needs (``sft`` optional: it enables the pair method)."""

    OUTPUTS: ClassVar[tuple[str, ...]] = ("suggest.*",)

    sft: str | None = sft_opt(required=False)
    split: str | None = opt("train", "Split of a hub dataset: the training split by default, "
                            "so no evaluation item is seen.")
    out: str | None = out_opt()
    formats: tuple[str, ...] = formats_opt()
    overwrite: bool = opt(False, "Replace a finished run in --out that was made with other "
                          "settings.", volatile=True)
    limit: int | None = limit_opt(64)
    max_length: int = max_length_opt()
    batch_size: int = batch_size_opt()
    segments: int = segments_opt(5)
    method: str = opt("auto", "auto (= combined), pair, angular, gradient or combined (rank "
                      "average of the available methods).", choices=SUGGEST_METHODS)
    max_active: int = opt(2, "Most segments in the proposal.", check=at_least(1))
    pick: str = opt("run", "run: a contiguous run grown from the best segment; top: the best "
                    "--max-active segments.", choices=("run", "top"))
    edges: str = opt("auto", "auto: bottom/top segments only when their score is "
                     "--edge-factor times the best interior one; allow; exclude.",
                     choices=("auto", "allow", "exclude"))
    edge_factor: float = opt(3.0, "How much an edge segment must beat the best interior one "
                             "to be proposed.", check=at_least(1))
    extend: float = opt(0.75, "A neighbour joins the run when it scores at least this "
                        "fraction of the best segment.", check=in_range(0, 1, lo_open=True))
    grad_samples: int = opt(16, "Texts for the gradient signal.", check=at_least(1))

    def check(self) -> None:
        if self.method == "pair" and not self.sft:
            raise SftscopeError("--method pair needs --sft (the fine-tuned model); without it "
                                "use angular, gradient or combined")
        if self.max_active > self.segments:
            raise SftscopeError(f"--max-active must be between 1 and --segments "
                                f"({self.segments}), got {self.max_active}")
        if self.limit is not None and self.limit < 2:
            raise SftscopeError(f"--n-samples must be at least 2 for the hidden-state signals, "
                                f"got {self.limit}")


# ----------------------------------------------------------------------------- sweep


# what the sweep sets for each job itself (not pass-through options)
SWEEP_TUNE_KEYS = ("model", "train", "out", "mask", "segments", "blocks", "seed", "resume",
                   "overwrite", "run_eval", "eval_task", "eval_limit", "eval_shots",
                   "eval_fewshot_data", "eval_max_new_tokens", "eval_batch_size")
SWEEP_EVAL_KEYS = ("model", "task", "data", "out", "adapter", "overwrite", "formats")
SWEEP_SUGGEST_KEYS = ("base", "sft", "data", "out", "segments", "split", "overwrite",
                      "formats")


@dataclass(frozen=True, kw_only=True)
class SweepConfig(Config):
    """Everything ``run_sweep`` needs.

    ``seeds``: a count (``3`` = seeds 0, 1, 2) or a comma list (``"0,5,7"``). ``tune`` and
    ``evaluation``: ``TuneConfig``/``EvalConfig`` fields passed to every job (the job sets model,
    data, mask, seed and folders). ``model``/``train``/``task`` may be left out with
    ``collect`` (taken from ``sweep.json``).
    """

    DEFAULT_OUT = True  # results are files only: a default run folder

    out: str | None = out_opt()  # sweep.json, jobs/MASK-sSEED/, summary.csv, position.csv
    model: str | None = opt(None, "Base model to tune: local folder or hub id (optional with "
                            "--collect).")
    train: str | None = train_opt(required=False)
    task: str | None = opt(None, f"Evaluation: {task_spec_help()}.", check=task_spec,
                           aliases=("eval", "tasks"))
    segments: int = segments_opt(5)
    masks: str = opt("paper", "Mask groups or masks, comma-separated: singles (one segment "
                     "each + full depth), paper (the paper's masks for K = 3, 5, 10), all "
                     "(every non-empty mask), or masks like 01000,01100.", check=mask_list)
    seeds: str = opt("3", "A count (3 = seeds 0,1,2) or a comma list (0,5,7).",
                     numbers_as_text=True)
    baseline: bool = opt(True, "Add the full-depth mask 11111 if missing (the p-values are "
                         "against it).")
    tune: dict[str, Any] = opt(help="tune options for every job.", factory=dict,
                               expand="tune")
    evaluation: dict[str, Any] = opt(help="eval options for every job.", factory=dict,
                                     expand="eval")
    metric: str | None = opt(None, "Metric for ranking and validation (default: the task's "
                             "primary metric).")
    job_index: int = opt(0, "This process runs jobs I, I+N, I+2N, ... (one process per GPU).",
                         check=at_least(0), volatile=True, envvar="SFTSCOPE_JOB_INDEX")
    num_jobs: int = opt(1, "Number of processes N sharing the job list.", check=at_least(1),
                        volatile=True, envvar="SFTSCOPE_NUM_JOBS")
    collect: bool = opt(False, "Run no job: gather the finished jobs of --out (a shared folder "
                        "that every shard wrote to) into summary.csv and position.csv, refuse "
                        "jobs made with other settings, and report the missing and failed "
                        "ones.", volatile=True, aliases=("summarize_only",))
    tables: bool = opt(True, "Write summary.csv and position.csv when no job of the sweep is "
                       "left pending (a shard that finishes last does); --no-tables leaves them "
                       "to a later --collect.", volatile=True)
    validate_suggest: bool = opt(False, "Also run suggest (on the training split) and report "
                                 "where each proposal ranks among the swept masks.")
    sft: str | None = opt(None, "An SFT model of the same base, for the pair method of "
                          "--validate-suggest.")
    retention: str | None = opt(None, "Retention texts (a data source): every job also measures "
                                "KL(tuned || base) at the output and the loss drop there, and "
                                "the sweep reports their rank correlation across masks "
                                "(forgetting.csv).")
    retention_limit: int = opt(100, "Retention texts per job (a seeded subsample).",
                               check=at_least(1), metavar="N")
    suggest: dict[str, Any] = opt(help="suggest options for --validate-suggest.",
                                  factory=dict, expand="suggest")
    level: float = level_opt()
    bootstrap: int = bootstrap_opt()
    boot_seed: int = opt(0, "Seed of the bootstrap.")
    formats: tuple[str, ...] = formats_opt()

    @property
    def summarize_only(self) -> bool:
        """The old name of ``collect``."""
        return self.collect

    def check(self) -> None:
        from sftscope.load.sources import check_model

        if self.retention:
            check_data_source(self.retention)
        if self.job_index >= self.num_jobs:
            raise SftscopeError(f"--job-index {self.job_index} must be below --num-jobs "
                                f"{self.num_jobs}")
        seeds = self.seeds.replace(" ", "")
        if not seeds or not all(p.lstrip("-").isdigit() for p in seeds.split(",")):
            raise SftscopeError(f"--seeds {self.seeds!r}: give a count (3) or a comma list of "
                                f"integers (0,5,7)")
        if "," not in seeds and int(seeds) < 1:
            raise SftscopeError(f"--seeds {self.seeds!r}: the count must be at least 1")
        if not self.collect:
            missing = [n for n in ("model", "train", "task") if not getattr(self, n)]
            if missing:
                raise SftscopeError(f"missing --{missing[0]} (needed unless --collect)")
        if self.model:
            check_model(self.model)
        if self.sft:
            check_model(self.sft, "SFT model")
        if self.train:
            check_data_source(self.train)
        if self.task and ":" in self.task:
            check_task_spec(self.task)
        if self.task and self.metric:  # before any job runs (with --collect alone: run_sweep)
            from sftscope.tasks import check_metric

            check_metric(self.metric, self.task.partition(":")[0])
        from sftscope.config.core import check_fields

        tune = check_fields(TuneConfig, self.tune, what="tune", exclude=SWEEP_TUNE_KEYS)
        check_train_dtype(tune.get("dtype"))
        if tune.get("objective", "sft") != "sft" and self.model and self.train:
            # DPO/GRPO's own rules (data kind, reward, TRL) before any job starts
            TuneConfig(model=self.model, train=self.train, out=self.out,
                       mask="1" * self.segments, **tune)
        if tune.get("method") == "full":
            from sftscope.config.core import defaults, flag

            d = defaults(TuneConfig)
            given = [k for k in LORA_ONLY if k in tune and tune[k] != d[k]]
            if given:
                raise SftscopeError(f"{flag(given[0])} is a LoRA option; --method full trains "
                                    f"the blocks' own weights: drop it (or use --method lora)")
        if self.model:
            from types import SimpleNamespace

            from sftscope.config.core import defaults

            check_moe_flags(self.model, SimpleNamespace(**{**defaults(TuneConfig), **tune,
                                                           "model": self.model}))
        check_fields(EvalConfig, self.evaluation, what="eval", exclude=SWEEP_EVAL_KEYS)
        check_fields(SuggestConfig, self.suggest, what="suggest", exclude=SWEEP_SUGGEST_KEYS)
        # masks must have K characters
        for item in self.masks.split(","):
            item = item.strip()
            if item and item not in MASK_GROUPS and len(item) != self.segments:
                raise SftscopeError(f"--masks {item!r} has {len(item)} characters but "
                                    f"--segments is {self.segments}")


# ----------------------------------------------------------------------------- steer

STEER_DIRECTIONS = ("mean", "pc1")


def scale_list(value: str) -> str | None:
    """A check: comma-separated numbers (steering scales), each once."""
    items = [p.strip() for p in value.split(",") if p.strip()]
    if not items:
        return "names no scale; give numbers such as 0,1,2"
    vals = []
    for item in items:
        try:
            v = float(item)
        except ValueError:
            return f"has {item!r}, which is not a number; give numbers such as 0,1,2"
        if v != v or v in (float("inf"), float("-inf")):
            return f"has {item!r}; give finite numbers"
        vals.append(v)
    if len(set(vals)) != len(vals):
        return "repeats a scale; give each scale once"
    return None


def state_list(value: str) -> str | None:
    """A check: hidden states in the block-list syntax (``2``, ``6-11,14``)."""
    from sftscope.segments import parse_states

    try:
        parse_states(value)
    except SftscopeError:
        return f"must list hidden states such as 2 or 6-11,14 (0 = embeddings), got {value!r}"
    return None


@dataclass(frozen=True, kw_only=True)
class SteerConfig(PairModels, DataSpec, Runtime, Output):
    """Everything ``steer`` needs: the base->SFT vector at each hidden state of ``layers``
    (from ``data``), added ``scale`` times to the base model's residual stream, scored per
    scale on ``task`` and/or by generating on prompts (``generate``)."""

    DEFAULT_OUT = True  # results are files only: a default run folder

    OUTPUTS: ClassVar[tuple[str, ...]] = ("steer.*", "steer_items.csv",
                                          "steer_vector.safetensors")

    layers: str = opt(help="Hidden states j where the vectors are taken and added, one or a "
                      "list such as 2 or 6-11,14 (each layer's own vector, all in one forward "
                      "pass): j = b + 1 is the output of block b, 0 the embeddings (the input "
                      "of block 0).", check=state_list, aliases=("layer",),
                      numbers_as_text=True)
    limit: int | None = limit_opt(200)
    direction: str = opt("mean", "mean: mean over samples of SFT minus base pooled states; "
                         "pc1: top principal component of the per-sample differences "
                         "(oriented along the mean, sized by their RMS along it).",
                         choices=STEER_DIRECTIONS)
    pooling: str = pooling_opt()
    unit: bool = opt(False, "Scale the direction to norm 1 (the research code's PCA "
                     "steering) instead of the size of the base-to-SFT shift.")
    scales: str = opt("0,1,2", "Multiples of the vector added to the base model, "
                      "comma-separated (0 = the unsteered base).", check=scale_list,
                      numbers_as_text=True)
    task: str | None = opt(None, f"Score each scale on a task: {task_spec_help()}.",
                           check=task_spec, aliases=("tasks",))
    generate: bool = opt(False, "Generate greedy completions on prompts at each scale "
                         "(steer.jsonl).")
    prompts: str | None = opt(None, "Prompts for --generate: a data source whose samples' "
                              "prompts (else texts) are used (default: --data).")
    n_prompts: int = opt(8, "Prompts for --generate (the first N of the selection).",
                         check=at_least(1))
    max_new_tokens: int = max_new_tokens_opt(64)
    eval_limit: int | None = eval_limit_opt()
    eval_shots: int | None = eval_shots_opt()
    eval_fewshot_data: str | None = eval_fewshot_opt()
    level: float = level_opt()

    def scale_values(self) -> list[float]:
        """The scales as numbers, in the order given."""
        return [float(p) for p in self.scales.split(",") if p.strip()]

    def layer_values(self, n_blocks: int | None = None) -> list[int]:
        """The hidden states to steer, sorted; with ``n_blocks`` each checked against the base
        model's ``0..n_blocks``."""
        from sftscope.segments import parse_states

        try:
            return parse_states(self.layers, n_blocks)
        except SftscopeError as e:
            raise SftscopeError(f"--layers {self.layers}: {e}") from None

    def check(self) -> None:
        from sftscope.load.sources import check_model

        if self.task is None and not self.generate:
            raise SftscopeError("steer needs --task (score each scale) or --generate "
                                "(completions on prompts), or both")
        if self.task is None:
            for name in ("eval_limit", "eval_shots", "eval_fewshot_data"):
                if getattr(self, name) is not None:
                    from sftscope.config.core import flag

                    raise SftscopeError(f"{flag(name)} applies to --task; give --task or "
                                        f"drop it")
        if self.direction == "pc1" and self.limit is not None and self.limit < 2:
            raise SftscopeError(f"--direction pc1 needs at least 2 samples, got --n-samples "
                                f"{self.limit}")
        n = check_model(self.base, "base model").n_blocks
        if n is not None:
            self.layer_values(n)
        if self.task is not None and ":" in self.task:
            check_task_spec(self.task)
        if self.prompts is not None:
            check_data_source(self.prompts, text_field=self.text_field)


# ----------------------------------------------------------------------------- demo, report

DEMO_STEPS = ("analyze", "weights", "probe", "swap", "sweep", "report")


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Config):
    """Size and scope of the demo; ``quick`` is the reduced size the tests run."""

    DEFAULT_OUT = True  # results are files only: a default run folder

    out: str | None = out_opt()  # the pair, every run and report.html
    seed: int = opt(0, "Seed of the corpus, training and analyses.")
    quick: bool = opt(False, "Reduced size (about a minute; what the tests run).")
    family: str = opt("llama", "Architecture of the demo pair.", choices=("llama", "olmo2"))
    moe: bool = opt(False, "A mixture-of-experts pair instead (Mixtral family, 4 experts, "
                    "top-2): analyze with routing drift, weights with per-expert rows, probe "
                    "and the report's MoE figures; swap and the sweep are left out.")
    force: bool = opt(False, "Retrain the pair even if a cached one exists.", volatile=True)
    segments: int = segments_opt(5)
    sweep_masks: str = opt("singles", "Masks of the small sweep: singles, paper, all, or a "
                           "list such as 01000,11111.", check=mask_list)
    sweep_seeds: int = opt(1, "Seeds per mask in the sweep.", check=at_least(1))
    skip: tuple[str, ...] = opt((), "Steps to leave out, comma-separated: "
                                + ", ".join(DEMO_STEPS) + ".", factory=tuple)
    stages: bool = opt(False, "Continue the pair through DPO and GRPO (TRL; sftscope[rl]) and "
                       "analyse the chain base -> SFT -> DPO -> GRPO.")

    def check(self) -> None:
        bad = [s for s in self.skip if s not in DEMO_STEPS]
        if bad:
            raise SftscopeError(f"--skip {bad[0]!r}: unknown step; steps are "
                                f"{', '.join(DEMO_STEPS)}")
        if self.moe and self.family != "llama":
            raise SftscopeError(f"--family {self.family} is for the dense demo pair; --moe "
                                f"trains a Mixtral pair (leave --family out)")
        if self.moe and self.stages:
            raise SftscopeError("--stages continues the dense demo pair; it is not combined "
                                "with --moe yet (run them separately)")
        if self.stages:
            from sftscope.config.objectives import trl_version

            trl_version()

    @property
    def steps(self) -> tuple[str, ...]:
        """The steps that run: all but ``skip`` (and, with ``moe``, swap and the sweep)."""
        left = ("swap", "sweep") if self.moe else ()
        return tuple(s for s in DEMO_STEPS if s not in self.skip and s not in left)

    @property
    def sizes(self) -> dict[str, int]:
        if self.quick:
            return {"n_pooled": 24, "n_token": 12, "n_probe": 12, "n_swap": 12,
                    "tune_steps": 4, "n_train": 32, "eval_limit": 4, "new_tokens": 24}
        return {"n_pooled": 200, "n_token": 100, "n_probe": 100, "n_swap": 100,
                "tune_steps": 40, "n_train": 400, "eval_limit": 40, "new_tokens": 48}


DATA_SETS = ("gsm8k", "mmlu", "preference")


def data_sets(value: tuple[str, ...]) -> str | None:
    """A check: names of generated task sets."""
    bad = [v for v in value if v not in (*DATA_SETS, "all")]
    if bad:
        from sftscope.config.core import did_you_mean

        return (f"has unknown task set {bad[0]!r}; use {', '.join(DATA_SETS)} or all"
                + did_you_mean(bad[0], DATA_SETS))
    return None


@dataclass(frozen=True, kw_only=True)
class DataConfig(Config):
    """Everything ``data`` needs: which generated task sets, how many items, where."""

    DEFAULT_OUT = True  # results are files only: a default run folder

    OUTPUTS: ClassVar[tuple[str, ...]] = tuple(f"{n}/*.jsonl" for n in DATA_SETS)

    names: tuple[str, ...] = opt(help="Task sets to write: gsm8k (train.jsonl, test.jsonl: "
                                 "question, answer ending in #### N), mmlu (dev.jsonl, "
                                 "test.jsonl: question, choices, answer, subject), preference "
                                 "(train.jsonl, test.jsonl: prompt, chosen, rejected), or all.",
                                 positional=True, check=data_sets, factory=tuple)
    out: str | None = out_opt()
    train_size: int = opt(500, "Items of the train files (gsm8k, preference).",
                          check=at_least(1))
    test_size: int = opt(200, "Items of every test file (at most 2000).",
                         check=in_range(1, 2000))
    dev_size: int = opt(5, "Items of mmlu's dev file (its shot pool).", check=at_least(1))
    seed: int = opt(0, "Seed of the generator (the same seed writes the same files).")
    max_number: int = opt(99, "Largest number in a problem (results included).",
                          check=in_range(20, 999))
    overwrite: bool = opt(False, "Replace a finished run in --out that was made with other "
                          "settings.", volatile=True)

    def sets(self) -> tuple[str, ...]:
        """The task sets named (all of them for ``all`` or none named), in a fixed order."""
        if not self.names or "all" in self.names:
            return DATA_SETS
        return tuple(n for n in DATA_SETS if n in self.names)


FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_formats(value: tuple[str, ...]) -> str | None:
    bad = [f for f in value if f not in FIGURE_FORMATS]
    if bad or not value:
        return f"has unknown format {', '.join(bad) or '(none)'}; use png, pdf, svg"
    return None


@dataclass(frozen=True, kw_only=True)
class ReportConfig(Config):
    """Everything ``report`` needs."""

    RUN_FOLDER = False  # --out is the report's file, not a run folder to claim

    runs: tuple[str, ...] = opt(help="Run folders written by sftscope commands (analyze, "
                                "weights, probe, swap, eval, tune, suggest, sweep, demo); "
                                "several runs are overlaid on relative-depth axes.",
                                positional=True)
    out: str | None = out_opt()
    figure_formats: tuple[str, ...] = opt(("png",), "Figure files to write, comma-separated: "
                                          "png, pdf, svg (the HTML always embeds PNG).",
                                          check=figure_formats, aliases=("formats",))
    figures_dir: str | None = opt(None, "Folder for figures and the CSV behind each (default: "
                                  "figures/ beside the report).")
    title: str | None = opt(None, "Report title.")

    def check(self) -> None:
        import os

        if not self.runs:
            raise SftscopeError("give at least one run folder")
        for r in self.runs:
            p = os.path.expanduser(r)
            if not os.path.isdir(p):
                raise SftscopeError(f"run folder {r} does not exist" if not os.path.exists(p)
                                    else f"{r} is a file; give run folders")
        if self.out is not None and os.path.isdir(os.path.expanduser(self.out)):
            raise SftscopeError(f"--out {self.out} is a folder; give the HTML file to write "
                                f"(e.g. {os.path.join(self.out, 'report.html')})")


COMMANDS: dict[str, type[Config]] = {
    "analyze": AnalyzeConfig, "weights": WeightsConfig, "probe": ProbeConfig,
    "swap": SwapConfig, "tune": TuneConfig, "eval": EvalConfig, "sweep": SweepConfig,
    "suggest": SuggestConfig, "report": ReportConfig, "demo": DemoConfig,
    "steer": SteerConfig, "ablate": AblateConfig, "data": DataConfig,
}


def config_class(command: str) -> type[Config]:
    """The config class of a command name."""
    return COMMANDS[command]


__all__ = [*(c.__name__ for c in COMMANDS.values()), "COMMANDS", "config_class"]
