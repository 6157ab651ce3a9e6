"""The report's sections as a list of figure specs: adding a figure = adding a spec to ``SPECS``.

A :class:`FigureSpec` names the run tables it reads, one ``prepare`` function that computes
the numbers (:mod:`sftscope.report.numbers`), the figures drawn from them
(:mod:`sftscope.report.plots`), the findings sentences written from the *same* numbers, and the
tables written beside the figures. The findings functions below only format values of the
``summary`` their figure's data carries: a sentence cannot cite a number the figure does not
draw, and words such as "falls" / "rises" come from :func:`numbers.trend_word`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sftscope.metric_registry import label as metric_label
from sftscope.metrics.paired import PairedDiff
from sftscope.report import numbers as N
from sftscope.report import plots
from sftscope.report.numbers import RUN, FigureData
from sftscope.report.rules import LENS_RISE, TOP
from sftscope.report.runs import Run, combined, spec_of
from sftscope.segments import block_text

Plot = Callable[[FigureData, dict[str, str]], Any]
TableOut = tuple[str, str, pd.DataFrame]


@dataclass(frozen=True)
class FigureSpec:
    """One section of the report: what it reads, computes, draws, says and writes."""

    key: str
    title: str
    intro: str
    reads: tuple[str, ...]   # run tables (runs.TABLES / runs.DERIVED); any one is enough
    what: str                 # "No {what} in these runs" when none is there
    prepare: Callable[[Sequence[Run]], FigureData | None]
    figures: tuple[tuple[str, str | Callable[[FigureData], str], Plot], ...] = ()
    findings: Callable[[FigureData], list[str]] = lambda d: []
    tables: Callable[[FigureData], list[TableOut]] = lambda d: []
    notes: Callable[[FigureData], list[str]] = field(default=lambda d: d.notes)

    def absent(self, runs: Sequence[Run] = ()) -> str:
        """Why the section is empty: the table it needs is missing (say which command writes
        it), or present without these rows (never ask for a file the runs have)."""
        files = [f"{spec_of(t).stem}{'' if '.' in spec_of(t).stem else '.csv'}"
                 for t in self.reads]
        have = [f for t, f in zip(self.reads, files)
                if any(t in getattr(r, "tables", ()) for r in runs)]
        if have:
            return f"No {self.what} in these runs: their {', '.join(have)} has none."
        need = ", ".join(f"{f} (`sftscope {spec_of(t).command}`)"
                         for t, f in zip(self.reads, files))
        return f"No {self.what} in these runs (needs {need})."


# ----------------------------------------------------------------------------- formatting


def f(x: Any, nd: int = 3) -> str:
    """A number for a sentence (n/a for missing)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "n/a"
    if not np.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1000 or abs(x) < 0.001):
        return f"{x:.{nd}g}"
    text = f"{x:.{nd}f}"
    whole = round(x)
    if float(text) == whole and x != whole:  # 0.99952 is not "1.000": digits until it differs
        d = nd
        while d < 15 and float(f"{x:.{d}f}") == whole:
            d += 1
        text = f"{x:.{d + 1}f}".rstrip("0")
    return text


def _prefix(label: str, many: bool) -> str:
    return f"[{label}] " if many else ""


def _many(summary: pd.DataFrame) -> bool:
    return RUN in summary.columns and summary[RUN].nunique() > 1


def _wide(df: pd.DataFrame, index: list[str], column: str) -> pd.DataFrame:
    """Pivot ``value`` (and CIs) to one column per ``column`` value, for reading."""
    vals = [c for c in ("value", "ci_low", "ci_high") if c in df.columns
            and pd.to_numeric(df[c], errors="coerce").notna().any()]
    order = list(dict.fromkeys(df[column].astype(str)))
    d = df.copy()
    d[column] = d[column].astype(str)
    for c in vals:
        d[c] = pd.to_numeric(d[c], errors="coerce")
    wide = d.pivot_table(index=index, columns=column, values=vals, aggfunc="first", sort=False)
    cols = [(c, name) for name in order for c in vals if (c, name) in wide.columns]
    wide = wide[cols]
    wide.columns = [n if c == "value" else f"{n} {c}" for c, n in cols]
    return wide.reset_index().sort_values(index, kind="stable").reset_index(drop=True)


def _by_layer(name: str, title: str, *, per_model: bool = False
              ) -> Callable[[FigureData], list[TableOut]]:
    """A figure's one table: its metrics as columns, a row per run, (model,) and layer j."""
    index = [RUN, *(["model"] if per_model else []), "layer", "rel_depth"]

    def tables(data: FigureData) -> list[TableOut]:
        return [(name, title, _wide(data.frame, index, "metric"))]

    return tables


def _combined(name: str) -> Callable[[Sequence[Run]], pd.DataFrame]:
    return lambda runs: combined(runs, name)


def _or_none(make: Callable[..., FigureData], name: str, items: str | None = None
             ) -> Callable[[Sequence[Run]], FigureData | None]:
    """The figure's numbers from the runs' ``name`` tables (and, with ``items``, their per-item
    table for paired tests), or None when no run has the table."""
    def prepare(runs: Sequence[Run]) -> FigureData | None:
        df = combined(runs, name)
        if df.empty:
            return None
        data = make(df, combined(runs, items)) if items else make(df)
        return None if data.empty else data
    return prepare


# ----------------------------------------------------------------------------- Fig. 1


def trend_phrase(row: Any) -> str:
    """``falls to 0.72`` / ``rises to 0.99`` / ``stays level at 0.98`` from a profile row."""
    word = row["top_trend"]
    if word == "stays level":
        return f"stays level at {f(row['last'])}"
    if word in ("falls", "rises"):
        return f"{word} to {f(row['last'])}"
    return f"is {f(row['last'])}"


def onset_sentence(layers: Sequence[int], shift: Sequence[float]) -> str | None:
    """The headline of a pair: where the mean shift leaves exactly 0 and how it grows to the
    top (``unchanged up to j = 12 (mean shift exactly 0); the change starts at j = 13 (mean
    shift 0.497) and grows 15x to the top (7.300 at j = 30)``). None without finite values."""
    pts = sorted((int(j), float(v)) for j, v in zip(layers, shift) if np.isfinite(v))
    if not pts:
        return None
    moved = [(j, v) for j, v in pts if v != 0]
    top_j, top_v = pts[-1]
    if not moved:
        return (f"the mean shift is exactly 0 at every j (0..{top_j}): no change in the "
                f"pooled states")
    j0, v0 = moved[0]
    same = [j for j, v in pts if j < j0]
    head = (f"unchanged up to j = {same[-1]} (mean shift exactly 0); the change starts at "
            f"j = {j0}" if same else f"the change is there from j = {j0}")
    head += f" (mean shift {f(v0)})"
    if top_j == j0:
        return head
    ratio = top_v / v0
    if ratio >= 1.5:
        times = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
        return head + f" and grows {times}x to the top ({f(top_v)} at j = {top_j})"
    if ratio <= 1 / 1.5:
        return head + f" and shrinks to {f(top_v)} at the top (j = {top_j})"
    return head + f" and is {f(top_v)} at the top (j = {top_j})"


