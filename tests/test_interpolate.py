"""Interpolating segments between base and SFT (``swap --alpha``): alpha 1 is exactly the
sft-into-base swap of the segment, alpha 0 exactly the base; the mix is built in place on
copies of the segment's blocks only and leaves both models as they were; ``--save-mix`` writes
a folder AutoModelForCausalLM loads; a LoRA adapter as SFT mixes by its scale; the report's
Fig. 6b."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sftscope.config.commands import SwapConfig
from sftscope.config.core import build
from sftscope.errors import SftscopeError
from sftscope.experiments.swap import (
    SWAP_COLUMNS,
    SegmentMix,
    mix_config,
    save_mix,
    swap,
    swapped,
)
from sftscope.load.arch import get_blocks, get_final_norm, get_head
from sftscope.load.models import load_model


@pytest.fixture(scope="module")
def pair(letter_pair):
    """The shared letter pair (conftest) with its MMLU file as a data spec."""
    base, sft, mmlu, tok = letter_pair
    return base, sft, f"mmlu:{mmlu}", tok


@pytest.fixture(scope="module")
def adapter(pair, tmp_path_factory):
    """A PEFT LoRA adapter of the base on blocks 2-3 (non-zero B), and the same merged."""
    from peft import LoraConfig, get_peft_model

    base, _, _, tok = pair
    root = tmp_path_factory.mktemp("lora")
    model = load_model(str(base))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "down_proj"],
                                            layers_to_transform=[2, 3]))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft.save_pretrained(root / "adapter")
    merged = peft.merge_and_unload()
    merged.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    return root / "adapter", root / "merged"


def _vals(df: pd.DataFrame, config: str) -> pd.DataFrame:
    return df[df.config == config].set_index("metric")[["value", "ci_low", "ci_high", "n"]]


def _logits(model, tok) -> torch.Tensor:
    enc = tok(["Question: What is 3 plus 4?\nAnswer: A", "The fox"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        return model(**enc, use_cache=False).logits


@pytest.mark.parametrize("head", ["base", "sft"])
def test_alpha_one_is_the_swap_and_alpha_zero_the_base(pair, head):
    base, sft, data, _ = pair
    df = swap(base=str(base), sft=str(sft), data=data, segments=2, masks="11", head=head,
              alphas=(0.0, 0.5, 1.0), directions="sft-into-base", batch_size=4, bootstrap=20)
    assert list(df.columns) == SWAP_COLUMNS
    mix = df[df.direction == "interpolate"]
    assert list(dict.fromkeys(mix.config)) == [mix_config(m, a) for m in ("10", "01", "11")
                                               for a in (0.0, 0.5, 1.0)]
    assert set(mix["alpha"]) == {0.0, 0.5, 1.0} and set(mix["head"]) == {head}
    assert df[df.direction != "interpolate"]["alpha"].isna().all()
    zero = "base" if head == "base" else "base<-sft[00]"  # the head-only hybrid
    for mask in ("10", "01", "11"):
        pd.testing.assert_frame_equal(_vals(df, f"base<-mix1[{mask}]"),
                                      _vals(df, f"base<-sft[{mask}]"), check_exact=True)
        pd.testing.assert_frame_equal(_vals(df, f"base<-mix0[{mask}]"), _vals(df, zero),
                                      check_exact=True)
        half = _vals(df, f"base<-mix0.5[{mask}]")
        assert not half.equals(_vals(df, f"base<-sft[{mask}]")), mask


def test_mix_is_built_on_copies_of_the_segment_only(pair):
    base_dir, sft_dir, _, tok = pair
    base, sft = load_model(str(base_dir)), load_model(str(sft_dir))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    before_s = {k: v.clone() for k, v in sft.state_dict().items()}
    blocks_b, blocks_s = list(get_blocks(base)), list(get_blocks(sft))
    ref_b = _logits(base, tok)
    mix = SegmentMix(base, sft, [3, 2])
    assert mix.ids == [2, 3] and set(mix.blocks) == {2, 3}  # two blocks copied, no model
    assert all(mix.blocks[b] is not blocks_b[b] for b in (2, 3))
    for alpha in (0.25, 1.0, 0.0, 0.75):
        mix.set(alpha)
        for b in (2, 3):
            theirs = dict(blocks_s[b].named_parameters())
            for name, p in mix.blocks[b].named_parameters():
                mine = dict(blocks_b[b].named_parameters())[name]
                want = (mine if alpha == 0 else theirs[name] if alpha == 1 else
                        torch.lerp(mine, theirs[name], alpha))
                assert torch.equal(p, want), (alpha, b, name)
    with swapped(base, sft, [2, 3], modules=mix.blocks) as hybrid:
        assert get_blocks(hybrid)[2] is mix.blocks[2] and get_head(hybrid) is not get_head(sft)
        mixed = _logits(hybrid, tok)
    assert not torch.equal(mixed, ref_b)
    assert list(get_blocks(base)) == blocks_b and list(get_blocks(sft)) == blocks_s
    assert get_final_norm(base) is not get_final_norm(sft)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in sft.state_dict().items():
        assert torch.equal(v, before_s[k]), k
    assert torch.equal(_logits(base, tok), ref_b)
    with pytest.raises(SftscopeError, match=r"outside \[0, 1\]"):
        mix.set(1.5)


def test_save_mix_writes_a_loadable_model(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, sft_dir, data, tok = pair
    out = tmp_path / "run"
    swap(base=str(base_dir), sft=str(sft_dir), data=data, segments=2, out=str(out),
         directions="sft-into-base", save_mix=("01:0.5", "10:1"), batch_size=4, bootstrap=0)
    rec = json.loads((out / "run.json").read_text())
    assert rec["mixes_saved"] == [str(out / "mix-01-a0.5"), str(out / "mix-10-a1")]
    base, sft = load_model(str(base_dir)), load_model(str(sft_dir))
    half = AutoModelForCausalLM.from_pretrained(out / "mix-01-a0.5")
    assert AutoTokenizer.from_pretrained(out / "mix-01-a0.5")("Answer")["input_ids"] == \
        tok("Answer")["input_ids"]
    b_sd, s_sd, m_sd = base.state_dict(), sft.state_dict(), half.state_dict()
    for k, v in m_sd.items():
        if ".layers.2." in k or ".layers.3." in k:
            assert torch.equal(v, torch.lerp(b_sd[k], s_sd[k], 0.5)), k
        else:
            assert torch.equal(v, b_sd[k]), k  # other blocks, embeddings, head: the base's
    mix = SegmentMix(base, sft, [2, 3])
    mix.set(0.5)
    with swapped(base, sft, [2, 3], modules=mix.blocks) as hybrid:
        torch.testing.assert_close(_logits(half, tok), _logits(hybrid, tok), rtol=0, atol=0)
    one = AutoModelForCausalLM.from_pretrained(out / "mix-10-a1").state_dict()
    for k, v in one.items():
        want = s_sd[k] if (".layers.0." in k or ".layers.1." in k) else b_sd[k]
        assert torch.equal(v, want), k
    # the mix with the SFT head: its final norm and head are the SFT's
    save_mix(base, sft, "01", 0.25, tmp_path / "with-head", head="sft")
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "with-head").state_dict()
    assert torch.equal(sd["lm_head.weight"], s_sd["lm_head.weight"])
    assert torch.equal(sd["model.norm.weight"], s_sd["model.norm.weight"])
    assert torch.equal(sd["model.embed_tokens.weight"], b_sd["model.embed_tokens.weight"])


def test_adapter_as_sft_mixes_by_its_scale(pair, adapter, tmp_path):
    """An in-memory LoRA adapter: alpha 1 = its swap, alpha 0 = the base (exactly), alpha 0.5 =
    the merged checkpoint's mix up to rounding; a saved mix holds W + alpha s B A."""
    from transformers import AutoModelForCausalLM

    base_dir, _, data, _ = pair
    ad, merged = adapter
    kw = {"data": data, "segments": 2, "alphas": (0.0, 0.5, 1.0), "batch_size": 4,
          "bootstrap": 0, "directions": "sft-into-base"}
    out = tmp_path / "run"
    df = swap(base=str(base_dir), sft=str(ad), out=str(out), save_mix=("01:0.5",), **kw)
    ref = swap(base=str(base_dir), sft=str(merged), **kw)
    for mask in ("10", "01"):
        pd.testing.assert_frame_equal(_vals(df, f"base<-mix1[{mask}]"),
                                      _vals(df, f"base<-sft[{mask}]"), check_exact=True)
        pd.testing.assert_frame_equal(_vals(df, f"base<-mix0[{mask}]"), _vals(df, "base"),
                                      check_exact=True)
        a, b = _vals(df, f"base<-mix0.5[{mask}]"), _vals(ref, f"base<-mix0.5[{mask}]")
        np.testing.assert_allclose(a["value"], b["value"], rtol=1e-4)
    # the adapter touches blocks 2-3 only: mixing blocks 0-1 changes nothing
    assert _vals(df, "base<-mix0.5[10]").equals(_vals(df, "base"))
    assert not _vals(df, "base<-mix0.5[01]").equals(_vals(df, "base"))
    b_sd = load_model(str(base_dir)).state_dict()
    m_sd = load_model(str(merged)).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out / "mix-01-a0.5").state_dict()
    assert set(saved) == set(b_sd)  # a plain checkpoint: no LoRA tensors left
    for k, v in saved.items():
        torch.testing.assert_close(v, torch.lerp(b_sd[k], m_sd[k], 0.5), rtol=1e-5, atol=1e-6)


