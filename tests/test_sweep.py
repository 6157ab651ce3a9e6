"""sweep: resumable jobs, refusing mixed settings, sharding, and the summary statistics."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from sftscope.errors import SftscopeError
from sftscope.experiments.sweep import (
    SUMMARY_COLUMNS,
    JobOutput,
    SweepConfig,
    paired_p,
    pigeonhole_ci,
    run_sweep,
    summarize,
    validate_suggestions,
)
from sftscope.metrics.stats import proportion_ci
from sftscope.segments import masks_from_text

N_ITEMS = 20


def _cfg(model, data, out, **kw) -> SweepConfig:
    kw.setdefault("segments", 2)
    kw.setdefault("masks", "singles")
    kw.setdefault("seeds", 2)
    kw.setdefault("bootstrap", 200)
    return SweepConfig(out=str(out), model=str(model), train=data, task=data, **kw)


class FakeJob:
    """Deterministic per-item scores: mask 10 is right on every item, 01 on a third, 11 on
    half; counts calls per job; optionally 'killed' (raises) at call number ``kill_at``."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.calls: Counter[str] = Counter()
        self.n = 0
        self.kill_at = kill_at

    def __call__(self, job) -> JobOutput:
        self.n += 1
        self.calls[job.name] += 1
        (job.dir / "partial.txt").write_text(f"attempt {job.attempt}")
        if self.kill_at is not None and self.n == self.kill_at:
            raise KeyboardInterrupt  # the process dies in the middle of this job
        assert job.dir.name == f"{job.mask}-s{job.seed}"
        rate = {"10": 1.0, "01": 1 / 3, "11": 0.5}.get(job.mask, 0.25)
        vals = [float(i < round(rate * N_ITEMS)) for i in range(N_ITEMS)]
        return JobOutput.from_scores({"accuracy": vals}, trainable_params=100 + len(job.mask))


@pytest.fixture()
def tiny(model_dir):
    return model_dir("llama")  # 4 blocks


@pytest.fixture()
def data(gsm8k_file):
    return f"gsm8k:{gsm8k_file}"


def test_resume_after_kill(tiny, data, tmp_path):
    out = tmp_path / "run"
    killer = FakeJob(kill_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(tiny, data, out), job_fn=killer)
    # seed-major order: 11-s0, 10-s0, 01-s0 finished; 11-s1 was killed mid-way
    done = sorted(p.parent.name for p in out.glob("jobs/*/result.json"))
    assert done == ["01-s0", "10-s0", "11-s0"]
    assert (out / "jobs/11-s1/job.json").is_file()
    assert not (out / "jobs/11-s1/result.json").exists()
    assert "KeyboardInterrupt" in json.loads((out / "jobs/11-s1/job.json").read_text())["error"]

    again = FakeJob()
    res = run_sweep(_cfg(tiny, data, out), job_fn=again)
    assert set(again.calls) == {"11-s1", "10-s1", "01-s1"}  # finished jobs are not re-run
    assert all(c == 1 for c in again.calls.values())
    assert (out / "jobs/11-s1/partial.txt").read_text() == "attempt 2"
    assert sorted(res.skipped) == ["01-s0", "10-s0", "11-s0"] and not res.pending
    res = run_sweep(_cfg(tiny, data, out), job_fn=again)  # nothing left to do
    assert sum(again.calls.values()) == 3 and res.ran == []

    s = masks_from_text(pd.read_csv(out / "summary.csv"))
    assert list(s.columns) == SUMMARY_COLUMNS
    assert list(s["mask"]) == ["11", "10", "01"]
    row = s.set_index("mask")
    assert row.loc["10", "mean"] == 1.0 and row.loc["10", "seeds"] == 2
    assert row.loc["10", "n_items"] == N_ITEMS and row.loc["10", "trainable_params"] == 102
    assert math.isnan(row.loc["11", "p_value"]) and row.loc["10", "p_value"] < 1e-3
    pos = masks_from_text(pd.read_csv(out / "position.csv"))
    assert list(pos["segment"]) == [0, 1] and list(pos["mask"]) == ["10", "01"]
    assert list(pos["depth"]) == [0.25, 0.75] and list(pos["first_block"]) == [0, 2]
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "sweep" and rec["n_blocks"] == 4


