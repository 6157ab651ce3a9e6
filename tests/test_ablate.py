"""``sftscope ablate``: an identity block changes nothing, zero ablation equals a model whose
block is the identity, mean updates equal a direct computation, reverting an unchanged block of
a pair changes nothing, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sftscope.cli import main
from sftscope.experiments.ablate import ablate, mean_updates
from sftscope.experiments.lens import hidden_states, prepare_data, probe
from sftscope.load.arch import get_blocks
from sftscope.load.models import load_model, load_tokenizer
from sftscope.load.runtime import pad_id

IDENTITY = 2


def _identity_block(model, b: int) -> None:
    """Zero the block's attention output and MLP down projection: a llama block then adds
    exactly nothing to the residual stream."""
    block = get_blocks(model)[b]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.fixture(scope="module")
def identity_model(model_dir, tmp_path_factory):
    base = model_dir("llama", seed=0)
    model = load_model(str(base))
    _identity_block(model, IDENTITY)
    out = tmp_path_factory.mktemp("identity") / "m"
    model.save_pretrained(out)
    load_tokenizer(str(base)).save_pretrained(out)
    return out


def _unit(df, unit, metric):
    return df[(df.unit == unit) & (df.metric == metric)].iloc[0]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablating_an_identity_block_changes_nothing(identity_model, gsm8k_file, mode):
    df = ablate(model=str(identity_model), data=f"gsm8k:{gsm8k_file}", n=6, batch_size=4,
                max_length=96, n_boot=50, mode=mode)
    for metric in ("delta_accuracy", "delta_loss"):
        assert _unit(df, f"b{IDENTITY}", metric).value == 0.0
    for metric in ("accuracy", "loss"):
        assert _unit(df, f"b{IDENTITY}", metric).value == _unit(df, "none", metric).value
    others = df[(df.metric == "delta_loss") & (df.unit != f"b{IDENTITY}")]
    assert (others.value != 0).all()  # the other blocks do something
    assert set(df.unit) == {"none", "b0", "b1", "b2", "b3"}


def test_zero_ablation_equals_an_identity_block(model_dir, identity_model, gsm8k_file):
    kw = dict(data=f"gsm8k:{gsm8k_file}", n=6, batch_size=4, max_length=96, n_boot=0)
    df = ablate(model=str(model_dir("llama", seed=0)), **kw)
    direct = probe(model=str(identity_model), **kw)
    top = direct.layer.max()
    for metric in ("accuracy", "loss"):
        want = direct[(direct.layer == top) & (direct.metric == metric)].value.item()
        assert _unit(df, f"b{IDENTITY}", metric).value == pytest.approx(want, rel=1e-6)


def test_mean_updates_equal_direct_computation(model_dir, gsm8k_file):
    path = str(model_dir("llama", seed=0))
    model, tokz = load_model(path), load_tokenizer(path)
    _, tok, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokz, n=5, seed=0, max_length=64,
                             chat_template=False, text_field=None, template=None)
    got = mean_updates(model, tok, pad_id(tokz), batch_size=3)
    states = [hidden_states(model, torch.tensor([ids])) for ids in tok.input_ids]
    for b in range(len(get_blocks(model))):
        diffs = torch.cat([(s[b + 1][0] - s[b][0]).double() for s in states])
        torch.testing.assert_close(got[b], diffs.mean(0), rtol=1e-5, atol=1e-6)


def test_revert_in_a_pair_and_cli(model_dir, gsm8k_file, tmp_path):
    base = model_dir("llama", seed=0)
    model = load_model(str(base))
    with torch.no_grad():  # the SFT differs from the base in block 3 only
        for p in get_blocks(model)[3].parameters():
            p.add_(0.3)
    sft = tmp_path / "sft"
    model.save_pretrained(sft)
    load_tokenizer(str(base)).save_pretrained(sft)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["ablate", "--base", str(base), "--sft", str(sft), "--data",
              f"gsm8k:{gsm8k_file}", "--limit", "4", "--bootstrap", "20", "--out", str(out)])
    assert e.value.code == 0
    df = pd.read_csv(out / "ablate.csv")
    assert set(df["mode"]) == {"revert"}
    for b in range(3):  # unchanged blocks: reverting them changes nothing
        assert _unit(df, f"b{b}", "delta_loss").value == 0.0
    assert _unit(df, "b3", "delta_loss").value != 0.0
    record = json.loads((out / "run.json").read_text())
    assert record["mode"] == "revert" and len(record["units"]) == 4
    segs = ablate(model=str(base), data=f"gsm8k:{gsm8k_file}", n=4, n_boot=0, segments=2)
    assert list(dict.fromkeys(segs[segs.unit != "none"].blocks)) == ["0-1", "2-3"]
    d = segs[segs.metric == "delta_loss"]
    assert np.isnan(d.ci_low).all()  # --bootstrap 0: no interval, never a made-up one


def test_spearman_ci_known_values():
    from sftscope.metrics.stats import spearman_ci

    rho, lo, hi = spearman_ci([1, 2, 3, 4, 5], [10, 20, 30, 40, 50], n_boot=200)
    assert rho == 1.0 and lo == 1.0 and hi == 1.0
    assert spearman_ci([1, 2, 3, 4], [4, 3, 2, 1], n_boot=0)[0] == -1.0
    assert np.isnan(spearman_ci([1, 1, 1, 1], [1, 2, 3, 4])[0])  # a constant side
    rho, _, _ = spearman_ci([1, 2, 3, 4], [1, 3, 2, 4], n_boot=0)
    assert rho == pytest.approx(0.8)


def _tables(cause, weight):
    ab = pd.DataFrame({"unit": [f"b{b}" for b in range(len(cause))],
                       "blocks": [str(b) for b in range(len(cause))], "metric": "delta_loss",
                       "value": cause})
    w = pd.DataFrame({"block": range(len(weight)), "module": "total", "metric": "relative",
                      "value": weight})
    cka = pd.DataFrame({"layer": range(len(cause) + 1), "model": "pair", "metric": "cka",
                        "value": 1 - np.concatenate([[0], np.cumsum(cause)])})
    return {"ablate": ab, "weights": w, "metrics": cka}


def test_signal_cause_numbers_and_findings():
    from sftscope.report import numbers as N
    from sftscope.report.sections import signal_cause_findings

    data = N.signal_cause_data(_tables([0.1, 0.5, 0.2, 0.9, 0.3], [1, 2, 5, 4, 3]), 5, "revert")
    s = data.summary.set_index("signal")
    assert s.loc["cka_drop", "rho"] == pytest.approx(1.0)  # the drop is the cause itself
    assert s.loc["weight_change", "rho"] == pytest.approx(0.3)
    lines = signal_cause_findings(data)
    assert "cka drop 1.00 [1.00, 1.00] over 5 blocks" in lines[0]
    assert "reverted to the base" in lines[0]
    assert lines[1].startswith("Highest: cka drop (rho 1.00); its interval lies above 0.")
    flat = N.signal_cause_data(_tables([0.1, 0.5, 0.2], [3, 1, 2]), 3, "zero")
    flat.summary = flat.summary[flat.summary.signal == "weight_change"]
    assert "includes 0" in signal_cause_findings(flat)[1]


def test_report_shows_signal_against_cause(model_dir, gsm8k_file, tmp_path):
    from sftscope.report import build_report

    base = model_dir("llama", seed=0)
    model = load_model(str(base))
    with torch.no_grad():
        for b, scale in ((1, 0.05), (3, 0.4)):
            for p in get_blocks(model)[b].parameters():
                p.add_(scale)
    sft = tmp_path / "sft"
    model.save_pretrained(sft)
    load_tokenizer(str(base)).save_pretrained(sft)
    for argv in (["ablate", "--base", str(base), "--sft", str(sft), "--data",
                  f"gsm8k:{gsm8k_file}", "--limit", "4", "--bootstrap", "0", "--out",
                  str(tmp_path / "ab")],
                 ["weights", "--base", str(base), "--sft", str(sft), "--no-low-rank", "--out",
                  str(tmp_path / "w")]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    html = build_report([tmp_path / "ab", tmp_path / "w"],
                        out=tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Which signal predicts the cause? (Fig. 12)" in html
    assert "weight change" in html and "over 4 blocks" in html
    assert (tmp_path / "figures" / "fig12_signal_cause.png").is_file()


def test_one_model_or_pair_check_shared_with_probe(model_dir):
    """ablate and probe take --model or --base and --sft through one check, with their own
    exact messages (probe alone lets --base go with an adapter --model)."""
    from sftscope.config.commands import AblateConfig, ProbeConfig
    from sftscope.errors import SftscopeError

    m = str(model_dir("llama"))
    both = "give either --model, or --base and --sft, not both"
    for cls, extra in ((AblateConfig, ""),
                       (ProbeConfig, " (--base goes with --model only when --model is an "
                                     "adapter)")):
        with pytest.raises(SftscopeError) as e:
            cls(model=m, base=m, data="gsm8k")
        assert str(e.value) == both + extra
        with pytest.raises(SftscopeError) as e:
            cls(sft=m, data="gsm8k")
        assert str(e.value) == "give --model, or both --base and --sft"
        assert cls(model=m, data="gsm8k").model == m
