"""The task registry: lookup with did-you-mean, primaries used by sweep and report, a new task
as one file, lm-eval's shot samplers, MMLU answers refused the same way by every command."""

from __future__ import annotations

import json
import random
import sys
import textwrap

import pytest

import sftscope.tasks as TK
from sftscope.errors import SftscopeError
from sftscope.tasks import all_tasks, get_task, primary_metric_of, task_names
from sftscope.tasks import mmlu as M
from sftscope.tasks.base import Task, encode_pair, pick_shots, trim_at_stop


def test_registry_names_and_lookup():
    assert task_names() == ("gsm8k", "mmlu", "perplexity", "preference")
    assert [t.name for t in all_tasks()] == list(task_names())
    with pytest.raises(SftscopeError, match="did you mean gsm8k"):
        get_task("gsm8")
    with pytest.raises(SftscopeError, match="did you mean mmlu"):
        get_task("MMLU")
    with pytest.raises(SftscopeError, match="unknown task 'hellaswag'; use one of gsm8k, mmlu"):
        get_task("hellaswag")


def test_primary_metrics_come_from_the_tasks():
    from sftscope.experiments.sweep import PRIMARY
    from sftscope.report.numbers import primary_metric as _primary_metric

    g, m, p = (get_task(n) for n in ("gsm8k", "mmlu", "perplexity"))
    assert (g.primary, m.primary, p.primary) == ("flexible_extract", "accuracy", "loss_after")
    assert not g.lower_is_better and p.lower_is_better
    assert g.metrics == ("strict_match", "flexible_extract", "numeric_match")
    assert PRIMARY == {"gsm8k": "flexible_extract", "mmlu": "accuracy",
                       "perplexity": "loss_after", "preference": "accuracy"}
    assert primary_metric_of(["strict_match", "flexible_extract"]) == "flexible_extract"
    assert _primary_metric(["strict_match", "flexible_extract", "numeric_match"]) == \
        "flexible_extract"
    assert _primary_metric(["loss", "choice_accuracy"]) == "choice_accuracy"  # no task's
    assert (g.hub.hub, g.hub.config, g.hub.split) == ("openai/gsm8k", "main", "test")
    assert (g.shot_split, g.default_shots, m.shot_split, m.shot_sampler) == \
        ("train", 5, "dev", "first_n")


def test_task_definitions_are_checked():
    with pytest.raises(ValueError, match="kind"):
        Task("x", "bogus", "", ("a",), "a", "x")
    with pytest.raises(ValueError, match="primary"):
        Task("x", "loss", "", ("a",), "b", "x")
    with pytest.raises(ValueError, match="lacks prompt, score, check"):
        Task("x", "generate", "", ("a",), "a", "x")


ECHO_TASK = '''
    """A toy task in one file: repeat the word."""
    from sftscope.tasks.base import HubData, Task, text_problem


    def check(r):
        return text_problem(r, "word")


    def score(completion, r):
        return {"target": r["word"], "exact": completion.strip() == r["word"]}


    TASK = Task(name="echo", kind="generate", summary="repeat a word", metrics=("exact",),
                primary="exact", default_data="echo", hub=HubData("x/echo", None, "test"),
                fields=("word",), gold_fields=("word",), stops=("\\n",), check=check,
                prompt=lambda r, shots: f"Say {r['word']}:", score=score,
                describe=lambda r: {"word": r["word"]},
                item_values=lambda row: {"exact": row.get("exact")})
'''


@pytest.fixture()
def echo_task(tmp_path, monkeypatch):
    """A new task module in a folder added to the package's path (the registry re-scans)."""
    folder = tmp_path / "more_tasks"
    folder.mkdir()
    (folder / "echo.py").write_text(textwrap.dedent(ECHO_TASK))
    monkeypatch.setattr(TK, "__path__", [*TK.__path__, str(folder)])
    saved = dict(TK._REGISTRY)
    TK._REGISTRY.clear()
    yield get_task("echo")
    TK._REGISTRY.clear()
    TK._REGISTRY.update(saved)
    sys.modules.pop("sftscope.tasks.echo", None)


def test_a_new_task_is_one_file(echo_task, tmp_path):
    from sftscope.experiments import evaluate as E
    from sftscope.experiments.sweep import read_predictions
    from sftscope.load.items import load_task_items

    assert "echo" in task_names() and echo_task.primary == "exact"
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps({"word": w}) + "\n" for w in ("cat", "dog")))
    items = load_task_items("echo", str(data))
    assert [echo_task.prompt(r, s) for r, s in zip(items.records, items.shots)] == \
        ["Say cat:", "Say dog:"]
    saved = tmp_path / "saved.jsonl"
    saved.write_text(json.dumps({"completion": " cat\nmore", "word": "cat"}) + "\n"
                     + json.dumps({"completion": " cow", "word": "dog"}) + "\n")
    res = E.rescore(E.EvalConfig(task="echo", rescore=str(saved), out=str(tmp_path / "r")))
    assert res.score("exact").value == 0.5
    table = read_predictions(res.predictions_path, "echo")
    assert table["value"].tolist() == [1.0, 0.0]