def test_refuses_other_settings(tiny, model_dir, data, tmp_path, gsm8k_file):
    out = tmp_path / "run"
    run_sweep(_cfg(tiny, data, out, masks="10", seeds=1, tune={"rank": 8}), job_fn=FakeJob())
    # adding masks and seeds is fine
    run_sweep(_cfg(tiny, data, out, masks="01", seeds=2, tune={"rank": 8}), job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="tune option rank is 8 there but 16 now"):
        run_sweep(_cfg(tiny, data, out, tune={"rank": 16}), job_fn=FakeJob())
    other = model_dir("llama", seed=1)
    with pytest.raises(SftscopeError, match="model is .* there but"):
        run_sweep(_cfg(other, data, out, tune={"rank": 8}), job_fn=FakeJob())
    edited = tmp_path / "other.jsonl"
    edited.write_text(gsm8k_file.read_text().replace("apples", "pears"))
    with pytest.raises(SftscopeError, match="training data") as e:
        run_sweep(SweepConfig(out=str(out), model=str(tiny), train=f"gsm8k:{edited}",
                              task=data, segments=2, tune={"rank": 8}), job_fn=FakeJob())
    assert "\n" not in str(e.value)
    with pytest.raises(SftscopeError, match="segments is 2 there but 4 now"):
        run_sweep(_cfg(tiny, data, out, segments=4, masks="1000", tune={"rank": 8}),
                  job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="eval option limit"):
        run_sweep(_cfg(tiny, data, out, tune={"rank": 8}, evaluation={"limit": 3}),
                  job_fn=FakeJob())


def test_bad_input(tiny, data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SftscopeError, match="valid groups are singles, paper, all"):
        run_sweep(_cfg(tiny, data, out, masks="singles,middle"), job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="has 3 characters but --segments is 2"):
        run_sweep(_cfg(tiny, data, out, masks="010"), job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="larger than the model's 4 blocks"):
        run_sweep(_cfg(tiny, data, out, segments=5, masks="10000"), job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="unknown tune option"):
        run_sweep(_cfg(tiny, data, out, tune={"rnak": 8}), job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="--job-index"):
        run_sweep(_cfg(tiny, data, out, job_index=2, num_jobs=2), job_fn=FakeJob())
    assert not (out / "sweep.json").exists()  # nothing written on bad input


def test_cli_errors_are_one_line(tiny, data, tmp_path, capsys):
    from sftscope.cli import main

    base = ["sweep", "--model", str(tiny), "--train", data, "--eval", data, "--out",
            str(tmp_path / "r"), "--segments", "2"]
    for extra, text in ((["--masks", "bogus"], "valid groups are"),
                        (["--masks", "01000"], "has 5 characters but --segments is 2"),
                        (["--segments", "9", "--masks", "singles"], "larger than the model")):
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0]


def test_shards_then_summarize(tiny, data, tmp_path):
    out = tmp_path / "run"
    fns = [FakeJob(), FakeJob()]
    r0 = run_sweep(_cfg(tiny, data, out, job_index=0, num_jobs=2), job_fn=fns[0])
    assert r0.pending and not (out / "summary.csv").exists()  # other shard not done yet
    run_sweep(_cfg(tiny, data, out, job_index=1, num_jobs=2), job_fn=fns[1])
    assert not set(fns[0].calls) & set(fns[1].calls)
    assert len(fns[0].calls) + len(fns[1].calls) == 6
    res = run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=200))
    assert res.ran == [] and not res.pending
    assert set(masks_from_text(pd.read_csv(out / "summary.csv"))["mask"]) == {"11", "10",
                                                                                  "01"}


def _items(masks: dict[str, np.ndarray]) -> pd.DataFrame:
    rows = []
    for mask, y in masks.items():
        y = np.atleast_2d(y)
        for s in range(y.shape[0]):
            rows += [(mask, s, str(i), "accuracy", float(v)) for i, v in enumerate(y[s])]
    return pd.DataFrame(rows, columns=["mask", "seed", "item", "metric", "value"])


