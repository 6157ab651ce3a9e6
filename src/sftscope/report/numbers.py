"""The numbers behind each figure: one function per figure computes them, and both the figure
(:mod:`sftscope.report.plots`) and its findings sentences (:mod:`sftscope.report.sections`)
use the result, so a sentence can only cite what the figure draws.

Each ``*_data`` function takes the tidy table(s) as the commands write them (plus the report's
optional ``run``/``n_blocks`` columns) and returns a :class:`FigureData`: ``frame`` (exactly
the rows the figure draws, with ``rel_depth`` and intervals clipped to the metric's range),
``summary`` (one row per curve / group: the values the sentences cite) and ``notes`` (what a
reader must know: clipped intervals, flat or empty panels and why).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

import sftscope.metrics  # noqa: F401  (registers every computed metric's display spec)
from sftscope.chains import BASE, FIRST, PAIR, PAIR_PREFIX, is_pair_label, split_pair_label
from sftscope.metric_registry import lower_is_better, metric_spec, ordered
from sftscope.metrics.paired import PairedDiff, paired_difference
from sftscope.report.rules import LENS_RISE, TOP, edge_means, routing_rule
from sftscope.segments import is_mask, mask_centre, mask_from_text, mask_sort_key, segment_bounds
from sftscope.tasks import primary_metric_of

RUN = "run"
DEFAULT_RUN = "run"
TREND_TOL = 0.02        # a top value within 2 % of the curve's range of the 80 % value: "level"
AGGREGATE_MODULES = ("attn", "mlp", "total", "other")
EXPERT_MODULE = "expert"  # weights.csv rows of one routed expert (integer ``expert`` column)
MIX = "interpolate"    # swap.csv's direction of interpolated rows (swap --alphas)
ORIGINAL_NAMES = ("original", "originals", "reference", "base", "sft", "none", "unswapped")


@dataclass
class FigureData:
    """What one figure draws (``frame``), the numbers its sentences cite (``summary``), notes."""

    frame: pd.DataFrame
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.frame is None or self.frame.empty


# ----------------------------------------------------------------------------- basics


def run_labels(df: pd.DataFrame) -> list[str]:
    """Run labels in order of appearance (one default label when the column is absent)."""
    if RUN not in df.columns:
        return [DEFAULT_RUN]
    return list(dict.fromkeys(df[RUN].astype(str)))


def with_run(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if RUN not in df.columns:
        df[RUN] = DEFAULT_RUN
    df[RUN] = df[RUN].astype(str)
    return df


def with_depth(df: pd.DataFrame, index: str = "layer") -> pd.DataFrame:
    """Add ``rel_depth``: ``layer / L`` (hidden states) or ``(block + 0.5) / L`` (blocks).

    ``L`` comes from an ``n_blocks`` column when present, else from the table itself (largest
    hidden-state index, or largest block + 1), per run. Rows whose index is not a number (the
    embeddings or LM head in ``weights.csv``) are dropped.
    """
    df = with_run(df)
    df[index] = pd.to_numeric(df[index], errors="coerce")
    df = df[df[index].notna() & (df[index] >= 0)].copy()
    if "rel_depth" in df.columns and df["rel_depth"].notna().all():
        return df
    depth = []
    for _, g in df.groupby(RUN, sort=False):
        n = None
        if "n_blocks" in g.columns:
            nb = pd.to_numeric(g["n_blocks"], errors="coerce").dropna()
            if len(nb):
                n = float(nb.iloc[0])
        if not n:
            n = float(g[index].max()) if index == "layer" else float(g[index].max()) + 1
        n = max(n, 1.0)
        rel = g[index] / n if index == "layer" else (g[index] + 0.5) / n
        depth.append(rel)
    df["rel_depth"] = pd.concat(depth) if depth else pd.Series(dtype=float)
    return df


def numeric(df: pd.DataFrame, cols: Iterable[str]) -> pd.DataFrame:
    df = df.copy()
    for c in cols:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def clip_to_range(df: pd.DataFrame, table: str | None = None, value: str = "value",
                  cols: Sequence[str] = ("ci_low", "ci_high")) -> tuple[pd.DataFrame, list[str]]:
    """Interval ends outside the metric's range (a probability below 0, an accuracy above 1)
    are set to the bound, so no figure or sentence shows an impossible band; one note per
    metric says how many were clipped (the run's own table keeps the computed values)."""
    df = numeric(df, [value, *cols])
    notes = []
    if "metric" not in df.columns:
        return df, notes
    for metric, idx in df.groupby(df["metric"].astype(str), sort=False).groups.items():
        lo, hi = metric_spec(metric, table).bounds
        if lo is None and hi is None:
            continue
        counts = {value: 0, "ends": 0}
        for c in [value, *cols]:
            if c not in df.columns:
                continue
            v = df.loc[idx, c]
            bad = (v < lo if lo is not None else False) | (v > hi if hi is not None else False)
            counts[value if c == value else "ends"] += int(np.asarray(bad).sum())
            df.loc[idx, c] = v.clip(lower=lo, upper=hi)
        if counts[value] or counts["ends"]:
            what = " and ".join(
                t for t in (f"{counts[value]} value(s)" if counts[value] else "",
                            f"{counts['ends']} interval end(s)" if counts["ends"] else "") if t)
            rng = f"[{_b(lo)}, {_b(hi)}]"
            notes.append(f"{what} of {metric} fell outside its range {rng} and are drawn and "
                         f"reported clipped to it (the run's table keeps the computed values)")
    return df, notes


def _b(x: float | None) -> str:
    return "inf" if x is None else f"{x:g}"


# ----------------------------------------------------------------------------- chains


def chain_runs(df: pd.DataFrame) -> list[str]:
    """Runs of ``df`` that hold a checkpoint chain (a ``model`` named ``pair:A-B``)."""
    if df is None or df.empty or "model" not in df.columns:
        return []
    d = with_run(df)
    is_chain = d["model"].astype(str).str.startswith(PAIR_PREFIX)
    return list(dict.fromkeys(d.loc[is_chain, RUN]))


def first_pair(df: pd.DataFrame) -> pd.DataFrame:
    """A chain run's rows of the base and its first stage only (``base``, ``sft``, ``pair``):
    what the paper's pattern checks read. Other runs' rows are kept as they are."""
    chains = chain_runs(df)
    if not chains:
        return df
    d = with_run(df)
    keep = ~d[RUN].isin(chains) | d["model"].astype(str).isin([BASE, FIRST, PAIR])
    return df[keep.to_numpy()]


def chain_series(model: str, known: Iterable[str]) -> tuple[str, str]:
    """(series, role) of a chain table's ``model``: a stage's own rows and its pair with the
    base are the stage's series (roles ``sft`` / ``pair``), the base is ``base``, a pair of two
    stages is ``A→B`` (role ``pair``)."""
    if model == BASE:
        return BASE, BASE
    pair = split_pair_label(model, known)
    if pair is None:
        return model, FIRST
    a, b = pair
    return (b, PAIR) if a == BASE else (f"{a}\u2192{b}", PAIR)


def chain_view(df: pd.DataFrame) -> pd.DataFrame:
    """One series per chain stage: in runs of a checkpoint chain, ``run`` becomes
    ``RUN [STAGE]`` (``STAGE`` alone for a table without runs) and ``model`` the role the
    figures style by (``base``, ``sft`` for a stage's own rows, ``pair`` for its comparison
    with the base, or with the stage before for ``A→B``); ``chain_model`` and ``chain_run``
    keep the table's own ``model`` and run. Other runs are unchanged. Each stage thus gets a
    colour and a legend entry of its own, and every per-run summary is per stage."""
    chains = chain_runs(df)
    if not chains:
        return df
    d = with_run(df)
    d["model"] = d["model"].astype(str)
    d["chain_model"] = d["model"]
    d["chain_run"] = d[RUN]
    for r in chains:
        rows = d[RUN] == r
        models = list(dict.fromkeys(d.loc[rows, "model"]))
        known = {m for m in models if not is_pair_label(m)}
        known |= {m[len(PAIR_PREFIX) + len(BASE) + 1:] for m in models
                  if m.startswith(f"{PAIR_PREFIX}{BASE}-")}
        series = {m: chain_series(m, known) for m in models}
        names = {m: x if r == DEFAULT_RUN else f"{r} [{x}]" for m, (x, _) in series.items()}
        roles = {m: role for m, (_, role) in series.items()}
        d.loc[rows, RUN] = d.loc[rows, "model"].map(names)
        d.loc[rows, "model"] = d.loc[rows, "model"].map(roles)
    return d


# ----------------------------------------------------------------------------- profiles


def trend_word(boundary: float, last: float, lo: float, hi: float) -> str:
    """``falls``, ``rises`` or ``stays level``: the top value against the value at 80 % of
    depth, with a tolerance of ``TREND_TOL`` of the curve's range. A curve whose last value is
    its largest can only rise or stay level."""
    if not (np.isfinite(boundary) and np.isfinite(last)):
        return "n/a"
    tol = TREND_TOL * (hi - lo) if np.isfinite(hi - lo) else 0.0
    if last < boundary - tol:
        return "falls"
    if last > boundary + tol:
        return "rises"
    return "stays level"


PROFILE_COLUMNS = ["n", "first", "first_depth", "early_min", "early_min_depth", "early_max",
                   "early_max_depth", "early_median", "boundary", "boundary_depth", "last",
                   "last_depth", "min", "min_depth", "max", "max_depth", "top_trend",
                   "half_peak_depth", "lens_early_mean", "nan"]


def profile(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """The numbers a depth curve is described by: first, the first-80 % min/max, the value at
    80 % (``boundary``), the top (``last``), global min/max, the trend at the top, the depth
    where half the peak is first reached and the mean up to ``LENS_RISE``."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    out: dict[str, Any] = dict.fromkeys(PROFILE_COLUMNS, math.nan)
    out["nan"] = int((~keep).sum())
    x, y = x[keep], y[keep]
    out["n"] = int(len(y))
    out["top_trend"] = "n/a"
    if not len(y):
        return out
    o = np.argsort(x, kind="stable")
    x, y = x[o], y[o]
    early = x <= TOP
    out.update(first=y[0], first_depth=x[0], last=y[-1], last_depth=x[-1],
               min=y.min(), min_depth=x[int(np.argmin(y))], max=y.max(),
               max_depth=x[int(np.argmax(y))])
    if early.any():
        ye, xe = y[early], x[early]
        out.update(early_min=ye.min(), early_min_depth=xe[int(np.argmin(ye))],
                   early_max=ye.max(), early_max_depth=xe[int(np.argmax(ye))],
                   early_median=float(np.median(ye)), boundary=ye[-1], boundary_depth=xe[-1])
        if (~early).any():
            out["top_trend"] = trend_word(ye[-1], y[-1], y.min(), y.max())
    peak = y.max()
    if peak > 0:
        out["half_peak_depth"] = float(x[y >= 0.5 * peak].min())
    lens_early = y[x <= LENS_RISE]
    if len(lens_early):
        out["lens_early_mean"] = float(lens_early.mean())
    return out


def profiles(frame: pd.DataFrame, keys: Sequence[str], x: str = "rel_depth",
             y: str = "value") -> pd.DataFrame:
    """One :func:`profile` row per group of ``keys``."""
    rows = []
    if frame.empty:
        return pd.DataFrame(columns=[*keys, *PROFILE_COLUMNS])
    for k, g in frame.groupby(list(keys), sort=False):
        k = k if isinstance(k, tuple) else (k,)
        rows.append({**dict(zip(keys, k)), **profile(g[x], g[y])})
    return pd.DataFrame(rows, columns=[*keys, *PROFILE_COLUMNS])


# ----------------------------------------------------------------------------- Fig. 1-3


def pair_metric_names(metrics: pd.DataFrame) -> list[str]:
    """Every pair metric of the table, in the registry's order: Fig. 1 draws them all (the
    delta_* rows stay in the tables)."""
    df = metrics
    if "model" in df.columns:
        df = df[df["model"].astype(str) == "pair"]
    present = [m for m in dict.fromkeys(df["metric"].astype(str)) if not m.startswith("delta_")]
    return ordered(present)


def single_metric_names(metrics: pd.DataFrame) -> list[str]:
    """Every single-model metric of the table, in the registry's order: Fig. 2 draws them all,
    a registered metric included (no panel is left out)."""
    df = metrics
    if "model" in df.columns:
        df = df[df["model"].astype(str).isin(["base", "sft"])]
    present = [m for m in dict.fromkeys(df["metric"].astype(str)) if not m.startswith("delta_")]
    return ordered(present)


def pair_data(metrics: pd.DataFrame, noise: pd.DataFrame | None = None) -> FigureData:
    """Fig. 1: base-vs-SFT pair metrics by depth, one profile per run and metric;
    ``extra["noise"]``: analyze's noise floor (``noise.csv``) of those metrics."""
    names = pair_metric_names(metrics) if len(metrics) else []
    df = with_depth(chain_view(metrics), "layer") if len(metrics) else with_run(metrics)
    noise = with_depth(noise, "layer") if noise is not None and len(noise) else \
        pd.DataFrame(columns=[RUN, "layer", "metric", "value", "ci_low", "ci_high", "rel_depth"])
    if "model" in df.columns:
        df = df[df["model"].astype(str) == "pair"]
    df = df[df["metric"].astype(str).isin(names)] if names else df.iloc[0:0]
    df, notes = clip_to_range(df)
    summ = profiles(df, [RUN, "metric"])
    noise = clip_to_range(noise[noise["metric"].astype(str).isin(names)])[0]
    return FigureData(df, summ, notes + _flat_notes(summ, "metric"),
                      {"names": names, "noise": noise})


def noise_verdicts(pair: pd.DataFrame, noise: pd.DataFrame) -> pd.DataFrame:
    """Per run and metric, at the top layer: the pair's value and the base-vs-base noise band
    (``analyze``'s model ``noise``), and how many layers' pair values lie outside the band."""
    rows = []
    for (r, m), g in pair.groupby([RUN, "metric"], sort=False):
        band = noise[(noise[RUN] == r) & (noise["metric"] == m)]
        if band.empty:
            continue
        j = g.merge(band[["layer", "ci_low", "ci_high"]], on="layer", suffixes=("", "_noise"))
        outside = (j["value"] < j["ci_low_noise"]) | (j["value"] > j["ci_high_noise"])
        top = j.loc[j["layer"].idxmax()]
        rows.append({RUN: r, "metric": m, "top_layer": int(top["layer"]), "top": top["value"],
                     "band_low": top["ci_low_noise"], "band_high": top["ci_high_noise"],
                     "n_outside": int(outside.sum()), "n_layers": len(j),
                     "first_outside": int(j.loc[outside, "layer"].min()) if outside.any()
                     else None})
    return pd.DataFrame(rows)


def single_data(metrics: pd.DataFrame) -> FigureData:
    """Fig. 2: single-model metrics, base vs SFT; ``extra['gaps']`` the largest relative
    base-vs-SFT gap per metric."""
    names = single_metric_names(metrics) if len(metrics) else []
    df = with_depth(chain_view(metrics), "layer") if len(metrics) else with_run(metrics)
    if "model" in df.columns:
        df = df[df["model"].astype(str).isin(["base", "sft"])]
    df = df[df["metric"].astype(str).isin(names)] if names else df.iloc[0:0]
    df, notes = clip_to_range(df)
    summ = profiles(df, [RUN, "model", "metric"])
    gaps = []
    origin = df["chain_run"] if "chain_run" in df.columns else df[RUN]  # a chain's base
    df_metric = df["metric"].astype(str)
    is_sft = df["model"].astype(str) == "sft"
    for (r, m), g in df[is_sft].groupby([RUN, df_metric[is_sft]], sort=False):
        mine = (origin == origin[g.index[0]]) & (df_metric == m)
        b = df[mine & (df["model"].astype(str) == "base")][["layer", "rel_depth", "value"]]
        s = g[["layer", "value"]]
        j = b.merge(s, on="layer", suffixes=("_b", "_s")).dropna()
        if j.empty:
            continue
        gap = (j["value_s"] - j["value_b"]).abs() / j["value_b"].abs().clip(lower=1e-12)
        i = gap.idxmax()
        gaps.append({RUN: r, "metric": m, "gap": float(gap[i]),
                     "depth": float(j.loc[i, "rel_depth"])})
    return FigureData(df, summ, notes + _flat_notes(summ, "metric"),
                      {"names": names, "gaps": pd.DataFrame(gaps)})


def probe_kind(metric: str) -> str:
    """accuracy / agreement / loss / other, from the metric registry."""
    kind = metric_spec(metric).kind
    if kind in ("accuracy",):
        return "accuracy"
    if kind == "agreement":
        return "agreement"
    if kind in ("loss", "perplexity"):
        return "loss"
    return "other"


def is_distribution(metric: str) -> bool:
    """A probe metric of the pair's output distributions (Fig. 3b, not Fig. 3)."""
    return metric_spec(metric, "probe").kind == "distribution"


def lens_data(probe: pd.DataFrame) -> FigureData:
    """Fig. 3: logit-lens metrics by depth; one profile per run, model and metric (the pair's
    distribution metrics are Fig. 3b's)."""
    df = with_depth(chain_view(probe), "layer")
    df = df[~df["metric"].astype(str).map(is_distribution)]
    if "model" not in df.columns:
        df["model"] = "sft"
    df["model"] = df["model"].astype(str)
    df["metric"] = df["metric"].astype(str)
    df, notes = clip_to_range(df)
    summ = profiles(df, [RUN, "model", "metric"])
    flat = summ[(summ["max"] == 0) & (summ["min"] == 0)]
    for row in flat.itertuples(index=False):
        notes.append(f"{row.run}: {row.model} {row.metric} is 0 at every layer, so its curve "
                     f"lies on the x axis")
    return FigureData(df, summ, notes)


def kl_profile(g: pd.DataFrame) -> dict[str, Any]:
    """Where a pair's ``kl_pair`` leaves 0: ``zero_until`` = the last layer j such that KL is
    exactly 0 at every layer up to j (NaN when it is positive at j = 0), ``first_positive`` =
    the first layer where it is > 0, the value at the top layer and the largest value."""
    g = g.sort_values("layer")
    layers, vals = g["layer"].to_numpy(float), g["value"].to_numpy(float)
    pos = np.flatnonzero(~(vals == 0))
    first = layers[pos[0]] if len(pos) else np.nan
    zero_until = layers[pos[0] - 1] if len(pos) and pos[0] > 0 else (
        np.nan if len(pos) else layers[-1])
    k = int(np.nanargmax(vals)) if np.isfinite(vals).any() else 0
    return {"zero_until": zero_until, "first_positive": first, "top_layer": layers[-1],
            "top": vals[-1], "max": vals[k], "max_layer": layers[k]}


def distribution_data(probe: pd.DataFrame) -> FigureData:
    """Fig. 3b: a pair's KL by depth, each model's KL to its output, and the token-shift shares
    at the output. ``summary``: one :func:`kl_profile` row per run and pair; ``extra["shift"]``
    the shift shares per run and pair (with intervals)."""
    df = with_depth(chain_view(probe), "layer")
    df = df[df["metric"].astype(str).map(is_distribution)].copy()
    if df.empty:
        return FigureData(df)
    df["model"] = df["model"].astype(str)
    df, notes = clip_to_range(df, "probe")
    kl = df[df["metric"] == "kl_pair"]
    summ = pd.DataFrame([{RUN: r, "model": m, **kl_profile(g)}
                         for (r, m), g in kl.groupby([RUN, "model"], sort=False)],
                        columns=[RUN, "model", "zero_until", "first_positive", "top_layer",
                                 "top", "max", "max_layer"])
    shift = df[df["metric"].str.startswith("shift_")]
    return FigureData(df, summ, notes, extra={"shift": shift, "tuned": tuned_vs_logit(df)})


TUNED = " (tuned lens)"
EARLY = 0.5  # "early layers": hidden states j / L <= EARLY


def tuned_vs_logit(df: pd.DataFrame) -> pd.DataFrame:
    """Per run and model probed with the tuned lens: the mean ``kl_to_final`` over the early
    states (``j / L <= EARLY``, the output itself excluded) of the logit lens and of the tuned
    lens."""
    kl = df[df["metric"] == "kl_to_final"]
    rows = []
    for (r, m), g in kl.groupby([RUN, "model"], sort=False):
        if not m.endswith(TUNED):
            continue
        base = kl[(kl[RUN] == r) & (kl["model"] == m[: -len(TUNED)])]
        early = lambda x: x[(x["rel_depth"] <= EARLY) & (x["rel_depth"] < 1)]  # noqa: E731
        a, b = early(base)["value"], early(g)["value"]
        if len(a) and len(b):
            rows.append({RUN: r, "model": m[: -len(TUNED)], "logit": float(a.mean()),
                         "tuned": float(b.mean()), "n_states": len(b)})
    return pd.DataFrame(rows, columns=[RUN, "model", "logit", "tuned", "n_states"])


def _flat_notes(summ: pd.DataFrame, what: str) -> list[str]:
    out = []
    for row in summ.itertuples(index=False):
        d = row._asdict()
        if d["n"] == 0:
            out.append(f"{d[RUN]}: {d[what]} has no finite value, so its panel is empty")
        elif d["min"] == d["max"] == 0:
            out.append(f"{d[RUN]}: {d[what]} is 0 at every layer")
    return out


# ----------------------------------------------------------------------------- Fig. 4


def weight_module(weights: pd.DataFrame) -> str | None:
    """The module Fig. 4 plots: ``attn`` (all attention projections together) when present."""
    mods = list(dict.fromkeys(weights["module"].astype(str))) if len(weights) else []
    if not mods:
        return None
    return "attn" if "attn" in mods else mods[0]


def weight_metric(df: pd.DataFrame) -> str:
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    for m in ("relative", "frobenius"):
        if m in metrics:
            return m
    return metrics[0] if metrics else ""


def _sum_sq(values: pd.Series) -> float:
    """``sqrt(sum of squares)`` of the finite values; NaN when there is none."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(float)
    v = v[np.isfinite(v)]
    return float(np.sqrt(np.square(v).sum())) if len(v) else math.nan


EXPERTS_AS_ONE = ("per block, a sparse block's routed experts together as one module, "
                  "'experts'")  # the granularity of the module comparison on an MoE


def module_extremes(rows: pd.DataFrame, value: str, *, changed_only: bool) -> dict[str, Any]:
    """The module kinds that changed most and least on average over the blocks, compared
    like for like: one number per block and kind, a block's routed experts (``expert`` rows,
    one per expert) folded into one ``experts`` module (``sqrt`` of the sum of squares: the
    norm of all their parameters as one vector, as weights.csv's ``experts`` row) and the
    shared expert's gate into ``shared_expert``. ``changed_only``: a kind's mean counts only
    the blocks where it changed (> 0). Empty when fewer than two kinds; ``module_scope``
    names the granularity where routed experts are among the kinds (else ``''``)."""
    if rows.empty:
        return {}
    kind = rows["module"].astype(str).replace({EXPERT_MODULE: "experts",
                                                "shared_expert_gate": "shared_expert"})
    per_block = rows.assign(module=kind).groupby(["block", "module"])[value].agg(_sum_sq)
    if changed_only:
        per_block = per_block[per_block > 0]
    means = per_block.groupby(level="module").mean()
    if len(means) < 2:
        return {}
    return {"most_module": means.idxmax(), "most_value": float(means.max()),
            "least_module": means.idxmin(), "least_value": float(means.min()),
            "module_scope": EXPERTS_AS_ONE if "experts" in means.index else ""}


def weight_data(weights: pd.DataFrame) -> FigureData:
    """Fig. 4: weight change per block; ``summary`` per run: the bottom / middle / top means
    (``rules.edge_means``, as the J rule uses them) and the block of the largest change."""
    df = with_depth(chain_view(weights), "block")
    df = numeric(df, ["value"])
    df = df[df["module"].astype(str) != EXPERT_MODULE]  # one row per expert: the MoE figure
    module = weight_module(df)
    main = df[df["module"].astype(str) == module] if module else df.iloc[0:0]
    metric = weight_metric(main) if len(main) else ""
    rows, notes = [], []
    for r, g in main[main["metric"].astype(str) == metric].groupby(RUN, sort=False):
        g = g.dropna(subset=["value"]).sort_values("rel_depth")
        if g.empty:
            continue
        e = edge_means(g["value"].to_numpy(float))
        top = g.loc[g["value"].idxmax()]
        row = {RUN: r, "module": module, "metric": metric, "bottom": e.bottom,
               "middle": e.middle, "top": e.top, "ratio": e.ratio, "n_edge": e.n_edge,
               "n_blocks": e.n, "max_block": int(top["block"]), "max_depth": top["rel_depth"],
               "max": float(top["value"]), "most_module": None, "most_value": math.nan,
               "least_module": None, "least_value": math.nan}
        per_mod = df[(df[RUN] == r) & (df["metric"].astype(str) == metric)
                     & ~df["module"].astype(str).isin(AGGREGATE_MODULES)]
        row.update(module_extremes(per_mod, "value", changed_only=False))
        if (g["value"] == 0).all():
            notes.append(f"{r}: every block's {module} {metric} change is 0, so the curve lies "
                         "on the x axis (are the two checkpoints the same?)")
        rows.append(row)
    blockless = numeric(with_run(chain_view(weights)), ["block"])
    blockless = blockless[blockless["block"].isna()]
    return FigureData(main, pd.DataFrame(rows), notes,
                      {"module": module, "metric": metric, "all": df, "blockless": blockless})


# ----------------------------------------------------------------------------- Fig. 5


def correlation_data(corr: pd.DataFrame) -> FigureData:
    """Fig. 5: the correlation table; ``summary`` the three strongest pairs per run and model
    (a metric against its own variant, e.g. effective_rank ~ _norm, left out)."""
    df = with_run(corr)
    if "model" not in df.columns:
        df["model"] = "all"
    df["model"] = df["model"].astype(str)
    df = numeric(df, ["r"])
    notes = []
    for r in chain_runs(df):
        n = df[df[RUN] == r]["model"].nunique()
        if n > 6:
            notes.append(f"{r}: Fig. 5 draws the first 6 of its {n} models (base, sft, pair "
                         f"and the further stages first); every model is in the table")
    rows = []
    for (r, m), g in df.groupby([RUN, "model"], sort=False):
        a_, b_ = g["metric_a"].astype(str), g["metric_b"].astype(str)
        related = [x.startswith(y) or y.startswith(x) for x, y in zip(a_, b_)]
        g = g[~np.array(related, dtype=bool)].dropna(subset=["r"])
        if g.empty:
            continue
        key = [tuple(sorted((str(a), str(b)))) for a, b in zip(g["metric_a"], g["metric_b"])]
        g = g.assign(key=key).drop_duplicates("key")
        g = g.reindex(g["r"].abs().sort_values(ascending=False).index).head(3)
        for a, b, v in zip(g["metric_a"], g["metric_b"], g["r"]):
            rows.append({RUN: r, "model": m, "metric_a": a, "metric_b": b, "r": float(v)})
    return FigureData(df, pd.DataFrame(rows), notes)


# ----------------------------------------------------------------------------- masks


def infer_k(values: Iterable[object]) -> int | None:
    """The number of segments of a mask column (the longest 0/1 text), to repair masks that a
    reader turned into numbers."""
    lengths = [len(mask_from_text(v)) for v in values if is_mask(mask_from_text(v))]
    return max(lengths) if lengths else None


def plain_masks(df: pd.DataFrame, col: str = "mask") -> pd.DataFrame:
    df = df.copy()
    if col in df.columns:
        k = infer_k(df[col])
        df[col] = df[col].map(lambda v: mask_from_text(v, k)).astype(object)
    return df


def single_position(mask: str) -> float | None:
    """Relative depth of the centre of a one-segment mask, else None."""
    if is_mask(mask) and mask.count("1") == 1:
        return (mask.index("1") + 0.5) / len(mask)
    return None


def primary_metric(metrics: Iterable[str]) -> str | None:
    """A task's own primary metric when one is there (``sftscope.tasks``), else the first
    accuracy-like score (by the registry), else the first metric."""
    ms = list(dict.fromkeys(str(m) for m in metrics))
    chosen = primary_metric_of(ms)
    if chosen is not None:
        return chosen
    for m in ms:
        if metric_spec(m).kind == "accuracy":
            return m
    return ms[0] if ms else None


def score(metric: str, values: np.ndarray | float) -> np.ndarray:
    """Higher is better after this (loss-like metrics are negated)."""
    v = np.asarray(values, float)
    return -v if lower_is_better(metric) else v


# ----------------------------------------------------------------------------- Fig. 6


def swap_is_original(config: object, direction: object, mask: object) -> bool:
    """Rows that describe an unswapped model (the reference lines of Fig. 6).

    Any of: ``config`` names a model or says ``original``; ``direction`` is empty, ``none`` or
    ``original``; the mask is empty or all zeros (nothing swapped).
    """
    c = "" if pd.isna(config) else str(config).strip().lower()
    d = "" if pd.isna(direction) else str(direction).strip().lower()
    m = mask_from_text(mask)
    if c in ORIGINAL_NAMES or c.startswith("original"):
        return True
    if d in ("", "none", "original", "nan"):
        return True
    return not m or (is_mask(m) and "1" not in m)


def swap_host(direction: object) -> str | None:
    """The model receiving the blocks: ``sft-into-base`` -> base, ``sft->base`` -> base."""
    d = "" if pd.isna(direction) else str(direction).strip().lower()
    m = re.search(r"into[-_ ]?(base|sft)", d)
    if m:
        return m.group(1)
    if "->" in d:
        return d.split("->")[-1].strip() or None
    if "<-" in d:
        return d.split("<-")[0].strip() or None
    return None


def head_text(h: object) -> str:
    return "" if pd.isna(h) or str(h) in ("", "nan") else str(h)


def swap_original_name(row: pd.Series) -> str:
    """A short name for a reference row: ``base``, ``sft``, or the host with the other head
    when no block is swapped (``base + sft head``)."""
    c = "" if pd.isna(row.get("config")) else str(row.get("config")).strip()
    if c.lower() in ("base", "sft"):
        return c.lower()
    d = "" if pd.isna(row.get("direction")) else str(row.get("direction")).strip()
    host = swap_host(d)
    if host and d.lower() not in ("none", "original"):
        head = head_text(row.get("head"))
        return f"{host} + {head} head" if head and head != host else host
    for name in (c, d):
        low = name.lower()
        if "base" in low and "sft" not in low:
            return "base"
        if "sft" in low and "base" not in low:
            return "sft"
    return c or d or "original"


def is_mix(direction: object) -> bool:
    """Rows of an interpolated model (``swap --alphas``), not a swap."""
    return str(direction).strip().lower() == MIX


def split_swap(swap: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(swapped rows, original rows) of a swap table, masks as plain strings; interpolated
    rows (direction ``interpolate``) are in neither (``interp_data``)."""
    df = with_run(swap)
    for col in ("config", "direction", "head"):
        if col not in df.columns:
            df[col] = ""
    df = df[~df["direction"].map(is_mix)]
    if "mask" in df.columns:
        df = plain_masks(df)
    else:
        df["mask"] = ""
    orig = [swap_is_original(c, d, m) for c, d, m in zip(df["config"], df["direction"],
                                                          df["mask"])]
    orig = pd.Series(orig, index=df.index)
    return df[~orig].copy(), df[orig].copy()


def swap_panels(swapped: pd.DataFrame) -> list[tuple[str, str]]:
    """(metric, head) panels of Fig. 6 (head '' when the table has one head)."""
    metrics = list(dict.fromkeys(swapped["metric"].astype(str)))
    heads = list(dict.fromkeys(head_text(h) for h in swapped["head"]))
    if len(heads) <= 1:
        return [(m, heads[0] if heads else "") for m in metrics][:6]
    return [(m, h) for m in metrics for h in heads][:6]


def swap_singles(swapped: pd.DataFrame) -> dict[tuple[str, str, str, str], pd.DataFrame]:
    """(run, direction, head, metric) -> one-segment swaps of the primary metric with their
    segment index ``seg``, for the most common K."""
    out: dict[tuple[str, str, str, str], pd.DataFrame] = {}
    if swapped.empty:
        return out
    metric = primary_metric(swapped["metric"])
    sub = swapped[swapped["metric"].astype(str) == metric].copy()
    sub["pos"] = sub["mask"].map(single_position)
    sub = sub[sub["pos"].notna()]
    sub["value"] = pd.to_numeric(sub["value"], errors="coerce")
    keys = [sub[RUN], sub["direction"].astype(str), sub["head"].map(head_text)]
    for (r, d, h), g in sub.groupby(keys, sort=False):
        k = g["mask"].str.len().mode().iloc[0]
        g = g[g["mask"].str.len() == k].sort_values("pos")
        g = g.assign(seg=g["mask"].map(lambda m: m.index("1")))
        out[(str(r), d, h, str(metric))] = g
    return out


# swap.csv metric -> (swap_items.csv column, per token?): accuracy and loss are token ratios
# (per-item sums over its tokens), the choice accuracy one 0/1 per item; perplexity is
# compared on its loss (exp is monotone)
SWAP_ITEM_COLUMNS = {"accuracy": ("correct", True), "loss": ("loss", True),
                     "perplexity": ("loss", True), "choice_accuracy": ("choice_correct", False)}


def swap_paired(items: pd.DataFrame | None, run: str, config_a: str, config_b: str,
                metric: str) -> PairedDiff | None:
    """Paired difference ``a - b`` of two evaluated models of one swap run on the same items
    (``swap_items.csv``): per-token metrics as the difference of their token ratios (each
    item weighted by its tokens), the choice accuracy by Newcombe's paired interval. None
    when the run has no per-item scores for both (an older run) or the metric has none."""
    col = SWAP_ITEM_COLUMNS.get(str(metric))
    if items is None or items.empty or col is None or col[0] not in items.columns:
        return None
    it = with_run(items)
    it = it[it[RUN] == str(run)]
    a = it[it["config"].astype(str) == str(config_a)]
    b = it[it["config"].astype(str) == str(config_b)]
    if a.empty or b.empty:
        return None
    m = a.merge(b, on="item", suffixes=("_a", "_b"))
    num = pd.to_numeric
    if col[1]:
        w = num(m["tokens_a"], errors="coerce").to_numpy(float)
        with np.errstate(all="ignore"):
            va = num(m[f"{col[0]}_a"], errors="coerce").to_numpy(float) / w
            vb = num(m[f"{col[0]}_b"], errors="coerce").to_numpy(float) / w
        return paired_difference(va, vb, kind="mean", weights=np.where(w > 0, w, np.nan))
    va = num(m[f"{col[0]}_a"], errors="coerce").to_numpy(float)
    vb = num(m[f"{col[0]}_b"], errors="coerce").to_numpy(float)
    return paired_difference(va, vb, kind="binary")


def paired_text(d: PairedDiff | None, metric: str) -> str:
    """``paired difference +0.031 [0.012, 0.050] over n = 200 items`` (the loss for a
    perplexity, which is compared on its loss); empty without a paired test."""
    if d is None or not np.isfinite(d.mean):
        return ""
    on = " (on the loss)" if str(metric) == "perplexity" else ""
    ci = f" [{d.low:+.4g}, {d.high:+.4g}]" if np.isfinite(d.low) else " (no interval)"
    return f"paired difference{on} {d.mean:+.4g}{ci} over n = {d.n} items"


def swap_data(swap: pd.DataFrame, items: pd.DataFrame | None = None) -> FigureData:
    """Fig. 6: swapped and original rows; ``summary`` per run / direction / head: the best and
    worst one-segment swap of the primary metric and the host's unswapped value, and, with the
    run's per-item scores (``items``, swap_items.csv), the paired test of best against worst
    (``paired``: best - worst on the same items)."""
    df, notes = clip_to_range(with_run(swap))
    swapped, orig = split_swap(df)
    rows = []
    for (r, d, h, metric), g in swap_singles(swapped).items():
        if g.empty:
            continue
        sc = score(metric, g["value"].to_numpy())
        best, worst = g.iloc[int(np.nanargmax(sc))], g.iloc[int(np.nanargmin(sc))]
        lo = pd.to_numeric(g.get("ci_low", pd.Series(np.nan, index=g.index)), errors="coerce")
        hi = pd.to_numeric(g.get("ci_high", pd.Series(np.nan, index=g.index)), errors="coerce")
        b, w = g.index.get_loc(best.name), g.index.get_loc(worst.name)
        overlap = bool(np.isfinite(lo.iloc[b]) and np.isfinite(hi.iloc[w])
                       and max(lo.iloc[b], lo.iloc[w]) <= min(hi.iloc[b], hi.iloc[w]))
        host = swap_host(d)
        o = orig[(orig[RUN] == r) & (orig["metric"].astype(str) == metric)
                 & (orig["config"].astype(str) == str(host))]
        ref = float(pd.to_numeric(o["value"], errors="coerce").iloc[0]) if len(o) else math.nan
        rows.append({RUN: r, "direction": d, "head": h, "metric": metric,
                     "k": len(best["mask"]), "same": bool(np.nanmax(sc) == np.nanmin(sc)),
                     "best_seg": int(best["seg"]), "best_mask": best["mask"],
                     "best": float(best["value"]), "worst_seg": int(worst["seg"]),
                     "worst_mask": worst["mask"], "worst": float(worst["value"]),
                     "n_best": int(np.sum(sc == np.nanmax(sc))),
                     "n_worst": int(np.sum(sc == np.nanmin(sc))), "overlap": overlap,
                     "host": host, "host_value": ref,
                     "paired": swap_paired(items, r, best["config"], worst["config"], metric)})
    return FigureData(pd.concat([swapped, orig]), pd.DataFrame(rows), notes,
                      {"swapped": swapped, "orig": orig})


# ----------------------------------------------------------------------------- Fig. 6b


def interp_data(swap: pd.DataFrame) -> FigureData:
    """Fig. 6b: score against alpha for each interpolated mask (``swap --alphas``): the base
    with the mask's blocks ``(1 - alpha) base + alpha SFT``. Where alpha 0 or 1 was not
    scored as a mix, the swap table's own rows stand in (``source``): alpha 0 is the base (or
    the head-only hybrid with the SFT head), alpha 1 the sft-into-base swap of that mask.
    ``summary`` per run, head, mask and metric: the value at 0 and 1 and the best alpha (by
    the metric's better direction)."""
    df = plain_masks(numeric(with_run(swap), ["value", "ci_low", "ci_high", "n", "alpha"]))
    if "direction" not in df.columns or "alpha" not in df.columns:
        return FigureData(df.iloc[0:0])
    df, notes = clip_to_range(df)
    df["head"] = df["head"].map(head_text) if "head" in df.columns else ""
    mix = df[df["direction"].map(is_mix)].copy()
    if mix.empty:
        return FigureData(mix)
    mix["source"] = "mix"
    ends = []
    for (r, h, mask), g in mix.groupby([RUN, "head", "mask"], sort=False):
        have = set(g["alpha"])
        none = "0" * len(mask)
        run = df[(df[RUN] == r) & ~df["direction"].map(is_mix)]
        if 0.0 not in have:
            zero = (run[run["config"].astype(str) == "base"] if h in ("", "base") else
                    run[(run["direction"] == "sft-into-base") & (run["mask"] == none)])
            ends.append(zero.assign(alpha=0.0, mask=mask, head=h, source="base"))
        if 1.0 not in have:
            one = run[(run["direction"] == "sft-into-base") & (run["mask"] == mask)
                      & (run["head"] == h)]
            ends.append(one.assign(alpha=1.0, source="swap"))
    frame = pd.concat([mix, *ends], ignore_index=True).sort_values(
        [RUN, "head", "mask", "metric", "alpha"], kind="stable",
        key=lambda c: c.map(mask_sort_key) if c.name == "mask" else c).reset_index(drop=True)
    rows = []
    for (r, h, mask, metric), g in frame.groupby([RUN, "head", "mask", "metric"], sort=False):
        g = g.dropna(subset=["value"]).sort_values("alpha")
        if g.empty:
            continue
        sc = score(str(metric), g["value"].to_numpy(float))
        best = g.iloc[int(np.nanargmax(sc))]
        at = dict(zip(g["alpha"], g["value"]))
        rows.append({RUN: r, "head": h, "mask": mask, "metric": str(metric),
                     "n_alphas": len(g), "at0": at.get(0.0, math.nan),
                     "at1": at.get(1.0, math.nan), "best_alpha": float(best["alpha"]),
                     "best": float(best["value"]),
                     "same": bool(np.nanmax(sc) == np.nanmin(sc))})
    return FigureData(frame, pd.DataFrame(rows), notes)


# ----------------------------------------------------------------------------- Fig. 7


def _seed_count(v: object) -> float:
    """``seeds`` is a count (sweep) or a list such as ``0;1;2``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return math.nan
    s = str(v).strip()
    try:
        return float(int(float(s)))
    except ValueError:
        parts = [p for p in re.split(r"[;, ]+", s) if p]
        return float(len(parts)) if parts else math.nan


def sweep_metrics(df: pd.DataFrame, limit: int = 3) -> list[str]:
    """Metrics of a sweep, the sweep's primary metric (run.json) first."""
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    if "primary_metric" in df.columns:
        first = [m for m in dict.fromkeys(df["primary_metric"].dropna().astype(str))
                 if m in metrics]
        metrics = first + [m for m in metrics if m not in first]
    return metrics[:limit]


def sweep_primary(df: pd.DataFrame) -> str | None:
    """The sweep's own primary metric (run.json) if present, else the first accuracy."""
    metric = primary_metric(df["metric"].astype(str))
    if "primary_metric" in df.columns:
        chosen = df["primary_metric"].dropna().astype(str)
        if len(chosen) and chosen.iloc[0] in set(df["metric"].astype(str)):
            metric = chosen.iloc[0]
    return metric


def sweep_data(summary: pd.DataFrame) -> FigureData:
    """Fig. 7: the sweep summary (masks plain, sorted by ``segments.mask_sort_key``);
    ``summary`` per run and metric: best and worst mask, full depth, how many masks beat it,
    the p-value of the best, seeds and items, and whether every score is 0 or the same."""
    df = plain_masks(with_run(summary))
    if "metric" not in df.columns:
        df["metric"] = "score"
    df["metric"] = df["metric"].astype(str)
    df, notes = clip_to_range(df, value="mean")
    df["n_seeds"] = df["seeds"].map(_seed_count) if "seeds" in df.columns else math.nan
    order = sorted(range(len(df)), key=lambda i: (mask_sort_key(df["mask"].iloc[i]),))
    df = df.iloc[order].reset_index(drop=True)
    rows = []
    for (r, metric), g in df.groupby([RUN, "metric"], sort=False):
        g = g.drop_duplicates("mask")
        means = dict(zip(g["mask"], pd.to_numeric(g["mean"], errors="coerce")))
        means = {m: float(v) for m, v in means.items() if np.isfinite(v)}
        if not means:
            continue
        sc = {m: float(score(metric, v)) for m, v in means.items()}
        best, worst = max(sc, key=sc.get), min(sc, key=sc.get)
        rest = [m for m in sc if m != best]
        second = max(rest, key=sc.get) if rest else None
        by_mask = g.set_index("mask")
        full = next((m for m in means if is_mask(m) and set(m) == {"1"}), None)
        beat = [m for m in means if full and sc[m] > sc[full]]
        pv = dict(zip(g["mask"], pd.to_numeric(g.get("p_value", pd.Series(dtype=float)),
                                               errors="coerce")))
        seeds = pd.to_numeric(g["n_seeds"], errors="coerce").min()
        items = (pd.to_numeric(g["n_items"], errors="coerce").min()
                 if "n_items" in g.columns else math.nan)
        vals = np.array(list(means.values()))
        rows.append({RUN: r, "metric": metric, "primary": metric == sweep_primary(
            df[df[RUN] == r]), "best": best, "best_mean": means[best],
            "best_p": pv.get(best, math.nan), "worst": worst, "worst_mean": means[worst],
            "n_best": sum(v == sc[best] for v in sc.values()), "second": second,
            "best_overlaps": bool(second is not None and _overlap(by_mask.loc[best],
                                                                  by_mask.loc[second])),
            "n_worst": sum(v == sc[worst] for v in sc.values()),
            "full": full, "full_mean": means.get(full, math.nan) if full else math.nan,
            "n_beat": len(beat), "n_masks": len(means), "seeds": seeds, "items": items,
            "all_zero": bool(np.all(vals == 0)), "all_same": bool(np.all(vals == vals[0]))})
    summ = pd.DataFrame(rows)
    for row in summ.itertuples(index=False):
        size = _size_text(row.items, row.seeds)
        if row.all_zero:
            notes.append(f"{row.run}: every mask scores 0 on {row.metric}{size}, so its bars "
                         "have no height: nothing to compare (too few items or steps to learn "
                         "the task?)")
        elif row.all_same:
            notes.append(f"{row.run}: every mask scores the same on {row.metric}{size}")
        elif np.isfinite(row.seeds) and row.seeds < 2:
            notes.append(f"{row.run}: one seed per mask: the intervals do not include training "
                         "randomness")
    return FigureData(df, summ, list(dict.fromkeys(notes)))


def _size_text(items: float, seeds: float) -> str:
    parts = []
    if np.isfinite(items):
        parts.append(f"{int(items)} items")
    if np.isfinite(seeds):
        parts.append(f"{int(seeds)} seed{'s' if seeds != 1 else ''}")
    return f" ({', '.join(parts)})" if parts else ""


def mask_table(df: pd.DataFrame) -> pd.DataFrame:
    """The sweep table as the report writes it: a ``segment_centre`` column after the mask."""
    t = df.drop(columns=["n_blocks", "primary_metric", "n_seeds"], errors="ignore").copy()
    t.insert(t.columns.get_loc("mask") + 1, "segment_centre", t["mask"].map(mask_centre))
    return t


# ----------------------------------------------------------------------------- suggest, tune


def suggest_data(runs: Sequence[Any]) -> FigureData:
    """Fig. 8: per-segment scores of each suggest method (the ``score`` signal, higher = a
    better segment to tune), the proposed masks and the printed reason (suggest.json)."""
    frames, rows = [], []
    for r in runs:
        t = r.tables.get("suggest")
        rec = r.extra.get("suggest") or {}
        if t is not None and len(t):
            t = numeric(t.copy(), ["segment", "first_block", "last_block", "depth", "value",
                                   "score"])
            t.insert(0, RUN, r.label)
            frames.append(t)
        if not rec and t is None:
            continue
        proposals = rec.get("proposals") or {}
        for method, p in proposals.items():
            rows.append({RUN: r.label, "method": method, "mask": mask_from_text(p.get("mask")),
                         "chosen": method == rec.get("method"),
                         "reason": p.get("reason", "")})
        if not proposals and rec.get("mask"):
            rows.append({RUN: r.label, "method": rec.get("method", ""),
                         "mask": mask_from_text(rec["mask"]), "chosen": True,
                         "reason": rec.get("reason", "")})
        if rec.get("reason"):
            rows.append({RUN: r.label, "method": "(chosen)", "mask": mask_from_text(
                rec.get("mask")), "chosen": True, "reason": rec["reason"]})
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    notes = []
    if len(frame):
        sc = frame[frame["signal"].astype(str) == "score"]
        for (r, m), g in sc.groupby([RUN, "method"], sort=False):
            if (g["score"].fillna(0) == 0).all():
                notes.append(f"{r}: method {m} scores 0 on every segment (a flat signal), so "
                             "its proposal is the fallback segment")
    return FigureData(frame, pd.DataFrame(rows), notes)


VALIDATION_NUMBERS = ("rank", "prior_rank", "random_rank", "random_as_good", "n_interior",
                      "n_masks", "score", "best_score", "spearman_singles")


def validation_data(val: pd.DataFrame) -> pd.DataFrame:
    """``sweep --validate-suggest`` rows (suggest_validation.csv) with numeric ranks and each
    proposal's rank beside its baselines: ``vs_prior`` = rank - prior_rank and ``vs_random`` =
    rank - random_rank (negative = better than the baseline; NaN where a rank is missing, as
    in tables written before the baselines existed)."""
    if val is None or val.empty:
        return pd.DataFrame()
    df = numeric(val.copy(), VALIDATION_NUMBERS)
    for col in ("prior_mask", "prior_rank", "random_rank", "random_as_good"):
        if col not in df.columns:
            df[col] = np.nan
    df["vs_prior"] = df["rank"] - df["prior_rank"]
    df["vs_random"] = df["rank"] - df["random_rank"]
    return df


def tune_data(runs: Sequence[Any]) -> FigureData:
    """Fig. 9: training loss of each tune run; ``summary`` one row per run: mask, rank,
    trainable parameters and their share of the full-depth budget, steps, first/last loss."""
    curves, rows = [], []
    for r in runs:
        info = r.tables.get("tune")
        curve = r.tables.get("loss_curve")
        if info is None and curve is None:
            continue
        row = {RUN: r.label}
        if info is not None and len(info):
            row.update(info.iloc[0].to_dict())
        if curve is not None and len(curve):
            c = numeric(curve.copy(), ["step", "loss"]).dropna(subset=["loss"])
            c.insert(0, RUN, r.label)
            curves.append(c)
            row.update(first_loss=float(c["loss"].iloc[0]), last_loss=float(c["loss"].iloc[-1]),
                       logged=len(c), source=str(c["source"].iloc[0]) if "source" in c else "")
        rows.append(row)
    frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=[RUN, "step", "loss"])
    notes = []
    summ = pd.DataFrame(rows)
    for row in rows:
        if "logged" not in row:
            notes.append(f"{row[RUN]}: no loss was logged (fewer steps than logging_steps?), "
                         "so it has no curve")
        elif row.get("logged") == 1:
            notes.append(f"{row[RUN]}: one logged loss only: a point, not a curve")
    return FigureData(frame, summ, notes)


