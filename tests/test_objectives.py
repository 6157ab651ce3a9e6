"""tune --objective dpo|grpo (TRL): preference data, rewards, masked training measured outside
sftscope, run.json, no backward below the lowest tuned block, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from sftscope.errors import SftscopeError
from sftscope.experiments import objectives as OB
from sftscope.experiments import tune as TU
from sftscope.load.arch import get_blocks

pytest.importorskip("trl")


PAIRS = [{"prompt": f"What is {a} plus {a}? Answer:", "chosen": f" {2 * a}",
          "rejected": f" {2 * a + 1}"} for a in range(1, 9)]


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("pref") / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    return p


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
            for a in range(1, 9)]
    p = tmp_path_factory.mktemp("gsm") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(model, train, out, **kw):
    base = dict(rank=4, batch_size=4, micro_batch_size=4, max_steps=4, lr=5e-3, logging_steps=1,
                save_steps=100, run_eval=False, n_train=None, dropout=0.0)
    base.update(kw)
    if kw.get("method") == "full":
        for k in ("rank", "dropout"):
            base.pop(k)
    return TU.TuneConfig(model=str(model), train=str(train), out=str(out), **base)


# ------------------------------------------------------------------ data and rewards

def test_preference_records(tmp_path):
    from sftscope.load.data import read_samples

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(SftscopeError, match=r"line 2: lacks field\(s\) 'rejected'"):
        read_samples(f"preference:{p}")
    samples, notes = read_samples(f"preference:{p}", skip_bad=True)
    assert len(samples) == 1 and "1 of 2 records were skipped" in notes[0]
    s = samples[0]
    assert s.prompt == PAIRS[0]["prompt"] and s.answer == PAIRS[0]["chosen"]
    assert s.meta["pair"] == PAIRS[0]
    chat = {"prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}]}
    mixed = dict(chat, rejected="go away")
    p.write_text(json.dumps(chat) + "\n" + json.dumps(mixed) + "\n")
    with pytest.raises(SftscopeError, match="line 2: mixes plain text and chat"):
        read_samples(f"preference:{p}", shuffle=False)
    assert read_samples(f"preference:{p}", skip_bad=True)[0][0].meta["pair"] == chat
    import pandas as pd

    csv = tmp_path / "p.csv"
    pd.DataFrame([PAIRS[0], {**PAIRS[1], "rejected": None}]).to_csv(csv, index=False)
    with pytest.raises(SftscopeError, match="row 2: field 'rejected' is"):
        read_samples(f"preference:{csv}")
    with pytest.raises(SftscopeError, match="local-only format"):
        read_samples("preference")


def test_rewards_reuse_the_task_scorers(tmp_path, monkeypatch):
    from sftscope.tasks.gsm8k import score

    comps = ["so 2 + 2 = 4.", "The answer is 5", "#### 1,000\nQuestion: 7", "no number"]
    gold = ["2 + 2 = 4\n#### 4", "#### 4", "#### 1000", "#### 4"]
    assert OB.gsm8k_reward(comps, gold) == [1.0, 0.0, 1.0, 0.0]
    assert OB.gsm8k_reward(comps[:2], gold[:2]) == [
        float(score(c, {"answer": a})["flexible_extract"]) for c, a in zip(comps[:2], gold[:2])]
    assert OB.mmlu_reward([" B", "(C) yes", "Because", " A"], ["B", "B", "B", "B"]) == [
        1.0, 0.0, 0.0, 0.0]
    (tmp_path / "myreward.py").write_text(
        "def short(completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert OB.reward_function("python:myreward:short")(["ab"]) == [pytest.approx(1 / 3)]
    with pytest.raises(SftscopeError, match="has no function 'long'"):
        OB.reward_function("python:myreward:long")
    with pytest.raises(SftscopeError, match="could not be imported"):
        OB.reward_function("python:no_such_module_xyz:f")
    with pytest.raises(SftscopeError, match="use gsm8k, mmlu or python"):
        OB.reward_function("exact")


def test_loss_types_are_trls():
    assert "sigmoid" in OB.loss_types("dpo") and "ipo" in OB.loss_types("dpo")
    assert {"grpo", "dapo", "dr_grpo"} <= set(OB.loss_types("grpo"))


def test_bad_objective_options(llama10, pref_file, gsm_file, tmp_path):
    t = tmp_path / "x"
    with pytest.raises(SftscopeError, match="preference:FILE"):
        _cfg(llama10, f"gsm8k:{gsm_file}", t, mask="01", objective="dpo")
    with pytest.raises(SftscopeError, match="not one of TRL's DPO losses"):
        _cfg(llama10, f"preference:{pref_file}", t, mask="01", objective="dpo",
             loss_type="sigmod")
    with pytest.raises(SftscopeError, match="needs --reward"):
        _cfg(llama10, f"gsm8k:{gsm_file}", t, mask="01", objective="grpo")
    with pytest.raises(SftscopeError, match="multiple of --num-generations 3"):
        _cfg(llama10, f"gsm8k:{gsm_file}", t, mask="01", objective="grpo", reward="gsm8k",
             num_generations=3)
    with pytest.raises(SftscopeError, match="--reward is an option of --objective grpo"):
        _cfg(llama10, f"gsm8k:{gsm_file}", t, mask="01", reward="gsm8k")
    with pytest.raises(SftscopeError, match="--beta is an option of --objective dpo or grpo"):
        _cfg(llama10, f"gsm8k:{gsm_file}", t, mask="01", beta=0.1)


def test_without_trl_one_line_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trl" else real(name, *a))
    with pytest.raises(SftscopeError, match=r"needs the trl package .*sftscope\[rl\]"):
        OB.trl_version()


# ------------------------------------------------------------------ training, measured outside

def _margins(model_path, tok_path) -> torch.Tensor:
    """log p(chosen | prompt) - log p(rejected | prompt) per training pair: a plain
    transformers forward (no sftscope code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()

    def logp(prompt: str, answer: str) -> float:
        p = tok(prompt)["input_ids"]
        ids = torch.tensor([p + tok(prompt + answer)["input_ids"][len(p):]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        return float(lp[torch.arange(len(tgt)), tgt][len(p) - 1:].sum())

    return torch.tensor([logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"])
                         for r in PAIRS])


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(iter(sorted(folder.glob("*.safetensors"))))))


def _changed_blocks(base, tuned) -> set[int | str]:
    """Blocks (or other tensors by name) whose stored weights differ bit for bit."""
    a, b = _weights(base), _weights(tuned)
    assert a.keys() == b.keys()
    out: set[int | str] = set()
    for k in a:
        if not torch.equal(a[k], b[k]):
            parts = k.split(".")
            out.add(int(parts[parts.index("layers") + 1]) if "layers" in parts else k)
    return out


@pytest.mark.slow
def test_dpo_on_a_mask_raises_the_margin_and_adapts_only_the_mask(llama10, pref_file, tmp_path):
    out = tmp_path / "dpo"
    res = TU.tune(_cfg(llama10, f"preference:{pref_file}", out, mask="01100", objective="dpo",
                       max_steps=12, lr=1e-2, merge=True))
    before, after = _margins(llama10, llama10), _margins(out / "merged", llama10)
    assert after.mean() > before.mean() + 0.2, (before, after)
    assert (after > before).float().mean() >= 0.75
    assert _changed_blocks(llama10, out / "merged") == {2, 3, 4, 5}
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["layers_to_transform"] == [2, 3, 4, 5]
    rec = json.loads((out / "run.json").read_text())
    assert rec["objective"] == "dpo" and rec["result"]["objective"] == "dpo"
    trl = rec["trl"]
    import trl as trl_pkg

    assert trl["version"] == trl_pkg.__version__ and trl["trainer"] == "DPOTrainer"
    assert trl["reference"] == "the starting model with the adapter disabled"
    assert trl["settings"]["beta"] == 0.1 and trl["settings"]["loss_type"] == ["sigmoid"]
    assert len(trl["history"]["rewards/margins"]) == 12
    assert res.trainable_params == res.full_depth_params and res.n_train == len(PAIRS)
    assert (out / "dynamics.csv").is_file()
    # one adapter in the saved folder: no reference copy
    assert not (out / "adapter" / "ref").exists()


@pytest.mark.slow
def test_dpo_reference_is_the_disabled_adapter_and_no_backward_below(llama10, pref_file,
                                                                     tmp_path):
    from transformers import TrainerCallback

    seen: dict[str, object] = {}
    reached: dict[int, int] = {}

    class Trace(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["adapters"] = sorted(model.peft_config)
            seen["hook"] = TU.has_input_grad_hook(model)
            for i, blk in enumerate(get_blocks(model.get_base_model())):
                def hook(mod, a, out, i=i):
                    h = out[0] if isinstance(out, tuple) else out
                    if h.requires_grad:
                        h.register_hook(lambda g: reached.__setitem__(i, reached.get(i, 0) + 1))
                blk.register_forward_hook(hook)

    TU.tune(_cfg(llama10, f"preference:{pref_file}", tmp_path / "r", mask="00010",
                 objective="dpo", max_steps=2, gradient_checkpointing=True), callbacks=[Trace()])
    assert seen == {"adapters": ["default"], "hook": False}
    assert sorted(reached) == [6, 7, 8, 9]


@pytest.mark.slow
def test_grpo_gsm8k_reward_runs_and_records(llama10, gsm_file, tmp_path):
    out = tmp_path / "grpo"
    res = TU.tune(_cfg(llama10, f"gsm8k:{gsm_file}", out, mask="00110", objective="grpo",
                       reward="gsm8k", num_generations=4, max_completion_length=6,
                       batch_size=8, micro_batch_size=8, max_steps=2, beta=0.04))
    assert res.steps == 2 and res.objective == "grpo"
    rec = json.loads((out / "run.json").read_text())
    assert rec["objective"] == "grpo" and rec["config"]["reward"] == "gsm8k"
    trl = rec["trl"]
    assert trl["trainer"] == "GRPOTrainer" and trl["reward"] == "gsm8k"
    assert trl["settings"]["num_generations"] == 4 and trl["settings"]["beta"] == 0.04
    assert trl["reference"] == "the starting model with the adapter disabled"
    assert trl["settings"]["max_completion_length"] == 6
    assert len(trl["history"]["reward"]) == 2
    assert all(0.0 <= r <= 1.0 for r in trl["history"]["reward"])
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["layers_to_transform"] == [4, 5, 6, 7]
    keys = _weights(out / "adapter").keys()
    assert {int(k.split(".")[k.split(".").index("layers") + 1]) for k in keys} == {4, 5, 6, 7}


@pytest.mark.slow
def test_grpo_full_adapts_only_the_masked_blocks(llama10, gsm_file, tmp_path, monkeypatch):
    """--method full with a reward that varies (completion length), so the update is not
    zero: exactly the masked blocks change."""
    (tmp_path / "lenreward.py").write_text(
        "def length(completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "full"
    TU.tune(_cfg(llama10, f"gsm8k:{gsm_file}", out, mask="00100", method="full",
                 objective="grpo", reward="python:lenreward:length", num_generations=4,
                 max_completion_length=6, batch_size=8, micro_batch_size=8, max_steps=2,
                 lr=1e-3))
    assert _changed_blocks(llama10, out / "model") == {4, 5}
    rec = json.loads((out / "run.json").read_text())
    assert rec["method"] == "full" and rec["trl"]["reward"] == "python:lenreward:length"
    assert rec["trl"]["reference"] == "none (beta 0)"


def test_cli_preference_missing_field_is_one_line(llama10, tmp_path, capsys):
    from sftscope.cli import main

    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["tune", "--model", str(llama10), "--train", f"preference:{p}", "--out",
              str(tmp_path / "o"), "--mask", "01", "--objective", "dpo", "--no-eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert len(err) == 1 and "line 2" in err[0] and "'rejected'" in err[0], err


# ------------------------------------------------------------------ held-out scoring and sweeps

def test_preference_task_scores_accuracy_and_margin(llama10, pref_file, tmp_path):
    """The choice evaluator's margin = the plain-torch margin of the same pairs."""
    from sftscope.config.commands import EvalConfig
    from sftscope.experiments.evaluate import evaluate

    res = evaluate(EvalConfig(model=str(llama10), task="preference",
                              data=f"preference:{pref_file}", out=str(tmp_path / "ev")))
    got = {s.metric: s.value for s in res.scores}
    want = _margins(llama10, llama10)
    assert got["margin"] == pytest.approx(float(want.mean()), abs=1e-4)
    assert got["accuracy"] == pytest.approx(float((want > 0).float().mean()))


@pytest.mark.slow
def test_dpo_sweep_scores_preference_accuracy_and_margin(llama10, pref_file, tmp_path):
    from sftscope.config.commands import SweepConfig
    from sftscope.experiments.sweep import run_sweep

    res = run_sweep(SweepConfig(
        model=str(llama10), train=f"preference:{pref_file}", task=f"preference:{pref_file}",
        segments=2, masks="01", seeds="1", out=str(tmp_path / "sw"), bootstrap=20,
        tune={"objective": "dpo", "max_steps": 2, "n_train": 0, "batch_size": 4,
              "micro_batch_size": 4, "rank": 2}))
    s = res.summary
    assert set(s["metric"]) == {"accuracy", "margin"}
    assert set(s["mask"]) == {"11", "01"}
    row = s[(s["mask"] == "01") & (s["metric"] == "margin")].iloc[0]
    assert 0.0 <= row["p_value"] <= 1.0 and row["n_items"] == len(PAIRS)
    job = json.loads((tmp_path / "sw" / "jobs" / "01-s0" / "tune" / "run.json").read_text())
    assert job["objective"] == "dpo"


def test_sft_only_options_refused_with_other_objectives(llama10, pref_file, gsm_file,
                                                        tmp_path):
    with pytest.raises(SftscopeError, match="--completion-only is an option of --objective sft"):
        _cfg(llama10, f"preference:{pref_file}", tmp_path, mask="01", objective="dpo",
             completion_only=False)
    with pytest.raises(SftscopeError, match="--max-length is an option of --objective sft or"):
        _cfg(llama10, f"gsm8k:{gsm_file}", tmp_path, mask="01", objective="grpo",
             reward="gsm8k", max_length=64, batch_size=8, micro_batch_size=8)


@pytest.mark.slow
def test_dpo_resume_after_kill_matches_uninterrupted(llama10, pref_file, tmp_path, kill_at_step):
    from safetensors.torch import load_file

    kw = dict(mask="00110", objective="dpo", max_steps=5, save_steps=2)
    train = f"preference:{pref_file}"
    ref = TU.tune(_cfg(llama10, train, tmp_path / "a", **kw))
    with pytest.raises(KeyboardInterrupt):
        TU.tune(_cfg(llama10, train, tmp_path / "b", **kw), callbacks=[kill_at_step(3)])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    res = TU.tune(_cfg(llama10, train, tmp_path / "b", resume=True, **kw))
    assert res.resumed_from.endswith("checkpoint-2") and res.steps == 5
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert res.loss_history[-2:] == pytest.approx(ref.loss_history[-2:], abs=1e-4)


def test_chat_records_need_a_chat_template(llama10, pref_file, tmp_path):
    from types import SimpleNamespace

    cfg = _cfg(llama10, f"preference:{pref_file}", tmp_path, mask="01", objective="dpo")
    rows = [{"prompt": [{"role": "user", "content": "hi"}],
             "chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(SftscopeError, match="no chat template"):
        OB.make_trainer(cfg, model=None, args=None, rows=rows,
                        tok=SimpleNamespace(chat_template=None), callbacks=[])


# ------------------------------------------------------------------ several processes

def _adapted_blocks(adapter) -> set[int]:
    keys = _weights(adapter).keys()
    return {int(k.split(".")[k.split(".").index("layers") + 1]) for k in keys}


_LAUNCHED = {  # objective -> (tune arguments, the blocks its mask adapts)
    "sft": (["--mask", "10000", "--batch-size", "4", "--micro-batch-size", "2"], {0, 1}),
    "dpo": (["--mask", "01100", "--batch-size", "4", "--micro-batch-size", "2"], {2, 3, 4, 5}),
    "grpo": (["--mask", "00110", "--reward", "gsm8k", "--num-generations", "4",
              "--max-completion-length", "4", "--batch-size", "8", "--micro-batch-size", "4"],
             {4, 5, 6, 7}),
}


def _launch_tune(launcher: list[str], objective: str, model, data, out) -> dict:
    """``launcher ... -m sftscope tune`` with 2 CPU processes (ACCELERATE_USE_CPU unset: tune
    tells the Trainer itself); checks one DDP run: rank 0 wrote run.json with the objective
    and 2 processes, only the masked blocks are adapted. Returns run.json."""
    import os
    import subprocess
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", SFTSCOPE_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(Path(TU.__file__).parents[2]),
                                           os.environ.get("PYTHONPATH", "")]))
    args, want = _LAUNCHED[objective]
    train = f"preference:{data}" if objective == "dpo" else f"gsm8k:{data}"
    cmd = [*launcher, "-m", "sftscope", "tune", "--model", str(model), "--out", str(out),
           "--objective", objective, "--train", train, "--max-steps", "2", "--n-train", "0",
           "--no-eval", "--rank", "4", "--dtype", "float32", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["objective"] == objective and rec["processes"] == 2
    assert rec["grad_accumulation"] == 1 and rec["result"]["steps"] == 2
    assert _adapted_blocks(out / "adapter") == want
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["layers_to_transform"] == sorted(want)
    return rec


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_two_processes_train_together(llama10, pref_file, gsm_file, tmp_path, objective):
    """torchrun, 2 CPU processes: one DDP run (see ``_launch_tune``); run.json names TRL's
    trainer."""
    import sys

    pytest.importorskip("torch.distributed.run")  # torchrun (absent from some torch builds)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    data = pref_file if objective == "dpo" else gsm_file
    rec = _launch_tune(launcher, objective, llama10, data, tmp_path / objective)
    assert rec["trl"]["trainer"] == f"{objective.upper()}Trainer"


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo", "grpo"])
def test_accelerate_launch_on_cpu(llama10, pref_file, gsm_file, tmp_path, objective):
    """The command docs/cluster.md gives for CPU: ``accelerate launch --multi_gpu
    --num_processes 2`` (accelerate's torchrun path; its ``--cpu``/MULTI_CPU launcher starts
    one process without mpirun) trains one DDP run over gloo."""
    import sys

    pytest.importorskip("accelerate.commands.launch")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", "0"]
    data = pref_file if objective == "dpo" else gsm_file
    _launch_tune(launcher, objective, llama10, data, tmp_path / objective)


# ------------------------------------------------------------------ GRPO sweeps

@pytest.mark.slow
def test_grpo_sweep_scores_the_task_against_full_depth(llama10, gsm_file, tmp_path):
    """sweep --objective grpo: masks x seeds scored by the task, each mask paired with 11111."""
    from sftscope.config.commands import SweepConfig
    from sftscope.experiments.sweep import run_sweep

    res = run_sweep(SweepConfig(
        model=str(llama10), train=f"gsm8k:{gsm_file}", task=f"gsm8k:{gsm_file}",
        segments=5, masks="00110", seeds="1", out=str(tmp_path / "sw"), bootstrap=20,
        evaluation={"limit": 4, "shots": 0, "max_new_tokens": 4},
        tune={"objective": "grpo", "reward": "gsm8k", "num_generations": 4,
              "max_completion_length": 4, "max_steps": 2, "n_train": 0, "batch_size": 8,
              "micro_batch_size": 8, "rank": 2}))
    s = res.summary
    assert set(s["mask"]) == {"11111", "00110"}
    assert {"strict_match", "flexible_extract"} <= set(s["metric"])
    assert (s["n_items"] == 4).all() and (s["seeds"] == 1).all()
    base = s[s["mask"] == "11111"]
    assert base["p_value"].isna().all() and base["delta"].isna().all()
    row = s[(s["mask"] == "00110") & (s["metric"] == "flexible_extract")].iloc[0]
    assert 0.0 <= row["p_value"] <= 1.0 and row["delta"] == pytest.approx(
        row["mean"] - base[base["metric"] == "flexible_extract"]["mean"].iloc[0])
    sw = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sw["settings"]["tune"]["objective"] == "grpo"
    for job, blocks in (("11111-s0", list(range(10))), ("00110-s0", [4, 5, 6, 7])):
        rec = json.loads((tmp_path / "sw" / "jobs" / job / "tune" / "run.json").read_text())
        assert rec["objective"] == "grpo" and rec["trl"]["reward"] == "gsm8k"
        assert rec["blocks"] == blocks
