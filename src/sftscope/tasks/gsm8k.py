"""GSM8K, scored exactly as lm-evaluation-harness 0.4's ``gsm8k`` task (version 3).

Prompt: shots ``Question: {q}\\nAnswer: {answer}`` joined by blank lines, then
``Question: {q}\\nAnswer:``; 5 shots drawn from the train split with ``Random(1234)``, one
draw per item in item order. Generation stops at ``Question:``, ``</s>``, ``<|im_end|>`` (and
EOS); the text is cut at each stop string in turn.

Two lm-eval scores, each a filter then ``exact_match``:
- ``strict_match``: the first match of ``#### (\\-?[0-9\\.\\,]+)``;
- ``flexible_extract``: the last match of ``(-?[$0-9.,]{2,})|(-?[0-9]+)`` (its non-empty
  group);
a filter that finds nothing gives ``[invalid]``; extraction and the gold answer text then lose
every ``,`` and ``$``, everything up to the last ``#### ``, a final ``.``, and are lower-cased
(``ignore_case``) before the comparison. So the gold is the answer text after its last
``#### ``, and ``72.0`` does not match ``72``.
A third score, ``numeric_match``, is not lm-eval's: the flexible extraction compared to the
gold as a decimal number (``72.0 == 72``, ``-0 == 0``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from sftscope.tasks.base import HubData, generate_task, text_problem

STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE_PATTERNS = (",", r"\$", r"(?s).*#### ", r"\.$")
FALLBACK = "[invalid]"
STOPS = ("Question:", "</s>", "<|im_end|>")
METRICS = ("strict_match", "flexible_extract", "numeric_match")

_STRICT = re.compile(STRICT_PATTERN)
_FLEXIBLE = re.compile(FLEXIBLE_PATTERN)
_IGNORE = tuple(re.compile(p) for p in IGNORE_PATTERNS)


# ------------------------------------------------------------------ lm-eval's filters

def _regex_filter(text: str, pattern: re.Pattern, select: int) -> str:
    """lm-eval's ``regex`` filter: all matches, the ``select``-th, its first non-empty group
    when the pattern has several, stripped; ``[invalid]`` when nothing matches."""
    found = pattern.findall(text if isinstance(text, str) else "")
    if not found:
        return FALLBACK
    m = found[select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), FALLBACK)
    return m.strip()


def strict_filter(completion: str) -> str:
    """The ``strict-match`` filter: the number after the first ``#### ``."""
    return _regex_filter(completion, _STRICT, 0)


def flexible_filter(completion: str) -> str:
    """The ``flexible-extract`` filter: the last number-like run of the completion."""
    return _regex_filter(completion, _FLEXIBLE, -1)


def normalize(text: str) -> str:
    """``exact_match``'s normalisation of a prediction or reference.

    lm-eval stores each intermediate result in a one-element numpy string array, which drops
    trailing NUL characters and gives the lower-casing a fixed width (a character whose lower
    case is longer is cut); both quirks are kept so that every string scores as there.
    """
    width = len(text)
    for pattern in _IGNORE:
        raw = pattern.sub("", text)
        width, text = len(raw), raw.rstrip("\x00")
    return text.lower()[:width].rstrip("\x00")


def gold(answer: Any) -> str:
    """The reference as compared: the normalised answer text (lm-eval's ``{{answer}}``)."""
    return normalize(str(answer))


def _number(text: str) -> Decimal | None:
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def score(completion: str, record: dict) -> dict[str, Any]:
    """Both filters' extractions of a (stop-trimmed) completion and whether each matches."""
    target = gold(record["answer"])
    strict = strict_filter(completion)
    flexible = flexible_filter(completion)
    a, b = _number(normalize(flexible)), _number(target)
    return {"target": target, "strict_extracted": strict, "flexible_extracted": flexible,
            "strict_match": normalize(strict) == target,
            "flexible_extract": normalize(flexible) == target,
            "numeric_match": a is not None and b is not None and a == b}


def extract_strict(text: str) -> str | None:
    """The normalised strict extraction (``None`` when there is no ``#### N``)."""
    s = strict_filter(text)
    return None if s == FALLBACK else normalize(s)


def extract_flexible(text: str) -> str | None:
    """The normalised flexible extraction (``None`` when there is no number)."""
    s = flexible_filter(text)
    return None if s == FALLBACK else normalize(s)


# ------------------------------------------------------------------ prompts and records

def check(record: dict) -> str | None:
    """A record needs a non-blank question and answer."""
    return text_problem(record, "question") or text_problem(record, "answer")


def turn(record: dict) -> str:
    """``Question: {q}\\nAnswer:`` (lm-eval's ``doc_to_text``)."""
    return f"Question: {record['question']}\nAnswer:"


def describe(record: dict) -> dict[str, Any]:
    return {"question": record.get("question"), "answer": record.get("answer")}


TASK = generate_task(
    "gsm8k", summary="grade-school maths, greedy generation, lm-eval strict and flexible exact "
                     "match",
    hub=HubData("openai/gsm8k", "main", "test"), fields=("question", "answer"),
    doc_to_text=turn, doc_to_target=lambda r: r["answer"], score=score, metrics=METRICS,
    primary="flexible_extract", stops=STOPS, check=check, shot_split="train", default_shots=5,
    gold_fields=("answer",), describe=describe,
    meta=lambda r: {"target": extract_strict(str(r["answer"]))})
prompt = TASK.prompt
analysis_sample = TASK.analysis_sample