# eval's metric -> its per-item column in predictions-<task>.jsonl where the names differ
# (a perplexity is compared on its loss: exp is monotone)
EVAL_ITEM_COLUMNS = {"accuracy": "correct", "accuracy_norm": "correct_norm",
                     "loss": "loss_after", "ppl": "loss_after", "ppl_before": "loss_before",
                     "ppl_after": "loss_after"}


def eval_paired(predictions: pd.DataFrame | None, task: str, metric: str, run_a: str,
                run_b: str) -> PairedDiff | None:
    """Paired difference ``a - b`` of two eval runs' per-item results on the items both
    scored (same task, matched by item identity, not by position only); None where either run
    has no per-item column for the metric or they share no item."""
    if predictions is None or predictions.empty:
        return None
    col = metric if metric in predictions.columns else EVAL_ITEM_COLUMNS.get(metric)
    if col is None or col not in predictions.columns:
        return None
    p = with_run(predictions)
    p = p[p["task"].astype(str) == str(task)]
    a, b = (p[p[RUN] == r][["item", col]].dropna() for r in (run_a, run_b))
    m = a.merge(b, on="item", suffixes=("_a", "_b"))
    if m.empty:
        return None
    return paired_difference(m[f"{col}_a"].to_numpy(float), m[f"{col}_b"].to_numpy(float))


