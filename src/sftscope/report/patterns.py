"""Which of the paper's depth patterns (a)-(e) the runs show, by the rules of
:mod:`sftscope.report.rules`, with the rule, the numbers and the verdict side by side."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sftscope.metric_registry import lower_is_better
from sftscope.report import numbers as N
from sftscope.report import rules as R
from sftscope.report.runs import Run, as_runs, combined, spec_of


def _col(df: pd.DataFrame, c: str) -> np.ndarray | None:
    return pd.to_numeric(df[c], errors="coerce").to_numpy(float) if c in df.columns else None


def check_cka(metrics: pd.DataFrame) -> R.Verdict:
    """(a) on one run's ``metrics`` table (a chain's first pair)."""
    d = N.pair_data(N.first_pair(metrics)).frame
    s = d[d["metric"].astype(str) == "cka"].sort_values("rel_depth") if len(d) else d
    if s.empty:
        return R.Verdict(R.INCONCLUSIVE, R.CKA_RULE, "no CKA rows", "no data")
    return R.cka_rule(s["rel_depth"], _col(s, "value"), _col(s, "ci_low"), _col(s, "ci_high"),
                      hint="analyze --bootstrap 0")


def check_j_shape(weights: pd.DataFrame) -> R.Verdict:
    """(b) on one run's ``weights`` table (module ``attn``, metric ``relative`` if present; a
    chain's first pair)."""
    data = N.weight_data(N.first_pair(weights))
    d = data.frame
    s = d[d["metric"].astype(str) == data.extra["metric"]].sort_values("rel_depth")
    if s.empty:
        return R.Verdict(R.INCONCLUSIVE, R.J_RULE, "no per-block rows", "no data")
    v = R.j_shape_rule(s["rel_depth"], _col(s, "value"))
    return R.Verdict(v.verdict, v.rule, f"{data.extra['module']} {data.extra['metric']}: "
                     f"{v.numbers}", v.why)


def _lens_verdict(d: pd.DataFrame, metric: str, model: str | None) -> R.Verdict | None:
    s = d[d["metric"] == metric]
    if model is not None:
        s = s[s["model"] == model]
    if not len(s):
        return None
    s = s.sort_values("rel_depth")
    return R.lens_rule(s["rel_depth"], _col(s, "value"), _col(s, "ci_low"), _col(s, "ci_high"),
                       _col(s, "n"), hint="probe --bootstrap 0")


def check_lens(probe: pd.DataFrame) -> R.Verdict:
    """(c) on one run's ``probe`` table: the first accuracy metric of the SFT model (else the
    base model, else any; a chain's first pair). Where the base is in the table too, it is
    judged by the same rule: a pattern the base shows as well is the model's, not the
    fine-tune's, and the verdict says so."""
    d = N.lens_data(N.first_pair(probe)).frame
    acc = [m for m in dict.fromkeys(d["metric"]) if N.probe_kind(m) == "accuracy"]
    if not acc:
        return R.Verdict(R.INCONCLUSIVE, R.LENS_RULE, "no logit-lens accuracy", "no data")
    for model in ("sft", "base", None):
        v = _lens_verdict(d, acc[0], model)
        if v is None:
            continue
        numbers, why = f"{model or 'model'} {acc[0]}: {v.numbers}", v.why
        base = _lens_verdict(d, acc[0], "base") if model == "sft" else None
        if base is not None:
            numbers += f"; base {acc[0]}: {base.numbers}, the base alone: {base.verdict}"
            if v.verdict == R.YES and base.verdict == R.YES:
                why = "; ".join(w for w in (v.why, "the base shows it too: a property of the "
                                            "model, not a change made by fine-tuning") if w)
        return R.Verdict(v.verdict, v.rule, numbers, why)
    return R.Verdict(R.INCONCLUSIVE, R.LENS_RULE, "no logit-lens accuracy", "no data")


def check_swap(swap: pd.DataFrame, items: pd.DataFrame | None = None) -> R.Verdict:
    """(d) on one run's ``swap`` table: every direction (and head) must show it. With the run's
    per-item scores (``items``, swap_items.csv) each middle segment is compared with each edge
    by a paired test on the same items (``numbers.swap_paired``)."""
    swapped, _ = N.split_swap(N.clip_to_range(N.with_run(swap))[0])
    verdicts, names = [], []
    for (r, d, h, metric), g in N.swap_singles(swapped).items():
        k = int(g["mask"].str.len().iloc[0])
        nan = np.full(len(g), np.nan)
        lo = _col(g, "ci_low") if "ci_low" in g.columns else nan
        hi = _col(g, "ci_high") if "ci_high" in g.columns else nan
        pts = {int(s): R.Point(float(v), float(a), float(b))
               for s, v, a, b in zip(g["seg"], _col(g, "value"), lo, hi)}
        config = dict(zip(g["seg"].astype(int), g["config"].astype(str)))
        paired = {(m, e): N.swap_paired(items, r, config[m], config[e], metric)
                  for m in config if 0 < m < k - 1 for e in (0, k - 1) if e in config}
        paired = {key: v for key, v in paired.items() if v is not None}
        name = d + (f", head {h}" if h else "") + f" ({metric})"
        names.append(name)
        verdicts.append(R.inverted_u_rule(pts, k, lower_is_better(metric), name,
                                          hint="swap --bootstrap 0", paired=paired or None))
    if not verdicts:
        return R.Verdict(R.INCONCLUSIVE, R.SWAP_RULE, "no one-segment swaps", "no data")
    return R.all_of(verdicts, R.SWAP_RULE, names)


