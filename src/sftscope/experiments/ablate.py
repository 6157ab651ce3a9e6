"""``sftscope ablate``: which blocks matter, causally, for one model, or for what a fine-tune
changed.

Units are single blocks (default) or the ``K`` depth segments. For one model each unit is
ablated in turn and the model scored as ``swap`` scores (teacher-forced next-token accuracy,
loss and perplexity over real tokens, MMLU choice accuracy; the same intervals):

- ``zero``: every block of the unit passes its input through, so it adds nothing to the
  residual stream (``h_{b+1} = h_b``);
- ``mean``: every block adds its *mean* update ``mean(h_{b+1} - h_b)`` over the real tokens of
  the data (measured in one pass of the unablated model first) instead of its own, which keeps
  the scale of the stream and removes what the block does token by token.

For a pair (``--base``/``--sft``) each unit of the SFT is reverted to the base's blocks (the
``base-into-sft`` swap at block granularity, the SFT's embeddings, final norm and head kept).

Each unit's ``delta_accuracy`` and ``delta_loss`` (ablated minus unablated, same tokens) get a
paired sample-level bootstrap interval: per sample the difference of the two sums, resampled
by sample. The model is restored after every unit (hooks removed, blocks put back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import nn

from sftscope.capture.engine import HookedBatch, run_hooked
from sftscope.config.commands import AblateConfig
from sftscope.config.core import build
from sftscope.errors import SftscopeError
from sftscope.experiments.context import Models, RunContext, open_sharded
from sftscope.experiments.lens import (
    LensSums,
    choices_noted,
    lens_pass,
    merge_sums,
    n_blocks_of,
    pick_tokenizer,
    prepare_data,
)
from sftscope.experiments.swap import check_swappable, score_rows, swapped
from sftscope.io import Timer, run_record, write_tables
from sftscope.load.arch import get_blocks, n_layers
from sftscope.load.data import TokenizedSet
from sftscope.load.models import check_pair, load_config
from sftscope.metrics.stats import cluster_ratio_ci
from sftscope.parallel import empty_like_table
from sftscope.progress import plan, stage, staged
from sftscope.segments import block_text, segment_bounds

ABLATE_COLUMNS = ["unit", "blocks", "mode", "metric", "value", "ci_low", "ci_high", "n"]
ORIGINAL = "none"


class Unit(NamedTuple):
    """One ablated unit: its label (``b3`` or ``s1``) and its blocks."""

    label: str
    blocks: tuple[int, ...]


def units_of(n_blocks: int, segments: int | None) -> list[Unit]:
    """Every block (``segments`` None) or the ``segments`` depth segments, bottom first."""
    if segments is None:
        return [Unit(f"b{b}", (b,)) for b in range(n_blocks)]
    return [Unit(f"s{i}", tuple(range(lo, hi)))
            for i, (lo, hi) in enumerate(segment_bounds(n_blocks, segments))]


# ---------------------------------------------------------------------------------------------
# Ablation


class _UpdateSums:
    """Reducer: per hidden state the sum over real tokens (float64), for mean updates."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self.batch: HookedBatch | None = None

    def start(self, batch: HookedBatch) -> None:
        self.batch = batch
        self.tokens += int(batch.attention_mask.sum())

    def __call__(self, j: int, h: torch.Tensor) -> None:
        s = self.batch.real_sum(h).double().sum(0).cpu()
        self.sums[j] = self.sums[j] + s if j in self.sums else s

    def finish(self, batch: HookedBatch) -> None:
        self.batch = None


def mean_updates(model: nn.Module, tok: TokenizedSet, pad_id: int,
                 batch_size: int) -> list[torch.Tensor]:
    """Per block ``b`` the mean over every real token of ``tok`` of ``h_{b+1} - h_b``
    (float64, CPU): the update a mean-ablated block adds."""
    red = _UpdateSums()
    run_hooked(model, tok, batch_size, pad_id, red, description="mean updates",
               label="mean updates")
    n = max(red.tokens, 1)
    return [(red.sums[b + 1] - red.sums[b]) / n for b in range(n_blocks_of(model))]


