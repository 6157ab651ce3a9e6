"""Reading run folders for the report: every folder sftscope writes, and notes for the rest.

``load_runs(paths)`` returns a :class:`RunSet` (a list of :class:`Run`) with ``skipped``: one
line per folder or table it could not use (missing, no ``run.json``, unknown command, missing
or corrupt table) and why. Those lines go to stderr and into the report; only when no folder at
all is usable is it an error. A folder without tables of its own whose sub-folders are runs (a
demo) stands for those sub-folders; the run folders directly inside a run (``sweep/suggest``)
are read too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sftscope import io
from sftscope.errors import SftscopeError, first_line
from sftscope.segments import MASK_COLUMNS, block_text, mask_from_text

RUN = "run"


@dataclass(frozen=True)
class TableSpec:
    """A table the report reads: file stem, the columns it needs, the command that writes it."""

    stem: str
    required: tuple[str, ...]
    command: str
    what: str


TABLES: dict[str, TableSpec] = {
    "metrics": TableSpec("metrics", ("layer", "metric", "model", "value"), "analyze",
                         "layer-wise metrics"),
    "noise": TableSpec("noise", ("layer", "metric", "value", "ci_low", "ci_high"), "analyze",
                       "the noise floor of the pair metrics (base vs base)"),
    "correlation": TableSpec("correlation", ("model", "metric_a", "metric_b", "r"), "analyze",
                             "metric correlations"),
    "weights": TableSpec("weights", ("block", "module", "metric", "value"), "weights",
                         "weight-change results"),
    "probe": TableSpec("probe", ("layer", "model", "metric", "value"), "probe",
                       "logit-lens (probe) results"),
    "swap": TableSpec("swap", ("mask", "metric", "value"), "swap", "swap results"),
    "scores": TableSpec("scores", ("task", "metric", "value"), "eval", "evaluation scores"),
    "summary": TableSpec("summary", ("mask", "metric", "mean"), "sweep", "mask-sweep results"),
    "validation": TableSpec("suggest_validation", ("method", "mask", "rank"), "sweep",
                            "checks of the mask proposals against a sweep"),
    "suggest": TableSpec("suggest", ("method", "signal", "segment", "score"), "suggest",
                         "mask proposals (per-segment scores)"),
    "dynamics": TableSpec("dynamics", ("step", "block", "module", "grad_norm", "update_norm"),
                          "tune", "training dynamics (per-block gradient and update norms)"),
    "steer": TableSpec("steer", ("scale", "metric", "value"), "steer", "steering results"),
    "routing": TableSpec("routing", ("block", "metric", "model", "value"), "analyze",
                         "routing drift of a mixture-of-experts pair"),
    "ablate": TableSpec("ablate", ("unit", "blocks", "metric", "value"), "ablate",
                        "ablation results (causal effect per block)"),
}
# Tables built from other files of a run folder (run.json, trainer state), not read from CSV.
DERIVED: dict[str, TableSpec] = {
    "tune": TableSpec("run.json", ("mask", "rank", "trainable_params"), "tune",
                      "segment LoRA runs (mask, rank, budget)"),
    "loss_curve": TableSpec("run.json / trainer_state.json", ("step", "loss"), "tune",
                            "training loss curves"),
    "seed_scores": TableSpec("jobs/*/result.json", ("mask", "seed", "metric", "value"), "sweep",
                             "per-seed scores of a sweep"),
    "swap_items": TableSpec("swap_items", ("config", "item", "tokens"), "swap",
                            "per-item swap scores (the paired tests of Fig. 6 and pattern d)"),
    "steer_items": TableSpec("steer_items", ("scale", "metric", "item", "value"), "steer",
                             "per-item steering scores (the paired tests of Fig. 11)"),
    "predictions": TableSpec("predictions-*.jsonl", ("task", "item"), "eval",
                             "per-item eval results (paired comparisons of eval runs)"),
}
# predictions-<task>.jsonl fields that tell an item apart (with its index): runs compared item
# by item must have scored the same items, not only the same positions
ITEM_KEYS = ("id", "question", "text", "target", "subject", "ind", "activity_label")
# A command's per-item table (read for the paired tests of its findings).
ITEM_TABLES = {"swap": "swap_items", "steer": "steer_items"}
COMMANDS = ("analyze", "weights", "probe", "swap", "eval", "tune", "sweep", "suggest", "demo",
            "steer", "ablate")
SUFFIXES = (".csv", ".parquet", ".json")
TEXT_COLUMNS = ("mask", "best_mask", "config", "direction", "head", "model", "metric", "module",
                "task", "metric_a", "metric_b", "seeds", "method", "signal", "blocks", "layers")


# Columns that hold numbers in every table that has them (checked when a table is read).
NUMERIC_COLUMNS = ("layer", "block", "value", "ci_low", "ci_high", "n", "r", "mean", "rank",
                   "segment", "score", "step", "grad_norm", "update_norm", "scale", "alpha",
                   "p_value", "n_items", "trainable_params")


def spec_of(name: str) -> TableSpec:
    return TABLES.get(name) or DERIVED[name]


@dataclass
class Run:
    """One run folder: its ``run.json``, a legend label and the tables the report reads.

    ``extra`` holds non-tabular content (``suggest``: suggest.json); ``notes`` what was
    left out of this run and why."""

    path: Path
    record: dict[str, Any]
    command: str
    label: str
    n_blocks: int | None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def segments(self) -> int | None:
        """The number of segments of its masks, where the run records it."""
        for src in (self.record, self.record.get("config") or {},
                    self.record.get("settings") or {}):
            v = src.get("segments") if isinstance(src, dict) else None
            if isinstance(v, int) and v > 0:
                return v
        return None


class RunSet(list):
    """The loaded runs, plus ``skipped`` (what could not be used, and why) and ``notices``
    (what a reader must know first, e.g. a reduced demo)."""

    def __init__(self, runs: Iterable[Run] = (), skipped: Sequence[str] = (),
                 notices: Sequence[str] = ()) -> None:
        super().__init__(runs)
        self.skipped: list[str] = list(skipped)
        self.notices: list[str] = list(notices)


def warn(message: str) -> None:
    """One note on stderr (the report also shows it)."""
    print(f"sftscope: note: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------- tables


def find_table(folder: Path, stem: str) -> Path | None:
    for suf in SUFFIXES:
        p = folder / f"{stem}{suf}"
        if p.is_file():
            return p
    return None


def read_table(path: Path, required: Sequence[str] = (), k: int | None = None) -> pd.DataFrame:
    """Read one output table (CSV/Parquet/JSON); masks come back plain (``01000``, from
    ``m01000`` or from a number a reader made of it), names stay text."""
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
        raise SftscopeError(f"{path} could not be read ({first_line(e)})"
                            "; re-run the command that wrote it") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SftscopeError(
            f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))}); "
            "it was not written by this sftscope version: re-run the command that wrote it"
        )
    for c in MASK_COLUMNS:
        if c in df.columns:
            df[c] = df[c].map(lambda v: mask_from_text(v, k)).astype(object)
    return _numbers(df, path)


def _numbers(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The numeric columns as numbers; a text where a number belongs (an edited or foreign
    table) refuses the table, so that it is left out with a note, never drawn as if numeric."""
    for c in NUMERIC_COLUMNS:
        if c not in df.columns or pd.api.types.is_numeric_dtype(df[c]):
            continue
        num = pd.to_numeric(df[c], errors="coerce")
        text = df[c].map(lambda v: isinstance(v, str) and v.strip() != "")
        bad = num.isna() & text
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SftscopeError(f"{path}: column {c} holds {df[c].iloc[i]!r} where a number "
                                f"belongs (row {i + 1}); re-run the command that wrote it")
        df[c] = num
    return df