def test_shots_as_lm_eval_draws_them():
    pool = [{"q": i} for i in range(20)]
    items = [{"q": 100 + i} for i in range(4)]
    shots = pick_shots(items, pool, 3, seed=1234)
    rnd = random.Random(1234)
    assert shots == [rnd.sample(pool, 3) for _ in items]  # one generator, item order
    same = pick_shots(pool[:4], pool, 3, seed=1234, same_pool=True)
    rnd = random.Random(1234)
    for it, got in zip(pool[:4], same):
        assert got == [r for r in rnd.sample(pool, 4) if r != it][:3] and it not in got
    subj = [{"q": i, "s": "a" if i % 2 else "b"} for i in range(10)]
    first = pick_shots(subj[:3], subj, 2, sampler="first_n", key=lambda r: r["s"],
                       same_pool=True)
    assert first[0] == [subj[2], subj[4]]  # subject b, the item (0) left out
    assert first[1] == [subj[3], subj[5]]  # subject a
    with pytest.raises(SftscopeError, match="need 6 shot records with 'b'"):
        pick_shots(subj[:1] + subj[1:2], subj, 6, sampler="first_n", key=lambda r: r["s"])
    with pytest.raises(SftscopeError, match="shot pool has 20"):
        pick_shots(items, pool, 20, same_pool=True)


def test_trim_at_stop_is_sequential_splitting():
    assert trim_at_stop("a STOP b END c", ("END", "STOP")) == "a "
    assert trim_at_stop("no stop", ("x",)) == "no stop"
    assert trim_at_stop("abc", ("", "c")) == "ab"  # an empty stop is ignored


def test_encode_pair_moves_context_whitespace(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "B")
    whole = tokenizer("Answer: B")["input_ids"]
    assert ctx == tokenizer("Answer:")["input_ids"] and ctx + cont == whole
    with pytest.raises(SftscopeError, match="empty"):
        encode_pair(tokenizer, "", " A")


# ------------------------------------------------------------------ MMLU records

def _mmlu(tmp_path, rows, name="m.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_mmlu_answers_and_choices():
    r = {"question": "Q?", "choices": json.dumps(["a", "b", "c"]), "answer": "c"}
    assert M.gold_index(r) == 2 and M.labels(r) == ["A", "B", "C"]
    assert M.continuations(r) == [" A", " B", " C"]
    assert M.gold_index({**r, "answer": 1.0}) == 1 and M.gold_index({**r, "answer": "2"}) == 2
    for bad in (3, "D", -1, True, "x", 1.5):
        assert "is not one of the 3 choices" in M.check({**r, "answer": bad})
    assert "1 choices" in M.check({**r, "choices": ["only"]})
    assert "null" in M.check({**r, "choices": ["a", None]})
    assert "not a JSON list" in M.check({**r, "choices": "[a, b"})
    assert M.check({**r, "answer": None}) == "field 'answer' is empty"
    assert M.prompt({**r, "subject": "high_school_math"}).startswith(
        "The following are multiple choice questions (with answers) about high school math."
        "\n\nQ?\nA. a\nB. b\nC. c\nAnswer:")


def test_out_of_range_mmlu_answer_is_refused_by_every_command(tmp_path, tokenizer):
    from sftscope.experiments.lens import prepare_data
    from sftscope.load.data import load_samples, prepare
    from sftscope.load.items import load_task_items

    good = {"question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "s"}
    path = _mmlu(tmp_path, [good, {**good, "answer": 4}, good])
    msg = r"m.jsonl, line 2: answer 4 is not one of the 4 choices"
    with pytest.raises(SftscopeError, match=msg):
        load_task_items("mmlu", str(path))                        # eval
    with pytest.raises(SftscopeError, match=msg):
        load_samples(f"mmlu:{path}")                              # analyze
    with pytest.raises(SftscopeError, match=msg):
        prepare_data(f"mmlu:{path}", tokenizer, n=None, seed=0, max_length=64,
                     chat_template=False, text_field=None, template=None)  # probe, swap
    with pytest.raises(SftscopeError, match=msg):
        prepare(f"mmlu:{path}", tokenizer)                        # suggest
    items = load_task_items("mmlu", str(path), skip_bad=True)
    assert len(items.records) == 2 and "1 of 3 records" in items.notes[0]
    prep = prepare(f"mmlu:{path}", tokenizer, skip_bad=True)
    assert len(prep.samples) == 2 and "1 of 3 records were skipped" in prep.notes[0]


def test_mmlu_shots_same_subject_first_n(tmp_path):
    from sftscope.load.items import load_task_items

    rows = [{"question": f"Q{i}", "choices": ["a", "b"], "answer": i % 2,
             "subject": "x" if i % 3 else "y"} for i in range(9)]
    items = load_task_items("mmlu", str(_mmlu(tmp_path, rows)), shots=2)
    for r, shots in zip(items.records, items.shots):
        assert len(shots) == 2 and r not in shots
        assert {s["subject"] for s in shots} == {r["subject"]}
        pool = [x for x in rows if x["subject"] == r["subject"] and x != r]
        assert shots == pool[:2]
    assert items.shot_source.endswith("(same file, item excluded)")
