"""Logit-lens probing: parity with the model's logits, hand-checked values, padding, the pair's
agreement, answer slots, and the ``probe`` command end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from sftscope.cli import main
from sftscope.errors import SftscopeError
from sftscope.experiments.lens import (
    PROBE_COLUMNS,
    Lens,
    answer_slots,
    answer_span,
    choice_slots,
    lens_logits,
    prepare_data,
    probe,
)
from sftscope.load import data as D
from sftscope.load.arch import get_blocks, get_final_norm, get_head
from sftscope.load.models import load_model, load_tokenizer
from sftscope.load.tiny import save_tiny_model, train_tokenizer
from sftscope.metrics.stats import cluster_ratio_ci, proportion_ci

LETTER_TEXT = [f"Question: What is {a} plus {b}?\nA. {a + b}\nB. {a}\nC. {b}\nD. 0\nAnswer: {x}"
               for a, b, x in [(1, 2, "A"), (3, 4, "B"), (5, 6, "C"), (7, 8, "D")]] * 6


def _enc(tok, texts):
    return tok(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family,cfg", [("llama", {}), ("gpt2", {}), ("olmo2", {}),
                                        ("gemma2", {"final_logit_softcapping": 30.0})])
def test_lens_last_layer_is_model_logits(model_dir, family, cfg):
    path = model_dir(family, **cfg)
    model = load_model(str(path))
    tok = load_tokenizer(str(path))
    enc = _enc(tok, ["Question: What is 3 plus 4?\nAnswer: 7", "The fox"])
    layers = lens_logits(model, enc["input_ids"], enc["attention_mask"])
    assert len(layers) == len(get_blocks(model)) + 1
    with torch.no_grad():
        ref = model(**enc, use_cache=False).logits.float()
    torch.testing.assert_close(layers[-1], ref, rtol=1e-6, atol=1e-6)
    if family == "gemma2":
        lens = Lens(model)
        assert lens.cap == 30.0
        assert layers[-1].abs().max() <= 30.0
    if family == "gpt2":  # tied: the head's weight is the embedding matrix, ln_f is the norm
        assert get_head(model).weight is model.get_input_embeddings().weight
        assert get_final_norm(model) is model.transformer.ln_f


def _direct(model, tok_set: D.TokenizedSet, answers):
    """Per layer (accuracy count, loss sum, n tokens, answer probs) by a plain full computation
    through ``output_hidden_states`` (j < L) and the model's own logits (j = L)."""
    n_layers = len(get_blocks(model))
    norm, head = get_final_norm(model), get_head(model)
    correct = np.zeros(n_layers + 1)
    loss = np.zeros(n_layers + 1)
    probs: list[list[float]] = [[] for _ in range(n_layers + 1)]
    n_tok = 0
    for ids, slot in zip(tok_set.input_ids, answers, strict=True):
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model(input_ids=x, output_hidden_states=True, use_cache=False)
            per_layer = [head(norm(h)) for h in out.hidden_states[:n_layers]] + [out.logits]
        n_tok += len(ids) - 1
        for j, logits in enumerate(per_layer):
            lg = logits[0, :-1].float()
            tgt = x[0, 1:]
            correct[j] += (lg.argmax(-1) == tgt).sum().item()
            loss[j] += F.cross_entropy(lg, tgt, reduction="sum").item()
            if slot is not None:  # the whole answer: the product over its tokens
                p = logits[0].float().softmax(-1)
                probs[j].append(math.prod(p[t, y].item() for t, y in
                                          zip(slot.positions, slot.targets, strict=True)))
    return correct, loss, n_tok, probs


def _value(df, layer, model, metric):
    row = df[(df.layer == layer) & (df.model == model) & (df.metric == metric)]
    assert len(row) == 1, (layer, model, metric)
    return row.iloc[0]


