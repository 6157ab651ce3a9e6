"""Issue 19 (first half): run folders claimed atomically, one disk-error path for every writer,
Ctrl-C / SIGTERM in tune checkpoints and resumes exactly, a failed rank is one line, a full
fine-tuning run folder is a model, and the smaller refusals."""

from __future__ import annotations

import errno
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


def test_a_released_claim_removes_the_folders_it_created(tmp_path):
    """A run that fails before writing anything leaves no empty folders: neither its run folder
    nor parents the claim made (sftscope-runs/ of a default --out); folders that existed, or
    hold something, stay."""
    from sftscope.runs import claim, release

    out = tmp_path / "sftscope-runs" / "probe-20261207-000000"
    claim(out, "probe")
    assert out.is_dir()
    release(out)
    assert not (tmp_path / "sftscope-runs").exists() and tmp_path.is_dir()
    (tmp_path / "sftscope-runs").mkdir()
    (tmp_path / "sftscope-runs" / "keep.txt").write_text("x")
    claim(out, "probe")
    release(out)
    assert not out.exists() and (tmp_path / "sftscope-runs" / "keep.txt").is_file()


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


def _tune_signal_args(model, gsm8k_file) -> list[str]:
    return ["tune", "--model", str(model), "--train", f"gsm8k:{gsm8k_file}", "--mask", "01",
            "--max-steps", "12", "--save-steps", "1000", "--batch-size", "2",
            "--micro-batch-size", "2", "--rank", "4", "--lr", "5e-3", "--no-eval", "--n-train",
            "0", "--dropout", "0.1", "--logging-steps", "1"]


def _interrupt(args: list[str], out: Path, sig: int) -> str:
    """Start ``args``, send ``sig`` once training has begun (dynamics.csv is written at the
    first step); the stderr of a run that stopped (skip when it finished first)."""
    proc = _start(args)
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
    return err


@pytest.mark.slow
def test_tune_ctrl_c_checkpoints_and_the_same_command_resumes_exactly(model_dir, gsm8k_file,
                                                                      tmp_path, capsys):
    from safetensors.torch import load_file

    common = _tune_signal_args(model_dir("llama", n_layers=4), gsm8k_file)
    code, err = _cli([*common, "--out", str(tmp_path / "ref")], capsys)  # (one thread, too)
    assert code == 0, err
    out = tmp_path / "run"
    _interrupt([*common, "--out", str(out)], out, signal.SIGINT)
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name.split("-")[1]) < 12, ckpts
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
    assert rb["resumed_from"] and rb["steps"] == ra["steps"] == 12
    assert rb["train_loss"] == ra["train_loss"]
    assert rb["loss_history"] == ra["loss_history"]


