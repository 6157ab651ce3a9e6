"""``sftscope analyze``: every layer-wise metric of a Base/SFT pair, streamed.

Base runs, then SFT runs (never both in memory); each capture is cached, so a second analysis
with other dataset-level options does not run the models again.

Under ``torchrun``/``accelerate launch`` each process captures its share of the samples (whole
batches; ``sftscope.parallel``), with its own cache entry and checkpoint (resume per rank);
rank 0 merges the shares, caches the merged capture under the one-process key (a later
one-process run reuses it) and writes the tables and run.json; the other ranks return an
empty table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sftscope import metrics as M
from sftscope.capture.routing import RoutingTask
from sftscope.capture.stream import (
    CaptureConfig,
    CaptureResult,
    cache_key,
    capture,
    load_cached,
    merge_shards,
    save_capture,
    shard_path,
    shard_unit,
)
from sftscope.chains import (
    BASE,
    FIRST,
    Stage,
    chain_pairs,
    chain_record,
    is_pair_label,
    model_order,
    pair_label,
)
from sftscope.config.commands import AnalyzeConfig
from sftscope.experiments import routing as RT
from sftscope.experiments.context import Models, RunContext
from sftscope.io import Timer, run_record, write_table
from sftscope.load import data as D
from sftscope.load.models import (
    LoadOptions,
    PairInfo,
    check_adapter_base,
    check_pair,
    check_tokenizers,
    check_vocab,
    default_cache_dir,
    fingerprint,
    load_config,
    load_model,
    load_tokenizer,
    pair_tokenizer,
)
from sftscope.load.runtime import dtype_name, model_bytes, release, resolve_device, resolve_dtype
from sftscope.metric_registry import MetricFunction, metric_functions
from sftscope.parallel import Group, empty_like_table, join
from sftscope.progress import plan, say, stage, staged
from sftscope.runs import check_out

__all__ = ["AnalyzeConfig", "analyze", "correlation_table", "pair_table", "single_model_table"]

_Routing = tuple[Callable[[str], RoutingTask | None], Callable[[str], bool]]


def _options(cfg: AnalyzeConfig) -> M.MetricOptions:
    return M.get_options(cfg.preset, alpha=cfg.entropy_alpha, normalisation=cfg.normalisation,
                         pooling=cfg.pooling, cka_unbiased=cfg.cka_unbiased,
                         entropy_normalisations=tuple(cfg.entropy_normalisations))


def capture_config(cfg: AnalyzeConfig, opts: M.MetricOptions) -> CaptureConfig:
    """What the capture computes for ``cfg`` (also the Python API's, from its keywords)."""
    return CaptureConfig(batch_size=cfg.batch_size, n_token=cfg.n_token, alpha=opts.alpha,
                         normalisation=opts.normalisation, ridge=opts.ridge,
                         sparsity_eps=opts.sparsity_eps, sparsity_group=opts.sparsity_group,
                         curvature_zero_steps=opts.curvature_zero_steps,
                         curvature_cos_clip=opts.curvature_cos_clip,
                         entropy_normalisations=opts.entropy_normalisations,
                         include_padding=cfg.preset == "reference",
                         checkpoint_every=cfg.checkpoint_every)


def tidy(parts: list[pd.DataFrame], *, reference: bool, n_blocks: int,
         order: dict[str, int] | None = None) -> pd.DataFrame:
    """The metrics table from its parts: sorted by model, metric, layer (a chain's models in
    training order: ``order``), a clean 0..n-1 index; the reference preset keeps j < L."""
    table = pd.concat(parts, ignore_index=True)
    if reference:  # the research code kept j = 0..L-1 (no output of the last block)
        table = table[table.layer < n_blocks]
    key = (lambda c: c.map(order) if c.name == "model" else c) if order else None
    table = table.sort_values(["model", "metric", "layer"], kind="stable", key=key)
    return table.reset_index(drop=True)


def prepare_data(cfg: AnalyzeConfig, tokenizer) -> tuple[D.TokenizedSet, list[str]]:
    """Load, subsample and tokenize the data (``DataSpec.prepare``); notes say what was
    truncated or short."""
    prep = cfg.prepare(tokenizer)
    return prep.tokens, prep.notes


def _load_settings(cfg: AnalyzeConfig) -> dict:
    """How the model will run, as it enters the capture key: resolved dtype and device type."""
    device = resolve_device(cfg.device)
    if cfg.device_map:
        device = f"map:{cfg.device_map}:{'cuda' if torch.cuda.is_available() else 'cpu'}"
    return {"dtype": dtype_name(resolve_dtype(cfg.dtype, resolve_device(cfg.device))),
            "device": device.split(":")[0] if not cfg.device_map else device}


def _capture_model(spec: str, revision: str | None, cfg: AnalyzeConfig, tok: D.TokenizedSet,
                   ccfg: CaptureConfig, pad_id: int, label: str, par: Group | None = None,
                   base: str | None = None, routing: _Routing | None = None
                   ) -> tuple[CaptureResult | None, dict, str]:
    """The capture of one model: from the cache when one with the same key exists.

    The key holds the model's content fingerprint (an adapter's and its base's), the exact ids
    and text options, the resolved dtype and device type and the capture options, so nothing
    that changes the states can reuse another run's file. ``base``: what an adapter ``spec``
    applies to. With several processes (``par``) each captures its share under a key of its
    own, and rank 0 receives the merged capture (None elsewhere). ``routing``: ``(task, ready)``
    of an MoE capture (``experiments.routing``): the routing task for the capture's key, and
    whether a cached capture under that key can serve; also returns the key.
    """
    par = par or Group()
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    # rank 0 reads the weights for their content hash; the other ranks receive it
    fp = par.broadcast(par.run(lambda: fingerprint(spec, revision, memo_dir=cache, base=base,
                                                   base_revision=cfg.base_revision)
                               if par.main else None, f"fingerprint of {label}"))
    revision = fp.get("commit") or revision  # load exactly the commit the key names
    load = _load_settings(cfg)
    data = {"max_length": cfg.max_length, "chat_template": cfg.chat_template,
            "template": cfg.template, "text_field": cfg.text_field}
    key = cache_key(fp, tok, ccfg, load=load, data=data, pad_id=pad_id)
    path = cache / f"states-{key}.safetensors"
    hit = load_cached(path) if par.main else None
    if hit is not None and routing is not None and not routing[1](key):
        hit = None  # the routing stored beside it is gone: captured again, from scratch
        path.unlink(missing_ok=True)
    if par.broadcast(hit is not None):
        if hit is None:
            return None, fp, key
        say(f"[dim]{label}: states from cache {path}[/]")
        hit.info["cached"] = True
        return hit, fp, key
    task = routing[0](key) if routing is not None else None

    def run(indices: list[int] | None, where: Path) -> CaptureResult:
        model = load_model(spec, LoadOptions(revision=revision, dtype=cfg.dtype,
                                             device=par.device or cfg.device,
                                             device_map=cfg.device_map, base=base,
                                             base_revision=cfg.base_revision,
                                             allow_other_base=cfg.allow_other_base))
        nbytes = model_bytes(model)
        try:
            check_vocab(model, tok.input_ids, label)
            return capture(model, tok, ccfg, pad_id, cache_path=where, label=label,
                           indices=indices, routing=task)
        finally:
            del model
            release(nbytes)

    if not par.active:
        res = run(None, path)
        res.info["load"] = load
        return res, fp, key
    share = par.shard(len(tok), shard_unit(ccfg))
    mine = shard_path(path, par.rank, par.world, share) if share else None
    part = par.run(lambda: run(share, mine) if share else None, f"capture {label}")
    parts = par.gather(part)
    merged: list[CaptureResult] = []

    def merge() -> None:  # rank 0; every rank learns whether it worked
        if par.main and parts is not None:
            merged.append(merge_shards(parts, len(tok)))
            save_capture(path, merged[0])

    par.run(merge, f"merging the capture of {label}")
    if mine is not None:  # the merged capture is cached: this share is not needed again
        mine.unlink(missing_ok=True)
    if not merged:
        return None, fp, key
    merged[0].info["load"] = load
    return merged[0], fp, key


def single_model_table(res: CaptureResult, opts: M.MetricOptions, model: str,
                       bootstrap: int = 0, seed: int = 0) -> pd.DataFrame:
    """Rows (layer, metric, model, value, ci_low, ci_high) of one model's metrics."""
    rows = []
    for j in range(res.n_states):
        for name in res.token:
            vals = res.token[name][j]
            vals = vals[~torch.isnan(vals)]
            if len(vals) == 0:
                continue
            lo = hi = float("nan")
            if bootstrap and len(vals) > 1:
                lo, hi = M.bootstrap_ci(vals.numpy(), n_boot=bootstrap, seed=seed)
            v = float(vals.mean())
            rows.append((j, name, model, v, lo, hi))
            if name == "curvature":
                rows.append((j, "curvature_pi", model, v / np.pi, lo / np.pi, hi / np.pi))
        z = res.pooled(opts.pooling)[j]
        for name, v in M.dataset_metrics(z, opts,
                                         compute_dtype=res.info.get("compute_dtype")).items():
            rows.append((j, name, model, float(v), float("nan"), float("nan")))
    return pd.DataFrame(rows, columns=["layer", "metric", "model", "value", "ci_low", "ci_high"])


def pair_table(rb: CaptureResult, rs: CaptureResult, opts: M.MetricOptions,
               single: pd.DataFrame, bootstrap: int = 0, seed: int = 0, *,
               models: tuple[str, str] = ("base", "sft"), label: str = "pair") -> pd.DataFrame:
    """Pair metrics per layer (CKA, cosine, mean shift) and SFT-minus-base deltas.

    ``rb``/``rs``: the two captures compared (``models``: their labels in ``single``, the
    single-model rows the dataset-level deltas are taken from; the delta is the second minus
    the first); ``label``: the ``model`` column of the rows (``pair``, or ``pair:base-dpo`` in
    a chain)."""
    rows = []
    for j in range(rb.n_states):
        zb, zs = rb.pooled(opts.pooling)[j], rs.pooled(opts.pooling)[j]
        for metric in metric_functions("pair"):
            for name, v in metric.compute(M.PooledPair(zb, zs, opts)).items():
                lo = hi = float("nan")
                if bootstrap and zb.shape[0] > 3:
                    fn = _pair_fn(metric, name, zb, zs, opts)
                    lo, hi = M.bootstrap_ci(fn, n=zb.shape[0], n_boot=bootstrap, seed=seed)
                rows.append((j, name, label, float(v), lo, hi))
        for name in rb.token:  # sample-level delta: mean of per-sample differences
            if name not in rs.token:
                continue
            d = (rs.token[name][j] - rb.token[name][j])
            d = d[~torch.isnan(d)]
            if len(d):
                rows.append((j, f"delta_{name}", label, float(d.mean()), float("nan"),
                             float("nan")))
    a, b = models
    single = single[single["model"].isin(models)]
    wide = single.pivot_table(index=["layer", "metric"], columns="model", values="value")
    dataset = set(M.dataset_metric_names(opts))
    for (j, name), r in wide.iterrows():
        if name in dataset and {a, b} <= set(r.index):
            rows.append((j, f"delta_{name}", label, float(r[b] - r[a]),
                         float("nan"), float("nan")))
    return pd.DataFrame(rows, columns=["layer", "metric", "model", "value", "ci_low", "ci_high"])


def _pair_fn(metric: MetricFunction, name: str, zb: torch.Tensor, zs: torch.Tensor,
             opts: M.MetricOptions):
    """``name`` (of the registered pair function ``metric``) on the rows ``idx`` (a bootstrap
    resample)."""
    def of(idx) -> float:
        rows = torch.as_tensor(idx)
        return float(metric.compute(M.PooledPair(zb[rows], zs[rows], opts))[name])
    return of


def pair_values(zb: torch.Tensor, zs: torch.Tensor, opts: M.MetricOptions) -> dict[str, float]:
    """Every registered pair metric of two pooled matrices ``[N, D]`` whose rows are paired."""
    return M.pair_metrics(zb, zs, opts)


NOISE_COLUMNS = ["layer", "metric", "value", "ci_low", "ci_high", "splits"]


def noise_table(rb: CaptureResult, opts: M.MetricOptions, splits: int,
                seed: int = 0) -> pd.DataFrame:
    """The noise floor of the pair metrics: the base against itself on two disjoint random
    halves of the samples (row i of one half paired with row i of the other), over ``splits``
    seeded splits; per layer and metric the median (``value``) and the 2.5-97.5 % range over
    the splits (``ci_low``/``ci_high``: a band of what chance alone gives at ``N // 2`` rows,
    not a confidence interval). Empty with fewer than 8 samples or ``splits`` 0."""
    cols = NOISE_COLUMNS
    pooled = rb.pooled(opts.pooling)
    n = pooled[0].shape[0] if rb.n_states else 0
    if splits < 1 or n < 8:
        return pd.DataFrame(columns=cols)
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for _ in range(splits)]
    half = n // 2
    rows = []
    for j in range(rb.n_states):
        z = pooled[j]
        vals = [pair_values(z[p[:half]], z[p[half:2 * half]], opts) for p in perms]
        for name in vals[0]:
            v = np.array([d[name] for d in vals])
            rows.append((j, name, float(np.median(v)), float(np.quantile(v, 0.025)),
                         float(np.quantile(v, 0.975)), splits))
    return pd.DataFrame(rows, columns=cols)


