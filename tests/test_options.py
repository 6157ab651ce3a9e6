"""One meaning per option: an option shared by several commands has one help text and one
default everywhere, unless it is listed below with the reason it differs."""

from __future__ import annotations

import re
from collections import defaultdict

import click
import pytest

from sftscope.cli.build import params_for
from sftscope.config.commands import COMMANDS
from sftscope.errors import SftscopeError

# option -> why its commands may differ (help text or default)
EXCEPTIONS = {
    "--base": "weights reads safetensors checkpoints only (and --base is optional with "
              "--adapter); probe's --base is optional (--model or --base/--sft)",
    "--sft": "weights reads safetensors checkpoints only; sweep's --sft only serves "
             "--validate-suggest",
    "--model": "what the model is used for differs (tuned, probed, evaluated, swept); probe "
               "and eval do not take adapters as --model the way tune does",
    "--data": "eval's data are a task's items (in the task's fields), the others' any text",
    "--n-samples": "the samples each measurement needs differ: analyze's pooled metrics (CKA, "
                   "effective rank) 1000, probe and swap 100 (a lens or hybrid per segment), "
                   "suggest 64, steer 200",
    "--batch-size": "tune's is the effective training batch (examples per optimizer step, as "
                    "in transformers' Trainer); everywhere else texts per forward pass",
    "--bootstrap": "analyze defaults to 0: intervals of every metric at every layer cost more "
                   "than the capture (its help says so)",
    "--max-length": "eval needs room for few-shot prompts and completions (1024); tune uses "
                    "the longest example (each help says so)",
    "--max-new-tokens": "steer's completions are a glance at each scale (64); eval's are "
                        "scored answers (256, lm-eval's budget)",
    "--seed": "what is seeded differs: the sample selection, the generator, training",
    "--segments": "tune takes the segment count from --mask by default",
    "--split": "suggest reads the training split by default, so no evaluation item is seen",
    "--task": "each command's task list and use differs (eval scores one; sweep and steer "
              "take TASK:FILE)",
    "--tokenizer": "analyze, probe, swap, suggest and steer pick between the pair's two "
                   "tokenizers; tune and eval have one model",
    "--train": "required by tune; sweep can take it from sweep.json with --collect",
    "--masks": "swap adds masks to its one-segment hybrids; sweep trains every mask named",
    "--method": "tune's training method and suggest's signal are different choices",
    "--overwrite": "tune starts over (a resumable run), the others replace a finished run",
    "--preset": "each command's reference preset reproduces a different part of the "
                "research code",
    "--stages": "demo's --stages makes the checkpoint chain (DPO, GRPO) that the other "
                "commands' --stages name and read",
    "--eval-fewshot-data": "sweep passes eval's own option through (same meaning, eval's "
                           "fuller help)",
    "--eval-max-new-tokens": "sweep passes eval's own option through (same meaning, eval's "
                             "help)",
}

# lm-eval's names, accepted wherever the option exists
LM_EVAL = {"--task": "--tasks", "--shots": "--num-fewshot", "--eval-shots": "--eval-num-fewshot"}


def _options() -> dict[str, dict[str, click.Option]]:
    out: dict[str, dict[str, click.Option]] = defaultdict(dict)
    for name, cls in COMMANDS.items():
        for p in params_for(cls):
            if isinstance(p, click.Option):
                out[p.opts[0]][name] = p
    return out


def _meaning(p: click.Option) -> str:
    """The help text with its default, without sweep's "(tune) " / "(eval) " prefix."""
    return re.sub(r"^\((tune|eval)\) ", "", p.help or "")


def test_shared_options_one_meaning():
    differ = {}
    for opt, by_cmd in _options().items():
        if len(by_cmd) < 2:
            continue
        meanings = defaultdict(list)
        for cmd, p in by_cmd.items():
            meanings[_meaning(p)].append(cmd)
        if len(meanings) > 1:
            differ[opt] = dict(meanings)
    unexplained = {k: v for k, v in differ.items() if k not in EXCEPTIONS}
    assert not unexplained, unexplained
    stale = [k for k in EXCEPTIONS if k not in differ]
    assert not stale, f"listed as exceptions but now the same everywhere: {stale}"


def test_lm_eval_aliases_wherever_the_option_exists():
    for opt, by_cmd in _options().items():
        if opt in LM_EVAL:
            for cmd, p in by_cmd.items():
                assert LM_EVAL[opt] in p.opts, (cmd, opt, p.opts)


def test_limit_means_first_n_and_n_samples_a_subsample():
    opts = _options()
    assert set(opts["--limit"]) == {"eval"}  # lm-eval's "first N items"
    assert "first N" in opts["--limit"]["eval"].help
    assert {"analyze", "probe", "swap", "suggest", "steer"} <= set(opts["--n-samples"])
    assert "eval" not in opts["--n-samples"]
    for p in opts["--n-samples"].values():
        assert "seeded subsample" in p.help and "--limit" in p.opts  # the old spelling
    sweep = {o for p in params_for(COMMANDS["sweep"]) if isinstance(p, click.Option)
             for o in p.opts}
    assert {"--eval-limit", "--limit"} <= sweep  # eval's first N, passed through


def test_one_default_for_forward_batches():
    opts = _options()
    for flag in ("--batch-size", "--max-length", "--bootstrap"):
        defaults = {cmd: re.search(r"\[default: ([^;\]]+)", p.help or "")
                    for cmd, p in opts[flag].items()}
        common = {m.group(1) for m in defaults.values() if m}
        assert len(common - {"32", "1024", "0"}) == 1, (flag, defaults)


def test_out_is_optional_everywhere_with_one_default(tmp_path, monkeypatch):
    """--out: one help text in every command, never required; without it a command writes to
    a new folder sftscope-runs/COMMAND-TIME (report: report.html in the first RUN)."""
    from sftscope.config.core import default_out, resolve_out
    from sftscope.config.ingredients import OUT_HELP

    by_cmd = _options()["--out"]
    assert set(by_cmd) == {c for c in COMMANDS if "out" in _fields(c)}
    for cmd, p in by_cmd.items():
        assert not p.required and p.help == OUT_HELP, (cmd, p.help)
    monkeypatch.setenv("SFTSCOPE_RUNS", str(tmp_path))
    first = default_out("swap")
    assert first.startswith(str(tmp_path / "swap-")) and len(first.rsplit("-", 2)[-2]) == 8
    (tmp_path / first).mkdir()
    assert default_out("swap") == first + "-2"  # a taken name is never reused
    values = {"out": None, "num_jobs": 2}
    with pytest.raises(SftscopeError, match="--num-jobs 2: the processes share one folder"):
        resolve_out("sweep", values)
    # commands whose results are only files get the folder from Python too
    cfg = COMMANDS["data"](names=("gsm8k",))
    assert cfg.out.startswith(str(tmp_path / "data-"))
    assert COMMANDS["swap"](base="b", sft="s", data="gsm8k").out is None  # returns its table


def _fields(cmd):
    import dataclasses

    return {f.name for f in dataclasses.fields(COMMANDS[cmd])}
