"""The demo corpus and the demo Base/SFT pair (quick preset: a real, small, trained pair)."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
import torch

from sftscope.demo.corpus import (
    DOC_MIX,
    FILES,
    make_corpus,
    write_corpus,
)
from sftscope.errors import SftscopeError
from sftscope.io import file_sha256
from sftscope.tasks.gsm8k import extract_flexible, extract_strict

EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}

SIZES = dict(n_pretrain=200, n_sft=150, n_test=60, n_train=40, n_general=20)


def _check_record(rec: dict) -> list[tuple[str, int, int]]:
    """Every equation is right and ``#### N`` is the last result; returns the computations."""
    assert set(rec) == {"question", "answer"}
    assert rec["question"].endswith("?")
    lines = rec["answer"].split("\n")
    assert re.fullmatch(r"#### \d+", lines[-1])
    n = int(extract_strict(rec["answer"]))
    eqs = [m for line in lines[:-1] for m in EQ.findall(line)]
    assert eqs, rec
    for a, op, b, c in eqs:
        assert OPS[op](int(a), int(b)) == int(c), rec
        if op == "/":
            assert int(a) % int(b) == 0
    assert int(eqs[-1][3]) == n
    assert 0 <= n < 100
    return [(op, int(a), int(b)) for a, op, b, _ in eqs]


def test_corpus_is_deterministic_with_gsm8k_fields_and_right_answers(tmp_path):
    c1, c2 = make_corpus(seed=3, **SIZES), make_corpus(seed=3, **SIZES)
    assert c1 == c2
    assert make_corpus(seed=4, **SIZES).gsm8k_test != c1.gsm8k_test
    assert c1.sizes() == {"pretrain": 200, "sft": 150, "gsm8k_train": 40, "gsm8k_test": 60,
                          "general": 20}
    test_keys = set()
    for rec in c1.gsm8k_test:
        test_keys |= {k for k in _check_record(rec) if k[0] in "+-"}
    train_keys = set()
    for rec in c1.sft + c1.gsm8k_train:
        train_keys |= set(_check_record(rec))
    # held out: no test question and no test addition/subtraction is seen in training
    test_q = {r["question"] for r in c1.gsm8k_test}
    assert not test_q & {r["question"] for r in c1.sft + c1.gsm8k_train}
    assert not test_keys & train_keys
    pre_eqs = {(op, int(a), int(b)) for d in c1.pretrain for a, op, b, _ in EQ.findall(d)}
    assert pre_eqs and not test_keys & pre_eqs
    assert not any("####" in d for d in c1.pretrain)  # the answer format is SFT's alone
    assert any("Question:" in d and "\nAnswer:" in d for d in c1.pretrain)
    assert all(set(r) == {"text"} and r["text"] for r in c1.general)

    paths = write_corpus(c1, tmp_path)
    assert set(paths) == set(FILES) and all(p.exists() for p in paths.values())
    test = [json.loads(line) for line in paths["gsm8k_test"].read_text().splitlines()]
    assert test == c1.gsm8k_test
    pre = [json.loads(line)["text"] for line in paths["pretrain"].read_text().splitlines()]
    assert pre == c1.pretrain


def test_max_number_bounds_every_problem():
    c = make_corpus(seed=1, max_number=30, **SIZES)
    for rec in c.sft + c.gsm8k_test + c.gsm8k_train:
        for _op, a, b in _check_record(rec):
            assert a <= 30 and b <= 30
        assert int(extract_strict(rec["answer"])) <= 30
    with pytest.raises(SftscopeError, match="max_number"):
        make_corpus(max_number=5)


