"""The paper's figures from tidy tables: each function takes DataFrames and returns a Figure.

Every function accepts the table exactly as its command writes it (``pd.read_csv("metrics.csv")``
works in a notebook) plus two optional columns the report adds when it overlays runs:
``run`` (legend label, one colour per run) and ``n_blocks`` (the depth ``L``; without it ``L`` is
inferred as the largest hidden-state index, or the largest block + 1). The x axis is always a
relative depth so models of different depth overlay: hidden state ``j / L`` for per-layer tables,
block ``(b + 0.5) / L`` for per-block tables and segment centre ``(i + 0.5) / K`` for masks.

Figures are plain :class:`matplotlib.figure.Figure` objects on the Agg canvas, never registered
with pyplot: nothing to close, no global backend switch, safe in threads and notebooks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

DPI = 110
RUN = "run"
DEFAULT_RUN = "run"
LAYER_AXIS = "hidden state j / L  (0 = embeddings, 1 = last block output)"
BLOCK_AXIS = "block (b + 0.5) / L"
SEGMENT_AXIS = "swapped segment centre (i + 0.5) / K  (block depth)"
MASK_AXIS = "trained segment centre (i + 0.5) / K  (block depth)"

PAIR_ORDER = ("cka", "cosine_similarity", "mean_shift", "mean_shift_relative", "cka_unbiased")
SINGLE_ORDER = ("effective_rank_norm", "prompt_entropy", "dataset_entropy", "spectral_norm",
                "condition_number")
SINGLE_EXTRA = ("effective_rank", "rank_deficiency", "rank_deficiency_frac", "l2_norm",
                "sparsity", "curvature")
LOG_METRICS = ("spectral_norm", "condition_number", "mean_shift", "answer_rank", "perplexity")
MODEL_STYLE = {"base": "-", "sft": "--", "pair": ":"}
DIRECTION_STYLES = ("-", "--", "-.", ":")
LOWER_IS_BETTER = ("loss", "nll", "ppl", "perplexity", "cross_entropy", "error", "rank")


# ----------------------------------------------------------------------------- helpers


def palette(labels: Iterable[str]) -> dict[str, str]:
    """One colour per run label (tab10, then tab20), stable in the order given."""
    import matplotlib

    labels = list(dict.fromkeys(labels))
    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, lab in enumerate(labels)}


def run_labels(df: pd.DataFrame) -> list[str]:
    """Run labels in order of appearance (one default label when the column is absent)."""
    if RUN not in df.columns:
        return [DEFAULT_RUN]
    return list(dict.fromkeys(df[RUN].astype(str)))


def _with_run(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if RUN not in df.columns:
        df[RUN] = DEFAULT_RUN
    df[RUN] = df[RUN].astype(str)
    return df


def _colors(df: pd.DataFrame, colors: dict[str, str] | None) -> dict[str, str]:
    pal = palette(run_labels(df))
    if colors:
        pal.update({k: v for k, v in colors.items() if k in pal})
    return pal


def lower_is_better(metric: str) -> bool:
    """Loss-like metrics (loss, perplexity, rank...) are better when smaller."""
    m = str(metric).lower()
    return any(tok in m for tok in LOWER_IS_BETTER)


def with_depth(df: pd.DataFrame, index: str = "layer") -> pd.DataFrame:
    """Add ``rel_depth``: ``layer / L`` (hidden states) or ``(block + 0.5) / L`` (blocks).

    ``L`` comes from an ``n_blocks`` column when present, else from the table itself (largest
    hidden-state index, or largest block + 1), per run. Rows whose index is not a number (the
    embeddings or LM head in ``weights.csv``) are dropped.
    """
    df = _with_run(df)
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


def _grid(n: int, ncols: int = 3, w: float = 4.4, h: float = 3.3,
          title: str = "") -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    width = max(w * ncols, 9.0 if n == 1 else 0.0)  # room for the title and legend
    fig = Figure(figsize=(width, h * nrows + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig, axes[:n]


def _depth_axes(ax, xlabel: str) -> None:
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.axvline(0.8, color="0.55", ls=":", lw=0.9)
    ax.grid(alpha=0.25, lw=0.6)
    ax.tick_params(labelsize=8)


def _nice(metric: str) -> str:
    return str(metric).replace("_", " ")


def _maybe_log(ax, values: pd.Series, metric: str) -> None:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if metric in LOG_METRICS and len(v) and (v > 0).all() and v.max() / v.min() > 30:
        ax.set_yscale("log")


def _line(ax, g: pd.DataFrame, color: str, ls: str, label: str | None, ycol: str = "value",
          lw: float = 1.6) -> None:
    g = g.sort_values("rel_depth")
    x = g["rel_depth"].to_numpy(float)
    y = pd.to_numeric(g[ycol], errors="coerce").to_numpy(float)
    marker = "o" if len(x) <= 40 else None
    ax.plot(x, y, color=color, ls=ls, lw=lw, marker=marker, ms=2.6, label=label)
    if {"ci_low", "ci_high"} <= set(g.columns):
        lo = pd.to_numeric(g["ci_low"], errors="coerce").to_numpy(float)
        hi = pd.to_numeric(g["ci_high"], errors="coerce").to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        if ok.any():
            ax.fill_between(x[ok], lo[ok], hi[ok], color=color, alpha=0.18, lw=0)


def _legend(fig: Figure, handles: list, ncol: int | None = None) -> None:
    if not handles:
        return
    ncol = ncol or min(len(handles), 5)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8.5,
               frameon=False)


def _run_handles(runs: Sequence[str], pal: dict[str, str]) -> list:
    return [Line2D([], [], color=pal[r], lw=2.2, label=r) for r in runs]


def _style_handles(styles: dict[str, str], color: str = "0.3") -> list:
    return [Line2D([], [], color=color, ls=ls, lw=1.6, label=name) for name, ls in styles.items()]


def _empty(title: str, message: str) -> Figure:
    fig = Figure(figsize=(6, 2), dpi=DPI)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=10, color="0.35")
    return fig


def _ordered(present: Iterable[str], order: Sequence[str], extra: Sequence[str] = (),
             limit: int = 9) -> list[str]:
    present = list(dict.fromkeys(present))
    out = [m for m in order if m in present] + [m for m in extra if m in present]
    return out[:limit]


# ----------------------------------------------------------------------------- Fig. 1-3


def pair_metric_names(metrics: pd.DataFrame) -> list[str]:
    """Pair metrics Fig. 1 plots, in the paper's order (delta_* metrics stay in the tables)."""
    df = metrics
    if "model" in df.columns:
        df = df[df["model"].astype(str) == "pair"]
    present = [m for m in dict.fromkeys(df["metric"].astype(str)) if not m.startswith("delta_")]
    return _ordered(present, PAIR_ORDER, [m for m in present if m not in PAIR_ORDER], limit=6)