def test_statistics_known_answers():
    n = 100
    half = (np.arange(n) % 2).astype(float)
    items = _items({"11111": half, "01000": np.ones(n), "00100": half.copy()})
    s = summarize(items, n_blocks=10, n_boot=2000).set_index("mask")
    assert list(s.index) == ["11111", "01000", "00100"]
    # all correct: mean 1; a constant has no bootstrap spread, so the Wilson interval of 100/100
    assert s.loc["01000", "mean"] == 1.0
    assert (s.loc["01000", "ci_low"], s.loc["01000", "ci_high"]) == pytest.approx(
        proportion_ci(100, 100))
    assert s.loc["01000", "ci_low"] == pytest.approx(0.963, abs=1e-3)
    # half correct: mean 0.5, the bootstrap interval is close to +-1.96 * 0.05
    assert s.loc["11111", "mean"] == 0.5
    assert s.loc["11111", "ci_low"] == pytest.approx(0.40, abs=0.02)
    assert s.loc["11111", "ci_high"] == pytest.approx(0.60, abs=0.02)
    # p-values: NaN for the baseline itself, tiny for all-correct, exactly 1 for identical
    assert math.isnan(s.loc["11111", "p_value"])
    assert s.loc["01000", "p_value"] < 1e-10 and s.loc["01000", "delta"] == 0.5
    assert s.loc["00100", "p_value"] == 1.0 and s.loc["00100", "delta"] == 0.0
    assert s.loc["01000", "blocks"] == "2-3" and s.loc["01000", "n_items"] == n


def test_statistics_seeds_and_items():
    rng = np.random.default_rng(0)
    n, seeds = 200, 3
    # per-seed level shifts: the interval must widen compared with one seed alone
    y = np.stack([(rng.random(n) < p).astype(float) for p in (0.3, 0.5, 0.7)])
    one = pigeonhole_ci(y[1:2], n_boot=2000)
    both = pigeonhole_ci(y, n_boot=2000)
    assert both[1] - both[0] > 1.5 * (one[1] - one[0])
    assert both[0] < y.mean() < both[1]
    # pairing uses shared seeds and items only; the per-item seed mean is the unit
    a = _items({"01": y})
    b = _items({"11": y[:2]})
    p, delta, n_pairs = paired_p(a, b)
    assert n_pairs == n and delta == 0.0 and p == 1.0
    b2 = _items({"11": np.zeros((seeds, n))})
    p2, d2, _ = paired_p(a, b2)
    assert d2 == pytest.approx(y.mean()) and p2 < 1e-10
    assert math.isnan(paired_p(a, _items({"11": np.zeros((1, n))}).assign(seed=9))[0])


def test_validate_suggestions_ranks():
    summary = pd.DataFrame({"mask": ["11111", "10000", "01000", "00100", "00010", "00001"],
                            "metric": "accuracy", "mean": [0.28, 0.22, 0.375, 0.3, 0.27, 0.135]})
    v = validate_suggestions(summary, {"pair": "01000", "angular": "00100",
                                       "gradient": "01100"}, "accuracy",
                             {"angular": np.array([0.2, 0.9, 0.7, 0.5, 0.1])}).set_index(
                                 "method")
    assert v.loc["pair", "rank"] == 1 and v.loc["pair", "n_masks"] == 6
    assert v.loc["angular", "rank"] == 2 and v.loc["angular", "best_mask"] == "01000"
    assert v.loc["angular", "best_score"] == 0.375
    assert not v.loc["gradient", "in_sweep"] and math.isnan(v.loc["gradient", "rank"])
    assert v.loc["angular", "spearman_singles"] == pytest.approx(1.0)
    # baselines: the prior-only mask (segment centre nearest 30 % depth: 01000 of 5) ranks 1;
    # a random interior one-segment mask (01000, 00100, 00010: ranks 1, 2, 4) 7/3 on average
    assert (v["prior_mask"] == "01000").all() and (v["prior_rank"] == 1).all()
    assert v.loc[["pair", "angular"], "random_rank"].to_numpy() == pytest.approx([7 / 3] * 2)
    assert (v.loc[["pair", "angular"], "n_interior"] == 3).all()
    # a two-segment proposal is compared with two-segment masks (none swept here)
    assert v.loc["gradient", "n_interior"] == 0 and math.isnan(v.loc["gradient", "random_rank"])
    assert v.loc["pair", "random_as_good"] == pytest.approx(1 / 3)
    assert v.loc["angular", "random_as_good"] == pytest.approx(2 / 3)
    assert math.isnan(v.loc["gradient", "random_as_good"])
    # fewer than 3 segments: no interior segment, no random baseline
    two = validate_suggestions(pd.DataFrame({"mask": ["11", "10", "01"], "metric": "loss",
                                             "mean": [1.0, 2.0, 0.5]}), {"a": "01"}, "loss")
    assert two.loc[0, "rank"] == 1 and two.loc[0, "prior_mask"] == "10"
    assert two.loc[0, "prior_rank"] == 3 and math.isnan(two.loc[0, "random_rank"])