def test_doc_mix_sets_the_pretraining_kinds_and_bad_mixes_are_clear_errors():
    drills = make_corpus(seed=1, doc_mix={"drill": 1.0}, **SIZES).pretrain
    assert all(EQ.fullmatch(line) for d in drills for line in d.split("\n"))
    assert make_corpus(seed=1, doc_mix=DOC_MIX, **SIZES) == make_corpus(seed=1, **SIZES)
    for bad, msg in (({"poems": 1.0}, "unknown pre-training document kind"),
                     ({"drill": -1.0, "prose": 2.0}, ">= 0"), ({"drill": 0.0}, "not all 0")):
        with pytest.raises(SftscopeError, match=msg):
            make_corpus(doc_mix=bad, **SIZES)


def test_answer_extraction():
    assert extract_strict("3 + 4 = 7.\n#### 7") == "7"
    assert extract_strict("#### 1,234") == "1234"
    assert extract_strict("The answer is 7.") is None
    assert extract_flexible("3 + 4 = 7. So 7.") == "7"
    assert extract_flexible("none") is None


def test_bad_requests_are_clear_errors(tmp_path):
    from sftscope.demo.pair import QUICK, build_demo_pair

    with pytest.raises(SftscopeError, match="family"):
        build_demo_pair(tmp_path / "a", family="gpt2")
    with pytest.raises(SftscopeError, match=">= 10 blocks"):
        build_demo_pair(tmp_path / "b", config=dataclasses.replace(QUICK, n_layers=4))
    (tmp_path / "c" / "base").mkdir(parents=True)
    with pytest.raises(SftscopeError, match="no demo manifest"):
        build_demo_pair(tmp_path / "c", quick=True)
    with pytest.raises(SftscopeError, match="n_sft"):
        make_corpus(n_sft=-1)


@pytest.fixture(scope="module")
def quick_pair(tmp_path_factory):
    from sftscope.demo.pair import build_demo_pair

    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    pair = build_demo_pair(out, quick=True)
    return pair, time.perf_counter() - t0