def test_probe_matches_direct_computation(model_dir, gsm8k_file):
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    df = probe(data=f"gsm8k:{gsm8k_file}", base=str(base), sft=str(sft), n=6, batch_size=4,
               max_length=96, n_boot=50)
    assert list(df.columns) == PROBE_COLUMNS
    tokz = load_tokenizer(str(base))
    samples, tok_set, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokz, n=6, seed=0, max_length=96,
                                       chat_template=False, text_field=None, template=None)
    answers = answer_slots(samples, tok_set, tokz)
    assert all(a is not None for a in answers)
    top1 = {}
    for label, path in (("base", base), ("sft", sft)):
        model = load_model(str(path))
        correct, loss, n_tok, probs = _direct(model, tok_set, answers)
        for j in range(len(correct)):
            acc = _value(df, j, label, "accuracy")
            assert acc.n == n_tok
            assert acc.value == pytest.approx(correct[j] / n_tok, abs=1e-12)
            assert acc.ci_low <= acc.value <= acc.ci_high
            assert _value(df, j, label, "loss").value == pytest.approx(loss[j] / n_tok, rel=1e-5)
            ap = _value(df, j, label, "answer_prob")
            assert ap.n == 6
            assert ap.value == pytest.approx(np.mean(probs[j]), rel=1e-4)
        top1[label] = [torch.stack(lens_logits(model, torch.tensor([ids])))[:, 0, :-1].argmax(-1)
                       for ids in tok_set.input_ids]
    probs = df[df.metric.isin(["accuracy", "answer_prob", "agreement"])]
    assert probs.ci_low.notna().all()
    assert ((probs.ci_low >= 0) & (probs.ci_low <= probs.ci_high) & (probs.ci_high <= 1)).all()
    n_layers = top1["base"][0].shape[0]
    for j in range(n_layers):
        same = sum(int((b[j] == s[j]).sum()) for b, s in zip(top1["base"], top1["sft"],
                                                             strict=True))
        agr = _value(df, j, "pair", "agreement")
        assert agr.value == pytest.approx(same / agr.n, abs=1e-12)


def test_hand_checkable_zero_head(tmp_path, model_dir, tokenizer, gsm8k_file):
    """A zero LM head gives uniform logits at every layer: loss = log V, answer prob = V^-m
    for an answer of m tokens, answer rank 1, and accuracy 0 (argmax is token 0, the pad
    token, never a target)."""
    model = load_model(str(model_dir("llama")))
    with torch.no_grad():
        get_head(model).weight.zero_()
    path = tmp_path / "zero"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    df = probe(data=f"gsm8k:{gsm8k_file}", model=str(path), n=4, batch_size=2, n_boot=20)
    vocab = len(tokenizer)
    assert set(df.model) == {"zero"}
    assert sorted(df.layer.unique()) == list(range(len(get_blocks(model)) + 1))
    samples, ts, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokenizer, n=4, seed=0,
                                  max_length=512, chat_template=False, text_field=None,
                                  template=None)
    sizes = [len(a.targets) for a in answer_slots(samples, ts, tokenizer)]
    assert max(sizes) == 2  # the final numbers 7, 19, 10, 8...: one or two digit tokens
    prob = float(np.mean([vocab ** -m for m in sizes]))
    for metric, expected in (("loss", math.log(vocab)), ("answer_prob", prob),
                             ("answer_rank", 1.0), ("accuracy", 0.0)):
        vals = df[df.metric == metric].value.to_numpy()
        np.testing.assert_allclose(vals, expected, rtol=1e-5, atol=1e-7)


def test_padding_invariance_and_self_agreement(model_dir, gsm8k_file):
    path = str(model_dir("olmo2"))
    kw = dict(data=f"gsm8k:{gsm8k_file}", n=8, max_length=64, n_boot=20)
    one = probe(model=path, batch_size=1, **kw)
    four = probe(model=path, batch_size=4, **kw)
    pd.testing.assert_frame_equal(one[["layer", "model", "metric", "n"]],
                                  four[["layer", "model", "metric", "n"]])
    acc = one.metric == "accuracy"
    np.testing.assert_array_equal(one[acc].value, four[acc].value)
    np.testing.assert_allclose(one.value, four.value, rtol=1e-4, atol=1e-6)
    pair = probe(base=path, sft=path, batch_size=3, **kw)
    agr = pair[pair.metric == "agreement"]
    assert (agr.model == "pair").all() and np.all(agr.value == 1.0)
    b = pair[pair.model == "base"].reset_index(drop=True)
    s = pair[pair.model == "sft"].reset_index(drop=True)
    np.testing.assert_array_equal(b.value, s.value)


