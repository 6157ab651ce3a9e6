"""Capture and ``analyze`` end to end on tiny random models of several families."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sftscope import metrics as M
from sftscope.capture.hooks import hidden_state_hooks
from sftscope.capture.stream import CaptureConfig, capture
from sftscope.cli import main
from sftscope.experiments.analyze import AnalyzeConfig, analyze
from sftscope.load import data as D
from sftscope.load.arch import get_blocks, get_final_norm
from sftscope.load.models import load_model, load_tokenizer

FAMILIES = ["llama", "mistral", "olmo2", "qwen2", "gpt2"]


def _cfg(base, sft, data, out, cache, **kw) -> AnalyzeConfig:
    kw = {"n_token": 6, "limit": 8, "max_length": 48, "batch_size": 3, **kw}
    return AnalyzeConfig(base=str(base), sft=str(sft), data=str(data), out=str(out),
                         cache_dir=str(cache), **kw)


@pytest.mark.parametrize("family", FAMILIES + ["gpt_neox", "phi", "gemma2"])
def test_hooks_match_hf_hidden_states(model_dir, family):
    """Parity with HF: j < L equals hidden_states[j]; final_norm(j = L) equals HF's last."""
    path = model_dir(family)
    model = load_model(str(path))
    tok = load_tokenizer(str(path))
    enc = tok(["Question: What is 3 plus 4?", "The fox"], return_tensors="pt", padding=True)
    got: dict[int, torch.Tensor] = {}
    with torch.no_grad(), hidden_state_hooks(model, lambda j, h: got.__setitem__(j, h.clone())):
        ref = model(**enc, output_hidden_states=True, use_cache=False).hidden_states
    n = len(get_blocks(model))
    assert sorted(got) == list(range(n + 1))
    for j in range(n):
        torch.testing.assert_close(got[j], ref[j], rtol=1e-5, atol=1e-5)
    last = ref[n]
    normed = get_final_norm(model)(got[n])
    # Families differ on whether HF's last hidden state is before or after the final norm.
    assert torch.allclose(last, normed, atol=1e-5) or torch.allclose(last, got[n], atol=1e-5)