def _tune_tables(folder: Path, record: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """``tune``: one row (mask, rank, budget, steps, loss); ``loss_curve``: step, loss."""
    res = record.get("result") if isinstance(record.get("result"), dict) else {}
    cfg = record.get("config") if isinstance(record.get("config"), dict) else {}
    out: dict[str, pd.DataFrame] = {}

    def get(key: str) -> Any:
        for src in (res, record, cfg):
            if isinstance(src, dict) and src.get(key) is not None:
                return src[key]
        return None

    full = get("method") == "full"
    if get("trainable_params") is not None:
        mask = get("mask")
        blocks = get("blocks")
        out["tune"] = pd.DataFrame([{
            "method": get("method") or "lora",
            "mask": mask_from_text(mask) if mask is not None else "",
            "blocks": block_text(blocks) if isinstance(blocks, list) else (blocks or ""),
            "rank": None if full else get("rank"), "alpha": None if full else get("alpha"),
            "full_rank": None if full else get("full_rank"),
            "trainable_params": get("trainable_params"),
            "full_depth_params": get("full_depth_params"), "budget_ratio": get("budget_ratio"),
            "steps": get("steps"), "train_loss": get("train_loss"), "seed": get("seed"),
            "n_train": get("n_train")}])
    curve = _trainer_state_curve(folder)
    if curve is None:
        hist = res.get("loss_history") if isinstance(res, dict) else None
        if isinstance(hist, list) and hist:
            every = cfg.get("logging_steps") if isinstance(cfg.get("logging_steps"), int) else 1
            curve = pd.DataFrame({"step": [every * (i + 1) for i in range(len(hist))],
                                  "loss": [float(h) for h in hist],
                                  "source": "run.json loss_history (step = logging_steps x i)"})
    if curve is not None and len(curve):
        out["loss_curve"] = curve
    return out


def _seed_scores(folder: Path, k: int | None) -> pd.DataFrame | None:
    """Per job of a sweep folder (``jobs/*/result.json``): mask, seed, metric and the job's
    mean score (over its items), for the seed-robustness figure."""
    rows = []
    for p in sorted(folder.glob("jobs/*/result.json")):
        try:
            res = json.loads(p.read_text(encoding="utf-8"))
            mask, seed = mask_from_text(res["mask"], k), int(res["seed"])
            scores = res.get("scores") or {}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable job is the sweep's business; its summary says so
        for metric, v in scores.items():
            rows.append({"mask": mask, "seed": seed, "metric": str(metric),
                         "value": float(v) if v is not None else np.nan})
    if not rows:
        return None
    df = pd.DataFrame(rows, columns=["mask", "seed", "metric", "value"])
    df["mask"] = df["mask"].astype(object)
    return df


def _eval_predictions(folder: Path) -> pd.DataFrame | None:
    """Per item of each ``predictions-<task>.jsonl``: the task, an identity ``item`` (index
    and the fields that name the item) and every number or boolean (as 0/1), for paired
    comparisons of eval runs. An unreadable file is left out (the scores still stand)."""
    rows = []
    for p in sorted(folder.glob("predictions-*.jsonl")):
        task = p.stem[len("predictions-"):]
        try:
            lines = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()
                     if x.strip()]
        except (OSError, ValueError):
            continue
        for r in (x for x in lines if isinstance(x, dict)):
            key = json.dumps([r.get("index"), *(str(r.get(k)) for k in ITEM_KEYS if k in r)])
            rows.append({"task": task, "item": key, **{
                k: float(v) for k, v in r.items()
                if isinstance(v, (bool, int, float)) and k not in ("index", "task", "item")}})
    return pd.DataFrame(rows) if rows else None