def correlation_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Pearson correlation between metrics across layers, per model (the paper's Figure 5)."""
    out = []
    for model, grp in metrics.groupby("model"):
        wide = grp.pivot_table(index="layer", columns="metric", values="value")
        corr = M.correlation_matrix(wide)
        for a in corr.index:
            for b in corr.columns:
                out.append((model, a, b, float(corr.loc[a, b])))
    return pd.DataFrame(out, columns=["model", "metric_a", "metric_b", "r"])


def _chain(cfg: AnalyzeConfig) -> list[Stage]:
    """The SFT-side stages: ``--sft`` (label ``sft``), then ``--stages`` in order."""
    return [Stage(FIRST, cfg.sft, cfg.sft_revision), *cfg.chain()]


def check_chain(base: str, stages: list[Stage], *, base_revision: str | None,
                allow_mixed: bool, allow_other_base: bool = False,
                memo_dir: str | None = None) -> tuple[PairInfo, list[str]]:
    """Every stage of a chain fits the base (depth, width, vocabulary; an adapter stage was
    trained on this base); returns the first pair's ``PairInfo`` and the notes (a further
    stage's prefixed with its label). Before any model runs."""
    base_cfg = load_config(base, base_revision)
    infos = [check_pair(base_cfg, load_config(s.spec, s.revision, base=base,
                                              base_revision=base_revision),
                        base, s.spec, allow_mixed=allow_mixed) for s in stages]
    for s in stages:
        check_adapter_base(s.spec, base, s.revision, base_revision=base_revision,
                           allow_other_base=allow_other_base, memo_dir=memo_dir)
    notes = list(infos[0].notes)
    for s, info in zip(stages[1:], infos[1:], strict=True):
        notes += [f"stage {s.label}: {n}" for n in info.notes]
    return infos[0], notes


def check_chain_tokenizers(tokenizer, base: str, stages: list[Stage], *,
                           base_revision: str | None) -> list[str]:
    """The further stages' tokenizers agree with the one the models see (shared ids map to
    the same tokens); notes prefixed with the stage's label."""
    notes = []
    for s in stages[1:]:
        theirs = load_tokenizer(s.spec, revision=s.revision, base=base,
                                base_revision=base_revision)
        notes += [f"stage {s.label}: {n}" for n in check_tokenizers(tokenizer, theirs)]
    return notes


def routing_plan(cfg: AnalyzeConfig, shape: tuple | None, stages: list[Stage],
                 dtype: torch.dtype, par: Group) -> RT.RoutingPlan | None:
    """The routing measurement of an MoE pair (None for a dense one): its sparse blocks,
    experts, top-k and, with ``--router-input base``, how each stage's routers are loaded
    (on the CPU, in the analysis dtype) and identified in the base's key (its content
    fingerprint, read by rank 0 as every fingerprint is)."""
    if shape is None:
        return None
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    plan_ = RT.RoutingPlan(cfg.router_input or "own", *shape, cache=cache)
    if plan_.router_input == "base":
        for st in stages:
            opts = LoadOptions(revision=st.revision, dtype=dtype_name(dtype), device="cpu",
                               base=cfg.base, base_revision=cfg.base_revision,
                               allow_other_base=cfg.allow_other_base)
            fp = par.broadcast(par.run(
                lambda st=st: fingerprint(st.spec, st.revision, memo_dir=cache, base=cfg.base,
                                          base_revision=cfg.base_revision)
                if par.main else None, f"fingerprint of {st.label}"))
            plan_.partner_ids[st.label] = fp.get("hash") or [fp.get("source"),
                                                             fp.get("revision")]
            plan_.load_routers[st.label] = RT.router_loader(st.spec, opts)
    return plan_


def _routing_rows(rplan: RT.RoutingPlan, rb: CaptureResult, rs: CaptureResult, label: str,
                  cfg: AnalyzeConfig) -> list[tuple]:
    """``routing.csv`` rows of one stage against the base (its own load, the pair's drift)."""
    blocks, boot, seed = rplan.blocks, cfg.bootstrap, cfg.seed
    src, prefix = (rs.routing, "") if rplan.router_input == "own" else (rb.routing, f"{label}.")
    return (RT.load_rows(src[f"{prefix}count"], blocks, label, boot, seed)
            + RT.drift_rows(src[f"{prefix}js"], src[f"{prefix}overlap"], rb.n_tokens, blocks,
                            pair_label(BASE, label), boot, seed))


@dataclass
class AnalyzePlan:
    """What analyze validated and prepared before any model runs: the run's context (tokenizer,
    data, notes, folder), the chain's stages and pairs, the pair's shape, device and dtype, the
    metric and capture options, the routing measurement of an MoE pair."""

    ctx: RunContext
    stages: list[Stage]
    pairs: list
    info: PairInfo
    device: str
    dtype: torch.dtype
    opts: M.MetricOptions
    ccfg: CaptureConfig
    par: Group
    timer: Timer
    rplan: RT.RoutingPlan | None = None


@dataclass
class Captured:
    """What the captures gave rank 0: the base's capture, every model's fingerprint and capture
    info, the table parts, the noise floor and the routing rows."""

    rb: CaptureResult
    fps: dict[str, dict]
    infos: dict[str, dict | None]
    parts: list[pd.DataFrame]
    noise: pd.DataFrame
    routing_rows: list[tuple]


@staged
def analyze(cfg: AnalyzeConfig) -> pd.DataFrame:
    """Run the whole analysis and write ``metrics.csv``, ``correlation.csv`` and ``run.json``.

    With ``stages`` (a checkpoint chain) the base is captured once and each stage after it
    (one model in memory at a time, each capture cached): single-model rows per stage
    (``model`` = its label, ``sft`` for the first), pair rows of each stage against the base
    (``pair``, ``pair:base-LABEL``) and with ``consecutive`` against the stage before it
    (``pair:PREV-LABEL``); each pair's numbers are those of a separate two-model run.
    """
    p = plan_analyze(cfg)
    found = run_analyze(cfg, p)
    if found is None or not p.par.main:  # not rank 0: the tables are rank 0's
        return empty_like_table(["layer", "metric", "model", "value", "ci_low", "ci_high"])
    return record_analyze(cfg, p, found)


def plan_analyze(cfg: AnalyzeConfig) -> AnalyzePlan:
    """Validate the chain, the routers, the tokenizers and the data on every rank (all pass or
    all fail alike), say the notes and start the run folder."""
    timer = Timer()
    out = Path(cfg.out)
    opts = _options(cfg)
    par = join(cfg.device, cfg.device_map)
    stages = _chain(cfg)
    pairs = chain_pairs([s.label for s in stages], cfg.consecutive)
    ctx = RunContext("analyze", out, Models.pair(cfg.base, cfg.sft, cfg.base_revision,
                                                 cfg.sft_revision))
    with par.together("validation"):  # every rank validates; all pass or all fail alike
        check_out(out, "analyze", cfg, overwrite=cfg.overwrite)
        device = par.device or resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        with timer("validate"):
            info, ctx.notes = check_chain(cfg.base, stages, base_revision=cfg.base_revision,
                                          allow_mixed=cfg.allow_mixed_pair,
                                          allow_other_base=cfg.allow_other_base,
                                          memo_dir=cfg.cache_dir)
            shape = RT.check_router_input(cfg.router_input,
                                          load_config(cfg.base, cfg.base_revision), cfg.base)
            RT.check_same_routers(shape, {
                st.label: load_config(st.spec, st.revision, base=cfg.base,
                                      base_revision=cfg.base_revision) for st in stages})
            if shape is not None and cfg.consecutive:
                ctx.notes.append("routing.csv compares each stage with the base only; the "
                                 "consecutive pairs have no routing rows")
            ctx.tokenizer, tok_notes = pair_tokenizer(
                cfg.base, cfg.sft, cfg.tokenizer,
                revisions={"base": cfg.base_revision, "sft": cfg.sft_revision})
            ctx.notes += tok_notes + check_chain_tokenizers(ctx.tokenizer, cfg.base, stages,
                                                            base_revision=cfg.base_revision)
        with timer("data"):
            ctx.tokens, data_notes = prepare_data(cfg, ctx.tokenizer)
        ctx.notes += data_notes
    ctx.say_notes()
    p = AnalyzePlan(ctx, stages, pairs, info, device, dtype, opts, capture_config(cfg, opts),
                    par, timer)
    ctx.start(AnalyzeConfig.OUTPUTS, main=par.main)
    plan(len(stages) + 2)  # capture the base, each SFT-side stage, then the tables
    p.rplan = routing_plan(cfg, shape, stages, dtype, par)
    return p


def run_analyze(cfg: AnalyzeConfig, p: AnalyzePlan) -> Captured | None:
    """Capture the base, then each stage (every rank captures every stage, so the collectives
    stay in step), and build rank 0's table parts as each stage arrives (None elsewhere)."""
    tok, rplan, timer, opts = p.ctx.tokens, p.rplan, p.timer, p.opts
    stage("capture base")
    with timer("capture_base"):
        rb, fp_b, key_b = _capture_model(
            cfg.base, cfg.base_revision, cfg, tok,
            p.ccfg if rplan is None else replace(p.ccfg, routing=rplan.base_option()),
            p.ctx.pad_id, "base", p.par, routing=None if rplan is None else (
                rplan.base_task, lambda key: rplan.base_ready(key, len(tok))))
    if rplan is not None:
        rplan.base_key = key_b
    found = Captured(rb, {BASE: fp_b}, {BASE: rb.info if rb is not None else None}, [],
                     pd.DataFrame(columns=NOISE_COLUMNS), [])
    if rb is not None and rplan is not None:
        found.routing_rows += RT.load_rows(rb.routing["count"], rplan.blocks, BASE,
                                           cfg.bootstrap, cfg.seed)
    if rb is not None:
        with timer("metrics"):
            single_b = single_model_table(rb, opts, BASE, cfg.bootstrap, cfg.seed)
        found.parts.append(single_b)
        with timer("noise"):
            found.noise = noise_table(rb, opts, cfg.noise_splits, cfg.seed)
    prev: tuple[str, CaptureResult, pd.DataFrame] | None = None
    for st in p.stages:  # every rank captures every stage (the collectives stay in step)
        stage(f"capture {st.label}")
        with timer(f"capture_{st.label}"):
            rs, found.fps[st.label], _ = _capture_model(
                st.spec, st.revision, cfg, tok,
                p.ccfg if rplan is None else replace(p.ccfg, routing=rplan.stage_option()),
                p.ctx.pad_id, st.label, p.par, base=cfg.base,
                routing=None if rplan is None else (rplan.stage_task, lambda _k: True))
        if rb is None or rs is None:  # not rank 0: the tables are rank 0's
            continue
        found.infos[st.label] = rs.info
        if rplan is not None:
            found.routing_rows += _routing_rows(rplan, rb, rs, st.label, cfg)
        with timer("metrics"):
            single_s = single_model_table(rs, opts, st.label, cfg.bootstrap, cfg.seed)
            found.parts.append(single_s)
            found.parts.append(pair_table(rb, rs, opts, pd.concat([single_b, single_s]),
                                          cfg.bootstrap, cfg.seed, models=(BASE, st.label),
                                          label=pair_label(BASE, st.label)))
            if cfg.consecutive and prev is not None:
                label_p, rp, single_p = prev
                found.parts.append(pair_table(rp, rs, opts, pd.concat([single_p, single_s]),
                                              cfg.bootstrap, cfg.seed,
                                              models=(label_p, st.label),
                                              label=pair_label(label_p, st.label)))
        prev = (st.label, rs, single_s)  # the stage before: kept while the next one runs
    return found if rb is not None else None


def record_analyze(cfg: AnalyzeConfig, p: AnalyzePlan, found: Captured) -> pd.DataFrame:
    """The tables (metrics, correlation, routing, noise) and run.json; returns the metrics."""
    stage("metrics and tables")
    ctx, out, info, tok, rplan = p.ctx, Path(cfg.out), p.info, p.ctx.tokens, p.rplan
    reference = cfg.preset == "reference"
    low = {str(i.get("compute_dtype")) for i in found.infos.values() if i} & {
        "bfloat16", "float16", "torch.bfloat16", "torch.float16"}
    if low:
        ctx.note(f"states were computed in {', '.join(sorted(low))}: rank_deficiency and "
                 f"condition_number are undefined at that precision (its rounding noise "
                 f"reaches sigma_max) and are NaN; run with --dtype float32 for them")
    with p.timer("metrics"):
        order = (model_order([st.label for st in p.stages], p.pairs) if len(p.stages) > 1
                 else None)  # a chain: its members in training order
        table = tidy(found.parts, reference=reference, n_blocks=info.n_blocks, order=order)
        corr = correlation_table(table[~table.model.map(is_pair_label)
                                       | table.metric.isin(["cka", "cosine_similarity",
                                                            "mean_shift"])])
    noise = found.noise
    if reference and len(noise):
        noise = noise[noise.layer < info.n_blocks]
    for fmt in cfg.formats:
        write_table(table, out / f"metrics.{fmt}")
        write_table(corr, out / f"correlation.{fmt}")
        if rplan is not None:
            write_table(RT.frame(found.routing_rows), out / f"routing.{fmt}")
        if len(noise):
            write_table(noise, out / f"noise.{fmt}")
    n_tok_used = min(cfg.n_token, len(tok))
    curv = found.rb.token["curvature"]
    skipped = int(torch.isnan(curv[0, :n_tok_used]).sum()) if n_tok_used else 0
    ctx.finish(run_record(
        "analyze", cfg.record(), resolved={"device": p.device, "dtype": str(p.dtype)},
        n_blocks=info.n_blocks, hidden_size=info.hidden_size, model_type=info.model_type,
        models=found.fps, metric_options=asdict(p.opts),
        layer_index="hidden state j: 0 = embeddings, j = b+1 = after block b (before final norm)"
        + ("; reference preset: j = 0..L-1 only, padding counted in token metrics"
           if reference else ""),
        data={"source": cfg.data, "n_samples": len(tok), "n_token": n_tok_used,
              "n_truncated": tok.n_truncated, "max_length": cfg.max_length,
              "curvature_samples_skipped": skipped},
        seeds={"data": cfg.seed, "bootstrap": cfg.seed, "noise_splits": cfg.seed},
        noise_floor=(f"noise.csv: the base against itself on two disjoint random halves of "
                     f"the samples, {cfg.noise_splits} splits; value = median, ci_low/ci_high "
                     f"= 2.5-97.5 % range over the splits") if len(noise) else None,
        notes=ctx.notes,
        capture=found.infos, timings=p.timer.seconds,
        routing=None if rplan is None else rplan.record(),
        **chain_record(p.stages, p.pairs), **p.par.record(len(tok), shard_unit(p.ccfg)),
    ))
    return table