def test_interpolation_options_checked(pair, model_dir, tmp_path):
    base, sft, data, _ = pair
    common = {"base": str(base), "sft": str(sft), "data": data, "segments": 2}
    # --alpha (the flag's name) and a config file's list or number
    assert build(SwapConfig, {**common, "alpha": "0.25, 0.5"}).alphas == (0.25, 0.5)
    assert SwapConfig(**common, alphas=[0, 1]).alphas == (0.0, 1.0)
    assert SwapConfig(**common, alphas=0.5).alphas == (0.5,)
    assert SwapConfig(**common, save_mix="01:0.5,10:1", out=str(tmp_path)).mixes() == [
        ("01", 0.5), ("10", 1.0)]
    bad = [({"alphas": (0.5, 1.5)}, r"in \[0, 1\]"), ({"alphas": "0.5,0.5"}, "repeats"),
           ({"alphas": "half"}, "expects a number"),
           ({"save_mix": ("01",), "out": "x"}, "MASK:ALPHA"),
           ({"save_mix": ("0a:0.5",), "out": "x"}, "MASK:ALPHA"),
           ({"save_mix": ("00:0.5",), "out": "x"}, "MASK:ALPHA"),
           ({"save_mix": ("01:x",), "out": "x"}, "not a number"),
           ({"save_mix": ("01:2",), "out": "x"}, r"\[0, 1\]"),
           ({"save_mix": ("011:0.5",), "out": "x"}, "--segments is 2"),
           ({"save_mix": ("01:0.5", "01:0.50"), "out": "x"}, "repeats"),
           ({"save_mix": ("01:0.5",)}, "give --out")]
    for extra, needle in bad:
        with pytest.raises(SftscopeError, match=needle):
            SwapConfig(**{**common, **extra})
    # a tied head cannot be saved beside the base's embeddings: refused before any model load
    g0, g1 = model_dir("gpt2", seed=0), model_dir("gpt2", seed=1)
    with pytest.raises(SftscopeError, match="--head base"):
        swap(base=str(g0), sft=str(g1), data=data, segments=2, head="sft",
             save_mix=("01:0.5",), out=str(tmp_path / "tied"))
    assert not (tmp_path / "tied").exists()


