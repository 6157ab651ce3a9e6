"""Offline task sets from the demo generator: GSM8K-, MMLU- and preference-format files.

``sftscope data`` writes them so that every walkthrough runs without a hub. The problems are
the demo corpus's word problems (:mod:`sftscope.demo.corpus`): the test problems' questions
appear in no train record, and no addition or subtraction a test problem needs appears in a
train record (as in the demo corpus). Each set is drawn from the same two problem lists:

- ``gsm8k``: ``train.jsonl`` / ``test.jsonl`` with ``question`` and ``answer`` (worked solution
  ending in ``#### N``, GSM8K's layout).
- ``mmlu``: ``dev.jsonl`` (shots, from the train problems) / ``test.jsonl`` with ``question``,
  ``choices`` (four numbers), ``answer`` (index of the result) and ``subject``
  (``elementary_mathematics``); the distractors are the result moved by 1..10, never negative.
- ``preference``: ``train.jsonl`` / ``test.jsonl`` with ``prompt`` (the demo prompt
  ``Question: ...\\nAnswer:``), ``chosen`` (the worked solution) and ``rejected`` (the same
  solution with a wrong final answer), TRL's preference format.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftscope.demo.corpus import Problem, ProblemSource, format_prompt
from sftscope.errors import SftscopeError
from sftscope.io import write_text

TASK_SETS = ("gsm8k", "mmlu", "preference")
MMLU_SUBJECT = "elementary_mathematics"
FILES = {"gsm8k": ("train.jsonl", "test.jsonl"), "mmlu": ("dev.jsonl", "test.jsonl"),
         "preference": ("train.jsonl", "test.jsonl")}


def problems(seed: int, n_train: int, n_test: int,
             max_number: int = 99) -> tuple[list[Problem], list[Problem]]:
    """``(train, test)`` word problems: distinct questions, test computations held out."""
    src = ProblemSource(f"sftscope-data/{seed}", max_number, n_test)
    return src.problems("train", n_train), src.test


def mmlu_record(pr: Problem, rng: random.Random) -> dict[str, object]:
    """A four-choice record: the result and three distinct non-negative numbers near it."""
    wrong: set[int] = set()
    while len(wrong) < 3:
        w = pr.result + rng.choice((-1, 1)) * rng.randint(1, 10)
        if w >= 0 and w != pr.result:
            wrong.add(w)
    choices = sorted(wrong | {pr.result})
    rng.shuffle(choices)
    return {"question": pr.question, "choices": [str(c) for c in choices],
            "answer": choices.index(pr.result), "subject": MMLU_SUBJECT}


def preference_record(pr: Problem, rng: random.Random) -> dict[str, str]:
    """Prompt, the worked solution (chosen) and the same solution ending in a wrong answer."""
    right = pr.record()["answer"]
    wrong = pr.result + rng.choice((-1, 1)) * rng.randint(1, 10)
    if wrong < 0 or wrong == pr.result:
        wrong = pr.result + rng.randint(1, 10)
    head = right.rsplit("#### ", 1)[0]
    return {"prompt": format_prompt(pr.question), "chosen": " " + right,
            "rejected": " " + head + f"#### {wrong}"}


def records(name: str, seed: int, train: list[Problem],
            test: list[Problem], n_dev: int) -> dict[str, list[dict]]:
    """The files of one task set: ``{file name: records}``."""
    if name == "gsm8k":
        return {"train.jsonl": [p.record() for p in train],
                "test.jsonl": [p.record() for p in test]}
    rng = random.Random(f"sftscope-data/{seed}/{name}")
    if name == "mmlu":
        return {"dev.jsonl": [mmlu_record(p, rng) for p in train[:n_dev]],
                "test.jsonl": [mmlu_record(p, rng) for p in test]}
    if name == "preference":
        return {"train.jsonl": [preference_record(p, rng) for p in train],
                "test.jsonl": [preference_record(p, rng) for p in test]}
    raise SftscopeError(f"unknown task set {name!r}; use {', '.join(TASK_SETS)}")


def write_task_sets(names: tuple[str, ...], out: str | Path, *, seed: int = 0,
                    n_train: int = 500, n_test: int = 200, n_dev: int = 5,
                    max_number: int = 99) -> dict[str, dict[str, Path]]:
    """Write each named set into ``out/NAME/`` (atomically); returns the paths written."""
    train, test = problems(seed, max(n_train, n_dev), n_test, max_number)
    written: dict[str, dict[str, Path]] = {}
    for name in names:
        sets = records(name, seed, train[:n_train] if name != "mmlu" else train, test, n_dev)
        written[name] = {}
        for fname, recs in sets.items():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            written[name][fname] = write_text(Path(out) / name / fname, text)
    return written


__all__ = ["FILES", "TASK_SETS", "items", "mmlu_record", "preference_record", "problems",
           "records", "run_data", "write_task_sets"]


def items(path: Path) -> int:
    """Records (lines) of a JSONL file."""
    return path.read_text(encoding="utf-8").count("\n")


def run_data(cfg) -> dict[str, dict[str, Path]]:  # noqa: ANN001 (DataConfig: config imports us)
    """``sftscope data``: plan (check --out), write the sets, record ``run.json`` last."""
    from sftscope.io import run_record
    from sftscope.runs import check_out, finish_run, start_run

    check_out(cfg.out, "data", cfg, overwrite=cfg.overwrite)
    out = start_run(cfg.out, "data", cfg.OUTPUTS)
    written = write_task_sets(cfg.sets(), out, seed=cfg.seed, n_train=cfg.train_size,
                              n_test=cfg.test_size, n_dev=cfg.dev_size,
                              max_number=cfg.max_number)
    counts = {name: {f: items(p) for f, p in files.items()} for name, files in written.items()}
    finish_run(out, run_record("data", cfg.record(), sets=list(written), items=counts))
    return written
