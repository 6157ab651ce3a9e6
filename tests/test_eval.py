"""Evaluation: answer extraction, lm-eval-style prompts and shots, batched generation through
``model.generate`` on an oracle model, MMLU log-likelihood scoring, perplexity with an
adapter, files, and bad input on the command line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sftscope.errors import SftscopeError
from sftscope.experiments import evaluate as E
from sftscope.load import items as I
from sftscope.load.models import load_model
from sftscope.tasks import gsm8k as G
from sftscope.tasks import mmlu as M
from sftscope.tasks.base import trim_at_stop

# ------------------------------------------------------------------ extraction

# lm-eval-exact: ``72.0`` is not ``72`` and ``-3`` needs its sign; the old Decimal matching
# survives only as ``numeric_match``.
@pytest.mark.parametrize("completion,strict,flexible", [
    (" He has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
    (" So 1,000 + 234 = 1,234.\n#### 1,234", "1234", "1234"),
    (" It costs $5.\n#### $5", None, "5"),
    (" The change is -3 degrees.\n#### -3", "-3", "-3"),
    (" She pays $-2.50 then.", None, "-2.50"),
    (" Total 72.0 dollars\n#### 72.00", "72.00", "72.00"),
    (" 3 apples and 4 pears make 7 fruits.", None, "7"),
    (" I do not know.", None, None),
    (" #### 12\nThen 5 more: 17", "12", "17"),
    (" The answer is 18.", None, "18"),
])
def test_extraction(completion, strict, flexible):
    assert G.extract_strict(completion) == strict
    assert G.extract_flexible(completion) == flexible


def test_normalize_and_score():
    assert G.gold("Step.\n#### 1,080") == "1080"
    s = G.score(" 5 + 2 = 7\n#### 7.0", {"answer": "so\n#### 7"})
    assert s["target"] == "7" and s["strict_extracted"] == "7.0"
    assert s["strict_match"] is False and s["flexible_extract"] is False  # lm-eval: 7.0 != 7
    assert s["numeric_match"] is True
    s = G.score(" 5 + 2 = 7\n#### 7", {"answer": "#### 7"})
    assert s["strict_match"] and s["flexible_extract"] and s["numeric_match"]
    s = G.score(" it is 7", {"answer": "#### 7"})
    assert s["strict_extracted"] == "[invalid]" and s["strict_match"] is False
    assert s["flexible_extract"] is True
    assert G.score(" nothing", {"answer": "#### 7"})["flexible_extracted"] == "[invalid]"
    assert trim_at_stop(" 7\n\nQuestion: next", G.STOPS) == " 7\n\n"
    assert trim_at_stop(" 7</s>junk<|im_end|>", G.STOPS) == " 7"


# ------------------------------------------------------------------ prompts and shots

def test_gsm8k_prompt_and_shots(gsm8k_file):
    items = I.load_task_items("gsm8k", str(gsm8k_file), shots=3, limit=5)
    assert len(items.records) == 5 and len(items.shots) == 5
    for r, shots in zip(items.records, items.shots):
        assert len(shots) == 3 and r not in shots  # same file: the item itself is excluded
    again = I.load_task_items("gsm8k", f"gsm8k:{gsm8k_file}", shots=3, limit=5)
    assert again.shots == items.shots  # seeded (1234)
    other = I.load_task_items("gsm8k", str(gsm8k_file), shots=3, limit=5, fewshot_seed=7)
    assert other.shots != items.shots
    p = G.prompt(items.records[0], items.shots[0])
    s0 = items.shots[0][0]
    assert p.startswith(f"Question: {s0['question']}\nAnswer: {s0['answer']}\n\nQuestion: ")
    assert p.endswith(f"\n\nQuestion: {items.records[0]['question']}\nAnswer:")
    assert p.count("\n\n") == 3
    pool = I.load_task_items("gsm8k", str(gsm8k_file), shots=2, fewshot_data=str(gsm8k_file))
    assert pool.shot_source == f"gsm8k:{gsm8k_file}"
    with pytest.raises(SftscopeError, match="shot records"):
        I.load_task_items("gsm8k", str(gsm8k_file), shots=8)


def test_task_source_errors(tmp_path):
    with pytest.raises(SftscopeError, match="unknown task"):
        I.task_source("winogrande", None)
    with pytest.raises(SftscopeError, match="mmlu format"):
        I.task_source("gsm8k", "mmlu:x.jsonl")
    with pytest.raises(SftscopeError, match="does not exist"):
        I.load_task_items("gsm8k", str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": 1}) + "\n")
    with pytest.raises(SftscopeError, match="lacks field"):
        I.load_task_items("gsm8k", str(bad))


# ------------------------------------------------------------------ an oracle model

def _oracle_class():
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class OracleLM(LlamaForCausalLM):
        """Answers a known question with a fixed continuation, one greedy token at a time.

        It sees only what ``generate`` feeds it (left-padded rows, attention mask): it decodes
        the real tokens, finds the last ``Question: ...\\nAnswer:`` and continues with the
        tokens of ``answers[question]`` (then EOS), so the whole generate / stop / trim /
        extract path is exercised for real."""

        def setup(self, tokenizer, answers: dict[str, str]):
            self.tok = tokenizer
            self.conts = {}
            for q, a in answers.items():
                ids = tokenizer(a, add_special_tokens=False)["input_ids"]
                # decoded prefix -> number of tokens generated so far
                self.conts[q] = (ids, {tokenizer.decode(ids[:k]): k
                                       for k in range(len(ids), -1, -1)})
            self.seen_widths: list[int] = []
            return self

        def forward(self, input_ids=None, attention_mask=None, **kw):
            b, t = input_ids.shape
            self.seen_widths.append(t)
            logits = torch.zeros(b, t, self.config.vocab_size)
            for i in range(b):
                row = input_ids[i]
                if attention_mask is not None:
                    row = row[attention_mask[i].bool()]
                text = self.tok.decode(row.tolist(), skip_special_tokens=True)
                m = list(re.finditer(r"Question: (.*?)\nAnswer:", text, re.S))
                nxt = self.tok.eos_token_id
                if m and m[-1].group(1) in self.conts:
                    cont, prefixes = self.conts[m[-1].group(1)]
                    k = prefixes.get(text[m[-1].end():])
                    if k is not None and k < len(cont):
                        nxt = cont[k]
                logits[i, -1, nxt] = 10.0
            return CausalLMOutputWithPast(logits=logits)

    return OracleLM


def _oracle(tokenizer, answers):
    from sftscope.load.tiny import tiny_config

    cfg = tiny_config("llama", len(tokenizer), n_layers=1, hidden=8, n_heads=2,
                      max_positions=4096, use_cache=False)
    return _oracle_class()(cfg).setup(tokenizer, answers).eval()


def _records(path):
    from pathlib import Path

    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def test_gsm8k_oracle_scores_one(tokenizer, gsm8k_file, tmp_path):
    recs = _records(gsm8k_file)
    # the gold answer, then a new question the stop string must cut off
    answers = {r["question"]: f" {r['answer']}\n\nQuestion: what next?" for r in recs}
    model = _oracle(tokenizer, answers)
    cfg = E.EvalConfig(model="oracle", task="gsm8k", data=str(gsm8k_file), out=str(tmp_path),
                       shots=2, batch_size=3, max_new_tokens=64)
    res = E.evaluate_model(model, tokenizer, cfg)
    assert res.n == len(recs)
    for metric in ("strict_match", "flexible_extract", "numeric_match"):
        s = res.score(metric)
        assert s.value == 1.0 and s.n == len(recs)
        assert 0.6 < s.ci_low < 1.0 and s.ci_high == 1.0  # Wilson, n = 8
    preds = _records(res.predictions_path)
    assert [p["completion"] for p in preds] == [f" {r['answer']}\n\n" for r in recs]
    assert all(p["strict_match"] and p["flexible_extract"] for p in preds)
    assert all(p["answer"] == r["answer"] for p, r in zip(preds, recs))
    assert len(set(model.seen_widths)) > 1  # left-padded batches of different widths
    table = json.loads(json.dumps(res.table().to_dict("records")))
    assert [r["metric"] for r in table] == ["strict_match", "flexible_extract", "numeric_match"]
    csv = (tmp_path / "scores.csv").read_text().splitlines()
    assert csv[0] == "task,metric,value,ci_low,ci_high,n" and len(csv) == 4


def test_gsm8k_oracle_wrong_and_flexible_only(tokenizer, gsm8k_file):
    recs = _records(gsm8k_file)
    wrong = {r["question"]: " It is 1000.\n#### 1000" for r in recs}
    res = E.evaluate_model(_oracle(tokenizer, wrong), tokenizer, E.EvalConfig(
        model="oracle", data=str(gsm8k_file), shots=0, batch_size=4, max_new_tokens=32))
    assert res.score("strict_match").value == 0.0
    assert res.score("flexible_extract").value == 0.0
    loose = {r["question"]: f" The answer is {G.gold(r['answer'])}." for r in recs}
    res = E.evaluate_model(_oracle(tokenizer, loose), tokenizer, E.EvalConfig(
        model="oracle", data=str(gsm8k_file), shots=0, batch_size=8, max_new_tokens=32))
    assert res.score("strict_match").value == 0.0
    assert res.score("flexible_extract").value == 1.0


def test_generate_batched_matches_one_by_one(model_dir, tokenizer):
    model = load_model(str(model_dir("llama")))
    prompts = ["Question: Tom has 3 apples\nAnswer:", "Question: 12 plus 7?\nAnswer:",
               "The quick brown fox jumps over the lazy dog. Question: What?\nAnswer:"]
    batched = E.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = E.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert [g.raw for g in batched] == [g.raw for g in single]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in single]


# ------------------------------------------------------------------ MMLU

@pytest.fixture()
def mmlu_file(tmp_path):
    rows = [{"question": f"Which number is {x}?", "choices": ["one", "two", "three", "four"],
             "answer": a, "subject": "arithmetic"}
            for x, a in [("two", 1), ("four", 3), ("one", 0), ("three", 2), ("two", 1)]]
    p = tmp_path / "mmlu.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def _letter_stub(tokenizer, gold_of_question=None, always=None):
    """Logits that favour the tokens of `` X``: the gold letter of the question (found in the
    decoded row), or a fixed letter."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from sftscope.load.tiny import tiny_config

    class LetterLM(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kw):
            b, t = input_ids.shape
            logits = torch.zeros(b, t, self.config.vocab_size)
            for i in range(b):
                row = input_ids[i]
                if attention_mask is not None:
                    row = row[attention_mask[i].bool()]
                text = tokenizer.decode(row.tolist())
                letter = always
                if gold_of_question is not None:
                    q = max(gold_of_question, key=lambda q: text.rfind(q))
                    letter = gold_of_question[q]
                for tid in tokenizer(f" {letter}", add_special_tokens=False)["input_ids"]:
                    logits[i, :, tid] += 5.0
            return CausalLMOutputWithPast(logits=logits)

    cfg = tiny_config("llama", len(tokenizer), n_layers=1, hidden=8, n_heads=2)
    return LetterLM(cfg).eval()


