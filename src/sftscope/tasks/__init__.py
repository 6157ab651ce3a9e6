"""Evaluation tasks, one file each (see ``base.Task`` and the factories ``choice_task``);
``registry`` finds them. This package sits below ``load``: it knows prompts, answers and
scoring, never files, models or torch, so the data reader (``load/data.py``), the evaluator
and the analysis share one home for each format. This file only re-exports.
"""

from __future__ import annotations

from sftscope.tasks.base import (
    FEWSHOT_SEED,
    LETTERS,
    AnalysisSample,
    HubData,
    Task,
    choice_task,
)
from sftscope.tasks.registry import (
    _REGISTRY,
    all_tasks,
    check_metric,
    get_task,
    primary_metric_of,
    shots_help,
    task_help,
    task_names,
    task_spec_help,
)

__all__ = ["FEWSHOT_SEED", "LETTERS", "_REGISTRY", "AnalysisSample", "HubData", "Task",
           "all_tasks", "check_metric", "choice_task", "get_task", "primary_metric_of",
           "shots_help", "task_help", "task_names", "task_spec_help"]
