"""Report: the paper's figures, tables and findings from any set of run folders, as one HTML.

``build_report(runs, out)`` reads whatever tables the run folders hold (see the table "Output
files" in docs/DEVELOPING.md), overlays runs of different depth on relative-depth axes, writes
PNG (and PDF/SVG) figures plus the CSV behind each figure, and one self-contained HTML file.
``paper_patterns(runs)`` says, with numbers, which of the paper's depth patterns the data shows.
The plotting functions live in :mod:`sftscope.report.plots` and take plain DataFrames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sftscope import io
from sftscope.errors import SftscopeError
from sftscope.report import plots
from sftscope.report.html import FigureBlock, Section, TableBlock, render_page
from sftscope.tasks import primary_metric_of

__all__ = [
    "Run", "TABLES", "build_report", "load_run", "load_runs", "paper_patterns", "parse_formats",
    "plots",
]

# Table name -> (file stem, columns the report needs, command that writes it).
# Aggregate rows of weights.csv (sums over modules), left out when modules are compared.
AGGREGATE_MODULES = ("attn", "mlp", "total", "other")

TABLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "metrics": ("metrics", ("layer", "metric", "model", "value"), "analyze"),
    "correlation": ("correlation", ("model", "metric_a", "metric_b", "r"), "analyze"),
    "weights": ("weights", ("block", "module", "metric", "value"), "weights"),
    "probe": ("probe", ("layer", "model", "metric", "value"), "probe"),
    "swap": ("swap", ("mask", "metric", "value"), "swap"),
    "scores": ("scores", ("task", "metric", "value"), "eval"),
    "summary": ("summary", ("mask", "metric", "mean"), "sweep"),
}
SUFFIXES = (".csv", ".parquet", ".json")
TEXT_COLUMNS = ("mask", "config", "direction", "head", "model", "metric", "module", "task",
                "metric_a", "metric_b", "seeds")
FORMATS = ("png", "pdf", "svg")

# Thresholds of paper_patterns (the paper's numbers in brackets).
CKA_SHALLOW = 0.95     # CKA over the first 80 % of depth at least this  [> 0.98]
CKA_DROP = 0.02        # ... and the last 20 % at least this much lower  [drops sharply]
J_RATIO = 1.5          # weight change: last-20 % mean / first-20 % mean  [0.10 / 0.05 = 2]
LENS_RISE = 0.7        # logit lens reaches half its peak only after this depth  [last ~20 %]
LENS_NEAR_ZERO = 0.2   # ... and its mean over the first 70 % is below this share of the peak
TOP = 0.8              # "the final 20 %" starts here (relative depth)


# ----------------------------------------------------------------------------- loading


@dataclass
class Run:
    """One run folder: its ``run.json``, a legend label and the tables the report reads."""

    path: Path
    record: dict[str, Any]
    command: str
    label: str
    n_blocks: int | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _find_table(folder: Path, stem: str) -> Path | None:
    for suf in SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def read_table(path: Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read one output table (CSV/Parquet/JSON); masks and names stay text (``01000``)."""
    try:
        if path.suffix == ".csv":
            head = pd.read_csv(path, nrows=0)
            dtype = {c: str for c in TEXT_COLUMNS if c in head.columns}
            df = pd.read_csv(path, dtype=dtype)
        elif path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_json(path, orient="records", dtype={c: str for c in TEXT_COLUMNS})
    except Exception as e:  # pandas raises many types for corrupt files
        raise SftscopeError(
            f"{path} could not be read ({e}); re-run the command that wrote it") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SftscopeError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))}); "
            "it was not written by this sftscope version: re-run the command that wrote it"
        )
    if "mask" in df.columns:
        df["mask"] = df["mask"].map(plots.mask_str)
    return df


def _short(model_id: str) -> str:
    return str(model_id).rstrip("/").replace("\\", "/").split("/")[-1]


def _find_id(cfg: Any, keys: Sequence[str]) -> str | None:
    if not isinstance(cfg, dict):
        return None
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, str) and v:
            return v
        if isinstance(v, dict):
            for sub in ("id", "name", "path", "model"):
                if isinstance(v.get(sub), str) and v[sub]:
                    return v[sub]
    for v in cfg.values():
        if isinstance(v, dict):
            found = _find_id(v, keys)
            if found:
                return found
    return None


def run_label(record: dict[str, Any], folder: Path) -> str:
    """Legend label: the model ids of the config (``base vs sft``), else the folder name."""
    cfg = record.get("config") or {}
    base = _find_id(cfg, ("base", "base_model", "base_id", "model", "model_id", "model_name"))
    sft = _find_id(cfg, ("sft", "sft_model", "sft_id", "tuned", "instruct"))
    if base and sft:
        b, s = _short(base), _short(sft)
        if s == b:
            return b
        return f"{b} vs ...{s[len(b):]}" if s.startswith(b) else f"{b} vs {s}"
    if base or sft:
        return _short(base or sft or "")
    return folder.resolve().name


def _n_blocks(record: dict[str, Any]) -> int | None:
    for src in (record, record.get("config") or {}):
        if isinstance(src, dict):
            v = src.get("n_blocks")
            if isinstance(v, (int, float)) and v > 0:
                return int(v)
    return None


def _child_runs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "run.json").is_file())


def _known_list() -> str:
    return ", ".join(f"{stem}.csv" for stem, _, _ in TABLES.values())


