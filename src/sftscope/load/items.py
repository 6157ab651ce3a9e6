"""Evaluation items: a task's records (validated), their shots, and saved completions.

``--data`` of ``eval`` is a registered name (the hub dataset), ``NAME:PATH`` or a bare local
path in the task's fields. Items are the first ``limit`` records in file order (as lm-eval
takes them); shots come from ``--fewshot-data``, else the hub dataset's shot split, else the
same local file without the item itself, drawn as the task says (``tasks.base.pick_shots``).
No torch here: ``check_task_data`` runs before a model is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError
from sftscope.load.data import RecordSet, check_source, load_records, parse_source, spec_of
from sftscope.tasks import FEWSHOT_SEED, Task, get_task
from sftscope.tasks.base import pick_shots, text_problem


@dataclass
class TaskItems:
    """Records to evaluate, and for each one the records of its shots."""

    task: str
    source: str
    records: list[dict]
    shots: list[list[dict]] = field(default_factory=list)
    shot_source: str | None = None
    notes: list[str] = field(default_factory=list)


def task_source(task: str, data: str | None) -> str:
    """Normalise ``--data``: a registered name, ``NAME:PATH``, or a bare local path."""
    t = get_task(task)
    if data is None:
        return t.default_data
    if not t.has_items:
        return data
    name, sep, _ = data.partition(":")
    if sep and spec_of(name) is not None:
        if name != t.name:
            raise SftscopeError(f"--data {data} is in {name} format but the task is {t.name}; "
                                f"use --task {name} or give {t.name}:PATH")
        return data
    if data == t.name:
        return data
    return f"{t.name}:{data}"


def _valid(task: Task, recs: RecordSet, skip_bad: bool, notes: list[str]) -> list[dict]:
    """The records the task can use; a bad one is refused with its location, or skipped."""
    good, bad = [], list(recs.skipped)
    for r, where in zip(recs.records, recs.where):
        problem = task.problem(r)
        if problem is None:
            good.append(r)
        elif skip_bad:
            bad.append(f"{where}: {problem}")
        else:
            raise SftscopeError(f"{where}: {problem}; fix the record or skip bad records")
    if bad:
        notes.append(f"{len(bad)} of {len(recs.records) + len(recs.skipped)} records of "
                     f"{recs.source} were skipped as bad (first: {bad[0]})")
    if not good:
        raise SftscopeError(f"data {recs.source} has no usable {task.name} record"
                            + (f" ({len(bad)} bad)" if bad else ""))
    return good


def load_task_items(task: str, data: str | None = None, *, split: str | None = None,
                    limit: int | None = None, shots: int = 0,
                    fewshot_data: str | None = None, fewshot_seed: int = FEWSHOT_SEED,
                    skip_bad: bool = False) -> TaskItems:
    """Items (first ``limit``, in file order) and their shots, every record validated."""
    t = get_task(task)
    if not t.has_items:
        raise SftscopeError(f"task {t.name} has no items with answers; use "
                            f"{' or '.join(x.name for x in _item_tasks())}")
    source = task_source(t.name, data)
    notes: list[str] = []
    recs = load_records(source, split, skip_bad=skip_bad)
    if not recs.records and not recs.skipped:
        raise SftscopeError(f"data {source} is empty; give a file with at least one record")
    every = _valid(t, recs, skip_bad, notes)
    records = every[:limit] if limit else every
    items = TaskItems(t.name, source, records, notes=notes)
    if shots <= 0:
        items.shots = [[] for _ in records]
        return items
    _, path = parse_source(source)
    if fewshot_data is not None:
        shot_src = task_source(t.name, fewshot_data)
        pool = _valid(t, load_records(shot_src, t.shot_split, skip_bad=skip_bad), skip_bad,
                      notes)
        same = False
    elif path is None:
        shot_src = f"{source} ({t.shot_split} split)"
        pool = _valid(t, load_records(source, t.shot_split, skip_bad=skip_bad), skip_bad, notes)
        same = False
    else:
        shot_src = f"{source} (same file, item excluded)"
        pool = every
        same = True
    items.shots = pick_shots(records, pool, shots, sampler=t.shot_sampler, key=t.shot_key,
                             seed=fewshot_seed, same_pool=same)
    items.shot_source = shot_src
    return items


def _item_tasks() -> list[Task]:
    from sftscope.tasks import all_tasks

    return [t for t in all_tasks() if t.has_items]


def check_task_data(task: str, data: str | None = None, *, split: str | None = None,
                    fewshot_data: str | None = None, text_field: str | None = None,
                    rescore: str | None = None, skip_bad: bool = False) -> None:
    """Cheap checks before any model load: the task exists, its data (and shot data, or the
    file to re-score; with ``skip_bad`` every line, so that a bad first one is skipped too) is
    a readable file of a known format with the fields the task needs."""
    t = get_task(task)
    if rescore is not None:
        if t.kind != "generate":
            raise SftscopeError(f"--rescore re-scores generated text; task {t.name} does not "
                                f"generate")
        if skip_bad:  # a bad first line is skipped too: read them all (at least one is good)
            read_completions(rescore, t.name, skip_bad=True)
        else:
            check_source(rescore, need=("completion",))
        return
    source = task_source(t.name, data)
    if t.has_items:
        check_source(source, split=split, need=t.fields)
        if fewshot_data is not None:
            check_source(task_source(t.name, fewshot_data), need=t.fields)
    else:
        check_source(source, split=split, text_field=text_field)


# ------------------------------------------------------------------ saved completions

@dataclass
class Completions:
    """Saved completions to re-score: per line, the record (gold fields), the text, and what
    else the line carried that a predictions row keeps (token counts)."""

    path: str
    records: list[dict]
    completions: list[str]
    extras: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)


_KEEP = ("prompt_tokens", "new_tokens", "truncated")


def read_completions(path: str, task: str, *, limit: int | None = None,
                     skip_bad: bool = False) -> Completions:
    """Lines of a JSONL file, each with ``completion`` (raw generated text) and the task's gold
    fields (GSM8K: ``answer``; a line of eval's own predictions file works, its ``target``
    standing in for an absent ``answer``). A bad line is refused with its number, or with
    ``skip_bad`` skipped and counted in ``notes``."""
    t = get_task(task)
    p = Path(path).expanduser()
    if not p.is_file():
        raise SftscopeError(f"--rescore file {p} does not exist")
    out = Completions(str(p), [], [], [])
    bad: list[str] = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}, line {i}"
            rec, problem = _completion_line(line, t)
            if problem is not None:
                if not skip_bad:
                    raise SftscopeError(f"{where}: {problem}")
                bad.append(f"{where}: {problem.split(';')[0]}")
                continue
            out.records.append(rec)
            out.completions.append(rec["completion"])
            out.extras.append({k: rec.get(k) for k in _KEEP})
            if limit and len(out.records) >= limit:
                break
    if bad:
        out.notes.append(f"{len(bad)} of {len(bad) + len(out.records)} lines of {p} were "
                         f"skipped as bad (first: {bad[0]})")
    if not out.records:
        raise SftscopeError(f"--rescore file {p} has no line to score"
                            + (f" ({len(bad)} bad)" if bad else ""))
    return out


def _completion_line(line: str, t: Task) -> tuple[dict, str | None]:
    """One line of a completions file as a record, or what is wrong with it."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return {}, f"not valid JSON ({e.msg})"
    if not isinstance(obj, dict):
        return {}, "is not a JSON object"
    comp = obj.get("completion")
    if not isinstance(comp, str):
        return {}, (f"needs 'completion', the generated text (a string"
                    f"{'' if comp is None else ', got ' + type(comp).__name__})")
    rec = dict(obj)
    for g in t.gold_fields:
        if g not in rec and "target" in rec:
            rec[g] = rec["target"]
        problem = text_problem(rec, g) if g in rec else f"lacks field {g!r}"
        if problem:
            return {}, f"{problem}; each line needs {', '.join(('completion',) + t.gold_fields)}"
    return rec, None
