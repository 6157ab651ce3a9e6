"""``sftscope sweep``: segment LoRA for every mask x seed, each a resumable job, then statistics.

Layout of a sweep folder ``RUN``::

    RUN/sweep.json                 the settings every job shares (refuses to mix others)
    RUN/jobs.json                  every (mask, seed) asked for so far (union)
    RUN/jobs/<mask>-s<seed>/       one job: tune/ (adapter, Trainer checkpoints), eval/
        job.json                   attempts, start time, last error
        items.csv                  per-item scores: item, metric, value
        result.json                written atomically LAST: a job is done when it exists
    RUN/summary.csv                per mask and metric: mean, CI, n_items, p-value vs 11111
    RUN/position.csv               one-segment masks by depth (the inverted-U plot)
    RUN/suggest_validation.csv     with --validate-suggest: where each proposal ranks, beside
                                   the prior-only mask and random interior masks
    RUN/run.json                   command "sweep", n_blocks, settings, jobs done/pending

Resuming: run the same command again. Finished jobs (``result.json`` present) are never
repeated; an unfinished job is run again and its tune step resumes from its last Trainer
checkpoint (tune's ``resume``). Masks or seeds may be added to an existing sweep; the model,
data, segments, evaluation task and tune/eval options may not (``sweep.json`` is compared,
and the error names each setting that differs).

Jobs: ``run_sweep(cfg, job_fn=None)`` calls ``job_fn(job)`` for each unfinished job of this
shard (``job.mask``, ``job.seed``, ``job.dir``, ``job.attempt``, ``job.settings``); it returns a
``JobOutput`` with per-item scores (``item, metric, value``) and the trainable-parameter count.
The default, ``tune_and_evaluate``, trains with ``tune`` (``resume=True``; the job's seed sets
the LoRA initialisation, dropout and data order, while ``data_seed`` keeps the same training
subset for every job) and scores the adapter with ``evaluate`` (per-item correctness from its
``predictions-<task>.jsonl``). Tests inject a fast fake. A job that raises stops the sweep (the
error is kept in its ``job.json``); running again retries it.

Several GPUs: jobs are independent. ``job_index``/``num_jobs`` (CLI ``--job-index I
--num-jobs N`` or ``SFTSCOPE_JOB_INDEX``/``SFTSCOPE_NUM_JOBS``) runs every N-th job starting
at I, so one process per device covers the list::

    for i in 0 1 2 3; do
      CUDA_VISIBLE_DEVICES=$i sftscope sweep ... --job-index $i --num-jobs 4 &
    done; wait
    sftscope sweep --out RUN --collect

On a cluster (docs/cluster.md): one SLURM array task per shard (``--job-index
$SLURM_ARRAY_TASK_ID``), all writing to one shared ``--out``; a shard may run under
``accelerate launch`` (or ``torchrun``) across its node's GPUs: every process runs each job's
``tune`` together (DDP), rank 0 alone evaluates and writes the job's files while the others
wait for its ``result.json``. ``--collect`` (old name ``--summarize-only``) then gathers the
finished jobs, refuses any made with other settings (``result.json`` carries the hash of the
settings, compared with ``sweep.json``'s) and reports the missing, failed and unfinished ones
(``run.json``: ``jobs_missing``, ``jobs_failed``, ``jobs_unfinished``).

Statistics (``summary.csv``): a mask's scores form a seeds x items matrix (per-item
correctness, 0/1, for accuracies).

- ``mean``: the mean over seeds and items.
- ``ci_low``/``ci_high``: a two-way ("pigeonhole") bootstrap (Owen 2007, for crossed random
  factors): each replicate resamples seeds and items independently with replacement, so the
  interval carries both the training randomness (seeds) and the finite test set (items);
  percentile interval, ``n_boot`` replicates (default 2000), seeded. When every score is the
  same (e.g. all items correct) a percentile bootstrap has zero width; binary scores then get
  the Wilson interval of the item count instead (``n`` = items, seeds treated as perfectly
  correlated: conservative).
- ``p_value``: paired against ``11111`` on the same items and the same seeds (the seeds both
  masks have; items both have): per item, the difference of the two masks' scores averaged over
  the shared seeds; a paired t-test of those per-item differences (two-sided). Items are the
  sampling unit, so the seeds of one item are not counted as independent evidence; with one
  seed and 0/1 scores this is the large-sample equivalent of McNemar's test. All differences
  zero (identical masks) gives ``p_value = 1``; ``11111`` itself and masks with no shared seed
  get NaN. Extra columns: ``delta`` (mean minus the ``11111`` mean on the shared pairs),
  ``seed_sd`` (standard deviation of the per-seed means), ``blocks``.

Rows are ordered by ``segments.mask_sort_key`` (full depth first, then by the number of
segments, one-segment masks bottom to top first); the primary metric (``--metric``, else the
task's own: ``flexible_extract`` for GSM8K, ``accuracy`` for MMLU) comes first, and
``--validate-suggest`` ranks by it.

Position (``position.csv``): the one-segment masks with their segment index, block range and
the relative depth of the centre of their blocks (``(lo + hi) / 2 / L``).

Masks in the written tables carry the table prefix (``m01000``, ``segments.mask_text``) so that a
plain ``pd.read_csv`` keeps them as text; the returned DataFrames hold plain masks.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sftscope.config.commands import (
    SWEEP_EVAL_KEYS,
    SWEEP_SUGGEST_KEYS,
    SWEEP_TUNE_KEYS,
    EvalConfig,
    SuggestConfig,
    SweepConfig,
    TuneConfig,
)
from sftscope.config.core import changed, check_fields, defaults
from sftscope.errors import SftscopeError
from sftscope.experiments.evaluate import evaluate
from sftscope.experiments.forgetting import (
    correlation_line,
    forgetting_table,
    job_retention,
    retention_scores,
)
from sftscope.experiments.suggest import prior_mask, suggest
from sftscope.experiments.tune import parse_eval_task, tune
from sftscope.io import file_sha256, read_json, run_record, stable_hash, write_json, write_table
from sftscope.load.arch import n_layers
from sftscope.load.data import parse_source
from sftscope.load.models import fingerprint, load_config
from sftscope.metric_registry import lower_is_better
from sftscope.metrics.stats import paired_ttest, proportion_ci
from sftscope.parallel import is_main, launch_id
from sftscope.progress import say
from sftscope.runs import LOCK, check_folder, claim, folder_command, releasing
from sftscope.segments import (
    block_text,
    mask_blocks,
    mask_group,
    mask_sort_key,
    masks_as_text,
    parse_mask,
    segment_bounds,
)
from sftscope.tasks import all_tasks, check_metric

SUMMARY_COLUMNS = ["mask", "seeds", "trainable_params", "metric", "mean", "ci_low", "ci_high",
                   "n_items", "p_value", "delta", "seed_sd", "blocks"]
POSITION_COLUMNS = ["segment", "depth", "first_block", "last_block", "mask", "metric", "mean",
                    "ci_low", "ci_high", "n_items", "seeds"]
VALIDATION_COLUMNS = ["method", "mask", "rank", "prior_mask", "prior_rank", "random_rank",
                      "random_as_good", "n_interior", "n_masks", "score", "best_mask",
                      "best_score", "in_sweep", "spearman_singles", "metric"]
ITEM_COLUMNS = ["item", "metric", "value"]
MASK_GROUPS = ("singles", "paper", "all")
# Keys the sweep sets per job (never user options).
TUNE_JOB_KEYS = ("model", "train", "out", "mask", "segments", "blocks", "seed", "resume",
                 "run_eval")
EVAL_JOB_KEYS = ("model", "task", "data", "out", "adapter")
# Options that do not change results (they may differ between invocations).
TUNE_FREE_KEYS = ("keep_checkpoints", "report_to", "logging_steps", "dynamics_every")
EVAL_FREE_KEYS = ("device", "device_map", "batch_size", "allow_other_base")
# Tune options that the evaluation inherits unless the eval options set them.
SHARED_KEYS = ("revision", "tokenizer", "chat_template", "dtype", "preset")
# The primary metric of each task (its home is the task module, ``sftscope.tasks``).
PRIMARY = {t.name: t.primary for t in all_tasks()}


@dataclass
class Job:
    """One mask x seed run of a sweep; ``job_fn(job)`` does the work in ``job.dir``."""

    mask: str
    seed: int
    index: int
    dir: Path
    attempt: int
    config: SweepConfig
    settings: dict[str, Any]

    @property
    def name(self) -> str:
        return job_name(self.mask, self.seed)


@dataclass
class JobOutput:
    """What a job returns: per-item scores (``item, metric, value``) and its size."""

    items: pd.DataFrame
    trainable_params: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores: dict[str, Sequence[float]], trainable_params: int | None = None,
                    items: Sequence[Any] | None = None, **info: Any) -> JobOutput:
        """Build from ``{metric: per-item values}`` (items numbered 0.. unless given)."""
        rows = []
        for metric, vals in scores.items():
            ids = list(items) if items is not None else list(range(len(vals)))
            rows += [(i, metric, float(v)) for i, v in zip(ids, vals)]
        return cls(pd.DataFrame(rows, columns=ITEM_COLUMNS), trainable_params, dict(info))


@dataclass
class SweepResult:
    """Tables written, and what happened to the jobs of this invocation."""

    out: str
    summary: pd.DataFrame
    position: pd.DataFrame
    validation: pd.DataFrame | None
    ran: list[str]
    skipped: list[str]
    pending: list[str]
    n_jobs: int
    primary_metric: str | None = None
    written: bool = False
    missing: list[str] = field(default_factory=list)      # never started
    failed: dict[str, str] = field(default_factory=dict)  # job -> the error that stopped it
    unfinished: list[str] = field(default_factory=list)   # started, no result, no error


JobFn = Callable[[Job], JobOutput]


# ----------------------------------------------------------------------------- parsing


def job_name(mask: str, seed: int) -> str:
    """Folder name of a job: ``<mask>-s<seed>``."""
    return f"{mask}-s{seed}"


def parse_seeds(seeds: Any) -> list[int]:
    """``3`` -> [0, 1, 2]; ``"0,5,7"`` -> [0, 5, 7]; a sequence of ints as is."""
    try:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            vals = list(range(seeds)) if seeds >= 1 else []
        elif isinstance(seeds, str):
            s = seeds.strip()
            vals = ([int(x) for x in s.split(",") if x.strip()] if "," in s
                    else list(range(int(s))))
        else:
            vals = [int(x) for x in seeds]
    except (TypeError, ValueError) as e:
        raise SftscopeError(f"--seeds {seeds!r}: give a count (3 = seeds 0,1,2) or a comma "
                            f"list of seeds (0,5,7)") from e
    if not vals:
        raise SftscopeError(f"--seeds {seeds!r} selects no seed; give a count >= 1")
    if len(set(vals)) != len(vals):
        raise SftscopeError(f"--seeds {seeds!r} repeats a seed")
    return vals


def expand_masks(spec: str, k: int, baseline: bool = True) -> list[str]:
    """Masks of a group/list (``singles``, ``paper``, ``all`` or ``01000,01100``); full depth
    comes first, and is added when ``baseline`` (the p-values are against it)."""
    items = [p.strip() for p in spec.split(",") if p.strip()]
    if not items:
        raise SftscopeError("--masks is empty; use singles, paper, all or masks like 01000")
    for item in items:
        if item in (*MASK_GROUPS,):
            continue
        if set(item) <= {"0", "1"}:
            parse_mask(item, k)
            continue
        raise SftscopeError(f"unknown mask group {item!r}; the valid groups are "
                            f"{', '.join(MASK_GROUPS)} (or give masks of {k} characters such "
                            f"as {'0' + '1' + '0' * (k - 2) if k >= 2 else '1'})")
    masks = mask_group(spec, k)
    full = "1" * k
    if baseline or full in masks:  # the baseline runs first: p-values need it
        masks = [full, *[m for m in masks if m != full]]
    return masks


def parse_eval(spec: str) -> tuple[str, str | None]:
    """``gsm8k:PATH`` / ``gsm8k`` / ``mmlu:PATH`` / ``perplexity:SOURCE`` -> (task, data)."""
    return parse_eval_task(spec, flag="--eval")


def tune_options(cfg: SweepConfig) -> dict[str, Any]:
    """The full tune options of every job (TuneConfig defaults + the given ones)."""
    given = check_fields(TuneConfig, cfg.tune, what="tune", exclude=SWEEP_TUNE_KEYS)
    d = {**defaults(TuneConfig), **given}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    for k in (*TUNE_JOB_KEYS, *SWEEP_TUNE_KEYS):
        d.pop(k, None)
    for k in [k for k in d if k.startswith("eval_")]:  # the sweep evaluates separately
        d.pop(k)
    return d


def eval_options(cfg: SweepConfig) -> dict[str, Any]:
    """The full evaluation options of every job (EvalConfig defaults + given + shared)."""
    given = check_fields(EvalConfig, cfg.evaluation, what="eval", exclude=SWEEP_EVAL_KEYS)
    for k in SHARED_KEYS:
        if k in cfg.tune and k not in given:
            given[k] = cfg.tune[k]
    d = {**defaults(EvalConfig), **given}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    for k in (*EVAL_JOB_KEYS, *SWEEP_EVAL_KEYS):
        d.pop(k, None)
    return d


# ----------------------------------------------------------------------------- settings


def _data_identity(source: str | None) -> dict[str, Any] | None:
    """A data source and, for a local file, its SHA-256 (so an edited file is noticed)."""
    if source is None:
        return None

    _, path = parse_source(source)
    out: dict[str, Any] = {"source": source}
    if path is not None:
        if not path.is_file():
            raise SftscopeError(f"data file {path} does not exist")
        out["sha256"] = file_sha256(path)[:24]
    return out


def _n_blocks_of(model: str, revision: str | None) -> int:
    n = n_layers(load_config(model, revision))
    if n is None:
        raise SftscopeError(f"{model}: its config names no number of blocks")
    return n


def sweep_settings(cfg: SweepConfig) -> dict[str, Any]:
    """What every job of a sweep shares; ``sweep.json`` holds it and new runs must match."""
    if not cfg.model or not cfg.train or not cfg.task:
        raise SftscopeError("a sweep needs --model, --train and --task (only --collect "
                            "of an existing sweep may leave them out)")
    topts = tune_options(cfg)
    eopts = eval_options(cfg)
    n_blocks = _n_blocks_of(cfg.model, topts.get("revision"))
    segment_bounds(n_blocks, cfg.segments)  # segments > blocks: a clear error
    task, data = parse_eval(cfg.task)
    fp = fingerprint(cfg.model, topts.get("revision"))
    out = {
        "model": cfg.model, "model_fingerprint": fp, "n_blocks": n_blocks,
        "train": _data_identity(cfg.train),
        "eval": {"task": task, "spec": cfg.task, "data": _data_identity(data)},
        "segments": cfg.segments, "tune": topts, "eval_options": eopts,
    }
    if cfg.retention:  # only when asked: sweeps made before it keep their settings
        out["retention"] = {"data": _data_identity(cfg.retention),
                            "limit": cfg.retention_limit}
    return out


def _model_key(fp: dict[str, Any]) -> Any:
    return fp.get("hash") if fp.get("local") else (fp.get("source"), fp.get("revision"))


def _comparable(s: dict[str, Any]) -> dict[str, Any]:
    """Flatten settings into ``name -> value`` for comparison (free options dropped)."""
    out: dict[str, Any] = {"model": _model_key(s.get("model_fingerprint") or {}),
                           "segments": s.get("segments")}
    train = s.get("train") or {}
    out["training data"] = train.get("sha256") or train.get("source")
    ev = s.get("eval") or {}
    out["evaluation task"] = ev.get("task")
    data = ev.get("data") or {}
    out["evaluation data"] = data.get("sha256") or data.get("source")
    # an option added to tune/eval since a sweep was recorded had its default value then
    tune = {**_option_defaults(TuneConfig, s.get("tune")), **(s.get("tune") or {})}
    evo = {**_option_defaults(EvalConfig, s.get("eval_options")), **(s.get("eval_options") or {})}
    for k, v in tune.items():
        if k not in TUNE_FREE_KEYS:
            out[f"tune option {k}"] = v
    for k, v in evo.items():
        if k not in EVAL_FREE_KEYS:
            out[f"eval option {k}"] = v
    return out


def _option_defaults(cls: type, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of the options a job config has that a recorded option set lacks (none when
    nothing is recorded)."""
    if not recorded:
        return {}
    fresh = (tune_defaults() if cls is TuneConfig else
             {k: v for k, v in defaults(EvalConfig).items()
              if k not in (*EVAL_JOB_KEYS, *SWEEP_EVAL_KEYS)})
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in fresh.items()
            if k not in recorded}