def _interval(row: pd.Series) -> tuple[float, float]:
    lo, hi = (pd.to_numeric(row.get(c), errors="coerce") for c in ("ci_low", "ci_high"))
    return float(lo), float(hi)


def eval_comparisons(df: pd.DataFrame, predictions: pd.DataFrame | None) -> pd.DataFrame:
    """Per task, its primary metric compared across the runs that scored it: the best run
    against each other one, by the paired test on shared items (``paired``) where both runs
    wrote per-item predictions, else by their intervals (``overlap``: True when they overlap
    or one is missing, so no winner can be named)."""
    rows = []
    for task, g in df.groupby(df["task"].astype(str), sort=False):
        metric = primary_metric(g["metric"])
        g = g[g["metric"].astype(str) == str(metric)].drop_duplicates(RUN)
        if g[RUN].nunique() < 2:
            continue
        sc = score(str(metric), pd.to_numeric(g["value"], errors="coerce").to_numpy())
        if np.isnan(sc).all():
            continue
        g = g.iloc[np.argsort(-np.nan_to_num(sc, nan=-np.inf), kind="stable")]
        best = g.iloc[0]
        for _, other in g.iloc[1:].iterrows():
            (alo, ahi), (blo, bhi) = _interval(best), _interval(other)
            ok = all(np.isfinite([alo, ahi, blo, bhi]))
            rows.append({"task": task, "metric": metric, "a": best[RUN], "b": other[RUN],
                         "value_a": float(best["value"]), "value_b": float(other["value"]),
                         "n_a": best.get("n"), "n_b": other.get("n"),
                         "overlap": not ok or max(alo, blo) <= min(ahi, bhi),
                         "paired": eval_paired(predictions, task, str(metric), best[RUN],
                                               other[RUN])})
    return pd.DataFrame(rows)


