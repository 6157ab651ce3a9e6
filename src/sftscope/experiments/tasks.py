"""Evaluation tasks: loading items and shot pools, prompting, and answer extraction.

GSM8K follows lm-evaluation-harness's ``gsm8k`` task (v3): each shot is
``Question: {q}\\nAnswer: {a}``, shots are separated by blank lines, the target is
``Question: {q}\\nAnswer:``; shots are drawn from the train split with ``random.Random(1234)``,
one draw per item in item order (the item itself is excluded when the pool is the evaluated set).
Two scores: strict (the number after ``#### ``) and flexible (the last number of the completion).
MMLU is scored by the log-likelihood of `` A``..`` D`` after ``Answer:``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from sftscope.errors import SftscopeError
from sftscope.load.data import LETTERS, REGISTRY, parse_source, read_records

TASKS = ("gsm8k", "mmlu", "perplexity")
GSM8K_STOP = ("Question:",)
FEWSHOT_SEED = 1234
DEFAULT_SHOTS = {"gsm8k": 5, "mmlu": 0, "perplexity": 0}
DEFAULT_DATA = {"gsm8k": "gsm8k", "mmlu": "mmlu", "perplexity": "wikitext"}
SHOT_SPLIT = {"gsm8k": "train", "mmlu": "dev"}
FIELDS = {"gsm8k": ("question", "answer"), "mmlu": ("question", "choices", "answer")}

# A number: optional sign and/or dollar sign, digits with thousands commas, optional decimals.
_NUM = r"(?:-\$?|\$-?)?\d(?:[\d,]*\d)?(?:\.\d+)?"
_STRICT = re.compile(r"#### *(" + _NUM + r")")
_FLEX = re.compile(_NUM)


# ------------------------------------------------------------------ answer extraction

def normalize_number(text: str | None) -> str | None:
    """Canonical form of a number: ``,`` and ``$`` stripped, ``72.0`` -> ``72``, ``-0`` -> ``0``.

    Text that is not a number comes back stripped (so exact match still works on it).
    """
    if text is None:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if not s:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return s
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_strict(completion: str) -> str | None:
    """The number after the first ``#### `` (lm-eval's strict-match), normalized."""
    m = _STRICT.search(completion)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    """The last number anywhere in the completion (lm-eval's flexible-extract), normalized."""
    found = _FLEX.findall(completion)
    return normalize_number(found[-1]) if found else None


def gsm8k_target(answer: str) -> str | None:
    """The gold number of a GSM8K answer (after ``####``), normalized."""
    if "####" not in answer:
        return normalize_number(answer) if _FLEX.fullmatch(answer.strip()) else None
    return extract_flexible(answer.split("####")[-1])


def score_gsm8k(completion: str, target: str | None) -> dict[str, Any]:
    """Strict and flexible extraction of one completion, and whether each matches ``target``."""
    strict = extract_strict(completion)
    flexible = extract_flexible(completion)
    return {"strict": strict, "flexible": flexible,
            "strict_correct": target is not None and strict == target,
            "flexible_correct": target is not None and flexible == target}