def tune_defaults() -> dict[str, Any]:
    """The tune options a sweep records for every job, at their defaults."""
    d = {k: v for k, v in defaults(TuneConfig).items()
         if k not in (*TUNE_JOB_KEYS, *SWEEP_TUNE_KEYS) and not k.startswith("eval_")}
    return d


def _show(name: str, s: dict[str, Any], v: Any) -> str:
    if name == "model":
        fp = s.get("model_fingerprint") or {}
        ident = (f"hash {fp.get('hash')}" if fp.get("local")
                 else f"revision {fp.get('revision')}")
        return f"{fp.get('source')} ({ident})"
    if name in ("training data", "evaluation data"):
        d = s.get("train") if name == "training data" else (s.get("eval") or {}).get("data")
        d = d or {}
        return f"{d.get('source')}" + (f" (sha256 {d['sha256'][:12]})" if d.get("sha256") else "")
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return json.dumps(v) if not isinstance(v, str) else v


def settings_hash(settings: dict[str, Any]) -> str:
    """A short hash of what must be equal for jobs to be pooled (``_comparable``)."""
    return stable_hash(_comparable(settings))


def compare_settings(old: dict[str, Any], new: dict[str, Any], where: str) -> None:
    """Refuse to mix: one line naming every setting that differs."""
    a, b = _comparable(old), _comparable(new)
    diffs = []
    for k in dict.fromkeys([*a, *b]):
        if a.get(k, "(unset)") != b.get(k, "(unset)"):
            diffs.append(f"{k} is {_show(k, old, a.get(k, '(unset)'))} there but "
                         f"{_show(k, new, b.get(k, '(unset)'))} now")
    if diffs:
        raise SftscopeError(
            f"{where} holds a sweep made with other settings ({'; '.join(diffs)}); jobs of "
            f"different settings cannot be mixed: use another --out, or repeat the settings "
            f"recorded in {where}/sweep.json")


