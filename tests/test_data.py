"""The one data path: reading, validation with line numbers (never "None"/"nan" texts),
templates, cheap source checks before a model load, prepare(), the one chat prompt, and no
torch import for any of it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sftscope.errors import SftscopeError
from sftscope.load import data as D


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n"
                            for x in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ templates

@pytest.mark.parametrize("template,fields", [
    ("Q: {question}\nA: {answer}", ["question", "answer"]),
    ("{q!r} {q:>10} {n:.2f}", ["q", "n"]),
    ("{choices[0]} or {choices[1]}? {{literal}}", ["choices"]),
])
def test_check_template_accepts(template, fields):
    assert D.check_template(template) == fields


@pytest.mark.parametrize("template,msg", [
    ("Q: {}", "positional field"),
    ("Q: {0}", "positional field"),
    ("Q: {0[1]}", "positional field"),
    ("Q: {question", "expected '}'"),
    ("Q: question}", "Single '}'"),
    ("Q: {question} {", "Single '{'"),
    ("{q!x}", "conversion !x"),
    ("{q:{width}}", "nested fields"),
    ("{q:zz}", "applies to no value"),
    ("no field at all", "names no field"),
])
def test_check_template_refuses(template, msg):
    with pytest.raises(SftscopeError, match=msg) as e:
        D.check_template(template)
    assert "\n" not in str(e.value).replace(repr(template), "")  # one clear line


def test_template_values_are_checked_per_record(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [{"q": "a", "n": 1}, {"q": "b", "n": "x"},
                                      {"q": None, "n": 2}])
    with pytest.raises(SftscopeError, match=r"t.jsonl, line 2: --template cannot format it"):
        D.load_samples(str(p), template="{q} {n:d}")
    with pytest.raises(SftscopeError, match=r"t.jsonl, line 3: field 'q' is null"):
        D.load_samples(str(p), template="{q} {n}")
    samples, notes = D.read_samples(str(p), template="{q} {n:d}", skip_bad=True,
                                    shuffle=False)
    assert [s.text for s in samples] == ["a 1"]
    assert notes == [f"2 of 3 records were skipped as bad (first: {p}, line 2: --template "
                     f"cannot format it (ValueError: Unknown format code 'd' for object of "
                     f"type 'str'))"]


# ------------------------------------------------------------------ bad records

def test_jsonl_records_that_are_not_objects(tmp_path):
    p = _jsonl(tmp_path / "x.jsonl", [{"text": "fine"}, "[1, 2]", "null", "{broken",
                                      {"text": "also fine"}])
    with pytest.raises(SftscopeError, match=r"x.jsonl, line 2: is not a JSON object \(got list"):
        D.load_samples(str(p))
    samples, notes = D.read_samples(str(p), skip_bad=True, shuffle=False)
    assert [s.text for s in samples] == ["fine", "also fine"]
    assert notes[0].startswith("3 of 5 records were skipped as bad (first: ")
    assert "line 2" in notes[0]


def test_missing_fields_and_empty_texts_are_refused_with_their_line(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}, {"other": 1}, {"text": None}, {"text": ""},
            {"text": float("nan")}, {"text": ["a"]}]
    p = _jsonl(tmp_path / "x.jsonl", rows)  # json.dumps writes NaN, which json.loads reads
    with pytest.raises(SftscopeError, match=r"x.jsonl, line 3: lacks field 'text'"):
        D.load_samples(str(p))
    for i, why in [(4, "null"), (5, "empty"), (6, "NaN"), (7, "a list, not text")]:
        q = _jsonl(tmp_path / f"y{i}.jsonl", [rows[0], rows[i - 1]])
        with pytest.raises(SftscopeError, match=rf"y{i}.jsonl, line 2: field 'text' is .*{why}"):
            D.load_samples(str(q))
    samples, notes = D.read_samples(str(p), skip_bad=True, shuffle=False)
    assert [s.text for s in samples] == ["one", "two"]
    assert "5 of 7 records were skipped" in notes[0]
    assert not any(s.text in ("None", "nan") for s in samples)


def test_csv_empty_cells_are_not_nan_texts(tmp_path):
    p = tmp_path / "d.csv"
    pd.DataFrame({"question": ["q1", None, "q3"], "answer": ["#### 1", "#### 2", None]}).to_csv(
        p, index=False)
    with pytest.raises(SftscopeError, match=r"d.csv, row 2: field 'question' is NaN"):
        D.load_samples(f"gsm8k:{p}")
    with pytest.raises(SftscopeError, match=r"d.csv, row 2: field 'question' is NaN"):
        D.load_samples(str(p), text_field="question")
    from sftscope.load.items import load_task_items

    with pytest.raises(SftscopeError, match=r"d.csv, row 2: field 'question' is NaN"):
        load_task_items("gsm8k", str(p))
    items = load_task_items("gsm8k", str(p), skip_bad=True)
    assert [r["question"] for r in items.records] == ["q1"]


def test_gsm8k_records_format_and_blank_wikitext_lines(tmp_path):
    p = _jsonl(tmp_path / "g.jsonl", [{"question": "Q?", "answer": "so 1,080\n#### 1,080"}])
    s = D.load_samples(f"gsm8k:{p}")[0]
    assert s.prompt == "Question: Q?\nAnswer:" and s.answer == " so 1,080\n#### 1,080"
    assert s.meta["target"] == "1080" and s.text == s.prompt + s.answer
    w = _jsonl(tmp_path / "w.jsonl", [{"text": "a line"}, {"text": ""}, {"text": " "},
                                      {"text": "more"}])
    samples, notes = D.read_samples(f"wikitext:{w}", shuffle=False)
    assert [x.text for x in samples] == ["a line", "more"]
    assert notes == [f"2 blank texts of wikitext:{w} were left out"]
    with pytest.raises(SftscopeError, match="line 2: field 'text' is empty"):
        D.load_samples(str(w))  # a plain file: a blank text is an error


# ------------------------------------------------------------------ cheap checks

def test_check_source(tmp_path):
    good = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a"}])
    D.check_source(f"gsm8k:{good}")
    D.check_source(str(good), need=("question", "answer"))
    D.check_source(str(good), template="{question} {answer}")
    D.check_source("gsm8k")  # a hub dataset: nothing to open
    cases = [
        (str(tmp_path / "none.jsonl"), {}, "does not exist"),
        (str(tmp_path), {}, "is a folder"),
        (str(_jsonl(tmp_path / "x.xml", ["<a/>"])), {}, "unknown format '.xml'"),
        (f"mmlu:{good}", {}, "lacks field(s) choices"),
        (str(good), {}, "lacks field(s) text (say which field holds the text"),
        (str(good), {"text_field": "body"}, "lacks field(s) body"),
        (str(good), {"template": "{question} {why}"}, "lacks field(s) why"),
        (str(good), {"template": "{0}"}, "positional field"),
        (str(_jsonl(tmp_path / "e.jsonl", [])), {}, "is empty"),
        (str(_jsonl(tmp_path / "l.jsonl", ["[1]"])), {}, "line 1: is not a JSON object"),
    ]
    for source, kw, msg in cases:
        with pytest.raises(SftscopeError, match=re.escape(msg)):
            D.check_source(source, **kw)
    csv = tmp_path / "c.csv"
    pd.DataFrame({"question": ["q"], "answer": ["a"]}).to_csv(csv, index=False)
    D.check_source(f"gsm8k:{csv}")
    pq = tmp_path / "c.parquet"
    pd.DataFrame({"text": ["q"]}).to_parquet(pq)
    D.check_source(str(pq))
    with pytest.raises(SftscopeError, match="lacks field"):
        D.check_source(f"gsm8k:{pq}")
    if os.geteuid() != 0:  # root reads anything
        good.chmod(0)
        with pytest.raises(SftscopeError, match="not readable"):
            D.check_source(str(good))


def test_check_task_data(tmp_path):
    from sftscope.load.items import check_task_data

    good = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a"}])
    check_task_data("gsm8k", str(good))
    check_task_data("gsm8k", str(good), fewshot_data=str(good))
    check_task_data("perplexity", str(_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])))
    check_task_data("gsm8k", rescore=str(_jsonl(tmp_path / "r.jsonl", [{"completion": "1"}])))
    with pytest.raises(SftscopeError, match="lacks field"):
        check_task_data("mmlu", str(good))
    with pytest.raises(SftscopeError, match="did you mean gsm8k"):
        check_task_data("gsm8kk", str(good))
    with pytest.raises(SftscopeError, match="does not generate"):
        check_task_data("mmlu", rescore=str(good))


def test_nothing_here_imports_torch(tmp_path):
    p = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}])
    code = (
        "import sys\n"
        "from sftscope.load import data as D\n"
        "from sftscope.load import items as I\n"
        "from sftscope.tasks import all_tasks\n"
        f"D.check_source('gsm8k:{p}'); D.check_template('{{q}}')\n"
        f"D.read_samples('gsm8k:{p}'); I.load_task_items('gsm8k', '{p}')\n"
        f"I.check_task_data('gsm8k', '{p}'); all_tasks()\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n")
    env = {**os.environ, "PYTHONPATH": str(Path(D.__file__).parents[2])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ prepare and chat

def test_prepare_is_the_one_path(tmp_path, tokenizer):
    rows = [{"text": "word " * (3 if i % 2 else 40)} for i in range(9)] + ["[1]"]
    p = _jsonl(tmp_path / "t.jsonl", rows)
    prep = D.prepare(str(p), tokenizer, n=20, seed=3, max_length=16, skip_bad=True)
    samples, tok, notes = prep
    assert len(samples) == len(tok) == 9
    assert notes[0].startswith("1 of 10 records were skipped as bad")
    assert "data has 9 samples, fewer than the 20 asked for" in notes
    assert f"{tok.n_truncated} of 9 texts were longer than --max-length 16" in notes[-1]
    assert tok.n_truncated == 5
    same, _ = D.read_samples(str(p), n=20, seed=3, skip_bad=True)
    assert [s.text for s in samples] == [s.text for s in same]  # seeded subsample
    with pytest.raises(SftscopeError, match="at least 1"):
        D.prepare(str(p), tokenizer, n=0)


def test_one_chat_prompt(tokenizer):
    from sftscope.experiments import evaluate as E

    assert E.chat_prompt is D.chat_prompt
    s = D.Sample("Question: q\nAnswer: 1", "Question: q\nAnswer:", " 1")
    text, prompt = D.render(s, tokenizer, True)
    assert prompt == D.chat_prompt(tokenizer, s.prompt) and text == prompt + "1"
    tokenizer_no = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(SftscopeError, match="no chat template"):
        D.chat_prompt(tokenizer_no, "x")