def pair_findings(data: FigureData) -> list[str]:
    s = data.summary
    many = _many(s)
    out = []
    frame = data.frame
    for r, g in s.groupby(RUN, sort=False):
        parts = []
        ms = frame[(frame[RUN] == r) & (frame["metric"].astype(str) == "mean_shift")]
        headline = onset_sentence(ms["layer"], ms["value"]) if len(ms) else None
        if headline:
            parts.append(headline[:1].upper() + headline[1:])
        rows = {m: row for m, row in zip(g["metric"], g.to_dict("records"))}
        if "cka" in rows:
            c = rows["cka"]
            if np.isfinite(c["boundary"]) and c["top_trend"] != "n/a":
                parts.append(f"CKA is at least {f(c['early_min'])} over the first 80 % of depth "
                             f"(j/L <= {TOP}), {f(c['boundary'])} at j/L = "
                             f"{f(c['boundary_depth'], 2)}, and {trend_phrase(c)} at the top "
                             f"(lowest {f(c['min'])} at j/L = {f(c['min_depth'], 2)})")
            else:
                parts.append(f"CKA ranges {f(c['min'])} to {f(c['max'])}")
        if "cosine_similarity" in rows:
            c = rows["cosine_similarity"]
            parts.append(f"cosine similarity is lowest at j/L = {f(c['min_depth'], 2)} "
                         f"({f(c['min'])})")
        if "mean_shift" in rows:
            c = rows["mean_shift"]
            ratio = (f", {f(c['max'] / c['early_median'], 2)}x its median over the first 80 %"
                     if np.isfinite(c["early_median"]) and c["early_median"] > 0 else "")
            parts.append(f"mean shift is largest at j/L = {f(c['max_depth'], 2)} "
                         f"({f(c['max'])}{ratio})")
        if parts:
            out.append(_prefix(r, many) + "; ".join(parts) + ".")
    return out


pair_tables = _by_layer("fig1_pair_metrics", "pair metrics by layer j")


# ----------------------------------------------------------------------------- Fig. 2


def single_findings(data: FigureData) -> list[str]:
    s, gaps, names = data.summary, data.extra["gaps"], data.extra["names"]
    many = _many(s)
    out = []
    for r in N.run_labels(s) if len(s) else []:
        parts = []
        if len(gaps):
            for row in gaps[gaps[RUN] == r].to_dict("records")[:6]:
                parts.append(f"{row['metric']} {f(100 * row['gap'], 2)} % (j/L = "
                             f"{f(row['depth'], 2)})")
        if parts:
            out.append(_prefix(r, many) + "Largest base-vs-SFT gap per metric: "
                       + ", ".join(parts) + ".")
        first = s[(s[RUN] == r) & (s["model"] == "base") & (s["metric"] == names[0])]
        if len(first) and first["n"].iloc[0] >= 3:
            row = first.iloc[0]
            out.append(_prefix(r, many) + f"Base {names[0]} peaks at j/L = "
                       f"{f(row['max_depth'], 2)} ({f(row['max'])}) and ends at "
                       f"{f(row['last'])} in the last layer.")
    return out


single_tables = _by_layer("fig2_single_metrics", "single-model metrics by layer j", per_model=True)


# ----------------------------------------------------------------------------- Fig. 3


def lens_findings(data: FigureData) -> list[str]:
    s = data.summary
    many = _many(s)
    out = []
    for r, g in s.groupby(RUN, sort=False):
        parts = []
        acc = [m for m in dict.fromkeys(g["metric"]) if N.probe_kind(m) == "accuracy"]
        for model in ("base", "sft"):
            row = g[(g["model"] == model) & (g["metric"] == acc[0])] if acc else g.iloc[0:0]
            if row.empty or row["n"].iloc[0] < 2:
                continue
            row = row.iloc[0]
            name = "SFT" if model == "sft" else model
            if not row["max"] > 0:
                parts.append(f"{name} {acc[0]} is 0 at every layer")
                continue
            parts.append(f"{name} {acc[0]}: mean {f(row['lens_early_mean'])} over j/L <= "
                         f"{LENS_RISE}, half of its peak {f(row['max'])} first reached at j/L "
                         f"= {f(row['half_peak_depth'], 2)}, {f(row['last'])} at the top")
        agree = [m for m in dict.fromkeys(g["metric"]) if N.probe_kind(m) == "agreement"]
        if agree:
            row = g[g["metric"] == agree[0]].iloc[0]
            parts.append(f"base/SFT {agree[0]} is {f(row['last'])} at the top (min "
                         f"{f(row['min'])})")
        if parts:
            out.append(_prefix(r, many) + "; ".join(parts) + ".")
    return out


lens_tables = _by_layer("fig3_logit_lens", "logit lens by layer j", per_model=True)


# Fig. 1's numbers, with the noise floor of the runs that wrote one.
pair_prepare = _or_none(N.pair_data, "metrics", "noise")


def noise_findings(data: FigureData) -> list[str]:
    """Where the pair leaves the base-vs-base noise band (analyze's noise floor)."""
    noise = data.extra.get("noise")
    if noise is None or noise.empty:
        return []
    many = _many(data.frame)
    return [_NOISE_SENTENCE.format(
        lead=_prefix(row[RUN], many), metric=metric_label(row["metric"]),
        where=("at no layer" if row["first_outside"] is None else
               f"at {row['n_outside']} of {row['n_layers']} layers, first at j = "
               f"{row['first_outside']}"),
        top_layer=row["top_layer"], top=f(row["top"]), low=f(row["band_low"]),
        high=f(row["band_high"])) for row in N.noise_verdicts(data.frame, noise).to_dict("records")]


_NOISE_SENTENCE = ("{lead}{metric} lies outside the base-vs-base noise band (two disjoint halves "
                   "of the data) {where}; at the top (j = {top_layer}) {top} against the band "
                   "[{low}, {high}].")


# ----------------------------------------------------------------------------- Fig. 3b


def distribution_findings(data: FigureData) -> list[str]:
    """Where KL(SFT || base) leaves 0 and what it reaches; the token-shift shares."""
    s, shift = data.summary, data.extra.get("shift", pd.DataFrame())
    many = _many(data.frame)
    out = []
    for row in s.to_dict("records"):
        lead = _prefix(f"{row[RUN]} {row['model']}", many)
        if not np.isfinite(row["first_positive"]):
            out.append(f"{lead}KL(SFT || base) of the lens is exactly 0 at every layer "
                       f"(0..{int(row['top_layer'])}): the two give the same distributions.")
            continue
        start = ("positive from j = 0" if not np.isfinite(row["zero_until"]) else
                 f"exactly 0 up to j = {int(row['zero_until'])} and first positive at j = "
                 f"{int(row['first_positive'])}")
        out.append(f"{lead}KL(SFT || base) of the lens is {start}; {f(row['top'])} nats at "
                   f"the output (j = {int(row['top_layer'])}), largest {f(row['max'])} at j = "
                   f"{int(row['max_layer'])}.")
    for (r, m), g in shift.groupby([RUN, "model"], sort=False) if len(shift) else ():
        v = g.set_index("metric")["value"]
        out.append(f"{_prefix(f'{r} {m}', many)}At the output the base ranks the SFT's top-1 "
                   f"token first at {f(100 * v.get('shift_unshifted', np.nan), 1)} % of the "
                   f"scored positions, 2nd-3rd at {f(100 * v.get('shift_marginal', np.nan), 1)} "
                   f"% and lower at {f(100 * v.get('shift_shifted', np.nan), 1)} % (URIAL's "
                   f"unshifted / marginal / shifted).")
    for row in data.extra.get("tuned", pd.DataFrame()).to_dict("records"):
        ratio = row["tuned"] / row["logit"] if row["logit"] > 0 else np.nan
        out.append(f"{_prefix(row[RUN], many)}{row['model']}: over the early states (j / L <= "
                   f"{N.EARLY}, {row['n_states']} states) the tuned lens's mean KL to the "
                   f"output is {f(row['tuned'])} nats against the logit lens's "
                   f"{f(row['logit'])}" + (f" ({f(ratio, 2)}x)." if np.isfinite(ratio)
                                           else "."))
    return out


