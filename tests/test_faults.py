"""The fault catalogue: bad input to every command is one line on stderr and exit status 2.

Each case runs a command with one thing wrong and asserts: exit 2, exactly one line starting
``sftscope: error:`` that names the problem, no traceback, no cache entry, no finished-looking
run folder. Then the corrected command runs in the same folder and must succeed: a refused
attempt never blocks the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from sftscope.cli import main

DROP = object()  # remove a flag from the good command
FLAG = object()  # a flag without a value

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def paths(tmp_path_factory, model_dir) -> dict[str, str]:
    """Every good and bad input the cases refer to, as ``{name}`` placeholders."""
    return make_inputs(tmp_path_factory.mktemp("faults"), model_dir)


def make_inputs(root: Path, model_dir) -> dict[str, str]:
    """Build the inputs in ``root``; ``model_dir(family, seed=0, **config)`` makes tiny models."""
    base = model_dir("llama", seed=0)
    p: dict[str, Any] = {"base": base, "sft": model_dir("llama", seed=1),
                         "deep": model_dir("llama", n_layers=6), "gpt2": model_dir("gpt2"),
                         "wide": model_dir("llama", hidden=48), "moe": model_dir("mixtral"),
                         "root": root}
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?",
             "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"} for a, b in
            [(3, 4), (12, 7), (5, 5), (20, 1), (9, 8), (6, 2), (11, 3), (4, 4)]]
    (root / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "text.txt").write_text("the cat sat on the mat\nthe dog ran far away\n" * 4)
    (root / "empty.jsonl").write_text("")
    (root / "list.jsonl").write_text("[1, 2]\n")
    (root / "broken.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{"question":\n')
    (root / "noanswer.jsonl").write_text('{"question": "What is 1 + 1?"}\n')
    (root / "nullq.jsonl").write_text('{"question": null, "answer": "#### 2"}\n')
    (root / "pref_missing.jsonl").write_text(
        '{"prompt": "1 + 1 =", "chosen": " 2", "rejected": " 3"}\n'
        '{"prompt": "2 + 2 =", "chosen": " 4"}\n')
    (root / "data.xlsx").write_text("x")
    (root / "datadir").mkdir()
    mmlu = [{"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": 7,
             "subject": "math"}]
    (root / "mmlu_bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mmlu))
    arc = {"question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
           "answerKey": "Z"}
    (root / "arc_bad.jsonl").write_text(json.dumps(arc) + "\n")
    hs = {"activity_label": "Cooking", "ctx_a": "A man", "ctx_b": "then", "label": "7",
          "endings": ["a", "b", "c", "d"]}
    (root / "hellaswag_bad.jsonl").write_text(json.dumps(hs) + "\n")
    (root / "a_file").write_text("not a folder")
    nocfg = root / "nocfg"
    nocfg.mkdir()
    (nocfg / "weights.txt").write_text("x")
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(
        {"architectures": ["BertForMaskedLM"], "model_type": "bert", "num_hidden_layers": 4,
         "hidden_size": 32, "vocab_size": 512}))
    for name, cut in (("truncated", 100), ("emptyweights", None)):
        d = root / name
        shutil.copytree(base, d)
        f = d / "model.safetensors"
        f.write_bytes(b"" if cut is None else f.read_bytes()[:-cut])
    nanmodel = root / "nanmodel"  # a broken checkpoint: NaN in one weight of block 1
    from safetensors.torch import load_file, save_file

    shutil.copytree(base, nanmodel)
    tensors = load_file(str(nanmodel / "model.safetensors"))
    name = next(k for k in tensors if "layers.1." in k and k.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(nanmodel / "model.safetensors"), metadata={"format": "pt"})
    import torch

    p["moe"] = model_dir("qwen3_moe")
    moefused = root / "moefused"  # the same MoE, experts stored fused [E, ...]
    shutil.copytree(p["moe"], moefused)
    tensors = load_file(str(moefused / "model.safetensors"))
    for b in range(4):
        pre = f"model.layers.{b}.mlp.experts"
        per = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(pre + ".")]}
        for fused, projs in (("gate_up_proj", ("gate", "up")), ("down_proj", ("down",))):
            tensors[f"{pre}.{fused}"] = torch.stack([torch.cat(
                [per[f"{pre}.{e}.{r}_proj.weight"] for r in projs]) for e in range(4)])
    save_file(tensors, str(moefused / "model.safetensors"), metadata={"format": "pt"})
    noweights = root / "noweights"
    noweights.mkdir()
    shutil.copy(base / "config.json", noweights / "config.json")
    emptyadapter = root / "emptyadapter"
    emptyadapter.mkdir()
    orphan = root / "orphan"  # an adapter whose recorded base is gone
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "base_model_name_or_path": str(root / "gone")}))
    (root / "badmagic.gguf").write_bytes(b"GGML" + bytes(60))
    (root / "trunc.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little")
                                      + (1).to_bytes(8, "little") + (5).to_bytes(8, "little"))
    (root / "twogguf").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (root / "twogguf" / name).write_bytes(b"GGUF")
    (root / "ro").mkdir()
    p["other_run"] = str(root / "other_run")
    (root / "other_run").mkdir()
    (root / "other_run" / "run.json").write_text(json.dumps({"command": "demo",
                                                              "finished": True}))
    (root / "cfg_badkey.yaml").write_text("{cmd}:\n  batch_sise: 4\n")
    (root / "cfg_badtype.yaml").write_text("{cmd}:\n  batch_size: 'eight'\n")
    (root / "cfg_section.yaml").write_text("analyse:\n  batch_size: 4\n")
    (root / "cfg_parse.yaml").write_text("{cmd}: [\n")
    (root / "cfg_dup.yaml").write_text("{cmd}:\n  seed: 1\n  seed: 2\n")
    # issue 19: a run folder held by a live process (this test's parent), a table with text
    # where a number belongs, saved completions with a broken line
    locked = root / "locked"
    locked.mkdir()
    (locked / ".sftscope-lock").write_text(json.dumps(
        {"pid": os.getppid(), "host": socket.gethostname(), "command": "x", "started": "x"}))
    p["locked"] = str(locked)
    textnum = root / "textnum"
    textnum.mkdir()
    (textnum / "run.json").write_text(json.dumps({"command": "weights", "n_blocks": 2}))
    (textnum / "weights.csv").write_text("block,module,metric,value\n0,q,frobenius,lots\n")
    p["textnum"] = str(textnum)
    (root / "badcomp.jsonl").write_text('{"completion": "#### 4", "answer": "#### 4"}\n'
                                        '{"completion": \n')
    p["badcomp"] = str(root / "badcomp.jsonl")
    # a finished analyze run for report cases
    p.update({k: str(root / v) for k, v in {
        "gsm": "gsm8k.jsonl", "text": "text.txt", "empty": "empty.jsonl", "list": "list.jsonl",
        "broken": "broken.jsonl", "noanswer": "noanswer.jsonl", "nullq": "nullq.jsonl",
        "pref_missing": "pref_missing.jsonl",
        "xlsx": "data.xlsx", "datadir": "datadir", "mmlu_bad": "mmlu_bad.jsonl",
        "arc_bad": "arc_bad.jsonl", "hellaswag_bad": "hellaswag_bad.jsonl",
        "file": "a_file", "nocfg": "nocfg", "bert": "bert", "truncated": "truncated",
        "emptyweights": "emptyweights", "noweights": "noweights", "nanmodel": "nanmodel",
        "emptyadapter": "emptyadapter", "orphan": "orphan", "badgguf": "badmagic.gguf",
        "truncgguf": "trunc.gguf", "twogguf": "twogguf", "moefused": "moefused"}.items()})
    return {k: str(v) for k, v in p.items()}


def good(cmd: str) -> dict[str, Any]:
    """The corrected command: small, fast, and successful on the tiny models."""
    common = {"--device": "cpu"}
    return {
        "analyze": {"--base": "{base}", "--sft": "{sft}", "--data": "gsm8k:{gsm}",
                    "--limit": "6", "--n-token": "2", "--max-length": "32", "--batch-size": "4",
                    "--cache-dir": "{cache}", **common},
        "weights": {"--base": "{base}", "--sft": "{sft}", "--no-low-rank": FLAG, **common},
        "probe": {"--model": "{base}", "--data": "gsm8k:{gsm}", "--limit": "4",
                  "--max-length": "32", "--bootstrap": "0", **common},
        "swap": {"--base": "{base}", "--sft": "{sft}", "--data": "gsm8k:{gsm}",
                 "--segments": "2", "--limit": "4", "--max-length": "32", "--bootstrap": "0",
                 **common},
        "tune": {"--model": "{base}", "--train": "gsm8k:{gsm}", "--mask": "01",
                 "--max-steps": "1", "--n-train": "4", "--batch-size": "2",
                 "--micro-batch-size": "2", "--rank": "2", "--no-eval": FLAG},
        "eval": {"--model": "{base}", "--task": "gsm8k", "--data": "gsm8k:{gsm}", "--limit": "2",
                 "--shots": "0", "--max-new-tokens": "2", "--batch-size": "2", **common},
        "sweep": {"--model": "{base}", "--train": "gsm8k:{gsm}", "--task": "gsm8k:{gsm}",
                  "--segments": "2", "--masks": "01", "--seeds": "1", "--no-baseline": FLAG,
                  "--max-steps": "1", "--n-train": "4", "--batch-size": "2",
                  "--micro-batch-size": "2", "--rank": "2", "--eval-limit": "2",
                  "--eval-shots": "0", "--eval-max-new-tokens": "2", "--bootstrap": "20"},
        "suggest": {"--base": "{base}", "--data": "gsm8k:{gsm}", "--segments": "2",
                    "--method": "angular", "--limit": "4", "--max-length": "32", **common},
        "steer": {"--base": "{base}", "--sft": "{sft}", "--data": "gsm8k:{gsm}", "--layers": "2",
                  "--limit": "4", "--scales": "0,1", "--generate": FLAG, "--n-prompts": "2",
                  "--max-new-tokens": "2", "--max-length": "32", **common},
        "ablate": {"--model": "{base}", "--data": "gsm8k:{gsm}", "--limit": "4",
                   "--max-length": "32", "--bootstrap": "0", **common},
        "report": {"RUNS": "{finished}", "--out": "{out}/report.html"},
        "demo": {"--quick": FLAG, "--skip": "analyze,weights,probe,swap,sweep,report"},
        "data": {"RUNS": "gsm8k", "--train-size": "5", "--test-size": "5"},
    }[cmd]


# ----------------------------------------------------------------------------- the catalogue
# (command, overrides of the good command, extra arguments, text the error line must hold)

MODEL_CMDS = ("analyze", "probe", "swap", "suggest", "eval")
MODEL_FLAG = {"analyze": "--base", "probe": "--model", "swap": "--base", "suggest": "--base",
              "eval": "--model", "tune": "--model", "weights": "--sft", "sweep": "--model",
              "steer": "--sft", "ablate": "--model"}
DATA_FLAG = {"analyze": "--data", "probe": "--data", "swap": "--data", "suggest": "--data",
             "tune": "--train", "sweep": "--train"}

CASES: list[tuple[str, dict[str, Any], list[str], str]] = []


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def case(cmd: str, over: dict[str, Any] | None = None, extra: list[str] | None = None,
         needle: str = "") -> None:
    CASES.append((cmd, over or {}, extra or [], needle))


for cmd in ("analyze", "weights", "probe", "swap", "tune", "eval", "sweep", "suggest", "steer",
            "ablate"):
    case(cmd, extra=["--batch-sise", "4"], needle="no such option")
    if cmd == "sweep":  # --out is optional everywhere, but shards must name their one folder
        case(cmd, {"--out": DROP}, extra=["--num-jobs", "2"], needle="--out must name it")
    case(cmd, extra=["--config", "{root}/missing.yaml"], needle="does not exist")
    case(cmd, extra=["--config", "{root}/cfg_badkey.yaml"], needle="batch_sise")
    case(cmd, extra=["--config", "{root}/cfg_section.yaml"], needle="unknown section")
    case(cmd, extra=["--config", "{root}/cfg_parse.yaml"], needle="could not be parsed")
    case(cmd, extra=["--config", "{root}/cfg_dup.yaml"], needle="key 'seed' appears twice")
    case(cmd, {"--out": "{file}"}, needle="is a file")
    case(cmd, {"--out": "{file}/sub"}, needle="is a file")
    case(cmd, {"--out": "/proc/sftscope-out"}, needle="not writable")
    case(cmd, {"--out": "{other_run}"}, needle="`demo` run folder")
    case(cmd, {"--out": "{locked}"}, needle="is in use by process")
    m = MODEL_FLAG[cmd]
    case(cmd, {m: "{root}/nope"}, needle="does not exist")
    case(cmd, {m: "{nocfg}"}, needle="no config.json")
    case(cmd, {m: "{bert}"}, needle="BertForMaskedLM")
    case(cmd, {m: "{file}"}, needle="is a file")
    case(cmd, {m: "{truncated}"}, needle="truncated")
    case(cmd, {m: "{emptyweights}"}, needle="corrupt or truncated")
    case(cmd, {m: "{noweights}"}, needle="has no weights")
    case(cmd, {m: "{nanmodel}"}, needle="NaN or Inf")
for cmd in ("analyze", "probe", "swap", "eval", "suggest"):
    case(cmd, {"--dtype": "int7"}, needle="unknown --dtype 'int7'")
    case(cmd, {"--device": "gpu0"}, needle="is not a device")
    case(cmd, {"--device": "cuda"}, needle="no CUDA GPU is visible")
    case(cmd, {"--batch-size": "0"}, needle="--batch-size must be at least 1")
    case(cmd, {"--batch-size": "-1"}, needle="--batch-size must be at least 1")
    case(cmd, {"--batch-size": "four"}, needle="--batch-size expects an integer")
    case(cmd, {"--max-length": "1"}, needle="--max-length must be at least 2")
    case(cmd, {"--limit": "0"}, needle=("--limit" if cmd == "eval" else "--n-samples")
         + " must be at least 1")
    case(cmd, {"--device-map": "everywhere"}, needle="is not a device map")
for cmd in ("analyze", "probe", "swap", "suggest"):
    d = DATA_FLAG[cmd]
    case(cmd, {d: "{root}/nope.jsonl"}, needle="does not exist")
    case(cmd, {d: "{datadir}"}, needle="is a folder")
    case(cmd, {d: "{empty}"}, needle="is empty")
    case(cmd, {d: "{list}"}, needle="line 1")
    case(cmd, {d: "gsm8k:{broken}"}, needle="line 2")
    case(cmd, {d: "gsm8k:{noanswer}"}, needle="answer")
    case(cmd, {d: "gsm8k:{nullq}"}, needle="line 1")
    case(cmd, {d: "{xlsx}"}, needle="unknown format")
    case(cmd, {d: "{text}"}, extra=["--template", "Q: {{0}}"], needle="positional field")
    case(cmd, {d: "{text}"}, extra=["--template", "Q: {{question"], needle="expected '}'")
    case(cmd, {d: "{text}"}, extra=["--template", "Q: {{question}}"], needle="question")
    case(cmd, {d: "mmlu:{mmlu_bad}"}, needle="answer")
    case(cmd, {"--seed": "x"}, needle="--seed expects an integer")
for cmd in ("analyze", "swap", "suggest"):
    case(cmd, {"--sft": "{deep}"}, needle="has 6")
    case(cmd, {"--sft": "{gpt2}"}, needle="gpt2 model")
    case(cmd, {"--sft": "{wide}"}, needle="hidden size")
for cmd in ("analyze", "probe", "swap"):
    case(cmd, {"--formats": "xlsx"}, needle="unknown format xlsx")
    case(cmd, {"--level": "1.5"}, needle="--level must be in")
    case(cmd, {"--bootstrap": "-1"}, needle="--bootstrap must be at least 0")
    case(cmd, {"--tokenizer": "{root}/notok"}, needle="does not exist")

case("analyze", {"--n-token": "-1"}, needle="--n-token must be at least 0")
case("analyze", {"--entropy-alpha": "-1"}, needle="--entropy-alpha must be at least 0")
case("analyze", {"--normalisation": "log2"}, needle="unknown --normalisation")
case("analyze", {"--pooling": "max"}, needle="unknown --pooling")
case("analyze", {"--preset": "paper"}, needle="unknown --preset")
case("analyze", {"--checkpoint-every": "-1"}, needle="--checkpoint-every must be at least 0")
case("analyze", {"--cache-dir": "{file}"}, needle="is a file")
case("analyze", {"--entropy-normalisations": "log2"}, needle="unknown normalisation")
case("analyze", {"--base": DROP}, needle="missing --base")
case("analyze", {"--data": DROP}, needle="missing --data")
case("analyze", extra=["--router-input", "base"], needle="needs a mixture-of-experts pair")
case("analyze", extra=["--router-input", "own"], needle="needs a mixture-of-experts pair")
case("analyze", extra=["--router-input", "sft"], needle="--router-input")

case("probe", extra=["--base", "{base}"], needle="not both")
case("probe", extra=["--top1-examples", "-1"], needle="--top1-examples must be at least 0")
case("probe", extra=["--tokens", "some"], needle="unknown --tokens")
case("probe", extra=["--translators", "{root}"], needle="add --lens tuned")
case("probe", extra=["--lens", "tuned", "--translators", "{file}"], needle="is a file")
case("probe", extra=["--lens", "tuned", "--lens-train", "{root}/nope.jsonl"],
     needle="does not exist")
case("probe", extra=["--lens", "tuned", "--lens-lr", "0"], needle="--lens-lr")
case("probe", extra=["--shifts-top", "0"], needle="--shifts-top must be at least 1")
case("probe", {"--model": DROP}, needle="give --model, or both --base and --sft")
case("probe", {"--model": DROP}, extra=["--base", "{base}"], needle="both --base and --sft")

case("ablate", {"--segments": "9"}, needle="larger than the model's 4 blocks")
case("ablate", {"--segments": "0"}, needle="--segments must be at least 1")
case("ablate", {"--mode": "half"}, needle="unknown --mode")
case("ablate", extra=["--base", "{base}"], needle="not both")
case("ablate", {"--model": DROP}, extra=["--sft", "{sft}"], needle="both --base and --sft")
case("ablate", {"--model": DROP}, extra=["--base", "{base}", "--sft", "{gpt2}"],
     needle="gpt2 model")
case("ablate", {"--data": "gsm8k:{noanswer}"}, needle="answer")
case("ablate", {"--batch-size": "0"}, needle="--batch-size must be at least 1")

case("sweep", extra=["--retention", "{root}/nope.jsonl"], needle="does not exist")
case("sweep", extra=["--retention-limit", "0"], needle="--retention-limit must be at least 1")
case("swap", {"--segments": "0"}, needle="--segments must be at least 1")
# mixtures of experts: parts a model lacks, expert layouts that do not pair
case("swap", {"--parts": "experts"}, needle="--parts experts: llama is not a mixture")
case("swap", {"--parts": "router"}, needle="--parts router: llama is not a mixture")
case("swap", {"--parts": "shared_expert", "--base": "{moe}", "--sft": "{moe}"},
     needle="has no shared expert")
case("swap", {"--parts": "expert"}, needle="unknown --parts")
case("weights", {"--base": "{moe}", "--sft": "{moefused}"}, needle="re-save both")
case("swap", {"--segments": "99"}, needle="larger than the model")
case("swap", extra=["--masks", "012"], needle="valid groups")
case("swap", extra=["--masks", "00"], needle="valid groups")
case("swap", extra=["--masks", "010"], needle="3 characters")
case("swap", extra=["--head", "middle"], needle="unknown --head")
case("swap", extra=["--directions", "sideways"], needle="unknown --directions")

case("tune", {"--mask": "00"}, needle="selects no segment")
case("tune", {"--mask": "012"}, needle="string of 0 and 1")
case("tune", {"--mask": "01"}, extra=["--segments", "3"], needle="2 characters")
case("tune", {"--mask": DROP}, needle="--mask")
case("tune", {"--mask": DROP}, extra=["--blocks", "2-1"], needle="runs backwards")
case("tune", extra=["--blocks", "1-2"], needle="not both")
case("tune", {"--mask": DROP}, extra=["--blocks", "1-99"], needle="does not exist")
case("tune", {"--mask": DROP}, extra=["--blocks", "one"], needle="not a block or range")
case("tune", {"--mask": "11111"}, needle="larger than the model")
case("tune", {"--rank": "0"}, needle="--rank must be positive")
case("tune", {"--rank": "many"}, needle="--rank expects a number")
case("tune", extra=["--lr", "-1"], needle="--lr must be positive")
case("tune", extra=["--lr", "nan"], needle="finite")
case("tune", extra=["--epochs", "0"], needle="")  # with --max-steps: fine -> see below
case("tune", {"--max-steps": DROP}, extra=["--epochs", "0"], needle="zero steps")
case("tune", {"--max-steps": "0"}, needle="--max-steps must be at least 1")
case("tune", extra=["--epochs", "-1"], needle="--epochs must be at least 0")
case("tune", extra=["--dropout", "1.5"], needle="--dropout must be in")
case("tune", extra=["--warmup-steps", "-1"], needle="--warmup-steps must be at least 0")
case("tune", extra=["--weight-decay", "-1"], needle="--weight-decay must be at least 0")
case("tune", extra=["--max-grad-norm", "0"], needle="--max-grad-norm must be positive")
case("tune", extra=["--report-to", "mlflow"], needle="unknown --report-to")
case("tune", {"--micro-batch-size": "4"}, needle="larger than the effective")
case("tune", {"--batch-size": "3"}, needle="not a multiple")
case("tune", {"--n-train": "-3"}, needle="--n-train must be at least 0")
case("tune", extra=["--preset", "paper"], needle="unknown --preset")
case("tune", {"--no-eval": DROP}, extra=["--eval-task", "winogrande"], needle="unknown task")
case("tune", extra=["--eval-task", "gsm8k:{root}/nope.jsonl"], needle="does not exist")
case("tune", {"--train": "{root}/nope.jsonl"}, needle="does not exist")
case("tune", {"--train": "{empty}"}, needle="is empty")
case("tune", {"--train": "gsm8k:{noanswer}"}, needle="answer")
case("tune", extra=["--save-steps", "0"], needle="--save-steps must be at least 1")
case("tune", {"--model": "{root}/nope"}, needle="does not exist")
if not _cuda():
    case("tune", extra=["--dtype", "float16"], needle="--dtype float16 trains only on a CUDA")
case("tune", {"--train": "preference:{pref_missing}"}, extra=["--objective", "dpo"],
     needle="line 2: lacks field(s) 'rejected'")
case("tune", {"--train": "preference"}, extra=["--objective", "dpo"], needle="local-only")
case("tune", extra=["--objective", "dpo"], needle="preference:FILE")
case("tune", extra=["--objective", "rlhf"], needle="unknown --objective")
case("tune", extra=["--objective", "grpo"], needle="needs --reward")
case("tune", extra=["--objective", "grpo", "--reward", "exact"], needle="python:MODULE")
case("tune", extra=["--objective", "grpo", "--reward", "python:no_such_mod_xyz:f"],
     needle="could not be imported")
case("tune", extra=["--objective", "grpo", "--reward", "gsm8k", "--num-generations", "3"],
     needle="multiple of --num-generations")
case("tune", extra=["--objective", "grpo", "--reward", "gsm8k", "--num-generations", "1"],
     needle="--num-generations must be at least 2")
case("tune", extra=["--objective", "grpo", "--reward", "gsm8k", "--loss-type", "ppo"],
     needle="not one of TRL's GRPO losses")
case("tune", extra=["--reward", "gsm8k"], needle="--reward is an option of --objective grpo")
case("tune", extra=["--beta", "0.1"], needle="--beta is an option of --objective dpo or grpo")
# mixtures of experts: refused from the config, before the weights load
case("tune", extra=["--experts", "1"], needle="--experts applies to mixture-of-experts")
case("tune", extra=["--router"], needle="--router applies to mixture-of-experts")
case("tune", {"--model": "{moe}"}, extra=["--experts", "top-load:9"],
     needle="larger than the 4 experts")
case("tune", {"--model": "{moe}"}, extra=["--experts", "0,4"], needle="out of range")
case("tune", {"--model": "{moe}"}, extra=["--experts", "1"],
     needle="cannot target single experts")
case("tune", extra=["--experts", "top-load:0"], needle="K >= 1")
case("tune", extra=["--experts", "one"], needle="top-load:K or 0-based expert indices")
case("tune", {"--model": "{moe}"}, extra=["--mlp", "--dropout", "0.1"], needle="--dropout 0")
case("sweep", {"--model": "{moe}"}, extra=["--experts", "9"], needle="out of range")

case("eval", {"--task": "winogrande"}, needle="unknown --task")
case("eval", extra=["--shots", "-1"], needle="--shots must be at least 0")
case("eval", {"--max-new-tokens": "0"}, needle="--max-new-tokens must be at least 1")
case("eval", extra=["--adapter", "{root}/nope"], needle="does not exist")
case("eval", extra=["--adapter", "{emptyadapter}"], needle="adapter_config.json")
case("eval", {"--model": DROP}, extra=["--rescore", "{root}/nope.jsonl"],
     needle="does not exist")
case("eval", {"--model": DROP}, needle="needs --model")
case("eval", {"--model": DROP}, extra=["--rescore", "{badcomp}"], needle="line 2: not valid JSON")
case("eval", extra=["--rescore", "{gsm}"], needle="drop --model")
case("eval", extra=["--fewshot-data", "{root}/nope.jsonl"], needle="does not exist")
case("eval", {"--data": "mmlu:{mmlu_bad}"}, needle="mmlu format")
case("eval", {"--task": "mmlu", "--data": "mmlu:{mmlu_bad}"}, needle="answer")
case("eval", {"--task": "arc_easy", "--data": "arc_easy:{arc_bad}"},
     needle="answerKey 'Z' is not one of the choice labels A, B")
case("eval", {"--task": "hellaswag", "--data": "{hellaswag_bad}"},
     needle="gold index 7 is not one of the 4 choices")
case("probe", {"--data": "arc_challenge:{arc_bad}"}, needle="answerKey 'Z'")
case("eval", {"--data": "gsm8k:{noanswer}"}, needle="answer")
case("eval", extra=["--preset", "paper"], needle="unknown --preset")
case("eval", extra=["--level", "0"], needle="--level must be in")
case("eval", extra=["--num-fewshot", "x"], needle="--shots expects an integer")

case("sweep", {"--masks": "012"}, needle="valid groups")
case("sweep", extra=["--metric", "nope"], needle="--metric 'nope' is not a score of task gsm8k")
case("sweep", {"--masks": "00"}, needle="valid groups")
case("sweep", {"--masks": "010"}, needle="3 characters")
case("sweep", {"--seeds": "abc"}, needle="--seeds")
case("sweep", {"--seeds": "0"}, needle="at least 1")
case("sweep", extra=["--job-index", "2", "--num-jobs", "2"], needle="--job-index")
case("sweep", extra=["--tune-opt", "rnak=3"], needle="unknown tune option 'rnak'")
case("sweep", extra=["--objective", "dpo"], needle="preference:FILE")
case("sweep", extra=["--tune-opt", "warmup_steps=abc"], needle="--warmup-steps expects")
case("sweep", extra=["--tune-opt", "mask=11"], needle="set for each job")
case("sweep", extra=["--eval-opt", "shots=x"], needle="--shots expects an integer")
case("sweep", extra=["--suggest-opt", "method=best"], needle="unknown --method")
case("sweep", {"--task": "winogrande"}, needle="unknown task")
case("sweep", {"--segments": "0"}, needle="--segments must be at least 1")
case("sweep", {"--model": DROP}, needle="missing --model")
case("sweep", {"--rank": "0"}, needle="--rank (tune option) must be positive")
case("sweep", {"--eval-limit": "0"}, needle="--limit (eval option) must be at least 1")
case("sweep", {"--train": "{root}/nope.jsonl"}, needle="does not exist")
case("sweep", {"--segments": "9", "--masks": "010000000"}, needle="larger than the model")

case("suggest", {"--method": "pair"}, needle="needs --sft")
case("suggest", {"--method": "best"}, needle="unknown --method")
case("suggest", extra=["--max-active", "9"], needle="--max-active")
case("suggest", extra=["--edges", "sometimes"], needle="unknown --edges")
case("suggest", extra=["--extend", "0"], needle="--extend must be in")
case("suggest", extra=["--edge-factor", "0.5"], needle="--edge-factor must be at least 1")
case("suggest", extra=["--pick", "all"], needle="unknown --pick")
case("suggest", {"--segments": "0"}, needle="--segments must be at least 1")
case("suggest", extra=["--grad-samples", "0"], needle="--grad-samples must be at least 1")
case("suggest", {"--limit": "1"}, needle="at least 2")

case("weights", extra=["--adapter", "{emptyadapter}"], needle="not both")
case("weights", {"--sft": DROP}, needle="give --sft")
case("weights", {"--base": DROP}, needle="needs --base")
case("weights", extra=["--top-k", "0"], needle="--top-k must be at least 1")
case("weights", extra=["--max-rank", "0"], needle="--max-rank must be at least 1")
case("weights", {"--sft": "{deep}"}, needle="has 6")
case("weights", {"--formats": "xlsx"}, needle="unknown format xlsx")
case("weights", {"--device": "cuda"}, needle="no CUDA GPU is visible")

# adapters and GGUF files as models
case("probe", {"--model": "{orphan}"}, needle="names no usable base")
case("eval", {"--model": "{orphan}"}, needle="names no usable base")
case("weights", {"--sft": "{orphan}"}, needle="weights reads adapters with --adapter")
case("analyze", {"--sft": "{badgguf}"}, needle="not a GGUF file")
case("swap", {"--sft": "{twogguf}"}, needle="holds 2 GGUF files")
case("suggest", {"--base": "{truncgguf}"}, needle="truncated")

case("steer", {"--layers": "-1"}, needle="--layers must list hidden states")
case("steer", {"--layers": "99"}, needle="hidden state")
case("steer", {"--layers": "1,99"}, needle="--layers 1,99: hidden state 99 is outside")
case("steer", {"--layers": "two"}, needle="--layers must list hidden states")
case("steer", {"--layers": DROP}, needle="missing --layers")
case("steer", {"--scales": "0,x"}, needle="--scales")
case("steer", {"--scales": "0,nan"}, needle="--scales")
case("steer", {"--scales": "0,1e30"}, needle="--scales 1e+30: the steered model gives non-finite")
case("steer", {"--generate": DROP}, needle="--task")
case("steer", extra=["--direction", "pc2"], needle="unknown --direction")
case("steer", extra=["--pooling", "max"], needle="unknown --pooling")
case("steer", extra=["--task", "winogrande"], needle="unknown task")
case("steer", {"--n-prompts": "0"}, needle="--n-prompts must be at least 1")
case("steer", {"--max-new-tokens": "0"}, needle="--max-new-tokens must be at least 1")
case("steer", {"--sft": "{deep}"}, needle="has 6")
case("steer", {"--data": "{root}/nope.jsonl"}, needle="does not exist")
case("steer", {"--data": "gsm8k:{broken}"}, needle="line 2")
case("steer", {"--dtype": "int7"}, needle="unknown --dtype 'int7'")
case("steer", {"--device": "cuda"}, needle="no CUDA GPU is visible")

case("report", {"RUNS": "{root}/nope"}, needle="does not exist")
case("report", {"RUNS": "{file}"}, needle="is a file")
case("report", {"RUNS": DROP}, needle="missing RUNS")
case("report", {"--out": "{root}"}, needle="is a folder")
case("report", extra=["--figure-formats", "gif"], needle="unknown format gif")
case("report", {"RUNS": "{datadir}"}, needle="has no run.json")
case("report", {"RUNS": "{textnum}"}, needle="where a number belongs")
case("report", extra=["--tilte", "x"], needle="no such option")

case("demo", extra=["--family", "gpt5"], needle="unknown --family")
case("demo", {"--skip": "everything"}, needle="unknown step")
case("demo", extra=["--segments", "0"], needle="--segments must be at least 1")
case("demo", extra=["--sweep-seeds", "0"], needle="--sweep-seeds must be at least 1")
case("demo", extra=["--sweep-masks", "012"], needle="valid groups")
case("demo", extra=["--seed", "x"], needle="--seed expects an integer")
case("demo", extra=["--out", "{file}"], needle="is a file")
case("demo", extra=["--moe", "--family", "olmo2"], needle="--moe trains a Mixtral pair")

case("data", {"RUNS": "gsm9k"}, needle="NAME has unknown task set 'gsm9k'")
case("data", {"--test-size": "2001"}, needle="--test-size must be in [1, 2000]")
case("data", {"--train-size": "0"}, needle="--train-size must be at least 1")
case("data", extra=["--max-number", "5"], needle="--max-number must be in [20, 999]")
case("data", {"--out": "{file}"}, needle="is a file")
case("data", {"--out": "{other_run}"}, needle="`demo` run folder")

CASES = [c for c in CASES if c[3]]  # the one --epochs 0 with --max-steps is valid
CATALOGUE = [pytest.param(c, id=f"{i:03d}-{c[0]}-{c[3][:28]}") for i, c in enumerate(CASES)]


# ----------------------------------------------------------------------------- running


def argv_of(cmd: str, over: dict[str, Any], extra: list[str], fmt: dict[str, str],
            out: str) -> list[str]:
    args = {**good(cmd), **({"--out": "{out}"} if cmd not in ("report", "demo") else {})}
    if cmd == "demo":
        args["--out"] = "{out}"
    args.update(over)
    argv = [cmd]
    for flag, val in args.items():
        if val is DROP:
            continue
        if flag == "RUNS":
            argv.append(val.format(**fmt, out=out))
        elif val is FLAG:
            argv.append(flag)
        else:
            argv += [flag, val.format(**fmt, out=out)]
    return argv + [a.format(**fmt, out=out) for a in extra]


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(paths, tmp_path_factory) -> str:
    """A finished analyze run folder (the report's good input)."""
    from sftscope.config.commands import AnalyzeConfig
    from sftscope.experiments.analyze import analyze

    out = tmp_path_factory.mktemp("finished") / "run"
    analyze(AnalyzeConfig(base=paths["base"], sft=paths["sft"], data=f"gsm8k:{paths['gsm']}",
                          out=str(out), limit=6, n_token=2, max_length=32, device="cpu",
                          cache_dir=str(out.parent / "cache")))
    return str(out)


LATE = ("NaN or Inf", "the steered model gives non-finite")  # seen only after models ran


@pytest.mark.parametrize("c", CATALOGUE)
def test_fault(c, paths, finished, tmp_path, capsys, monkeypatch):
    cmd, over, extra, needle = c
    cache = tmp_path / "cache"
    monkeypatch.setenv("SFTSCOPE_CACHE", str(cache))
    out = str(tmp_path / "run")
    fmt = {**paths, "cache": str(cache), "finished": finished, "cmd": cmd}
    for name in ("cfg_badkey", "cfg_section", "cfg_parse", "cfg_dup"):  # sections: this cmd
        src = Path(paths["root"]) / f"{name}.yaml"
        dst = tmp_path / f"{name}.yaml"
        dst.write_text(src.read_text().replace("{cmd}", cmd))
    fmt["root_cfg"] = str(tmp_path)
    extra = [a.replace("{root}/cfg_", str(tmp_path) + "/cfg_") for a in extra]
    argv = argv_of(cmd, over, extra, fmt, out)
    code, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (argv, err)
    # Refusals come before any work: one line. A NaN weight can only be seen once the model is
    # read, and a steering scale that breaks the model once the vector is computed, so data
    # notes and progress lines may precede them; the error is still one line.
    errors = [ln for ln in lines if ln.startswith("sftscope: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)
    if not any(late in needle for late in LATE):
        assert len(lines) == 1, (argv, err)
    assert needle in lines[-1], (needle, lines[-1])
    assert "Traceback" not in err
    assert not cache.exists() or not any(cache.rglob("states-*")), "a cache entry was written"
    assert not (Path(out) / "run.json").exists()
    if cmd == "demo":
        return  # the corrected demo runs once, in test_demo_fault_then_fix
    code, err = run(argv_of(cmd, {}, [], fmt, out), capsys)
    assert code == 0, err
    target = Path(out) / "report.html" if cmd == "report" else Path(out) / "run.json"
    assert target.exists()


def test_demo_fault_then_fix(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code, err = run(["demo", "--out", out, "--family", "gpt5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, err = run(argv_of("demo", {}, [], {}, out), capsys)
    assert code == 0, err


def test_catalogue_size():
    assert len(CASES) >= 150
    from sftscope.cli.runners import COMMANDS

    assert {c[0] for c in CASES} == set(COMMANDS)  # every command has its bad inputs