@pytest.mark.slow
def test_tune_sigterm_checkpoints_too(model_dir, gsm8k_file, tmp_path):
    out = tmp_path / "run"
    args = [*_tune_signal_args(model_dir("llama", n_layers=4), gsm8k_file), "--out", str(out)]
    _interrupt(args, out, signal.SIGTERM)
    ckpts = list((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and 0 < int(ckpts[0].name.split("-")[1]) < 12, ckpts
    assert not (out / ".sftscope-lock").exists()  # released on the way out


# ------------------------------------------------------------------ a full disk, every writer

FULL = "the disk is full; free space or choose another --out"


def _full_disk(monkeypatch, match: str = "", after: int = 0) -> dict[str, int]:
    """Every safetensors write whose path holds ``match`` (after ``after`` good ones) leaves a
    few bytes and fails as a full disk does (OSError ENOSPC, no file name)."""
    import peft.peft_model  # noqa: F401  (imported now, so that its alias is patched too)
    import safetensors.torch as st
    import transformers.modeling_utils  # noqa: F401

    import sftscope.capture.stream  # noqa: F401

    orig = st.save_file
    seen = {"n": 0}

    def fake(tensors, filename, metadata=None):
        if match in str(filename):
            seen["n"] += 1
            if seen["n"] > after:
                Path(filename).write_bytes(b"\0" * 16)
                raise OSError(errno.ENOSPC, "No space left on device")
        return orig(tensors, filename, metadata=metadata)

    for mod in list(sys.modules.values()):
        for name in ("save_file", "safe_save_file"):
            try:
                if getattr(mod, name, None) is orig:
                    monkeypatch.setattr(mod, name, fake)
            except Exception:  # lazy modules that fail on attribute access
                continue
    return seen


def _one_line(err: str, path) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("sftscope: error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    assert "Traceback" not in err
    assert f"cannot write {path}" in lines[0] and f": {FULL}" in lines[0], lines[0]
    return lines[0]


def test_write_errno_reads_every_library():
    from sftscope.io import disk_error, write_errno

    assert write_errno(OSError(errno.ENOSPC, "x")) == errno.ENOSPC
    assert write_errno(RuntimeError("I/O error: No space left on device (os error 28)")) == 28
    assert write_errno(RuntimeError("IoError(Os { code: 122, kind: QuotaExceeded })")) == 122
    assert write_errno(RuntimeError("HTTP status code: 13")) is None
    assert write_errno(RuntimeError("Read-only file system")) == errno.EROFS
    assert write_errno(ValueError("a bug")) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as e:
        assert write_errno(e) == errno.ENOSPC
    msg = str(disk_error(OSError(errno.ENOSPC, "No space left on device")))
    assert "None" not in msg and msg.startswith(f"cannot write to the disk: {FULL}")
    ro = str(disk_error(OSError(errno.EROFS, "x"), "/a/b"))
    assert ro.startswith("cannot write /a/b: the file system is read-only; choose another --out")


def test_text_write_names_the_file(tmp_path, monkeypatch):
    from sftscope.errors import SftscopeError
    from sftscope.io import write_json

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # as f.write does: no name

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SftscopeError) as e:
        write_json(tmp_path / "run.json", {"a": 1})
    assert str(e.value).startswith(f"cannot write {tmp_path / 'run.json'}: {FULL}")
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_analyze_cache_disk_full(model_dir, gsm8k_file, tmp_path, capsys, monkeypatch):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    _full_disk(monkeypatch)
    cache = tmp_path / "cache"
    code, err = _cli(["analyze", "--base", base, "--sft", sft, "--data", f"gsm8k:{gsm8k_file}",
                      "--limit", "4", "--n-token", "2", "--max-length", "32", "--device", "cpu",
                      "--cache-dir", str(cache), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = _one_line(err, cache)
    assert ".safetensors" in line
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert not (tmp_path / "run" / "run.json").exists()


def _tune_args(model, gsm8k_file, out, *extra: str) -> list[str]:
    return ["tune", "--model", str(model), "--train", f"gsm8k:{gsm8k_file}", "--mask", "01",
            "--max-steps", "3", "--batch-size", "2", "--micro-batch-size", "2", "--no-eval",
            "--n-train", "4", "--out", str(out), *extra]


@pytest.mark.parametrize("what", ["adapter", "merged", "model"])
def test_tune_outputs_disk_full(what, model_dir, gsm8k_file, tmp_path, capsys, monkeypatch):
    model = model_dir("llama", n_layers=4)
    out = tmp_path / "run"
    extra = {"adapter": ["--rank", "2"], "merged": ["--rank", "2", "--merge"],
             "model": ["--method", "full"]}[what]
    _full_disk(monkeypatch, match=f"{os.sep}{what}" + ("" if what == "merged" else os.sep))
    code, err = _cli(_tune_args(model, gsm8k_file, out, *extra), capsys)
    assert code == 2
    line = _one_line(err, out / what)
    assert not (out / what).exists() and not (out / f"{what}.partial").exists()
    assert not (out / "run.json").exists()
    monkeypatch.undo()
    kept = sorted((out / "checkpoints").glob("checkpoint-*"))
    if kept:  # the message and the rerun agree on the checkpoint
        assert f"{kept[-1].name} is kept: rerun with --resume" in line, line
        code, err = _cli(_tune_args(model, gsm8k_file, out, *extra), capsys)
        assert code == 2 and f"checkpoint at step {kept[-1].name.split('-')[1]}" in err, err
        extra = [*extra, "--resume"]
    else:
        assert "no checkpoint was kept: the same command starts over" in line, line
    code, err = _cli(_tune_args(model, gsm8k_file, out, *extra), capsys)
    assert code == 0, err


def test_tune_checkpoint_disk_full_then_resume_agrees(model_dir, gsm8k_file, tmp_path, capsys,
                                                      monkeypatch):
    """torch.save (the optimizer) fails at the second checkpoint: the message names it, it is
    removed, and the rerun's refusal and --resume both take checkpoint 1."""
    import torch as T

    import sftscope.io as sio

    model = model_dir("llama", n_layers=4)
    out = tmp_path / "run"
    args = _tune_args(model, gsm8k_file, out, "--rank", "2", "--save-steps", "1")
    orig = T.save

    def fake(obj, f, *a, **k):
        if "checkpoint-2" in str(f):
            Path(f).write_bytes(b"PK\0")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                               "failed writing file data/0: file write failed")
        return orig(obj, f, *a, **k)

    monkeypatch.setattr(T, "save", fake)
    monkeypatch.setattr(sio, "_free_bytes", lambda path: 0)
    code, err = _cli(args, capsys)
    assert code == 2
    line = _one_line(err, out / "checkpoints" / "checkpoint-2")
    assert "checkpoint-1 is kept: rerun with --resume" in line, line
    assert not (out / "checkpoints" / "checkpoint-2").exists()
    monkeypatch.undo()
    code, err = _cli(args, capsys)
    assert code == 2 and "checkpoint at step 1" in err and "--resume" in err, err
    code, err = _cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert "resuming from" in err and "checkpoint-1" in err


def test_steer_and_swap_mix_disk_full(model_dir, gsm8k_file, tmp_path, capsys, monkeypatch):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    _full_disk(monkeypatch, match="steer_vector")
    out = tmp_path / "steer"
    code, err = _cli(["steer", "--base", base, "--sft", sft, "--data", f"gsm8k:{gsm8k_file}",
                      "--layer", "2", "--limit", "4", "--scales", "0,1", "--generate",
                      "--n-prompts", "2", "--max-new-tokens", "2", "--max-length", "32",
                      "--device", "cpu", "--out", str(out)], capsys)
    assert code == 2
    _one_line(err, out / "steer_vector.safetensors")
    assert not (out / "steer_vector.safetensors").exists()
    monkeypatch.undo()
    _full_disk(monkeypatch, match="mix-")
    out = tmp_path / "swap"
    code, err = _cli(["swap", "--base", base, "--sft", sft, "--data", f"gsm8k:{gsm8k_file}",
                      "--segments", "2", "--limit", "4", "--max-length", "32", "--bootstrap",
                      "0", "--device", "cpu", "--save-mix", "01:0.5", "--out", str(out)], capsys)
    assert code == 2
    line = _one_line(err, out / "mix-01-a0.5")
    assert "None" not in line
    assert not list(out.glob("mix-*"))


# ------------------------------------------------------------------ smaller refusals

def test_sweep_collect_refuses_an_option_that_changes_results(model_dir, gsm8k_file, tmp_path):
    from sftscope.config.commands import SweepConfig
    from sftscope.errors import SftscopeError
    from sftscope.experiments.sweep import JobOutput, run_sweep

    def job(j) -> JobOutput:
        return JobOutput.from_scores({"flexible_extract": [1.0, 0.0, 1.0]},
                                     trainable_params=10)

    data = f"gsm8k:{gsm8k_file}"
    out = tmp_path / "sw"
    run_sweep(SweepConfig(out=str(out), model=str(model_dir("llama")), train=data, task=data,
                          segments=2, masks="10", seeds=1, bootstrap=50, tune={"lr": 1e-4}),
              job_fn=job)
    with pytest.raises(SftscopeError, match=r"--lr 0.001 differs from the sweep's recorded "
                                            r"0.0001"):
        run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=50, tune={"lr": 1e-3}))
    with pytest.raises(SftscopeError, match="--eval-limit 3 differs"):
        run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=50,
                              evaluation={"limit": 3}))
    # the recorded value, or an option that changes nothing, is accepted
    run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=50,
                          tune={"lr": 1e-4, "report_to": "none"}))
    with pytest.raises(SftscopeError, match="--metric 'nope' is not a score of task gsm8k"):
        run_sweep(SweepConfig(out=str(out), collect=True, bootstrap=50, metric="nope"))


