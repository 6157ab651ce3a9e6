"""Preference pairs: the ``preference:FILE`` format and its held-out evaluation.

A record has ``prompt``, ``chosen`` and ``rejected``: three non-blank texts, or three non-empty
lists of chat messages (``{"role", "content"}``), never a mix. Training (``tune --objective
dpo``) gives them to TRL as they are. Evaluated as a choice task: the summed log-likelihood of
``chosen`` and of ``rejected`` after the prompt (tokenised in context, as every choice task);
``accuracy`` = chosen is the more likely, ``margin`` = log p(chosen) - log p(rejected) (the
quantity DPO raises). Messages are scored as their contents joined by newlines.

Registered hub sets (``preference:hh-rlhf`` and the others of ``load.data.SETS``) keep their
own fields; the converters below turn one of their rows into such a record (a row they cannot
convert raises ``ValueError`` with the reason, refused or skipped with its record number).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sftscope.tasks.base import AnalysisSample, Task, text_problem

FIELDS = ("prompt", "chosen", "rejected")
LABELS = ["chosen", "rejected"]
ASSISTANT = "\n\nAssistant:"  # the turn marker of Anthropic's HH-RLHF dialogues


def messages(value: Any) -> list[dict] | None:
    """Chat messages (a list of objects; Parquet gives an array), or None for a non-list."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        return None
    return [dict(m) if hasattr(m, "keys") else m for m in value]


def check(r: dict) -> str | None:
    """What is wrong with a preference record, or None."""
    missing = [k for k in FIELDS if k not in r]
    if missing:
        return (f"lacks field(s) {', '.join(map(repr, missing))} (a preference record needs "
                f"prompt, chosen and rejected; it has: {', '.join(map(str, r))})")
    kinds = set()
    for k in FIELDS:
        msgs = messages(r[k])
        if msgs is None:
            problem = text_problem(r, k)
            if problem:
                return problem
            kinds.add("text")
            continue
        if not msgs or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                and isinstance(m.get("content"), str) for m in msgs):
            return (f"field {k!r} is not a non-empty list of chat messages (objects with "
                    f"role and content texts)")
        kinds.add("chat")
    if len(kinds) > 1:
        return "mixes plain text and chat messages in prompt, chosen and rejected; use one kind"
    return None


def plain(value: Any) -> str:
    """A field as text (messages: their contents, newline-joined)."""
    msgs = messages(value)
    return str(value) if msgs is None else "\n".join(m["content"] for m in msgs)


def pair(r: dict) -> dict[str, Any]:
    """The record's three fields as given (texts, or lists of message objects)."""
    return {k: (messages(r[k]) if messages(r[k]) is not None else str(r[k])) for k in FIELDS}


# ------------------------------------------------------------------ hub rows -> records

def _need_texts(r: dict, keys: Sequence[str]) -> None:
    for k in keys:
        if k not in r:
            raise ValueError(f"lacks field {k!r} (it has: {', '.join(map(str, r))})")
        problem = text_problem(r, k)
        if problem:
            raise ValueError(problem)


def from_dialogues(r: dict) -> dict[str, Any]:
    """HH-RLHF: ``chosen`` and ``rejected`` are whole dialogues (``\\n\\nHuman: ...
    \\n\\nAssistant: ...``) sharing every turn before the last reply. The prompt is their
    shared text up to and including its last ``\\n\\nAssistant:``; the answers, the rest."""
    _need_texts(r, LABELS)
    chosen, rejected = str(r["chosen"]), str(r["rejected"])
    cut = os.path.commonprefix([chosen, rejected]).rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("chosen and rejected share no dialogue up to an Assistant turn, so "
                         "no prompt can be split off")
    cut += len(ASSISTANT)
    return {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}


def from_conversations(r: dict) -> dict[str, Any]:
    """UltraFeedback (binarized): ``chosen`` and ``rejected`` are whole conversations (chat
    messages). The prompt is the turns they share before their last one; the answers, the
    turns after (at least the last)."""
    chosen, rejected = messages(r.get("chosen")), messages(r.get("rejected"))
    if not chosen or not rejected:
        raise ValueError("fields 'chosen' and 'rejected' must both be non-empty lists of chat "
                         "messages")
    n, limit = 0, min(len(chosen), len(rejected)) - 1
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError("chosen and rejected share no turn before their replies, so no "
                         "prompt can be split off")
    return {"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def from_instruction(r: dict) -> dict[str, Any]:
    """Orca DPO pairs: ``input`` is the prompt (after the ``system`` text and a blank line when
    there is one); ``chosen`` and ``rejected`` are the answers as given."""
    _need_texts(r, ("input", *LABELS))
    system = r.get("system")
    head = f"{system}\n\n" if isinstance(system, str) and system.strip() else ""
    return {"prompt": head + str(r["input"]), "chosen": r["chosen"], "rejected": r["rejected"]}


def prompt(record: dict, shots: Sequence[dict] = ()) -> str:
    return plain(record["prompt"])


def continuations(record: dict) -> list[str]:
    return [plain(record["chosen"]), plain(record["rejected"])]


def analysis_sample(record: dict) -> AnalysisSample:
    """The prompt and the chosen answer (what analysing a preference set looks at)."""
    return AnalysisSample(plain(record["prompt"]), plain(record["chosen"]),
                          {"pair": pair(record)})


def item_values(row: dict) -> dict[str, float | None]:
    lp = row.get("logprobs") or {}
    margin = (float(lp["chosen"]) - float(lp["rejected"])
              if "chosen" in lp and "rejected" in lp else None)
    return {"accuracy": float(row["correct"]) if "correct" in row else None, "margin": margin}


TASK = Task(
    name="preference",
    kind="choice",
    summary="held-out preference pairs: accuracy (chosen more likely) and margin",
    metrics=("accuracy", "margin"),
    primary="accuracy",
    default_data="preference",
    fields=FIELDS,
    check=check,
    prompt=prompt,
    continuations=continuations,
    labels=lambda r: list(LABELS),
    gold_index=lambda r: 0,
    analysis_sample=analysis_sample,
    item_values=item_values,
)
