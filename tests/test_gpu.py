"""GPU checks (marker ``gpu``): skipped without CUDA; run them on a GPU machine with

    PYTHONPATH=$PWD/src python -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py -q

Covered: placement with ``--device cuda`` (tables match the CPU's), bf16 capture against fp32
within the tolerances below, a model spread over two GPUs (``device_map``; skipped below 2
GPUs), ``tune`` under ``accelerate launch``, and data-parallel analyze/probe/swap over 2 GPUs
(nccl; skipped below 2 GPUs). The bf16 check also runs on CPU (not marked ``gpu``), so CI
exercises its tolerances.

bf16 tolerances (bf16 keeps 8 significant bits; measured on CPU, worst of 3 seeds of a 4-block,
hidden-128 Llama, then given a margin of about 5x): pooled vectors per layer within 3 % of the
fp32 ones (relative Frobenius norm; measured 0.6 %), linear CKA to them >= 0.999 (measured
0.99998), prompt entropy within 0.005 (measured 0.0005), sparsity within 0.02 (0.0025),
curvature within 0.02 rad (0.002), dataset entropy, effective rank, l2 norm and spectral norm
within 2 % relative (0.2 %).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from parallel_worker import one_and_two

from sftscope import metrics as M
from sftscope.capture.stream import CaptureConfig, capture
from sftscope.load import data as D

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
N_GPUS = torch.cuda.device_count() if CUDA else 0
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_two = pytest.mark.skipif(N_GPUS < 2, reason="needs 2 CUDA GPUs")

BF16_TOL = {"pooled_rel": 0.03, "cka": 0.999, "prompt_entropy": 0.005, "sparsity": 0.02,
            "curvature": 0.02, "dataset_rel": 0.02}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SFTSCOPE_NO_PROGRESS": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _close(a: pd.DataFrame, b: pd.DataFrame, rtol: float, atol: float,
           skip: tuple[str, ...] = ()) -> None:
    """Two tidy tables agree in every numeric column (rows of the metrics ``skip`` aside)."""
    if "metric" in a.columns and skip:
        a, b = a[~a.metric.isin(skip)], b[~b.metric.isin(skip)]
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(a[c], b[c], rtol=rtol, atol=atol, equal_nan=True,
                                       err_msg=c)
        else:
            assert list(a[c]) == list(b[c]), c


# ----------------------------------------------------------------------------- placement


@pytest.mark.gpu
@needs_cuda
def test_device_cuda_places_and_matches_cpu(model_dir, gsm8k_file, tmp_path):
    from sftscope.experiments.analyze import AnalyzeConfig, analyze
    from sftscope.experiments.lens import hidden_states, probe
    from sftscope.load.models import LoadOptions, load_model

    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    m = load_model(base, LoadOptions(device="cuda", dtype="float32"))
    assert {p.device.type for p in m.parameters()} == {"cuda"}
    states = hidden_states(m, torch.tensor([[5, 6, 7, 8]]))
    assert all(h.device.type == "cuda" for h in states)
    kw = {"base": base, "sft": sft, "data": f"gsm8k:{gsm8k_file}", "max_length": 48,
          "batch_size": 3, "dtype": "float32"}
    tables = {}
    for dev in ("cpu", "cuda"):
        analyze(AnalyzeConfig(out=str(tmp_path / dev), cache_dir=str(tmp_path / f"c{dev}"),
                              device=dev, n_token=5, **kw))
        rec = json.loads((tmp_path / dev / "run.json").read_text())
        assert rec["resolved"]["device"] == dev
        tables[dev] = pd.read_csv(tmp_path / dev / "metrics.csv")
        tables[f"p{dev}"] = probe(device=dev, bootstrap=0, **kw)
    # rank deficiency and the condition number hinge on the smallest singular values
    _close(tables["cuda"], tables["cpu"], 1e-3, 1e-4,
           skip=("rank_deficiency", "rank_deficiency_frac", "condition_number",
                 "delta_rank_deficiency", "delta_rank_deficiency_frac",
                 "delta_condition_number"))
    _close(tables["pcuda"], tables["pcpu"], 1e-3, 1e-4)


# ----------------------------------------------------------------------------- bf16


def _bf16_vs_fp32(device: str, tok) -> None:
    from sftscope.load.tiny import build_tiny_model

    texts = [" ".join(f"w{(i * 7 + k) % 23} apples and pears" for k in range(3 + (i * 5) % 9))
             for i in range(24)]
    ts = D.tokenize([D.Sample(t) for t in texts], tok, 96)
    kw = {"hidden": 128, "n_heads": 4, "n_layers": 4, "max_positions": 128}
    m32 = build_tiny_model("llama", len(tok), seed=0, **kw).to(device)
    m16 = build_tiny_model("llama", len(tok), seed=0, **kw).to(device, torch.bfloat16)
    cfg = CaptureConfig(batch_size=8, n_token=24)
    a = capture(m32, ts, cfg, tok.pad_token_id)
    b = capture(m16, ts, cfg, tok.pad_token_id)
    assert b.info["compute_dtype"] == "bfloat16" and a.info["compute_dtype"] == "float32"
    opts = M.get_options("default")
    for j in range(a.n_states):
        za, zb = a.pooled_mean[j], b.pooled_mean[j]
        assert float((zb - za).norm() / za.norm()) <= BF16_TOL["pooled_rel"], j
        assert float(M.cka(za, zb)) >= BF16_TOL["cka"], j
        da = M.dataset_metrics(za, opts, compute_dtype="float32")
        db = M.dataset_metrics(zb, opts, compute_dtype="bfloat16")
        for k in ("dataset_entropy", "effective_rank", "l2_norm", "spectral_norm"):
            assert abs(float(db[k]) - float(da[k])) <= BF16_TOL["dataset_rel"] * abs(
                float(da[k])) + 1e-6, (j, k)
    for k in ("prompt_entropy", "sparsity", "curvature"):
        assert torch.equal(a.token[k].isnan(), b.token[k].isnan()), k
        d = (b.token[k] - a.token[k]).abs()
        assert float(d[~d.isnan()].max()) <= BF16_TOL[k], k


def test_bf16_capture_close_to_fp32_cpu(tokenizer):
    _bf16_vs_fp32("cpu", tokenizer)


@pytest.mark.gpu
@needs_cuda
def test_bf16_capture_close_to_fp32_cuda(tokenizer):
    _bf16_vs_fp32("cuda", tokenizer)


# ----------------------------------------------------------------------------- 2 GPUs


@pytest.mark.gpu
@needs_two
def test_model_over_two_gpus_matches_one(model_dir, gsm8k_file, tmp_path, tokenizer):
    """A model spread over two GPUs (hidden states cross devices mid-pass): capture and the
    lens give what one GPU gives; and ``--device-map auto`` runs end to end."""
    from transformers import AutoModelForCausalLM

    from sftscope.experiments.analyze import AnalyzeConfig, analyze
    from sftscope.experiments.lens import lens_pass
    from sftscope.load.models import LoadOptions, load_model

    path = str(model_dir("llama"))  # 4 blocks
    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
             "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1,
             "lm_head": 1}
    spread = AutoModelForCausalLM.from_pretrained(path, device_map=split, dtype=torch.float32)
    spread.eval()
    assert {p.device.index for p in spread.parameters()} == {0, 1}
    one = load_model(path, LoadOptions(device="cuda:0", dtype="float32"))
    samples, ts, _ = D.prepare(f"gsm8k:{gsm8k_file}", tokenizer, max_length=48)
    cfg = CaptureConfig(batch_size=3, n_token=6)
    a, b = capture(one, ts, cfg, tokenizer.pad_token_id), capture(spread, ts, cfg,
                                                                  tokenizer.pad_token_id)
    torch.testing.assert_close(b.pooled_mean, a.pooled_mean, rtol=1e-4, atol=1e-5)
    for k in a.token:
        torch.testing.assert_close(b.token[k], a.token[k], rtol=1e-4, atol=1e-5,
                                   equal_nan=True)
    la, lb = lens_pass(one, ts, tokenizer.pad_token_id), lens_pass(spread, ts,
                                                                   tokenizer.pad_token_id)
    np.testing.assert_allclose(lb.loss, la.loss, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(lb.tokens, la.tokens)
    kw = {"base": path, "sft": str(model_dir("llama", seed=1)),
          "data": f"gsm8k:{gsm8k_file}", "max_length": 48, "batch_size": 3, "n_token": 5,
          "dtype": "float32"}
    analyze(AnalyzeConfig(out=str(tmp_path / "map"), cache_dir=str(tmp_path / "c1"),
                          device_map="auto", **kw))
    analyze(AnalyzeConfig(out=str(tmp_path / "one"), cache_dir=str(tmp_path / "c2"),
                          device="cuda", **kw))
    _close(pd.read_csv(tmp_path / "map" / "metrics.csv"),
           pd.read_csv(tmp_path / "one" / "metrics.csv"), 1e-3, 1e-4,
           skip=("rank_deficiency", "rank_deficiency_frac", "condition_number",
                 "delta_rank_deficiency", "delta_rank_deficiency_frac",
                 "delta_condition_number"))


@pytest.mark.gpu
@needs_two
def test_data_parallel_on_two_gpus(model_dir, gsm8k_file, tmp_path):
    """torchrun, 2 GPU processes (nccl, each on its LOCAL_RANK GPU): analyze, probe and swap
    write the tables one GPU process writes."""

    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    common = {"data": f"gsm8k:{gsm8k_file}", "max_length": 48, "batch_size": 3,
              "device": "cuda", "dtype": "float32"}
    an = {"base": base, "sft": sft, "n_token": 5, "bootstrap": 20, **common}
    pr = {"base": base, "sft": sft, "bootstrap": 20, **common}
    sw = {"base": base, "sft": sft, "segments": 2, "bootstrap": 20, **common}
    proc = one_and_two(tmp_path, an, pr, sw, _env())
    one, two = tmp_path / "one", tmp_path / "two"
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, table in (("analyze", "metrics"), ("probe", "probe"), ("swap", "swap")):
        _close(pd.read_csv(two / name / f"{table}.csv"), pd.read_csv(one / name / f"{table}.csv"),
               1e-5, 1e-6)
        rec = json.loads((two / name / "run.json").read_text())
        assert rec["world_size"] == 2 and rec["processes"]["backend"] == "nccl"


# ----------------------------------------------------------------------------- tune


@pytest.mark.gpu
@needs_cuda
def test_tune_under_accelerate(model_dir, gsm8k_file, tmp_path):
    """``accelerate launch`` (one process per GPU, up to 2) trains a segment LoRA on the GPU in
    bf16 and records the processes; the adapter loads back."""
    n = min(2, N_GPUS)
    out = tmp_path / "tune"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
           *(["--multi_gpu"] if n > 1 else []), "-m", "sftscope", "tune",
           "--model", str(model_dir("llama")), "--train", f"gsm8k:{gsm8k_file}",
           "--out", str(out), "--mask", "0100", "--max-steps", "3", "--batch-size", "4",
           "--micro-batch-size", "2", "--dtype", "bfloat16", "--no-eval"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["processes"] == n and rec["result"]["steps"] == 3
    assert rec["grad_accumulation"] == 4 // (2 * n)
    assert np.isfinite(rec["result"]["train_loss"])
    assert (out / "adapter").is_dir()


# ----------------------------------------------------------------------------- bench


@pytest.mark.slow
def test_gpu_check_tiny_runs_on_cpu(tmp_path):
    """bench/gpu_check.py end to end with --tiny on CPU: every figure is there."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny",
                           "--json", str(out)], env={**_env(), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    ratios = got["passes"]["ratios"]
    assert set(ratios) == {"bare forward", "capture", "capture, pooled only",
                           "probe (lens, all states)"}
    assert ratios["bare forward"] == 1.0 and all(v > 0 for v in ratios.values())
    assert got["passes"]["flops"] > 0 and got["passes"]["mfu"] is None  # no peak on CPU
    assert list(got["tune"]) == ["11111", "10000", "01000", "00100", "00010", "00001"]
    assert got["tune"]["11111"]["ratio"] == 1.0
    assert "MFU" in proc.stdout and "2*P*N + 4*L*d*sum(T_i^2)" in proc.stdout