def _trainer_state_curve(folder: Path) -> pd.DataFrame | None:
    """The loss log of the latest ``trainer_state.json`` in the folder (kept checkpoints)."""
    best: tuple[int, list] | None = None
    for p in list(folder.glob("trainer_state.json")) + list(
            folder.glob("checkpoints/*/trainer_state.json")):
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        step = int(state.get("global_step") or 0)
        if best is None or step > best[0]:
            best = (step, state.get("log_history") or [])
    if best is None:
        return None
    rows = [(int(h["step"]), float(h["loss"])) for h in best[1]
            if isinstance(h, dict) and "loss" in h and "step" in h]
    if not rows:
        return None
    df = pd.DataFrame(rows, columns=["step", "loss"])
    df["source"] = "trainer_state.json"
    return df


# ----------------------------------------------------------------------------- labels


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


def _model_labels(record: dict[str, Any]) -> dict[str, str]:
    """Labels run.json's model fingerprints carry (an adapter: ``adapter m00100 r64 s0``)."""
    models = record.get("models")
    if not isinstance(models, dict):
        return {}
    return {k: str(v["label"]) for k, v in models.items()
            if isinstance(v, dict) and isinstance(v.get("label"), str) and v["label"]}


def run_label(record: dict[str, Any], folder: Path) -> str:
    """Legend label: the model ids of the config (``base vs sft``; an adapter by its tune run,
    ``base vs sft=adapter m00100 r64 s0``; a checkpoint chain ``base chain``, each stage then
    ``base chain [dpo]`` in the figures), else the folder name."""
    cfg = record.get("config") or {}
    base = _find_id(cfg, ("base", "base_model", "base_id", "model", "model_id", "model_name"))
    sft = _find_id(cfg, ("sft", "sft_model", "sft_id", "tuned", "instruct"))
    labels = _model_labels(record)
    chain = record.get("chain")
    if base and isinstance(chain, list) and len(chain) > 1:  # figures add [stage]
        return f"{labels.get('base') or _short(base)} chain"
    if base and labels.get("sft"):
        return f"{labels.get('base') or _short(base)} vs sft={labels['sft']}"
    if len(labels) == 1 and not sft:  # one model with an adapter: base+adapter, not the base
        (role, label), = labels.items()
        fp = (record.get("models") or {}).get(role) or {}
        on = fp.get("base") if isinstance(fp.get("base"), dict) else {}
        return f"{_short(on['source'])}+{label}" if on.get("source") else label
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