distribution_tables = _by_layer("fig3b_distributions", "KL by depth and token shift",
                                per_model=True)


# ----------------------------------------------------------------------------- Fig. 4


def _scope(row: dict) -> str:
    """The granularity of a module comparison when it is not plain (routed experts as one)."""
    scope = row.get("module_scope")
    return f" ({scope})" if isinstance(scope, str) and scope else ""


def _module_clause(row: dict, verb: str) -> str:
    """``; of the modules, X <verb> most ... and Y least`` where the row compared modules, else
    nothing: one wording for the weight-change and the training-dynamics findings."""
    if not isinstance(row.get("most_module"), str):
        return ""
    return (f"; of the modules{_scope(row)}, {row['most_module']} {verb} most on average "
            f"({f(row['most_value'])}) and {row['least_module']} least "
            f"({f(row['least_value'])})")


def weight_findings(data: FigureData) -> list[str]:
    s = data.summary
    many = _many(s)
    out = []
    for row in s.to_dict("records"):
        text = (f"{row['module']} {row['metric']} weight change is largest at block "
                f"{row['max_block']} (relative depth {f(row['max_depth'], 2)}, {f(row['max'])}); "
                f"mean {f(row['bottom'])} over the bottom {row['n_edge']} of {row['n_blocks']} "
                f"blocks, {f(row['middle'])} in the middle, {f(row['top'])} over the top "
                f"{row['n_edge']}")
        text += _module_clause(row, "changes")
        out.append(_prefix(row[RUN], many) + text + ".")
    return out


def weight_tables(data: FigureData) -> list[TableOut]:
    module, all_ = data.extra["module"], data.extra["all"]
    out = [("fig4_weight_change", f"{module} weight change by block",
            _wide(data.frame, [RUN, "block", "rel_depth"], "metric"))]
    hm_metric = "relative" if "relative" in set(all_["metric"].astype(str)) else str(
        all_["metric"].iloc[0])
    hm = all_[all_["metric"].astype(str) == hm_metric]
    out.append(("fig4b_weight_modules", f"{hm_metric} weight change per module and block",
                _wide(hm, [RUN, "block", "rel_depth"], "module")))
    bl = data.extra["blockless"]
    if len(bl):
        out.append(("weights_other_modules", "modules outside the blocks (embeddings, head, ...)",
                    bl.drop(columns=["n_blocks"], errors="ignore")))
    return out


# ----------------------------------------------------------------------------- Fig. 5


def corr_findings(data: FigureData) -> list[str]:
    s = data.summary
    many = _many(s)
    out = []
    if s.empty:
        return out
    for (r, m), g in s.groupby([RUN, "model"], sort=False):
        pairs = ", ".join(f"{a} ~ {b} r = {f(v, 2)}"
                          for a, b, v in zip(g["metric_a"], g["metric_b"], g["r"]))
        out.append(_prefix(str(r), many) + f"{m}: strongest correlations {pairs}.")
    return out


# ----------------------------------------------------------------------------- Fig. 6


def _extreme(word: str, n_tied: int, seg: int, k: int, mask: str, value: str) -> str:
    if n_tied > 1:
        return f"{n_tied} segments tie for the {word} ({value})"
    return f"{word} single segment {seg + 1}/{k} ({mask}, {value})"


def swap_extremes(row: dict, delta: Callable[[float], str]) -> str:
    """Best and worst one-segment swap, saying so when several tie. A winner is named only when
    the paired test on the same items (``row['paired']``, best - worst) excludes 0, or, for a
    run without per-item scores, when the two intervals do not overlap; otherwise the sentence
    gives the range and says the difference is not significant at this n."""
    paired = row.get("paired")
    paired = paired if isinstance(paired, PairedDiff) else None
    undecided = (not paired.significant) if paired is not None else bool(row.get("overlap"))
    if not undecided:
        best = _extreme("best", row.get("n_best", 1), row["best_seg"], row["k"],
                        row["best_mask"], f"{f(row['best'])}{delta(row['best'])}")
        worst = _extreme("worst", row.get("n_worst", 1), row["worst_seg"], row["k"],
                         row["worst_mask"], f"{f(row['worst'])}{delta(row['worst'])}")
        text = f"{best}, {worst} [{row['metric']}]"
        return text + (f" ({N.paired_text(paired, row['metric'])})" if paired else "")

    def where(key: str) -> str:
        n = row.get(f"n_{key}", 1)
        seg = f"{n} tied segments" if n > 1 else f"segment {row[f'{key}_seg'] + 1}/{row['k']}"
        return f"{f(row[key])}{delta(row[key])} ({seg})"

    ends = sorted(("best", "worst"), key=lambda k: row[k])
    text = (f"single-segment swaps range from {where(ends[0])} to {where(ends[1])} "
            f"[{row['metric']}]")
    if paired is None:
        return text + " (their intervals overlap: no segment is clearly better or worse)"
    return (text + f"; the {N.paired_text(paired, row['metric'])} is not significant at "
            "this n: no segment is clearly better or worse")


def swap_findings(data: FigureData) -> list[str]:
    s, orig = data.summary, data.extra["orig"]
    runs = N.run_labels(data.frame)
    many = len(runs) > 1
    out = []
    for r in runs:
        parts = []
        rows = s[s[RUN] == r].to_dict("records") if len(s) else []
        for row in rows:
            name = row["direction"] + (f" (head {row['head']})" if row["head"] else "")
            if row["same"]:
                parts.append(f"{name}: every single-segment swap gives the same "
                             f"{row['metric']} ({f(row['best'])})")
                continue

            def delta(v: float, row: dict = row) -> str:
                ref = row["host_value"]
                return f", {v - ref:+.4f} vs {row['host']}" if np.isfinite(ref) else ""

            parts.append(f"{name}: " + swap_extremes(row, delta))
        if rows:
            metric = rows[0]["metric"]
            o = orig[(orig[RUN] == r) & (orig["metric"].astype(str) == metric)]
            if len(o):
                refs = ", ".join(f"{N.swap_original_name(row)} {f(row['value'])}"
                                 for _, row in o.iterrows())
                parts.append(f"originals: {refs}")
        if parts:
            out.append(_prefix(r, many) + "; ".join(parts) + ".")
    return out


def swap_tables(data: FigureData) -> list[TableOut]:
    t = data.frame.drop(columns=["n_blocks"], errors="ignore").copy()
    t.insert(t.columns.get_loc("mask") + 1, "segment_centre", t["mask"].map(N.mask_centre))
    return [("fig6_swap", "swap results", t.reset_index(drop=True))]


