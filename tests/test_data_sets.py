"""`sftscope data`: the generated task sets (sizes, formats, disjointness, determinism)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftscope.cli import main


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_data_command_defaults(tmp_path, capsys):
    out = tmp_path / "data"
    with pytest.raises(SystemExit) as e:
        main(["data", "--out", str(out)])
    assert e.value.code == 0
    train, test = _read(out / "gsm8k" / "train.jsonl"), _read(out / "gsm8k" / "test.jsonl")
    assert (len(train), len(test)) == (500, 200)  # the documented defaults
    assert all(r["answer"].rsplit("\n", 1)[-1].startswith("#### ") for r in train + test)
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    dev, mtest = _read(out / "mmlu" / "dev.jsonl"), _read(out / "mmlu" / "test.jsonl")
    assert (len(dev), len(mtest)) == (5, 200)
    from sftscope.tasks.mmlu import check, gold_index

    for r in dev + mtest:
        assert check(r) is None and len(set(r["choices"])) == 4
        assert r["subject"] == "elementary_mathematics"
    # the gold choice is the GSM8K result of the same question
    result = {r["question"]: r["answer"].rsplit("#### ", 1)[1] for r in test}
    assert all(r["choices"][gold_index(r)] == result[r["question"]] for r in mtest)
    pairs = _read(out / "preference" / "train.jsonl")
    assert len(pairs) == 500 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    for p in pairs:
        assert p["prompt"].startswith("Question: ") and p["prompt"].endswith("\nAnswer:")
        head_c, ans_c = p["chosen"].rsplit("#### ", 1)
        head_r, ans_r = p["rejected"].rsplit("#### ", 1)
        assert head_c == head_r and ans_c != ans_r and int(ans_r) >= 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "data" and rec["items"]["gsm8k"]["train.jsonl"] == 500


def test_data_sets_deterministic_and_usable(tmp_path):
    from sftscope.config.commands import DataConfig
    from sftscope.demo.tasksets import run_data
    from sftscope.load.items import check_task_data

    a = run_data(DataConfig(names=("gsm8k", "mmlu"), out=str(tmp_path / "a"), train_size=20,
                            test_size=10, seed=3))
    b = run_data(DataConfig(names=("gsm8k", "mmlu"), out=str(tmp_path / "b"), train_size=20,
                            test_size=10, seed=3))
    assert set(a) == {"gsm8k", "mmlu"} and not (tmp_path / "a" / "preference").exists()
    for name in a:
        for f in a[name]:
            assert a[name][f].read_bytes() == b[name][f].read_bytes()
    check_task_data("gsm8k", str(a["gsm8k"]["test.jsonl"]))
    check_task_data("mmlu", str(a["mmlu"]["test.jsonl"]))
    c = run_data(DataConfig(names=("gsm8k",), out=str(tmp_path / "c"), train_size=20, test_size=10,
                            seed=4))
    assert c["gsm8k"]["test.jsonl"].read_bytes() != a["gsm8k"]["test.jsonl"].read_bytes()


def test_held_out_computations():
    from sftscope.demo.corpus import HELD_OUT_OPS
    from sftscope.demo.tasksets import problems

    train, test = problems(0, 300, 100)
    held = {k for p in test for k in p.keys if k[0] in HELD_OUT_OPS}
    assert held and not any(k in held for p in train for k in p.keys)


def test_tune_plan_and_estimate():
    from sftscope.experiments.tune import Plan, estimate_line, plan_work

    p = plan_work([10, 20, 30, 40, 50], 2, epochs=1.0, max_steps=None)
    assert (p.steps, p.batch_size, p.mean_tokens, p.tokens) == (3, 2, 30.0, 180)
    assert plan_work([10] * 5, 2, epochs=2.0, max_steps=None).steps == 6
    assert plan_work([10] * 5, 32, epochs=1.0, max_steps=50).tokens == 50 * 5 * 10
    assert "50 steps x 32 examples x 10 tokens" in plan_work([10] * 64, 32, epochs=1.0,
                                                             max_steps=50).line()
    line = estimate_line(Plan(50, 32, 10.0, 16000), 3, 1.5, 4)
    assert "0.50 s per step over steps 2..4" in line and "25 s for 50" in line
    assert "23 s left" in line
    assert "2 min for 50 steps (2 min left)" in estimate_line(Plan(50, 32, 10.0, 1), 3, 6.0, 4)
    assert "1.7 h" in estimate_line(Plan(6000, 32, 10.0, 1), 1, 1.0, 1)