# ----------------------------------------------------------------------------- folders


def known_list() -> str:
    return ", ".join(f"{s.stem}.csv" for s in TABLES.values()) + ", a tune run.json"


def _record(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise SftscopeError(f"run folder {folder} does not exist")
    if not folder.is_dir():
        raise SftscopeError(f"{folder} is not a folder; give run folders written by sftscope "
                            "commands (each has a run.json)")
    rj = folder / "run.json"
    if not rj.is_file():
        raise SftscopeError(
            f"{folder} has no run.json, so it is not an sftscope run folder; give the folder an "
            "sftscope command wrote (--out of analyze, weights, probe, swap, eval, tune, sweep, "
            "suggest, steer, ablate, demo)")
    record = io.read_json(rj)
    if not isinstance(record, dict) or not record.get("command"):
        raise SftscopeError(f"{rj} has no \"command\" field; it was not written by sftscope")
    cmd = str(record["command"])
    if cmd not in COMMANDS:
        raise SftscopeError(f"{rj}: command {cmd!r} is not one the report reads "
                            f"({', '.join(COMMANDS)})")
    return record


def load_run(path: str | Path) -> Run:
    """Read one run folder; a clear error when it is not one or holds nothing the report reads.
    A table that cannot be read is left out with a line in ``run.notes`` (an error only when
    it was the run's only table)."""
    folder = Path(path)
    record = _record(folder)
    run = Run(path=folder, record=record, command=str(record["command"]),
              label=run_label(record, folder), n_blocks=_n_blocks(record))
    errors = []
    for name, spec in TABLES.items():
        p = find_table(folder, spec.stem)
        if p is None:
            continue
        try:
            run.tables[name] = read_table(p, spec.required, run.segments)
        except SftscopeError as e:
            errors.append(str(e))
    if run.command == "tune" or (folder / "adapter").is_dir():
        run.tables.update(_tune_tables(folder, record))
    item_table = ITEM_TABLES.get(run.command)
    items = find_table(folder, DERIVED[item_table].stem) if item_table else None
    if item_table and items is not None:
        try:
            run.tables[item_table] = read_table(items, DERIVED[item_table].required,
                                                run.segments)
        except SftscopeError as e:
            errors.append(str(e))
    if "scores" in run.tables:  # eval, or tune's evaluation: its per-item predictions
        preds = _eval_predictions(folder)
        if preds is not None:
            run.tables["predictions"] = preds
    if run.command == "sweep" and (folder / "jobs").is_dir():
        seeds = _seed_scores(folder, run.segments)
        if seeds is not None:
            run.tables["seed_scores"] = seeds
    sj = folder / "suggest.json"
    if sj.is_file():
        try:
            run.extra["suggest"] = io.read_json(sj)
        except SftscopeError as e:
            errors.append(str(e))
    if not run.tables and not run.extra:
        why = "; ".join(errors) if errors else (
            f"it holds none of the files a report reads ({known_list()})")
        raise SftscopeError(f"{folder} (command {run.command!r}): {why}")
    run.notes += [f"{folder}: table left out: {e}" for e in errors]
    return run


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / "run.json").is_file())


def _has_own(folder: Path) -> bool:
    return any(find_table(folder, s.stem) for s in TABLES.values()) or (
        folder / "suggest.json").is_file()