def test_sweep_unknown_metric_is_refused_before_any_job(model_dir, gsm8k_file, tmp_path,
                                                        capsys):
    data = f"gsm8k:{gsm8k_file}"
    out = tmp_path / "sw"
    code, err = _cli(["sweep", "--model", str(model_dir("llama")), "--train", data, "--task",
                      data, "--segments", "2", "--masks", "10", "--seeds", "1",
                      "--metric", "flexible_extrakt", "--out", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "did you mean flexible_extract?" in err
    assert not (out / "jobs").exists()


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "tune:\n  lr: 0.001\n  rank: 4\n  lr: 0.0001\n"),
    (".json", '{"tune": {"lr": 0.001, "lr": 0.0001}}'),
])
def test_config_file_with_a_duplicate_key_is_refused(tmp_path, capsys, suffix, text):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    code, err = _cli(["--config", str(cfg), "tune"], capsys)
    assert code == 2 and "key 'lr' appears twice" in err and len(err.strip().splitlines()) == 1


def test_rescore_honours_skip_bad_records(tmp_path, capsys):
    f = tmp_path / "comp.jsonl"
    f.write_text('{"completion": "x"\n'
                 '{"completion": "so #### 4", "answer": "2 + 2 = 4\\n#### 4"}\n'
                 '{"answer": "#### 1"}\n'
                 '{"completion": "#### 5", "answer": "#### 6"}\n')
    code, err = _cli(["eval", "--rescore", str(f), "--task", "gsm8k"], capsys)
    assert code == 2 and "line 1: not valid JSON" in err
    out = tmp_path / "run"
    code, err = _cli(["eval", "--rescore", str(f), "--task", "gsm8k", "--skip-bad-records",
                      "--out", str(out)], capsys)
    assert code == 0, err
    assert "2 of 4 lines" in err and "skipped as bad" in err
    rec = json.loads((out / "run.json").read_text())
    assert rec["result"]["n"] == 2 and any("skipped" in n for n in rec["result"]["notes"])