def scores_data(scores: pd.DataFrame, predictions: pd.DataFrame | None = None) -> FigureData:
    """Evaluation scores with intervals clipped to each metric's range; ``summary``: the
    comparisons of runs that scored the same task (``eval_comparisons``)."""
    df, notes = clip_to_range(with_run(scores))
    return FigureData(df, eval_comparisons(df, predictions), notes)


# ----------------------------------------------------------------------------- dynamics


def dynamics_blocks(dynamics: pd.DataFrame) -> pd.DataFrame:
    """Block totals of ``dynamics.csv`` per run and step: the modules' norms combined
    (``sqrt`` of the sum of squares, the Frobenius norm of all of a block's recorded weights);
    ``grad_norm`` NaN where no module of the block has a gradient (not trained)."""
    df = numeric(with_run(dynamics), ["step", "block", "grad_norm", "update_norm", "n_blocks"])
    df = df.dropna(subset=["step", "block"])
    rows = []
    for (r, step, block), g in df.groupby([RUN, "step", "block"], sort=True):
        nb = pd.to_numeric(g["n_blocks"], errors="coerce").dropna() if "n_blocks" in g else []
        rows.append({RUN: r, "n_blocks": float(nb.iloc[0]) if len(nb) else math.nan,
                     "step": int(step), "block": int(block),
                     "grad_norm": _sum_sq(g["grad_norm"]),
                     "update_norm": _sum_sq(g["update_norm"])})
    out = pd.DataFrame(rows, columns=[RUN, "n_blocks", "step", "block", "grad_norm",
                                      "update_norm"])
    if out.empty:
        return out
    if out["n_blocks"].isna().all():
        out = out.drop(columns=["n_blocks"])
    return with_depth(out, "block")


