"""ARC-Challenge as lm-evaluation-harness 0.4's ``arc_challenge`` task: ``arc_easy`` on the
ARC-Challenge config."""

from __future__ import annotations

from sftscope.tasks.arc_easy import arc_task

TASK = arc_task("arc_challenge", "ARC-Challenge", "hard")
