"""Kill -9 and Ctrl-C on real processes: the same command continues and gives the exact result
of an uninterrupted run (analyze resumed with another batch size, tune, sweep)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "SFTSCOPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "SFTSCOPE_PROGRESS_EVERY": "1"}


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftscope", *args], env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sftscope", *args], env=env or ENV,
                          capture_output=True, text=True, timeout=600)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """Enough texts that a capture takes a few seconds and checkpoints on the way."""
    p = tmp_path_factory.mktemp("kill") / "texts.jsonl"
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "far",
             "into", "the", "old", "green", "forest"]
    rows = [{"text": " ".join(words[(i * 7 + k) % len(words)] for k in range(20 + i % 30))}
            for i in range(600)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _metrics(folder: Path) -> pd.DataFrame:
    df = pd.read_csv(folder / "metrics.csv")
    return df.sort_values(["model", "metric", "layer"]).reset_index(drop=True)


def test_analyze_kill9_then_resume_with_another_batch_size(model_dir, texts, tmp_path):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    common = ["analyze", "--base", base, "--sft", sft, "--data", str(texts), "--limit", "600",
              "--n-token", "40", "--max-length", "48", "--device", "cpu",
              "--checkpoint-every", "0"]
    ref = _run([*common, "--batch-size", "8", "--out", str(tmp_path / "ref"), "--cache-dir",
                str(tmp_path / "c-ref")])
    assert ref.returncode == 0, ref.stderr
    cache = tmp_path / "c"
    proc = _start([*common, "--batch-size", "8", "--out", str(tmp_path / "run"), "--cache-dir",
                   str(cache)])
    saw = _wait_for(lambda: any(cache.glob("*.partial.safetensors")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert saw, "no checkpoint before the kill"
    assert not (tmp_path / "run" / "run.json").exists()
    again = _run([*common, "--batch-size", "24", "--out", str(tmp_path / "run"), "--cache-dir",
                  str(cache)])
    assert again.returncode == 0, again.stderr
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    resumed = [c.get("resumed_samples", 0) for c in rec["capture"].values()]
    assert max(resumed) > 0, rec["capture"]
    a, b = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    pd.testing.assert_frame_equal(a[["layer", "metric", "model"]], b[["layer", "metric", "model"]])
    assert (a["value"] - b["value"]).abs().max() < 1e-6


def test_analyze_ctrl_c_says_how_to_resume(model_dir, texts, tmp_path):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    cache = tmp_path / "c"
    args = ["analyze", "--base", base, "--sft", sft, "--data", str(texts), "--limit", "600",
            "--n-token", "40", "--max-length", "48", "--device", "cpu", "--cache-dir",
            str(cache), "--checkpoint-every", "0", "--out", str(tmp_path / "run")]
    proc = _start(args)
    _wait_for(lambda: any(cache.glob("*.partial.safetensors")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1] == "sftscope: interrupted; run the same command again to resume", err
    assert "Traceback" not in err
    assert any(cache.glob("*.partial.safetensors")), "Ctrl-C did not checkpoint"
    again = _run(args)
    assert again.returncode == 0, again.stderr


def test_tune_kill9_then_resume(model_dir, gsm8k_file, tmp_path):
    model = str(model_dir("llama", n_layers=4))
    common = ["tune", "--model", model, "--train", f"gsm8k:{gsm8k_file}", "--mask", "01",
              "--max-steps", "8", "--save-steps", "2", "--batch-size", "2",
              "--micro-batch-size", "2", "--rank", "4", "--lr", "5e-3", "--no-eval",
              "--n-train", "0", "--dropout", "0"]
    ref = _run([*common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    proc = _start([*common, "--out", str(out)])
    saw = _wait_for(lambda: (out / "checkpoints" / "checkpoint-4").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not saw:
        pytest.skip("training finished before the kill")
    refused = _run([*common, "--out", str(out)])
    assert refused.returncode == 2 and "--resume" in refused.stderr
    again = _run([*common, "--resume", "--out", str(out)])
    assert again.returncode == 0, again.stderr
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "ref" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4, k


def test_sweep_kill9_then_resume(model_dir, gsm8k_file, tmp_path):
    model = str(model_dir("llama", n_layers=4))
    data = f"gsm8k:{gsm8k_file}"
    common = ["sweep", "--model", model, "--train", data, "--task", data, "--segments", "2",
              "--masks", "singles", "--seeds", "1", "--max-steps", "2", "--n-train", "4",
              "--batch-size", "2", "--micro-batch-size", "2", "--rank", "2", "--eval-limit",
              "2", "--eval-shots", "0", "--eval-max-new-tokens", "2", "--bootstrap", "20",
              "--dropout", "0"]
    ref = _run([*common, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    proc = _start([*common, "--out", str(out)])
    saw = _wait_for(lambda: len(list(out.glob("jobs/*/result.json"))) >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not saw:
        pytest.skip("the sweep finished before the kill")
    again = _run([*common, "--out", str(out)])
    assert again.returncode == 0, again.stderr
    a = pd.read_csv(tmp_path / "ref" / "summary.csv").sort_values(["mask", "metric"])
    b = pd.read_csv(out / "summary.csv").sort_values(["mask", "metric"])
    assert list(a["mask"]) == list(b["mask"])
    assert (a["mean"].to_numpy() - b["mean"].to_numpy()).__abs__().max() < 1e-9


def test_a_killed_unreaped_run_does_not_hold_its_folder(tmp_path):
    """A run killed with -9 whose parent has not reaped it yet (a zombie, as under a container
    init that does not reap) no longer holds its folder: the rerun is not told it is in use."""
    import socket

    from sftscope.runs import _alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(100):  # exited, not waited for: a zombie
            state = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.05)
        else:
            pytest.skip("the child did not become a zombie")
        rec = {"pid": child.pid, "host": socket.gethostname()}
        assert not _alive(rec)
        assert _alive({"pid": os.getppid(), "host": socket.gethostname()})  # a live process
    finally:
        child.wait()