def dynamics_data(dynamics: pd.DataFrame, weights: pd.DataFrame | None = None) -> FigureData:
    """Fig. 10: training dynamics by depth, the paper's Fig. 4 made its way (the update of
    each block while fine-tuning). ``frame``: block totals at each run's last recorded step;
    ``extra['steps']``: block totals at every recorded step (the gradient heatmap);
    ``extra['grad']``: each block's gradient norm averaged over the recorded steps;
    ``extra['weights']``: Fig. 4's numbers when a weights run is in the report (base-vs-SFT
    change beside the update); ``summary`` per run: where the update is largest, the
    bottom / middle / top means over the trained blocks, the gradient at the top trained block
    against the lowest, the module that changed most."""
    steps = dynamics_blocks(dynamics)
    notes: list[str] = []
    if steps.empty:
        return FigureData(steps, pd.DataFrame(), notes, {"steps": steps})
    last = steps.groupby(RUN, sort=False)["step"].transform("max")
    frame = steps[steps["step"] == last].reset_index(drop=True)
    grad = (steps.groupby([RUN, "block"], sort=False)
            .agg(grad_norm=("grad_norm", "mean"), rel_depth=("rel_depth", "first"))
            .reset_index())
    mods = numeric(with_run(dynamics), ["step", "block", "update_norm"])
    rows = []
    for r, g in frame.groupby(RUN, sort=False):
        g = g.sort_values("block")
        trained = g[g["update_norm"] > 0]
        n_steps = int(steps[steps[RUN] == r]["step"].nunique())
        row: dict[str, Any] = {RUN: r, "last_step": int(g["step"].iloc[0]),
                               "n_steps": n_steps, "n_blocks": len(g),
                               "n_trained": len(trained)}
        if trained.empty:
            notes.append(f"{r}: no block's weights changed by step {row['last_step']}, so the "
                         "update curve lies on the x axis")
            rows.append(row)
            continue
        top = trained.loc[trained["update_norm"].idxmax()]
        e = edge_means(trained["update_norm"].to_numpy(float))
        gr = grad[(grad[RUN] == r) & grad["block"].isin(trained["block"])].sort_values("block")
        gr = gr[np.isfinite(gr["grad_norm"])]
        row.update(first_trained=int(trained["block"].min()),
                   last_trained=int(trained["block"].max()), max_block=int(top["block"]),
                   max_depth=float(top["rel_depth"]), max=float(top["update_norm"]),
                   bottom=e.bottom, middle=e.middle, top=e.top, n_edge=e.n_edge,
                   grad_low=float(gr["grad_norm"].iloc[0]) if len(gr) else math.nan,
                   grad_high=float(gr["grad_norm"].iloc[-1]) if len(gr) else math.nan)
        row["grad_ratio"] = (row["grad_high"] / row["grad_low"]
                             if np.isfinite(row["grad_low"]) and row["grad_low"] > 0
                             else math.nan)
        m = mods[(mods[RUN] == r) & (mods["step"] == row["last_step"])]
        row.update(module_extremes(m, "update_norm", changed_only=True))
        if n_steps == 1:
            notes.append(f"{r}: one recorded step only (step {row['last_step']}): the gradient "
                         "heatmap is a single row; record more with --dynamics-every")
        rows.append(row)
    extra: dict[str, Any] = {"steps": steps, "grad": grad, "weights": None}
    if weights is not None and len(weights):
        w = weight_data(weights)
        extra["weights"] = None if w.empty else w
    return FigureData(frame, pd.DataFrame(rows), notes, extra)