# ----------------------------------------------------------------------------- Fig. 6b


def interp_findings(data: FigureData) -> list[str]:
    s = data.summary
    if s.empty:
        return []
    metric = N.primary_metric(s["metric"])
    s = s[s["metric"] == metric]
    many = _many(s)
    out = []
    for (r, h), g in s.groupby([RUN, "head"], sort=False):
        parts = []
        for row in g.to_dict("records"):
            if row["same"]:
                parts.append(f"{row['mask']}: the same at every alpha ({f(row['best'])})")
                continue
            parts.append(f"{row['mask']}: best at alpha {f(row['best_alpha'], 2)} "
                         f"({f(row['best'])}; alpha 0 {f(row['at0'])}, alpha 1 "
                         f"{f(row['at1'])})")
        if parts:
            head = f" (head {h})" if h else ""
            out.append(_prefix(str(r), many) + f"{metric} of the base with one mask's blocks "
                       f"interpolated towards SFT{head}: " + "; ".join(parts) + ".")
    return out


def interp_tables(data: FigureData) -> list[TableOut]:
    t = data.frame.drop(columns=["n_blocks"], errors="ignore")
    return [("fig6b_interpolation", "score by alpha per interpolated mask",
             t.reset_index(drop=True))]


# ----------------------------------------------------------------------------- Fig. 7


def sweep_findings(data: FigureData) -> list[str]:
    s = data.summary
    if s.empty:
        return []
    s = s[s["primary"]] if s["primary"].any() else s
    many = _many(s)
    out = []
    for row in s.to_dict("records"):
        size = N._size_text(row["items"], row["seeds"])
        if row["all_same"]:
            out.append(_prefix(row[RUN], many) + f"{row['metric']}: every one of the "
                       f"{row['n_masks']} masks scores {f(row['best_mean'])}{size}, so there is "
                       "nothing to compare.")
            continue
        best = (f"{row['n_best']} masks tie for the best at {f(row['best_mean'])}"
                if row.get("n_best", 1) > 1 else
                f"best mask {row['best']} {f(row['best_mean'])}")
        worst = (f"{row['n_worst']} masks tie for the lowest at {f(row['worst_mean'])}"
                 if row.get("n_worst", 1) > 1 else
                 f"worst {row['worst']} {f(row['worst_mean'])}")
        if row.get("best_overlaps") and row.get("n_best", 1) == 1:
            best += (f" (its interval overlaps the next best, {row['second']}: no clear "
                     f"winner)")
        text = f"{row['metric']}: {best}, {worst}"
        if row["full"]:
            p = row["best_p"]
            ptxt = (f", p = {f(p)} vs full depth" if np.isfinite(p) and row["best"] != row["full"]
                    else "")
            text += (f"; full depth {row['full']} {f(row['full_mean'])}; {row['n_beat']} of "
                     f"{row['n_masks'] - 1} masks beat it{ptxt}")
        text += size
        out.append(_prefix(row[RUN], many) + text + ".")
    return out


def sweep_tables(data: FigureData) -> list[TableOut]:
    return [("fig7_sweep", "sweep summary", N.mask_table(data.frame))]


# ----------------------------------------------------------------------------- Fig. 8-9


def suggest_prepare(runs: Sequence[Run]) -> FigureData | None:
    have = [r for r in runs if "suggest" in r.tables or "suggest" in r.extra]
    data = N.suggest_data(have) if have else None
    if data is None or (data.empty and data.summary.empty):
        return None
    data.extra["validation"] = N.validation_data(combined(runs, "validation"))
    return data


def suggest_findings(data: FigureData) -> list[str]:
    s = data.summary
    if s.empty:
        return []
    many = _many(s)
    out = []
    for r, g in s.groupby(RUN, sort=False):
        chosen = g[g["method"] == "(chosen)"]
        if len(chosen):
            out.append(_prefix(r, many) + f"Proposed mask {chosen['mask'].iloc[0]}: "
                       f"{chosen['reason'].iloc[0]}")
        props = g[g["method"] != "(chosen)"]
        if len(props):
            out.append(_prefix(r, many) + "Each method's proposal: " + ", ".join(
                f"{m} {k}" for m, k in zip(props["method"], props["mask"])) + ".")
    val = data.extra.get("validation")
    if val is not None and len(val):
        for row in val.to_dict("records"):
            best = f"best {row.get('best_mask', '')} {f(row.get('best_score'))}"
            if np.isfinite(pd.to_numeric(row.get("rank"), errors="coerce")):
                where = (f"ranks {f(row['rank'], 0)} of {row.get('n_masks', '?')} swept masks "
                         f"({row.get('metric', '')} {f(row.get('score'))}; {best})")
            else:
                where = (f"was not among the {row.get('n_masks', '?')} swept masks "
                         f"({row.get('metric', '')}: {best})")
            out.append(_prefix(row[RUN], True) + f"{row['method']} proposal {row['mask']} "
                       f"{where}{_baselines(row)}.")
    return out


def _baselines(row: dict[str, Any]) -> str:
    """What a proposal without a signal would rank: the prior-only mask (segment centre
    nearest 30 % depth) and a random interior mask of its shape (its expected rank)."""
    parts = []
    if np.isfinite(pd.to_numeric(row.get("prior_rank"), errors="coerce")):
        parts.append(f"the prior-only mask {row.get('prior_mask', '')} ranks "
                     f"{f(row['prior_rank'], 0)}")
    if np.isfinite(pd.to_numeric(row.get("random_rank"), errors="coerce")):
        text = (f"a random interior mask of its shape {f(row['random_rank'], 1)} on average "
                f"(of {f(row.get('n_interior'), 0)})")
        share = pd.to_numeric(row.get("random_as_good"), errors="coerce")
        if np.isfinite(share):
            text += f", {share:.0%} of them rank as well or better"
        parts.append(text)
    return "; for comparison " + " and ".join(parts) if parts else ""


def suggest_tables(data: FigureData) -> list[TableOut]:
    out = []
    if len(data.frame):
        out.append(("fig8_suggest", "per-segment scores of each method", data.frame))
    if len(data.summary):
        out.append(("suggest_proposals", "proposals and reasons", data.summary))
    val = data.extra.get("validation")
    if val is not None and len(val):
        out.append(("suggest_validation", "proposals ranked among the swept masks, beside the "
                    "prior-only mask and random interior masks of its shape",
                    val.drop(columns=["n_blocks"], errors="ignore")))
    return out


def tune_prepare(runs: Sequence[Run]) -> FigureData | None:
    have = [r for r in runs if "tune" in r.tables or "loss_curve" in r.tables]
    return N.tune_data(have) if have else None