@contextlib.contextmanager
def ablated(model: nn.Module, blocks: Sequence[int], mode: str,
            means: Sequence[torch.Tensor] | None = None) -> Iterator[nn.Module]:
    """``model`` with ``blocks`` zero- or mean-ablated (forward hooks that replace each block's
    output by its input, plus its mean update in ``mean`` mode); removed on exit."""
    if mode == "mean" and means is None:
        raise SftscopeError("mean ablation needs the mean updates (mean_updates)")
    layers = get_blocks(model)
    handles = []

    def make(b: int):
        def hook(_mod, args, kwargs, output):
            h = args[0] if args else kwargs["hidden_states"]
            new = h if mode == "zero" else h + means[b].to(h.device, h.dtype)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new
        return hook

    try:
        for b in blocks:
            handles.append(layers[b].register_forward_hook(make(b), with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Scoring and the table


class UnitSums(NamedTuple):
    """The lens sums (last layer) of the unablated model and of each unit."""

    original: LensSums
    units: list[tuple[Unit, LensSums]]
    n_blocks: int


def ablate_sums(model: nn.Module, tok: TokenizedSet, pad_id: int, units: Sequence[Unit], *,
                mode: str, donor: nn.Module | None = None, choices: Sequence[Any] | None,
                batch_size: int, chunk_elements: int, indices: Sequence[int] | None = None,
                means: Sequence[torch.Tensor] | None = None) -> UnitSums:
    """Score ``model`` unablated and with each unit ablated (``mode`` zero / mean) or, with
    ``donor``, with each unit's blocks taken from the donor (revert). Left as it was."""
    n_blocks = n_blocks_of(model)
    if donor is not None:
        check_swappable(donor, model)

    def run(m: nn.Module, label: str) -> LensSums:
        return lens_pass(m, tok, pad_id, batch_size=batch_size, layers=[n_blocks],
                         choices=choices, chunk_elements=chunk_elements, description=label,
                         indices=indices)

    original = run(model, "unablated")
    found = []
    for unit in units:
        stage(f"{mode} {unit.label}")
        if donor is not None:
            ctx = swapped(model, donor, unit.blocks, names=("sft", "base"))
        else:
            ctx = ablated(model, unit.blocks, mode, means)
        with ctx as m:
            found.append((unit, run(m, f"{mode} {unit.label}")))
    return UnitSums(original, found, n_blocks)


def _delta_rows(a: LensSums, o: LensSums, level: float, n_boot: int, seed: int
                ) -> list[tuple[str, float, float, float, int]]:
    """Ablated minus unablated accuracy and loss over the same tokens, with a paired
    sample-level bootstrap interval (per sample the difference of the sums)."""
    n_tok = int(o.tokens.sum())
    if not n_tok:
        return []
    out = []
    for name, x, y in (("delta_accuracy", a.correct[:, 0], o.correct[:, 0]),
                       ("delta_loss", a.loss[:, 0], o.loss[:, 0])):
        diff = x - y
        lo, hi = cluster_ratio_ci(diff, o.tokens, n_boot=n_boot, level=level, seed=seed)
        out.append((name, float(diff.sum() / n_tok), float(lo), float(hi), n_tok))
    return out


def ablate_table(res: UnitSums, mode: str, level: float = 0.95, n_boot: int = 1000,
                 seed: int = 0) -> pd.DataFrame:
    """Tidy rows (``ABLATE_COLUMNS``): the unablated model (unit ``none``), each unit's scores
    and its paired deltas."""
    rows: list[dict[str, Any]] = []

    def add(unit: str, blocks: str, sums: LensSums) -> None:
        for r in score_rows(sums, "", "", "", "", level, n_boot, seed):
            rows.append({"unit": unit, "blocks": blocks, "mode": mode, "metric": r["metric"],
                         "value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                         "n": r["n"]})

    add(ORIGINAL, "", res.original)
    for unit, sums in res.units:
        add(unit.label, block_text(unit.blocks), sums)
        for metric, v, lo, hi, n in _delta_rows(sums, res.original, level, n_boot, seed):
            rows.append({"unit": unit.label, "blocks": block_text(unit.blocks), "mode": mode,
                         "metric": metric, "value": v, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows, columns=ABLATE_COLUMNS)


def merge_unit_sums(parts: Sequence[tuple[Sequence[int], UnitSums | None]]) -> UnitSums:
    """Every rank's share joined per scored model."""
    got = [(i, u) for i, u in parts if u is not None]
    if not got:
        raise SftscopeError("no ablation results to merge: no process ran a sample")
    first = got[0][1]
    original = merge_sums([(i, u.original) for i, u in got])
    units = [(unit, merge_sums([(i, u.units[k][1]) for i, u in got]))
             for k, (unit, _) in enumerate(first.units)]
    return UnitSums(original, units, first.n_blocks)


# ---------------------------------------------------------------------------------------------
# The command


class _Plan(NamedTuple):
    ctx: RunContext  # the models, tokenizer, data, notes and run folder
    choices: list[Any]
    n_blocks: int
    units: list[Unit]
    mode: str


def plan_ablate(cfg: AblateConfig) -> _Plan:
    """Validate everything before any model loads: sources, pair, units, data."""
    if cfg.pair:
        models = Models.pair(cfg.base, cfg.sft, cfg.base_revision, cfg.sft_revision)
        cfgs = {k: load_config(v, revision=models.revs[k], base=models.bases[k],
                               base_revision=cfg.base_revision) for k, v in models.specs.items()}
        info = check_pair(cfgs["base"], cfgs["sft"], cfg.base, cfg.sft,
                          allow_mixed=cfg.allow_mixed_pair)
        n_blocks, notes, default = info.n_blocks, list(info.notes), "sft"
    else:
        models = Models.single(cfg.model, cfg.revision)
        conf = load_config(cfg.model, revision=cfg.revision)
        n_blocks, notes, default = n_layers(conf), [], "model"
    if cfg.segments is not None and cfg.segments > n_blocks:
        raise SftscopeError(f"--segments {cfg.segments} is larger than the model's {n_blocks} "
                            f"blocks")
    ctx = RunContext("ablate", Path(cfg.out) if cfg.out is not None else None, models,
                     notes=notes)
    ctx.tokenizer = pick_tokenizer(cfg.tokenizer, default, models.specs, models.revs,
                                   models.bases, cfg.base_revision)
    samples, ctx.tokens, data_notes = prepare_data(
        cfg.data, ctx.tokenizer, n=cfg.limit, seed=cfg.seed, max_length=cfg.max_length,
        chat_template=cfg.chat_template, text_field=cfg.text_field, template=cfg.template,
        split=cfg.split, skip_bad=cfg.skip_bad_records)
    ctx.notes += data_notes
    choices: list[Any] = [None] * len(samples)
    if any(s.meta.get("letter") for s in samples):
        choices = choices_noted(samples, ctx.tokens, ctx.tokenizer, cfg.chat_template,
                                ctx.notes)
    return _Plan(ctx, choices, n_blocks, units_of(n_blocks, cfg.segments),
                 "revert" if cfg.pair else cfg.mode)


def _run_units(cfg: AblateConfig, p: _Plan, device: str, share: list[int],
               timer: Timer) -> UnitSums | None:
    """Load the model(s) and score every unit on this process's ``share``."""
    if not share:
        return None
    ctx = p.ctx
    opts = ctx.load_options(cfg, device=device)
    stage("load")
    with ctx.models.loaded(opts, ctx.tokens, timer) as models:
        host = models.get("sft", models.get("model"))
        means = None
        if p.mode == "mean":
            stage("mean updates")
            with timer("means"):
                means = mean_updates(host, ctx.tokens, ctx.pad_id, cfg.batch_size)
        stage("score units")
        with timer("score"):
            return ablate_sums(host, ctx.tokens, ctx.pad_id, p.units, mode=p.mode,
                               donor=models.get("base"), choices=p.choices,
                               batch_size=cfg.batch_size, chunk_elements=cfg.chunk_elements,
                               indices=share, means=means)


@staged
def ablate(config: AblateConfig | None = None, /, **options: Any) -> pd.DataFrame:
    """Ablate each unit (block or segment) of one model, or revert it in a pair's SFT, and
    score it; returns the tidy table (``ABLATE_COLUMNS``). With ``out``: ``ablate.csv`` and
    ``run.json``."""
    cfg = config if config is not None else build(AblateConfig, options)
    p, par, timer, device = open_sharded(cfg, "ablate", plan_ablate)
    share = par.shard(len(p.ctx.tokens), cfg.batch_size)
    plan(3 + (p.mode == "mean") + len(p.units))
    found = par.run(lambda: _run_units(cfg, p, device, share, timer), "ablate")
    parts = par.gather((share, found))
    if parts is None:
        return empty_like_table(ABLATE_COLUMNS)
    stage("table")
    df = ablate_table(merge_unit_sums(parts), p.mode, cfg.level, cfg.bootstrap, cfg.seed)
    if cfg.out is not None:
        _record(cfg, p, df, timer, par)
    return df


def _record(cfg: AblateConfig, p: _Plan, df: pd.DataFrame, timer: Timer, par: Any) -> None:
    ctx = p.ctx
    write_tables(df, ctx.out, "ablate", cfg.formats)
    ctx.finish(run_record(
        "ablate", cfg.record(), n_blocks=p.n_blocks, mode=p.mode,
        units=[{"unit": u.label, "blocks": list(u.blocks)} for u in p.units],
        ablation={"zero": "each block of the unit passes its input through",
                  "mean": "each block of the unit adds its mean update over the real tokens "
                          "of the data instead of its own",
                  "revert": "the unit's blocks of the SFT are the base's (SFT embeddings, "
                            "final norm and head)"}[p.mode],
        models=ctx.fingerprints(cfg.base_revision),
        n_samples=len(ctx.tokens), n_truncated=ctx.tokens.n_truncated,
        intervals="sample-level (cluster) bootstrap for accuracy, loss and the paired deltas; "
                  "Wilson for choice_accuracy",
        notes=ctx.notes, timings=timer.seconds,
        **par.record(len(ctx.tokens), cfg.batch_size)))