@pytest.mark.slow
def test_end_to_end_real_jobs(tiny, data, tmp_path):
    """Two masks x one seed with the real tune + evaluate (a few steps, 2 eval items)."""
    out = tmp_path / "run"
    cfg = SweepConfig(
        out=str(out), model=str(tiny), train=data, task=data, segments=2, masks="10,11",
        seeds=1, tune={"rank": 4, "max_steps": 2, "batch_size": 2, "micro_batch_size": 2,
                       "n_train": 4, "dtype": "float32", "save_steps": 1},
        evaluation={"limit": 2, "shots": 0, "max_new_tokens": 8, "device": "cpu"},
        bootstrap=100)
    res = run_sweep(cfg)
    assert sorted(res.ran) == ["10-s0", "11-s0"]
    s = res.summary
    assert set(s["metric"]) == {"strict_match", "flexible_extract", "numeric_match"}
    assert set(s["n_items"]) == {2} and set(s["seeds"]) == {1}
    assert s["trainable_params"].notna().all()
    p = s.set_index(["mask", "metric"])["trainable_params"]
    assert abs(p[("10", "flexible_extract")] / p[("11", "flexible_extract")] - 1) < 0.1
    assert res.primary_metric == "flexible_extract"
    assert s["metric"].iloc[0] == "flexible_extract"
    assert (out / "jobs/10-s0/tune/adapter/adapter_config.json").is_file()
    assert (out / "jobs/10-s0/eval/predictions-gsm8k.jsonl").is_file()
    again = run_sweep(cfg)  # resumes: nothing to do
    assert again.ran == []


def _real_cfg(tiny, data, out, **kw) -> SweepConfig:
    return SweepConfig(
        out=str(out), model=str(tiny), train=data, task=data, segments=2, masks="10,11",
        seeds=1, tune={"rank": 4, "max_steps": 2, "batch_size": 2, "micro_batch_size": 2,
                       "n_train": 4, "dtype": "float32", "save_steps": 1},
        evaluation={"limit": 2, "shots": 0, "max_new_tokens": 8, "device": "cpu"},
        bootstrap=100, **kw)


@pytest.mark.slow
def test_local_shards_run_every_job_once_and_match_one_process(tiny, data, tmp_path,
                                                               monkeypatch):
    """``run_local_shards``: two ``sftscope sweep`` processes share the jobs (each job run by
    one of them), then a collect writes the tables; every per-item score equals a run of the
    same jobs in this process on one thread."""
    import dataclasses
    import subprocess

    from sftscope.experiments.sweep import run_local_shards
    from sftscope.load.runtime import torch_threads

    cfg = _real_cfg(tiny, data, tmp_path / "sharded")
    run_local_shards(cfg, 2, threads=1)
    for name in ("10-s0", "11-s0"):
        state = json.loads((tmp_path / "sharded/jobs" / name / "job.json").read_text())
        assert state["attempt"] == 1 and "error" not in state
    assert not (tmp_path / "sharded/summary.csv").exists()  # the shards leave the tables
    res = run_sweep(dataclasses.replace(cfg, collect=True))
    assert res.ran == [] and res.pending == [] and res.written
    assert (tmp_path / "sharded/summary.csv").is_file()
    monkeypatch.setattr(subprocess, "Popen", None)  # every job done: no process is started
    run_local_shards(cfg, 2, threads=1)
    with torch_threads(1):
        one = run_sweep(_real_cfg(tiny, data, tmp_path / "one"))
    assert sorted(one.ran) == ["10-s0", "11-s0"]
    for name in one.ran:
        a = pd.read_csv(tmp_path / "sharded/jobs" / name / "items.csv")
        b = pd.read_csv(tmp_path / "one/jobs" / name / "items.csv")
        pd.testing.assert_frame_equal(a, b)
    cols = ["mask", "metric", "mean", "n_items"]
    pd.testing.assert_frame_equal(res.summary[cols], one.summary[cols])