def tune_findings(data: FigureData) -> list[str]:
    s = data.summary
    many = _many(s)
    out = []
    for row in s.to_dict("records"):
        parts = []
        full = row.get("method") == "full"
        if row.get("mask"):
            parts.append(("full fine-tuning, " if full else "")
                         + f"mask {row['mask']}" + (f" (blocks {row['blocks']})"
                                                    if row.get("blocks") else ""))
        elif full and row.get("blocks"):
            parts.append(f"full fine-tuning of blocks {row['blocks']}")
        if row.get("rank") is not None and np.isfinite(float(row.get("rank") or np.nan)):
            parts.append(f"rank {f(row['rank'], 0)}")
        tp, full_p = row.get("trainable_params"), row.get("full_depth_params")
        if tp is not None and np.isfinite(float(tp)):
            txt = f"{int(tp):,} trainable parameters"
            if full_p is not None and np.isfinite(float(full_p)) and float(full_p) > 0:
                what = "all blocks' parameters" if full else "the full-depth budget"
                txt += f", {100 * float(tp) / float(full_p):.1f} % of {what} {int(full_p):,}"
            parts.append(txt)
        if "first_loss" in row and np.isfinite(row.get("first_loss", np.nan)):
            parts.append(f"loss {f(row['first_loss'])} -> {f(row['last_loss'])} over "
                         f"{row['logged']} logged step(s)"
                         + (f" ({f(row['steps'], 0)} steps)" if row.get("steps") else ""))
        if parts:
            out.append(_prefix(row[RUN], many) + "; ".join(parts) + ".")
    return out


def tune_tables(data: FigureData) -> list[TableOut]:
    out = [("tune_runs", "segment LoRA runs: mask, rank, budget", data.summary)]
    if len(data.frame):
        out.append(("fig9_loss", "training loss by step", data.frame))
    return out


# ----------------------------------------------------------------------------- Fig. 10


# Fig. 10's numbers, with the weight change of the runs that wrote one.
dynamics_prepare = _or_none(N.dynamics_data, "dynamics", "weights")


def dynamics_findings(data: FigureData) -> list[str]:
    s = data.summary
    many = _many(s)
    out = []
    for row in s.to_dict("records"):
        if not row.get("n_trained"):
            continue
        text = (f"At step {row['last_step']} (the last of {row['n_steps']} recorded), the "
                f"update is largest at block {row['max_block']} (relative depth "
                f"{f(row['max_depth'], 2)}, {f(row['max'])}); {row['n_trained']} of "
                f"{row['n_blocks']} blocks trained (blocks {row['first_trained']}-"
                f"{row['last_trained']})")
        if row["n_trained"] >= 3:
            text += (f", with mean update {f(row['bottom'])} over the lowest "
                     f"{row['n_edge']}, {f(row['middle'])} in the middle and {f(row['top'])} "
                     f"over the top {row['n_edge']} of them")
        if np.isfinite(row.get("grad_ratio", np.nan)) and row["first_trained"] != row[
                "last_trained"]:
            text += (f"; the gradient norm (mean over the recorded steps) is "
                     f"{f(row['grad_high'])} at block {row['last_trained']} and "
                     f"{f(row['grad_low'])} at block {row['first_trained']} "
                     f"({f(row['grad_ratio'], 2)}x)")
        text += _module_clause(row, "changed")
        out.append(_prefix(row[RUN], many) + text + ".")
    w = data.extra.get("weights")
    if w is not None and len(w.summary):
        for row in w.summary.to_dict("records"):
            out.append(_prefix(row[RUN], True) + f"base -> SFT {row['module']} "
                       f"{row['metric']} change (beside, dashed) is largest at relative depth "
                       f"{f(row['max_depth'], 2)} ({f(row['max'])}).")
    return out


def dynamics_tables(data: FigureData) -> list[TableOut]:
    steps = data.extra["steps"].drop(columns=["n_blocks"], errors="ignore")
    return [("fig10_dynamics", "update and gradient norm per block at the last recorded step",
             data.frame.drop(columns=["n_blocks"], errors="ignore")),
            ("fig10b_grad_heatmap", "gradient and update norm per block and recorded step",
             steps),
            ("dynamics_runs", "where each run's update is largest", data.summary)]


# ----------------------------------------------------------------------------- Fig. 7c


def seeds_prepare(runs: Sequence[Run]) -> FigureData | None:
    df = combined(runs, "seed_scores")
    if df.empty:
        return None
    primary = {r.label: str(r.record["primary_metric"]) for r in runs
               if r.record.get("primary_metric")}
    data = N.seed_data(df, primary)
    return None if data.empty else data


def seeds_findings(data: FigureData) -> list[str]:
    s = data.extra["runs"]
    many = _many(s)
    out = []
    for row in s.to_dict("records"):
        text = (f"{row['metric']} over seeds: best mask by mean {row['best']} "
                f"({f(row['best_mean'])}, sd {f(row['best_sd'])})")
        if row["n_common"]:
            text += (f", also the best in {row['best_in']} of the {row['n_common']} seeds every "
                     f"mask has")
        text += (f"; the most seed-sensitive mask is {row['most_variable']} (sd "
                 f"{f(row['most_sd'])}), the median sd over {row['n_masks']} masks "
                 f"{f(row['median_sd'])}")
        if row.get("full") and row["best"] != row["full"] and np.isfinite(row["gap"]):
            text += (f"; the best mask's lead over full depth {row['full']} is "
                     f"{f(row['gap'])}, {f(abs(row['gap']) / row['median_sd'], 2)}x the median "
                     f"sd" if row["median_sd"] > 0 else
                     f"; the best mask's lead over full depth {row['full']} is {f(row['gap'])}")
        out.append(_prefix(row[RUN], many) + text + ".")
    return out


# ----------------------------------------------------------------------------- steering


def steer_prepare(runs: Sequence[Run]) -> FigureData | None:
    """Fig. 11's numbers (paired tests from the runs' steer_items) and where each run's vectors
    were added."""
    data = _or_none(N.steer_data, "steer", "steer_items")(runs)
    if data is None:
        return None
    data.extra["vectors"] = {r.label: steer_vectors(r.record, r.n_blocks)
                             for r in runs if "steer" in r.tables}
    return data


def steer_vectors(record: dict[str, Any], n_blocks: int | None) -> dict[str, Any]:
    """Where a steer run added its vectors: ``layers`` (block-list text), ``direction`` and
    ``norms`` (one per layer), from run.json (``vectors`` and ``layers``, or an older run's
    single ``vector`` and ``layer``)."""
    vecs = record.get("vectors") or ([record["vector"]] if record.get("vector") else [])
    layers = record.get("layers")
    if layers is None and record.get("layer") is not None:
        layers = [record["layer"]]
    return {"layers": block_text(layers) if layers else None, "n_layers": len(layers or []),
            "direction": next((v.get("direction") for v in vecs if v.get("direction")), None),
            "norms": [v.get("norm") for v in vecs], "n_blocks": n_blocks}


def steer_metric_text(row: dict) -> str:
    """One metric's steering finding. A score names a better scale only when its paired test
    against scale 0 on the same items excludes 0 (``row['winner']``); otherwise it says no
    scale is distinguishable from the unsteered base at that n. A run without per-item scores
    falls back to the two intervals (a winner only when they do not overlap)."""
    metric = row["metric"]
    if row["same"]:
        return f"{metric} is {f(row['best'])} at every scale"
    if not row["is_score"]:
        return (f"{metric} goes from {f(row['first'])} at scale {f(row['first_scale'], 2)} to "
                f"{f(row['last'])} at scale {f(row['last_scale'], 2)}")
    paired = row.get("paired") or {}
    if paired:
        return _steer_paired_text(row, paired)
    if row.get("overlap"):
        n = f", n = {int(row['n'])}" if np.isfinite(row.get("n", np.nan)) else ""
        return (f"{metric}: no scale is clearly better than the unsteered base "
                f"({f(row['unsteered'])}; the best, scale {f(row['best_scale'], 2)}, gives "
                f"{f(row['best'])}, and their intervals overlap{n}; no per-item scores for a "
                "paired test)")
    delta = (f", {row['delta']:+.4f} vs the unsteered base {f(row['unsteered'])}"
             if np.isfinite(row["delta"]) else "")
    return (f"{metric} is best at scale {f(row['best_scale'], 2)} ({f(row['best'])}{delta}; "
            "intervals apart, no per-item scores for a paired test)")