def test_answer_and_choice_slots(tmp_path):
    tok = train_tokenizer(LETTER_TEXT)
    for c in "ABCD":
        assert len(tok(" " + c)["input_ids"]) == 1
    rows = [{"question": "What is 3 plus 4?", "choices": ["7", "3", "4", "0"], "answer": 0},
            {"question": "What is 5 plus 6?", "choices": ["5", "11", "6", "0"], "answer": 1}]
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("\n".join(json.dumps(r) for r in rows))
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "What is 3 plus 4?", "answer": "3+4=7\n#### 17"}))
    samples, ts, _ = prepare_data(f"mmlu:{mmlu}", tok, n=None, seed=0, max_length=128,
                                  chat_template=False, text_field=None, template=None)
    slots = answer_slots(samples, ts, tok)
    choices, n_amb = choice_slots(samples, ts, tok)
    assert n_amb == 0
    for s, ids, plen, slot, ch in zip(samples, ts.input_ids, ts.prompt_lengths, slots, choices,
                                      strict=True):
        assert slot.position == plen - 1 and tok.decode([slot.target]) == " " + s.meta["letter"]
        assert ids[plen] == slot.target
        assert [tok.decode([t]) for t in ch.candidates] == [" A", " B", " C", " D"]
        assert "ABCD"[ch.correct] == s.meta["letter"]
    samples, ts, _ = prepare_data(f"gsm8k:{gsm}", tok, n=None, seed=0, max_length=128,
                                  chat_template=False, text_field=None, template=None)
    (slot,) = answer_slots(samples, ts, tok)
    # Chain of thought: the FINAL answer after ####, teacher-forced given the prompt and the
    # reasoning up to "#### " (not the token after "Answer:", which starts the reasoning).
    ids = ts.input_ids[0]
    assert slot.position > ts.prompt_lengths[0]
    assert tok.decode(ids[:slot.position + 1]).endswith("7\n#### ")
    assert tok.decode(list(slot.targets)) == "17" and tok.decode([slot.target]) == "1"
    for t, y in zip(slot.positions, slot.targets, strict=True):
        assert ids[t + 1] == y  # the answer tokens are the text's own next tokens
    assert slot.positions == tuple(range(slot.position, slot.position + len(slot.targets)))


def test_answer_span_letter_final_answer_free_text():
    """The answer span: GSM8K's final answer after the last #### (not the reasoning, which
    also holds the number), the MMLU letter after the prompt, a free text's first token."""
    s = D.Sample("Q: 2+2?\nAnswer: 2+2=4. Check: 4\n#### 4", "Q: 2+2?\nAnswer:",
                 " 2+2=4. Check: 4\n#### 4", {"target": "4"})
    start, end, whole = answer_span(s, s.text, s.prompt)
    assert s.text[start:end] == " 4" and s.text[:start].endswith("####") and whole
    mmlu = D.Sample("Q?\nAnswer: B", "Q?\nAnswer:", " B", {"letter": "B"})
    assert answer_span(mmlu, mmlu.text, mmlu.prompt) == (len(mmlu.prompt), len(mmlu.text), True)
    free = D.Sample("Q? Some answer", "Q?", " Some answer")
    assert answer_span(free, free.text, free.prompt) == (2, len(free.text), False)
    assert answer_span(D.Sample("plain text"), "plain text", None) is None