def test_mmlu_loglik_on_stubs(tokenizer, mmlu_file, tmp_path):
    recs = _records(mmlu_file)
    gold = {r["question"]: "ABCD"[r["answer"]] for r in recs}
    res = E.evaluate_model(_letter_stub(tokenizer, gold_of_question=gold), tokenizer,
                           E.EvalConfig(model="stub", task="mmlu", data=str(mmlu_file),
                                        out=str(tmp_path), batch_size=3))
    assert res.score("accuracy").value == 1.0 and res.n == 5
    res = E.evaluate_model(_letter_stub(tokenizer, always="C"), tokenizer,
                           E.EvalConfig(model="stub", task="mmlu", data=str(mmlu_file),
                                        shots=2))
    assert res.score("accuracy").value == pytest.approx(1 / 5)  # one gold C
    preds = _records(tmp_path / "predictions-mmlu.jsonl")
    assert preds[0]["target"] == "B" and preds[0]["prediction"] == "B"
    assert set(preds[0]["logprobs"]) == set("ABCD")
    prompt = M.prompt(recs[0], [recs[1]])
    assert prompt.startswith("The following are multiple choice questions (with answers) "
                             "about arithmetic.\n\nWhich number is four?\nA. one\n")
    assert "Answer: D\n\nWhich number is two?" in prompt and prompt.endswith("D. four\nAnswer:")


