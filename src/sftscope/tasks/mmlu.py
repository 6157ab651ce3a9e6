"""MMLU as lm-evaluation-harness 0.4's ``mmlu`` task (multiple choice by log-likelihood).

Prompt: ``The following are multiple choice questions (with answers) about {subject}.\\n\\n``
(the subject with ``_`` as spaces), then each shot as ``{question}\\nA. ..\\nB. ..\\nC. ..\\nD.
..\\nAnswer: X`` and a blank line, then the item the same way ending in ``Answer:``. Shots are
the first ``k`` records of the dev split with the SAME subject (lm-eval's ``first_n`` sampler),
default 0. Each choice `` A``.. `` D`` is scored by its log-likelihood after the prompt, its
tokens taken in context (``base.encode_pair``); accuracy = the argmax is the gold letter.
Records may have 2..10 choices (``A``..``J``); the answer is an index or a letter and must name
one of the choices (refused the same way by every command).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from sftscope.tasks.base import LETTERS, AnalysisSample, HubData, Task, is_missing, text_problem

HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def choices_of(record: dict) -> list[str]:
    """The options of a record (a list, an array, or a JSON list in a string)."""
    raw = record["choices"]
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"field 'choices' ({raw[:60]!r}) is not a JSON list") from e
    if isinstance(raw, (str, bytes, dict)) or not hasattr(raw, "__len__"):
        raise ValueError(f"field 'choices' is a {type(raw).__name__}, not a list")
    out = list(raw)
    if not 2 <= len(out) <= len(LETTERS):
        raise ValueError(f"has {len(out)} choices; need 2..{len(LETTERS)}")
    for i, c in enumerate(out):
        if c is None or (isinstance(c, float) and math.isnan(c)):
            raise ValueError(f"choice {LETTERS[i]} is null")
    return [str(c) for c in out]


def _integral(v: Any) -> bool:
    """An int, a numpy integer, or an integral float (CSV columns)."""
    if isinstance(v, int):
        return True
    if str(getattr(v, "dtype", "")).startswith(("int", "uint")):
        return True
    return isinstance(v, float) and v.is_integer()


def gold_index(record: dict) -> int:
    """The index of the gold choice (the answer is an index or a letter)."""
    n = len(choices_of(record))
    ans = record["answer"]
    idx: int | None = None
    if isinstance(ans, bool):
        idx = None
    elif _integral(ans):
        idx = int(ans)
    elif isinstance(ans, str):
        s = ans.strip()
        if s.isdigit():
            idx = int(s)
        elif len(s) == 1 and s.upper() in LETTERS:
            idx = LETTERS.index(s.upper())
    if idx is None or not 0 <= idx < n:
        raise ValueError(f"answer {ans!r} is not one of the {n} choices "
                         f"(give an index 0..{n - 1} or a letter {LETTERS[0]}..{LETTERS[n - 1]})")
    return idx


def check(record: dict) -> str | None:
    """A record needs a question, 2..10 non-null choices and an answer among them."""
    problem = text_problem(record, "question")
    if problem:
        return problem
    if is_missing(record.get("answer")):
        return "field 'answer' is empty"
    try:
        gold_index(record)
    except ValueError as e:
        return str(e)
    return None


def labels(record: dict) -> list[str]:
    """The option letters of a record (``A``.. for its number of choices)."""
    return list(LETTERS[: len(choices_of(record))])


def continuations(record: dict) -> list[str]:
    """What is scored after ``Answer:``: `` A``, `` B``, ..."""
    return [f" {x}" for x in labels(record)]


def subject_of(record: dict) -> str:
    """The subject (``_`` as spaces), or '' when the record has none."""
    s = record.get("subject")
    return "" if is_missing(s) else str(s).replace("_", " ").strip()


def block(record: dict) -> str:
    """``{question}\\nA. ..\\n...\\nAnswer:`` (lm-eval's ``doc_to_text``)."""
    body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices_of(record)))
    return f"{str(record['question']).strip()}\n{body}\nAnswer:"


def prompt(record: dict, shots: Sequence[dict] = ()) -> str:
    """Subject header, shots with their letters, then the item."""
    subject = subject_of(record)
    head = HEADER.format(subject=subject) if subject else ""
    parts = "".join(f"{block(s)} {LETTERS[gold_index(s)]}\n\n" for s in shots)
    return head + parts + block(record)


def answer_letter(completion: str) -> str | None:
    """The option letter a generated answer starts with (`` B``, ``(B)``, ``B. ...``), or
    None: what a generated MMLU answer is scored by (the GRPO reward ``mmlu``)."""
    m = re.match(r"\s*\(?([A-J])(?![A-Za-z])", completion)
    return m.group(1) if m else None


def shot_key(record: dict) -> str:
    return subject_of(record)


def analysis_sample(record: dict) -> AnalysisSample:
    """The question block, `` X`` (the gold letter), and what choice scoring needs."""
    letter = LETTERS[gold_index(record)]
    return AnalysisSample(block(record), f" {letter}",
                          {"letter": letter, "n_choices": len(choices_of(record)),
                           "subject": "" if is_missing(record.get("subject"))
                           else str(record["subject"])})


def describe(record: dict) -> dict[str, Any]:
    subject = record.get("subject")
    return {"question": record.get("question"),
            "subject": "" if is_missing(subject) else str(subject)}


def item_values(row: dict) -> dict[str, float | None]:
    return {"accuracy": row.get("correct")}


TASK = Task(
    name="mmlu",
    kind="choice",
    summary="multiple-choice knowledge, log-likelihood of A-D in context (lm-eval mmlu)",
    metrics=("accuracy",),
    primary="accuracy",
    default_data="mmlu",
    hub=HubData("cais/mmlu", "all", "test"),
    fields=("question", "choices", "answer"),
    shot_split="dev",
    default_shots=0,
    shot_sampler="first_n",
    shot_key=shot_key,
    check=check,
    prompt=prompt,
    continuations=continuations,
    labels=labels,
    gold_index=gold_index,
    analysis_sample=analysis_sample,
    describe=describe,
    item_values=item_values,
)
