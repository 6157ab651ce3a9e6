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