def test_choice_logprobs_fast_path_agrees(model_dir, tokenizer):
    model = load_model(str(model_dir("llama")))
    ctx = ["Question: what?\nAnswer:", "A much longer context here.\nAnswer:"]
    ids = [tokenizer(c)["input_ids"] for c in ctx]
    a = tokenizer(" A", add_special_tokens=False)["input_ids"]
    assert len(a) == 1
    fast = E._last_logprobs(model, ids, 0, 2, "x")[:, a[0]]
    slow = E._sequence_logprobs(model, [i + a for i in ids], [len(i) for i in ids], 0, 1, "x")
    assert fast.tolist() == pytest.approx(slow, abs=1e-4)
    # the public function takes the fast path when every continuation is one token
    res = E.choice_logprobs(model, tokenizer, ctx, [[" A", " A"], [" A", " A"]])
    assert [r[0] for r in res] == pytest.approx(slow, abs=1e-4)


# ------------------------------------------------------------------ perplexity and adapters

def _save_adapter(model_path, out, blocks=(1,), seed=0):
    from sftscope.experiments.tune import META_FILE, apply_lora
    from sftscope.io import write_json
    from sftscope.load.models import fingerprint

    torch.manual_seed(seed)
    peft = apply_lora(load_model(str(model_path)), list(blocks), rank=4, alpha=8)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(str(out))
    write_json(out / META_FILE, {"base_fingerprint": fingerprint(str(model_path))})
    return out