def test_choice_accuracy_matches_direct(tmp_path):
    tok = train_tokenizer(LETTER_TEXT)
    path = save_tiny_model(tmp_path / "m", "llama", seed=3, tokenizer=tok)
    rows = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a), str(b), "0"],
             "answer": i % 4} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8),
                                                           (2, 2), (9, 1)])]
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("\n".join(json.dumps(r) for r in rows))
    df = probe(data=f"mmlu:{mmlu}", model=str(path), n=None, batch_size=4, n_boot=20)
    model = load_model(str(path))
    samples, ts, _ = prepare_data(f"mmlu:{mmlu}", tok, n=None, seed=0, max_length=512,
                                  chat_template=False, text_field=None, template=None)
    choices, _ = choice_slots(samples, ts, tok)
    n_layers = len(get_blocks(model))
    hits = 0
    for ids, ch in zip(ts.input_ids, choices, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, ch.position]
        hits += int(int(logits[list(ch.candidates)].argmax()) == ch.correct)
    row = _value(df, n_layers, "m", "choice_accuracy")
    assert row.n == len(rows) and row.value == pytest.approx(hits / len(rows))
    # MMLU keeps scoring the letter right after the prompt; --tokens answer scores just it
    ans = probe(data=f"mmlu:{mmlu}", model=str(path), n=None, batch_size=4, n_boot=20,
                tokens="answer")
    assert _value(ans, n_layers, "m", "choice_accuracy").value == row.value
    assert _value(ans, n_layers, "m", "accuracy").n == len(rows)
    slots = answer_slots(samples, ts, tok)
    assert all(a.positions == (ch.position,) for a, ch in zip(slots, choices, strict=True))
    for metric in ("answer_prob", "answer_rank"):
        np.testing.assert_allclose(ans[ans.metric == metric].value,
                                   df[df.metric == metric].value, rtol=1e-6)


def _cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (model saving)
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_probe_cli_end_to_end(tmp_path, model_dir, gsm8k_file, capsys):
    out = tmp_path / "run"
    code, _ = _cli(["probe", "--base", str(model_dir("gpt2")), "--sft",
                    str(model_dir("gpt2", seed=1)), "--data", f"gsm8k:{gsm8k_file}",
                    "--out", str(out), "--n", "5", "--batch-size", "2", "--max-length", "160",
                    "--bootstrap", "20"], capsys)
    assert code == 0
    df = pd.read_csv(out / "probe.csv")
    assert list(df.columns) == PROBE_COLUMNS
    assert set(df.model) == {"base", "sft", "pair"}
    assert {"accuracy", "loss", "answer_prob", "answer_rank", "agreement"} <= set(df.metric)
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "probe" and run["n_blocks"] == 4
    assert sorted(df.layer.unique()) == list(range(5))