def plot_pair_metrics(metrics: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 1: base-vs-SFT similarity (CKA, cosine, mean shift) by depth, CI bands if given."""
    title = "Fig. 1 - Base vs SFT representations by depth (x: hidden state j / L)"
    names = pair_metric_names(metrics)
    if not names:
        return _empty(title, "no pair metrics (model = pair) in this table")
    df = with_depth(metrics, "layer")
    if "model" in df.columns:
        df = df[df["model"].astype(str) == "pair"]
    pal = _colors(df, colors)
    runs = run_labels(df)
    fig, axes = _grid(len(names), title=title)
    for ax, metric in zip(axes, names):
        sub = df[df["metric"].astype(str) == metric]
        for r in runs:
            g = sub[sub[RUN] == r]
            if len(g):
                _line(ax, g, pal[r], "-", r)
        ax.set_title(_nice(metric), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        _maybe_log(ax, sub["value"], metric)
    _legend(fig, _run_handles(runs, pal))
    return fig


def single_metric_names(metrics: pd.DataFrame) -> list[str]:
    """Single-model metrics Fig. 2 plots (effective rank normalised when available)."""
    df = metrics
    if "model" in df.columns:
        df = df[df["model"].astype(str).isin(["base", "sft"])]
    present = list(dict.fromkeys(df["metric"].astype(str)))
    extra = [m for m in SINGLE_EXTRA if m in present]
    if "effective_rank_norm" in present:
        extra = [m for m in extra if m != "effective_rank"]
    else:
        extra = [m for m in extra if m != "effective_rank"]
        if "effective_rank" in present:
            extra = ["effective_rank", *extra]
    rest = [m for m in present if m not in SINGLE_ORDER and m not in SINGLE_EXTRA
            and not m.startswith("delta_")]
    return _ordered(present, SINGLE_ORDER, [*extra, *rest], limit=9)


def plot_single_metrics(metrics: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 2: single-model metrics by depth, base solid and SFT dashed, one panel each."""
    title = "Fig. 2 - Single-model metrics by depth, base (solid) vs SFT (dashed), x: j / L"
    names = single_metric_names(metrics)
    if not names:
        return _empty(title, "no single-model metrics (model = base/sft) in this table")
    df = with_depth(metrics, "layer")
    df = df[df["model"].astype(str).isin(["base", "sft"])]
    pal = _colors(df, colors)
    runs = run_labels(df)
    fig, axes = _grid(len(names), title=title)
    for ax, metric in zip(axes, names):
        sub = df[df["metric"].astype(str) == metric]
        for r in runs:
            for model in ("base", "sft"):
                g = sub[(sub[RUN] == r) & (sub["model"].astype(str) == model)]
                if len(g):
                    _line(ax, g, pal[r], MODEL_STYLE[model], None)
        ax.set_title(_nice(metric), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        _maybe_log(ax, sub["value"], metric)
    _legend(fig, _run_handles(runs, pal) + _style_handles({"base": "-", "SFT": "--"}))
    return fig


def _probe_kind(metric: str) -> str:
    m = metric.lower()
    if "agree" in m:
        return "agreement"
    if "acc" in m:
        return "accuracy"
    if "loss" in m or "nll" in m or "entropy" in m:
        return "loss"
    return "other"


def plot_logit_lens(probe: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 3: logit-lens next-token accuracy (base, SFT, agreement) and loss by depth."""
    title = "Fig. 3 - Logit lens: next-token prediction from each hidden state (x: j / L)"
    if probe.empty:
        return _empty(title, "empty probe table")
    df = with_depth(probe, "layer")
    if "model" not in df.columns:
        df["model"] = "sft"
    df["model"] = df["model"].astype(str)
    pal = _colors(df, colors)
    runs = run_labels(df)
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    acc = [m for m in metrics if _probe_kind(m) == "accuracy"]
    agree = [m for m in metrics if _probe_kind(m) == "agreement"]
    loss = [m for m in metrics if _probe_kind(m) == "loss"]
    other = [m for m in metrics if _probe_kind(m) == "other"]
    # Panels: each accuracy metric (agreement overlaid on the first), each loss, the rest.
    panels: list[tuple[str, list[str]]] = []
    for i, m in enumerate(acc):
        panels.append((m, [m, *agree] if i == 0 else [m]))
    if not acc:
        panels += [(m, [m]) for m in agree]
    panels += [(m, [m]) for m in loss + other]
    panels = panels[:6]
    fig, axes = _grid(len(panels), title=title)
    styles_used: dict[str, str] = {}
    for ax, (name, members) in zip(axes, panels):
        vals = []
        for metric in members:
            sub = df[df["metric"].astype(str) == metric]
            vals.append(sub["value"])
            for r in runs:
                for model, g in sub[sub[RUN] == r].groupby("model", sort=False):
                    is_agree = _probe_kind(metric) == "agreement"
                    ls = ":" if is_agree else MODEL_STYLE.get(model, "-.")
                    key = "agreement (base vs SFT)" if is_agree else (
                        {"base": "base", "sft": "SFT"}.get(model, model))
                    styles_used.setdefault(key, ls)
                    _line(ax, g, pal[r], ls, None)
        ax.set_title(_nice(name) + (" + agreement" if len(members) > 1 else ""), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        if _probe_kind(name) in ("accuracy", "agreement"):
            ax.set_ylim(-0.02, max(1.0, float(pd.concat(vals).max()) + 0.02) if vals else 1.02)
        elif vals:
            _maybe_log(ax, pd.concat(vals), name)
    _legend(fig, _run_handles(runs, pal) + _style_handles(styles_used))
    return fig


# ----------------------------------------------------------------------------- Fig. 4


def weight_module(weights: pd.DataFrame) -> str | None:
    """The module Fig. 4 plots: ``attn`` (all attention projections together) when present."""
    mods = list(dict.fromkeys(weights["module"].astype(str))) if len(weights) else []
    if not mods:
        return None
    return "attn" if "attn" in mods else mods[0]


def plot_weight_change(weights: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 4: attention weight change by block, relative and Frobenius, one line per run."""
    title = "Fig. 4 - Weight change Base -> SFT by block (x: block (b + 0.5) / L)"
    df = with_depth(weights, "block")
    module = weight_module(df)
    if module is None:
        return _empty(title, "no per-block rows in weights table")
    df = df[df["module"].astype(str) == module]
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    names = _ordered(metrics, ("relative", "frobenius")) or metrics[:2]
    pal = _colors(df, colors)
    runs = run_labels(df)
    fig, axes = _grid(len(names), ncols=2, w=5.2, title=title)
    for ax, metric in zip(axes, names):
        sub = df[df["metric"].astype(str) == metric]
        for r in runs:
            g = sub[sub[RUN] == r]
            if len(g):
                _line(ax, g, pal[r], "-", r)
        ax.set_title(f"{module}: {_nice(metric)}", fontsize=10)
        _depth_axes(ax, BLOCK_AXIS)
    _legend(fig, _run_handles(runs, pal))
    return fig


def plot_weight_heatmap(weights: pd.DataFrame, metric: str | None = None) -> Figure:
    """Fig. 4b: per-module weight change, one heatmap (module x block) per run."""
    title = "Fig. 4b - Weight change per module (x: block (b + 0.5) / L)"
    df = with_depth(weights, "block")
    if df.empty:
        return _empty(title, "no per-block rows in weights table")
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    metric = metric or ("relative" if "relative" in metrics else metrics[0])
    df = df[df["metric"].astype(str) == metric]
    runs = run_labels(df)
    mods_all = list(dict.fromkeys(df["module"].astype(str)))
    fig = Figure(figsize=(10, 0.4 * len(mods_all) * len(runs) + 1.4 * len(runs) + 0.8), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(len(runs), 1, squeeze=False).ravel()
    fig.suptitle(f"{title}; metric: {metric}", fontsize=12, fontweight="bold")
    for ax, r in zip(axes, runs):
        g = df[df[RUN] == r]
        mods = list(dict.fromkeys(g["module"].astype(str)))
        nb = None
        if "n_blocks" in g.columns:
            s = pd.to_numeric(g["n_blocks"], errors="coerce").dropna()
            nb = int(s.iloc[0]) if len(s) else None
        nb = nb or int(g["block"].max()) + 1
        mat = np.full((len(mods), nb), np.nan)
        for row in g.itertuples(index=False):
            b = int(row.block)
            if b < nb:
                mat[mods.index(str(row.module)), b] = float(row.value)
        im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(0, 1, len(mods) - 0.5, -0.5))
        ax.set_yticks(range(len(mods)), mods, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel(BLOCK_AXIS + f"  ({nb} blocks)", fontsize=8.5)
        ax.set_title(r, fontsize=10)
        ax.tick_params(labelsize=8)
        fig.colorbar(im, ax=ax, label=metric, fraction=0.04, pad=0.01)
    return fig


# ----------------------------------------------------------------------------- Fig. 5


def correlation_matrix(corr: pd.DataFrame) -> pd.DataFrame:
    """Square symmetric matrix from ``metric_a, metric_b, r`` rows (diagonal 1)."""
    names = list(dict.fromkeys([*corr["metric_a"].astype(str), *corr["metric_b"].astype(str)]))
    mat = pd.DataFrame(np.nan, index=names, columns=names)
    for row in corr.itertuples(index=False):
        a, b, r = str(row.metric_a), str(row.metric_b), float(row.r)
        mat.loc[a, b] = r
        if pd.isna(mat.loc[b, a]):
            mat.loc[b, a] = r
    for n in names:
        if pd.isna(mat.loc[n, n]):
            mat.loc[n, n] = 1.0
    return mat


MODEL_ORDER = ("base", "sft", "pair")


def plot_correlation(corr: pd.DataFrame) -> Figure:
    """Fig. 5: Pearson correlation across layers between metrics; one row per run, one
    annotated heatmap per model (base, SFT, pair)."""
    title = "Fig. 5 - Correlation of metrics across layers (Pearson r)"
    if corr.empty:
        return _empty(title, "empty correlation table")
    df = _with_run(corr)
    if "model" not in df.columns:
        df["model"] = "all"
    df["model"] = df["model"].astype(str)
    runs = run_labels(df)[:4]
    present = list(dict.fromkeys(df["model"]))
    models = [m for m in MODEL_ORDER if m in present] + [m for m in present
                                                         if m not in MODEL_ORDER]
    mats = {(r, m): correlation_matrix(df[(df[RUN] == r) & (df["model"] == m)])
            for r in runs for m in models if ((df[RUN] == r) & (df["model"] == m)).any()}
    size = {m: max((len(v) for (_, mm), v in mats.items() if mm == m), default=1)
            for m in models}
    widths = [0.42 * size[m] + 2.0 for m in models]
    height = 0.42 * max(size.values()) + 2.2
    fig = Figure(figsize=(min(sum(widths) + 1.0, 22), height * len(runs) + 0.6), dpi=DPI,
                 layout="constrained")
    axes = fig.subplots(len(runs), len(models), squeeze=False,
                        gridspec_kw={"width_ratios": widths})
    fig.suptitle(title, fontsize=12, fontweight="bold")
    im = None
    for i, r in enumerate(runs):
        for k, m in enumerate(models):
            ax = axes[i][k]
            mat = mats.get((r, m))
            if mat is None:
                ax.set_visible(False)
                continue
            n = len(mat)
            vals = mat.to_numpy(float)
            im = ax.imshow(vals, cmap="RdBu_r", vmin=-1, vmax=1)
            labels = [_nice(x) for x in mat.index]
            ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7.5)
            ax.set_yticks(range(n), labels, fontsize=7.5)
            fs = 8 if n <= 8 else (6.5 if n <= 12 else 5)
            for a in range(n):
                for b in range(n):
                    if np.isfinite(vals[a, b]):
                        ax.text(b, a, f"{vals[a, b]:.2f}", ha="center", va="center",
                                fontsize=fs, color="white" if abs(vals[a, b]) > 0.6 else "black")
            ax.set_title(f"{r}: {m}" if r != DEFAULT_RUN else m, fontsize=9.5)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), label="Pearson r", shrink=0.6)
    return fig


# ----------------------------------------------------------------------------- masks


def mask_str(value: object) -> str:
    """Masks as strings; CSV readers may have turned ``01000`` into ``1000``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    s = str(value).strip()
    if s.endswith(".0") and set(s[:-2]) <= {"0", "1"}:
        s = s[:-2]
    return s


def is_mask(s: str) -> bool:
    return bool(s) and set(s) <= {"0", "1"}


def single_position(mask: str) -> float | None:
    """Relative depth of the centre of a one-segment mask, else None."""
    if is_mask(mask) and mask.count("1") == 1:
        k = len(mask)
        return (mask.index("1") + 0.5) / k
    return None


def mask_centre(mask: str) -> float | None:
    """Mean relative depth of the selected segments of any mask."""
    if not is_mask(mask) or "1" not in mask:
        return None
    k = len(mask)
    pos = [(i + 0.5) / k for i, c in enumerate(mask) if c == "1"]
    return float(np.mean(pos))


def mask_sort_key(mask: str) -> tuple:
    """Full depth first, then one-segment masks bottom to top, then the others."""
    if not is_mask(mask):
        return (3, 0, mask)
    if set(mask) == {"1"}:
        return (0, 0, mask)
    if mask.count("1") == 1:
        return (1, mask.index("1") / len(mask), mask)
    return (2, mask.count("1"), (mask_centre(mask) or 0), mask)


# ----------------------------------------------------------------------------- Fig. 6

ORIGINAL_NAMES = ("original", "originals", "reference", "base", "sft", "none", "unswapped")


def swap_is_original(config: object, direction: object, mask: object) -> bool:
    """Rows that describe an unswapped model (the reference lines of Fig. 6).

    Any of: ``config`` names a model or says ``original``; ``direction`` is empty, ``none`` or
    ``original``; the mask is empty or all zeros (nothing swapped).
    """
    c = "" if pd.isna(config) else str(config).strip().lower()
    d = "" if pd.isna(direction) else str(direction).strip().lower()
    m = mask_str(mask)
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


def swap_original_name(row: pd.Series) -> str:
    """A short name for a reference row: ``base``, ``sft``, or the host with the other head
    when no block is swapped (``base + sft head``)."""
    c = "" if pd.isna(row.get("config")) else str(row.get("config")).strip()
    if c.lower() in ("base", "sft"):
        return c.lower()
    d = "" if pd.isna(row.get("direction")) else str(row.get("direction")).strip()
    host = swap_host(d)
    if host and d.lower() not in ("none", "original"):
        head = _head_text(row.get("head"))
        return f"{host} + {head} head" if head and head != host else host
    for name in (c, d):
        low = name.lower()
        if "base" in low and "sft" not in low:
            return "base"
        if "sft" in low and "base" not in low:
            return "sft"
    return c or d or "original"


def split_swap(swap: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(swapped rows, original rows) of a swap table, masks as strings."""
    df = _with_run(swap)
    for col in ("config", "direction", "head"):
        if col not in df.columns:
            df[col] = ""
    df["mask"] = df["mask"].map(mask_str) if "mask" in df.columns else ""
    orig = [swap_is_original(c, d, m) for c, d, m in zip(df["config"], df["direction"],
                                                          df["mask"])]
    orig = pd.Series(orig, index=df.index)
    return df[~orig].copy(), df[orig].copy()


def _head_text(h: object) -> str:
    return "" if pd.isna(h) or str(h) in ("", "nan") else str(h)


def swap_panels(swapped: pd.DataFrame) -> list[tuple[str, str]]:
    """(metric, head) panels of Fig. 6 (head '' when the table has one head)."""
    metrics = list(dict.fromkeys(swapped["metric"].astype(str)))
    heads = list(dict.fromkeys(_head_text(h) for h in swapped["head"]))
    if len(heads) <= 1:
        return [(m, heads[0] if heads else "") for m in metrics][:6]
    return [(m, h) for m in metrics for h in heads][:6]


def plot_swap(swap: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 6: metric after swapping one segment of blocks, both directions, with CIs.

    One-segment masks are lines over the segment centre; multi-segment masks are hollow
    markers at the mean centre of their segments, annotated with the mask. The unswapped
    models are horizontal reference lines in the run's colour (base dotted, SFT dash-dot).
    """
    title = "Fig. 6 - Layer swapping: score after swapping one segment of blocks"
    swapped, orig = split_swap(swap)
    if swapped.empty:
        return _empty(title, "no swapped configurations in this table")
    pal = _colors(pd.concat([swapped, orig]), colors)
    runs = [r for r in run_labels(pd.concat([swapped, orig])) if r in pal]
    directions = list(dict.fromkeys(swapped["direction"].astype(str)))
    dstyle = {d: DIRECTION_STYLES[i % len(DIRECTION_STYLES)] for i, d in enumerate(directions)}
    ostyle = {"base": (0, (1, 1.5)), "sft": "-."}
    panels = swap_panels(swapped)
    fig, axes = _grid(len(panels), ncols=2, w=5.4, h=3.6, title=title)
    orig_names: dict[str, object] = {}
    for ax, (metric, head) in zip(axes, panels):
        sub = swapped[swapped["metric"].astype(str) == metric]
        if head:
            sub = sub[sub["head"].map(_head_text) == head]
        for r in runs:
            for d in directions:
                g = sub[(sub[RUN] == r) & (sub["direction"].astype(str) == d)].copy()
                if g.empty:
                    continue
                g["pos"] = g["mask"].map(single_position)
                single = g[g["pos"].notna()].sort_values("pos")
                y = pd.to_numeric(single["value"], errors="coerce").to_numpy(float)
                x = single["pos"].to_numpy(float)
                yerr = _yerr(single, y)
                if len(single):
                    ax.errorbar(x, y, yerr=yerr, color=pal[r], ls=dstyle[d], lw=1.6,
                                marker="o", ms=4, capsize=3, elinewidth=1)
                multi = g[g["pos"].isna()]
                for row in multi.itertuples(index=False):
                    m = str(row.mask)
                    xc = mask_centre(m)
                    if xc is None or set(m) == {"1"}:
                        continue
                    ax.plot([xc], [float(row.value)], marker="D", ms=5, mfc="none",
                            color=pal[r], ls="none")
                    ax.annotate(m, (xc, float(row.value)), fontsize=6.5, color=pal[r],
                                xytext=(3, 3), textcoords="offset points")
            o = orig[(orig[RUN] == r) & (orig["metric"].astype(str) == metric)].copy()
            o["oname"] = [swap_original_name(row) for _, row in o.iterrows()]
            for name, og in o.groupby("oname", sort=False):
                same_head = og[og["head"].map(_head_text) == head]
                row = (same_head if len(same_head) else og).iloc[0]
                ls = ostyle.get(name, (0, (4, 2, 1, 2)))
                orig_names.setdefault(name, ls)
                ax.axhline(float(row["value"]), color=pal[r], ls=ls, lw=1.1, alpha=0.85)
        ax.set_title(_nice(metric) + (f"  (head: {head})" if head else ""), fontsize=10)
        _depth_axes(ax, SEGMENT_AXIS)
    handles = _run_handles(runs, pal) + _style_handles({f"swap {d}": s for d, s in dstyle.items()})
    handles += [Line2D([], [], color="0.3", ls=s, lw=1.1,
                       label=f"original {n}" if n in ("base", "sft") else f"no swap: {n}")
                for n, s in orig_names.items()]
    _legend(fig, handles, ncol=min(len(handles), 4))
    return fig


def _yerr(g: pd.DataFrame, y: np.ndarray) -> np.ndarray | None:
    if not {"ci_low", "ci_high"} <= set(g.columns) or g.empty:
        return None
    lo = pd.to_numeric(g["ci_low"], errors="coerce").to_numpy(float)
    hi = pd.to_numeric(g["ci_high"], errors="coerce").to_numpy(float)
    if not (np.isfinite(lo) | np.isfinite(hi)).any():
        return None
    lo = np.where(np.isfinite(lo), np.maximum(y - lo, 0), 0)
    hi = np.where(np.isfinite(hi), np.maximum(hi - y, 0), 0)
    return np.vstack([lo, hi])


# ----------------------------------------------------------------------------- Fig. 7


def _sweep_frame(summary: pd.DataFrame) -> pd.DataFrame:
    df = _with_run(summary)
    df["mask"] = df["mask"].map(mask_str)
    if "metric" not in df.columns:
        df["metric"] = "score"
    df["metric"] = df["metric"].astype(str)
    return df


def _sweep_metrics(df: pd.DataFrame, limit: int = 3) -> list[str]:
    """Metrics of a sweep, the sweep's primary metric (run.json) first."""
    metrics = list(dict.fromkeys(df["metric"]))
    if "primary_metric" in df.columns:
        first = [m for m in dict.fromkeys(df["primary_metric"].dropna().astype(str))
                 if m in metrics]
        metrics = first + [m for m in metrics if m not in first]
    return metrics[:limit]


def plot_sweep_bars(summary: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 7: score per LoRA mask with CIs; full depth highlighted, p-values annotated."""
    title = "Fig. 7 - Segment LoRA sweep: score by mask (bottom segment first)"
    df = _sweep_frame(summary)
    if df.empty:
        return _empty(title, "empty sweep summary")
    pal = _colors(df, colors)
    runs = run_labels(df)
    metrics = _sweep_metrics(df)
    masks = sorted(dict.fromkeys(df["mask"]), key=mask_sort_key)
    w = max(6.5, 0.55 * len(masks) * max(1, len(runs)) + 2)
    fig = Figure(figsize=(min(w, 16), 3.8 * len(metrics) + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False).ravel()
    fig.suptitle(title, fontsize=12, fontweight="bold")
    width = 0.8 / max(1, len(runs))
    for ax, metric in zip(axes, metrics):
        sub = df[df["metric"] == metric]
        top = 0.0
        for k, r in enumerate(runs):
            g = sub[sub[RUN] == r].set_index("mask")
            g = g[~g.index.duplicated()]
            xs, ys, rows = [], [], []
            for i, m in enumerate(masks):
                if m in g.index:
                    xs.append(i - 0.4 + width * (k + 0.5))
                    ys.append(float(g.loc[m, "mean"]))
                    rows.append(g.loc[m])
            if not xs:
                continue
            gr = pd.DataFrame(rows)
            y = np.array(ys)
            yerr = _yerr(gr, y)
            full = [is_mask(str(m)) and set(str(m)) == {"1"} for m in gr.index]
            bars = ax.bar(xs, y, width=width * 0.92, color=pal[r], alpha=0.85,
                          edgecolor=["black" if f else pal[r] for f in full],
                          linewidth=[2.0 if f else 0.5 for f in full])
            for bar, f in zip(bars, full):
                if f:
                    bar.set_hatch("//")
            if yerr is not None:
                ax.errorbar(xs, y, yerr=yerr, fmt="none", ecolor="0.2", capsize=2.5, lw=0.9)
            hi = y + (yerr[1] if yerr is not None else 0)
            top = max(top, float(np.nanmax(hi)))
            for x, h, (mask, row) in zip(xs, hi, zip(gr.index, rows)):
                p = row.get("p_value") if hasattr(row, "get") else None
                if p is not None and pd.notna(p) and set(str(mask)) != {"1"}:
                    ax.annotate(_p_text(float(p)), (x, h), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom",
                                fontsize=6.5, rotation=90 if len(runs) > 1 else 0)
            fm = [m for m in g.index if is_mask(str(m)) and set(str(m)) == {"1"}]
            if fm:
                ax.axhline(float(g.loc[fm[0], "mean"]), color=pal[r], ls="--", lw=0.9)
        ax.set_xticks(range(len(masks)), masks, rotation=45 if len(masks) > 12 else 0,
                      fontsize=8, family="monospace")
        for lab in ax.get_xticklabels():
            if is_mask(lab.get_text()) and set(lab.get_text()) == {"1"}:
                lab.set_fontweight("bold")
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
        ax.set_ylabel(_nice(metric), fontsize=9)
        ax.set_xlabel("mask (bottom segment first); hatched = full depth; "
                      "p = test vs full depth", fontsize=8.5)
        ax.grid(axis="y", alpha=0.25)
        ax.tick_params(axis="y", labelsize=8)
    _legend(fig, _run_handles(runs, pal))
    return fig


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def plot_inverted_u(summary: pd.DataFrame, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 7b: score by position of a one-segment mask; full depth as a dashed line."""
    title = "Fig. 7b - Score by trained segment position (one-segment masks)"
    df = _sweep_frame(summary)
    df["pos"] = df["mask"].map(single_position)
    single = df[df["pos"].notna()]
    if single.empty:
        return _empty(title, "no one-segment masks in this sweep")
    pal = _colors(df, colors)
    runs = run_labels(df)
    metrics = [m for m in _sweep_metrics(df, limit=99) if m in set(single["metric"])][:3]
    fig, axes = _grid(len(metrics), ncols=3, w=5.0, h=3.5, title=title)
    for ax, metric in zip(axes, metrics):
        for r in runs:
            g = single[(single[RUN] == r) & (single["metric"] == metric)].sort_values("pos")
            if g.empty:
                continue
            y = pd.to_numeric(g["mean"], errors="coerce").to_numpy(float)
            ax.errorbar(g["pos"].to_numpy(float), y, yerr=_yerr(g, y), color=pal[r], marker="o",
                        ms=4, capsize=3, lw=1.6)
            full = df[(df[RUN] == r) & (df["metric"] == metric)
                      & df["mask"].map(lambda m: is_mask(m) and set(m) == {"1"})]
            if len(full):
                ax.axhline(float(full["mean"].iloc[0]), color=pal[r], ls="--", lw=1)
        ax.set_title(_nice(metric), fontsize=10)
        _depth_axes(ax, MASK_AXIS)
    _legend(fig, _run_handles(runs, pal) + _style_handles({"full depth (11...1)": "--"}))
    return fig
