"""Issue 19 (first half): run folders claimed atomically, one disk-error path for every writer,
Ctrl-C / SIGTERM in tune checkpoints and resumes exactly, a failed rank is one line, a full
fine-tuning run folder is a model, and the smaller refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftscope.cli import main
from sftscope.experiments import tune as TU


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


def _tune_cfg(model, train, out, **kw):
    base = dict(batch_size=2, micro_batch_size=2, max_steps=2, lr=5e-3, logging_steps=1,
                save_steps=100, run_eval=False, n_train=None, mask="01")
    base.update(kw)
    if base.get("method", "lora") == "lora":
        base.setdefault("rank", 2)
        base.setdefault("dropout", 0.0)
    return TU.TuneConfig(model=str(model), train=str(train), out=str(out), **base)


# ------------------------------------------------------------------ a full tune run is a model

def test_full_tune_run_folder_is_accepted_as_model(model_dir, gsm8k_file, tmp_path, capsys):
    base = model_dir("llama", n_layers=4)
    run = tmp_path / "full"
    TU.tune(_tune_cfg(base, f"gsm8k:{gsm8k_file}", run, method="full"))
    assert (run / "model" / "config.json").is_file()
    from sftscope.load.sources import check_model, source_kind

    assert source_kind(str(run)) == "folder"
    assert check_model(str(run)).path == str(run / "model")
    code, err = _cli(["weights", "--base", str(base), "--sft", str(run), "--no-low-rank",
                      "--out", str(tmp_path / "w"), "--device", "cpu"], capsys)
    assert code == 0, err
    import pandas as pd

    w = pd.read_csv(tmp_path / "w" / "weights.csv")
    changed = w[(w["metric"] == "frobenius") & (w["value"] > 0)]["block"].dropna().unique()
    assert set(changed) <= {2, 3} and len(changed) > 0
    code, err = _cli(["eval", "--model", str(run), "--task", "gsm8k", "--data",
                      f"gsm8k:{gsm8k_file}", "--limit", "2", "--shots", "0",
                      "--max-new-tokens", "2", "--device", "cpu"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------ one run per folder

ENV = {**os.environ, "SFTSCOPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftscope", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_second_run_into_one_folder_is_refused_at_once(model_dir, tmp_path):
    """The lock exists before the first run's validation starts; a second run into the same
    --out, started meanwhile, is refused in one line and the first finishes."""
    from sftscope.runs import LOCK

    out = tmp_path / "run"
    args = ["weights", "--base", str(model_dir("llama", seed=0)), "--sft",
            str(model_dir("llama", seed=1)), "--out", str(out), "--device", "cpu"]
    first = _start(args)
    t0 = time.time()
    while not (out / LOCK).exists() and first.poll() is None and time.time() - t0 < 60:
        time.sleep(0.01)
    assert (out / LOCK).exists(), "no lock while the first run validates"
    assert json.loads((out / LOCK).read_text())["pid"] == first.pid
    second = subprocess.run([sys.executable, "-m", "sftscope", *args], env=ENV,
                            capture_output=True, text=True, timeout=300)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], lines
    assert not (out / LOCK).exists()  # released at the end
    assert (out / "run.json").is_file()


def test_lock_of_a_dead_or_zombie_process_is_taken_over(tmp_path):
    from sftscope.errors import SftscopeError
    from sftscope.runs import LOCK, claim, release

    out = tmp_path / "run"
    out.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # exited, not reaped: a zombie
        if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    try:
        (out / LOCK).write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(),
                                            "command": "analyze", "started": "x"}))
        claim(out, "analyze")
        assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
        release(out)
        assert not (out / LOCK).exists() and out.is_dir()
    finally:
        child.wait()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "command": "tune",
            "started": "x"}
    (out / LOCK).write_text(json.dumps(live))
    with pytest.raises(SftscopeError, match=f"in use by process {os.getppid()}"):
        claim(out, "analyze")
    (out / LOCK).write_text(json.dumps({**live, "host": "elsewhere"}))
    with pytest.raises(SftscopeError, match="if that run is gone, delete"):
        claim(out, "analyze")
    assert (out / LOCK).exists()  # a refused claim leaves the owner's lock


def test_refused_run_leaves_no_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "new"
    code, err = _cli(["weights", "--base", str(model_dir("llama", seed=0)), "--sft",
                      str(tmp_path / "nope"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err
    assert not out.exists()


# ------------------------------------------------------------------ Ctrl-C in tune

def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftscope", *args], env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_tune_signal_checkpoints_and_the_same_command_resumes_exactly(model_dir, gsm8k_file,
                                                                       tmp_path, sig):
    from safetensors.torch import load_file

    common = ["tune", "--model", str(model_dir("llama", n_layers=4)), "--train",
              f"gsm8k:{gsm8k_file}", "--mask", "01", "--max-steps", "30", "--save-steps", "1000",
              "--batch-size", "2", "--micro-batch-size", "2", "--rank", "4", "--lr", "5e-3",
              "--no-eval", "--n-train", "0", "--dropout", "0.1", "--logging-steps", "1"]
    ref = _run([*common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    proc = _start([*common, "--out", str(out)])
    t0 = time.time()
    while not (out / "dynamics.csv").exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")
    assert proc.returncode == 130, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1] == "sftscope: interrupted; run the same command again to resume", err
    assert "Traceback" not in err
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name.split("-")[1]) < 30, ckpts
    again = _run([*common, "--out", str(out)])  # the same command, no --resume
    assert again.returncode == 0, again.stderr
    assert f"resuming from {ckpts[0]}" in again.stderr
    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.loads((tmp_path / "ref" / "run.json").read_text())["result"]
    rb = json.loads((out / "run.json").read_text())["result"]
    assert rb["resumed_from"] and rb["steps"] == ra["steps"] == 30
    assert rb["train_loss"] == ra["train_loss"]
    assert rb["loss_history"] == ra["loss_history"]