def test_local_shards_failure_is_one_error(tiny, data, tmp_path, capfd):
    """A shard that fails (here: the folder holds a sweep made with another LoRA rank) ends in
    its own one-line error and the caller's SftscopeError naming the shards."""
    from sftscope.experiments.sweep import run_local_shards

    out = tmp_path / "run"
    run_sweep(_cfg(tiny, data, out, masks="10", seeds=1, tune={"rank": 8}), job_fn=FakeJob())
    cfg = _cfg(tiny, data, out, masks="01", seeds=1, tune={"rank": 16})
    with pytest.raises(SftscopeError, match=r"sweep shard\(s\) 0, 1 of 2 failed"):
        run_local_shards(cfg, 2)
    err = capfd.readouterr().err
    assert "Traceback" not in err and err.count("error:") >= 2
    with pytest.raises(SftscopeError, match="processes >= 1"):
        run_local_shards(cfg, 0)


def test_validate_suggest(tiny, data, tmp_path):
    out = tmp_path / "run"
    res = run_sweep(_cfg(tiny, data, out, seeds=1, validate_suggest=True,
                         suggest={"n_samples": 4, "grad_samples": 4, "device": "cpu"}),
                    job_fn=FakeJob())
    v = masks_from_text(pd.read_csv(out / "suggest_validation.csv"))
    assert set(v["method"]) == {"angular", "gradient", "combined"}
    assert list(v.columns[:3]) == ["method", "mask", "rank"]
    assert {"prior_mask", "prior_rank", "random_rank", "n_masks", "score", "best_mask",
            "best_score"} <= set(v.columns)
    assert (v["prior_mask"] == "10").all()  # 2 segments: centres 25 % and 75 %
    assert (v["n_masks"] == 3).all() and (v["best_mask"] == "10").all()
    assert (v["best_score"] == 1.0).all()
    for r in v.itertuples():  # every proposal of 2 segments is a swept mask here
        assert r.in_sweep and 1 <= r.rank <= 3
        assert r.score == res.summary.set_index("mask").loc[r.mask, "mean"]
    assert (out / "suggest" / "suggest.json").is_file()


def test_end_to_end_full_fine_tuning_jobs(tiny, data, tmp_path):
    """--method full passes through to tune; the evaluation loads the job's model folder."""
    out = tmp_path / "run"
    cfg = SweepConfig(
        out=str(out), model=str(tiny), train=data, task=data, segments=2, masks="01",
        seeds=1, baseline=False, tune={"method": "full", "max_steps": 1, "batch_size": 2,
                                       "micro_batch_size": 2, "n_train": 2,
                                       "dtype": "float32", "lr": 1e-3},
        evaluation={"limit": 2, "shots": 0, "max_new_tokens": 4, "device": "cpu"},
        bootstrap=50)
    res = run_sweep(cfg)
    assert res.ran == ["01-s0"]
    job = out / "jobs" / "01-s0"
    assert (job / "tune" / "model" / "config.json").is_file()
    assert not (job / "tune" / "adapter").exists()
    ev = json.loads((job / "eval" / "run.json").read_text())
    assert ev["config"]["model"] == str(job / "tune" / "model") and ev["config"]["adapter"] is None
    result = json.loads((job / "result.json").read_text())
    assert result["info"]["method"] == "full" and result["trainable_params"] > 0
    assert (job / "tune" / "dynamics.csv").is_file()