def trim_at_stop(text: str, stops: tuple[str, ...] = GSM8K_STOP) -> str:
    """Cut ``text`` at the first stop string (the stop string itself is removed)."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


# ------------------------------------------------------------------ items and shot pools

@dataclass
class TaskItems:
    """Records to evaluate, and for each one the records of its shots."""

    task: str
    source: str
    records: list[dict]
    shots: list[list[dict]] = field(default_factory=list)
    shot_source: str | None = None


def task_source(task: str, data: str | None) -> str:
    """Normalise ``--data``: a registered name, ``NAME:PATH``, or a bare local path."""
    if task not in TASKS:
        raise SftscopeError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if data is None:
        return DEFAULT_DATA[task]
    if task == "perplexity":
        return data
    name, sep, _ = data.partition(":")
    if sep and name in REGISTRY:
        if name != task:
            raise SftscopeError(f"--data {data} is in {name} format but the task is {task}; "
                                f"use --task {name} or give {task}:PATH")
        return data
    if data == task:
        return data
    return f"{task}:{data}"


def _check_fields(task: str, records: list[dict], source: str) -> None:
    if not records:
        raise SftscopeError(f"data {source} is empty; give a file with at least one record")
    missing = [f for f in FIELDS[task] if f not in records[0]]
    if missing:
        raise SftscopeError(f"data {source} lacks field(s) {', '.join(missing)} that the {task} "
                            f"task needs (it has: {', '.join(map(str, records[0]))})")


def _read(source: str, split: str | None) -> list[dict]:
    spec, path = parse_source(source)
    return read_records(source, split if path is None else None)


def load_task_items(task: str, data: str | None = None, *, split: str | None = None,
                    limit: int | None = None, shots: int = 0,
                    fewshot_data: str | None = None, fewshot_seed: int = FEWSHOT_SEED
                    ) -> TaskItems:
    """Items (first ``limit``, in file order as lm-eval does) and their seeded shots.

    Shot pool: ``fewshot_data`` if given; else the hub dataset's train (GSM8K) or dev (MMLU)
    split; else, for a local file, the same file with the evaluated item excluded.
    """
    if task not in ("gsm8k", "mmlu"):
        raise SftscopeError(f"task {task} has no items with answers; use gsm8k or mmlu")
    source = task_source(task, data)
    records = _read(source, split)
    _check_fields(task, records, source)
    records = records[:limit] if limit else records
    items = TaskItems(task, source, records)
    if shots <= 0:
        return items
    _, path = parse_source(source)
    if fewshot_data is not None:
        shot_src = task_source(task, fewshot_data)
        pool = _read(shot_src, SHOT_SPLIT[task])
        _check_fields(task, pool, shot_src)
        same = False
    elif path is None:
        shot_src = f"{source} ({SHOT_SPLIT[task]} split)"
        pool = _read(source, SHOT_SPLIT[task])
        same = False
    else:
        shot_src = f"{source} (same file, item excluded)"
        pool = _read(source, None)
        same = True
    need = shots + (1 if same else 0)
    if len(pool) < need:
        raise SftscopeError(f"{shots}-shot prompts need {need} shot records but {shot_src} has "
                            f"{len(pool)}; lower --shots or give --fewshot-data")
    rnd = random.Random(fewshot_seed)
    for i in range(len(items.records)):
        if same:
            drawn = [j for j in rnd.sample(range(len(pool)), need) if j != i][:shots]
        else:
            drawn = rnd.sample(range(len(pool)), shots)
        items.shots.append([pool[j] for j in drawn])
    items.shot_source = shot_src
    return items


# ------------------------------------------------------------------ prompts

def gsm8k_prompt(record: dict, shots: list[dict] | None = None) -> str:
    """lm-eval gsm8k prompt: shots ``Question: q\\nAnswer: a`` + blank line + the target."""
    parts = [f"Question: {s['question']}\nAnswer: {s['answer']}" for s in shots or []]
    parts.append(f"Question: {record['question']}\nAnswer:")
    return "\n\n".join(parts)


def mmlu_choices(record: dict) -> list[str]:
    """The answer options of an MMLU record (a list or a JSON string)."""
    choices = record["choices"]
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError as e:
            raise SftscopeError(f"MMLU choices {choices[:60]!r} are not a JSON list") from e
    if not 2 <= len(choices) <= len(LETTERS):
        raise SftscopeError(f"an MMLU record has {len(choices)} choices; need 2..{len(LETTERS)}")
    return [str(c) for c in choices]


def mmlu_answer(record: dict) -> str:
    """The gold letter of an MMLU record (answer given as index or letter)."""
    ans = record["answer"]
    letter = LETTERS[int(ans)] if str(ans).strip().isdigit() else str(ans).strip().upper()
    if letter not in LETTERS[: len(mmlu_choices(record))]:
        raise SftscopeError(f"MMLU answer {ans!r} is not one of the choices")
    return letter


def _mmlu_body(record: dict) -> str:
    body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(mmlu_choices(record)))
    return f"{str(record['question']).strip()}\n{body}\nAnswer:"


def mmlu_prompt(record: dict, shots: list[dict] | None = None) -> str:
    """lm-eval mmlu prompt: subject header, shots ``...Answer: X`` and the question."""
    subject = str(record.get("subject") or "").replace("_", " ").strip()
    head = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            if subject else "")
    parts = [f"{_mmlu_body(s)} {mmlu_answer(s)}" for s in shots or []]
    parts.append(_mmlu_body(record))
    return head + "\n\n".join(parts)