def check_sweep(summary: pd.DataFrame) -> R.Verdict:
    """(e) on one run's sweep ``summary`` (its primary metric)."""
    d = N.sweep_data(summary).frame
    metric = N.sweep_primary(d)
    sub = d[d["metric"] == metric].drop_duplicates("mask")
    rows = []
    for row in sub.to_dict("records"):
        seeds = row.get("n_seeds")
        items = row.get("n_items")
        rows.append(R.MaskScore(
            mask=str(row["mask"]), mean=_num(row.get("mean")), lo=_num(row.get("ci_low")),
            hi=_num(row.get("ci_high")), p_value=_num(row.get("p_value")),
            seeds=int(seeds) if _finite(seeds) else None,
            n_items=int(float(items)) if _finite(items) else None))
    return R.sweep_rule(rows, lower_is_better(str(metric)), str(metric),
                        hint="sweep --bootstrap 0")


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _finite(v: Any) -> bool:
    return np.isfinite(_num(v))


@dataclass(frozen=True)
class PatternSpec:
    """One of the paper's patterns: its text, the run table it needs, and its check."""

    pattern: str
    table: str
    rule: str
    check: Callable[..., R.Verdict]
    items: str | None = None  # a run's per-item table, passed to ``check`` for paired tests


PATTERNS: list[PatternSpec] = [
    PatternSpec("(a) CKA between base and SFT stays high (~0.98) over the first 80 % of depth "
                "and drops in the final ~20 %", "metrics", R.CKA_RULE, check_cka),
    PatternSpec("(b) weight change is J-shaped: larger near the output than in early blocks",
                "weights", R.J_RULE, check_j_shape),
    PatternSpec("(c) logit-lens accuracy is near 0 for most of the depth and rises sharply in "
                "the last ~20 %", "probe", R.LENS_RULE, check_lens),
    PatternSpec("(d) swapping shows an inverted U: swapping edge segments hurts more than "
                "middle ones", "swap", R.SWAP_RULE, check_swap, items="swap_items"),
    PatternSpec("(e) segment LoRA sweep: a middle mask beats full depth (11111), edge masks are "
                "worst", "summary", R.SWEEP_RULE, check_sweep),
]


def paper_patterns(runs: Iterable[Run | str | Path] | str | Path) -> list[dict[str, Any]]:
    """Each pattern's ``verdict`` (yes / no / inconclusive) over the runs: yes when every run
    with the data says yes, no when one says no, else inconclusive (also when no run has the
    data). Keys: ``pattern``, ``verdict``, ``holds`` (True / False / None), ``rule`` (with its
    thresholds), ``numbers``, ``why`` and ``evidence`` (per run: numbers -> verdict (why))."""
    loaded = as_runs(runs)
    out = []
    for spec in PATTERNS:
        results: list[tuple[str, R.Verdict]] = []
        for r in loaded:
            if r.tables.get(spec.table) is None or r.tables[spec.table].empty:
                continue
            df = combined([r], spec.table)
            extra = (combined([r], spec.items),) if spec.items else ()
            results.append((r.label, spec.check(df, *extra)))
        many = len(results) > 1
        if not results:
            t = spec_of(spec.table)
            none = f"no run has {t.stem}.csv (sftscope {t.command})"
            v = R.Verdict(R.INCONCLUSIVE, spec.rule, none, "no data")
            evidence = none
        else:
            verdicts = [x for _, x in results]
            v = R.all_of(verdicts, spec.rule, [lab for lab, _ in results])
            evidence = "; ".join(
                (f"[{lab}] " if many else "") + f"{x.numbers} -> {x.verdict}"
                + (f" ({x.why})" if x.why else "") for lab, x in results)
        out.append({"pattern": spec.pattern, "verdict": v.verdict, "holds": v.holds,
                    "rule": spec.rule, "numbers": v.numbers, "why": v.why,
                    "evidence": evidence})
    return out
