"""The CLI is generated from the configs: flags, config files and the API share one validation."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import click
import pytest

from sftscope.cli import app, main
from sftscope.cli.build import EXPAND_PREFIX
from sftscope.config.commands import COMMANDS, AnalyzeConfig, SweepConfig, TuneConfig
from sftscope.config.core import build, field_names, meta
from sftscope.errors import SftscopeError


def _flags(cmd: click.Command) -> set[str]:
    names: set[str] = set()
    for p in cmd.params:
        names.update(o.lstrip("-") for o in (*p.opts, *p.secondary_opts))
        if isinstance(p, click.Argument):
            names.add(p.name)
    return names


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_field_has_a_flag_and_every_flag_a_field(name):
    cls = COMMANDS[name]
    cmd = app.commands[name]
    flags = _flags(cmd)
    for f in dataclasses.fields(cls):
        m = meta(f)
        if not m["cli"] or m["expand"]:
            continue
        flag = f.name if m["positional"] else f.name.replace("_", "-")
        assert flag in flags, (name, f.name)
        for alias in m["aliases"]:
            assert alias.replace("_", "-") in flags, (name, alias)
    accepted = {n.replace("_", "-") for n in field_names(cls)}
    for p in cmd.params:
        if p.name == "config" or "__" in (p.name or ""):
            continue  # the config file, and pass-through options of sweep
        assert p.name.replace("_", "-") in accepted, (name, p.name)


def test_sweep_pass_through_flags_are_tune_and_eval_fields():
    cmd = app.commands["sweep"]
    names = {p.name for p in cmd.params}
    assert "tune__rank" in names and "tune__lr" in names
    assert "evaluation__limit" in names and "evaluation__shots" in names
    assert "tune__mask" not in names and "tune__seed" not in names  # set per job
    assert EXPAND_PREFIX["eval"] == "eval-"


def test_help_and_version_are_fast_and_import_no_torch():
    t0 = time.perf_counter()
    code = ("import sys; from sftscope.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False False False"
    assert time.perf_counter() - t0 < 5


def test_bad_path_refused_before_torch(tmp_path):
    code = ("import sys; from sftscope.cli import main\n"
            "try:\n    main(['analyze', '--base', '/no/such', '--sft', '/no/such', '--data', "
            "'x.jsonl', '--out', '" + str(tmp_path / "o") + "'])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "2 False", out
    assert out.stderr.strip().startswith("sftscope: error: base model folder /no/such")
    assert not (tmp_path / "o").exists()


def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


@pytest.mark.parametrize("argv,needle", [
    ([], None),
    (["--version"], None),
    (["analyse"], "did you mean analyze"),
    (["analyze", "--bsae", "x"], "no such option"),
    (["analyze", "--batch-size"], "requires an argument"),
    (["tune", "--rank", "many"], "--rank expects a number"),
    (["tune", "--model", "a/b", "--train", "gsm8k", "--out", "o", "--mask", "01000",
      "--method", "full", "--rank", "8"], "--rank is a LoRA option"),
    (["tune", "--method", "partial"], "unknown --method 'partial'"),
    (["steer", "--base", "a/b", "--sft", "a/c", "--data", "gsm8k", "--out", "o",
      "--layer", "3"], "needs --task"),
    (["probe", "--limit", "ten"], "--n-samples expects an integer"),
    (["swap", "--head", "middle"], "unknown --head 'middle'"),
    (["sweep", "--num-jobs", "2"], "--out must name it"),  # shards share one named folder
    (["report"], "missing RUNS"),
])
def test_usage_errors_are_one_line_exit_2(argv, needle, capsys):
    code, out, err = _run(argv, capsys)
    if needle is None:
        assert code == 0 and out
        return
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sftscope: error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_config_file_unknown_key_and_section(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("analyze:\n  batch_sise: 4\n")
    code, _, err = _run(["--config", str(cfg), "analyze"], capsys)
    assert code == 2 and "unknown option 'batch_sise'" in err and "batch_size" in err
    cfg.write_text("analyse:\n  batch_size: 4\n")
    code, _, err = _run(["--config", str(cfg), "analyze"], capsys)
    assert code == 2 and "unknown section 'analyse'" in err and "did you mean analyze" in err
    cfg.write_text("analyze: [1, 2]\n")
    code, _, err = _run(["--config", str(cfg), "analyze"], capsys)
    assert code == 2 and "must map flag names" in err
    cfg.write_text("analyze:\n  batch_size: 'eight'\n")
    code, _, err = _run(["--config", str(cfg), "analyze"], capsys)
    assert code == 2 and "--batch-size expects an integer" in err
    cfg.write_text("analyze: {\n")
    code, _, err = _run(["--config", str(cfg), "analyze"], capsys)
    assert code == 2 and "could not be parsed" in err and len(err.strip().splitlines()) == 1


def test_yaml_mask_read_as_number_is_refused():
    with pytest.raises(SftscopeError, match="quote"):
        build(TuneConfig, {"model": "a/b", "train": "gsm8k", "out": "o", "mask": 1000})


def test_types_and_ranges_are_checked_in_the_api():
    kw = dict(base="a/b", sft="a/c", data="gsm8k", out="o")
    with pytest.raises(SftscopeError, match="--batch-size must be at least 1"):
        AnalyzeConfig(**kw, batch_size=0)
    with pytest.raises(SftscopeError, match="--batch-size expects an integer"):
        AnalyzeConfig(**kw, batch_size=2.5)
    with pytest.raises(SftscopeError, match="--level must be in"):
        AnalyzeConfig(**kw, level=1.5)
    with pytest.raises(SftscopeError, match="--bootstrap must be at least 0"):
        AnalyzeConfig(**kw, bootstrap=-1)
    with pytest.raises(SftscopeError, match="--max-length must be at least 2"):
        AnalyzeConfig(**kw, max_length=1)
    with pytest.raises(SftscopeError, match="unknown --dtype 'int7'"):
        AnalyzeConfig(**kw, dtype="int7")
    with pytest.raises(SftscopeError, match="is not a device"):
        AnalyzeConfig(**kw, device="gpu0")
    with pytest.raises(SftscopeError, match="positional field"):
        AnalyzeConfig(**kw, template="Q: {0}")
    with pytest.raises(SftscopeError, match="expected '}'"):
        AnalyzeConfig(**kw, template="Q: {question")
    with pytest.raises(SftscopeError, match="trains zero steps"):
        TuneConfig(model="a/b", train="gsm8k", out="o", mask="01", epochs=0)
    with pytest.raises(SftscopeError, match="--lr must be positive"):
        TuneConfig(model="a/b", train="gsm8k", out="o", mask="01", lr=-1)
    with pytest.raises(SftscopeError, match="--warmup-steps must be at least 0"):
        TuneConfig(model="a/b", train="gsm8k", out="o", mask="01", warmup_steps=-3)
    with pytest.raises(SftscopeError, match="--n-train must be at least 0"):
        TuneConfig(model="a/b", train="gsm8k", out="o", mask="01", n_train=-3)
    with pytest.raises(SftscopeError, match="unknown tune option 'rnak'.*rank"):
        SweepConfig(out="o", model="a/b", train="gsm8k", task="gsm8k", tune={"rnak": 8})
    with pytest.raises(SftscopeError, match="--warmup-steps expects a number"):
        SweepConfig(out="o", model="a/b", train="gsm8k", task="gsm8k",
                    tune={"warmup_steps": "abc"})


def test_aliases_of_old_and_ecosystem_names():
    cfg = build(AnalyzeConfig, {"base": "a/b", "sft": "a/c", "data": "gsm8k", "out": "o",
                                "n-pooled": 5, "n_boot": 3})
    assert cfg.limit == 5 and cfg.bootstrap == 3
    with pytest.raises(SftscopeError, match="name the same option"):
        build(AnalyzeConfig, {"base": "a/b", "sft": "a/c", "data": "gsm8k", "out": "o",
                              "limit": 5, "n": 6})


def test_run_json_records_the_config(tmp_path, model_dir, gsm8k_file):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    from sftscope.experiments.analyze import analyze

    cfg = AnalyzeConfig(base=base, sft=sft, data=f"gsm8k:{gsm8k_file}", out=str(tmp_path / "r"),
                        limit=6, n_token=2, max_length=32, cache_dir=str(tmp_path / "c"),
                        device="cpu")
    analyze(cfg)
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert rec["config"] == cfg.record()
    assert rec["command"] == "analyze" and "versions" in rec


def test_run_folder_protocol(tmp_path, model_dir, gsm8k_file, capsys):
    base, sft = str(model_dir("llama", seed=0)), str(model_dir("llama", seed=1))
    out = tmp_path / "r"
    common = ["--base", base, "--sft", sft, "--data", f"gsm8k:{gsm8k_file}", "--limit", "6",
              "--n-token", "2", "--max-length", "32", "--cache-dir", str(tmp_path / "c"),
              "--out", str(out)]
    code, _, err = _run(["analyze", *common], capsys)
    assert code == 0, err
    # same settings: a rerun replaces the run; other settings need --overwrite
    code, _, err = _run(["analyze", *common], capsys)
    assert code == 0, err
    code, _, err = _run(["analyze", *common, "--pooling", "last"], capsys)
    assert code == 2 and "other settings (pooling" in err and "--overwrite" in err
    code, _, err = _run(["analyze", *common, "--pooling", "last", "--overwrite"], capsys)
    assert code == 0, err
    # another command's folder is refused before anything is written
    code, _, err = _run(["probe", "--model", base, "--data", f"gsm8k:{gsm8k_file}", "--out",
                         str(out)], capsys)
    assert code == 2 and "is a `analyze` run folder" in err
    # --out that is a file
    f = tmp_path / "file"
    f.write_text("x")
    code, _, err = _run(["analyze", *common[:-1], str(f)], capsys)
    assert code == 2 and "is a file" in err
    # outputs follow the umask
    mode = (out / "metrics.csv").stat().st_mode & 0o777
    import os

    um = os.umask(0)
    os.umask(um)
    assert mode == 0o666 & ~um