def test_sweep_recorded_before_new_tune_options_resumes(tiny, data, tmp_path):
    """A sweep.json written before an option existed still matches its default."""
    out = tmp_path / "run"
    run_sweep(_cfg(tiny, data, out, masks="10", seeds=1), job_fn=FakeJob())
    rec = json.loads((out / "sweep.json").read_text())
    for k in ("method", "dynamics_every"):
        rec["settings"]["tune"].pop(k)
    (out / "sweep.json").write_text(json.dumps(rec))
    run_sweep(_cfg(tiny, data, out, masks="01", seeds=1), job_fn=FakeJob())
    with pytest.raises(SftscopeError, match="tune option method is lora there but full now"):
        run_sweep(_cfg(tiny, data, out, masks="01", seeds=1, tune={"method": "full"}),
                  job_fn=FakeJob())


def test_full_method_refuses_lora_options_before_any_job(tiny, data, tmp_path):
    with pytest.raises(SftscopeError, match="--rank is a LoRA option"):
        _cfg(tiny, data, tmp_path / "run", tune={"method": "full", "rank": 8})
    assert not (tmp_path / "run").exists()


class FailingJob(FakeJob):
    """A FakeJob whose job ``fail`` raises a user error."""

    def __init__(self, fail: str) -> None:
        super().__init__()
        self.fail = fail

    def __call__(self, job) -> JobOutput:
        if job.name == self.fail:
            raise SftscopeError("out of memory on the node")
        return super().__call__(job)


def test_collect_reports_missing_failed_unfinished_and_refuses_mixed(tiny, data, tmp_path):
    """Shards write to one folder; --collect pools the finished jobs, names the missing,
    failed and unfinished ones, and refuses jobs made with other settings."""
    out = tmp_path / "shared"
    kw = {"seeds": 3, "num_jobs": 2, "bootstrap": 200}
    # seed-major job list; shard 0 takes 11-s0 01-s0 10-s1 11-s2 01-s2
    run_sweep(_cfg(tiny, data, out, job_index=0, **kw), job_fn=FakeJob())
    # shard 1 has 10-s0 11-s1 01-s1 10-s2: the second fails and stops the shard
    with pytest.raises(SftscopeError, match="out of memory"):
        run_sweep(_cfg(tiny, data, out, job_index=1, **kw), job_fn=FailingJob("11-s1"))
    # 01-s1 was killed by the scheduler (started, no result, no error)
    (out / "jobs/01-s1").mkdir()
    (out / "jobs/01-s1/job.json").write_text(json.dumps({"mask": "01", "seed": 1,
                                                          "attempt": 1, "host": "node7"}))
    res = run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=200))
    assert res.ran == [] and res.written
    assert res.missing == ["10-s2"] and res.unfinished == ["01-s1"]
    assert list(res.failed) == ["11-s1"] and "out of memory" in res.failed["11-s1"]
    assert sorted(res.pending) == ["01-s1", "10-s2", "11-s1"]
    rec = json.loads((out / "run.json").read_text())
    assert rec["jobs_missing"] == ["10-s2"] and rec["jobs_unfinished"] == ["01-s1"]
    assert set(rec["jobs_failed"]) == {"11-s1"} and len(rec["jobs_done"]) == 6
    s = masks_from_text(pd.read_csv(out / "summary.csv")).set_index("mask")
    assert s.loc["11", "seeds"] == 2 and s.loc["10", "seeds"] == 2 and s.loc["01", "seeds"] == 2
    # the old flag name is the same command
    from sftscope.config.core import build

    assert build(SweepConfig, {"out": str(out), "summarize_only": True}).collect
    # settings given with --collect must be the sweep's
    with pytest.raises(SftscopeError, match="tune option rank"):
        run_sweep(_cfg(tiny, data, out, collect=True, tune={"rank": 16}, **kw))
    # a job of another sweep copied into the shared folder is refused, by name
    other = tmp_path / "other"
    run_sweep(_cfg(tiny, data, other, masks="10", seeds=1, tune={"rank": 16}),
              job_fn=FakeJob())
    shutil.rmtree(out / "jobs/10-s0")
    shutil.copytree(other / "jobs/10-s0", out / "jobs/10-s0")
    with pytest.raises(SftscopeError, match=r"1 finished job\(s\) were made with other "
                                            r"settings .*10-s0") as e:
        run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=200))
    assert "\n" not in str(e.value)