def check_collect_options(cfg: SweepConfig, settings: dict[str, Any]) -> None:
    """``--collect`` alone gathers the jobs as they were run: a tune or eval option given with
    it that differs from the recorded one (``--lr``) is refused, never silently ignored."""
    given = (("", check_fields(TuneConfig, cfg.tune, what="tune", exclude=SWEEP_TUNE_KEYS),
              settings.get("tune") or {}, TUNE_FREE_KEYS),
             ("eval-", check_fields(EvalConfig, cfg.evaluation, what="eval",
                                    exclude=SWEEP_EVAL_KEYS),
              settings.get("eval_options") or {}, EVAL_FREE_KEYS))
    for prefix, opts, recorded, free in given:
        for k, v in opts.items():
            if k in free:
                continue
            old = recorded.get(k, defaults(TuneConfig if not prefix else EvalConfig).get(k))
            if changed({k: old}, {k: v}):
                raise SftscopeError(
                    f"--{prefix}{k.replace('_', '-')} {v} differs from the sweep's recorded "
                    f"{old!r} ({cfg.out}/sweep.json); --collect gathers the jobs as they were "
                    f"run: drop the option, or run a sweep with it into another --out")


def any_progress(out: Path) -> bool:
    """True when some job of the sweep finished or saved a training checkpoint."""
    jobs = out / "jobs"
    if not jobs.is_dir():
        return False
    return any((j / "result.json").is_file() or any(j.glob("tune/checkpoints/checkpoint-*"))
               for j in jobs.iterdir() if j.is_dir())