@pytest.mark.parametrize("case", ["missing", "both", "neither", "empty", "no_text"])
def test_probe_bad_input_one_line(tmp_path, model_dir, gsm8k_file, capsys, case):
    path = str(model_dir("llama"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    data = f"gsm8k:{gsm8k_file}"
    args = {"missing": ["--model", str(tmp_path / "nope"), "--data", data],
            "both": ["--model", path, "--base", path, "--sft", path, "--data", data],
            "neither": ["--data", data],
            "empty": ["--model", path, "--data", str(empty)],
            "no_text": ["--model", path, "--data", str(gsm8k_file)]}[case]
    code, cap = _cli(["probe", *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftscope: error:"), cap.err
    assert "Traceback" not in cap.err
    assert not (tmp_path / "o" / "probe.csv").exists()


def test_api_errors(model_dir, gsm8k_file):
    with pytest.raises(SftscopeError, match="--batch-size"):
        probe(model=str(model_dir("llama")), data=f"gsm8k:{gsm8k_file}", batch_size=0)
    with pytest.raises(SftscopeError, match="--n-samples"):
        probe(model=str(model_dir("llama")), data=f"gsm8k:{gsm8k_file}", n=0)


def test_chunked_lens_equals_unchunked(model_dir, gsm8k_file):
    path = str(model_dir("llama"))
    kw = dict(model=path, data=f"gsm8k:{gsm8k_file}", n=4, batch_size=4, n_boot=20)
    big = probe(**kw)
    small = probe(chunk_elements=1, **kw)  # one row per chunk
    np.testing.assert_allclose(big.value, small.value, rtol=1e-5, atol=1e-7)



def _answer_direct(model, tok_set: D.TokenizedSet, answers):
    """Per layer: correct count, loss sum and top-1 ids at the answer tokens only, and the
    first answer token's rank, by a plain full computation."""
    n_layers = len(get_blocks(model))
    norm, head = get_final_norm(model), get_head(model)
    correct, loss = np.zeros(n_layers + 1), np.zeros(n_layers + 1)
    ranks: list[list[float]] = [[] for _ in range(n_layers + 1)]
    top1: list[list[int]] = [[] for _ in range(n_layers + 1)]
    for ids, slot in zip(tok_set.input_ids, answers, strict=True):
        if slot is None:
            continue
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
            per_layer = [head(norm(h)) for h in out.hidden_states[:n_layers]] + [out.logits]
        pos, tgt = list(slot.positions), torch.tensor(slot.targets)
        for j, logits in enumerate(per_layer):
            lg = logits[0, pos].float()
            correct[j] += (lg.argmax(-1) == tgt).sum().item()
            loss[j] += F.cross_entropy(lg, tgt, reduction="sum").item()
            ranks[j].append(float((lg[0] > lg[0, tgt[0]]).sum().item() + 1))
            top1[j] += lg.argmax(-1).tolist()
    return correct, loss, ranks, top1


def test_answer_tokens_match_direct(model_dir, gsm8k_file):
    """--tokens answer: accuracy, loss and agreement over the final answers' tokens only, the
    same numbers as a direct computation; the answer metrics equal those of --tokens all."""
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    kw = dict(data=f"gsm8k:{gsm8k_file}", base=str(base), sft=str(sft), n=6, batch_size=4,
              max_length=96, n_boot=50)
    ans = probe(tokens="answer", **kw)
    full = probe(**kw)
    tokz = load_tokenizer(str(base))
    samples, tok_set, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokz, n=6, seed=0, max_length=96,
                                       chat_template=False, text_field=None, template=None)
    answers = answer_slots(samples, tok_set, tokz)
    n_ans = sum(len(a.targets) for a in answers)
    top1 = {}
    for label, path in (("base", base), ("sft", sft)):
        correct, loss, ranks, top1[label] = _answer_direct(load_model(str(path)), tok_set,
                                                          answers)
        for j in range(len(correct)):
            acc = _value(ans, j, label, "accuracy")
            assert acc.n == n_ans and acc.value == pytest.approx(correct[j] / n_ans, abs=1e-12)
            assert _value(ans, j, label, "loss").value == pytest.approx(loss[j] / n_ans,
                                                                          rel=1e-5)
            assert _value(ans, j, label, "answer_rank").value == pytest.approx(np.mean(ranks[j]))
            for metric in ("answer_prob", "answer_rank"):
                assert _value(ans, j, label, metric).value == pytest.approx(
                    _value(full, j, label, metric).value, rel=1e-6)
    for j in range(len(top1["base"])):
        same = sum(int(b == s) for b, s in zip(top1["base"][j], top1["sft"][j], strict=True))
        agr = _value(ans, j, "pair", "agreement")
        assert agr.n == n_ans and agr.value == pytest.approx(same / n_ans, abs=1e-12)


def test_lens_projects_only_scored_positions(model_dir, gsm8k_file, monkeypatch):
    """The head sees exactly the scored positions: with --tokens answer, the answer tokens of
    each layer (not every position); with --tokens all, every real next-token position."""
    seen: list[int] = []
    real = Lens.__call__

    def counting(self, h):
        seen.append(int(h.shape[0]))
        return real(self, h)

    monkeypatch.setattr(Lens, "__call__", counting)
    path = model_dir("llama")
    kw = dict(model=str(path), data=f"gsm8k:{gsm8k_file}", n=8, batch_size=3, max_length=96,
              n_boot=0)
    tokz = load_tokenizer(str(path))
    samples, ts, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokz, n=8, seed=0, max_length=96,
                                  chat_template=False, text_field=None, template=None)
    n_states = len(get_blocks(load_model(str(path)))) + 1
    n_ans = sum(len(a.targets) for a in answer_slots(samples, ts, tokz))
    probe(tokens="answer", **kw)
    assert sum(seen) == n_states * n_ans
    seen.clear()
    df = probe(**kw)
    assert sum(seen) == n_states * sum(len(i) - 1 for i in ts.input_ids)
    assert df[["ci_low", "ci_high"]].isna().all().all()  # --bootstrap 0: no interval


def test_tokens_answer_needs_answers(model_dir, tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"plain text number {i}"}) for i in range(3)))
    with pytest.raises(SftscopeError, match="--tokens answer"):
        probe(model=str(model_dir("llama")), data=str(texts), tokens="answer")