_RANK_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from sftscope.errors import SftscopeError
from sftscope.experiments import sweep as S
S.WAIT_POLL_S = 0.05
rank = int(os.environ["RANK"])
out, model, data, fail = sys.argv[1:5]

def job_fn(job):
    (Path(out).parent / f"ran-rank{rank}-{job.name}").write_text("x")
    if rank == 0:  # as in DDP training, the job needs the other rank too
        t0 = time.time()
        while not (Path(out).parent / f"ran-rank1-{job.name}").exists():
            assert time.time() - t0 < 60
            time.sleep(0.02)
        time.sleep(0.3)  # evaluating: the other rank must wait for this job's result
        if job.name == fail:
            raise SftscopeError("boom on rank 0")
    return S.JobOutput.from_scores({"accuracy": [1.0, 0.0, 1.0]}, trainable_params=10)

cfg = S.SweepConfig(out=out, model=model, train=data, task=data, segments=2, masks="10,01",
                    seeds="1", bootstrap=50)
try:
    res = S.run_sweep(cfg, job_fn=job_fn)
    print(json.dumps({"ran": res.ran, "written": res.written}))
except SftscopeError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.mark.slow
def test_launched_shard_rank0_writes_and_others_wait(tiny, data, tmp_path):
    """A shard under accelerate launch/torchrun: every rank runs each job (tune trains on all),
    rank 0 alone writes the job files, the other rank waits for its result; a job failing on
    rank 0 stops the other rank too."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "sweep"
    root = Path(__file__).resolve().parents[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(root / "src"), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "t1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(out), str(tiny),
                                       data, "01-s0"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    got = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se[-2000:]
        got.append(json.loads(so.strip().splitlines()[-1]))
    jobs = ("11-s0", "10-s0", "01-s0")  # seed-major; the last one fails on rank 0
    assert sorted(p.name for p in tmp_path.glob("ran-rank*")) == \
        sorted(f"ran-rank{r}-{j}" for r in (0, 1) for j in jobs)
    for j in jobs[:2]:  # finished: rank 0 wrote the job's files
        assert json.loads((out / "jobs" / j / "result.json").read_text())["mask"] == j[:2]
        state = json.loads((out / "jobs" / j / "job.json").read_text())
        assert state["launch"] == "t1:127.0.0.1:29999" and state["pid"] == procs[0].pid
    assert got[0] == {"error": "boom on rank 0"}
    assert got[1] == {"error": "job 01-s0 failed on rank 0: SftscopeError: boom on rank 0"}


def test_validate_suggest_reads_only_the_training_data(tiny, tmp_path, monkeypatch):
    """suggest (and so --validate-suggest) must not see the evaluation items: it reads the
    sweep's training file, its training split, and never the evaluation file."""
    from sftscope.load import data as D

    def rows(kind: str, n: int) -> list[dict]:
        return [{"question": f"{kind} question {i}: {kind} has {i} pears. How many?",
                 "answer": f"{kind} counts {i}.\n#### {i}"} for i in range(n)]

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows("TRAIN", 8)))
    test.write_text("\n".join(json.dumps(r) for r in rows("HELDOUT", 8)))
    sources: list[tuple[str, str | None]] = []
    texts: list[str] = []
    real_load, real_tokenize = D.load_records, D.tokenize

    def load_records(source, split=None, **kw):
        sources.append((str(source), split))
        return real_load(source, split, **kw)

    def tokenize(samples, *a, **kw):
        texts.extend(s.text for s in samples)
        return real_tokenize(samples, *a, **kw)

    monkeypatch.setattr(D, "load_records", load_records)
    monkeypatch.setattr(D, "tokenize", tokenize)
    out = tmp_path / "run"
    cfg = SweepConfig(out=str(out), model=str(tiny), train=f"gsm8k:{train}",
                      task=f"gsm8k:{test}", segments=2, masks="singles", seeds=1,
                      bootstrap=50, validate_suggest=True,
                      suggest={"n_samples": 4, "grad_samples": 4, "device": "cpu"})
    res = run_sweep(cfg, job_fn=FakeJob())
    assert res.validation is not None and len(res.validation)
    assert sources and all(str(test) not in src for src, _ in sources)
    assert any(str(train) in src for src, _ in sources)
    assert texts and not any("HELDOUT" in t for t in texts)
    run = json.loads((out / "suggest" / "run.json").read_text())
    assert run["config"]["data"] == f"gsm8k:{train}" and run["config"]["split"] == "train"
    from sftscope.config.commands import SuggestConfig

    assert SuggestConfig.__dataclass_fields__["split"].default == "train"