@pytest.mark.slow
def test_quick_pair_is_a_real_trained_pair(quick_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftscope.demo.pair import completion_loss

    pair, _ = quick_pair
    assert not pair.cached and pair.n_blocks >= 10
    for d in (pair.base_dir, pair.sft_dir):
        for f in ("config.json", "model.safetensors", "generation_config.json",
                  "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).exists(), f
    base = AutoModelForCausalLM.from_pretrained(pair.base_dir).eval()
    sft = AutoModelForCausalLM.from_pretrained(pair.sft_dir).eval()
    assert base.config.model_type == "llama" and base.config.num_hidden_layers >= 10
    tok_b = AutoTokenizer.from_pretrained(pair.base_dir)
    tok_s = AutoTokenizer.from_pretrained(pair.sft_dir)
    assert (pair.base_dir / "tokenizer.json").read_bytes() == \
        (pair.sft_dir / "tokenizer.json").read_bytes()
    text = "Question: Tom has 12 apples. How many?\nAnswer: 12 + 3 = 15\n#### 15"
    assert tok_b(text)["input_ids"] == tok_s(text)["input_ids"]
    assert tok_b.tokenize("123") == ["1", "2", "3"]  # digits split

    sb, ss = base.state_dict(), sft.state_dict()
    assert sb.keys() == ss.keys()
    changed = [k for k in sb if not torch.equal(sb[k], ss[k])]
    assert len(changed) > len(sb) // 2  # full fine-tuning moved (nearly) every tensor

    recs = [json.loads(line) for line in pair.data_files["sft"].read_text().splitlines()[:64]]
    loss_b, loss_s = completion_loss(base, tok_b, recs), completion_loss(sft, tok_b, recs)
    assert loss_s < loss_b - 0.1, (loss_b, loss_s)
    # training ran: the base learned from random init (ln(vocab) ~ 6.2), the SFT from the base
    h = pair.loss_history
    assert h["base"][-1][1] < h["base"][0][1] - 1.0
    assert h["sft"][-1][1] < h["sft"][0][1]
    assert pair.metrics["test_loss_sft"] < pair.metrics["test_loss_base"]
    # the SFT learned the answer format the base never saw (seed 0: about 0.8 against 0.0)
    assert pair.metrics["format_sft"] >= pair.metrics["format_base"] + 0.3
    man = json.loads((pair.out_dir / "manifest.json").read_text())
    assert man["command"] == "demo_pair" and man["key"] == pair.key and man["n_blocks"] >= 10


@pytest.mark.slow
def test_second_call_is_cached(quick_pair):
    from sftscope.demo.pair import build_demo_pair

    pair, _ = quick_pair
    before = file_sha256(pair.sft_dir / "model.safetensors")
    mtime = (pair.sft_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = build_demo_pair(pair.out_dir, quick=True)
    assert time.perf_counter() - t0 < 2.0
    assert again.cached and again.key == pair.key
    assert again.metrics == pair.metrics and again.base_dir == pair.base_dir
    assert (pair.sft_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert file_sha256(pair.sft_dir / "model.safetensors") == before


@pytest.mark.slow
def test_tiny_pair_is_reproducible_and_force_retrains(tmp_path):
    """Same seed, same steps: byte-identical weights; force=True trains again."""
    from sftscope.demo.pair import QUICK, build_demo_pair

    cfg = dataclasses.replace(QUICK, n_pretrain=120, n_sft=40, n_test=8, n_train=8,
                              n_general=8, base_steps=4, sft_steps=3, eval_items=2,
                              eval_new_tokens=4)
    a = build_demo_pair(tmp_path / "a", config=cfg)
    b = build_demo_pair(tmp_path / "b", config=cfg)
    for d in ("base_dir", "sft_dir"):
        assert file_sha256(getattr(a, d) / "model.safetensors") == \
            file_sha256(getattr(b, d) / "model.safetensors")
    assert build_demo_pair(tmp_path / "a", config=cfg).cached
    again = build_demo_pair(tmp_path / "a", config=cfg, force=True)
    assert not again.cached
    assert file_sha256(again.sft_dir / "model.safetensors") == \
        file_sha256(a.sft_dir / "model.safetensors")
    other = build_demo_pair(tmp_path / "a", config=cfg, seed=1)  # new settings: not the cache
    assert not other.cached and other.key != a.key
    olmo = build_demo_pair(tmp_path / "olmo", config=cfg, family="olmo2")
    assert json.loads((olmo.sft_dir / "config.json").read_text())["model_type"] == "olmo2"
    # shorter base blocks, the same tokens a step: 8 x 96 -> 16 x 48; the SFT keeps 96
    short = build_demo_pair(tmp_path / "short", config=dataclasses.replace(cfg, base_seq_len=48))
    assert short.key != a.key and short.tokens["base_trained"] == 4 * 16 * 48
    assert short.tokens["sft_trained"] == a.tokens["sft_trained"] == 3 * 8 * 96


def test_pair_is_the_same_whatever_the_machine_load(tmp_path, monkeypatch):
    """The thread count of training is fixed when it starts, never chosen from the load (a
    count adapted to the load gave two full demo runs of one commit different SFT weights and
    verdicts): a busy and an idle machine train byte-identical pairs with the same threads."""
    import os

    from sftscope.demo.pair import QUICK, build_demo_pair

    cfg = dataclasses.replace(QUICK, n_pretrain=120, n_sft=40, n_test=8, n_train=8,
                              n_general=8, base_steps=4, sft_steps=3, eval_items=2,
                              eval_new_tokens=4, threads=0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    pairs = []
    for name, load in (("idle", 0.0), ("busy", 40.0)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        pairs.append(build_demo_pair(tmp_path / name, config=cfg))
    man = [json.loads((p.base_dir.parent / "manifest.json").read_text()) for p in pairs]
    assert man[0]["torch_threads"] == man[1]["torch_threads"] == {"base": 3, "sft": 3}
    for d in ("base_dir", "sft_dir"):
        assert file_sha256(getattr(pairs[0], d) / "model.safetensors") == \
            file_sha256(getattr(pairs[1], d) / "model.safetensors")