def _scales(scales: Sequence[float]) -> str:
    return ("scale " if len(scales) == 1 else "scales ") + ", ".join(f(s, 2) for s in scales)


def _steer_paired_text(row: dict, paired: dict[float, PairedDiff]) -> str:
    """The paired wording of :func:`steer_metric_text`."""
    metric, win, u = row["metric"], row.get("winner"), f(row["unsteered"])
    worse = row.get("worse") or []
    tail = f"; {_scales(worse)} significantly worse (paired)" if worse else ""
    if win is not None:
        others = [s for s in row.get("better") or [] if s != win]
        also = f"; {_scales(others)} also better (paired)" if others else ""
        return (f"{metric} is best at scale {f(win, 2)} ({f(row['winner_value'])} against the "
                f"unsteered base {u}; {N.paired_text(paired[win], metric)}){also}{tail}")
    near = max(paired, key=lambda s: float(N.score(metric, paired[s].mean)))
    n = max(d.n for d in paired.values())
    text = f"{N.paired_text(paired[near], metric)}"
    if not worse:
        return (f"{metric}: no scale is distinguishable from the unsteered base ({u}) at "
                f"n = {n} (the best, scale {f(near, 2)}: {text}, not significant)")
    if set(worse) == set(paired):
        return (f"{metric}: every scale is significantly worse than the unsteered base ({u}; "
                f"the least bad, scale {f(near, 2)}: {text})")
    return (f"{metric}: no scale beats the unsteered base ({u}) at n = {n} (the best, scale "
            f"{f(near, 2)}: {text}, not significant){tail}")


def steer_findings(data: FigureData) -> list[str]:
    s = data.summary
    vectors = data.extra.get("vectors", {})
    out = []
    for r, g in s.groupby(RUN, sort=False) if len(s) else []:
        parts = [steer_metric_text(row) for row in g.to_dict("records")]
        v = vectors.get(str(r)) or {}
        where = ""
        if v.get("layers") is not None:
            where = (f"At hidden state j = {v['layers']}" if v.get("n_layers", 1) == 1 else
                     f"At hidden states j = {v['layers']} (one pass)")
            if v.get("n_blocks"):
                where += f" of {v['n_blocks']}"
            norms = [x for x in v.get("norms") or [] if x is not None]
            if v.get("direction"):
                norm = (f", norm {f(norms[0])}" if len(norms) == 1 else
                        f", norms {f(min(norms))}-{f(max(norms))}" if norms else "")
                where += f" ({v['direction']} vector{'s' if len(norms) > 1 else ''}{norm})"
            where += ": "
        if parts:
            out.append(_prefix(str(r), True) + where + "; ".join(parts) + ".")
    return out


# ----------------------------------------------------------------------------- scores


def scores_findings(data: FigureData) -> list[str]:
    df = data.frame
    many = df[RUN].nunique() > 1
    items = []
    for d in df.head(8).to_dict("records"):
        ci = ""
        if pd.notna(d.get("ci_low")) and pd.notna(d.get("ci_high")):
            ci = f" [{f(d['ci_low'])}, {f(d['ci_high'])}]"
        n = f" (n = {int(d['n'])})" if pd.notna(d.get("n")) else ""
        items.append(f"{_prefix(d[RUN], many)}{d['task']} {metric_label(d['metric'])}: "
                     f"{f(d['value'])}{ci}{n}")
    more = f" (+{len(df) - 8} more in the table)" if len(df) > 8 else ""
    out = ["; ".join(items) + more + "."] if items else []
    s = data.summary
    return out + [comparison_sentence(row) for row in (s.to_dict("records") if len(s) else [])]


def _n_text(row: dict) -> str:
    ns = [int(v) for v in (row.get("n_a"), row.get("n_b")) if pd.notna(v)]
    if not ns:
        return "at this n"
    return f"at n = {ns[0]}" if len(set(ns)) == 1 else f"at n = {ns[0]} and {ns[1]}"


def comparison_sentence(row: dict) -> str:
    """One task's best run against another: a winner only when the paired test on the items
    both scored excludes 0 (or, without per-item predictions, when the intervals do not
    overlap); otherwise "not distinguishable at n = N"."""
    what = f"{row['task']} {metric_label(row['metric'])}"
    a, b = f"{row['a']} ({f(row['value_a'])})", f"{row['b']} ({f(row['value_b'])})"
    paired = row.get("paired")
    if isinstance(paired, PairedDiff):
        test = N.paired_text(paired, row["metric"]).replace(" items", " shared items")
        if paired.significant:
            return f"{what}: {a} is better than {b}, {test}."
        return f"{what}: {a} and {b} are not distinguishable at n = {paired.n} ({test})."
    if row.get("overlap"):
        return (f"{what}: {a} and {b} are not distinguishable {_n_text(row)} (their intervals "
                "overlap or are missing; no per-item predictions shared for a paired test).")
    return (f"{what}: {a} is better than {b} (their intervals do not overlap; no per-item "
            "predictions shared for a paired test).")


# ----------------------------------------------------------------------------- MoE routing


def routing_prepare(runs: Sequence[Run]) -> FigureData | None:
    routing = combined(runs, "routing")
    weights = combined(runs, "weights")
    data = N.routing_data(routing, weights)
    if data.empty and data.extra["load"].empty and data.extra["experts"].empty:
        return None
    return data


def _ci(lo: Any, hi: Any) -> str:
    return f" [{f(lo, 4)}, {f(hi, 4)}]" if np.isfinite(lo) and np.isfinite(hi) else ""


def routing_findings(data: FigureData) -> list[str]:
    """Where the routers moved most, their top-k agreement, load entropies and the verdict
    of the concentration rule: every number from ``summary``."""
    s = data.summary
    out = []
    many = len(s) > 1
    for row in s.to_dict("records") if len(s) else []:
        label = _prefix(f"{row[RUN]}, {row['model']}", many)
        ov = ""
        if np.isfinite(row["min_overlap"]):
            ov = (f"; top-k overlap is lowest at block {row['min_overlap_block']} "
                  f"({f(row['min_overlap'])}, mean {f(row['mean_overlap'])})")
        ent = ""
        if np.isfinite(row["entropy_base"]) and np.isfinite(row["entropy_sft"]):
            ent = (f"; mean expert-load entropy {f(row['entropy_base'])} (base) vs "
                   f"{f(row['entropy_sft'])} (SFT) nats")
        out.append(f"{label}Router JS divergence is largest at block {row['max_block']} "
                   f"({f(row['max_js'], 4)}{_ci(row['max_low'], row['max_high'])} nats) over "
                   f"{row['n_sparse']} sparse blocks (mean {f(row['mean_js'], 4)}){ov}{ent}.")
        out.append(f"{label}Verdict: {row['verdict_text']}.")
    ex = data.extra.get("experts", pd.DataFrame())
    for r, g in ex.groupby(RUN, sort=False) if len(ex) else []:
        g = g.dropna(subset=["value"])
        if g.empty:
            continue
        top = g.loc[g["value"].idxmax()]
        metric = str(top["metric"])
        out.append(f"{_prefix(str(r), True)}The routed expert that changed most is expert "
                   f"{int(top['expert'])} of block {int(top['block'])} ({metric} "
                   f"{f(top['value'])}); the median over {len(g)} experts is "
                   f"{f(g['value'].median())}.")
    return out


