"""Config ingredients shared by the commands: each option is declared once, here.

A command's config composes the ingredients it needs (``class AnalyzeConfig(PairModels,
DataSpec, Runtime, Stats, Output)``); the CLI flag, its default, its help text and its checks
come from the one declaration. Every ingredient's ``_check`` runs on construction (torch-free).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, ClassVar

from sftscope.config.core import Config, at_least, in_range, non_empty, opt
from sftscope.errors import SftscopeError
from sftscope.load.data import SETS, Prepared, dataset_names, prepare
from sftscope.tasks import shots_help

# ----------------------------------------------------------------------------- value checks

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
TABLE_FORMATS = ("csv", "parquet", "json")
PRESETS = ("default", "reference")
_DEVICE = re.compile(r"^(auto|cpu|mps|(cuda|xpu|npu)(:\d+)?)$")


def device_name(value: str) -> str | None:
    """A check: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` (availability is checked once
    torch is imported)."""
    if _DEVICE.match(value):
        return None
    return f"{value!r} is not a device; use auto, cpu, cuda, cuda:N or mps"


def device_map_value(value: str) -> str | None:
    """A check: an accelerate device-map strategy or a JSON file mapping modules to devices."""
    if value in DEVICE_MAPS:
        return None
    if value.endswith(".json"):
        import os

        return None if os.path.isfile(os.path.expanduser(value)) else \
            f"file {value} does not exist"
    return (f"{value!r} is not a device map; use {', '.join(DEVICE_MAPS)} or a .json file of "
            f"module -> device")


def table_formats(value: tuple[str, ...]) -> str | None:
    """A check: a non-empty list of table formats."""
    bad = [f for f in value if f not in TABLE_FORMATS]
    if bad or not value:
        return (f"has unknown format {', '.join(bad) or '(none)'}; use "
                f"{', '.join(TABLE_FORMATS)}")
    return None


def template_text(value: str) -> str | None:
    """A check: a format string over named record fields only."""
    from sftscope.load.data import check_template

    try:
        check_template(value)
    except SftscopeError as e:
        return str(e).replace(f"--template {value!r}: ", "")
    return None


def check_data_source(data: str, **kw: Any) -> None:
    """A local data file exists, has a known format and the fields needed (torch-free)."""
    from sftscope.load.data import check_source

    check_source(data, **kw)


# ----------------------------------------------------------------------------- shared fields
# Each option used by several commands is declared by one function here: one name, one help,
# one check (a command may pass another default where its work needs one).

MODEL_HELP = ("local folder, hub id, .gguf file, or a PEFT adapter folder / tune run folder "
              "(applied in memory to --base or to the base it records)")
DATA_HELP = (f"Data: a registered name ({', '.join(dataset_names())}; needs a reachable "
             "hub), NAME:FILE for that format on a local file (gsm8k:test.jsonl; "
             "preference:FILE for prompt/chosen/rejected pairs), or a local "
             ".jsonl/.csv/.parquet/.txt file (with --text-field or --template).")


def base_opt(required: bool = True) -> Any:
    return opt(dataclasses.MISSING if required else None, "Base model: " + MODEL_HELP + ".",
               check=non_empty)


def sft_opt(required: bool = True) -> Any:
    return opt(dataclasses.MISSING if required else None,
               "Fine-tuned (SFT) model of the same base: " + MODEL_HELP + ".", check=non_empty)


def revision_opt(of: str) -> Any:
    return opt(None, f"Hub revision (branch, tag or commit) of the {of}.")


def tokenizer_opt(pair: bool) -> Any:
    if pair:
        return opt(None, "Tokenizer the models see: base, sft or a folder (default: the "
                   "base's; the SFT's with --chat-template).")
    return opt(None, "Tokenizer folder or hub id (default: the model's).")


def adapter_opt() -> Any:
    return opt(None, "PEFT LoRA adapter folder (RUN/adapter of a tune run, or the tune run "
               "folder itself).")


def allow_other_base_opt() -> Any:
    return opt(False, "Load an adapter recorded for another base of the same shapes.")


def train_opt(required: bool = True) -> Any:
    return opt(dataclasses.MISSING if required else None,
               "Training data: gsm8k (hub), gsm8k:FILE (question/answer fields), "
               "preference:FILE (prompt/chosen/rejected; --objective dpo) or a preference "
               f"set on the hub ({', '.join(f'preference:{n}' for n in SETS['preference'])}), "
               "or a "
               ".jsonl/.csv/.parquet/.txt file of text.", check=non_empty)


def allow_mixed_opt() -> Any:
    return opt(False, "Allow a base and SFT model of different architectures (equal depth and "
               "width): a deliberate cross-family comparison.")


def limit_opt(default: int | None) -> Any:
    """The sample count of the commands that draw samples: ``--n-samples`` on the command line,
    a seeded subsample. ``--limit`` stays accepted (its old spelling here); everywhere else
    ``--limit`` is lm-eval's "the first N items" (eval, --eval-limit)."""
    return opt(default, "Number of samples: a seeded subsample of the data (all when unset; "
               "--limit, the old spelling, is accepted).", check=at_least(1),
               aliases=("n", "n_pooled"), flag="n_samples")


def max_length_opt(default: int | None = 512, why: str = "") -> Any:
    """One default (512) everywhere; a command that needs another says why (``why``)."""
    return opt(default, "Longest text in tokens (longer texts are truncated and counted)."
               + (f" {why}" if why else ""), check=at_least(2))


def batch_size_opt(default: int = 8) -> Any:
    """Texts per forward pass: memory and speed only, never a number (hence one default)."""
    return opt(default, "Texts per forward pass.", check=at_least(1), volatile=True)


def chat_template_opt() -> Any:
    return opt(False, "Wrap prompts in the tokenizer's chat template.")


def text_field_opt() -> Any:
    return opt(None, "Field holding the text (generic files).")


def split_opt(default: str | None = None) -> Any:
    return opt(default, "Split of a hub dataset (default: the dataset's own).")


def dtype_opt() -> Any:
    return opt("auto", "Weights and activations: auto (bfloat16 on a bf16 GPU, else float32), "
               "float32, bfloat16 or float16.", choices=DTYPE_NAMES)


def device_opt() -> Any:
    return opt("auto", "Device: auto (a GPU when one is visible, else cpu), cpu, cuda, cuda:N "
               "or mps.", check=device_name, volatile=True)


def segments_opt(default: int | None = 5) -> Any:
    return opt(default, "Equal depth segments K (a mask has K characters, bottom segment "
               "first).", check=at_least(1))


def level_opt() -> Any:
    return opt(0.95, "Confidence level of the intervals.",
               check=in_range(0, 1, lo_open=True, hi_open=True))


def bootstrap_opt(default: int = 1000, why: str = "") -> Any:
    """One default (1000) everywhere; a command that needs another says why (``why``)."""
    return opt(default, "Bootstrap resamples for the intervals (0 = none; docs/metrics.md "
               "says which interval each number gets)." + (f" {why}" if why else ""),
               check=at_least(0), aliases=("n_boot",))


def formats_opt() -> Any:
    return opt(("csv",), "Table formats, comma-separated: csv, parquet, json.",
               check=table_formats, aliases=("format",), volatile=True)


OUT_HELP = ("Where the results go: the run folder (created; run.json is written last and "
            "marks a finished run); demo and sweep: a folder of runs; report: its HTML file. "
            "Optional: without it, a new folder sftscope-runs/COMMAND-YYYYMMDD-HHMMSS (UTC; "
            "$SFTSCOPE_RUNS instead of sftscope-runs when set); report: report.html in the "
            "first RUN.")


def out_opt() -> Any:
    """``--out``: one help text and one default (none: :func:`config.core.default_out`) in
    every command."""
    return opt(None, OUT_HELP, check=non_empty)


def eval_limit_opt() -> Any:
    return opt(None, "Evaluate the first N items only.", check=at_least(1))


def eval_shots_opt() -> Any:
    return opt(None, f"Few-shot examples (default: {shots_help()}).", check=at_least(0),
               aliases=("eval_num_fewshot",))


def eval_fewshot_opt() -> Any:
    return opt(None, "Shot pool for the evaluation (a local file in the task's fields).",
               aliases=("fewshot_data",))


def max_new_tokens_opt(default: int = 256) -> Any:
    return opt(default, "Generation budget per item.", check=at_least(1))


def pooling_opt() -> Any:
    return opt("mean", "One vector per sample: masked mean of its tokens, or its last token.",
               choices=("mean", "last"))


def preset_opt() -> Any:
    return opt("default", "default, or reference: the authors' research-code choices "
               "(docs/metrics.md).", choices=PRESETS)


# ----------------------------------------------------------------------------- ingredients


def check_pair_sources(base: str | None, sft: str | None, allow_mixed: bool,
                       what: str = "SFT model") -> None:
    """Both models exist (or look like hub ids) and can be compared layer by layer; an adapter
    as the SFT side applies to ``base`` and must fit it. ``what`` names the SFT side in
    messages (``stage dpo`` in a chain)."""
    from sftscope.load.sources import check_model, check_pair

    b = check_model(base, "base model") if base else None
    s = check_model(sft, what, base=base) if sft else None
    if b is not None and s is not None and b.config and s.config:
        # a GGUF names its family as llama.cpp does (a Mistral is "llama"): depth and width
        # here, the model types once transformers has read the configs
        gguf = "gguf" in (b.kind, s.kind) or "gguf" in (getattr(b.base, "kind", None),
                                                        getattr(s.base, "kind", None))
        check_pair(b.config, s.config, base or "base", sft or "sft",
                   allow_mixed=allow_mixed or gguf)


def check_tokenizer_source(spec: str) -> None:
    """A tokenizer folder that exists, or something shaped like a hub id."""
    import os

    from sftscope.load.sources import looks_like_path

    path = os.path.expanduser(spec)
    if os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(".gguf")):
        return
    if os.path.exists(path):
        raise SftscopeError(f"--tokenizer {spec} is a file; give a tokenizer folder, a .gguf "
                            f"file or a hub id")
    if looks_like_path(spec):
        raise SftscopeError(f"--tokenizer folder {spec} does not exist; check the path")


@dataclass(frozen=True, kw_only=True)
class PairModels(Config):
    """A Base model and its fine-tuned version, compared layer by layer."""

    base: str = base_opt()
    sft: str = sft_opt()
    base_revision: str | None = revision_opt("base model")
    sft_revision: str | None = revision_opt("SFT model")
    tokenizer: str | None = tokenizer_opt(pair=True)
    allow_mixed_pair: bool = allow_mixed_opt()
    allow_other_base: bool = allow_other_base_opt()

    def _check(self) -> None:
        check_pair_sources(self.base, self.sft, self.allow_mixed_pair)
        if self.tokenizer not in (None, "base", "sft"):
            check_tokenizer_source(self.tokenizer)


@dataclass(frozen=True, kw_only=True)
class Chain(Config):
    """Further SFT-side checkpoints of the same base after ``--sft`` (a checkpoint chain:
    base -> SFT -> DPO -> RLVR ...), each compared with the base, and with ``consecutive``
    with the stage before it (``sftscope.chains``)."""

    stages: tuple[str, ...] = opt(
        (), "Further checkpoints of the same base after --sft, in training order "
        "(a chain such as SFT -> DPO -> RLVR), comma-separated, each LABEL=PATH or PATH "
        "(label: the folder name, or an adapter's run label; not base, sft or pair). Each is "
        "compared with the base (table model LABEL, pairs pair:base-LABEL); --sft stays the "
        "first stage (sft, pair).", factory=tuple, metavar="LABEL=PATH,...")
    consecutive: bool = opt(False, "With --stages: also compare each stage with the one "
                            "before it (pairs pair:sft-LABEL, pair:LABEL-NEXT).")

    def chain(self) -> list[Any]:
        """The further stages as ``chains.Stage`` (label, source), in order."""
        from sftscope.chains import parse_stages

        return parse_stages(self.stages, getattr(self, "base", None))

    def _check(self) -> None:
        if self.consecutive and not self.stages:
            raise SftscopeError("--consecutive compares each stage of a chain with the one "
                                "before it; give the further stages with --stages (or drop "
                                "--consecutive)")
        base = getattr(self, "base", None)
        if self.stages and (base is None or getattr(self, "sft", None) is None):
            raise SftscopeError("--stages extend a Base/SFT pair (--sft is the first stage): "
                                "give --base and --sft")
        for stage in self.chain():
            check_pair_sources(base, stage.spec, getattr(self, "allow_mixed_pair", False),
                               what=f"stage {stage.label}")


@dataclass(frozen=True, kw_only=True)
class OneModel(Config):
    """One model (tuned, evaluated or probed)."""

    model: str = opt(help="Model: " + MODEL_HELP + ".", check=non_empty)
    revision: str | None = revision_opt("model")
    tokenizer: str | None = tokenizer_opt(pair=False)

    def _check(self) -> None:
        from sftscope.load.sources import check_model

        if self.model:
            check_model(self.model)
        if self.tokenizer is not None:
            check_tokenizer_source(self.tokenizer)


@dataclass(frozen=True, kw_only=True)
class DataSpec(Config):
    """Which texts, how they are formatted, subsampled and tokenised."""

    data: str = opt(help=DATA_HELP, check=non_empty)
    split: str | None = split_opt()
    text_field: str | None = text_field_opt()
    template: str | None = opt(None, "Python format string over record fields, e.g. "
                               "'Q: {question}\\nA: {answer}' (named fields only).",
                               check=template_text)
    chat_template: bool = chat_template_opt()
    max_length: int = max_length_opt(512)
    limit: int | None = limit_opt(None)
    seed: int = opt(0, "Seed of the sample selection (and of the bootstrap).")
    skip_bad_records: bool = opt(False, "Skip records with missing or empty fields (counted) "
                                 "instead of refusing the data.")

    def _check(self) -> None:
        check_data_source(self.data, split=self.split, text_field=self.text_field,
                          template=self.template)

    def prepare(self, tokenizer, n: int | None | EllipsisType = ...) -> Prepared:
        """These options' data through the one data path (``load.data.prepare``): samples,
        token ids and notes. ``n``: how many samples (default ``--limit``; None: all)."""
        return prepare(self.data, tokenizer, text_field=self.text_field,
                       template=self.template, split=self.split,
                       n=self.limit if n is ... else n, seed=self.seed,
                       max_length=self.max_length, chat_template=self.chat_template,
                       skip_bad=self.skip_bad_records)


@dataclass(frozen=True, kw_only=True)
class Runtime(Config):
    """Where and in what precision the models run."""

    device: str = device_opt()
    dtype: str = dtype_opt()
    device_map: str | None = opt(None, "accelerate device map: auto shards a model larger than "
                                 "one device over the visible GPUs (and CPU).",
                                 check=device_map_value, volatile=True)
    batch_size: int = batch_size_opt(8)


@dataclass(frozen=True, kw_only=True)
class Stats(Config):
    """Confidence intervals."""

    level: float = level_opt()
    bootstrap: int = bootstrap_opt(1000)


@dataclass(frozen=True, kw_only=True)
class Output(Config):
    """The run folder and the table formats."""

    OUTPUTS: ClassVar[tuple[str, ...]] = ()  # file patterns a rerun replaces (set per command)

    out: str | None = out_opt()
    formats: tuple[str, ...] = formats_opt()
    overwrite: bool = opt(False, "Replace a finished run in --out that was made with other "
                          "settings.", volatile=True)


@dataclass(frozen=True, kw_only=True)
class Cache(Config):
    """Captured states, cached and checkpointed."""

    cache_dir: str | None = opt(None, "Where captured states are cached (default "
                                "$SFTSCOPE_CACHE or ~/.cache/sftscope).", volatile=True)
    checkpoint_every: float = opt(60.0, "Seconds between checkpoints of a capture in progress "
                                  "(0: after every batch; Ctrl-C also checkpoints).",
                                  check=at_least(0), volatile=True)

    def _check(self) -> None:
        import os

        if self.cache_dir is not None:
            path = os.path.expanduser(self.cache_dir)
            if os.path.exists(path) and not os.path.isdir(path):
                raise SftscopeError(f"--cache-dir {self.cache_dir} is a file; give a folder")