def test_capture_padding_invariant(model_dir, tokenizer):
    """Batch size 1 and 4 (padding) give the same pooled states and token metrics."""
    path = model_dir("llama")
    model = load_model(str(path))
    samples = [D.Sample(t) for t in ["a b c d e f g h", "one two", "x y z 1 2 3", "hello there"]]
    tok = D.tokenize(samples, tokenizer, 64)
    r1 = capture(model, tok, CaptureConfig(batch_size=1, n_token=4), tokenizer.pad_token_id)
    r4 = capture(model, tok, CaptureConfig(batch_size=4, n_token=4), tokenizer.pad_token_id)
    torch.testing.assert_close(r1.pooled_mean, r4.pooled_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r1.pooled_last, r4.pooled_last, rtol=1e-4, atol=1e-5)
    for k in r1.token:
        torch.testing.assert_close(r1.token[k], r4.token[k], rtol=1e-4, atol=1e-5,
                                   equal_nan=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_analyze_end_to_end(model_dir, gsm8k_file, tmp_path, family):
    base, sft = model_dir(family, seed=0), model_dir(family, seed=1)
    table = analyze(_cfg(base, sft, f"gsm8k:{gsm8k_file}", tmp_path / "run", tmp_path / "c"))
    n_blocks = len(get_blocks(load_model(str(base))))
    csv = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(csv.columns) == ["layer", "metric", "model", "value", "ci_low", "ci_high"]
    assert set(csv.layer) == set(range(n_blocks + 1))
    assert {"base", "sft", "pair"} == set(csv.model)
    for m in ["prompt_entropy", "dataset_entropy", "effective_rank", "rank_deficiency",
              "spectral_norm", "condition_number", "l2_norm", "sparsity", "curvature"]:
        assert m in set(csv[csv.model == "base"].metric), m
    for m in ["cka", "cosine_similarity", "mean_shift", "delta_effective_rank"]:
        assert m in set(csv[csv.model == "pair"].metric), m
    assert len(table) == len(csv)
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["command"] == "analyze" and rec["n_blocks"] == n_blocks
    assert rec["versions"]["torch"] and rec["seeds"]["data"] == 0
    corr = pd.read_csv(tmp_path / "run" / "correlation.csv")
    assert {"model", "metric_a", "metric_b", "r"} <= set(corr.columns)


def _pair_changed_blocks(model_dir, tmp_path, lo: int, hi: int) -> tuple[Path, Path]:
    """SFT = base with blocks lo..hi (inclusive) perturbed."""
    base = model_dir("llama", n_layers=6)
    model = load_model(str(base))
    torch.manual_seed(3)
    with torch.no_grad():
        for b in range(lo, hi + 1):
            for p in get_blocks(model)[b].parameters():
                p.add_(0.2 * torch.randn_like(p))
    sft = tmp_path / "sft"
    model.save_pretrained(sft)
    load_tokenizer(str(base)).save_pretrained(sft)
    return base, sft


def test_pair_identity_below_changed_blocks(model_dir, gsm8k_file, tmp_path):
    lo, hi = 2, 3
    base, sft = _pair_changed_blocks(model_dir, tmp_path, lo, hi)
    analyze(_cfg(base, sft, f"gsm8k:{gsm8k_file}", tmp_path / "run", tmp_path / "c"))
    csv = pd.read_csv(tmp_path / "run" / "metrics.csv")
    pair = csv[csv.model == "pair"].pivot_table(index="layer", columns="metric", values="value")
    for j in range(lo + 1):  # hidden states up to the input of block lo are identical
        assert pair.loc[j, "cka"] == pytest.approx(1.0, abs=1e-6)
        assert pair.loc[j, "cosine_similarity"] == pytest.approx(1.0, abs=1e-6)
        assert pair.loc[j, "mean_shift"] == 0.0
    for j in range(lo + 1, 7):
        assert pair.loc[j, "mean_shift"] > 0
        assert pair.loc[j, "cosine_similarity"] < 1 - 1e-6


def test_cache_and_resume(model_dir, gsm8k_file, tmp_path, monkeypatch):
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    cfg = _cfg(base, sft, f"gsm8k:{gsm8k_file}", tmp_path / "run", tmp_path / "c", batch_size=2)
    first = analyze(cfg)
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["capture"]["base"]["cached"] is False
    # A second analysis with other dataset-level options reuses the cached states.
    import sftscope.capture.stream as S

    def boom(*a, **k):
        raise AssertionError("models must not run again")

    monkeypatch.setattr(S, "capture", boom)
    import sftscope.experiments.analyze as A

    monkeypatch.setattr(A, "capture", boom)
    from dataclasses import replace

    again = analyze(replace(cfg, pooling="last", out=str(tmp_path / "run2")))
    assert len(again) == len(first)
    monkeypatch.undo()

    # Resume: a capture interrupted after 2 batches continues from its checkpoint.
    model = load_model(str(base))
    tok = load_tokenizer(str(base))
    samples = D.load_samples(f"gsm8k:{gsm8k_file}", n=8)
    ts = D.tokenize(samples, tok, 48)
    full = capture(model, ts, CaptureConfig(batch_size=2, n_token=6), tok.pad_token_id)
    path = tmp_path / "resume" / "states.safetensors"
    calls = {"n": 0}
    real_forward = type(model.model).forward

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_forward(self, *a, **k)

    monkeypatch.setattr(type(model.model), "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        capture(model, ts, CaptureConfig(batch_size=2, n_token=6, checkpoint_every=0),
                tok.pad_token_id, cache_path=path)
    assert path.with_suffix(".partial.safetensors").exists()
    monkeypatch.undo()
    resumed = capture(model, ts, CaptureConfig(batch_size=2, n_token=6), tok.pad_token_id,
                      cache_path=path)
    assert resumed.info["resumed_samples"] == 4
    torch.testing.assert_close(resumed.pooled_mean, full.pooled_mean)
    for k in full.token:
        torch.testing.assert_close(resumed.token[k], full.token[k], equal_nan=True)


def _cli(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "sftscope", *args], capture_output=True,
                          text=True, env={"SFTSCOPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
                                          "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    return proc.returncode, proc.stderr


def test_cli_analyze_and_bad_inputs(model_dir, gsm8k_file, tmp_path):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    deep = str(model_dir("llama", n_layers=6))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    common = ["--n-token", "4", "--n-pooled", "6", "--cache-dir", str(tmp_path / "c")]
    rc, err = _cli(["analyze", "--base", base, "--sft", sft, "--data", f"gsm8k:{gsm8k_file}",
                    "--out", str(tmp_path / "ok"), *common])
    assert rc == 0, err
    assert (tmp_path / "ok" / "metrics.csv").exists()
    cases = {
        "does not match": ["--base", base, "--sft", deep, "--data", f"gsm8k:{gsm8k_file}"],
        "does not exist": ["--base", str(tmp_path / "nope"), "--sft", sft, "--data",
                           f"gsm8k:{gsm8k_file}"],
        "empty": ["--base", base, "--sft", sft, "--data", str(empty)],
    }
    for needle, args in cases.items():
        rc, err = _cli(["analyze", *args, "--out", str(tmp_path / "bad"), *common])
        assert rc == 2, (needle, err)
        assert needle in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_unknown_architecture_fails_loudly():
    from torch import nn

    from sftscope.errors import SftscopeError
    from sftscope.load.arch import arch_for

    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"model_type": "weird", "num_hidden_layers": 3})()
            self.stuff = nn.Linear(2, 2)

    with pytest.raises(SftscopeError, match="Weird"):
        arch_for(Weird())