def routing_tables(data: FigureData) -> list[TableOut]:
    out = []
    if not data.frame.empty and "metric" in data.frame.columns:
        out.append(("fig13_routing_drift", "router drift by sparse block",
                    data.frame.drop(columns=["n_blocks"], errors="ignore")))
    if not data.extra["load"].empty:
        out.append(("fig13b_expert_load", "expert load per block and expert",
                    data.extra["load"].drop(columns=["n_blocks"], errors="ignore")))
    if not data.extra["experts"].empty:
        out.append(("fig13c_expert_weights", "weight change per routed expert",
                    data.extra["experts"].drop(columns=["n_blocks"], errors="ignore")))
    if len(data.summary):
        out.append(("fig13_routing_verdict", "where routing drift concentrates",
                    data.summary))
    return out


# ----------------------------------------------------------------------------- Fig. 12

CAUSE_TEXT = {"revert": "the loss change when the block of the SFT is reverted to the base's",
              "zero": "the loss change when the block is zero-ablated",
              "mean": "the loss change when the block is mean-ablated"}


def signal_cause_prepare(runs: Sequence[Run]) -> FigureData | None:
    """Signals per block from the runs of the ablate run's depth, beside its causal effect."""
    ab = [r for r in runs if "ablate" in r.tables]
    if not ab:
        return None
    run = ab[0]
    n = run.n_blocks or int(pd.to_numeric(run.tables["ablate"]["blocks"].astype(str)
                                          .str.split("-").str[-1], errors="coerce").max() + 1)
    same = [r for r in runs if r.n_blocks in (None, n)]
    tables = {k: combined(same, k) for k in ("weights", "metrics", "probe", "swap")}
    tables["ablate"] = run.tables["ablate"]
    mode = str(run.record.get("mode", "zero"))
    data = N.signal_cause_data(tables, n, mode)
    if len(ab) > 1:
        data.notes.append(f"{len(ab)} ablate runs: the causal effect is {run.label}'s")
    skipped = [r.label for r in runs if r.n_blocks not in (None, n)]
    if skipped:
        data.notes.append(f"left out (another depth than the ablate run's {n} blocks): "
                          f"{', '.join(skipped)}")
    return data


def signal_cause_findings(data: FigureData) -> list[str]:
    s = data.summary
    if s.empty:
        return ["No analysis signal per block (weights, analyze, probe --kl, swap) is among "
                "these runs to compare with the causal effect."]
    cause = CAUSE_TEXT.get(data.extra.get("mode"), "the ablation's loss change")
    parts = [f"{r['signal'].replace('_', ' ')} {f(r['rho'], 2)} [{f(r['ci_low'], 2)}, "
             f"{f(r['ci_high'], 2)}] over {int(r['n_blocks'])} blocks"
             for r in s.to_dict("records")]
    out = [f"Spearman rank correlation with the causal effect ({cause}), bootstrap interval "
           f"over blocks: " + "; ".join(parts) + "."]
    ok = s[np.isfinite(s["rho"])]
    if len(ok):
        best = ok.loc[ok["rho"].idxmax()]
        sure = np.isfinite(best["ci_low"]) and best["ci_low"] > 0
        out.append(f"Highest: {best['signal'].replace('_', ' ')} (rho {f(best['rho'], 2)}); "
                   + ("its interval lies above 0." if sure else
                      "its interval includes 0, so no signal is shown to rank the blocks as "
                      "their causal effect does."))
    return out


# ----------------------------------------------------------------------------- the list