def load_or_write_settings(cfg: SweepConfig) -> dict[str, Any]:
    """Compare with ``RUN/sweep.json`` (refusing other settings) or create it."""
    # one process claims the folder; shards (--num-jobs N) share it by design
    out = claim(cfg.out, "sweep") if cfg.num_jobs == 1 else check_folder(cfg.out, "sweep")
    path = out / "sweep.json"
    new = sweep_settings(cfg)
    if path.is_file():
        old = read_json(path)
        if not isinstance(old, dict) or "settings" not in old:
            raise SftscopeError(f"{path} is not a sweep record; use another --out")
        try:
            compare_settings(old["settings"], new, str(out))
            return old["settings"]
        except SftscopeError:
            if any_progress(out) or cfg.collect:
                raise
            # no job finished or checkpointed: nothing to lose, the new settings replace them

            say(f"note: {out}/sweep.json had other settings but no job made progress; "
                f"starting the sweep afresh with these settings")
    if cfg.collect:
        raise SftscopeError(f"{out} holds no sweep (no sweep.json); run the sweep first")
    owner = folder_command(out) if out.is_dir() else None
    if (out.is_dir() and any(p.name != LOCK for p in out.iterdir())
            and not (out / "jobs").is_dir() and owner is None):
        raise SftscopeError(f"{out} exists and is not a sweep folder; choose an empty or new "
                            f"--out")
    record = {"settings": new, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not is_main():  # rank 0 of a launched shard writes; the others use the same settings
        return json.loads(json.dumps(record, default=str))["settings"]
    write_json(path, record)
    return read_json(path)["settings"]  # as later runs will see it (JSON types)


# ----------------------------------------------------------------------------- jobs


def job_list(masks: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, int]]:
    """Every (mask, seed), seed-major: all masks of the first seed come first."""
    return [(m, s) for s in seeds for m in masks]


def shard(jobs: Sequence[tuple[str, int]], job_index: int, num_jobs: int
          ) -> list[tuple[int, tuple[str, int]]]:
    """The jobs of shard ``job_index`` of ``num_jobs`` (every N-th, from I), with positions."""
    if num_jobs < 1:
        raise SftscopeError(f"--num-jobs must be >= 1, got {num_jobs}")
    if not 0 <= job_index < num_jobs:
        raise SftscopeError(f"--job-index must be between 0 and --num-jobs - 1 "
                            f"({num_jobs - 1}), got {job_index}")
    return [(i, j) for i, j in enumerate(jobs) if i % num_jobs == job_index]


def _recorded_jobs(out: Path) -> list[tuple[str, int]] | None:
    p = out / "jobs.json"
    if not p.is_file():
        return None
    return [(str(m), int(x)) for m, x in read_json(p).get("jobs", [])]


def _record_jobs(out: Path, jobs: Sequence[tuple[str, int]]) -> None:
    """Keep the union of the jobs every invocation asked for (``jobs.json``)."""
    old = _recorded_jobs(out) or []
    new = list(dict.fromkeys([*old, *[(str(m), int(x)) for m, x in jobs]]))
    if new != old and is_main():
        write_json(out / "jobs.json", {"jobs": [list(j) for j in new]})


def is_done(job_dir: Path) -> bool:
    """A job is done when its ``result.json`` exists (written last, atomically)."""
    return (job_dir / "result.json").is_file()


def pending_jobs(out: Path, jobs: Sequence[tuple[str, int]]) -> list[str]:
    """Names of the jobs (mask, seed) of the sweep in ``out`` that are not done."""
    return [n for n in (job_name(*j) for j in jobs) if not is_done(out / "jobs" / n)]