def test_report_plots_score_against_alpha(pair, tmp_path):
    from sftscope.report import numbers as N
    from sftscope.report import plots
    from sftscope.report.build import build_report
    from sftscope.report.runs import load_run

    base, sft, data, _ = pair
    kw = {"base": str(base), "sft": str(sft), "data": data, "segments": 2, "batch_size": 4,
          "bootstrap": 0}
    swap(out=str(tmp_path / "mix"), alphas=(0.5,), **kw)
    swap(out=str(tmp_path / "plain"), **kw)
    table = load_run(tmp_path / "mix").tables["swap"]
    data6b = N.interp_data(table)
    f = data6b.frame[data6b.frame.metric == "loss"]
    # alpha 0.5 scored; alpha 0 and 1 stand in from the base and swap rows
    assert sorted(f["mask"].unique()) == ["01", "10"]
    assert f.groupby("mask")["alpha"].apply(list).to_dict() == {"01": [0.0, 0.5, 1.0],
                                                                "10": [0.0, 0.5, 1.0]}
    assert set(f[f.alpha == 0.5]["source"]) == {"mix"}
    assert set(f[f.alpha == 0.0]["source"]) == {"base"}
    assert set(f[f.alpha == 1.0]["source"]) == {"swap"}
    one = f[(f["mask"] == "01") & (f.alpha == 1.0)]["value"].iloc[0]
    assert one == table[(table.config == "base<-sft[01]") & (table.metric == "loss")][
        "value"].iloc[0]
    assert len(data6b.summary) and set(data6b.summary["mask"]) == {"01", "10"}
    fig = plots.plot_interpolation(data6b)
    assert "mask 01" in [t.get_text() for t in fig.legends[0].get_texts()]
    # Fig. 6 (swaps) is the same with and without the interpolated rows
    plain = load_run(tmp_path / "plain").tables["swap"]
    pd.testing.assert_frame_equal(N.swap_data(table).summary, N.swap_data(plain).summary)
    assert N.interp_data(plain).empty
    html = build_report([tmp_path / "mix"], out=tmp_path / "r.html").read_text()
    assert "Fig. 6b" in html


