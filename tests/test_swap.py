"""Layer swapping: module surgery (full swap = the other model, empty swap = the original,
restoration bit-identical), the ``swap`` experiment's table, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sftscope.cli import main
from sftscope.errors import SftscopeError
from sftscope.experiments.swap import (
    ITEM_COLUMNS,
    SWAP_COLUMNS,
    check_swappable,
    swap,
    swapped,
)
from sftscope.load.arch import get_blocks, get_final_norm, get_head
from sftscope.load.models import load_model
from sftscope.load.tiny import build_tiny_model
from sftscope.segments import masks_from_text


@pytest.fixture(scope="module")
def pair(letter_pair):
    """The shared letter pair (conftest): base, sft, MMLU file, tokenizer."""
    return letter_pair


def _logits(model, tok):
    enc = tok(["Question: What is 3 plus 4?\nAnswer: A", "The fox"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        return model(**enc, use_cache=False).logits


def test_full_swap_is_the_other_model_and_restores(pair):
    base_dir, sft_dir, _, tok = pair
    base, sft = load_model(str(base_dir)), load_model(str(sft_dir))
    ref_b, ref_s = _logits(base, tok), _logits(sft, tok)
    assert not torch.equal(ref_b, ref_s)
    originals = list(get_blocks(base)), get_final_norm(base), get_head(base)
    every = range(len(get_blocks(base)))
    with swapped(base, sft, every, head=True) as hybrid:
        assert hybrid is base
        assert torch.equal(_logits(hybrid, tok), ref_s)
    with swapped(sft, base, every, head=True):
        assert torch.equal(_logits(sft, tok), ref_b)
    with swapped(base, sft, []):  # swapping nothing: the original
        assert torch.equal(_logits(base, tok), ref_b)
    with swapped(base, sft, every):  # blocks only: neither original
        out = _logits(base, tok)
        assert not torch.equal(out, ref_b) and not torch.equal(out, ref_s)
    with pytest.raises(RuntimeError, match="boom"), swapped(base, sft, [1, 2], head=True):
        raise RuntimeError("boom")
    assert list(get_blocks(base)) == originals[0]
    assert get_final_norm(base) is originals[1] and get_head(base) is originals[2]
    assert torch.equal(_logits(base, tok), ref_b)
    assert torch.equal(_logits(sft, tok), ref_s)


def test_tied_head_swap_gpt2(model_dir, tokenizer):
    base, sft = load_model(str(model_dir("gpt2"))), load_model(str(model_dir("gpt2", seed=1)))
    ref = _logits(base, tokenizer)
    emb = base.get_input_embeddings().weight.clone()
    with swapped(base, sft, [0, 1, 2, 3], head=True):
        assert get_head(base) is get_head(sft)
        assert get_final_norm(base) is sft.transformer.ln_f
        # The host keeps its embeddings; the head (tied to the SFT's embeddings) is the SFT's.
        assert torch.equal(base.get_input_embeddings().weight, emb)
        _logits(base, tokenizer)
    assert get_head(base).weight is base.get_input_embeddings().weight
    assert torch.equal(_logits(base, tokenizer), ref)


def test_device_mismatch_refused(tokenizer):
    host = build_tiny_model("llama", len(tokenizer), seed=0)
    donor = build_tiny_model("llama", len(tokenizer), seed=1)
    get_blocks(donor)[1].to("meta")
    with pytest.raises(SftscopeError, match="block 1 of donor is on meta"), \
            swapped(host, donor, [1]):
        pass
    assert get_blocks(host)[1] is not get_blocks(donor)[1]
    with swapped(host, donor, [0]):  # other blocks are fine
        pass


def test_check_swappable_refuses_other_shapes(tokenizer):
    a = build_tiny_model("llama", len(tokenizer), seed=0)
    b = build_tiny_model("llama", len(tokenizer), seed=0, intermediate=48)
    with pytest.raises(SftscopeError, match="block 0 differs"):
        check_swappable(a, b)
    c = build_tiny_model("qwen2", len(tokenizer), seed=0)
    with pytest.raises(SftscopeError, match="cannot be swapped"):
        check_swappable(a, c)


def test_swap_table(pair, tmp_path):
    base_dir, sft_dir, mmlu, _ = pair
    out = tmp_path / "run"
    df = swap(base=str(base_dir), sft=str(sft_dir), data=f"mmlu:{mmlu}", out=out, segments=2,
              masks="11", head="sft", n=None, batch_size=4, n_boot=20)
    assert list(df.columns) == SWAP_COLUMNS
    assert set(df.metric) == {"accuracy", "loss", "perplexity", "choice_accuracy"}
    configs = ["base", "sft", "base<-sft[00]", "base<-sft[10]", "base<-sft[01]",
               "base<-sft[11]", "sft<-base[10]", "sft<-base[01]", "sft<-base[11]"]
    assert list(dict.fromkeys(df.config)) == configs
    assert set(df[df.config.str.contains("<-")]["head"]) == {"sft"}
    assert set(df[df.config == "base"]["head"]) == {"base"}

    def vals(config):
        return df[df.config == config].set_index("metric")[["value", "ci_low", "ci_high", "n"]]

    # Every segment of SFT (with the SFT head) on the base = the SFT model (shared embeddings).
    pd.testing.assert_frame_equal(vals("base<-sft[11]"), vals("sft"))
    assert not vals("base<-sft[10]").equals(vals("sft"))
    np.testing.assert_allclose(vals("base").loc["perplexity", "value"],
                               np.exp(vals("base").loc["loss", "value"]))
    n_items = vals("base").loc["choice_accuracy", "n"]
    assert n_items == 6
    saved = masks_from_text(pd.read_csv(out / "swap.csv"))
    assert list(saved.columns) == SWAP_COLUMNS and len(saved) == len(df)
    assert set(saved["mask"]) == {"00", "10", "01", "11"}
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "swap" and run["n_blocks"] == 4 and run["head"] == "sft"
    assert run["segment_blocks"] == [[0, 1], [2, 3]]
    # per-item scores: every evaluated model on the same items; their sums are the table's
    items = masks_from_text(pd.read_csv(out / "swap_items.csv"))
    assert list(items.columns) == ITEM_COLUMNS
    assert list(dict.fromkeys(items.config)) == configs
    assert (items.groupby("config")["item"].apply(list) == [list(range(6))] * 9).all()
    for config, g in items.groupby("config"):
        v = vals(config)["value"]
        np.testing.assert_allclose(g["correct"].sum() / g["tokens"].sum(), v["accuracy"])
        np.testing.assert_allclose(g["loss"].sum() / g["tokens"].sum(), v["loss"])
        np.testing.assert_allclose(g["choice_correct"].mean(), v["choice_accuracy"])


def test_swap_one_direction_head_base_is_the_original(pair):
    base_dir, sft_dir, mmlu, _ = pair
    df = swap(base=str(base_dir), sft=str(sft_dir), data=f"mmlu:{mmlu}", segments=4,
              masks="1111", head="base", directions="base-into-sft", n=None, batch_size=3,
              n_boot=10)
    assert set(df.direction) == {"none", "base-into-sft"}
    # head-only (0000), 4 single segments, 1111
    assert df[df.config.str.startswith("sft<-base")].config.nunique() == 6
    full = df[df.config == "sft<-base[1111]"].set_index("metric").value
    orig = df[df.config == "base"].set_index("metric").value
    pd.testing.assert_series_equal(full, orig)


def _cli(args, capsys):
    capsys.readouterr()  # drop what fixtures printed (model saving)
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_swap_cli_end_to_end(pair, tmp_path, capsys, monkeypatch):
    """Without --out the run goes to a new folder sftscope-runs/swap-TIME (here under
    $SFTSCOPE_RUNS), as for every command, and the command says where."""
    base_dir, sft_dir, mmlu, _ = pair
    monkeypatch.setenv("SFTSCOPE_RUNS", str(tmp_path))
    code, cap = _cli(["swap", "--base", str(base_dir), "--sft", str(sft_dir), "--data",
                      f"mmlu:{mmlu}", "--segments", "4", "--masks", "0110",
                      "--directions", "sft-into-base", "--bootstrap", "10"], capsys)
    assert code == 0, cap.err
    out, = tmp_path.glob("swap-*")
    assert f"wrote {out / 'swap.csv'}" in cap.out + cap.err
    assert (out / "swap_items.csv").is_file() and (out / "run.json").is_file()
    df = masks_from_text(pd.read_csv(out / "swap.csv"))
    assert list(df.columns) == SWAP_COLUMNS
    assert set(df["mask"]) == {"0000", "1000", "0100", "0010", "0001", "0110"}


@pytest.mark.parametrize("case", ["mask_length", "mask_chars", "too_many_segments",
                                  "pair_mismatch", "missing", "empty", "head", "direction",
                                  "other_arch"])
def test_swap_bad_input_one_line(pair, model_dir, tmp_path, capsys, case):
    base_dir, sft_dir, mmlu, _ = pair
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    b, s, d = str(base_dir), str(sft_dir), f"mmlu:{mmlu}"
    args = {
        "mask_length": ["--base", b, "--sft", s, "--data", d, "--segments", "2", "--masks",
                        "010"],
        "mask_chars": ["--base", b, "--sft", s, "--data", d, "--segments", "2", "--masks",
                       "0x"],
        "too_many_segments": ["--base", b, "--sft", s, "--data", d, "--segments", "5"],
        "pair_mismatch": ["--base", b, "--sft", str(model_dir("llama", n_layers=3)), "--data",
                          d, "--segments", "2"],
        "missing": ["--base", b, "--sft", str(tmp_path / "nope"), "--data", d],
        "empty": ["--base", b, "--sft", s, "--data", str(empty), "--segments", "2"],
        "head": ["--base", b, "--sft", s, "--data", d, "--segments", "2", "--head", "x"],
        "direction": ["--base", b, "--sft", s, "--data", d, "--segments", "2", "--directions",
                      "up"],
        "other_arch": ["--base", str(model_dir("llama")), "--sft", str(model_dir("qwen2")),
                       "--data", d, "--segments", "2"],
    }[case]
    code, cap = _cli(["swap", *args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftscope: error:"), cap.err
    assert not (tmp_path / "o" / "swap.csv").exists()
