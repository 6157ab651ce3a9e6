"""The task registry: every module of this package that defines ``TASK`` is a task.

Adding an evaluation task is adding one file here (see ``base.Task``). This package sits below
``load``: it knows prompts, answers and scoring, never files, models or torch, so the data
reader (``load/data.py``), the evaluator and the analysis share one home for each format.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from sftscope.errors import SftscopeError
from sftscope.tasks.base import FEWSHOT_SEED, LETTERS, AnalysisSample, HubData, Task

__all__ = ["FEWSHOT_SEED", "LETTERS", "AnalysisSample", "HubData", "Task", "all_tasks",
           "check_metric", "get_task", "primary_metric_of", "task_names"]

_SKIP = {"base"}
_REGISTRY: dict[str, Task] = {}


def _discover() -> dict[str, Task]:
    if not _REGISTRY:
        found: dict[str, Task] = {}
        for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if mod.name.startswith("_") or mod.name in _SKIP:
                continue
            task = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "TASK", None)
            if isinstance(task, Task):
                if task.name in found:
                    raise RuntimeError(f"two task modules define the task {task.name!r}")
                found[task.name] = task
        _REGISTRY.update(found)
    return _REGISTRY


def task_names() -> tuple[str, ...]:
    """Names of the registered tasks, sorted."""
    return tuple(sorted(_discover()))


def all_tasks() -> list[Task]:
    """Every registered task, by name."""
    reg = _discover()
    return [reg[n] for n in sorted(reg)]


def get_task(name: str) -> Task:
    """The task called ``name``; an unknown name fails with the closest names."""
    reg = _discover()
    if name in reg:
        return reg[name]
    close = difflib.get_close_matches(str(name).lower(), list(reg), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise SftscopeError(f"unknown task {name!r}; {hint}use one of {', '.join(sorted(reg))}")


def primary_metric_of(metrics, task: str | None = None) -> str | None:
    """The primary metric among ``metrics``: ``task``'s if given and present, else the first
    registered task's primary that appears (None when no task's primary is there)."""
    ms = [str(m) for m in metrics]
    reg = _discover()
    if task in reg and reg[task].primary in ms:
        return reg[task].primary
    for t in all_tasks():
        if t.primary in ms:
            return t.primary
    return None


def check_metric(metric: str | None, task: str | None, flag: str = "--metric") -> None:
    """``metric`` must be a per-item score of ``task`` (what a sweep ranks by); an unknown
    task is left to the task checks."""
    if metric is None or task not in _discover():
        return
    known = _discover()[task].item_metrics()
    if metric not in known:
        close = difflib.get_close_matches(str(metric), list(known), n=1, cutoff=0.6)
        raise SftscopeError(f"{flag} {metric!r} is not a score of task {task}; use one of "
                            f"{', '.join(known)}" + (f" (did you mean {close[0]}?)"
                                                     if close else ""))