def test_broken_mix_is_refused_naming_its_alpha(pair, tmp_path, monkeypatch):
    """A mix whose logits overflow (NaN loss) is refused in one line naming the mix and its
    alpha, not scored; --save-mix of non-finite mixed weights writes nothing."""
    import dataclasses

    import sftscope.experiments.swap as S

    base_dir, sft_dir, data, _ = pair
    real = S.lens_pass

    def broken(model, *a, description="", **kw):
        sums = real(model, *a, description=description, **kw)
        if description == mix_config("01", 0.5):
            return dataclasses.replace(sums, loss=np.full_like(sums.loss, np.nan))
        return sums

    monkeypatch.setattr(S, "lens_pass", broken)
    with pytest.raises(SftscopeError, match=r"base<-mix0.5\[01\]: non-finite logits on"):
        swap(base=str(base_dir), sft=str(sft_dir), data=data, segments=2, masks="01",
             alphas=(0.0, 0.5), directions="sft-into-base", batch_size=4, bootstrap=0)
    monkeypatch.setattr(S, "lens_pass", real)
    base, sft = load_model(str(base_dir)), load_model(str(sft_dir))
    with torch.no_grad():
        next(get_blocks(sft)[-1].parameters()).fill_(float("inf"))
    with pytest.raises(SftscopeError, match="--save-mix 01:0.5: the mixed weights are not "
                                            "finite"):
        save_mix(base, sft, "01", 0.5, tmp_path / "mix")
    assert not (tmp_path / "mix").exists()
