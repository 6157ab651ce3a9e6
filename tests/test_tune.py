"""Segment LoRA: adapter placement, equal budget, no backward below the lowest adapted block,
training lowers the loss, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from sftscope.errors import SftscopeError
from sftscope.experiments import tune as TU
from sftscope.load.arch import ArchSpec, arch_for, get_blocks
from sftscope.load.models import load_model


def _cfg(model, train, out, **kw):
    base = dict(rank=4, batch_size=4, micro_batch_size=4, max_steps=6, lr=5e-3, logging_steps=1,
                save_steps=100, run_eval=False, n_train=None, dropout=0.0)
    base.update(kw)
    return TU.TuneConfig(model=str(model), train=str(train), out=str(out), **base)


# ------------------------------------------------------------------ placement and budget

def test_adapters_exactly_on_selected_blocks_llama(llama10):
    model = load_model(str(llama10))
    blocks = TU.select_blocks(_cfg(llama10, "gsm8k", "y", mask="01000"), 10)
    assert blocks == [2, 3]
    peft = TU.apply_lora(model, blocks, rank=8, alpha=16)
    names = TU.adapted_modules(peft)
    assert names == sorted(f"model.layers.{b}.self_attn.{p}_proj" for b in (2, 3)
                           for p in "qkvo")
    # nothing else trains, and the walk over parameters agrees with the walk over modules
    for n, p in peft.named_parameters():
        if p.requires_grad:
            assert "lora_" in n and any(f"layers.{b}." in n for b in (2, 3)), n
    assert not TU.has_input_grad_hook(peft)


def test_adapters_gpt2_fused_and_mlp(model_dir):
    path = model_dir("gpt2", n_layers=4)
    model = load_model(str(path))
    peft = TU.apply_lora(model, [1, 2], rank=4, alpha=8)
    # attn.c_attn (fused qkv) and attn.c_proj, but not mlp.c_proj (same leaf name)
    assert TU.adapted_modules(peft) == sorted(f"transformer.h.{b}.attn.{m}" for b in (1, 2)
                                              for m in ("c_attn", "c_proj"))
    model = load_model(str(path))
    peft = TU.apply_lora(model, [3], rank=4, alpha=8, mlp=True)
    assert TU.adapted_modules(peft) == sorted(f"transformer.h.3.{m}" for m in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))


def test_equal_budget_parameter_counts(llama10):
    model = load_model(str(llama10))
    spec = arch_for(model)
    counts = {}
    for mask in ("11111", "01000", "01110", "00001"):
        blocks = TU.select_blocks(_cfg(llama10, "gsm8k", "y", mask=mask), 10)
        rank = TU.budget_rank(8, 10, len(blocks))
        names = TU.lora_targets(model, blocks, spec=spec)
        counts[mask] = TU.lora_param_count(model, names, rank)
    full = counts["11111"]
    assert full == TU.lora_param_count(model, TU.lora_targets(model, list(range(10))), 8)
    for mask, c in counts.items():
        assert abs(c - full) / full < 0.05, (mask, c, full)
    # and the analytic count is what PEFT actually trains
    peft = TU.apply_lora(load_model(str(llama10)), [2, 3, 4, 5, 6, 7],
                         rank=TU.budget_rank(8, 10, 6), alpha=1)
    assert TU.trainable_params(peft) == counts["01110"]


def test_budget_rank_and_alpha():
    assert TU.budget_rank(64, 32, 6) == 341  # 64*32/6 = 341.33
    assert TU.budget_rank(8, 10, 4) == 20
    assert TU.budget_rank(1, 10, 4) == 3  # 2.5 rounds half up
    with pytest.raises(SftscopeError, match="rounds to 0"):
        TU.budget_rank(0.04, 10, 10)
    cfg = TU.TuneConfig(model="m", train="gsm8k", out="o", mask="01000", rank=8)
    assert TU.lora_alpha(cfg, 40) == (80.0, 2.0)
    ref = TU.resolve_config(TU.TuneConfig(model="m", train="gsm8k", out="o", mask="01000",
                                          preset="reference"))
    assert (ref.alpha, ref.max_length, ref.completion_only) == (128.0, 128, False)
    assert (ref.eval_shots, ref.eval_max_new_tokens, ref.eval_limit) == (0, 64, 100)
    assert TU.lora_alpha(ref, 40)[1] == pytest.approx(128 / 40)
    rs = TU.TuneConfig(model="m", train="gsm8k", out="o", mask="11111", rank=16, rslora=True)
    assert TU.lora_alpha(rs, 16)[1] == pytest.approx(2.0)  # equals the default at full depth


def test_model_without_target_modules(llama10):
    model = load_model(str(llama10))
    spec = arch_for(model)
    bad = ArchSpec("x", ("x",), blocks=spec.blocks, embed=spec.embed,
                   final_norm=spec.final_norm, attn={"q": "self_attn.query"})
    with pytest.raises(SftscopeError, match="does not have the attention projections"):
        TU.lora_targets(model, [0], spec=bad)
    empty = ArchSpec("x", ("x",), blocks=spec.blocks, embed=spec.embed,
                     final_norm=spec.final_norm)
    with pytest.raises(SftscopeError, match="no attention projections"):
        TU.lora_targets(model, [0], spec=empty)


def test_bad_masks():
    for mask, msg in (("0120", "0 and 1"), ("00000", "no segment"), ("0100", "characters")):
        with pytest.raises(SftscopeError, match=msg):
            TU.resolve_config(TU.TuneConfig(model="m", train="gsm8k", out="o", mask=mask,
                                            segments=5))
    with pytest.raises(SftscopeError, match="either --mask"):
        TU.resolve_config(TU.TuneConfig(model="m", train="gsm8k", out="o"))


# ------------------------------------------------------------------ backward cost

def _backward_trace(peft, model_blocks, x):
    """Per block: does its output require grad, and how many gradients reached it."""
    reached = [0] * len(model_blocks)
    needs = [None] * len(model_blocks)
    handles = []
    for i, blk in enumerate(model_blocks):
        def hook(mod, args, kwargs, out, i=i):
            h = out[0] if isinstance(out, tuple) else out
            inp = args[0] if args else kwargs["hidden_states"]
            needs[i] = (inp.requires_grad, h.requires_grad)
            if h.requires_grad:
                h.register_hook(lambda g, i=i: reached.__setitem__(i, reached[i] + 1))
        handles.append(blk.register_forward_hook(hook, with_kwargs=True))
    peft.train()
    out = peft(input_ids=x, labels=x)
    out.loss.backward()
    for h in handles:
        h.remove()
    return needs, reached


@pytest.mark.parametrize("checkpointing", [False, True])
def test_no_gradient_below_lowest_adapted_block(llama10, checkpointing):
    model = load_model(str(llama10))
    model.config.use_cache = False
    if checkpointing:
        TU.enable_checkpointing(model)
    blocks = get_blocks(model)
    peft = TU.apply_lora(model, [6, 7], rank=4, alpha=8)
    assert not TU.has_input_grad_hook(peft)
    with torch.no_grad():  # non-zero B so gradients reach A too
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randint(5, 300, (2, 24))
    needs, reached = _backward_trace(peft, blocks, x)
    for b in range(6):  # below: no graph at all
        assert needs[b] == (False, False), b
        assert reached[b] == 0, b
    assert needs[6] == (False, True)  # the lowest adapted block's input needs no gradient
    for b in range(6, 10):
        assert reached[b] == 1, b
    assert model.get_input_embeddings().weight.grad is None
    for n, p in peft.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


# ------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def repetitive_file(tmp_path_factory):
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
            for a in (1, 2, 3, 4)] * 4
    p = tmp_path_factory.mktemp("rep") / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_training_lowers_loss_and_writes_run(llama10, repetitive_file, tmp_path):
    out = tmp_path / "run"
    res = TU.tune(_cfg(llama10, f"gsm8k:{repetitive_file}", out, mask="01100", max_steps=30,
                       lr=1e-2))
    h = res.loss_history
    assert len(h) == 30
    # h[0] is the base model's loss (LoRA B starts at zero): the tail is clearly below it
    assert sum(h[-5:]) / 5 < h[0] - 0.25, h
    assert max(h[-5:]) < min(h[:3]), h
    assert res.blocks == [2, 3, 4, 5] and res.rank == 10 and res.alpha == 20
    assert res.trainable_params == res.full_depth_params
    assert (out / "adapter" / "adapter_config.json").is_file()
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["layers_to_transform"] == [2, 3, 4, 5] and acfg["r"] == 10
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "tune" and rec["finished"] and rec["n_blocks"] == 10
    assert rec["trainable_params"] == res.trainable_params
    assert rec["modules"] == res.modules and len(res.modules) == 16
    assert not (out / "checkpoints").exists()
    # a finished run is not overwritten, and --resume returns it as recorded
    with pytest.raises(SftscopeError, match="already holds"):
        TU.tune(_cfg(llama10, f"gsm8k:{repetitive_file}", out, mask="01100", max_steps=30,
                     lr=1e-2))
    again = TU.tune(_cfg(llama10, f"gsm8k:{repetitive_file}", out, mask="01100", max_steps=30,
                         lr=1e-2, resume=True))
    assert again.loss_history == res.loss_history


def test_completion_only_labels(tokenizer):
    from sftscope.load.data import Sample

    s = Sample("Question: 1+1?\nAnswer: 2", "Question: 1+1?\nAnswer:", " 2")
    ts = TU.build_train_set([s], tokenizer)
    ex = ts.examples[0]
    n_prompt = len(tokenizer("Question: 1+1?\nAnswer:")["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    whole = TU.build_train_set([s], tokenizer, completion_only=False).examples[0]
    assert whole["labels"] == whole["input_ids"]
    cut = TU.build_train_set([s, s], tokenizer, max_length=n_prompt + 1)
    assert cut.n_truncated == 2 and cut.max_length == n_prompt + 1
    batch = TU.PadCollator(0)([ex, {"input_ids": [5, 6], "labels": [-100, 6]}])
    assert batch["labels"][1, 2:].eq(-100).all() and batch["attention_mask"][1].sum() == 2


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(llama10, repetitive_file, tmp_path, kill_at_step):
    train = f"gsm8k:{repetitive_file}"
    kw = dict(mask="00110", max_steps=6, save_steps=2, dropout=0.05)
    ref = TU.tune(_cfg(llama10, train, tmp_path / "a", **kw))
    with pytest.raises(KeyboardInterrupt):
        TU.tune(_cfg(llama10, train, tmp_path / "b", **kw), callbacks=[kill_at_step(3)])
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(SftscopeError, match="unfinished"):
        TU.tune(_cfg(llama10, train, tmp_path / "b", **kw))
    res = TU.tune(_cfg(llama10, train, tmp_path / "b", resume=True, **kw))
    assert res.resumed_from and res.resumed_from.endswith("checkpoint-2")
    assert res.steps == 6
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert res.loss_history[-2:] == pytest.approx(ref.loss_history[-2:], abs=1e-4)
    # the loss of every step, not only of those since the resume (issue 19)
    assert res.train_loss == pytest.approx(ref.train_loss, rel=1e-6)


def test_seed_determinism(llama10, repetitive_file, tmp_path):
    train = f"gsm8k:{repetitive_file}"
    a = TU.tune(_cfg(llama10, train, tmp_path / "a", mask="00010", max_steps=3, dropout=0.05))
    b = TU.tune(_cfg(llama10, train, tmp_path / "b", mask="00010", max_steps=3, dropout=0.05))
    c = TU.tune(_cfg(llama10, train, tmp_path / "c", mask="00010", max_steps=3, dropout=0.05,
                     seed=1))
    assert a.loss_history == b.loss_history
    assert a.loss_history != c.loss_history


def test_cli_tune_blocks_then_eval(llama10, gsm8k_file, tmp_path, capsys):
    from sftscope.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["tune", "--model", str(llama10), "--train", f"gsm8k:{gsm8k_file}", "--out",
              str(out), "--blocks", "7-9", "--rank", "3", "--batch-size", "4",
              "--micro-batch-size", "2", "--max-steps", "2", "--n-train", "0",
              "--eval-task", f"gsm8k:{gsm8k_file}", "--eval-limit", "2", "--eval-shots", "1",
              "--eval-max-new-tokens", "4", "--rslora"])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    assert "LoRA on blocks 7-9" in err and "trainable parameters" in err
    assert "planned work: 2 steps x 4 examples x " in err  # printed before training
    rec = json.loads((out / "run.json").read_text())
    assert rec["blocks"] == [7, 8, 9] and rec["rank"] == 10 and rec["mask"] is None
    assert rec["result"]["eval"]["n"] == 2 and rec["result"]["steps"] == 2
    assert rec["config"]["rslora"] and rec["result"]["scaling"] == pytest.approx(
        2 * 3 ** 0.5 / 10 ** 0.5)
    assert (out / "scores.csv").is_file() and (out / "predictions-gsm8k.jsonl").is_file()


def test_trainer_path_skips_backward_below(llama10, repetitive_file, tmp_path):
    """The same check through ``tune`` itself (Trainer, gradient checkpointing on)."""
    from transformers import TrainerCallback

    reached: dict[int, int] = {}

    class Trace(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            assert not TU.has_input_grad_hook(model)
            for i, blk in enumerate(get_blocks(model.get_base_model())):
                def hook(mod, a, out, i=i):
                    h = out[0] if isinstance(out, tuple) else out
                    if h.requires_grad:
                        h.register_hook(lambda g: reached.__setitem__(i, reached.get(i, 0) + 1))
                blk.register_forward_hook(hook)

    res = TU.tune(_cfg(llama10, f"gsm8k:{repetitive_file}", tmp_path / "r", mask="00010",
                       max_steps=2, gradient_checkpointing=True), callbacks=[Trace()])
    assert res.blocks == [6, 7]
    assert sorted(reached) == [6, 7, 8, 9] and all(v >= 2 for v in reached.values())