def load_run(path: str | Path) -> Run:
    """Read one run folder; a clear error when it is not one or holds no known table."""
    folder = Path(path)
    if not folder.exists():
        raise SftscopeError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise SftscopeError(
            f"{folder} is not a folder; give run folders written by sftscope commands "
            "(each has a run.json)"
        )
    rj = folder / "run.json"
    if not rj.is_file():
        raise SftscopeError(
            f"{folder} has no run.json, so it is not an sftscope run folder; give the folder "
            "an sftscope command wrote (--out of analyze, weights, probe, swap, eval, sweep)"
        )
    record = io.read_json(rj)
    if not isinstance(record, dict) or not record.get("command"):
        raise SftscopeError(f"{rj} has no \"command\" field; it was not written by sftscope")
    tables = {}
    for name, (stem, required, _cmd) in TABLES.items():
        p = _find_table(folder, stem)
        if p is not None:
            tables[name] = read_table(p, required)
    return Run(path=folder, record=record, command=str(record["command"]),
               label=run_label(record, folder), n_blocks=_n_blocks(record), tables=tables)


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Load run folders; a folder whose own tables are absent but whose sub-folders are runs
    (a demo or a sweep) stands for those sub-folders. Duplicate labels get the folder name."""
    runs: list[Run] = []
    for p in paths:
        p = Path(p)
        children = _child_runs(p) if p.is_dir() else []
        own_tables = p.is_dir() and any(_find_table(p, s) for s, _, _ in TABLES.values())
        if children and not own_tables:
            for c in children:
                r = load_run(c)
                if r.tables:
                    runs.append(r)
            if not runs:
                raise SftscopeError(f"{p}: none of its run folders holds a table the report "
                                    f"reads ({_known_list()})")
            continue
        r = load_run(p)
        if not r.tables:
            raise SftscopeError(
                f"{p} (command {r.command!r}) holds none of the tables a report reads "
                f"({_known_list()}); give the folder of an analyze, weights, probe, swap, eval "
                "or sweep run"
            )
        runs.append(r)
    if not runs:
        raise SftscopeError("give at least one run folder")
    # Runs that would share a legend entry in some section (same label, same table) are told
    # apart by folder name; the same pair across commands keeps one label and one colour.
    base_labels = {id(r): r.label for r in runs}
    for suffix in (lambda r: r.path.resolve().name,
                   lambda r: f"{r.path.resolve().parent.name}/{r.path.resolve().name}",
                   lambda r: f"#{runs.index(r) + 1}"):
        clash: set[int] = set()
        for name in TABLES:
            holders = [r for r in runs if name in r.tables]
            labels = [r.label for r in holders]
            clash |= {id(r) for r in holders if labels.count(r.label) > 1}
        if not clash:
            break
        for r in runs:
            if id(r) in clash:
                r.label = f"{base_labels[id(r)]} ({suffix(r)})"
    return runs


def _as_runs(runs: Iterable[Run | str | Path] | str | Path) -> list[Run]:
    items = [runs] if isinstance(runs, (str, Path, Run)) else list(runs)
    if items and all(isinstance(r, Run) for r in items):
        return items  # type: ignore[return-value]
    loaded = [r for r in items if isinstance(r, Run)]
    return loaded + load_runs([r for r in items if not isinstance(r, Run)])


def combined(runs: Sequence[Run], name: str) -> pd.DataFrame:
    """One table across runs with ``run`` (label) and ``n_blocks`` columns in front."""
    frames = []
    for r in runs:
        df = r.tables.get(name)
        if df is None or df.empty:
            continue
        df = df.copy()
        df.insert(0, "n_blocks", r.n_blocks if r.n_blocks else np.nan)
        df.insert(0, plots.RUN, r.label)
        if name == "summary" and r.record.get("primary_metric"):
            df["primary_metric"] = str(r.record["primary_metric"])
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- numbers


def _f(x: float, nd: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{x:.{nd}g}" if abs(x) >= 1000 or (x != 0 and abs(x) < 0.001) else f"{x:.{nd}f}"


def _prefix(label: str, many: bool) -> str:
    return f"[{label}] " if many else ""


def _series(df: pd.DataFrame, metric: str, model: str | None = None) -> pd.DataFrame:
    sub = df[df["metric"].astype(str) == metric]
    if model is not None and "model" in sub.columns:
        sub = sub[sub["model"].astype(str) == model]
    sub = sub.copy()
    sub["value"] = pd.to_numeric(sub["value"], errors="coerce")
    return sub.dropna(subset=["value"]).sort_values("rel_depth")


def _primary_metric(metrics: Iterable[str]) -> str | None:
    """A task's own primary metric when one is there (``sftscope.tasks``), else the first
    accuracy-like metric, else the first."""
    ms = list(dict.fromkeys(str(m) for m in metrics))
    chosen = primary_metric_of(ms)
    if chosen is not None:
        return chosen
    for m in ms:
        if "acc" in m.lower() and "agree" not in m.lower():
            return m
    return ms[0] if ms else None


def _score(metric: str, values: np.ndarray | float) -> Any:
    """Higher is better after this (loss-like metrics are negated)."""
    return -np.asarray(values, float) if plots.lower_is_better(metric) else np.asarray(values,
                                                                                       float)


# -- pattern (a): CKA


def _cka_check(df: pd.DataFrame) -> tuple[bool | None, str]:
    s = _series(df, "cka", "pair")
    if s.empty:
        return None, "no CKA rows"
    shallow, top = s[s["rel_depth"] <= TOP], s[s["rel_depth"] > TOP]
    if shallow.empty or top.empty:
        return None, "too few layers to split at 80 % of depth"
    smin, tmin = float(shallow["value"].min()), float(top["value"].min())
    last = float(s["value"].iloc[-1])
    holds = smin >= CKA_SHALLOW and tmin <= smin - CKA_DROP
    why = ("" if holds else
           f" (needs >= {CKA_SHALLOW} early" + (")" if smin < CKA_SHALLOW else
                                                f" and a drop of >= {CKA_DROP})"))
    return holds, (f"CKA >= {_f(smin)} over j/L <= 0.8, min {_f(tmin)} over the last 20 % "
                   f"(top layer {_f(last)}){why}")


# -- pattern (b): weight change J-shape


def _weights_series(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    module = plots.weight_module(df) or ""
    sub = df[df["module"].astype(str) == module]
    metrics = list(dict.fromkeys(sub["metric"].astype(str)))
    metric = "relative" if "relative" in metrics else ("frobenius" if "frobenius" in metrics
                                                       else (metrics[0] if metrics else ""))
    s = _series(sub, metric)
    return s, f"{module} {metric}"


def _edges(s: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    early, late = s[s["rel_depth"] < 1 - TOP], s[s["rel_depth"] > TOP]
    if early.empty:
        early = s.head(1)
    if late.empty:
        late = s.tail(1)
    return early, late


def _j_check(df: pd.DataFrame) -> tuple[bool | None, str]:
    s, what = _weights_series(df)
    if len(s) < 2:
        return None, "fewer than 2 blocks"
    early, late = _edges(s)
    e, la = float(early["value"].mean()), float(late["value"].mean())
    ratio = la / e if e > 0 else np.inf
    top = s.loc[s["value"].idxmax()]
    holds = bool(ratio >= J_RATIO)
    return holds, (f"{what}: mean {_f(e)} over the first 20 % of blocks, {_f(la)} over the last "
                   f"20 % ({_f(ratio, 2)}x, needs >= {J_RATIO}x); largest at block "
                   f"{int(top['block'])} ({_f(float(top['rel_depth']), 2)} of depth)")


# -- pattern (c): logit lens


def _lens_series(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    metrics = [m for m in dict.fromkeys(df["metric"].astype(str))
               if plots._probe_kind(m) == "accuracy"]
    if not metrics:
        return pd.DataFrame(), ""
    for model in ("sft", "base", None):
        s = _series(df, metrics[0], model)
        if not s.empty:
            return s, f"{model or 'model'} {metrics[0]}"
    return pd.DataFrame(), ""


def _lens_check(df: pd.DataFrame) -> tuple[bool | None, str]:
    s, what = _lens_series(df)
    if len(s) < 3:
        return None, "no logit-lens accuracy by layer"
    peak = float(s["value"].max())
    if peak <= 0:
        return False, f"{what} is 0 at every layer"
    d50 = float(s[s["value"] >= 0.5 * peak]["rel_depth"].min())
    early = float(s[s["rel_depth"] <= LENS_RISE]["value"].mean())
    top = float(s["value"].iloc[-1])
    holds = d50 >= LENS_RISE and early <= LENS_NEAR_ZERO * peak
    return holds, (f"{what}: mean {_f(early)} over j/L <= {LENS_RISE}, half of the peak "
                   f"{_f(peak)} first reached at j/L = {_f(d50, 2)} (needs >= {LENS_RISE}), "
                   f"top layer {_f(top)}")


# -- pattern (d): swapping inverted U


def _swap_singles(swapped: pd.DataFrame) -> dict[tuple[str, str, str], pd.DataFrame]:
    """(direction, head, metric) -> one-segment masks with their segment index, per K."""
    out = {}
    if swapped.empty:
        return out
    metric = _primary_metric(swapped["metric"])
    sub = swapped[swapped["metric"].astype(str) == metric].copy()
    sub["pos"] = sub["mask"].map(plots.single_position)
    sub = sub[sub["pos"].notna()]
    sub["value"] = pd.to_numeric(sub["value"], errors="coerce")
    for (d, h), g in sub.groupby([sub["direction"].astype(str), sub["head"].map(plots._head_text)],
                                 sort=False):
        k = g["mask"].str.len().mode().iloc[0]
        g = g[g["mask"].str.len() == k].sort_values("pos")
        g = g.assign(seg=g["mask"].map(lambda m: m.index("1")))
        out[(d, h, metric)] = g
    return out


def _swap_check(df: pd.DataFrame) -> tuple[bool | None, str]:
    swapped, _orig = plots.split_swap(df)
    groups = _swap_singles(swapped)
    verdicts, texts = [], []
    for (d, h, metric), g in groups.items():
        k = len(g["mask"].iloc[0])
        if k < 3 or g["seg"].nunique() < 3 or not {0, k - 1} <= set(g["seg"]):
            continue
        sc = dict(zip(g["seg"], _score(metric, g["value"].to_numpy())))
        raw = dict(zip(g["seg"], g["value"]))
        edge = [sc[0], sc[k - 1]]
        mid_keys = [s for s in sc if 0 < s < k - 1]
        mid = [sc[s] for s in mid_keys]
        best_mid = mid_keys[int(np.argmax(mid))]
        ok = max(edge) < max(mid) and np.mean(edge) < np.mean(mid)
        verdicts.append(ok)
        name = d + (f", head {h}" if h else "")
        texts.append(f"{name}: edges {_f(raw[0])} / {_f(raw[k - 1])}, best middle segment "
                     f"{best_mid + 1}/{k} {_f(raw[best_mid])}, middle mean "
                     f"{_f(float(np.mean([raw[s] for s in mid_keys])))} ({metric})")
    if not verdicts:
        return None, "needs one-segment swaps of at least 3 segments including both edges"
    return all(verdicts), "; ".join(texts)


# -- pattern (e): sweep


def _sweep_parts(df: pd.DataFrame) -> tuple[str | None, dict[str, float], dict[str, Any]]:
    sdf = df.copy()
    sdf["metric"] = sdf["metric"].astype(str)
    metric = _primary_metric(sdf["metric"])
    if "primary_metric" in sdf.columns:  # the sweep's own choice (run.json)
        chosen = sdf["primary_metric"].dropna().astype(str)
        if len(chosen) and chosen.iloc[0] in set(sdf["metric"]):
            metric = chosen.iloc[0]
    sub = sdf[sdf["metric"] == metric].drop_duplicates("mask")
    means = dict(zip(sub["mask"], pd.to_numeric(sub["mean"], errors="coerce")))
    pvals = dict(zip(sub["mask"], sub["p_value"])) if "p_value" in sub.columns else {}
    return metric, {m: float(v) for m, v in means.items() if np.isfinite(v)}, pvals


def _sweep_check(df: pd.DataFrame) -> tuple[bool | None, str]:
    metric, means, pvals = _sweep_parts(df)
    if not means or metric is None:
        return None, "empty sweep"
    full = [m for m in means if plots.is_mask(m) and set(m) == {"1"}]
    middle = [m for m in means if plots.is_mask(m) and "1" in m and m[0] == "0" and m[-1] == "0"]
    edge = [m for m in means if plots.is_mask(m) and m.count("1") == 1
            and (m[0] == "1" or m[-1] == "1")]
    if not full or not middle or not edge:
        return None, "needs the full-depth mask, a middle mask and an edge mask"
    sc = {m: float(_score(metric, v)) for m, v in means.items()}
    best_mid = max(middle, key=lambda m: sc[m])
    others = [m for m in means if m not in full]
    worst = min(others, key=lambda m: sc[m])
    beats = sc[best_mid] > sc[full[0]]
    edge_worst = worst in edge
    p = pvals.get(best_mid)
    ptxt = f" (p = {_f(float(p))})" if p is not None and pd.notna(p) else ""
    return beats and edge_worst, (
        f"best middle mask {best_mid} {_f(means[best_mid])}{ptxt} vs {full[0]} "
        f"{_f(means[full[0]])} ({'beats' if beats else 'does not beat'} full depth); worst mask "
        f"{worst} {_f(means[worst])} ({'an edge mask' if edge_worst else 'not an edge mask'}); "
        f"edge masks {', '.join(f'{m} {_f(means[m])}' for m in edge)} ({metric})")


PATTERNS: list[tuple[str, str, str, Callable[[pd.DataFrame], tuple[bool | None, str]]]] = [
    ("(a) CKA between base and SFT stays high (~0.98) over the first 80 % of depth and drops in "
     "the final ~20 %", "metrics", "layer", _cka_check),
    ("(b) weight change is J-shaped: larger near the output than in early blocks", "weights",
     "block", _j_check),
    ("(c) logit-lens accuracy is near 0 for most of the depth and rises sharply in the last "
     "~20 %", "probe", "layer", _lens_check),
    ("(d) swapping shows an inverted U: swapping edge segments hurts more than middle ones",
     "swap", "", _swap_check),
    ("(e) segment LoRA sweep: a middle mask beats full depth (11111), edge masks are worst",
     "summary", "", _sweep_check),
]


def paper_patterns(runs: Iterable[Run | str | Path] | str | Path) -> list[dict[str, Any]]:
    """Which of the paper's patterns (a)-(e) the runs show: ``holds`` True/False, or None when no
    run has the data; ``evidence`` gives the numbers per run. False if any run contradicts."""
    loaded = _as_runs(runs)
    out = []
    for pattern, table, index, check in PATTERNS:
        results: list[tuple[str, bool | None, str]] = []
        for r in loaded:
            df = r.tables.get(table)
            if df is None or df.empty:
                continue
            df = combined([r], table)
            if index:
                df = plots.with_depth(df, index)
            holds, text = check(df)
            results.append((r.label, holds, text))
        decided = [h for _, h, _ in results if h is not None]
        holds_all = None if not decided else all(decided)
        many = len(results) > 1
        evidence = "; ".join(f"{_prefix(lab, many)}{t}" for lab, _, t in results) or (
            f"no run has {TABLES[table][0]}.csv (sftscope {TABLES[table][2]})")
        out.append({"pattern": pattern, "holds": holds_all, "evidence": evidence})
    return out


# ----------------------------------------------------------------------------- findings


def _pair_findings(df: pd.DataFrame) -> list[str]:
    runs = plots.run_labels(df)
    many = len(runs) > 1
    out = []
    for r in runs:
        g = df[df[plots.RUN] == r]
        parts = []
        cka = _series(g, "cka", "pair")
        if len(cka):
            sh, tp = cka[cka["rel_depth"] <= TOP], cka[cka["rel_depth"] > TOP]
            low = cka.loc[cka["value"].idxmin()]
            if len(sh) and len(tp):
                parts.append(f"CKA stays above {_f(float(sh['value'].min()))} in the first 80 % "
                             f"of depth and falls to {_f(float(cka['value'].iloc[-1]))} at the "
                             f"top (lowest {_f(float(low['value']))} at j/L = "
                             f"{_f(float(low['rel_depth']), 2)})")
            else:
                parts.append(f"CKA ranges {_f(float(cka['value'].min()))} to "
                             f"{_f(float(cka['value'].max()))}")
        cos = _series(g, "cosine_similarity", "pair")
        if len(cos):
            low = cos.loc[cos["value"].idxmin()]
            parts.append(f"cosine similarity is lowest at j/L = {_f(float(low['rel_depth']), 2)} "
                         f"({_f(float(low['value']))})")
        ms = _series(g, "mean_shift", "pair")
        if len(ms):
            top = ms.loc[ms["value"].idxmax()]
            base = float(ms[ms["rel_depth"] <= TOP]["value"].median()) if (
                ms["rel_depth"] <= TOP).any() else np.nan
            ratio = (f", {_f(float(top['value']) / base, 2)}x its median over the first 80 %"
                     if np.isfinite(base) and base > 0 else "")
            parts.append(f"mean shift is largest at j/L = {_f(float(top['rel_depth']), 2)} "
                         f"({_f(float(top['value']))}{ratio})")
        if parts:
            out.append(_prefix(r, many) + "; ".join(parts) + ".")
    return out


def _single_findings(df: pd.DataFrame, names: list[str]) -> list[str]:
    runs = plots.run_labels(df)
    many = len(runs) > 1
    out = []
    for r in runs:
        g = df[df[plots.RUN] == r]
        parts = []
        for m in names[:6]:
            b, s = _series(g, m, "base"), _series(g, m, "sft")
            if b.empty or s.empty:
                continue
            j = b.merge(s, on="layer", suffixes=("_b", "_s"))
            if j.empty:
                continue
            gap = (j["value_s"] - j["value_b"]).abs() / j["value_b"].abs().clip(lower=1e-12)
            i = gap.idxmax()
            parts.append(f"{m} {_f(100 * float(gap[i]), 2)} % (j/L = "
                         f"{_f(float(j.loc[i, 'rel_depth_b']), 2)})")
        if parts:
            out.append(_prefix(r, many) + "Largest base-vs-SFT gap per metric: "
                       + ", ".join(parts) + ".")
        er = _series(g, names[0], "base") if names else pd.DataFrame()
        if len(er) >= 3:
            pk = er.loc[er["value"].idxmax()]
            out.append(_prefix(r, many) + f"Base {names[0]} peaks at j/L = "
                       f"{_f(float(pk['rel_depth']), 2)} ({_f(float(pk['value']))}) and ends at "
                       f"{_f(float(er['value'].iloc[-1]))} in the last layer.")
    return out


def _probe_findings(df: pd.DataFrame) -> list[str]:
    runs = plots.run_labels(df)
    many = len(runs) > 1
    out = []
    for r in runs:
        g = df[df[plots.RUN] == r]
        parts = []
        metrics = [m for m in dict.fromkeys(g["metric"].astype(str))
                   if plots._probe_kind(m) == "accuracy"]
        for model in ("base", "sft"):
            if not metrics:
                break
            s = _series(g, metrics[0], model)
            if len(s) < 2:
                continue
            peak = float(s["value"].max())
            name = model.upper() if model == "sft" else model
            if peak <= 0:
                parts.append(f"{name} {metrics[0]} is 0 at every layer")
                continue
            d50 = float(s[s["value"] >= 0.5 * peak]["rel_depth"].min())
            early = s[s["rel_depth"] <= LENS_RISE]["value"]
            parts.append(f"{name} {metrics[0]} stays at or "
                         f"below {_f(float(early.max()) if len(early) else np.nan)} up to j/L = "
                         f"{LENS_RISE}, reaches half its peak at j/L = {_f(d50, 2)} and "
                         f"{_f(float(s['value'].iloc[-1]))} at the top (peak {_f(peak)})")
        agree = [m for m in dict.fromkeys(g["metric"].astype(str))
                 if plots._probe_kind(m) == "agreement"]
        if agree:
            s = _series(g, agree[0])
            if len(s):
                parts.append(f"base/SFT {agree[0]} is {_f(float(s['value'].iloc[-1]))} at the top "
                             f"(min {_f(float(s['value'].min()))})")
        if parts:
            out.append(_prefix(r, many) + "; ".join(parts) + ".")
    return out


def _weight_findings(df: pd.DataFrame) -> list[str]:
    runs = plots.run_labels(df)
    many = len(runs) > 1
    out = []
    for r in runs:
        g = df[df[plots.RUN] == r]
        s, what = _weights_series(g)
        if s.empty:
            continue
        top = s.loc[s["value"].idxmax()]
        early, late = _edges(s)
        text = (f"{what} weight change is largest at block {int(top['block'])} (relative depth "
                f"{_f(float(top['rel_depth']), 2)}, {_f(float(top['value']))}); mean "
                f"{_f(float(early['value'].mean()))} over the first 20 % of blocks vs "
                f"{_f(float(late['value'].mean()))} over the last 20 %")
        metric = what.split(" ", 1)[1] if " " in what else ""
        per_mod = g[(g["metric"].astype(str) == metric)
                    & ~g["module"].astype(str).isin(AGGREGATE_MODULES)]
        if per_mod["module"].nunique() > 1:
            means = per_mod.groupby(per_mod["module"].astype(str))["value"].mean()
            text += (f"; of the modules, {means.idxmax()} changes most on average "
                     f"({_f(float(means.max()))}) and {means.idxmin()} least "
                     f"({_f(float(means.min()))})")
        out.append(_prefix(r, many) + text + ".")
    return out


def _corr_findings(df: pd.DataFrame) -> list[str]:
    out = []
    many = df[plots.RUN].nunique() > 1
    for (r, m), g in df.groupby([plots.RUN, df["model"].astype(str)], sort=False):
        a_, b_ = g["metric_a"].astype(str), g["metric_b"].astype(str)
        # Leave out a metric against itself or its own variant (effective_rank ~ _norm).
        related = [x.startswith(y) or y.startswith(x) for x, y in zip(a_, b_)]
        g = g[~np.array(related, dtype=bool)].copy()
        g["r"] = pd.to_numeric(g["r"], errors="coerce")
        g = g.dropna(subset=["r"])
        if g.empty:
            continue
        key = g.apply(lambda x: tuple(sorted((str(x["metric_a"]), str(x["metric_b"])))), axis=1)
        g = g.assign(key=key).drop_duplicates("key")
        g = g.reindex(g["r"].abs().sort_values(ascending=False).index).head(3)
        pairs = ", ".join(f"{a} ~ {b} r = {_f(float(v), 2)}"
                          for a, b, v in zip(g["metric_a"], g["metric_b"], g["r"]))
        out.append(_prefix(str(r), many) + f"{m}: strongest correlations {pairs}.")
    return out


def _swap_findings(df: pd.DataFrame) -> list[str]:
    swapped, orig = plots.split_swap(df)
    runs = plots.run_labels(pd.concat([swapped, orig]))
    many = len(runs) > 1
    out = []
    for r in runs:
        sw, o = swapped[swapped[plots.RUN] == r], orig[orig[plots.RUN] == r]
        groups = _swap_singles(sw)
        parts = []
        for (d, h, metric), g in groups.items():
            if g.empty:
                continue
            sc = _score(metric, g["value"].to_numpy())
            best, worst = g.iloc[int(np.argmax(sc))], g.iloc[int(np.argmin(sc))]
            k = len(best["mask"])
            if np.nanmax(sc) == np.nanmin(sc):
                parts.append(f"{d}{f' (head {h})' if h else ''}: every single-segment swap "
                             f"gives the same {metric} ({_f(float(best['value']))})")
                continue
            host = plots.swap_host(d)
            ref = o[(o["metric"].astype(str) == metric) & (o["config"].astype(str) == host)]
            ref_v = float(pd.to_numeric(ref["value"], errors="coerce").iloc[0]) if len(
                ref) else np.nan

            def delta(v: float, ref_v: float = ref_v, host: str | None = host) -> str:
                return f", {v - ref_v:+.4f} vs {host}" if np.isfinite(ref_v) else ""

            parts.append(f"{d}{f' (head {h})' if h else ''}: best single segment "
                         f"{int(best['seg']) + 1}/{k} ({best['mask']}, {_f(float(best['value']))}"
                         f"{delta(float(best['value']))}), worst {int(worst['seg']) + 1}/{k} "
                         f"({worst['mask']}, {_f(float(worst['value']))}"
                         f"{delta(float(worst['value']))}) [{metric}]")
        if groups:
            metric = next(iter(groups))[2]
            oo = o[o["metric"].astype(str) == metric]
            if len(oo):
                refs = ", ".join(f"{plots.swap_original_name(row)} {_f(float(row['value']))}"
                                 for _, row in oo.iterrows())
                parts.append(f"originals: {refs}")
        if parts:
            out.append(_prefix(r, many) + "; ".join(parts) + ".")
    return out


def _sweep_findings(df: pd.DataFrame) -> list[str]:
    runs = plots.run_labels(df)
    many = len(runs) > 1
    out = []
    for r in runs:
        metric, means, pvals = _sweep_parts(df[df[plots.RUN] == r])
        if not means or metric is None:
            continue
        sc = {m: float(_score(metric, v)) for m, v in means.items()}
        best, worst = max(sc, key=sc.get), min(sc, key=sc.get)
        full = [m for m in means if plots.is_mask(m) and set(m) == {"1"}]
        text = (f"{metric}: best mask {best} {_f(means[best])}, worst {worst} "
                f"{_f(means[worst])}")
        if full:
            beat = [m for m in means if sc[m] > sc[full[0]]]
            p = pvals.get(best)
            ptxt = f", p = {_f(float(p))} vs full depth" if p is not None and pd.notna(p) else ""
            text += (f"; full depth {full[0]} {_f(means[full[0]])}; {len(beat)} of "
                     f"{len(means) - 1} masks beat it{ptxt if best != full[0] else ''}")
        out.append(_prefix(r, many) + text + ".")
    return out


def _scores_findings(df: pd.DataFrame) -> list[str]:
    many = df[plots.RUN].nunique() > 1
    items = []
    for row in df.head(8).itertuples(index=False):
        d = row._asdict()
        ci = ""
        if pd.notna(d.get("ci_low")) and pd.notna(d.get("ci_high")):
            ci = f" [{_f(float(d['ci_low']))}, {_f(float(d['ci_high']))}]"
        n = f" (n = {int(d['n'])})" if pd.notna(d.get("n")) else ""
        items.append(f"{_prefix(d[plots.RUN], many)}{d['task']} {d['metric']}: "
                     f"{_f(float(d['value']))}{ci}{n}")
    more = f" (+{len(df) - 8} more in the table)" if len(df) > 8 else ""
    return ["; ".join(items) + more + "."] if items else []


# ----------------------------------------------------------------------------- tables


def _wide(df: pd.DataFrame, index: list[str], column: str) -> pd.DataFrame:
    """Pivot ``value`` (and CIs) to one column per ``column`` value, for reading."""
    vals = [c for c in ("value", "ci_low", "ci_high") if c in df.columns
            and pd.to_numeric(df[c], errors="coerce").notna().any()]
    order = list(dict.fromkeys(df[column].astype(str)))
    d = df.copy()
    d[column] = d[column].astype(str)
    for c in vals:
        d[c] = pd.to_numeric(d[c], errors="coerce")
    wide = d.pivot_table(index=index, columns=column, values=vals, aggfunc="first",
                         sort=False)
    cols = []
    for name in order:
        for c in vals:
            if (c, name) in wide.columns:
                cols.append((c, name))
    wide = wide[cols]
    wide.columns = [n if c == "value" else f"{n} {c}" for c, n in cols]
    return wide.reset_index().sort_values(index, kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- build


class _Writer:
    """Saves figures (PNG bytes kept for embedding) and tables beside them."""

    def __init__(self, figdir: Path, formats: Sequence[str]) -> None:
        self.figdir = figdir
        self.formats = formats
        self.written: list[Path] = []

    def figure(self, fig: Any, stem: str, title: str) -> FigureBlock:
        buf = BytesIO()
        fig.savefig(buf, format="png", dpi=plots.DPI, facecolor="white")
        png = buf.getvalue()
        files = []
        for fmt in self.formats:
            data = png
            if fmt != "png":
                b = BytesIO()
                fig.savefig(b, format=fmt, dpi=plots.DPI, facecolor="white")
                data = b.getvalue()
            path = self.figdir / f"{stem}.{fmt}"
            with io.atomic_path(path) as tmp:
                tmp.write_bytes(data)
            files.append(path)
        fig.clear()  # the figure is not registered with pyplot: clearing frees it
        self.written += files
        return FigureBlock(title=title, png=png, files=files)

    def table(self, df: pd.DataFrame, stem: str, title: str) -> TableBlock:
        path = io.write_table(df, self.figdir / f"{stem}.csv")
        self.written.append(path)
        return TableBlock(title=title, df=df, csv=path)


def _absent(what: str, table: str) -> str:
    stem, _, cmd = TABLES[table]
    return f"No {what} in these runs (needs {stem}.csv, written by `sftscope {cmd}`)."


def _sections(runs: list[Run], w: _Writer, colors: dict[str, str]) -> list[Section]:
    secs: list[Section] = []
    metrics = combined(runs, "metrics")
    mdepth = plots.with_depth(metrics, "layer") if len(metrics) else metrics

    # Fig. 1
    sec = Section("similarity", "Base vs SFT similarity by depth (Fig. 1)",
                  "Pair metrics on pooled hidden states, x = hidden state j / L; CI bands "
                  "where the run bootstrapped them.")
    pair = mdepth[mdepth["model"].astype(str) == "pair"] if len(mdepth) else mdepth
    names = plots.pair_metric_names(metrics) if len(metrics) else []
    if not names:
        sec.absent = _absent("pair metrics (CKA, cosine similarity, mean shift)", "metrics")
    else:
        pair = pair[pair["metric"].astype(str).isin(names)]
        sec.findings = _pair_findings(pair)
        sec.figures.append(w.figure(plots.plot_pair_metrics(metrics, colors), "fig1_pair_metrics",
                                    "Fig. 1: CKA, cosine similarity and mean shift by depth"))
        sec.tables.append(w.table(_wide(pair, [plots.RUN, "layer", "rel_depth"], "metric"),
                                  "fig1_pair_metrics", "pair metrics by layer j"))
    secs.append(sec)

    # Fig. 2
    sec = Section("single", "Single-model metrics by depth (Fig. 2)",
                  "Base (solid) and SFT (dashed) computed separately, x = hidden state j / L.")
    names = plots.single_metric_names(metrics) if len(metrics) else []
    if not names:
        sec.absent = _absent("single-model metrics (effective rank, entropy, spectra)",
                             "metrics")
    else:
        single = mdepth[mdepth["model"].astype(str).isin(["base", "sft"])
                        & mdepth["metric"].astype(str).isin(names)]
        sec.findings = _single_findings(single, names)
        sec.figures.append(w.figure(plots.plot_single_metrics(metrics, colors),
                                    "fig2_single_metrics",
                                    "Fig. 2: single-model metrics, base vs SFT"))
        sec.tables.append(w.table(_wide(single, [plots.RUN, "model", "layer", "rel_depth"],
                                        "metric"),
                                  "fig2_single_metrics", "single-model metrics by layer j"))
    secs.append(sec)

    # Fig. 3
    probe = combined(runs, "probe")
    sec = Section("logit-lens", "Logit lens: next-token prediction by depth (Fig. 3)",
                  "lm_head(final_norm(h_j)) at every hidden state j, x = j / L.")
    if probe.empty:
        sec.absent = _absent("logit-lens (probe) results", "probe")
    else:
        pd_ = plots.with_depth(probe, "layer")
        sec.findings = _probe_findings(pd_)
        sec.figures.append(w.figure(plots.plot_logit_lens(probe, colors), "fig3_logit_lens",
                                    "Fig. 3: logit-lens accuracy, agreement and loss"))
        sec.tables.append(w.table(_wide(pd_, [plots.RUN, "model", "layer", "rel_depth"],
                                        "metric"),
                                  "fig3_logit_lens", "logit lens by layer j"))
    secs.append(sec)

    # Fig. 4
    weights = combined(runs, "weights")
    sec = Section("weights", "Weight change by block (Fig. 4)",
                  "Base -> SFT parameter distance per block, x = block (b + 0.5) / L.")
    wd = plots.with_depth(weights, "block") if len(weights) else weights
    if wd.empty:
        sec.absent = _absent("weight-change results", "weights")
    else:
        sec.findings = _weight_findings(wd)
        module = plots.weight_module(wd)
        sec.figures.append(w.figure(plots.plot_weight_change(weights, colors),
                                    "fig4_weight_change",
                                    f"Fig. 4: weight change of {module} by block"))
        sec.figures.append(w.figure(plots.plot_weight_heatmap(weights), "fig4b_weight_modules",
                                    "Fig. 4b: weight change per module and block"))
        main = wd[wd["module"].astype(str) == module]
        sec.tables.append(w.table(_wide(main, [plots.RUN, "block", "rel_depth"], "metric"),
                                  "fig4_weight_change", f"{module} weight change by block"))
        hm_metric = "relative" if "relative" in set(wd["metric"].astype(str)) else str(
            wd["metric"].iloc[0])
        hm = wd[wd["metric"].astype(str) == hm_metric]
        sec.tables.append(w.table(_wide(hm, [plots.RUN, "block", "rel_depth"], "module"),
                                  "fig4b_weight_modules",
                                  f"{hm_metric} weight change per module and block"))
        blockless = weights[pd.to_numeric(weights["block"], errors="coerce").isna()]
        if len(blockless):
            sec.tables.append(w.table(blockless.drop(columns=["n_blocks"]),
                                      "weights_other_modules",
                                      "modules outside the blocks (embeddings, head, ...)"))
    secs.append(sec)

    # Fig. 5
    corr = combined(runs, "correlation")
    sec = Section("correlation", "Correlation of metrics across layers (Fig. 5)",
                  "Pearson r across layers between every pair of metrics, per model.")
    if corr.empty:
        sec.absent = _absent("metric correlations", "correlation")
    else:
        sec.findings = _corr_findings(corr)
        sec.figures.append(w.figure(plots.plot_correlation(corr), "fig5_correlation",
                                    "Fig. 5: metric correlation heatmaps"))
        sec.tables.append(w.table(corr.drop(columns=["n_blocks"]), "fig5_correlation",
                                  "Pearson r per metric pair"))
    secs.append(sec)

    # Fig. 6
    swap = combined(runs, "swap")
    sec = Section("swap", "Layer swapping (Fig. 6)",
                  "Blocks of one segment replaced by the other model's (both directions); "
                  "horizontal lines are the unswapped models.")
    if swap.empty:
        sec.absent = _absent("swap results", "swap")
    else:
        sec.findings = _swap_findings(swap)
        sec.figures.append(w.figure(plots.plot_swap(swap, colors), "fig6_swap",
                                    "Fig. 6: score after swapping segments"))
        t = swap.drop(columns=["n_blocks"]).copy()
        t.insert(t.columns.get_loc("mask") + 1, "segment_centre",
                 t["mask"].map(plots.mask_centre))
        sec.tables.append(w.table(t, "fig6_swap", "swap results"))
    secs.append(sec)

    # Fig. 7
    summary = combined(runs, "summary")
    sec = Section("sweep", "Segment LoRA sweep (Fig. 7)",
                  "Equal-budget LoRA on the segments of each mask (bottom segment first).")
    if summary.empty:
        sec.absent = _absent("mask-sweep results", "summary")
    else:
        sec.findings = _sweep_findings(summary)
        sec.figures.append(w.figure(plots.plot_sweep_bars(summary, colors), "fig7_sweep",
                                    "Fig. 7: score by mask with CIs"))
        sec.figures.append(w.figure(plots.plot_inverted_u(summary, colors), "fig7b_inverted_u",
                                    "Fig. 7b: score by segment position (one-segment masks)"))
        t = summary.drop(columns=["n_blocks", "primary_metric"], errors="ignore").copy()
        t.insert(t.columns.get_loc("mask") + 1, "segment_centre",
                 t["mask"].map(plots.mask_centre))
        t = t.iloc[sorted(range(len(t)), key=lambda i: (str(t[plots.RUN].iloc[i]),
                                                        plots.mask_sort_key(t["mask"].iloc[i])))]
        sec.tables.append(w.table(t.reset_index(drop=True), "fig7_sweep", "sweep summary"))
    secs.append(sec)

    # Scores
    scores = combined(runs, "scores")
    sec = Section("eval", "Evaluation scores", "Task scores with confidence intervals.")
    if scores.empty:
        sec.absent = _absent("evaluation scores", "scores")
    else:
        sec.findings = _scores_findings(scores)
        tb = w.table(scores.drop(columns=["n_blocks"]), "eval_scores", "evaluation scores")
        sec.tables.append(tb)
    secs.append(sec)
    return secs


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,pdf"`` or a sequence -> validated formats (png, pdf, svg)."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise SftscopeError(f"figure format(s) {', '.join(bad) or '(none)'} unknown: use "
                            f"{', '.join(FORMATS)} (comma-separated, e.g. png,pdf)")
    return out


def build_report(runs: Sequence[str | Path] | str | Path, out: str | Path | None = None,
                 formats: str | Sequence[str] = ("png",), figures_dir: str | Path | None = None,
                 title: str | None = None) -> Path:
    """Write the HTML report of ``runs`` (default ``RUN0/report.html``) and its figures
    (default ``RUN0/figures/``); returns the HTML path."""
    paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(p) for p in runs]
    if not paths:
        raise SftscopeError("give at least one run folder")
    fmts = parse_formats(formats)
    loaded = load_runs(paths)
    out = Path(out) if out is not None else paths[0] / "report.html"
    if out.exists() and out.is_dir():
        raise SftscopeError(f"--out {out} is a folder; give a file name such as report.html")
    figdir = Path(figures_dir) if figures_dir is not None else paths[0] / "figures"
    colors = plots.palette(r.label for r in loaded)
    writer = _Writer(figdir, fmts)
    sections = _sections(loaded, writer, colors)
    patterns = paper_patterns(loaded)
    writer.table(pd.DataFrame(patterns), "paper_patterns", "patterns of the paper")
    info = [{"label": r.label, "color": colors[r.label], "command": r.command,
             "n_blocks": r.n_blocks, "tables": [f"{TABLES[t][0]}.csv" for t in r.tables],
             "path": str(r.path), "record": r.record} for r in loaded]
    present = {t for r in loaded for t in r.tables}
    notes = [f"Figures and the CSV behind each are in {figdir}."]
    missing = [f"{TABLES[t][0]}.csv" for t in TABLES if t not in present]
    if missing:
        notes.append("Not in these runs: " + ", ".join(missing) + " (their sections say so).")
    if not title:
        labels = list(dict.fromkeys(r.label for r in loaded))
        title = "sftscope report: " + ", ".join(labels[:2]) + (
            f" (+{len(labels) - 2} more)" if len(labels) > 2 else "")
    page = render_page(title, info, patterns, sections, notes)
    io.write_text(out, page)
    return out