def reduced_notice(sizes: dict[str, Any] | None = None, where: str = "") -> str:
    """The notice a reduced (``--quick``) demo's report opens with."""
    size = ", ".join(f"{k} {v}" for k, v in (sizes or {}).items())
    return (f"Reduced demo{f' ({where})' if where else ''} (--quick): every step ran at a tiny "
            f"size{f' ({size})' if size else ''} to check that the pipeline runs, not to "
            "measure anything. Its numbers, figures and verdicts say nothing about the paper's "
            "patterns; run `sftscope demo` without --quick for the full-size demo.")


def _demo_notice(record: dict[str, Any], folder: Path) -> str | None:
    cfg = record.get("config") or {}
    if record.get("command") != "demo" or not (record.get("reduced") or cfg.get("quick")):
        return None
    sizes = record.get("sizes") if isinstance(record.get("sizes"), dict) else None
    return reduced_notice(sizes, str(folder))


def load_runs(paths: Iterable[str | Path]) -> RunSet:
    """Load run folders (see the module docstring); folders that cannot be used are listed in
    ``skipped`` and on stderr. Raises only when none is usable. Duplicate labels get the folder
    name."""
    runs = RunSet()
    seen: set[Path] = set()

    def add(folder: Path) -> None:
        key = folder.resolve()
        if key in seen:
            return
        seen.add(key)
        try:
            r = load_run(folder)
        except SftscopeError as e:
            runs.skipped.append(f"skipped {folder}: {e}")
            return
        runs.append(r)
        runs.skipped += r.notes
        for c in _children(folder):
            if c.resolve() not in seen and _has_own(c):
                add(c)

    for p in [Path(x) for x in paths]:
        if p.is_dir() and _children(p) and not _has_own(p):
            try:
                record = _record(p)
            except SftscopeError:
                record = {}
            notice = _demo_notice(record, p)
            if notice:
                runs.notices.append(notice)
            seen.add(p.resolve())
            before = len(runs)
            for c in _children(p):
                add(c)
            if len(runs) == before:
                runs.skipped.append(f"skipped {p}: none of its run folders holds a file the "
                                    f"report reads ({known_list()})")
            continue
        add(p)
    if not runs:
        reasons = [s.split(": ", 1)[1] if s.startswith("skipped ") else s for s in runs.skipped]
        if len(reasons) == 1:
            raise SftscopeError(reasons[0])
        if reasons:
            raise SftscopeError("no run folder is usable: " + "; ".join(runs.skipped))
        raise SftscopeError("give at least one run folder")
    for s in runs.skipped:
        warn(s)
    _unique_labels(runs)
    return runs


def _unique_labels(runs: list[Run]) -> None:
    """Runs that would share a legend entry in some section (same label, same table) are told
    apart by folder name; the same pair across commands keeps one label and one colour."""
    base_labels = {id(r): r.label for r in runs}
    for suffix in (lambda r: r.path.resolve().name,
                   lambda r: f"{r.path.resolve().parent.name}/{r.path.resolve().name}",
                   lambda r: f"#{runs.index(r) + 1}"):
        clash: set[int] = set()
        for name in [*TABLES, *DERIVED]:
            holders = [r for r in runs if name in r.tables]
            labels = [r.label for r in holders]
            clash |= {id(r) for r in holders if labels.count(r.label) > 1}
        if not clash:
            break
        for r in runs:
            if id(r) in clash:
                r.label = f"{base_labels[id(r)]} ({suffix(r)})"


def as_runs(runs: Iterable[Run | str | Path] | str | Path) -> RunSet:
    """Runs as given, or loaded from paths."""
    items = [runs] if isinstance(runs, (str, Path, Run)) else list(runs)
    if isinstance(runs, RunSet):
        return runs
    loaded = [r for r in items if isinstance(r, Run)]
    paths = [r for r in items if not isinstance(r, Run)]
    if not paths:
        return RunSet(loaded)
    more = load_runs(paths)
    return RunSet(loaded + list(more), more.skipped, more.notices)


def combined(runs: Sequence[Run], name: str) -> pd.DataFrame:
    """One table across runs with ``run`` (label) and ``n_blocks`` columns in front."""
    frames = []
    for r in runs:
        df = r.tables.get(name)
        if df is None or df.empty:
            continue
        df = df.copy()
        df.insert(0, "n_blocks", r.n_blocks if r.n_blocks else np.nan)
        df.insert(0, RUN, r.label)
        if name == "summary" and r.record.get("primary_metric"):
            df["primary_metric"] = str(r.record["primary_metric"])
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)