# ----------------------------------------------------------------------------- seeds


def seed_data(seed_scores: pd.DataFrame, primary: dict[str, str] | None = None) -> FigureData:
    """Fig. 7c: each seed's score per mask (the sweep's jobs), for the masks with at least two
    seeds, in the sweep's primary metric. ``summary`` per run and mask: seeds, mean, standard
    deviation, min, max; ``extra['runs']`` per run: the best mask by mean and in how many of
    the seeds it is also the best, the most seed-sensitive mask, the median spread, and the
    gap between the best mask and full depth against the spread."""
    df = plain_masks(numeric(with_run(seed_scores), ["seed", "value"]))
    df["metric"] = df["metric"].astype(str)
    primary = primary or {}
    keep = []
    for r, g in df.groupby(RUN, sort=False):
        metric = primary.get(r)
        if metric not in set(g["metric"]):
            metric = primary_metric(g["metric"])
        keep.append(g[g["metric"] == metric])
    df = pd.concat(keep, ignore_index=True) if keep else df.iloc[0:0]
    counts = df.groupby([RUN, "mask"])["seed"].transform("nunique")
    df = df[counts >= 2].copy()
    if df.empty:
        return FigureData(df)
    order = sorted(dict.fromkeys(df["mask"]), key=mask_sort_key)
    rows, runs = [], []
    for r, g in df.groupby(RUN, sort=False):
        metric = str(g["metric"].iloc[0])
        stats = {}
        for mask in [m for m in order if m in set(g["mask"])]:
            v = g[g["mask"] == mask]["value"].to_numpy(float)
            stats[mask] = {RUN: r, "metric": metric, "mask": mask, "seeds": len(v),
                           "mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)),
                           "min": float(np.nanmin(v)), "max": float(np.nanmax(v))}
        rows += list(stats.values())
        sc = {m: float(score(metric, s["mean"])) for m, s in stats.items()}
        best = max(sc, key=sc.get)
        wide = g.pivot_table(index="seed", columns="mask", values="value", aggfunc="mean")
        wide = wide.dropna()  # seeds every mask has
        n_common = len(wide)
        best_in = 0
        if n_common and best in wide.columns:
            oriented = pd.DataFrame(score(metric, wide.to_numpy(float)), index=wide.index,
                                    columns=wide.columns)
            best_in = int((oriented.idxmax(axis=1) == best).sum())
        sds = {m: s["sd"] for m, s in stats.items()}
        vol = max(sds, key=sds.get)
        full = next((m for m in stats if is_mask(m) and set(m) == {"1"}), None)
        runs.append({RUN: r, "metric": metric, "n_masks": len(stats), "best": best,
                     "best_mean": stats[best]["mean"], "best_sd": stats[best]["sd"],
                     "best_in": best_in, "n_common": n_common, "most_variable": vol,
                     "most_sd": sds[vol], "median_sd": float(np.median(list(sds.values()))),
                     "full": full,
                     "gap": (stats[best]["mean"] - stats[full]["mean"]) if full else math.nan,
                     "full_sd": stats[full]["sd"] if full else math.nan})
    notes = []
    dropped = set(seed_scores["mask"].map(str)) - set(df["mask"])
    if dropped:
        notes.append(f"{len(dropped)} mask(s) with one seed are left out of the spread "
                     "(it needs two seeds or more)")
    df["mask_order"] = df["mask"].map({m: i for i, m in enumerate(order)})
    return FigureData(df.sort_values(["mask_order", "seed"]).reset_index(drop=True),
                      pd.DataFrame(rows), notes, {"runs": pd.DataFrame(runs), "order": order})