def test_perplexity_before_after(model_dir, tokenizer, tmp_path):
    from sftscope.experiments.tune import load_adapter

    path = model_dir("llama")
    adapter = _save_adapter(path, tmp_path / "adapter")
    text = tmp_path / "text.txt"
    text.write_text("\n".join(["The quick brown fox jumps over the lazy dog."] * 3
                              + ["A train travels 60 miles in 1 hour.", "x"]))
    cfg = E.EvalConfig(model=str(path), task="perplexity", data=str(text), batch_size=2)
    base = E.evaluate_model(load_model(str(path)), tokenizer, cfg)
    assert {s.metric for s in base.scores} == {"loss", "ppl"}
    peft = load_adapter(load_model(str(path)), adapter, str(path))
    res = E.evaluate_model(peft, tokenizer, cfg)
    sc = {s.metric: s for s in res.scores}
    assert sc["loss_before"].value == pytest.approx(base.score("loss").value, abs=1e-5)
    assert sc["loss_after"].value != pytest.approx(sc["loss_before"].value, abs=1e-4)
    assert sc["loss_delta"].value == pytest.approx(
        sc["loss_after"].value - sc["loss_before"].value, abs=1e-5)
    assert sc["ppl_after"].value == pytest.approx(torch.tensor(sc["loss_after"].value).exp()
                                                  .item(), rel=1e-5)
    assert sc["loss_before"].n == 4  # "x" is one token: no next-token loss
    assert sc["loss_delta"].ci_low <= sc["loss_delta"].value <= sc["loss_delta"].ci_high


def test_adapter_for_another_base_is_refused(model_dir, tmp_path):
    from sftscope.experiments.tune import load_adapter

    a = model_dir("llama")
    adapter = _save_adapter(a, tmp_path / "adapter")
    wide = model_dir("llama", hidden=48)
    with pytest.raises(SftscopeError, match="made for another base"):
        load_adapter(load_model(str(wide)), adapter, str(wide))
    gpt2 = model_dir("gpt2")
    with pytest.raises(SftscopeError, match="made for another base"):
        load_adapter(load_model(str(gpt2)), adapter, str(gpt2))
    same_shape = model_dir("llama", seed=1)
    with pytest.raises(SftscopeError, match="trained on another base"):
        load_adapter(load_model(str(same_shape)), adapter, str(same_shape))
    ok = load_adapter(load_model(str(same_shape)), adapter, str(same_shape),
                      allow_other_base=True)
    assert hasattr(ok, "peft_config")


