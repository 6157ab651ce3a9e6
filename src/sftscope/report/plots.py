"""The paper's figures from tidy tables: each function takes DataFrames and returns a Figure.

Every function accepts the table exactly as its command writes it (``pd.read_csv("metrics.csv")``
works in a notebook) or the :class:`~sftscope.report.numbers.FigureData` the report computed
from it (so a figure draws exactly the numbers its findings cite), plus two optional columns the
report adds when it overlays runs: ``run`` (legend label, one colour per run) and ``n_blocks``
(the depth ``L``; without it ``L`` is inferred as the largest hidden-state index, or the largest
block + 1). The x axis is always a relative depth so models of different depth overlay: hidden
state ``j / L`` for per-layer tables, block ``(b + 0.5) / L`` for per-block tables and segment
centre ``(i + 0.5) / K`` for masks. Scales, labels and the better direction of each metric come
from :mod:`sftscope.metric_registry`; intervals are clipped to the metric's range
(:func:`~sftscope.report.numbers.clip_to_range`). A panel with nothing to show (every value 0,
one seed...) carries a note saying why.

Figures are plain :class:`matplotlib.figure.Figure` objects on the Agg canvas, never registered
with pyplot: nothing to close, no global backend switch, safe in threads and notebooks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sftscope.metric_registry import label as metric_label
from sftscope.metric_registry import lower_is_better, use_log
from sftscope.report import numbers as N
from sftscope.report.numbers import (
    DEFAULT_RUN,
    RUN,
    FigureData,
    pair_metric_names,
    run_labels,
    single_metric_names,
    single_position,
    split_swap,
    swap_host,
    swap_is_original,
    swap_original_name,
    swap_panels,
    weight_module,
    with_depth,
)
from sftscope.segments import is_mask, mask_centre, mask_from_text, mask_sort_key

__all__ = [
    "DEFAULT_RUN", "DPI", "RUN", "FigureData", "correlation_matrix", "is_mask", "lower_is_better",
    "mask_centre", "mask_sort_key", "mask_str", "pair_metric_names", "palette",
    "plot_correlation", "plot_distributions", "plot_dynamics", "plot_grad_heatmap",
    "plot_interpolation", "plot_inverted_u",
    "plot_logit_lens", "plot_loss_curves", "plot_seed_spread", "plot_signal_cause",
    "plot_steer",
    "plot_pair_metrics", "plot_single_metrics", "plot_suggest", "plot_swap", "plot_sweep_bars",
    "plot_weight_change", "plot_weight_heatmap", "run_labels", "single_metric_names",
    "single_position", "split_swap", "swap_host", "swap_is_original", "swap_original_name",
    "swap_panels", "weight_module", "with_depth",
]

DPI = 110
LAYER_AXIS = "hidden state j / L  (0 = embeddings, 1 = last block output)"
BLOCK_AXIS = "block (b + 0.5) / L"
SEGMENT_AXIS = "swapped segment centre (i + 0.5) / K  (block depth)"
MASK_AXIS = "trained segment centre (i + 0.5) / K  (block depth)"
MODEL_STYLE = {"base": "-", "sft": "--", "pair": ":"}
DIRECTION_STYLES = ("-", "--", "-.", ":")
mask_str = mask_from_text  # masks as text, from any form a reader made of them


# ----------------------------------------------------------------------------- helpers


def palette(labels: Iterable[str]) -> dict[str, str]:
    """One colour per run label (tab10; beyond 10 labels tab20, dark shades first), stable in
    the order given."""
    import matplotlib

    labels = list(dict.fromkeys(labels))
    if len(labels) <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return {lab: matplotlib.colors.to_hex(cmap(i)) for i, lab in enumerate(labels)}
    cmap = matplotlib.colormaps["tab20"]  # its dark shades first, then the light ones
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {lab: matplotlib.colors.to_hex(cmap(order[i % 20])) for i, lab in enumerate(labels)}


def _colors(df: pd.DataFrame, colors: dict[str, str] | None) -> dict[str, str]:
    pal = palette(run_labels(df))
    if colors:
        pal.update({k: v for k, v in colors.items() if k in pal})
    return pal


def _runs(df: pd.DataFrame, colors: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """The runs of a figure's frame, in order, and their colours."""
    return run_labels(df), _colors(df, colors)


def _data(table: pd.DataFrame | FigureData, make: Callable[[pd.DataFrame], FigureData]
          ) -> FigureData:
    return table if isinstance(table, FigureData) else make(table)


def _named(table: pd.DataFrame | FigureData, make: Callable[[pd.DataFrame], FigureData],
           why: str) -> tuple[FigureData, list[str]]:
    """A figure's data and its metrics, one panel each (none: nothing to draw, for ``why``)."""
    data = _data(table, make)
    names = data.extra.get("names") or []
    if not names or data.empty:
        raise _Nothing(why)
    return data, names