# ----------------------------------------------------------------------------- steering


def steer_paired(items: pd.DataFrame | None, run: str, metric: str
                 ) -> dict[float, PairedDiff]:
    """Per scale ``s != 0``: the paired difference ``score(s) - score(0)`` of one steer run on
    the same items (``steer_items.csv``; Newcombe's interval for 0/1 scores, the bootstrap-t
    of the per-item differences otherwise). Empty when the run has no per-item scores for the
    metric at scale 0 (an older run)."""
    if items is None or items.empty:
        return {}
    it = numeric(with_run(items), ["scale", "item", "value"])
    it = it[(it[RUN] == str(run)) & (it["metric"].astype(str) == str(metric))]
    zero = it[it["scale"] == 0].set_index("item")["value"]
    if zero.empty:
        return {}
    out = {}
    for s, g in it[it["scale"] != 0].groupby("scale"):
        m = g.set_index("item")["value"].to_frame("a").join(zero.rename("b"), how="inner")
        out[float(s)] = paired_difference(m["a"].to_numpy(float), m["b"].to_numpy(float))
    return out


def _steer_verdict(metric: str, paired: dict[float, PairedDiff], values: dict[float, float]
                   ) -> dict[str, Any]:
    """From the paired tests of every scale against scale 0: the scales significantly better
    and worse than the unsteered base, and the winner (the best value among the better
    ones; None when no scale is better beyond its paired interval)."""
    sign = -1.0 if lower_is_better(metric) else 1.0
    better = [s for s, d in paired.items() if d.significant and sign * d.mean > 0]
    worse = [s for s, d in paired.items() if d.significant and sign * d.mean < 0]
    winner = max(better, key=lambda s: sign * values.get(s, math.nan)) if better else None
    return {"better": sorted(better), "worse": sorted(worse), "winner": winner,
            "winner_value": values.get(winner, math.nan) if winner is not None else math.nan}


def steer_data(steer: pd.DataFrame, items: pd.DataFrame | None = None) -> FigureData:
    """Steering: score by scale per run and metric; ``summary`` the unsteered value (scale 0),
    the best scale (by the metric's better direction) and its change from scale 0. With the
    runs' per-item scores (``items``, steer_items.csv) every scale is compared with scale 0 on
    the same items (``paired``: scale -> PairedDiff; ``winner``, ``better``, ``worse``: see
    :func:`_steer_verdict`)."""
    df = numeric(with_run(steer), ["scale", "value", "ci_low", "ci_high", "n"])
    df["metric"] = df["metric"].astype(str)
    df = df.dropna(subset=["scale"])
    df, notes = clip_to_range(df)
    rows = []
    for (r, metric), g in df.groupby([RUN, "metric"], sort=False):
        g = g.dropna(subset=["value"]).sort_values("scale")
        if g.empty:
            continue
        sc = score(metric, g["value"].to_numpy(float))
        best = g.iloc[int(np.nanargmax(sc))]
        zero = g[g["scale"] == 0]
        z = float(zero["value"].iloc[0]) if len(zero) else math.nan
        overlap = bool(len(zero) and best["scale"] != 0 and _overlap(best, zero.iloc[0]))
        paired = steer_paired(items, str(r), metric) if metric_spec(metric).is_score else {}
        rows.append({RUN: r, "metric": metric, "is_score": metric_spec(metric).is_score,
                     "overlap": overlap, "n": float(best.get("n", math.nan)),
                     "n_scales": len(g), "unsteered": z, "best_scale": float(best["scale"]),
                     "best": float(best["value"]),
                     "delta": float(best["value"]) - z if np.isfinite(z) else math.nan,
                     "first_scale": float(g["scale"].iloc[0]),
                     "first": float(g["value"].iloc[0]), "last_scale": float(g["scale"].iloc[-1]),
                     "last": float(g["value"].iloc[-1]),
                     "same": bool(np.nanmax(sc) == np.nanmin(sc)), "paired": paired,
                     **_steer_verdict(metric, paired, dict(zip(g["scale"].astype(float),
                                                               g["value"].astype(float))))})
    return FigureData(df, pd.DataFrame(rows), notes)