def test_tune_float16_on_cpu_is_refused(model_dir, gsm8k_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: float16 training is possible")
    code, err = _cli(["tune", "--model", str(model_dir("llama")), "--train",
                      f"gsm8k:{gsm8k_file}", "--mask", "01", "--dtype", "float16", "--out",
                      str(tmp_path / "run")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--dtype float16 trains only on a CUDA GPU" in err and "float32" in err
    assert not (tmp_path / "run").exists()


def test_report_leaves_out_a_table_with_text_for_numbers(tmp_path, capsys):
    import pandas as pd

    run = tmp_path / "w"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"command": "weights", "n_blocks": 2}))
    pd.DataFrame({"block": [0, 1], "module": ["q", "q"], "metric": ["frobenius"] * 2,
                  "value": ["0.5", "lots"]}).to_csv(run / "weights.csv", index=False)
    code, err = _cli(["report", str(run), "--out", str(tmp_path / "r.html")], capsys)
    assert code == 2, err
    assert "column value holds 'lots' where a number belongs" in err
    from sftscope.report.runs import read_table

    pd.DataFrame({"block": [0, 1], "module": ["q", "q"], "metric": ["frobenius"] * 2,
                  "value": ["0.5", ""]}).to_csv(run / "weights.csv", index=False)
    df = read_table(run / "weights.csv")
    assert df["value"].dtype.kind == "f" and df["value"].isna().sum() == 1


# ------------------------------------------------------------------ a rank dies under torchrun

def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def _launch(args: list[str], logs: Path) -> subprocess.Popen:
    """``sftscope ARGS`` under torchrun, 2 CPU processes (the Trainer's DDP over gloo), each
    rank's output in ``logs``."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--log-dir", str(logs), "--redirects", "3", "-m", "sftscope", *args],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_rank_1(proc: subprocess.Popen, ready: Path, wait: float = 0.5) -> None:
    """SIGKILL rank 1 ``wait`` s after ``ready`` exists (skip when the launch ended first)."""
    t0 = time.time()
    while not ready.exists() and proc.poll() is None and time.time() - t0 < 180:
        time.sleep(0.05)
    time.sleep(wait)
    ranks = {_rank_of(c): c for c in _children(proc.pid)}
    if proc.poll() is not None or 1 not in ranks:
        proc.communicate()
        pytest.skip("the launch ended (or rank 1 was not found) before the kill")
    os.kill(ranks[1], signal.SIGKILL)
    proc.communicate(timeout=300)


def _named_in_one_line(logs: Path, out: Path) -> None:
    """Rank 0's last line names the dead rank; no traceback; nothing looks finished."""
    err0 = next(logs.rglob("0/stderr.log")).read_text()
    lines = [ln for ln in err0.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("sftscope: error: process 1 of 2 failed"), err0
    assert "Traceback" not in err0
    assert not (out / "run.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_a_killed_rank_is_named_in_one_line_by_rank_0(model_dir, tmp_path):
    words = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far"]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(words[(i * 3 + k) % 10]
                                                         for k in range(30))}) + "\n"
                            for i in range(800)))
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = _launch(["analyze", "--base", str(model_dir("llama", seed=0)), "--sft",
                    str(model_dir("llama", seed=1)), "--data", str(data), "--limit", "800",
                    "--n-token", "20", "--max-length", "40", "--device", "cpu", "--batch-size",
                    "4", "--cache-dir", str(tmp_path / "c"), "--out", str(out)], logs)
    _kill_rank_1(proc, out / ".sftscope-run.json", wait=1.0)
    _named_in_one_line(logs, out)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_a_rank_killed_in_tunes_collectives_is_named_in_one_line(model_dir, gsm8k_file,
                                                                  tmp_path):
    """tune under torchrun (DDP, gloo): rank 1 killed while training; rank 0 names it in one
    line, exit status != 0, no traceback (the Trainer's broken collective, or the launcher's
    SIGTERM to the survivor, whichever comes first)."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    args = ["tune", "--model", str(model_dir("llama", n_layers=4)), "--train",
            f"gsm8k:{gsm8k_file}", "--mask", "01", "--max-steps", "100000", "--save-steps",
            "100000", "--batch-size", "2", "--micro-batch-size", "1", "--rank", "4",
            "--no-eval", "--n-train", "0", "--logging-steps", "1",
            "--out", str(out)]
    proc = _launch(args, logs)
    _kill_rank_1(proc, out / "dynamics.csv")  # written at the first step
    assert proc.returncode != 0
    _named_in_one_line(logs, out)
