"""The demo pair's training phases: in this process, or data parallel over worker processes."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sftscope.demo.training import Blocks, Phase, Ranks, train
from sftscope.errors import SftscopeError
from sftscope.io import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _model(family: str = "llama"):
    from sftscope.load.tiny import build_tiny_model

    moe = {"n_experts": 4, "top_k": 2} if family == "mixtral" else {}
    return build_tiny_model(family, 128, seed=0, n_layers=2, hidden=32, n_heads=4,
                            n_kv_heads=2, intermediate=64, **moe)


def _phase(ranks: int, steps: int = 6) -> Phase:
    return Phase("base", steps=steps, lr=1e-2, batch_size=8, seed=0, warmup_frac=0.0,
                 optim="adamw_torch", threads=1, ranks=ranks)


def _blocks() -> Blocks:
    ids = torch.randint(0, 100, (64, 32), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100  # uneven labelled tokens per rank: the loss stays a mean over all
    labels[::3, :20] = -100
    return Blocks(ids, labels)


def test_a_batch_must_split_evenly_over_the_ranks():
    with pytest.raises(SftscopeError, match="divide the batch size"):
        Phase("base", steps=1, lr=1e-3, batch_size=7, seed=0, warmup_frac=0.0,
              optim="adamw_torch", threads=1, ranks=2)
    with pytest.raises(SftscopeError, match="no worker processes"):
        train(_model(), _blocks(), _phase(2), Path("."))


@pytest.mark.slow
def test_two_ranks_train_the_same_batches_as_one_process_and_fail_in_one_line(tmp_path):
    """Rank r gets batches r, r + 2, ... of the one shuffled order, so a step sees the same
    examples as in one process: the weights agree to float rounding (1e-6), where another
    order of the same data would move them by about the learning rate."""
    start = _model().state_dict()
    one, hist1 = train(_model(), _blocks(), _phase(1), tmp_path)
    moe_one, _ = train(_model("mixtral"), _blocks(), _phase(1), tmp_path)
    with Ranks(2, 1, tmp_path) as ranks:
        two, hist2 = train(_model(), _blocks(), _phase(2), tmp_path, ranks)
        assert ranks.cpu["base"] > 0
        moe_two, _ = train(_model("mixtral"), _blocks(), _phase(2), tmp_path, ranks)
        bad = _blocks()
        bad.ids[0, 0] = 10_000  # beyond the vocabulary: the workers' forward pass fails
        with pytest.raises(SftscopeError) as err:
            train(_model(), bad, _phase(2), tmp_path, ranks)
    procs = ranks.procs
    assert all(p.poll() is not None for p in procs)  # leaving the block ended the workers
    msg = str(err.value)
    assert "base phase failed in worker process" in msg and "IndexError" in msg
    assert "\n" not in msg
    a, b = one.state_dict(), two.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    c, d = moe_one.state_dict(), moe_two.state_dict()  # fused experts and a router too
    assert max((c[k] - d[k]).abs().max().item() for k in c) < 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3
    assert [s for s, _ in hist1] == [s for s, _ in hist2]
    assert max(abs(x - y) for (_, x), (_, y) in zip(hist1, hist2)) < 1e-5
    assert not list(tmp_path.glob("ranks.*"))  # the pool's folder is removed


@pytest.mark.slow
def test_a_two_rank_pair_is_reproducible_and_keyed_apart(tmp_path):
    from sftscope.demo.pair import QUICK, build_demo_pair

    cfg = dataclasses.replace(QUICK, n_pretrain=120, n_sft=40, n_test=8, n_train=8,
                              n_general=8, base_steps=4, sft_steps=3, eval_items=2,
                              eval_new_tokens=4, ranks=2)
    a = build_demo_pair(tmp_path / "a", config=cfg)
    b = build_demo_pair(tmp_path / "b", config=cfg)
    for d in ("base_dir", "sft_dir"):
        assert file_sha256(getattr(a, d) / "model.safetensors") == \
            file_sha256(getattr(b, d) / "model.safetensors")
    one = build_demo_pair(tmp_path / "a", config=dataclasses.replace(cfg, ranks=1))
    assert not one.cached and one.key != a.key
    assert a.cpu_seconds["base"] > 0 and a.cpu_seconds["sft"] > 0


KILLED = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_demo_training import _blocks, _model, _phase
    from sftscope.demo.training import Ranks, train
    with Ranks(2, 1, Path({work!r})) as ranks:
        print(" ".join(str(p.pid) for p in ranks.procs), flush=True)
        train(_model(), _blocks(), _phase(2, steps=100_000), Path({work!r}), ranks)
""")


@pytest.mark.slow
def test_workers_stop_when_the_parent_is_killed(tmp_path):
    """kill -9 of the parent leaves no worker training on: each notices within a step or two."""
    script = KILLED.format(tests=str(ROOT / "tests"), work=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SFTSCOPE_NO_PROGRESS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True, env=env)
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("ranks.*/job-1/data.pt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the workers are loading or training
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purpose (its parent, killed, cannot reap it)
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def test_a_pair_whose_sft_batch_does_not_split_is_refused_before_training(tmp_path):
    """Both phases' batches are checked before anything is written: a base batch that splits
    over the ranks does not let an SFT batch that does not start the base training."""
    from sftscope.demo.pair import QUICK, build_demo_pair

    cfg = dataclasses.replace(QUICK, batch_size=6, base_seq_len=QUICK.seq_len // 2, ranks=4)
    with pytest.raises(SftscopeError, match="sft phase splits a batch of 6 over 4 ranks"):
        build_demo_pair(tmp_path / "pair", config=cfg)
    assert not (tmp_path / "pair").exists()
