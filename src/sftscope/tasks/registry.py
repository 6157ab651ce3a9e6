"""The task registry: every module of ``sftscope.tasks`` that defines ``TASK`` is a task.

Help texts, checks, sweeps and the data reader ask this module for the task names and their
defaults; nothing lists tasks by hand.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import sys

from sftscope.errors import SftscopeError
from sftscope.tasks.base import Task

PACKAGE = "sftscope.tasks"
_SKIP = {"base", "registry"}
_REGISTRY: dict[str, Task] = {}


def _discover() -> dict[str, Task]:
    if not _REGISTRY:
        found: dict[str, Task] = {}
        path = sys.modules[PACKAGE].__path__  # read at call time: tests extend it
        for mod in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
            if mod.name.startswith("_") or mod.name in _SKIP:
                continue
            task = getattr(importlib.import_module(f"{PACKAGE}.{mod.name}"), "TASK", None)
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


def task_help() -> str:
    """``name (summary), ...`` of every task: the help text of a task option."""
    return "; ".join(f"{t.name} ({t.summary})" for t in all_tasks())


def shots_help() -> str:
    """Each task's default number of shots, for the help of ``--shots``."""
    return ", ".join(f"{t.name} {t.default_shots}" for t in all_tasks() if t.has_items)


def task_spec_help() -> str:
    """How a task option is written: ``TASK`` or ``TASK:FILE`` (``perplexity:SOURCE``)."""
    names = [t.name + (":SOURCE" if not t.has_items else "[:FILE]") for t in all_tasks()]
    return ", ".join(names)