def _coverage(n_data: int = 500, n: int = 60, n_boot: int = 400) -> tuple[float, float]:
    """Share of ``n_data`` simulated datasets whose 95 % interval covers the true ratio, for
    the sample-level bootstrap and for the token Wilson interval. Population: each sample has
    its own accuracy p ~ Beta(0.6, 0.9) (samples differ a lot) and 20..200 tokens, each right
    with probability p; the true token accuracy is E[p] = 0.4."""
    rng = np.random.default_rng(0)
    true = 0.6 / 1.5
    hit_boot = hit_wilson = 0
    for d in range(n_data):
        t = rng.integers(20, 201, size=n)
        k = rng.binomial(t, rng.beta(0.6, 0.9, size=n))
        lo, hi = cluster_ratio_ci(k, t, n_boot=n_boot, seed=d)
        hit_boot += lo <= true <= hi
        lo, hi = proportion_ci(int(k.sum()), int(t.sum()))
        hit_wilson += lo <= true <= hi
    return hit_boot / n_data, hit_wilson / n_data


def test_cluster_bootstrap_coverage_on_clustered_data():
    """Tokens of one sample are not independent: over 500 simulated datasets the sample-level
    bootstrap covers the true accuracy about 95 % of the time, the token Wilson interval (as if
    tokens were independent) far less often (about 21 % here)."""
    boot, wilson = _coverage()
    print(f"coverage of the 95 % interval: cluster bootstrap {boot:.3f}, token Wilson "
          f"{wilson:.3f}")
    assert 0.91 <= boot <= 0.98
    assert wilson < 0.4


def test_cluster_bootstrap_bounds_seed_and_degenerate_cases():
    rng = np.random.default_rng(1)
    t = rng.integers(1, 50, size=30).astype(float)
    for k in (np.zeros(30), t.copy(), np.floor(t * rng.random(30))):
        lo, hi = cluster_ratio_ci(k, t, n_boot=200, bounds=(0.0, 1.0))
        assert 0.0 <= lo <= hi <= 1.0
    tiny = rng.random((30, 3)) * 1e-9  # per-sample probabilities near 0: a t interval goes < 0
    lo, hi = cluster_ratio_ci(tiny, np.ones(30), n_boot=200, bounds=(0.0, 1.0))
    assert lo.shape == (3,) and (lo >= 0).all() and (hi <= 1).all() and (lo <= hi).all()
    k = np.floor(t * rng.random(30))
    assert cluster_ratio_ci(k, t, seed=3) == cluster_ratio_ci(k, t, seed=3)
    assert cluster_ratio_ci(k, t, seed=3) != cluster_ratio_ci(k, t, seed=4)
    # each column of a matrix gets the interval it would get alone (the same resamples)
    two = cluster_ratio_ci(np.stack([k, t - k], 1), t, n_boot=300, seed=2)
    assert (two[0][0], two[1][0]) == cluster_ratio_ci(k, t, n_boot=300, seed=2)
    assert all(math.isnan(x) for x in cluster_ratio_ci(k, t, n_boot=0))
    assert all(math.isnan(x) for x in cluster_ratio_ci(k[:1], t[:1]))
    # samples without tokens carry nothing
    assert cluster_ratio_ci(np.r_[k, 0.0], np.r_[t, 0.0], seed=5) == \
        cluster_ratio_ci(k, t, seed=5)


