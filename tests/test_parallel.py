"""Data parallelism: shares of the samples, exact merges, and 2 CPU processes (gloo) writing
the tables one process writes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from parallel_worker import one_and_two

from sftscope.capture.stream import (
    CaptureConfig,
    capture,
    load_cached,
    merge_shards,
    shard_path,
    shard_unit,
)
from sftscope.errors import Interrupted, SftscopeError
from sftscope.experiments.analyze import AnalyzeConfig, analyze
from sftscope.experiments.lens import answer_slots, lens_pass, merge_sums
from sftscope.load import data as D
from sftscope.load.models import load_model
from sftscope.parallel import Group, check_launch, shard_counts, shard_range

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- shares


@pytest.mark.parametrize("n,world,unit", [(8, 2, 3), (1, 2, 3), (7, 3, 1), (100, 4, 8),
                                          (0, 2, 1), (10, 4, 5), (41, 3, 10)])
def test_shares_cover_every_sample_once_in_whole_units(n, world, unit):
    shares = [list(shard_range(n, world, r, unit)) for r in range(world)]
    assert sum(shares, []) == list(range(n))  # contiguous, in rank order, each sample once
    for s in shares:
        if s:
            assert s[0] % unit == 0  # a share starts at a whole batch
    if n:
        assert shares[0]  # rank 0 always has samples
    assert shard_counts(n, world, unit) == [len(s) for s in shares]
    units = [-(-len(s) // unit) for s in shares]
    assert max(units) - min(units) <= 1  # balanced to a unit
    assert shares == [list(shard_range(n, world, r, unit)) for r in range(world)]


def test_launch_checks():
    check_launch("cuda:1", None, 1)  # alone: anything goes
    with pytest.raises(SftscopeError, match="drop --device-map"):
        check_launch("auto", "auto", 2)
    with pytest.raises(SftscopeError, match="LOCAL_RANK"):
        check_launch("cuda:0", None, 2)
    check_launch("cuda", None, 4)
    check_launch("cpu", None, 4)


def test_group_alone_is_transparent():
    g = Group()
    assert g.main and not g.active and g.shard(5, 2) == [0, 1, 2, 3, 4]
    assert g.gather("x") == ["x"] and g.broadcast(3) == 3
    assert g.run(lambda: 7, "work") == 7
    with pytest.raises(SftscopeError, match="bad"), g.together("validation"):
        raise SftscopeError("bad")
    rec = g.record(10, 4)
    assert rec["world_size"] == 1 and rec["samples_per_rank"] == [10]


def test_lone_accelerate_launch_is_noted_once(monkeypatch, capsys):
    """accelerate's one-process launch asked for several (what its --cpu launcher exports)
    gives one note, once; torchrun's ranks, mpirun's and a plain run give none."""
    from sftscope import parallel as P

    for k in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "WORLD_SIZE", *P._MPI_SIZES):
        monkeypatch.delenv(k, raising=False)
    assert not P.lone_launch()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert not P.lone_launch()  # --cpu, one process asked: no MASTER_ADDR
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert P.lone_launch()
    P.note_lone_launch.cache_clear()
    P.join("cpu")
    P.join("cpu")
    err = capsys.readouterr().err
    assert err.count("accelerate launch started 1 process") == 1 and "--multi_gpu" in err
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert not P.lone_launch()  # under mpirun
    monkeypatch.delenv("OMPI_COMM_WORLD_SIZE")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not P.lone_launch()
    P.note_lone_launch.cache_clear()


def test_accelerate_cpu_launcher_starts_one_process(tmp_path):
    """The real launcher: ``accelerate launch --cpu --num_processes 2`` runs the script once,
    and sftscope sees a lone launch."""
    import subprocess
    import sys

    pytest.importorskip("accelerate.commands.launch")
    script = tmp_path / "probe.py"
    script.write_text("from sftscope.parallel import lone_launch, world_size\n"
                      "print('LONE', lone_launch(), world_size())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
               HF_HOME=str(tmp_path / "hf"))  # no user accelerate config
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu",
                        "--num_processes", "2", str(script)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("LONE") == 1 and "LONE True 1" in p.stdout


# ----------------------------------------------------------------------------- exact merges


def _tok(tokenizer, n=11):
    texts = [" ".join(f"w{(i * 7 + k) % 23}" for k in range(3 + (i * 5) % 9)) for i in range(n)]
    return D.tokenize([D.Sample(t) for t in texts], tokenizer, 64)


@pytest.mark.parametrize("reference", [False, True])
def test_capture_shares_merge_to_one_capture(model_dir, tokenizer, tmp_path, reference):
    """Shares cut at whole batches (and sparsity groups) merge to the one-process capture,
    bit for bit; each share caches and checkpoints under its own key."""
    model = load_model(str(model_dir("llama")))
    tok = _tok(tokenizer)
    cfg = CaptureConfig(batch_size=2, n_token=7, sparsity_group=3 if reference else 1,
                        include_padding=reference, overlap=False)
    pad = tokenizer.pad_token_id
    one = capture(model, tok, cfg, pad)
    unit = shard_unit(cfg)
    assert unit == (6 if reference else 2)
    world = 3
    full = tmp_path / "states-abc.safetensors"
    parts = []
    for r in range(world):
        idx = list(shard_range(len(tok), world, r, unit))
        where = shard_path(full, r, world, idx)
        assert where != full and where.parent == full.parent
        parts.append(capture(model, tok, cfg, pad, cache_path=where, indices=idx) if idx
                     else None)
        if idx:
            again = load_cached(where)  # the share is cached with its own index
            assert again is not None and again.index.tolist() == idx
    merged = merge_shards(parts, len(tok))
    assert torch.equal(merged.pooled_mean, one.pooled_mean)
    assert torch.equal(merged.pooled_last, one.pooled_last)
    assert torch.equal(merged.n_tokens, one.n_tokens)
    for k in one.token:
        torch.testing.assert_close(merged.token[k], one.token[k], rtol=0, atol=0,
                                   equal_nan=True)
    assert [p["samples"] if p else 0 for p in merged.info["ranks"]] == \
        shard_counts(len(tok), world, unit)
    with pytest.raises(SftscopeError, match="overlap"):
        merge_shards([parts[0], parts[0]], len(tok))
    with pytest.raises(SftscopeError, match="miss"):
        merge_shards([parts[0]], len(tok))
    if reference:  # a share that splits a sparsity group is refused
        with pytest.raises(SftscopeError, match="sparsity group"):
            capture(model, tok, cfg, pad, indices=[0, 1])


def test_share_resumes_from_its_own_checkpoint(model_dir, tokenizer, tmp_path, monkeypatch):
    from sftscope.capture import stream

    model = load_model(str(model_dir("llama")))
    tok = _tok(tokenizer)
    cfg = CaptureConfig(batch_size=2, n_token=5, checkpoint_every=0, overlap=False)
    idx = list(shard_range(len(tok), 2, 1, 2))
    where = shard_path(tmp_path / "states-k.safetensors", 1, 2, idx)
    calls = {"n": 0}
    real = stream.run_hooked

    def interrupted(*a, after_batch=None, **k):
        def stop(batch):
            after_batch(batch)
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(*a, after_batch=stop, **k)

    monkeypatch.setattr(stream, "run_hooked", interrupted)
    with pytest.raises(Interrupted):
        capture(model, tok, cfg, tokenizer.pad_token_id, cache_path=where, indices=idx)
    monkeypatch.setattr(stream, "run_hooked", real)
    res = capture(model, tok, cfg, tokenizer.pad_token_id, cache_path=where, indices=idx)
    assert res.info["resumed_samples"] == 4
    whole = capture(model, tok, cfg, tokenizer.pad_token_id)
    assert torch.equal(res.pooled_mean, whole.pooled_mean[:, idx])


def test_lens_shares_merge_to_one_pass(model_dir, tokenizer, gsm8k_file):
    model = load_model(str(model_dir("llama")))
    samples, tok, _ = D.prepare(f"gsm8k:{gsm8k_file}", tokenizer, max_length=48)
    answers = answer_slots(samples, tok, tokenizer)
    pad = tokenizer.pad_token_id
    kw = {"batch_size": 3, "answers": answers, "record_top1": True}
    one = lens_pass(model, tok, pad, **kw)
    ref = lens_pass(model, tok, pad, ref_top1=one.top1, **kw)
    parts = []
    for r in range(3):
        idx = list(shard_range(len(tok), 3, r, 3))
        own = lens_pass(model, tok, pad, indices=idx, **kw) if idx else None
        parts.append((idx, lens_pass(model, tok, pad, indices=idx, ref_top1=own.top1, **kw)
                      if idx else None))
    merged = merge_sums(parts)
    for name in ("tokens", "correct", "loss", "answer_prob", "answer_rank", "choice_correct",
                 "agree"):
        np.testing.assert_array_equal(getattr(merged, name), getattr(ref, name))
    assert sorted(merged.top1) == list(range(len(tok)))


# ----------------------------------------------------------------------------- 2 processes


def _tables(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / f"{name}.csv")


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for c in a.columns:
        if a[c].dtype.kind == "f":
            np.testing.assert_allclose(a[c], b[c], rtol=1e-6, atol=1e-9, equal_nan=True)
        else:
            assert list(a[c]) == list(b[c]), c


@pytest.mark.slow
def test_two_processes_write_the_tables_of_one(model_dir, gsm8k_file, tmp_path):
    """torchrun, 2 CPU processes (gloo): analyze, probe and swap write the tables one process
    writes; only rank 0 writes; run.json has world_size and the shares; a failure on one rank
    reaches both; the merged capture is cached for a later one-process run."""
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    data = f"gsm8k:{gsm8k_file}"
    common = {"data": data, "max_length": 48, "batch_size": 3, "device": "cpu"}
    an = {"base": base, "sft": sft, "n_token": 5, "bootstrap": 20, **common}
    pr = {"base": base, "sft": sft, "bootstrap": 20, **common}
    sw = {"base": base, "sft": sft, "segments": 2, "bootstrap": 20, **common}

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "SFTSCOPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    proc = one_and_two(tmp_path, an, pr, sw, env)
    one, two = tmp_path / "one", tmp_path / "two"
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"2 processes: {time.perf_counter() - t0:.1f} s")

    for name, table in (("analyze", "metrics"), ("analyze", "correlation"), ("probe", "probe"),
                        ("swap", "swap")):
        _same(_tables(two / name, table), _tables(one / name, table))
        rec = json.loads((two / name / "run.json").read_text())
        assert rec["world_size"] == 2 and rec["samples_per_rank"] == [6, 2]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["analyze_rows"] > 0 and reports[1]["analyze_rows"] == 0
    assert reports[0]["probe_rows"] > 0 and reports[1]["probe_rows"] == 0
    assert reports[1]["swap_rows"] == 0
    # validation failed on rank 1 only: both ranks raised the same error; nothing was written
    assert reports[0]["validation_error"] == reports[1]["validation_error"] == \
        "data broken on rank 1"
    assert not (two / "bad").exists()
    # a bug in rank 1's work: rank 1 raised it, rank 0 was told which process failed
    assert reports[1]["work_error"] == "RuntimeError: boom"
    assert reports[0]["work_error"].startswith("SftscopeError: process 1 of 2 failed")
    # the merged captures are cached under the one-process key; the shares are gone
    cached = sorted(p.name for p in (tmp_path / "c2").glob("states-*.safetensors"))
    assert len(cached) == 2 and not any(".rank" in c for c in cached), cached
    again = tmp_path / "again"
    analyze(AnalyzeConfig(out=str(again), cache_dir=str(tmp_path / "c2"), **an))
    rec = json.loads((again / "run.json").read_text())
    assert rec["capture"]["base"]["cached"] and rec["capture"]["sft"]["cached"]
    assert rec["world_size"] == 1
    _same(_tables(again, "metrics"), _tables(one / "analyze", "metrics"))


@pytest.mark.slow
@pytest.mark.parametrize("router_input", ["own"])  # "base" passes too (~60 s more)
def test_two_processes_routing_of_one(model_dir, gsm8k_file, tmp_path, router_input):
    """torchrun, 2 CPU processes: an MoE pair's routing.csv equals one process's (each rank
    stores and reads its own share of the base's router output; shares merged by sample)."""
    base, sft = str(model_dir("qwen2_moe", seed=0)), str(model_dir("qwen2_moe", seed=1))
    common = {"data": f"gsm8k:{gsm8k_file}", "max_length": 48, "batch_size": 3,
              "device": "cpu"}
    an = {"base": base, "sft": sft, "n_token": 2, "bootstrap": 20,
          "router_input": router_input, **common}
    pr = {"base": base, "sft": sft, "bootstrap": 0, **common}
    sw = {"base": base, "sft": sft, "segments": 2, "bootstrap": 0, **common}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "SFTSCOPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = one_and_two(tmp_path, an, pr, sw, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one" / "analyze", tmp_path / "two" / "analyze"
    _same(_tables(two, "routing"), _tables(one, "routing"))
    assert json.loads((two / "run.json").read_text())["routing"]["router_input"] == router_input