def _grid(n: int, ncols: int = 3, w: float = 4.4, h: float = 3.3) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    width = max(w * ncols, 9.0 if n == 1 else 0.0)  # room for the title and legend
    fig = Figure(figsize=(width, h * nrows + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _depth_axes(ax, xlabel: str) -> None:
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(xlabel, fontsize=8.5)
    ax.axvline(0.8, color="0.55", ls=":", lw=0.9)
    ax.grid(alpha=0.25, lw=0.6)
    ax.tick_params(labelsize=8)


def _maybe_log(ax, values: pd.Series, metric: str, table: str | None = None) -> None:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if use_log(metric, v.tolist(), table):
        ax.set_yscale("log")


def panel_note(ax, text: str) -> None:
    """A note inside a panel that has nothing (or nothing visible) to show, saying why."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=8,
            color="0.25", wrap=True,
            bbox={"boxstyle": "round,pad=0.4", "fc": "#fff8e1", "ec": "0.6", "lw": 0.6})


def _flat_note(ax, values: Iterable[pd.Series], what: str) -> None:
    """Note a panel whose values are all missing or all 0."""
    vals = [pd.to_numeric(v, errors="coerce") for v in values]
    v = pd.concat(vals) if vals else pd.Series(dtype=float)
    v = v[np.isfinite(v)]
    if v.empty:
        panel_note(ax, f"no finite {what} value: nothing to draw")
    elif (v == 0).all():
        panel_note(ax, f"{what} is 0 everywhere: the line lies on the x axis")


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


def plain_ticks(fig: Figure) -> Figure:
    """No offset or scientific-notation corner labels ("1e-5+9.999e-1"): every linear axis
    shows its tick values in full, so a curve near 1 reads as 0.9995, not as an offset."""
    from matplotlib.ticker import ScalarFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            fmt = axis.get_major_formatter()
            if isinstance(fmt, ScalarFormatter):
                fmt.set_useOffset(False)
                fmt.set_scientific(False)
    return fig


def _style_handles(styles: dict[str, str], color: str = "0.3") -> list:
    return [Line2D([], [], color=color, ls=ls, lw=1.6, label=name) for name, ls in styles.items()]


def _run_rows(n_runs: int, height: float) -> tuple[Figure, Any]:
    """A figure of one full-width panel per run, stacked (the heatmaps)."""
    fig = Figure(figsize=(10, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots(n_runs, 1, squeeze=False).ravel()


def _block_heatmap(fig: Figure, ax: Any, mat: np.ndarray, run: str, n_blocks: int, label: str,
                   norm: Any = None) -> None:
    """One run's heatmap: a row of ``mat`` per module or step (y), its blocks over relative
    depth (x), with a colorbar named ``label``."""
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest", norm=norm,
                   extent=(0, 1, mat.shape[0] - 0.5, -0.5))
    ax.set_xlim(0, 1)
    ax.set_xlabel(BLOCK_AXIS + f"  ({n_blocks} blocks)", fontsize=8.5)
    ax.set_title(run, fontsize=10)
    ax.tick_params(labelsize=8)
    fig.colorbar(im, ax=ax, label=label, fraction=0.04, pad=0.01)


def _empty(title: str, message: str) -> Figure:
    fig = Figure(figsize=(6, 2), dpi=DPI)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=10, color="0.35")
    return fig


class _Nothing(Exception):
    """Raised by a figure function with nothing to draw; its message says why."""


def _frame(data: FigureData, why: str) -> pd.DataFrame:
    """The figure's rows; none: nothing to draw, for the reason ``why``."""
    if data.frame.empty:
        raise _Nothing(why)
    return data.frame


def _figure(title: str) -> Callable[[Callable[..., Figure]], Callable[..., Figure]]:
    """Declare a figure's title: the decorated function draws the panels, and this sets the
    title (a suptitle the function set itself is appended to it) or, when the function raises
    ``_Nothing``, returns the titled figure that says why nothing is drawn."""

    def wrap(draw: Callable[..., Figure]) -> Callable[..., Figure]:
        @functools.wraps(draw)
        def plot(*args: Any, **kwargs: Any) -> Figure:
            try:
                fig = draw(*args, **kwargs)
            except _Nothing as why:
                return _empty(title, str(why))
            own = fig.get_suptitle()
            fig.suptitle(f"{title}; {own}" if own else title, fontsize=12, fontweight="bold")
            return fig

        return plot

    return wrap


def _nice(metric: str, table: str | None = None) -> str:
    return metric_label(metric, table)


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


def _run_curve(ax: Any, frame: pd.DataFrame, run: str, metric: str, x: str, value: str,
               color: str) -> bool:
    """One run's ``metric`` (column ``value``) against ``x``: markers on a line with the rows'
    CI bars; False where the run has no such rows. One style for the sweep and steer curves."""
    g = frame[(frame[RUN] == run) & (frame["metric"] == metric)].sort_values(x)
    if g.empty:
        return False
    y = pd.to_numeric(g[value], errors="coerce").to_numpy(float)
    ax.errorbar(g[x].to_numpy(float), y, yerr=_yerr(g, y), color=color, marker="o", ms=4,
                capsize=3, lw=1.6)
    return True


# ----------------------------------------------------------------------------- Fig. 1-3


@_figure("Fig. 1 - Base vs SFT representations by depth (x: hidden state j / L)")
def plot_pair_metrics(metrics: pd.DataFrame | FigureData,
                      colors: dict[str, str] | None = None) -> Figure:
    """Fig. 1: base-vs-SFT similarity (CKA, cosine, mean shift) by depth, CI bands if given."""
    data, names = _named(metrics, N.pair_data, "no pair metrics (model = pair) in this table")
    df = data.frame
    runs, pal = _runs(df, colors)
    fig, axes = _grid(len(names))
    noise = data.extra.get("noise")
    for ax, metric in zip(axes, names):
        sub = df[df["metric"].astype(str) == metric]
        gap = metric in NEAR_ONE_METRICS and near_one(sub["value"])
        if gap:  # a similarity a hair below 1: its distance from 1, on a log axis
            sub = one_minus(sub)
        for r in runs:
            g = sub[sub[RUN] == r]
            if len(g):
                _line(ax, g, pal[r], "-", r)
            if noise is not None and len(noise):
                band = noise[(noise[RUN] == r) & (noise["metric"] == metric)]
                _noise_band(ax, one_minus(band) if gap else band)
        ax.set_title(f"1 - {_nice(metric)} (log: {_nice(metric)} near 1)" if gap
                     else _nice(metric), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        if gap:
            ax.set_yscale("log")
            zero = sub[sub["value"] == 0]
            if len(zero):
                ax.text(0.02, 0.97, f"{len(zero)} point(s) exactly 1 (not drawn on a log axis)",
                        transform=ax.transAxes, fontsize=7.5, va="top", color="0.35")
        else:
            _maybe_log(ax, sub["value"], metric)
        _flat_note(ax, [sub["value"]], _nice(metric))
    _legend(fig, _run_handles(runs, pal))
    return fig


NEAR_ONE_METRICS = ("cka", "cosine_similarity")
NEAR_ONE = 0.99  # every value at least this (and one below 1): plot the distance from 1


def near_one(values: pd.Series) -> bool:
    """True when a similarity is so close to 1 that a linear axis shows a flat line at 1."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(float)
    v = v[np.isfinite(v)]
    return bool(len(v)) and bool(v.min() >= NEAR_ONE) and bool((v < 1).any())


def one_minus(df: pd.DataFrame) -> pd.DataFrame:
    """``1 - value`` (intervals swapped: ``1 - ci_high`` is the new low end)."""
    out = df.copy()
    out["value"] = 1.0 - pd.to_numeric(out["value"], errors="coerce")
    if {"ci_low", "ci_high"} <= set(out.columns):
        lo = pd.to_numeric(out["ci_low"], errors="coerce")
        hi = pd.to_numeric(out["ci_high"], errors="coerce")
        out["ci_low"], out["ci_high"] = 1.0 - hi, 1.0 - lo
    return out


def _noise_band(ax, band: pd.DataFrame) -> None:
    """The base-vs-base noise floor (analyze's model ``noise``) as a grey band."""
    if band.empty:
        return
    band = band.sort_values("rel_depth")
    ax.fill_between(band["rel_depth"].to_numpy(float), band["ci_low"].to_numpy(float),
                    band["ci_high"].to_numpy(float), color="0.55", alpha=0.22, lw=0,
                    label="noise floor (base vs base)")


@_figure("Fig. 2 - Single-model metrics by depth, base (solid) vs SFT (dashed), x: j / L")
def plot_single_metrics(metrics: pd.DataFrame | FigureData,
                        colors: dict[str, str] | None = None) -> Figure:
    """Fig. 2: single-model metrics by depth, base solid and SFT dashed, one panel each."""
    data, names = _named(metrics, N.single_data,
                         "no single-model metrics (model = base/sft) in this table")
    df = data.frame
    runs, pal = _runs(df, colors)
    fig, axes = _grid(len(names), ncols=3 if len(names) <= 9 else 4)
    for ax, metric in zip(axes, names, strict=True):
        sub = df[df["metric"].astype(str) == metric]
        for r in runs:
            for model in ("base", "sft"):
                g = sub[(sub[RUN] == r) & (sub["model"].astype(str) == model)]
                if len(g):
                    _line(ax, g, pal[r], MODEL_STYLE[model], None)
        ax.set_title(_nice(metric), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        _maybe_log(ax, sub["value"], metric)
        _flat_note(ax, [sub["value"]], _nice(metric))
    _legend(fig, _run_handles(runs, pal) + _style_handles({"base": "-", "SFT": "--"}))
    return fig


@_figure("Fig. 3 - Logit lens: next-token prediction from each hidden state (x: j / L)")
def plot_logit_lens(probe: pd.DataFrame | FigureData,
                    colors: dict[str, str] | None = None) -> Figure:
    """Fig. 3: logit-lens next-token accuracy (base, SFT, agreement) and loss by depth."""
    data = _data(probe, N.lens_data)
    if data.empty:
        raise _Nothing("empty probe table")
    df = data.frame
    runs, pal = _runs(df, colors)
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    kind = {m: N.probe_kind(m) for m in metrics}
    acc = [m for m in metrics if kind[m] == "accuracy"]
    agree = [m for m in metrics if kind[m] == "agreement"]
    loss = [m for m in metrics if kind[m] == "loss"]
    other = [m for m in metrics if kind[m] == "other"]
    # Panels: each accuracy metric (agreement overlaid on the first), each loss, the rest.
    panels: list[tuple[str, list[str]]] = []
    for i, m in enumerate(acc):
        panels.append((m, [m, *agree] if i == 0 else [m]))
    if not acc:
        panels += [(m, [m]) for m in agree]
    panels += [(m, [m]) for m in loss + other]
    panels = panels[:6]
    fig, axes = _grid(len(panels))
    styles_used: dict[str, str] = {}
    for ax, (name, members) in zip(axes, panels):
        vals = []
        for metric in members:
            sub = df[df["metric"].astype(str) == metric]
            vals.append(sub["value"])
            for r in runs:
                for model, g in sub[sub[RUN] == r].groupby("model", sort=False):
                    is_agree = kind[metric] == "agreement"
                    ls = ":" if is_agree else MODEL_STYLE.get(model, "-.")
                    key = "agreement (base vs SFT)" if is_agree else (
                        {"base": "base", "sft": "SFT"}.get(model, model))
                    styles_used.setdefault(key, ls)
                    _line(ax, g, pal[r], ls, None)
        ax.set_title(_nice(name) + (" + agreement" if len(members) > 1 else ""), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        if kind[name] in ("accuracy", "agreement"):
            top = float(pd.concat(vals).max()) if vals else 1.0
            ax.set_ylim(-0.02, max(1.0, top + 0.02) if np.isfinite(top) else 1.02)
        elif vals:
            _maybe_log(ax, pd.concat(vals), name)
        _flat_note(ax, vals, _nice(name))
    _legend(fig, _run_handles(runs, pal) + _style_handles(styles_used))
    return fig


# ----------------------------------------------------------------------------- Fig. 4


@_figure("Fig. 3b - Output distributions of the pair by depth (x: j / L)")
def plot_distributions(probe: pd.DataFrame | FigureData,
                       colors: dict[str, str] | None = None) -> Figure:
    """Fig. 3b: KL(SFT || base) of the lens by depth, each model's KL to its own output by
    depth, and URIAL's token-shift shares at the output (with intervals)."""
    data = _data(probe, N.distribution_data)
    if data.empty:
        raise _Nothing("no kl_pair / kl_to_final / shift rows (probe a pair with --kl)")
    df = data.frame
    runs, pal = _runs(df, colors)
    fig, axes = _grid(3)
    styles: dict[str, str] = {}
    for ax, metric in zip(axes[:2], ("kl_pair", "kl_to_final")):
        sub = df[df["metric"] == metric]
        for r in runs:
            for model, g in sub[sub[RUN] == r].groupby("model", sort=False):
                ls = MODEL_STYLE.get(model, "-.")
                styles.setdefault({"base": "base", "sft": "SFT"}.get(model, model), ls)
                _line(ax, g, pal[r], ls, None)
        ax.set_title(_nice(metric, "probe"), fontsize=10)
        _depth_axes(ax, LAYER_AXIS)
        vals = sub["value"]
        if (pd.to_numeric(vals, errors="coerce") > 0).any():
            ax.set_yscale("symlog", linthresh=max(float(vals[vals > 0].min()), 1e-12))
            ax.set_ylim(bottom=0)  # a KL is never negative
        _flat_note(ax, [vals], _nice(metric, "probe"))
    _shift_bars(axes[2], data.extra["shift"], runs, pal)
    _legend(fig, _run_handles(runs, pal) + _style_handles(styles))
    return fig


def _shift_bars(ax, shift: pd.DataFrame, runs: Sequence[str], pal: dict[str, str]) -> None:
    """Grouped bars: unshifted / marginal / shifted share per run and pair, with intervals."""
    kinds = ["shift_unshifted", "shift_marginal", "shift_shifted"]
    groups = [(r, m) for r in runs for m in dict.fromkeys(shift[shift[RUN] == r]["model"])]
    width = 0.8 / max(len(groups), 1)
    for i, (r, m) in enumerate(groups):
        g = shift[(shift[RUN] == r) & (shift["model"] == m)].set_index("metric").reindex(kinds)
        y = pd.to_numeric(g["value"], errors="coerce").to_numpy(float)
        x = np.arange(len(kinds)) + (i - (len(groups) - 1) / 2) * width
        ax.bar(x, y, width, color=pal[r], yerr=_yerr(g, y), capsize=2)
    ax.set_xticks(range(len(kinds)), ["unshifted\n(rank 1)", "marginal\n(rank 2-3)",
                                      "shifted\n(rank > 3)"], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_title("token shift at the output (base rank of SFT's top-1)", fontsize=10)
    ax.grid(alpha=0.25, lw=0.6, axis="y")
    if not groups:
        panel_note(ax, "no shift rows")


@_figure("Fig. 12 - Which signal predicts the causal effect of a block?")
def plot_signal_cause(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 12: each analysis signal's Spearman correlation with the causal effect per block
    (with its interval), and the signals beside the effect by depth (each scaled to [0, 1])."""
    del colors
    s, df = data.summary, data.frame
    if s.empty:
        raise _Nothing("no analysis signal per block beside the ablate run")
    fig, axes = _grid(2, ncols=2)
    pal = palette(list(s["signal"]))
    y = s["rho"].to_numpy(float)
    ax = axes[0]
    ax.barh(range(len(s)), y, color=[pal[k] for k in s["signal"]],
            xerr=_yerr(s.rename(columns={"rho": "value"}), y), capsize=3)
    ax.set_yticks(range(len(s)), [k.replace("_", " ") for k in s["signal"]], fontsize=8)
    ax.axvline(0, color="0.4", lw=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rho with the causal effect (over blocks)", fontsize=8.5)
    ax = axes[1]
    n = float(data.extra.get("n_blocks") or 1)
    for name, g in df.groupby("signal", sort=False):
        g = g.sort_values("block")
        v = g["value"].to_numpy(float)
        span = np.ptp(v) if len(v) else 0.0
        scaled = (v - v.min()) / span if span > 0 else np.zeros_like(v)
        ax.plot((g["block"].to_numpy(float) + 0.5) / n, scaled,
                color="black" if name == "cause" else pal.get(name, "0.5"),
                lw=2.4 if name == "cause" else 1.3, marker="o", ms=2.5,
                label="causal effect" if name == "cause" else name.replace("_", " "))
    _depth_axes(ax, BLOCK_AXIS)
    ax.set_ylabel("scaled to [0, 1]", fontsize=8.5)
    ax.legend(fontsize=7.5, frameon=False)
    return fig


@_figure("Fig. 4 - Weight change Base -> SFT by block (x: block (b + 0.5) / L)")
def plot_weight_change(weights: pd.DataFrame | FigureData,
                       colors: dict[str, str] | None = None) -> Figure:
    """Fig. 4: attention weight change by block, relative and Frobenius, one line per run."""
    data = _data(weights, N.weight_data)
    module = data.extra.get("module")
    if module is None or data.empty:
        raise _Nothing("no per-block rows in weights table")
    df = data.frame
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    names = [m for m in ("relative", "frobenius") if m in metrics] or metrics[:2]
    names += ["unchanged_frac"] if "unchanged_frac" in metrics else []  # update sparsity
    runs, pal = _runs(df, colors)
    fig, axes = _grid(len(names), ncols=len(names), w=5.2 if len(names) < 3 else 4.4)
    for ax, metric in zip(axes, names):
        sub = df[df["metric"].astype(str) == metric]
        for r in runs:
            g = sub[sub[RUN] == r]
            if len(g):
                _line(ax, g, pal[r], "-", r)
        ax.set_title(f"{module}: {_nice(metric, 'weights')}", fontsize=10)
        _depth_axes(ax, BLOCK_AXIS)
        if metric == "unchanged_frac":  # a share: the whole range, 0 = every entry changed
            ax.set_ylim(-0.03, 1.03)
        else:
            _flat_note(ax, [sub["value"]], f"{module} {metric} change")
    _legend(fig, _run_handles(runs, pal))
    return fig


@_figure("Fig. 4b - Weight change per module (x: block (b + 0.5) / L)")
def plot_weight_heatmap(weights: pd.DataFrame | FigureData, metric: str | None = None) -> Figure:
    """Fig. 4b: per-module weight change, one heatmap (module x block) per run."""
    df = weights.extra["all"] if isinstance(weights, FigureData) else with_depth(weights,
                                                                                 "block")
    if df.empty:
        raise _Nothing("no per-block rows in weights table")
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    metric = metric or ("relative" if "relative" in metrics else metrics[0])
    df = df[df["metric"].astype(str) == metric]
    runs = run_labels(df)
    mods_all = list(dict.fromkeys(df["module"].astype(str)))
    fig, axes = _run_rows(len(runs), 0.4 * len(mods_all) * len(runs) + 1.4 * len(runs) + 0.8)
    fig.suptitle(f"metric: {metric}")
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
        _block_heatmap(fig, ax, mat, r, nb, metric)
        ax.set_yticks(range(len(mods)), mods, fontsize=8)
        if np.all(np.nan_to_num(mat) == 0):
            panel_note(ax, f"every module's {metric} change is 0 or missing")
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
MAX_HEATMAPS = 6  # heatmaps per run in Fig. 5


@_figure("Fig. 5 - Correlation of metrics across layers (Pearson r)")
def plot_correlation(corr: pd.DataFrame | FigureData) -> Figure:
    """Fig. 5: Pearson correlation across layers between metrics; one row per run, one
    annotated heatmap per model (base, SFT, pair)."""
    if isinstance(corr, FigureData):
        corr = corr.frame
    if corr.empty:
        raise _Nothing("empty correlation table")
    df = N.with_run(corr)
    if "model" not in df.columns:
        df["model"] = "all"
    df["model"] = df["model"].astype(str)
    runs = run_labels(df)[:4]
    present = list(dict.fromkeys(df["model"]))
    models = [m for m in MODEL_ORDER if m in present] + [m for m in present
                                                         if m not in MODEL_ORDER]
    models = models[:MAX_HEATMAPS]  # a long chain: the first pair and stages (all in the table)
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


# ----------------------------------------------------------------------------- Fig. 6


@_figure("Fig. 6 - Layer swapping: score after swapping one segment of blocks")
def plot_swap(swap: pd.DataFrame | FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 6: metric after swapping one segment of blocks, both directions, with CIs.

    One-segment masks are lines over the segment centre; multi-segment masks are hollow
    markers at the mean centre of their segments, annotated with the mask. The unswapped
    models are horizontal reference lines in the run's colour (base dotted, SFT dash-dot).
    """
    data = _data(swap, N.swap_data)
    swapped, orig = data.extra["swapped"], data.extra["orig"]
    if swapped.empty:
        raise _Nothing("no swapped configurations in this table")
    both = pd.concat([swapped, orig])
    pal = _colors(both, colors)
    runs = [r for r in run_labels(both) if r in pal]
    directions = list(dict.fromkeys(swapped["direction"].astype(str)))
    dstyle = {d: DIRECTION_STYLES[i % len(DIRECTION_STYLES)] for i, d in enumerate(directions)}
    ostyle = {"base": (0, (1, 1.5)), "sft": "-."}
    panels = swap_panels(swapped)
    fig, axes = _grid(len(panels), ncols=2, w=5.4, h=3.6)
    orig_names: dict[str, object] = {}
    for ax, (metric, head) in zip(axes, panels):
        sub = swapped[swapped["metric"].astype(str) == metric]
        if head:
            sub = sub[sub["head"].map(N.head_text) == head]
        for r in runs:
            for d in directions:
                g = sub[(sub[RUN] == r) & (sub["direction"].astype(str) == d)].copy()
                if g.empty:
                    continue
                g["pos"] = g["mask"].map(single_position)
                single = g[g["pos"].notna()].sort_values("pos")
                y = pd.to_numeric(single["value"], errors="coerce").to_numpy(float)
                x = single["pos"].to_numpy(float)
                if len(single):
                    ax.errorbar(x, y, yerr=_yerr(single, y), color=pal[r], ls=dstyle[d],
                                lw=1.6, marker="o", ms=4, capsize=3, elinewidth=1)
                for row in g[g["pos"].isna()].itertuples(index=False):
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
                same_head = og[og["head"].map(N.head_text) == head]
                row = (same_head if len(same_head) else og).iloc[0]
                ls = ostyle.get(name, (0, (4, 2, 1, 2)))
                orig_names.setdefault(name, ls)
                ax.axhline(float(row["value"]), color=pal[r], ls=ls, lw=1.1, alpha=0.85)
        ax.set_title(_nice(metric) + (f"  (head: {head})" if head else ""), fontsize=10)
        _depth_axes(ax, SEGMENT_AXIS)
        _maybe_log(ax, sub["value"], metric)
    handles = _run_handles(runs, pal) + _style_handles({f"swap {d}": s for d, s in dstyle.items()})
    handles += [Line2D([], [], color="0.3", ls=s, lw=1.1,
                       label=f"original {n}" if n in ("base", "sft") else f"no swap: {n}")
                for n, s in orig_names.items()]
    _legend(fig, handles, ncol=min(len(handles), 4))
    return fig


# ----------------------------------------------------------------------------- Fig. 7


@_figure("Fig. 7 - Segment LoRA sweep: score by mask (bottom segment first)")
def plot_sweep_bars(summary: pd.DataFrame | FigureData,
                    colors: dict[str, str] | None = None) -> Figure:
    """Fig. 7: score per LoRA mask with CIs; full depth highlighted, p-values annotated; a
    panel whose scores are all 0 (or all equal) says so instead of showing empty bars."""
    data = _data(summary, N.sweep_data)
    df = _frame(data, "empty sweep summary")
    runs, pal = _runs(df, colors)
    metrics = N.sweep_metrics(df)
    masks = sorted(dict.fromkeys(df["mask"]), key=mask_sort_key)
    w = max(6.5, 0.55 * len(masks) * max(1, len(runs)) + 2)
    fig = Figure(figsize=(min(w, 16), 3.8 * len(metrics) + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(metrics), 1, squeeze=False).ravel()
    width = 0.8 / max(1, len(runs))
    summ = data.summary
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
            if np.isfinite(hi).any():
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
        note = _sweep_note(summ, metric)
        if note:
            panel_note(ax, note)
    _legend(fig, _run_handles(runs, pal))
    return fig


def _sweep_note(summ: pd.DataFrame, metric: str) -> str:
    """Why a sweep panel shows nothing to compare (every run's scores all 0 or all equal)."""
    if summ is None or summ.empty:
        return ""
    rows = summ[summ["metric"] == metric]
    if rows.empty:
        return ""
    size = N._size_text(float(rows["items"].min()), float(rows["seeds"].min()))
    if rows["all_zero"].all():
        return (f"every mask scores 0 on {metric}{size}:\n"
                "the bars have no height, nothing to compare")
    if rows["all_same"].all():
        return f"every mask scores the same on {metric}{size}"
    return ""


def _p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


@_figure("Fig. 7b - Score by trained segment position (one-segment masks)")
def plot_inverted_u(summary: pd.DataFrame | FigureData,
                    colors: dict[str, str] | None = None) -> Figure:
    """Fig. 7b: score by position of a one-segment mask; full depth as a dashed line."""
    data = _data(summary, N.sweep_data)
    df = data.frame.copy()
    if df.empty:
        raise _Nothing("empty sweep summary")
    df["pos"] = df["mask"].map(single_position)
    single = df[df["pos"].notna()]
    if single.empty:
        raise _Nothing("no one-segment masks in this sweep")
    runs, pal = _runs(df, colors)
    metrics = [m for m in N.sweep_metrics(df, limit=99) if m in set(single["metric"])][:3]
    fig, axes = _grid(len(metrics), ncols=3, w=5.0, h=3.5)
    for ax, metric in zip(axes, metrics):
        for r in runs:
            if not _run_curve(ax, single, r, metric, "pos", "mean", pal[r]):
                continue
            full = df[(df[RUN] == r) & (df["metric"] == metric)
                      & df["mask"].map(lambda m: is_mask(m) and set(m) == {"1"})]
            if len(full):
                ax.axhline(float(full["mean"].iloc[0]), color=pal[r], ls="--", lw=1)
        ax.set_title(_nice(metric), fontsize=10)
        _depth_axes(ax, MASK_AXIS)
        note = _sweep_note(data.summary, metric)
        if note:
            panel_note(ax, note)
    _legend(fig, _run_handles(runs, pal) + _style_handles({"full depth (11...1)": "--"}))
    return fig


# ----------------------------------------------------------------------------- Fig. 8-9


@_figure("Fig. 8 - Training-free mask proposal: per-segment score of each method")
def plot_suggest(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 8: each suggest method's per-segment score (higher = a better segment to tune) by
    segment depth; the segments its proposal trains are filled, ineligible ones crossed."""
    df = data.frame
    if df.empty or "signal" not in df.columns:
        raise _Nothing("no per-segment scores (suggest.csv)")
    sc = df[df["signal"].astype(str) == "score"]
    runs = run_labels(sc)
    methods = list(dict.fromkeys(sc["method"].astype(str)))
    fig, axes = _grid(len(runs), ncols=2, w=5.4, h=3.4)
    mcol = palette(methods)
    for ax, r in zip(axes, runs):
        g = sc[sc[RUN] == r]
        for m in methods:
            gm = g[g["method"].astype(str) == m].sort_values("depth")
            if gm.empty:
                continue
            x, y = gm["depth"].to_numpy(float), gm["score"].to_numpy(float)
            ax.plot(x, y, color=mcol[m], lw=1.6, marker="o", ms=3, label=m)
            ch = gm["chosen"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
            el = gm["eligible"].astype(str).str.lower().isin(["true", "1"]).to_numpy() if (
                "eligible" in gm.columns) else np.ones(len(gm), bool)
            ax.plot(x[ch], y[ch], ls="none", marker="o", ms=8, color=mcol[m], alpha=0.45)
            ax.plot(x[~el], y[~el], ls="none", marker="x", ms=7, color="0.3")
        ax.set_title(r, fontsize=10)
        ax.set_ylabel("score (1 = best segment)", fontsize=8.5)
        _depth_axes(ax, "segment centre depth (blocks)")
        _flat_note(ax, [g["score"]], "every method's score")
    handles = [Line2D([], [], color=mcol[m], lw=2, label=m) for m in methods]
    handles += [Line2D([], [], ls="none", marker="o", ms=8, color="0.5", alpha=0.45,
                       label="proposed (trained) segment"),
                Line2D([], [], ls="none", marker="x", ms=7, color="0.3",
                       label="not eligible (edge rule)")]
    lines = _validation_lines(data.extra.get("validation"))
    if lines and axes:  # under the first panel's title (the layout makes room for it)
        axes[0].set_title("\n".join([runs[0], *lines]), fontsize=8.5)
    _legend(fig, handles, ncol=min(len(handles), 4))
    return fig


def _validation_lines(val: pd.DataFrame | None, most: int = 6) -> list[str]:
    """One line per validated proposal: its rank among the swept masks beside the prior-only
    mask's and the expected rank of a random interior one-segment mask."""
    if val is None or not len(val):
        return []
    out = []
    for row in val.head(most).to_dict("records"):
        n = row.get("n_masks")
        rank = row.get("rank")
        text = (f"sweep check: {row.get('method')} {row.get('mask')} ranks "
                + (f"{rank:.0f} of {n:.0f}" if np.isfinite(rank) else "(not swept)"))
        prior = row.get("prior_rank")
        if prior is not None and np.isfinite(prior):
            text += f"; prior-only {row.get('prior_mask')}: {prior:.0f}"
        rnd = row.get("random_rank")
        if rnd is not None and np.isfinite(rnd):
            text += f"; random interior one-segment mask: {rnd:.1f} on average"
        out.append(text)
    if len(val) > most:
        out.append(f"... and {len(val) - most} more (suggest_validation table)")
    return out


@_figure("Fig. 9 - Segment LoRA training loss")
def plot_loss_curves(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 9: training loss by step of each tune run (one line per run)."""
    df = _frame(data, "no logged training loss")
    runs, pal = _runs(df, colors)
    fig, axes = _grid(1, ncols=1, w=7.5, h=3.6)
    ax = axes[0]
    summ = data.summary.set_index(RUN) if len(data.summary) else pd.DataFrame()
    for r in runs:
        g = df[df[RUN] == r].sort_values("step")
        lab = r
        if r in summ.index and "mask" in summ.columns and summ.loc[r, "mask"]:
            lab = f"{r} ({summ.loc[r, 'mask']})"
        ax.plot(g["step"], g["loss"], color=pal[r], lw=1.6, marker="o" if len(g) <= 40 else None,
                ms=3, label=lab)
    ax.set_xlabel("optimizer step", fontsize=8.5)
    ax.set_ylabel("training loss", fontsize=8.5)
    ax.grid(alpha=0.25)
    if len(df) and df.groupby(RUN).size().max() <= 1:
        panel_note(ax, "one logged loss per run: points, not curves")
    ax.legend(fontsize=8, frameon=False)
    return fig


# ----------------------------------------------------------------------------- Fig. 10


@_figure("Fig. 10 - Training dynamics by depth (x: block (b + 0.5) / L)")
def plot_dynamics(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 10: the update of each block at the last recorded step, the gradient norm by block
    (mean over the recorded steps), and, when a weights run is in the report, the base-vs-SFT
    weight change by block beside them."""
    df = _frame(data, "no recorded dynamics (dynamics.csv)")
    weights = data.extra.get("weights")
    grad = data.extra["grad"]
    runs = run_labels(df)
    wruns = run_labels(weights.frame) if weights is not None else []
    pal = _colors(pd.concat([df[[RUN]], weights.frame[[RUN]]]) if weights is not None
                  else df, colors)
    n = 3 if weights is not None else 2
    fig, axes = _grid(n, ncols=n, w=4.6, h=3.4)
    ax = axes[0]
    for r in runs:
        g = df[df[RUN] == r]
        _line(ax, g, pal[r], "-", r, ycol="update_norm")
    step = ", ".join(f"{int(s)}" for s in dict.fromkeys(df["step"]))
    ax.set_title(f"weight change since step 0, at step {step}", fontsize=10)
    _depth_axes(ax, BLOCK_AXIS)
    _flat_note(ax, [df["update_norm"]], "the update norm")
    ax = axes[1]
    for r in runs:
        g = grad[grad[RUN] == r]
        _line(ax, g, pal[r], "-", r, ycol="grad_norm")
    ax.set_title("gradient norm (mean over recorded steps)", fontsize=10)
    _depth_axes(ax, BLOCK_AXIS)
    _maybe_log(ax, grad["grad_norm"], "grad_norm", "dynamics")
    _flat_note(ax, [grad["grad_norm"]], "the gradient norm")
    if weights is not None:
        ax = axes[2]
        w = weights.frame
        metric = weights.extra.get("metric", "")
        for r in wruns:
            _line(ax, w[(w[RUN] == r) & (w["metric"].astype(str) == metric)], pal[r], "--", r)
        ax.set_title(f"base -> SFT: {weights.extra.get('module')} {_nice(metric, 'weights')}",
                     fontsize=10)
        _depth_axes(ax, BLOCK_AXIS)
    handles = _run_handles(runs, pal)
    if weights is not None:
        handles += [Line2D([], [], color=pal[r], lw=2.2, ls="--", label=f"{r} (weights)")
                    for r in wruns if r not in runs]
    _legend(fig, handles)
    return fig


@_figure("Fig. 10b - Gradient norm by block and step")
def plot_grad_heatmap(data: FigureData) -> Figure:
    """Fig. 10b: gradient norm of every block (x) at every recorded step (y), one heatmap per
    run; blank cells are blocks that do not train."""
    from matplotlib.colors import LogNorm

    steps = data.extra.get("steps")
    if steps is None or steps.empty:
        raise _Nothing("no recorded dynamics (dynamics.csv)")
    runs = run_labels(steps)
    fig, axes = _run_rows(len(runs), 2.6 * len(runs) + 0.8)
    for ax, r in zip(axes, runs):
        g = steps[steps[RUN] == r]
        nb = int(g["block"].max()) + 1
        if "n_blocks" in g.columns and g["n_blocks"].notna().any():
            nb = max(nb, int(g["n_blocks"].dropna().iloc[0]))
        order = sorted(g["step"].unique())
        mat = np.full((len(order), nb), np.nan)
        for row in g.itertuples(index=False):
            mat[order.index(row.step), int(row.block)] = float(row.grad_norm)
        pos = mat[np.isfinite(mat) & (mat > 0)]
        norm = LogNorm(pos.min(), pos.max()) if len(pos) and pos.max() > 100 * pos.min() else None
        _block_heatmap(fig, ax, mat, r, nb, "gradient norm", norm=norm)
        ticks = list(range(len(order)))
        if len(ticks) > 12:
            ticks = ticks[:: math.ceil(len(ticks) / 12)]
        ax.set_yticks(ticks, [str(int(order[i])) for i in ticks], fontsize=8)
        ax.set_ylabel("optimizer step", fontsize=8.5)
        if not len(pos):
            panel_note(ax, "no block has a non-zero gradient")
    return fig


# ----------------------------------------------------------------------------- Fig. 7c


@_figure("Fig. 7c - Seed robustness: each seed's score per mask")
def plot_seed_spread(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 7c: every seed's score per mask (dots), the mean (bar) and the range (line)."""
    df = _frame(data, "no mask with two or more seeds")
    runs, pal = _runs(df, colors)
    fig, axes = _grid(len(runs), ncols=1, w=max(6.0, 0.55 * df["mask"].nunique() + 2),
                      h=3.4)
    for ax, r in zip(axes, runs):
        g = df[df[RUN] == r]
        masks = [m for m in data.extra["order"] if m in set(g["mask"])]
        for i, m in enumerate(masks):
            v = g[g["mask"] == m]["value"].to_numpy(float)
            jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(1)
            ax.plot(i + jitter, v, ls="none", marker="o", ms=4, color=pal[r], alpha=0.75)
            ax.plot([i, i], [np.nanmin(v), np.nanmax(v)], color=pal[r], lw=1.2, alpha=0.6)
            ax.plot([i - 0.25, i + 0.25], [np.nanmean(v)] * 2, color="0.15", lw=2)
        ax.set_xticks(range(len(masks)), masks, fontsize=8, rotation=45 if len(masks) > 10
                      else 0)
        metric = str(g["metric"].iloc[0])
        ax.set_ylabel(_nice(metric), fontsize=8.5)
        ax.set_title(r, fontsize=10)
        ax.grid(alpha=0.25, axis="y")
        ax.tick_params(labelsize=8)
    handles = [Line2D([], [], ls="none", marker="o", ms=5, color="0.4", label="one seed"),
               Line2D([], [], color="0.15", lw=2, label="mean over seeds"),
               Line2D([], [], color="0.4", lw=1.2, label="range")]
    _legend(fig, handles, ncol=3)
    return fig


# ----------------------------------------------------------------------------- steering


@_figure("Steering the base model along the base -> SFT shift")
def plot_steer(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Steering: each metric against the scale of the added base->SFT vector (0 = the base)."""
    df = _frame(data, "no steering results (steer.csv)")
    metrics = list(dict.fromkeys(df["metric"].astype(str)))[:6]
    runs, pal = _runs(df, colors)
    fig, axes = _grid(len(metrics), ncols=3, w=4.4, h=3.2)
    for ax, metric in zip(axes, metrics):
        for r in runs:
            _run_curve(ax, df, r, metric, "scale", "value", pal[r])
        ax.axvline(0, color="0.55", ls=":", lw=0.9)
        ax.set_title(_nice(metric), fontsize=10)
        ax.set_xlabel("scale of the added vector (0 = unsteered base)", fontsize=8.5)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
    _legend(fig, _run_handles(runs, pal))
    return fig


# ----------------------------------------------------------------------------- Fig. 6b


@_figure("Fig. 6b - Interpolating each segment from base (alpha 0) to SFT (alpha 1)")
def plot_interpolation(data: pd.DataFrame | FigureData,
                       colors: dict[str, str] | None = None) -> Figure:
    """Fig. 6b: score against alpha per interpolated mask (``swap --alphas``): the base with
    that mask's blocks ``(1 - alpha) base + alpha SFT``; one colour per mask, one line style
    per run (and head); hollow markers where the swap table's base / swap rows stand in for
    alpha 0 / 1."""
    data = _data(data, N.interp_data)
    df = data.frame
    if data.empty:
        raise _Nothing("no interpolated rows (swap --alphas)")
    metrics = list(dict.fromkeys(df["metric"].astype(str)))
    primary = N.primary_metric(metrics)
    metrics = ([primary] if primary else []) + [m for m in metrics if m != primary]
    metrics = metrics[:4]
    masks = sorted(dict.fromkeys(df["mask"]), key=mask_sort_key)
    pal = palette(masks)
    groups = list(dict.fromkeys(zip(df[RUN], df["head"], strict=True)))
    styles = {g: DIRECTION_STYLES[i % len(DIRECTION_STYLES)] for i, g in enumerate(groups)}
    fig, axes = _grid(len(metrics), ncols=2, w=5.0, h=3.4)
    for ax, metric in zip(axes, metrics):
        sub = df[df["metric"].astype(str) == metric]
        for (r, h), ls in styles.items():
            for mask in masks:
                g = sub[(sub[RUN] == r) & (sub["head"] == h) & (sub["mask"] == mask)]
                g = g.sort_values("alpha")
                if g.empty:
                    continue
                x, y = g["alpha"].to_numpy(float), g["value"].to_numpy(float)
                ax.plot(x, y, color=pal[mask], ls=ls, lw=1.6)
                own = (g["source"] == "mix").to_numpy() if "source" in g else np.ones(len(g),
                                                                                     bool)
                err = _yerr(g, y)
                if err is not None:
                    ax.errorbar(x, y, yerr=err, fmt="none", ecolor=pal[mask], capsize=2.5,
                                lw=0.9, alpha=0.7)
                ax.plot(x[own], y[own], "o", color=pal[mask], ms=4)
                ax.plot(x[~own], y[~own], "o", mfc="white", mec=pal[mask], ms=5)
        ax.set_xlim(-0.04, 1.04)
        ax.set_xlabel("alpha (0 = base blocks, 1 = SFT blocks)", fontsize=8.5)
        ax.set_title(_nice(metric), fontsize=10)
        ax.grid(alpha=0.25)
        ax.tick_params(labelsize=8)
        _maybe_log(ax, sub["value"], metric)
        _flat_note(ax, [sub["value"]], _nice(metric))
    handles = [Line2D([], [], color=pal[m], lw=2.2, marker="o", label=f"mask {m}")
               for m in masks]
    if len(groups) > 1:
        handles += [Line2D([], [], color="0.3", ls=ls, lw=1.6,
                           label=f"{r}" + (f" (head {h})" if h else ""))
                    for (r, h), ls in styles.items()]
    handles.append(Line2D([], [], color="0.3", ls="", marker="o", mfc="white",
                          label="base / swap row (alpha 0 / 1)"))
    _legend(fig, handles, ncol=min(len(handles), 4))
    return fig


# ----------------------------------------------------------------------------- MoE routing

PAIR_STYLES = ("-", "--", "-.", ":")


@_figure("Fig. 13 - Router drift Base -> SFT by depth (x: block (b + 0.5) / L)")
def plot_routing_drift(data: FigureData, colors: dict[str, str] | None = None) -> Figure:
    """Fig. 13: router drift by depth: JS divergence and top-k overlap per sparse block, one
    colour per run, one line style per pair (a chain's stages), CI bands where bootstrapped."""
    df = data.frame
    if df.empty or "metric" not in df.columns or not df["metric"].isin(N.DRIFT_METRICS).any():
        raise _Nothing("no routing drift rows (routing.csv of an MoE analyze)")
    runs, pal = _runs(df, colors)
    pairs = list(dict.fromkeys(df["model"].astype(str)))
    styles = {p: PAIR_STYLES[i % len(PAIR_STYLES)] for i, p in enumerate(pairs)}
    fig, axes = _grid(2, ncols=2, w=5.2)
    for ax, metric in zip(axes, N.DRIFT_METRICS):
        sub = df[df["metric"].astype(str) == metric]
        for r in runs:
            for p in pairs:
                g = sub[(sub[RUN] == r) & (sub["model"].astype(str) == p)]
                if len(g):
                    _line(ax, g, pal[r], styles[p], r)
        ax.set_title(_nice(metric, "routing"), fontsize=10)
        _depth_axes(ax, BLOCK_AXIS)
        _flat_note(ax, [sub["value"]], _nice(metric, "routing"))
    handles = _run_handles(runs, pal) + (_style_handles(styles) if len(pairs) > 1 else [])
    _legend(fig, handles)
    return fig


def _block_expert(g: pd.DataFrame) -> tuple[np.ndarray, list[int]]:
    """A block x expert matrix of ``value`` (rows: the blocks present, in order)."""
    blocks = sorted(int(b) for b in g["block"].unique())
    n_exp = int(g["expert"].max()) + 1
    mat = np.full((len(blocks), n_exp), np.nan)
    for b, e, v in zip(g["block"], g["expert"], pd.to_numeric(g["value"], errors="coerce")):
        mat[blocks.index(int(b)), int(e)] = float(v)
    return mat, blocks


def _heat(fig: Figure, ax, mat: np.ndarray, blocks: list[int], title: str, label: str,
          cmap: str = "viridis", centre: bool = False) -> None:
    vmax = float(np.nanmax(np.abs(mat))) if np.isfinite(mat).any() else 1.0
    kw = {"vmin": -vmax, "vmax": vmax} if centre else {}
    im = ax.imshow(mat, aspect="auto", cmap=cmap, interpolation="nearest", **kw)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block", fontsize=8.5)
    ax.set_xlabel("expert", fontsize=8.5)
    ax.set_title(title, fontsize=9.5)
    ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=ax, label=label, fraction=0.05, pad=0.02)


@_figure("Fig. 13b - Expert load per block, base vs SFT")
def plot_expert_load(data: FigureData) -> Figure:
    """Fig. 13b: expert load (share of top-k slots) per block and expert, base and SFT side
    by side with their difference, one row per run and pair."""
    load = data.extra.get("load", pd.DataFrame())
    if load is None or load.empty:
        raise _Nothing("no expert load rows (routing.csv of an MoE analyze)")
    groups = list(load.groupby(RUN, sort=False))
    rows = sum(max(1, g["model"].nunique() - 1) for _, g in groups)
    fig = Figure(figsize=(13, 2.6 * rows + 0.9), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False)
    i = 0
    for r, g in groups:
        base = g[g["model"].astype(str) == "base"]
        mb, blocks = _block_expert(base) if len(base) else (None, [])
        for model in [m for m in dict.fromkeys(g["model"].astype(str)) if m != "base"] or [""]:
            ax_b, ax_s, ax_d = axes[i]
            i += 1
            if mb is not None:
                _heat(fig, ax_b, mb, blocks, f"{r}: base", "load")
            s = g[g["model"].astype(str) == model]
            if len(s):
                ms, sblocks = _block_expert(s)
                _heat(fig, ax_s, ms, sblocks, f"{r}: {model}", "load")
                if mb is not None and ms.shape == mb.shape:
                    _heat(fig, ax_d, ms - mb, blocks, f"{r}: {model} - base", "load change",
                          cmap="coolwarm", centre=True)
    return fig


@_figure("Fig. 13c - Weight change per routed expert")
def plot_expert_weights(data: FigureData) -> Figure:
    """Fig. 13c: weight change of each routed expert (weights.csv rows of module ``expert``),
    block x expert, one panel per run."""
    ex = data.extra.get("experts", pd.DataFrame())
    if ex is None or ex.empty:
        raise _Nothing("no per-expert rows (weights.csv of an MoE pair)")
    runs = run_labels(ex)
    fig, axes = _grid(len(runs), ncols=2, w=5.6, h=3.6)
    for ax, r in zip(axes, runs):
        g = ex[ex[RUN] == r]
        mat, blocks = _block_expert(g)
        metric = str(g["metric"].iloc[0])
        _heat(fig, ax, mat, blocks, r, _nice(metric, "weights"))
    return fig