@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_top1_examples_match_the_lens(model_dir, gsm8k_file, tmp_path, tokens):
    """top1.csv: for the first N samples, each model's lens top-1 at every layer, at the
    position predicting the answer's first token, equal to the argmax of ``lens_logits``."""
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    out = tmp_path / "p"
    df = probe(data=f"gsm8k:{gsm8k_file}", base=str(base), sft=str(sft), n=5, batch_size=2,
               max_length=96, n_boot=0, tokens=tokens, top1_examples=3, out=str(out))
    top = pd.read_csv(out / "top1.csv", keep_default_na=False)
    n_states = int(df["layer"].max()) + 1
    assert len(top) == 2 * 3 * n_states
    assert list(top["model"].unique()) == ["base", "sft"]
    assert set(top["sample"]) == {0, 1, 2}
    mem = df.attrs["top1"]  # the same table in memory (a notebook, or no --out)
    assert mem[["model", "sample", "layer", "token_id"]].values.tolist() == \
        top[["model", "sample", "layer", "token_id"]].values.tolist()
    tokz = load_tokenizer(str(base))
    samples, tok_set, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokz, n=5, seed=0, max_length=96,
                                       chat_template=False, text_field=None, template=None)
    answers = answer_slots(samples, tok_set, tokz)
    for label, path in (("base", base), ("sft", sft)):
        model = load_model(str(path))
        for i in range(3):
            rows = top[(top["model"] == label) & (top["sample"] == i)].sort_values("layer")
            assert set(rows["position"]) == {answers[i].position}
            ids = torch.tensor([tok_set.input_ids[i]])
            want = torch.stack(lens_logits(model, ids))[:, 0, answers[i].position].argmax(-1)
            assert rows["token_id"].tolist() == want.tolist()
            assert set(rows["target_id"]) == {tok_set.input_ids[i][answers[i].position + 1]}
            assert (rows["correct"] == (rows["token_id"] == rows["target_id"])).all()
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["top1_examples"] == 3


def test_arc_choices_scored_by_probe_and_eval(tmp_path):
    """An ARC task (answer texts, not letters): probe scores every item's options by their
    first token after the prompt, and eval scores the same file."""
    from sftscope.experiments import evaluate as E

    words = ["apple", "river", "stone", "cloud"]
    text = [f"Question: Which word is number {i}?\nAnswer: {w}" for i, w in enumerate(words)]
    tok = train_tokenizer(text * 6)
    path = save_tiny_model(tmp_path / "m", "llama", seed=3, tokenizer=tok)
    rows = [{"id": f"q{i}", "question": f"Which word is number {i}?",
             "choices": {"text": words, "label": list("ABCD")}, "answerKey": "ABCD"[i % 4]}
            for i in range(6)]
    arc = tmp_path / "arc.jsonl"
    arc.write_text("\n".join(json.dumps(r) for r in rows))
    samples, ts, _ = prepare_data(f"arc_easy:{arc}", tok, n=None, seed=0, max_length=512,
                                  chat_template=False, text_field=None, template=None)
    choices, n_amb = choice_slots(samples, ts, tok)
    assert n_amb == 0 and all(ch is not None for ch in choices)
    for s, ch in zip(samples, choices, strict=True):
        assert [tok.decode([t]).strip() for t in ch.candidates] == words
        assert words[ch.correct] == s.answer.strip()
    model = load_model(str(path))
    hits = 0
    for ids, ch in zip(ts.input_ids, choices, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, ch.position]
        hits += int(int(logits[list(ch.candidates)].argmax()) == ch.correct)
    df = probe(data=f"arc_easy:{arc}", model=str(path), n=None, batch_size=4, n_boot=0)
    row = _value(df, len(get_blocks(model)), "m", "choice_accuracy")
    assert row.n == len(rows) and row.value == pytest.approx(hits / len(rows))
    assert _value(df, len(get_blocks(model)), "m", "answer_prob").n == len(rows)
    res = E.evaluate_model(model, tok, E.EvalConfig(model=str(path), task="arc_easy",
                                                    data=str(arc), batch_size=3))
    assert res.n == len(rows) and {"accuracy", "accuracy_norm"} <= set(res.table().metric)