def test_random_baseline_has_the_proposals_shape():
    """A proposal with two segments on is compared with random interior masks with two
    segments on (it used to be compared with one-segment masks only)."""
    masks = ["11111", "10000", "01000", "00100", "00010", "00001", "01100", "01010", "00110"]
    means = [0.30, 0.20, 0.40, 0.35, 0.30, 0.10, 0.50, 0.45, 0.25]
    summary = pd.DataFrame({"mask": masks, "metric": "accuracy", "mean": means})
    v = validate_suggestions(summary, {"two": "01010", "one": "00100"},
                             "accuracy").set_index("method")
    # ranks: 01100 1, 01010 2, 01000 3, 00100 4, 00010 and 11111 tie at 5, 00110 7
    assert v.loc["two", "rank"] == 2 and v.loc["two", "n_interior"] == 3
    assert v.loc["two", "random_rank"] == pytest.approx((1 + 2 + 7) / 3)
    assert v.loc["two", "random_as_good"] == pytest.approx(2 / 3)
    assert v.loc["one", "n_interior"] == 3
    assert v.loc["one", "random_rank"] == pytest.approx((3 + 4 + 5) / 3)


def test_retention_kl_and_forgetting_correlation(tiny, data, tmp_path):
    """Real jobs with a retention set: each job's KL and loss drop equal a direct computation,
    and the sweep reports their rank correlation across masks."""
    import json

    import pandas as pd

    from sftscope.experiments.distributions import output_divergence
    from sftscope.experiments.forgetting import forgetting_table
    from sftscope.load import data as D
    from sftscope.load.models import LoadOptions, load_model, load_tokenizer
    from sftscope.load.runtime import pad_id

    out = tmp_path / "run"
    cfg = SweepConfig(
        out=str(out), model=str(tiny), train=data, task=data, segments=3,
        masks="100,010,001", seeds=1, baseline=False, retention=data, retention_limit=4,
        tune={"rank": 4, "max_steps": 3, "batch_size": 2, "micro_batch_size": 2,
              "n_train": 4, "dtype": "float32", "lr": 5e-2},
        evaluation={"limit": 2, "shots": 0, "max_new_tokens": 4, "device": "cpu"},
        bootstrap=100)
    run_sweep(cfg)
    table = pd.read_csv(out / "forgetting.csv")
    assert list(table["mask"]) == ["m001", "m010", "m100"]
    res = json.loads((out / "jobs" / "010-s0" / "result.json").read_text())
    ret = res["info"]["retention"]
    tok = load_tokenizer(str(tiny))
    prep = D.prepare(data, tok, n=4, seed=0, max_length=512)
    base = load_model(str(tiny))
    tuned = load_model(str(out / "jobs" / "010-s0" / "tune" / "adapter"),
                       LoadOptions(base=str(tiny)))
    want = output_divergence(base, tuned, prep.tokens, pad_id(tok))
    assert ret["kl"] == pytest.approx(want["kl"], rel=1e-5) and ret["kl"] > 0
    assert ret["drop"] == pytest.approx(want["loss_b"] - want["loss_a"], rel=1e-5, abs=1e-7)
    rec = json.loads((out / "run.json").read_text())
    assert rec["forgetting"]["n_masks"] == 3
    made = pd.DataFrame({"mask": ["a", "b", "c", "d"], "seed": 0, "kl": [1, 2, 3, 4],
                         "drop": [0.1, 0.3, 0.2, 0.4], "loss_base": 1.0, "loss_tuned": 1.0,
                         "n_tokens": 10})
    assert forgetting_table(made, n_boot=0)[1]["spearman_kl_drop"] == pytest.approx(0.8)
