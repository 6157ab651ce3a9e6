"""What goes wrong around a run, not in its options: a full disk, a checkpoint cut off while
saving, a training loss that turns NaN."""

from __future__ import annotations

import errno
import json
import math
import shutil

import pytest

from sftscope.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


def test_full_disk_is_one_line_and_leaves_no_finished_folder(model_dir, gsm8k_file, tmp_path,
                                                             capsys, monkeypatch):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    args = ["analyze", "--base", base, "--sft", sft, "--data", f"gsm8k:{gsm8k_file}",
            "--limit", "6", "--n-token", "2", "--max-length", "32", "--device", "cpu",
            "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "run")]
    import sftscope.io as sio

    real = sio.write_table
    calls = {"n": 0}

    def full(df, path):
        calls["n"] += 1
        if calls["n"] == 2:  # metrics.csv is written, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(df, path)

    monkeypatch.setattr(sio, "write_table", full)
    monkeypatch.setattr("sftscope.experiments.analyze.write_table", full)
    code, err = _run(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("sftscope: error: cannot write"), err
    assert "the disk is full" in lines[-1] and "Traceback" not in err
    assert not (tmp_path / "run" / "run.json").exists()  # nothing looks finished
    monkeypatch.undo()
    code, err = _run(args, capsys)  # space freed: the same command finishes
    assert code == 0, err
    assert (tmp_path / "run" / "run.json").exists()


def test_truncated_last_checkpoint_falls_back_to_the_previous(model_dir, gsm8k_file, tmp_path,
                                                               kill_at_step):
    from sftscope.config.commands import TuneConfig
    from sftscope.experiments import tune as TU

    kw = dict(model=str(model_dir("llama", n_layers=4)), train=f"gsm8k:{gsm8k_file}",
              out=str(tmp_path / "run"), mask="01", max_steps=6, save_steps=2, batch_size=2,
              micro_batch_size=2, rank=2, run_eval=False, n_train=0, dropout=0.0)
    with pytest.raises(KeyboardInterrupt):
        TU.tune(TuneConfig(**kw), callbacks=[kill_at_step(5)])
    ckpts = TU.checkpoint_steps(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts[:2]] == ["checkpoint-4", "checkpoint-2"]
    victim = next(ckpts[0].glob("*.safetensors"))  # killed while saving: cut off
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    res = TU.tune(TuneConfig(**kw, resume=True))
    assert res.resumed_from and res.resumed_from.endswith("checkpoint-2")
    assert res.steps == 6


def test_nan_loss_stops_training_with_one_line():
    from sftscope.errors import SftscopeError
    from sftscope.experiments.tune import finite_loss_callback

    cb = finite_loss_callback()
    state = type("S", (), {"global_step": 7})()
    cb.on_log(None, state, None, logs={"loss": 1.5})
    with pytest.raises(SftscopeError, match="training loss became nan at step 7"):
        cb.on_log(None, state, None, logs={"loss": math.nan})


def test_broken_weights_are_refused_naming_the_tensor(model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from sftscope.errors import SftscopeError
    from sftscope.load.models import load_model

    folder = tmp_path / "broken"
    shutil.copytree(model_dir("llama"), folder)
    t = load_file(str(folder / "model.safetensors"))
    name = next(k for k in t if k.endswith("layers.2.mlp.down_proj.weight"))
    t[name][1, 1] = float("inf")
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SftscopeError, match=r"layers\.2\.mlp\.down_proj\.weight holds NaN or Inf"):
        load_model(str(folder))
    assert json.loads((folder / "config.json").read_text())  # untouched
