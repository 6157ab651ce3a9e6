"""suggest: per-segment signals (pair, angular, gradient, combined) and the mask rule."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from sftscope.errors import SftscopeError
from sftscope.experiments.suggest import (
    SuggestConfig,
    choose_segments,
    eligible_segments,
    suggest,
)

K = 5
PERTURBED = (4, 5)  # blocks of segment 2 of 5 over 10 blocks: [0,2) [2,4) [4,6) [6,8) [8,10)


@pytest.fixture(scope="module")
def pair(llama10, tokenizer, tmp_path_factory):
    """A 10-block tiny llama and an 'SFT' that differs only in the blocks of segment 2."""
    import torch
    from transformers import AutoModelForCausalLM

    base = llama10
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(f"layers.{b}." in name for b in PERTURBED):
                p.add_(p.std() * torch.randn(p.shape, generator=gen))
    sft = tmp_path_factory.mktemp("sft-seg2")
    model.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    return base, sft


@pytest.fixture()
def data(gsm8k_file):
    return f"gsm8k:{gsm8k_file}"


def _cfg(base, data, **kw) -> SuggestConfig:
    kw.setdefault("limit", 8)
    kw.setdefault("grad_samples", 8)
    return SuggestConfig(base=str(base), data=data, segments=K, device="cpu", **kw)


def test_pair_finds_the_changed_segment(pair, data, tmp_path):
    base, sft = pair
    res = suggest(_cfg(base, data, sft=str(sft), method="pair", out=str(tmp_path)))
    assert res.mask == "00100"
    assert res.method == "pair"
    sc = res.method_scores("pair").sort_values("segment")
    assert len(sc) == K
    assert int(sc["score"].to_numpy().argmax()) == 2
    # weight change is zero outside the perturbed segment
    w = res.scores[(res.scores.method == "pair") & (res.scores.signal == "weight_change")]
    assert (w[w.segment != 2]["value"] == 0).all() and float(w[w.segment == 2]["value"].iloc[0]) > 0
    assert "segment 2" in res.reason and "blocks 4-5" in res.reason
    # every score the reason cites is the table's (the issue: 0.78 printed, 0.518 in the table)
    cited = re.findall(r"scores highest \((\d\.\d\d)\)", res.reason)
    assert cited and cited[0] == f"{float(sc['score'].iloc[2]):.2f}", (res.reason, sc)
    saved = json.loads((tmp_path / "suggest.json").read_text())
    assert saved["mask"] == "00100" and saved["reason"] == res.reason
    assert (tmp_path / "suggest.csv").is_file()
    assert json.loads((tmp_path / "run.json").read_text())["command"] == "suggest"


def test_base_only_methods_and_combined(pair, data, tmp_path):
    base, _ = pair
    res = suggest(_cfg(base, data, method="auto", out=str(tmp_path)))
    assert set(res.proposals) == {"angular", "gradient", "combined"}
    assert res.method == "combined"
    for m in ("angular", "gradient", "combined"):
        sc = res.method_scores(m)
        assert sorted(sc["segment"]) == list(range(K))
        assert np.isfinite(sc["score"]).all()
        assert sc["score"].between(0, 1).all()
        mask = res.proposals[m].mask
        assert len(mask) == K and "1" in mask
        assert mask[0] == "0" and mask[-1] == "0"  # edges need an overwhelming signal
    raw = res.scores[(res.scores.method == "angular") & (res.scores.signal == "angular_distance")]
    assert (raw["value"] > 0).all() and (raw["value"] < 1).all()
    grad = res.scores[(res.scores.method == "gradient") & (res.scores.signal == "grad_norm")]
    assert (grad["value"] > 0).all()
    assert res.reason.startswith("combined:")


def test_rule_edges_extension_and_fallback():
    s = np.array([0.2, 0.5, 0.45, 0.1, 1.0])
    elig = eligible_segments(s, "angular")
    assert elig.tolist() == [False, True, True, True, False]
    segs, why = choose_segments(s, elig, max_active=2, extend=0.75)
    assert segs == [1, 2] and "joins" in why
    segs, _ = choose_segments(s, elig, max_active=1)
    assert segs == [1]
    # an overwhelming edge (>= 3x the best interior) is allowed, except the pair method's top
    s2 = np.array([0.1, 0.2, 0.3, 0.2, 1.0])
    assert eligible_segments(s2, "gradient")[-1]
    assert not eligible_segments(s2, "pair")[-1]
    assert eligible_segments(s2, "pair", edges="allow")[-1]
    assert not eligible_segments(s2, "gradient", edges="exclude")[-1]
    # top-m: not necessarily contiguous
    segs, _ = choose_segments(np.array([0, 0.9, 0.1, 0.8, 0]), np.ones(5, bool), 2, pick="top")
    assert segs == [1, 3]
    # a flat signal falls back to the segment nearest 30 % of depth, and says so
    segs, why = choose_segments(np.zeros(5), np.ones(5, bool))
    assert segs == [1] and "flat" in why


def test_bad_input(pair, data):
    base, _ = pair
    with pytest.raises(SftscopeError, match="needs --sft"):
        suggest(_cfg(base, data, method="pair"))
    with pytest.raises(SftscopeError, match="unknown --method"):
        suggest(_cfg(base, data, method="magic"))
    with pytest.raises(SftscopeError, match="larger than the model's 10 blocks"):
        suggest(SuggestConfig(base=str(base), data=data, segments=12, max_active=2,
                              method="angular", device="cpu"))


def test_cli(pair, data, tmp_path, capsys):
    from sftscope.cli import main

    base, _ = pair
    with pytest.raises(SystemExit) as e:
        main(["suggest", "--base", str(base), "--data", data, "--method", "angular",
              "--n-samples", "4", "--device", "cpu", "--out", str(tmp_path)])
    assert e.value.code == 0
    err = capsys.readouterr().err
    assert "suggested mask" in err and "reason:" in err
    with pytest.raises(SystemExit) as e:
        main(["suggest", "--base", str(base), "--data", data, "--segments", "11",
              "--method", "angular", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "larger than the model's 10 blocks" in err[0]