def _job_state(job_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def job_status(out: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Where each job of ``names`` stands, from its folder: ``done`` (``result.json``),
    ``failed`` (``job.json`` holds the error that stopped it), ``unfinished`` (started, no
    result and no error: killed, e.g. by a time limit, or still running) or ``missing``
    (never started). Failed and unfinished jobs carry their host, attempt and error."""
    out_status: dict[str, dict[str, Any]] = {}
    for name in names:
        d = out / "jobs" / name
        if is_done(d):
            out_status[name] = {"status": "done"}
            continue
        state = _job_state(d)
        if state is None:
            out_status[name] = {"status": "missing"}
            continue
        info = {k: state.get(k) for k in ("attempt", "host", "started", "error", "stopped")
                if state.get(k) is not None}
        out_status[name] = {"status": "failed" if state.get("error") else "unfinished", **info}
    return out_status


def _validate_output(out: Any, name: str) -> JobOutput:
    if isinstance(out, dict):
        out = JobOutput(**out)
    if not isinstance(out, JobOutput):
        raise SftscopeError(f"job {name}: the job function returned {type(out).__name__}, "
                            f"not a JobOutput")
    items = out.items
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing or items.empty:
        raise SftscopeError(f"job {name}: no per-item scores (columns {', '.join(ITEM_COLUMNS)})")
    items = items[ITEM_COLUMNS].copy()
    items["item"] = items["item"].astype(str)
    items["value"] = pd.to_numeric(items["value"], errors="coerce")
    out.items = items
    return out


WAIT_POLL_S = 2.0  # how often another rank looks for rank 0's result of a job


def _wait_for_main(job: Job, launch: str, poll: float | None = None) -> dict[str, Any]:
    """Another rank of a launched shard: wait until rank 0 has finished this job (its
    ``result.json``) or recorded its failure in this launch (``job.json``), and return the
    result. The launcher stops every rank when rank 0 dies, so this never waits forever."""
    d = job.dir
    while True:
        if is_done(d):
            return read_json(d / "result.json")
        state = _job_state(d)
        if state and state.get("error") and state.get("launch") == launch:
            raise SftscopeError(f"job {job.name} failed on rank 0: {state['error']}")
        time.sleep(WAIT_POLL_S if poll is None else poll)


def run_job(job: Job, job_fn: JobFn) -> dict[str, Any]:
    """Run one job in its folder and write ``items.csv`` then ``result.json`` (last).

    Under a launcher every rank runs ``job_fn`` (tune trains on all of them); rank 0 alone
    writes the job's files and the other ranks wait for them."""
    d = job.dir
    if not is_main():
        job_fn(job)
        return _wait_for_main(job, launch_id())
    d.mkdir(parents=True, exist_ok=True)
    state_path = d / "job.json"
    state = {"mask": job.mask, "seed": job.seed, "attempt": job.attempt,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
             "pid": os.getpid(), "launch": launch_id(),
             "device": os.environ.get("CUDA_VISIBLE_DEVICES")}
    write_json(state_path, state)
    t0 = time.perf_counter()
    try:
        out = _validate_output(job_fn(job), job.name)
    except BaseException as e:
        write_json(state_path, {**state, "error": f"{type(e).__name__}: {str(e)[:300]}",
                                "stopped": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        raise
    secs = time.perf_counter() - t0
    write_table(out.items, d / "items.csv")
    means = out.items.groupby("metric", sort=False)["value"].mean()
    result = {"mask": job.mask, "seed": job.seed, "blocks": mask_blocks(
        job.mask, job.settings["n_blocks"]), "trainable_params": out.trainable_params,
        "scores": {k: float(v) for k, v in means.items()},
        "n_items": int(out.items["item"].nunique()), "seconds": secs,
        "attempt": job.attempt, "settings_hash": settings_hash(job.settings), "info": out.info}
    write_json(d / "result.json", result)
    return result


def _attempt(job_dir: Path) -> int:
    p = job_dir / "job.json"
    if p.is_file():
        try:
            return int(json.loads(p.read_text(encoding="utf-8")).get("attempt", 0)) + 1
        except (ValueError, json.JSONDecodeError, AttributeError):
            return 2
    return 1


# ----------------------------------------------------------------------------- default job


def read_predictions(path: str | Path, task: str) -> pd.DataFrame:
    """Per-item scores (``item, metric, value``) from ``predictions-<task>.jsonl``."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    out = []
    t = {x.name: x for x in all_tasks()}.get(task)
    for i, r in enumerate(rows):
        item = r.get("index", i)
        if t is not None and t.item_values is not None:
            vals = t.item_values(r)
        else:
            vals = {k: v for k, v in r.items() if k.endswith("correct")}
        for m, v in vals.items():
            out.append((item, m, float(v) if v is not None else math.nan))
    if not out:
        raise SftscopeError(f"{path} holds no per-item scores")
    return pd.DataFrame(out, columns=ITEM_COLUMNS)


def tune_and_evaluate(job: Job) -> JobOutput:
    """The default job: ``tune`` (resuming from its checkpoint) then ``evaluate`` what it
    saved: the base with the adapter (LoRA), or the fine-tuned model folder (``method: full``,
    which holds its tokenizer; the base's ``revision`` does not apply to it)."""
    s = job.settings
    topts = {k: v for k, v in s["tune"].items()}
    tcfg = TuneConfig(model=s["model"], train=s["train"]["source"], out=str(job.dir / "tune"),
                      mask=job.mask, segments=len(job.mask), seed=job.seed, resume=True,
                      run_eval=False, **topts)
    tres = tune(tcfg)
    if not is_main():  # another rank of a launched shard trained along; rank 0 evaluates
        return JobOutput(pd.DataFrame(columns=ITEM_COLUMNS), tres.trainable_params)
    task = s["eval"]["task"]
    data = (s["eval"].get("data") or {}).get("source")
    eopts = dict(s["eval_options"])
    if tres.method == "full":
        eopts["revision"] = None
        ecfg = EvalConfig(model=str(tres.model_dir), task=task, data=data,
                          out=str(job.dir / "eval"), **eopts)
    else:
        ecfg = EvalConfig(model=s["model"], task=task, data=data, out=str(job.dir / "eval"),
                          adapter=tres.adapter_dir, **eopts)
    eres = evaluate(ecfg)
    if not eres.predictions_path:
        raise SftscopeError(f"job {job.name}: the evaluation wrote no predictions")
    items = read_predictions(eres.predictions_path, task)
    info = {"rank": tres.rank, "alpha": tres.alpha, "steps": tres.steps,
            "train_loss": tres.train_loss, "resumed_from": tres.resumed_from,
            "scores": {sc.metric: sc.value for sc in eres.scores}, "n_eval": eres.n,
            "method": tres.method, "adapter": tres.adapter_dir, "model_dir": tres.model_dir}
    if s.get("retention"):
        full = tres.method == "full"
        info["retention"] = retention_scores(
            s["model"], str(tres.model_dir if full else tres.adapter_dir), adapter=not full,
            source=s["retention"]["data"]["source"], limit=s["retention"]["limit"],
            max_length=topts.get("max_length") or 512, batch_size=eopts["batch_size"],
            revision=topts.get("revision"))
    return JobOutput(items, trainable_params=tres.trainable_params, info=info)


# ----------------------------------------------------------------------------- statistics


def score_matrix(items: pd.DataFrame) -> tuple[np.ndarray, list[Any], list[str]]:
    """Seeds x items matrix of one mask and metric (NaN where a seed lacks an item)."""
    wide = items.pivot_table(index="seed", columns="item", values="value", aggfunc="mean",
                             dropna=False)
    return wide.to_numpy(float), list(wide.index), [str(c) for c in wide.columns]


def pigeonhole_ci(y: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0
                  ) -> tuple[float, float]:
    """Two-way bootstrap interval of the mean of a seeds x items matrix (see the docstring)."""
    y = np.atleast_2d(np.asarray(y, float))
    valid = np.isfinite(y)
    if not valid.any():
        return math.nan, math.nan
    vals = y[valid]
    if np.all(vals == vals[0]):
        if set(np.unique(vals)) <= {0.0, 1.0}:
            n_items = int(valid.any(axis=0).sum())
            return proportion_ci(int(round(vals[0] * n_items)), n_items, level)
        return float(vals[0]), float(vals[0])
    rng = np.random.default_rng(seed)
    s, i = y.shape
    cs = rng.multinomial(s, np.full(s, 1 / s), size=n_boot).astype(float)
    ci = rng.multinomial(i, np.full(i, 1 / i), size=n_boot).astype(float)
    y0 = np.where(valid, y, 0.0)
    num = ((cs @ y0) * ci).sum(axis=1)
    den = ((cs @ valid.astype(float)) * ci).sum(axis=1)
    stats = num[den > 0] / den[den > 0]
    if stats.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_p(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, float, int]:
    """Paired test of two masks' per-item scores (rows seed, item, value) on shared seeds and
    items: ``(p_value, mean difference a - b, n_items)`` (see the module docstring)."""
    seeds = sorted(set(a["seed"]) & set(b["seed"]))
    if not seeds:
        return math.nan, math.nan, 0
    wa = a[a["seed"].isin(seeds)].pivot_table(index="item", columns="seed", values="value")
    wb = b[b["seed"].isin(seeds)].pivot_table(index="item", columns="seed", values="value")
    common = wa.index.intersection(wb.index)
    if len(common) == 0:
        return math.nan, math.nan, 0
    da = wa.loc[common, seeds].mean(axis=1).to_numpy(float)
    db = wb.loc[common, seeds].mean(axis=1).to_numpy(float)
    keep = np.isfinite(da) & np.isfinite(db)
    da, db = da[keep], db[keep]
    diff = da - db
    if diff.size == 0:
        return math.nan, math.nan, 0
    mean = float(diff.mean())
    if np.all(diff == 0):
        return 1.0, 0.0, int(diff.size)
    if diff.size < 2:
        return math.nan, mean, int(diff.size)
    if np.all(diff == diff[0]):  # no spread: the t statistic is infinite
        return 0.0, mean, int(diff.size)
    _, p = paired_ttest(da, db)
    return float(p), mean, int(diff.size)


def summarize(items: pd.DataFrame, params: dict[str, int | None] | None = None,
              n_blocks: int | None = None, level: float = 0.95, n_boot: int = 2000,
              boot_seed: int = 0, metric_order: Sequence[str] = ()) -> pd.DataFrame:
    """The summary table from per-item scores (columns ``mask, seed, item, metric, value``)."""
    if items.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    items = items.copy()
    items["item"] = items["item"].astype(str)
    params = params or {}
    masks = sorted(dict.fromkeys(items["mask"]), key=mask_sort_key)
    k = len(masks[0])
    full = "1" * k
    metrics = list(dict.fromkeys([*[m for m in metric_order if m in set(items["metric"])],
                                  *items["metric"]]))
    rows = []
    for metric in metrics:
        sub = items[items["metric"] == metric]
        base = sub[sub["mask"] == full]
        for mask in masks:
            g = sub[sub["mask"] == mask]
            if g.empty:
                continue
            y, seeds, ids = score_matrix(g)
            lo, hi = pigeonhole_ci(y, level, n_boot, boot_seed)
            per_seed = np.nanmean(y, axis=1)
            if mask == full or base.empty:
                p, delta = math.nan, math.nan
            else:
                p, delta, _ = paired_p(g, base)
            rows.append({
                "mask": mask, "seeds": len(seeds), "trainable_params": params.get(mask),
                "metric": metric, "mean": float(np.nanmean(y)), "ci_low": lo, "ci_high": hi,
                "n_items": len(ids), "p_value": p, "delta": delta,
                "seed_sd": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else math.nan,
                "blocks": block_text(mask_blocks(mask, n_blocks), "none") if n_blocks else "",
            })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def position_table(summary: pd.DataFrame, n_blocks: int) -> pd.DataFrame:
    """One-segment masks by depth: segment, centre depth of its blocks, score and CI."""
    rows = []
    for r in summary.itertuples(index=False):
        m = str(r.mask)
        if m.count("1") != 1:
            continue
        k = len(m)
        seg = m.index("1")
        lo, hi = segment_bounds(n_blocks, k)[seg]
        rows.append({"segment": seg, "depth": (lo + hi) / 2 / n_blocks, "first_block": lo,
                     "last_block": hi - 1, "mask": m, "metric": r.metric, "mean": r.mean,
                     "ci_low": r.ci_low, "ci_high": r.ci_high, "n_items": r.n_items,
                     "seeds": r.seeds})
    df = pd.DataFrame(rows, columns=POSITION_COLUMNS)
    return df.sort_values(["metric", "segment"], kind="stable").reset_index(drop=True)


def primary_metric(metrics: Sequence[str], task: str | None, wanted: str | None) -> str | None:
    """``wanted`` if given, else the task's usual metric, else the first."""
    ms = list(dict.fromkeys(metrics))
    if wanted:
        if wanted not in ms:
            raise SftscopeError(f"--metric {wanted!r} is not in this sweep's results "
                                f"({', '.join(ms) or 'none yet'})")
        return wanted
    if task and PRIMARY.get(task) in ms:
        return PRIMARY[task]
    return ms[0] if ms else None


def collect(out: Path, settings: dict[str, Any] | None = None
            ) -> tuple[pd.DataFrame, dict[str, int | None], list[str]]:
    """Per-item scores of every finished job in ``RUN/jobs`` (+ trainable params, names).

    With ``settings`` (``sweep.json``'s): refuse jobs whose ``result.json`` records the hash
    of other settings (jobs of another sweep copied in, or shards started with other
    options); results written before the hash was recorded are taken as they are."""
    jobs_dir = out / "jobs"
    frames, params, names = [], {}, []
    if not jobs_dir.is_dir():
        return pd.DataFrame(columns=["mask", "seed", *ITEM_COLUMNS]), params, names
    want = settings_hash(settings) if settings is not None else None
    results = {d: read_json(d / "result.json") for d in sorted(jobs_dir.iterdir())
               if d.is_dir() and is_done(d)}
    other = [d.name for d, r in results.items()
             if want and r.get("settings_hash") not in (None, want)]
    if other:
        raise SftscopeError(
            f"{out}: {len(other)} finished job(s) were made with other settings than "
            f"{out}/sweep.json ({', '.join(other[:4])}{', ...' if len(other) > 4 else ''}); "
            f"jobs of different settings cannot be pooled: move them to their own sweep "
            f"folder, or delete them and run those jobs again")
    for d, res in results.items():
        if not (d / "items.csv").is_file():
            continue
        items = pd.read_csv(d / "items.csv", dtype={"item": str, "metric": str})
        items.insert(0, "seed", int(res["seed"]))
        items.insert(0, "mask", str(res["mask"]))
        frames.append(items)
        if res.get("trainable_params") is not None:
            params.setdefault(str(res["mask"]), int(res["trainable_params"]))
        names.append(d.name)
    if not frames:
        return pd.DataFrame(columns=["mask", "seed", *ITEM_COLUMNS]), params, names
    df = pd.concat(frames, ignore_index=True)
    df["mask"] = df["mask"].astype(str)
    return df, params, names


# ----------------------------------------------------------------------------- validation


def _interior_masks(k: int, on: int = 1) -> list[str]:
    """The masks of ``k`` segments with ``on`` segments on, none of them an edge segment (the
    random baseline of a proposal of that shape; none if ``k - 2 < on``)."""
    import itertools

    return ["".join("1" if j in pick else "0" for j in range(k))
            for pick in itertools.combinations(range(1, k - 1), on)] if on > 0 else []


def validate_suggestions(summary: pd.DataFrame, proposals: dict[str, str], metric: str,
                         segment_scores: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Where each method's proposed mask ranks among the swept masks (1 = best), beside what a
    proposal without any signal would get.

    Ranks: 1 + the number of swept masks strictly better. Baselines, so that a good rank can be
    told from merely re-checking the paper's prior: ``prior_mask``/``prior_rank``, the one-
    segment mask whose centre is nearest ``suggest.FALLBACK_DEPTH`` (30 %) of depth;
    ``random_rank``, the expected rank of a uniformly random *interior* mask of the
    proposal's shape (as many segments on as the proposal, edge segments excluded, as
    suggest's edge rule does) among the swept ones, i.e. the mean rank of the swept interior
    masks of that shape (``n_interior`` of them); ``random_as_good``, the share of them that
    rank as well as the proposal or better (a chance level: 1.0 = any interior mask would have
    done as well). NaN where the mask was not swept or no interior mask of its shape was
    (fewer than 3 segments, or none swept). ``spearman_singles``: rank correlation,
    over the swept one-segment masks, between the method's segment score and the swept score
    (NaN with fewer than 3 such masks).
    """
    from scipy.stats import spearmanr

    sub = summary[summary["metric"] == metric].drop_duplicates("mask")
    means = dict(zip(sub["mask"].astype(str), sub["mean"].astype(float)))
    sign = -1.0 if lower_is_better(metric) else 1.0
    ranked = sorted(means, key=lambda m: -sign * means[m])
    best = ranked[0] if ranked else None

    def rank_of(mask: str) -> float:
        if mask not in means:
            return math.nan
        return float(1 + sum(1 for m in means if sign * means[m] > sign * means[mask]))

    rows = []
    for method, mask in proposals.items():
        score = means.get(mask, math.nan)
        rank = rank_of(mask)
        k = len(mask)
        prior = prior_mask(k)
        interior = [rank_of(m) for m in _interior_masks(k, mask.count("1")) if m in means]
        random_rank = float(np.mean(interior)) if interior else math.nan
        as_good = (float(np.mean([r <= rank for r in interior])) if interior
                   and math.isfinite(rank) else math.nan)
        rho = math.nan
        if segment_scores is not None and method in segment_scores:
            seg = segment_scores[method]
            singles = [(m.index("1"), means[m]) for m in means if m.count("1") == 1
                       and len(m) == len(seg)]
            if len(singles) >= 3:
                x = [seg[i] for i, _ in singles]
                y = [sign * v for _, v in singles]
                if np.std(x) > 0 and np.std(y) > 0:
                    rho = float(spearmanr(x, y).statistic)
        rows.append({"method": method, "mask": mask, "rank": rank, "prior_mask": prior,
                     "prior_rank": rank_of(prior), "random_rank": random_rank,
                     "random_as_good": as_good, "n_interior": len(interior),
                     "n_masks": len(means), "score": score, "best_mask": best,
                     "best_score": means[best] if best else math.nan,
                     "in_sweep": mask in means, "spearman_singles": rho, "metric": metric})
    return pd.DataFrame(rows, columns=VALIDATION_COLUMNS)


def _run_validation(cfg: SweepConfig, settings: dict[str, Any], summary: pd.DataFrame,
                    metric: str) -> pd.DataFrame:
    opts = check_fields(SuggestConfig, cfg.suggest, what="suggest", exclude=SWEEP_SUGGEST_KEYS)
    opts.setdefault("method", "combined")
    for k in ("tokenizer", "chat_template"):  # the tokens the jobs trained on
        if settings["tune"].get(k) is not None:
            opts.setdefault(k, settings["tune"][k])
    opts.setdefault("split", settings["tune"].get("train_split", "train"))
    scfg = SuggestConfig(base=settings["model"], data=settings["train"]["source"],
                         sft=cfg.sft, segments=settings["segments"],
                         out=str(Path(cfg.out) / "suggest"),
                         base_revision=settings["tune"].get("revision"), **opts)
    s = suggest(scfg)
    seg_scores = {m: s.method_scores(m).sort_values("segment")["score"].to_numpy(float)
                  for m in s.proposals}
    return validate_suggestions(summary, {m: p.mask for m, p in s.proposals.items()}, metric,
                                seg_scores)


# ----------------------------------------------------------------------------- main


def _fmt_s(x: float) -> str:
    return f"{x:.0f} s" if x < 120 else f"{x / 60:.1f} min" if x < 7200 else f"{x / 3600:.1f} h"


def _write_results(cfg: SweepConfig, settings: dict[str, Any], summary: pd.DataFrame,
                   position: pd.DataFrame, metric: str | None, masks: list[str],
                   seeds: list[int], done_names: list[str], pending: list[str],
                   missing: list[str], failed: dict[str, str], unfinished: list[str],
                   n_jobs: int) -> pd.DataFrame | None:
    """Rank 0 once the sweep's tables may be written: summary.csv, position.csv, the suggest
    validation (returned), forgetting.csv (sweeps with retention) and run.json, with notes on
    the jobs not finished."""
    out = Path(cfg.out)
    validation = None
    for fmt in cfg.formats:
        write_table(masks_as_text(summary), out / f"summary.{fmt}")
        write_table(masks_as_text(position), out / f"position.{fmt}")
    if cfg.validate_suggest:
        if summary.empty or metric is None:
            say("[yellow]note:[/] no finished job yet: nothing to validate suggestions on")
        else:
            validation = _run_validation(cfg, settings, summary, metric)
            for fmt in cfg.formats:
                write_table(masks_as_text(validation), out / f"suggest_validation.{fmt}")
    forgetting = None
    if settings.get("retention"):
        table, forgetting = forgetting_table(job_retention(out / "jobs"), cfg.level,
                                             cfg.bootstrap, cfg.boot_seed)
        for fmt in cfg.formats:
            write_table(masks_as_text(table), out / f"forgetting.{fmt}")
        say(correlation_line(forgetting))
    write_json(out / "run.json", run_record(
        "sweep", cfg.record(), n_blocks=settings[
            "n_blocks"], settings=settings, masks=masks, seeds=seeds,
        jobs_done=done_names, jobs_pending=pending, jobs_missing=missing,
        jobs_failed=failed, jobs_unfinished=unfinished, primary_metric=metric,
        forgetting=forgetting,
        statistics={"ci": "two-way (seeds x items) percentile bootstrap; Wilson for "
                          "constant binary scores", "p_value": "paired t-test of per-item "
                    "differences vs 11111, averaged over shared seeds",
                    "level": cfg.level, "n_boot": cfg.bootstrap, "boot_seed": cfg.boot_seed}))
    if cfg.collect:
        say(f"collected {n_jobs - len(pending)} of {n_jobs} jobs from {out}")
    for what, names in (("missing (never started)", missing),
                        ("failed", [f"{nm} ({err[:80]})" for nm, err in failed.items()]),
                        ("unfinished (killed or still running)", unfinished)):
        if names:
            say(f"[yellow]note:[/] {len(names)} job(s) {what}: {', '.join(names[:6])}"
                + (", ..." if len(names) > 6 else ""))
    if pending:
        say(f"[yellow]note:[/] {len(pending)} of {n_jobs} jobs are not finished; the "
            f"summary covers the finished ones (run the shards again to finish them: "
            f"finished jobs are kept)")
    return validation


class LocalShards:
    """The sweep's jobs in ``processes`` local ``sftscope sweep --job-index I --num-jobs N``
    processes of ``threads`` torch threads each, started at once (none when every job is done);
    ``wait()`` waits for all of them. Then ``run_sweep(dataclasses.replace(cfg, collect=True))``
    writes the tables and runs ``--validate-suggest`` (the shards do neither). A context
    manager: leaving it before ``wait()`` (the caller failed meanwhile) stops the shards.

    For a model too small to use the cores from one process: the demo's sweep (six LoRA jobs of
    a 0.7M-parameter model) took 40 s as one process of one thread on an idle 2-core box, and
    about half that as two. Each shard prints its own progress and, when it fails, its own
    one-line error; ``wait`` raises after every shard has ended (finished jobs are kept, a rerun
    resumes). Ctrl-C reaches the shards too (one process group): each saves a checkpoint and
    stops. On Linux a shard whose caller is killed is killed too (no orphan keeps writing into
    ``out``; its unfinished job runs again next time)."""

    def __init__(self, cfg: SweepConfig, processes: int, threads: int = 1) -> None:
        if processes < 1 or threads < 1:
            raise SftscopeError(f"local sweep shards need processes >= 1 and threads >= 1, "
                                f"got {processes} and {threads}")
        self.processes, self.procs, self.tmp = processes, [], None
        masks = expand_masks(cfg.masks, cfg.segments, cfg.baseline)
        if not pending_jobs(Path(cfg.out), job_list(masks, parse_seeds(cfg.seeds))):
            return
        skip = ("job_index", "num_jobs", "collect")
        values = {k: v for k, v in cfg.record().items() if k not in skip}
        values.update(validate_suggest=False, tables=False)  # the caller's collect: once
        self.tmp = Path(tempfile.mkdtemp(prefix="sftscope-shards."))
        conf = self.tmp / "sweep.json"
        conf.write_text(json.dumps({"sweep": values}), encoding="utf-8")
        cmd = [sys.executable, "-m", "sftscope", "sweep", "--config", str(conf),
               "--num-jobs", str(processes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.procs = [subprocess.Popen([*cmd, "--job-index", str(i)], env=env,
                                       preexec_fn=_die_with_parent) for i in range(processes)]

    def __enter__(self) -> LocalShards:
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()  # a shard's SIGTERM: checkpoint, one line, exit
        for p in self.procs:
            p.wait()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def wait(self) -> None:
        """Until every shard has ended; one error for the shards that failed."""
        codes = _wait_all(self.procs)
        if any(c in (130, -2) for c in codes):
            raise KeyboardInterrupt
        failed = [i for i, c in enumerate(codes) if c != 0]
        if failed:
            raise SftscopeError(
                f"sweep shard(s) {', '.join(map(str, failed))} of {self.processes} failed "
                f"(exit status {', '.join(str(codes[i]) for i in failed)}; the reason is "
                "printed above); run again to resume")


def run_local_shards(cfg: SweepConfig, processes: int, threads: int = 1) -> None:
    """``LocalShards(cfg, processes, threads)``, waited for: every job of the sweep done."""
    with LocalShards(cfg, processes, threads) as shards:
        shards.wait()


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Every process's exit status; on Ctrl-C, give them 10 s to stop, then end them."""
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait()
        raise


def _die_with_parent() -> None:
    """In a shard before it runs (Linux): SIGKILL when its parent dies (the parent was killed,
    not interrupted: a quiet end, where a SIGTERM stops in the middle of Python's exit)."""
    import contextlib
    import ctypes
    import signal

    # not Linux: an orphan finishes its jobs, which a rerun then skips
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def _say_collect(cfg: SweepConfig, out: Path, pending: list[str]) -> None:
    left = (f"{len(pending)} job(s) of other shards pending: once every shard is done, "
            if pending else "no job pending: ")
    say(f"shard {cfg.job_index}/{cfg.num_jobs} finished; {left}run `sftscope sweep --out "
        f"{out} --collect`")


@releasing
def run_sweep(cfg: SweepConfig, job_fn: JobFn | None = None) -> SweepResult:
    """Run this shard's unfinished jobs (``job_fn``, default tune then evaluate), then write
    ``summary.csv``, ``position.csv`` (and the suggest validation) from every finished job."""
    out = Path(cfg.out)
    full_cfg = bool(cfg.model and cfg.train and cfg.task)
    seeds = parse_seeds(cfg.seeds)
    if full_cfg or not cfg.collect:
        masks = expand_masks(cfg.masks, cfg.segments, cfg.baseline)  # before anything is written
        shard(job_list(masks, seeds), cfg.job_index, cfg.num_jobs)
        settings = load_or_write_settings(cfg)
    else:
        path = out / "sweep.json"
        if not path.is_file():
            raise SftscopeError(f"{out} holds no sweep (no sweep.json); run the sweep first")
        settings = read_json(path)["settings"]
        check_collect_options(cfg, settings)
        check_metric(cfg.metric, (settings.get("eval") or {}).get("task"))
        masks = expand_masks(cfg.masks, int(settings["segments"]), cfg.baseline)
    jobs = job_list(masks, seeds)
    if cfg.collect:  # the jobs every invocation asked for, not this command's defaults
        jobs = _recorded_jobs(out) or jobs
    else:
        _record_jobs(out, jobs)
    mine = shard(jobs, cfg.job_index, cfg.num_jobs)
    ran, skipped = [], []
    fn = job_fn or tune_and_evaluate
    if not cfg.collect:
        todo = [(i, j) for i, j in mine if not is_done(out / "jobs" / job_name(*j))]
        skipped = [job_name(*j) for i, j in mine if is_done(out / "jobs" / job_name(*j))]
        label = (f"shard {cfg.job_index}/{cfg.num_jobs}: " if cfg.num_jobs > 1 else "")
        say(f"sweep {out}: {label}{len(mine)} of {len(jobs)} jobs ({len(masks)} masks x "
            f"{len(seeds)} seeds), {len(skipped)} already done, {len(todo)} to run")
        t_start = time.perf_counter()
        for n, (i, (mask, seed)) in enumerate(todo, 1):
            d = out / "jobs" / job_name(mask, seed)
            job = Job(mask, seed, i, d, _attempt(d), cfg, settings)
            again = f" (attempt {job.attempt}, resuming)" if job.attempt > 1 else ""
            say(f"[bold]job {n}/{len(todo)}[/] {job.name}: blocks "
                f"{block_text(mask_blocks(mask, settings['n_blocks']), 'none')}{again}")
            t0 = time.perf_counter()
            res = run_job(job, fn)
            ran.append(job.name)
            el = time.perf_counter() - t0
            avg = (time.perf_counter() - t_start) / n
            sc = ", ".join(f"{m} {v:.4f}" for m, v in list(res["scores"].items())[:2])
            left = len(todo) - n
            say(f"job {job.name} done in {_fmt_s(el)}: {sc} (n={res['n_items']}); {left} left"
                + (f", about {_fmt_s(avg * left)}" if left else ""))
    pending = pending_jobs(out, jobs)
    if not is_main():  # another rank of a launched shard: rank 0 writes the tables
        return SweepResult(out=str(out), summary=pd.DataFrame(columns=SUMMARY_COLUMNS),
                           position=pd.DataFrame(columns=POSITION_COLUMNS), validation=None,
                           ran=ran, skipped=skipped, pending=pending, n_jobs=len(jobs))
    status = job_status(out, pending)
    missing = [nm for nm in pending if status[nm]["status"] == "missing"]
    failed = {nm: str(status[nm].get("error")) for nm in pending
              if status[nm]["status"] == "failed"}
    unfinished = [nm for nm in pending if status[nm]["status"] == "unfinished"]
    items, params, done_names = collect(out, settings)
    task = (settings.get("eval") or {}).get("task")
    metric = primary_metric(list(items["metric"].unique()) if not items.empty else [], task,
                            cfg.metric) if not items.empty else None
    summary = summarize(items, params, settings["n_blocks"], cfg.level, cfg.bootstrap,
                        cfg.boot_seed, metric_order=[metric] if metric else [])
    position = position_table(summary, settings["n_blocks"])
    write_summary = cfg.collect or (cfg.tables and (cfg.num_jobs == 1 or not pending))
    validation = None
    if write_summary:
        validation = _write_results(cfg, settings, summary, position, metric, masks, seeds,
                                    done_names, pending, missing, failed, unfinished,
                                    len(jobs))
    else:
        _say_collect(cfg, out, pending)
    return SweepResult(out=str(out), summary=summary, position=position, validation=validation,
                       ran=ran, skipped=skipped, pending=pending, n_jobs=len(jobs),
                       primary_metric=metric, written=write_summary, missing=missing,
                       failed=failed, unfinished=unfinished)