def test_config_file_mirrors_flags(model_dir, gsm8k_file, tmp_path):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"analyze:\n  base: {base}\n  sft: {sft}\n  n-token: 3\n  n_pooled: 5\n"
                   f"  cache_dir: {tmp_path / 'c'}\n")
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg), "analyze", "--data", f"gsm8k:{gsm8k_file}", "--out",
              str(tmp_path / "r")])
    assert e.value.code == 0
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["config"]["n_token"] == 3 and rec["config"]["limit"] == 5


def test_reference_preset_reproduces_research_code(model_dir, gsm8k_file, tmp_path):
    """reference: j = 0..L-1 only, padding counted in token metrics, sigma^2 effective rank."""
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    data = f"gsm8k:{gsm8k_file}"
    default = analyze(_cfg(base, sft, data, tmp_path / "d", tmp_path / "c"))
    ref = analyze(_cfg(base, sft, data, tmp_path / "r", tmp_path / "c", preset="reference"))
    n = int(default.layer.max())
    assert int(ref.layer.max()) == n - 1
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["metric_options"]["erank_weights"] == "sigma2"
    key = ["layer", "metric", "model"]
    both = default.merge(ref, on=key, suffixes=("_d", "_r"))
    ent = both[(both.metric == "prompt_entropy") & (both.model == "base")]
    assert (ent.value_d - ent.value_r).abs().max() > 1e-6  # padding now enters the metric


def test_noise_floor_is_the_base_against_itself_on_disjoint_halves(model_dir, gsm8k_file,
                                                                   tmp_path):
    from sftscope.experiments.analyze import noise_table, pair_values

    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    cfg = _cfg(base, sft, f"gsm8k:{gsm8k_file}", tmp_path / "run", tmp_path / "c")
    analyze(cfg)
    noise = pd.read_csv(tmp_path / "run" / "noise.csv")
    assert set(noise.metric) == {"cka", "cosine_similarity", "mean_shift",
                                 "mean_shift_relative"}
    assert (noise.ci_low <= noise.value).all() and (noise.value <= noise.ci_high).all()
    assert (noise.splits == 20).all()
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "noise.csv" in rec["noise_floor"]
    # one split by hand: the same halves give the same numbers

    class One:  # what noise_table reads of a CaptureResult
        n_states = 2

        def __init__(self, z):
            self.z = z

        def pooled(self, _pooling):
            return self.z

    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(10, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    opts = M.MetricOptions()
    got = noise_table(One(z), opts, splits=1, seed=5)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    want = pair_values(z[1][perm[:5]], z[1][perm[5:10]], opts)
    row = got[(got.layer == 1) & (got.metric == "cka")].iloc[0]
    assert row.value == pytest.approx(want["cka"]) == row.ci_low == row.ci_high
    assert noise_table(One([t[:7] for t in z]), opts, splits=3).empty  # too few samples
    assert noise_table(One(z), opts, splits=0).empty


def test_noise_band_findings_on_a_constructed_table():
    from sftscope.report import numbers as N
    from sftscope.report.sections import noise_findings

    rows = [(j, "cka", "pair", v, np.nan, np.nan) for j, v in enumerate([1.0, 0.99, 0.9, 0.7])]
    df = pd.DataFrame(rows, columns=["layer", "metric", "model", "value", "ci_low", "ci_high"])
    noise = pd.DataFrame([(j, "cka", 0.95, 0.93, 0.97, 20) for j in range(4)],
                         columns=["layer", "metric", "value", "ci_low", "ci_high", "splits"])
    lines = noise_findings(N.pair_data(df, noise))
    assert len(lines) == 1
    assert "outside the base-vs-base noise band (two disjoint halves of the data) at 4 of 4 " \
           "layers, first at j = 0; at the top (j = 3) 0.700 against the band [0.930, 0.970]" \
           in lines[0]