def _overlap(a: pd.Series, b: pd.Series) -> bool:
    """Two rows' intervals overlap (False when either has none)."""
    lo = [float(x.get("ci_low", math.nan)) for x in (a, b)]
    hi = [float(x.get("ci_high", math.nan)) for x in (a, b)]
    if not all(np.isfinite(lo + hi)):
        return False
    return max(lo) <= min(hi)


# ----------------------------------------------------------------------------- MoE routing

DRIFT_METRICS = ("js_divergence", "topk_overlap")


def expert_weight_rows(weights: pd.DataFrame) -> pd.DataFrame:
    """``weights.csv`` rows of single routed experts (module ``expert``, integer ``expert``),
    in the metric the report shows (``relative`` when present)."""
    if weights is None or weights.empty or "expert" not in weights.columns:
        return pd.DataFrame()
    df = numeric(with_run(chain_view(weights)), ["block", "expert", "value"])
    df = df[(df["module"].astype(str) == EXPERT_MODULE) & df["block"].notna()
            & df["expert"].notna()]
    if df.empty:
        return df
    metric = weight_metric(df)
    return df[df["metric"].astype(str) == metric].copy()


def _routing_summary(drift: pd.DataFrame, entropy: pd.DataFrame) -> pd.DataFrame:
    """Per run and pair: where JS peaks, the top-k overlap's low point, mean entropies and
    the verdict of ``rules.routing_rule`` on the depth-ordered JS profile."""
    rows = []
    for (r, model), g in drift[drift["metric"] == "js_divergence"].groupby([RUN, "model"],
                                                                           sort=False):
        g = g.dropna(subset=["value"]).sort_values("block")
        if g.empty:
            continue
        v = routing_rule(g["value"], g.get("ci_low"), g.get("ci_high"),
                         hint="analyze --bootstrap 0")
        top = g.loc[g["value"].idxmax()]
        ov = drift[(drift[RUN] == r) & (drift["model"] == model)
                   & (drift["metric"] == "topk_overlap")].dropna(subset=["value"])
        low = ov.loc[ov["value"].idxmin()] if len(ov) else None
        ent = entropy[entropy[RUN] == r].groupby("model")["value"].mean()
        stage = split_pair_label(str(model))[1] if is_pair_label(str(model)) else FIRST
        rows.append({RUN: r, "model": model, "n_sparse": len(g), "mean_js": g["value"].mean(),
                     "max_js": float(top["value"]), "max_block": int(top["block"]),
                     "max_low": float(top.get("ci_low", math.nan)),
                     "max_high": float(top.get("ci_high", math.nan)),
                     "min_overlap": math.nan if low is None else float(low["value"]),
                     "min_overlap_block": None if low is None else int(low["block"]),
                     "mean_overlap": ov["value"].mean() if len(ov) else math.nan,
                     "entropy_base": float(ent.get(BASE, math.nan)),
                     "entropy_sft": float(ent.get(stage, math.nan)),
                     "verdict": v.verdict, "verdict_text": v.text()})
    return pd.DataFrame(rows)


def routing_data(routing: pd.DataFrame, weights: pd.DataFrame | None = None) -> FigureData:
    """The MoE figures: router drift by depth (``frame``: JS and top-k overlap per sparse
    block with intervals), expert load per model (``extra['load']``: block x expert),
    per-expert weight change (``extra['experts']``, from a weights run) and ``summary``."""
    empty = pd.DataFrame(columns=[RUN, "block", "metric", "model", "value"])
    df = routing if routing is not None and len(routing) else empty
    df = numeric(with_depth(df, "block"), ["expert", "ci_low", "ci_high"])
    df, notes = clip_to_range(df, "routing")
    drift = df[df["metric"].astype(str).isin(DRIFT_METRICS)]
    load = df[df["metric"].astype(str) == "load"]
    entropy = df[df["metric"].astype(str) == "load_entropy"]
    experts = expert_weight_rows(weights) if weights is not None else pd.DataFrame()
    frame = drift if len(drift) or len(load) or experts.empty else experts
    return FigureData(frame, _routing_summary(drift, entropy), notes,
                      {"load": load, "entropy": entropy, "experts": experts})


# ----------------------------------------------------------------------------- signal vs cause

SIGNAL_LABELS = {
    "weight_change": "weight change of the block (weights: total, relative)",
    "cka_drop": "CKA drop across the block (analyze: cka[j=b] - cka[j=b+1])",
    "mean_shift_rise": "mean-shift rise across the block (analyze)",
    "kl_rise": "KL(SFT || base) rise across the block (probe)",
    "swap_effect": "loss change when the block's segment of the SFT is the base's (swap)",
}


def _across(df: pd.DataFrame, metric: str, sign: float, model: str = "pair") -> pd.Series:
    """Per block ``b``: ``sign * (v[j=b+1] - v[j=b])`` of a per-layer pair metric."""
    sel = df[(df["metric"].astype(str) == metric) & (df["model"].astype(str) == model)]
    v = sel.groupby(pd.to_numeric(sel["layer"]))["value"].mean().sort_index()
    if len(v) < 2:
        return pd.Series(dtype=float)
    d = sign * (v.to_numpy(float)[1:] - v.to_numpy(float)[:-1])
    return pd.Series(d, index=v.index[:-1].astype(int))


def _swap_per_block(swap: pd.DataFrame, n_blocks: int) -> pd.Series:
    """Base-into-SFT swap of each one-segment mask: loss of the hybrid minus the SFT's, given
    to every block of the segment."""
    loss = swap[swap["metric"].astype(str) == "loss"]
    orig = loss[(loss["direction"].astype(str) == "none") & (loss["config"].astype(str) == "sft")]
    hyb = loss[loss["direction"].astype(str) == "base-into-sft"]
    if orig.empty or hyb.empty:
        return pd.Series(dtype=float)
    ref = float(orig["value"].iloc[0])
    out: dict[int, float] = {}
    for mask, v in zip(hyb["mask"].astype(str), hyb["value"], strict=True):
        if not is_mask(mask) or mask.count("1") != 1:
            continue
        lo, hi = segment_bounds(n_blocks, len(mask))[mask.index("1")]
        out.update({b: float(v) - ref for b in range(lo, hi)})
    return pd.Series(out, dtype=float).sort_index()


def block_signals(tables: dict[str, pd.DataFrame], n_blocks: int) -> pd.DataFrame:
    """Every analysis signal per block (``signal``, ``block``, ``value``) from the tables at
    hand (weights, metrics, probe, swap)."""
    series: dict[str, pd.Series] = {}
    w = tables.get("weights")
    if w is not None and not w.empty:
        tot = w[w["module"].astype(str) == "total"]
        metric = "relative" if (tot["metric"] == "relative").any() else "frobenius"
        tot = tot[tot["metric"] == metric]
        series["weight_change"] = tot.groupby(pd.to_numeric(tot["block"]))["value"].mean()
    m = tables.get("metrics")
    if m is not None and not m.empty:
        series["cka_drop"] = _across(m, "cka", -1.0)
        series["mean_shift_rise"] = _across(m, "mean_shift", 1.0)
    p = tables.get("probe")
    if p is not None and not p.empty:
        series["kl_rise"] = _across(p, "kl_pair", 1.0)
    s = tables.get("swap")
    if s is not None and not s.empty:
        series["swap_effect"] = _swap_per_block(s, n_blocks)
    rows = [{"signal": k, "block": int(b), "value": float(v)} for k, ser in series.items()
            for b, v in ser.items() if 0 <= int(b) < n_blocks and np.isfinite(v)]
    return pd.DataFrame(rows, columns=["signal", "block", "value"])


def block_cause(ablate: pd.DataFrame, n_blocks: int) -> pd.Series:
    """The causal effect per block: ``delta_loss`` of ablating (reverting) it; a segment's value
    for each of its blocks."""
    d = ablate[ablate["metric"].astype(str) == "delta_loss"]
    out: dict[int, float] = {}
    for blocks, v in zip(d["blocks"].astype(str), d["value"], strict=True):
        lo, _, hi = blocks.partition("-")
        out.update({b: float(v) for b in range(int(lo), int(hi or lo) + 1) if b < n_blocks})
    return pd.Series(out, dtype=float).sort_index()


def signal_cause_data(tables: dict[str, pd.DataFrame], n_blocks: int, mode: str,
                      n_boot: int = 1000, level: float = 0.95) -> FigureData:
    """Each signal beside the causal effect per block, and their Spearman correlation over the
    blocks with a bootstrap interval over blocks (``summary``: signal, rho, ci_low, ci_high,
    n_blocks)."""
    from sftscope.metrics.stats import spearman_ci  # torch: the report loads it only here

    cause = block_cause(tables["ablate"], n_blocks)
    sig = block_signals(tables, n_blocks)
    frame = pd.concat([sig, pd.DataFrame({"signal": "cause", "block": cause.index,
                                          "value": cause.to_numpy(float)})],
                      ignore_index=True)
    rows = []
    for name, g in sig.groupby("signal", sort=False):
        both = g.set_index("block")["value"].to_frame("x").join(cause.rename("y"), how="inner")
        rho, lo, hi = spearman_ci(both["x"], both["y"], n_boot=n_boot, level=level)
        rows.append({"signal": name, "rho": rho, "ci_low": lo, "ci_high": hi,
                     "n_blocks": len(both)})
    summ = pd.DataFrame(rows, columns=["signal", "rho", "ci_low", "ci_high", "n_blocks"])
    return FigureData(frame, summ, extra={"mode": mode, "n_blocks": n_blocks})