# ------------------------------------------------------------------ CLI

def _cli(args, capsys):
    from sftscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_cli_eval_writes_files(model_dir, gsm8k_file, tmp_path, capsys):
    path = model_dir("llama")
    adapter = _save_adapter(path, tmp_path / "adapter")
    out = tmp_path / "run"
    code, cap = _cli(["eval", "--model", str(path), "--adapter", str(adapter), "--data",
                      str(gsm8k_file), "--shots", "1", "--limit", "3", "--max-new-tokens", "4",
                      "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, cap.err
    assert "flexible_extract" in cap.out
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "eval" and rec["result"]["n"] == 3 and rec["n_blocks"] == 4
    assert len((out / "predictions-gsm8k.jsonl").read_text().splitlines()) == 3


def test_cli_bad_inputs_exit_2(model_dir, gsm8k_file, tmp_path, capsys):
    path = str(model_dir("llama"))
    train = f"gsm8k:{gsm8k_file}"
    empty = tmp_path / "empty"
    empty.mkdir()
    tune = ["tune", "--model", path, "--train", train, "--out", str(tmp_path / "t")]
    cases = [
        (tune + ["--mask", "01200"], "0 and 1"),
        (tune + ["--mask", "0100", "--segments", "5"], "4 characters"),
        (tune + ["--mask", "00000"], "selects no segment"),
        (tune + ["--mask", "1111", "--rank", "0.04"], "rounds to 0"),
        (tune + ["--mask", "1111111"], "larger than the model"),
        (tune + ["--blocks", "2-9"], "does not exist"),
        (["tune", "--model", str(tmp_path / "nope"), "--train", train, "--out",
          str(tmp_path / "t"), "--mask", "01"], "does not exist"),
        (["tune", "--model", path, "--train", f"gsm8k:{tmp_path / 'no.jsonl'}", "--out",
          str(tmp_path / "t"), "--mask", "01"], "does not exist"),
        (["eval", "--model", path, "--data", str(tmp_path / "no.jsonl")], "does not exist"),
        (["eval", "--model", path, "--task", "winogrande"], "unknown --task"),
        (["eval", "--model", path, "--adapter", str(empty), "--data", str(gsm8k_file)],
         "adapter_config.json"),
    ]
    wide = model_dir("llama", hidden=48)
    adapter = _save_adapter(path, tmp_path / "adapter")
    cases.append((["eval", "--model", str(wide), "--adapter", str(adapter), "--data",
                   str(gsm8k_file)], "made for another base"))
    for args, msg in cases:
        code, cap = _cli(args, capsys)
        assert code == 2, (args, cap.err)
        lines = cap.err.strip().splitlines()
        assert lines[-1].startswith("sftscope: error:") and msg in lines[-1], (args, cap.err)
        assert "Traceback" not in cap.err


# ------------------------------------------------------------------ re-scoring saved completions

def _write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_rescore_needs_no_model(tmp_path, monkeypatch):
    import sftscope.load.models as LM

    def no(*a, **k):
        raise AssertionError("re-scoring loaded a model or tokenizer")

    monkeypatch.setattr(LM, "load_model", no)
    monkeypatch.setattr(LM, "load_tokenizer", no)
    src = _write_lines(tmp_path / "saved.jsonl", [
        {"completion": " 3 * 6 = 18\n#### 18\n\nQuestion: next?\n#### 5", "answer": "#### 18"},
        {"completion": " It is 72.0</s>#### 72", "answer": "so\n#### 72", "question": "Q2"},
        {"completion": "", "answer": "#### 1"},
    ])
    out = tmp_path / "run"
    res = E.evaluate(E.EvalConfig(task="gsm8k", rescore=str(src), out=str(out)))
    preds = _records(out / "predictions-gsm8k.jsonl")
    assert [p["index"] for p in preds] == [0, 1, 2]
    assert [p["completion"] for p in preds] == [" 3 * 6 = 18\n#### 18\n\n", " It is 72.0", ""]
    assert [(p["strict_match"], p["flexible_extract"], p["numeric_match"]) for p in preds] == \
        [(True, True, True), (False, False, True), (False, False, False)]
    assert preds[1]["question"] == "Q2" and preds[2]["flexible_extracted"] == "[invalid]"
    assert res.score("flexible_extract").value == pytest.approx(1 / 3)
    assert res.score("numeric_match").value == pytest.approx(2 / 3)
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "eval" and rec["rescored_from"] == str(src)
    assert rec["result"]["n"] == 3
    assert (out / "scores.csv").read_text().splitlines()[1].startswith("gsm8k,strict_match,")
    with pytest.raises(SftscopeError, match="needs --model"):
        E.evaluate(E.EvalConfig(task="gsm8k", data=str(src)))


def test_rescore_own_predictions_round_trip(tokenizer, gsm8k_file, tmp_path):
    recs = _records(gsm8k_file)
    mixed = {r["question"]: (f" {r['answer']}" if i % 2 else f" It is {i}.0")
             for i, r in enumerate(recs)}
    first = E.evaluate_model(_oracle(tokenizer, mixed), tokenizer, E.EvalConfig(
        model="oracle", data=str(gsm8k_file), out=str(tmp_path / "a"), shots=0, batch_size=4,
        max_new_tokens=48))
    again = E.rescore(E.EvalConfig(task="gsm8k", rescore=first.predictions_path,
                                   out=str(tmp_path / "b")))
    assert again.table().equals(first.table())
    assert _records(again.predictions_path) == _records(first.predictions_path)


@pytest.mark.parametrize("line,msg", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: is not a JSON object"),
    ({"answer": "#### 1"}, "line 2: needs 'completion'"),
    ({"completion": 5, "answer": "#### 1"}, "line 2: needs 'completion', the generated text "
                                            "(a string, got int)"),
    ({"completion": "1"}, "line 2: lacks field 'answer'"),
    ({"completion": "1", "answer": None}, "line 2: field 'answer' is null"),
])
def test_rescore_bad_lines_name_their_number(tmp_path, line, msg):
    src = _write_lines(tmp_path / "s.jsonl", [{"completion": "1", "answer": "#### 1"}, line])
    with pytest.raises(SftscopeError, match=re.escape(msg)):
        E.rescore(E.EvalConfig(task="gsm8k", rescore=str(src)))


def test_rescore_refusals(tmp_path):
    with pytest.raises(SftscopeError, match="does not generate"):
        E.rescore(E.EvalConfig(task="mmlu", rescore=str(tmp_path / "x.jsonl")))
    with pytest.raises(SftscopeError, match="does not exist"):
        E.rescore(E.EvalConfig(task="gsm8k", rescore=str(tmp_path / "x.jsonl")))
    with pytest.raises(SftscopeError, match="did you mean gsm8k"):
        E.rescore(E.EvalConfig(task="gsm8", rescore=str(tmp_path / "x.jsonl")))
    empty = _write_lines(tmp_path / "e.jsonl", [])
    with pytest.raises(SftscopeError, match="is empty"):
        E.rescore(E.EvalConfig(task="gsm8k", rescore=str(empty)))


def test_truncated_prompts_are_printed_and_in_the_report(model_dir, gsm8k_file, tmp_path,
                                                         capsys):
    """A model whose context is shorter than the prompts: eval prints how many prompts were
    cut (one line), run.json keeps the count, and the report shows it."""
    from sftscope.cli import main
    from sftscope.report import build_report

    short = model_dir("llama", max_positions=24)
    out = tmp_path / "ev"
    with pytest.raises(SystemExit) as ex:
        main(["eval", "--model", str(short), "--task", "gsm8k", "--data", str(gsm8k_file),
              "--max-new-tokens", "8", "--shots", "0", "--out", str(out)])
    assert ex.value.code == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "were truncated" in x]
    assert len(lines) == 1 and "8 of 8 prompts" in lines[0], err
    rec = json.loads((out / "run.json").read_text())
    assert "8 of 8 prompts" in json.dumps(rec)
    html = build_report([out], out=tmp_path / "r.html").read_text()
    assert "8 prompt(s) or text(s) were longer than the limit and were truncated" in html