SPECS: list[FigureSpec] = [
    FigureSpec(
        "similarity", "Base vs SFT similarity by depth (Fig. 1)",
        "Pair metrics on pooled hidden states, x = hidden state j / L; CI bands where the run "
        "bootstrapped them; the grey band is the noise floor, the base against itself on two "
        "disjoint random halves of the data (analyze --noise-splits).", ("metrics",),
        "pair metrics (CKA, cosine similarity, mean shift)", pair_prepare,
        (("fig1_pair_metrics", "Fig. 1: CKA, cosine similarity and mean shift by depth",
          plots.plot_pair_metrics),),
        lambda d: pair_findings(d) + noise_findings(d), pair_tables),
    FigureSpec(
        "single", "Single-model metrics by depth (Fig. 2)",
        "Base (solid) and SFT (dashed) computed separately, x = hidden state j / L.",
        ("metrics",), "single-model metrics (effective rank, entropy, spectra)",
        _or_none(N.single_data, "metrics"),
        (("fig2_single_metrics", "Fig. 2: single-model metrics, base vs SFT",
          plots.plot_single_metrics),),
        single_findings, single_tables),
    FigureSpec(
        "logit-lens", "Logit lens: next-token prediction by depth (Fig. 3)",
        "lm_head(final_norm(h_j)) at every hidden state j, x = j / L.", ("probe",),
        "logit-lens (probe) results", _or_none(N.lens_data, "probe"),
        (("fig3_logit_lens", "Fig. 3: logit-lens accuracy, agreement and loss",
          plots.plot_logit_lens),),
        lens_findings, lens_tables),
    FigureSpec(
        "distributions", "Output distributions by depth (Fig. 3b)",
        "For a pair probed with --kl (the default): KL(P_sft,j || P_base,j) of the two lens "
        "distributions at every hidden state j (natural log, mean over the scored positions), "
        "each model's KL from its output to its lens at j, and, at the output, the share of "
        "positions where the base ranks the SFT's top-1 token 1st (unshifted), 2nd-3rd "
        "(marginal) or lower (shifted), as URIAL defines them; shifts.csv lists the tokens "
        "shifted to most often.", ("probe",), "pair distributions (probe --kl)",
        _or_none(N.distribution_data, "probe"),
        (("fig3b_distributions", "Fig. 3b: KL by depth and token shift",
          plots.plot_distributions),),
        distribution_findings, distribution_tables),
    FigureSpec(
        "weights", "Weight change by block (Fig. 4)",
        "Base -> SFT parameter distance per block, x = block (b + 0.5) / L.", ("weights",),
        "weight-change results", _or_none(N.weight_data, "weights"),
        (("fig4_weight_change",
          lambda d: f"Fig. 4: weight change of {d.extra['module']} by block",
          plots.plot_weight_change),
         ("fig4b_weight_modules", "Fig. 4b: weight change per module and block",
          lambda d, colors: plots.plot_weight_heatmap(d))),
        weight_findings, weight_tables),
    FigureSpec(
        "dynamics", "Training dynamics by depth (Fig. 10, the optimization view)",
        "Recorded while `sftscope tune` trained (RUN/dynamics.csv): the change of each block's "
        "effective weights since step 0 at the last recorded step (LoRA: ||(alpha/r) B A||; "
        "full fine-tuning: ||W_t - W_0||), the gradient norm per block over the recorded "
        "steps (the gradient the optimizer applied: after clipping), and, from a weights run, "
        "the base -> SFT change beside them. Block norms combine the block's modules "
        "(square root of the sum of squares).", ("dynamics",),
        "training dynamics", dynamics_prepare,
        (("fig10_dynamics", "Fig. 10: update and gradient norm by block",
          plots.plot_dynamics),
         ("fig10b_grad_heatmap", "Fig. 10b: gradient norm by block and step",
          lambda d, colors: plots.plot_grad_heatmap(d))),
        dynamics_findings, dynamics_tables),
    FigureSpec(
        "correlation", "Correlation of metrics across layers (Fig. 5)",
        "Pearson r across layers between every pair of metrics, per model.", ("correlation",),
        "metric correlations", _or_none(N.correlation_data, "correlation"),
        (("fig5_correlation", "Fig. 5: metric correlation heatmaps",
          lambda d, colors: plots.plot_correlation(d)),),
        corr_findings,
        lambda d: [("fig5_correlation", "Pearson r per metric pair",
                    d.frame.drop(columns=["n_blocks"], errors="ignore"))]),
    FigureSpec(
        "swap", "Layer swapping (Fig. 6)",
        "Blocks of one segment replaced by the other model's (both directions); horizontal "
        "lines are the unswapped models.", ("swap",), "swap results",
        _or_none(N.swap_data, "swap", "swap_items"),
        (("fig6_swap", "Fig. 6: score after swapping segments", plots.plot_swap),),
        swap_findings, swap_tables),
    FigureSpec(
        "interpolation", "Interpolating segments between base and SFT (Fig. 6b)",
        "`sftscope swap --alpha`: the base with the blocks of one segment (or mask) replaced by "
        "(1 - alpha) x base + alpha x SFT, everything else the base's; alpha 0 is the base, "
        "alpha 1 the sft-into-base swap of that segment (hollow markers: taken from the swap "
        "rows).", ("swap",), "interpolated segments (swap --alpha)",
        _or_none(N.interp_data, "swap"),
        (("fig6b_interpolation", "Fig. 6b: score against alpha per segment",
          plots.plot_interpolation),),
        interp_findings, interp_tables),
    FigureSpec(
        "sweep", "Segment LoRA sweep (Fig. 7)",
        "Equal-budget LoRA on the segments of each mask (bottom segment first).",
        ("summary",), "mask-sweep results", _or_none(N.sweep_data, "summary"),
        (("fig7_sweep", "Fig. 7: score by mask with CIs", plots.plot_sweep_bars),
         ("fig7b_inverted_u", "Fig. 7b: score by segment position (one-segment masks)",
          plots.plot_inverted_u)),
        sweep_findings, sweep_tables),
    FigureSpec(
        "seeds", "Seed robustness of the sweep (Fig. 7c)",
        "Each seed's score per mask (a sweep's jobs, masks with two or more seeds), in the "
        "sweep's primary metric: how much of a difference between masks the training seed "
        "alone makes.", ("seed_scores",), "sweeps with two or more seeds per mask",
        seeds_prepare,
        (("fig7c_seed_spread", "Fig. 7c: score of each seed per mask", plots.plot_seed_spread),),
        seeds_findings,
        lambda d: [("fig7c_seed_spread", "per-mask spread over seeds", d.summary),
                   ("seed_scores", "score of each seed per mask",
                    d.frame.drop(columns=["n_blocks", "mask_order"], errors="ignore"))]),
    FigureSpec(
        "suggest", "Training-free mask proposal (Fig. 8)",
        "Per-segment score of each `sftscope suggest` method (higher = a better segment to "
        "tune), the proposed masks and the reason printed for them; where a sweep checked the "
        "proposals, where each ranks, beside the rank of the prior-only mask (segment centre "
        "nearest 30 % depth) and of a random interior mask of its shape.", ("suggest",),
        "mask proposals", suggest_prepare,
        (("fig8_suggest", "Fig. 8: per-segment scores of each suggest method",
          plots.plot_suggest),),
        suggest_findings, suggest_tables),
    FigureSpec(
        "tune", "Segment LoRA runs (Fig. 9)",
        "Each `sftscope tune` run: mask, rank, trainable parameters against the full-depth "
        "budget, and its training loss.", ("tune",), "tune runs", tune_prepare,
        (("fig9_loss", "Fig. 9: training loss by step", plots.plot_loss_curves),),
        tune_findings, tune_tables),
    FigureSpec(
        "steer", "Steering along the base -> SFT shift (Fig. 11)",
        "`sftscope steer`: the mean (or first principal) shift from base to SFT states at one "
        "hidden state, added to the base model's residual stream at several scales (0 = the "
        "unsteered base).", ("steer",), "steering results", steer_prepare,
        (("fig11_steer", "Fig. 11: score by steering scale", plots.plot_steer),),
        steer_findings,
        lambda d: [("fig11_steer", "score by steering scale",
                    d.frame.drop(columns=["n_blocks"], errors="ignore"))]),
    FigureSpec(
        "routing", "Mixture of experts: router drift, expert load and expert change (Fig. 13)",
        "From an MoE pair's routing.csv (`sftscope analyze`): per sparse block the mean over "
        "real tokens of the Jensen-Shannon divergence between the base's and the SFT's router "
        "softmax and the overlap of their top-k experts (CI bands: sample-level bootstrap); "
        "each model's expert load (share of top-k slots) per block and expert; from a weights "
        "run, the change of each routed expert.", ("routing", "weights"),
        "mixture-of-experts routing (routing.csv) or per-expert weight change",
        routing_prepare,
        (("fig13_routing_drift", "Fig. 13: router JS divergence and top-k overlap by depth",
          plots.plot_routing_drift),
         ("fig13b_expert_load", "Fig. 13b: expert load, base vs SFT",
          lambda d, colors: plots.plot_expert_load(d)),
         ("fig13c_expert_weights", "Fig. 13c: weight change per routed expert",
          lambda d, colors: plots.plot_expert_weights(d))),
        routing_findings, routing_tables),
    FigureSpec(
        "signal-cause", "Which signal predicts the cause? (Fig. 12)",
        "`sftscope ablate`: the causal effect of each block (delta_loss of reverting it to the "
        "base in the SFT, or of ablating it), beside every analysis signal per block from the "
        "other runs of the same depth: weight change, CKA drop and mean-shift rise across the "
        "block, the rise of KL(SFT || base), the swap effect of its segment.", ("ablate",),
        "ablation results (sftscope ablate)", signal_cause_prepare,
        (("fig12_signal_cause", "Fig. 12: signals against the causal effect per block",
          plots.plot_signal_cause),),
        signal_cause_findings,
        lambda d: [("fig12_signal_cause", "rank correlation of each signal with the cause",
                    d.summary),
                   ("fig12_blocks", "signals and causal effect per block", d.frame)]),
    FigureSpec(
        "eval", "Evaluation scores", "Task scores with confidence intervals.", ("scores",),
        "evaluation scores", _or_none(N.scores_data, "scores", "predictions"), (),
        scores_findings,
        lambda d: [("eval_scores", "evaluation scores",
                    d.frame.drop(columns=["n_blocks"], errors="ignore"))]),
]
