"""Perplexity (retention): mean token loss of general text, adapter off (before) and on (after).

Any text source works (default: WikiText-2 test). Without an adapter the scores are ``loss``
and ``ppl``; with one, ``loss_before``, ``loss_after``, ``loss_delta`` (paired per text) and the
matching perplexities. Lower is better; the primary metric is ``loss_after``.
"""

from __future__ import annotations

from sftscope.tasks.base import Task

METRICS = ("loss_before", "loss_after", "loss_delta", "ppl_before", "ppl_after", "ppl_ratio",
           "loss", "ppl")


def item_values(row: dict) -> dict[str, float | None]:
    a, b = row.get("loss_after"), row.get("loss_before")
    return {"loss_after": a,
            "loss_delta": (a - b) if a is not None and b is not None else None}


TASK = Task(
    name="perplexity",
    kind="loss",
    summary="token loss on general text, adapter off vs on",
    metrics=METRICS,
    primary="loss_after",
    lower_is_better=True,
    default_data="wikitext",
    item_values=item_values,
)
