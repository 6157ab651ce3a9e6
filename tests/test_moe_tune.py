"""Tuning mixtures of experts: LoRA on routed and shared experts only inside the mask (merged
checkpoints compared tensor by tensor in the hub's per-expert layout), routers, full tuning of
chosen experts with the others bit-identical (weight decay included), routing loads against
the models' own router logits, per-expert dynamics rows, the budget, eval and sweep."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sftscope.cli import main
from sftscope.experiments import moe_tune as MT
from sftscope.experiments import tune as TU
from sftscope.load.arch import arch_for, moe_info
from sftscope.load.models import load_model
from sftscope.load.tiny import MOE_FAMILIES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?",
             "answer": f"{a} + {b} = {a + b}.\n#### {a + b}"}
            for a, b in [(3, 4), (12, 7), (5, 5), (20, 1), (9, 8), (6, 2)]]
    p = tmp_path_factory.mktemp("moe-data") / "gsm8k.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _tune(model, data, out, *extra, capsys=None):
    argv = ["tune", "--model", str(model), "--train", f"gsm8k:{data}", "--out", str(out),
            "--mask", "01", "--max-steps", "2", "--n-train", "4", "--batch-size", "2",
            "--micro-batch-size", "2", "--lr", "1e-2", "--dynamics-every", "1", "--no-eval",
            *extra]
    if not any(a == "--method" for a in extra):
        argv += ["--rank", "2"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    if capsys is not None:
        assert e.value.code == 0, capsys.readouterr().err
    assert e.value.code == 0
    return json.loads((out / "run.json").read_text())


def _block(name: str) -> int | None:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _changed(a: dict, b: dict) -> set[str]:
    assert set(a) == set(b)
    return {k for k in a if not torch.equal(a[k], b[k])}


# ------------------------------------------------------------------ LoRA --mlp --merge

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_mlp_merge_changes_experts_only_inside_mask(family, model_dir, data, tmp_path,
                                                         capsys):
    base = model_dir(family)
    router = family == "qwen2_moe"  # routers and the shared expert's gate as well
    rec = _tune(base, data, tmp_path / "run", "--mlp", "--merge",
                *(["--router"] if router else []), capsys=capsys)
    merged = tmp_path / "run" / "merged"
    a, b = load_file(str(base / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    changed = _changed(a, b)  # same tensor names: the hub's per-expert layout
    assert all(re.search(r"\.experts\.\d+\.", k) for k in a if "experts" in k)
    assert {_block(k) for k in changed} == {2, 3}  # the mask 01 over 4 blocks
    spec = arch_for(load_model(str(base)))
    for blk in (2, 3):
        per_expert = {int(m.group(1)) for k in changed if _block(k) == blk
                      and (m := re.search(r"\.experts\.(\d+)\.", k))}
        assert per_expert, f"no expert of block {blk} changed"
        router_keys = {k for k in a if _block(k) == blk and ".gate.weight" in k
                       and "experts" not in k and "shared" not in k}
        assert bool(router_keys & changed) == router, router_keys
    # what run.json says was adapted is what the model trained
    mods = rec["modules"]
    assert any(m.endswith("experts.gate_up_proj") for m in mods)
    assert {_block(m) for m in mods} == {2, 3}
    assert any("shared_expert." in m for m in mods) == (family == "qwen2_moe")
    assert rec["result"]["dropout"] == 0.0 and rec["result"]["router"] == router
    assert spec.moe is not None
    # the merged folder loads back equal to the base with the adapter merged in memory
    from sftscope.experiments.tune import load_adapter

    mem = load_adapter(load_model(str(base)), tmp_path / "run" / "adapter",
                       str(base)).merge_and_unload()
    back = load_model(str(merged))
    sd_m, sd_b = mem.state_dict(), back.state_dict()
    assert set(sd_m) == set(sd_b)
    assert all(torch.equal(sd_m[k], sd_b[k]) for k in sd_m)
    if family == "olmoe":  # weights cannot split such an adapter per module yet: it says so
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["weights", "--base", str(base), "--adapter", str(tmp_path / "run" / "adapter"),
                  "--out", str(tmp_path / "w")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "fused expert parameters" in err[0]


def test_dynamics_per_expert_rows(model_dir, data, tmp_path):
    base = model_dir("qwen2_moe")
    _tune(base, data, tmp_path / "run", "--mlp", "--router")
    d = pd.read_csv(tmp_path / "run" / "dynamics.csv")
    assert list(d.columns) == ["step", "block", "module", "expert", "grad_norm", "update_norm"]
    last = d[d["step"] == d["step"].max()]
    ex = last[last["module"] == "expert"]
    assert sorted(ex["expert"].dropna().astype(int).unique()) == [0, 1, 2, 3]
    assert last[last["module"] != "expert"]["expert"].isna().all()
    inside = ex[ex["block"].isin([2, 3])]
    assert (inside["update_norm"] > 0).all() and inside["grad_norm"].notna().all()
    outside = last[last["block"].isin([0, 1])]
    assert (outside["update_norm"] == 0).all() and outside["grad_norm"].isna().all()
    assert {"router", "shared_expert", "shared_expert_gate"} <= set(last["module"])


def test_lora_expert_rows_equal_per_expert_delta(model_dir):
    """Expert e's update row is ``||s B_e A_e||`` of its own LoRA pair."""
    from sftscope.experiments.dynamics import DynamicsRecorder

    model = load_model(str(model_dir("mixtral")))
    spec = arch_for(model)
    peft = TU.apply_lora(model, [1], rank=2, alpha=4, dropout=0.0, mlp=True, spec=spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    rec = DynamicsRecorder(peft, spec, 4, every=1, method="lora", path=None, write=False)
    rows = {(b, m, e): u for b, m, e, _g, u in rec.measure(peft)}
    experts = peft.get_base_model().model.layers[1].mlp.experts
    want = {}
    for layer in (experts, experts.base_layer):
        d = layer.get_delta_weight("default")  # [E, out, in]
        for e in range(d.shape[0]):
            want[e] = want.get(e, 0.0) + float(d[e].detach().double().square().sum())
    for e, sq in want.items():
        assert rows[(1, "expert", e)] == pytest.approx(math.sqrt(sq), rel=1e-5)


# ------------------------------------------------------------------ full --experts

@pytest.mark.parametrize("family,wd", [("mixtral", 0.1), ("qwen2_moe", 0.0),
                                       ("qwen3_moe", 0.1), ("olmoe", 0.0)])
def test_full_experts_others_bit_identical(family, wd, model_dir, data, tmp_path, capsys):
    base = model_dir(family)
    rec = _tune(base, data, tmp_path / "run", "--method", "full", "--experts", "1,3",
                "--weight-decay", str(wd), "--lr", "1e-3")
    a = load_file(str(base / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    changed = _changed(a, b)
    for k in a:
        m = re.search(r"\.experts\.(\d+)\.", k)
        if m and _block(k) in (2, 3):
            assert (k in changed) == (int(m.group(1)) in (1, 3)), k
        elif _block(k) in (0, 1):
            assert k not in changed, k
    assert {_block(k) for k in changed} == {2, 3}
    ex = rec["experts"]
    assert ex["trained"] == {"2": [1, 3], "3": [1, 3]} and ex["loads"] is None
    d = pd.read_csv(tmp_path / "run" / "dynamics.csv")
    last = d[(d["step"] == 2) & (d["module"] == "expert") & d["block"].isin([2, 3])]
    frozen = last[last["expert"].isin([0, 2])]
    assert (frozen["update_norm"] == 0).all() and frozen["grad_norm"].isna().all()
    assert (last[last["expert"].isin([1, 3])]["update_norm"] > 0).all()
    with pytest.raises(SystemExit) as e:  # the saved model evaluates
        main(["eval", "--model", str(tmp_path / "run" / "model"), "--task", "gsm8k", "--data",
              f"gsm8k:{data}", "--limit", "2", "--shots", "0", "--max-new-tokens", "2",
              "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert e.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "scores.csv").is_file()


def test_top_load_choice_and_loads_match_router_logits(model_dir, data, tmp_path):
    base = model_dir("olmoe")
    rec = _tune(base, data, tmp_path / "run", "--method", "full", "--experts", "top-load:2",
                "--lr", "1e-3")
    ex = rec["experts"]
    model = load_model(str(base))
    info = moe_info(model.config)
    # an independent count from the models' router logits (top-k of the softmax)
    from sftscope.experiments.tune import build_train_set
    from sftscope.load.data import load_samples
    from sftscope.load.models import load_tokenizer

    samples = load_samples(f"gsm8k:{data}", n=4, seed=0, split="train")
    rows = build_train_set(samples, load_tokenizer(str(base))).examples
    counts = torch.zeros(4, info.n_experts, dtype=torch.float64)
    with torch.no_grad():
        for r in rows:
            out = model(input_ids=torch.tensor([r["input_ids"]]), output_router_logits=True)
            for blk, logits in enumerate(out.router_logits):
                top = logits.float().softmax(-1).topk(info.top_k, dim=-1).indices.reshape(-1)
                counts[blk] += torch.bincount(top, minlength=info.n_experts).double()
    for blk in (2, 3):
        want = (counts[blk] / counts[blk].sum()).tolist()
        assert ex["loads"][str(blk)] == pytest.approx(want, abs=1e-12)
        order = sorted(range(info.n_experts), key=lambda e: (-want[e], e))
        assert ex["trained"][str(blk)] == sorted(order[:2])


def test_weight_decay_would_move_frozen_experts_without_restore(model_dir):
    """AdamW decays every element, gradient or not: the freeze must put them back."""
    model = load_model(str(model_dir("mixtral")))
    spec = arch_for(model)
    TU.unfreeze_blocks(model, [1], spec)
    experts = model.model.layers[1].mlp.experts
    before = experts.down_proj.detach().clone()
    moved = {}
    for restore in (False, True):
        with torch.no_grad():
            experts.down_proj.copy_(before)
        freeze = MT.ExpertFreeze(model, spec, {1: [0]}, weight_decay=0.1)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                weight_decay=0.1)
        x = torch.randint(5, 100, (2, 8))
        model(input_ids=x, labels=x).loss.backward()
        assert experts.down_proj.grad[1:].abs().sum() == 0 < experts.down_proj.grad[0].abs().sum()
        opt.step()
        if restore:
            freeze.restore()
        moved[restore] = not torch.equal(experts.down_proj[1:], before[1:])
        assert not torch.equal(experts.down_proj[0], before[0])
        freeze.remove()
        model.zero_grad()
    assert moved == {False: True, True: False}


def test_freeze_refuses_replaced_expert_parameters(model_dir):
    """FSDP/DeepSpeed re-create parameters: the hooks would be gone, so training refuses."""
    from sftscope.errors import SftscopeError

    model = load_model(str(model_dir("olmoe")))
    spec = arch_for(model)
    TU.unfreeze_blocks(model, [2], spec)
    freeze = MT.ExpertFreeze(model, spec, {2: [1]}, weight_decay=0.0)
    freeze.check(model)  # unchanged: fine
    experts = model.model.layers[2].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.detach().clone())
    with pytest.raises(SftscopeError, match="FSDP/DeepSpeed"):
        freeze.check(model)


# ------------------------------------------------------------------ budget and refusals

def test_budget_counts_expert_parameters(model_dir):
    model = load_model(str(model_dir("qwen2_moe")))
    spec = arch_for(model)
    t = MT.moe_lora_targets(model, [0, 1, 2, 3], spec, mlp=True, router=False)
    e = model.model.layers[0].mlp.experts
    n_e, two_i, h = e.gate_up_proj.shape
    i = e.down_proj.shape[2]
    per_block = n_e * 3 * ((two_i + h) + (h + i))  # rank 3: every expert's own pairs
    shared = sum(3 * (m.in_features + m.out_features)
                 for m in model.model.layers[0].mlp.shared_expert.modules()
                 if isinstance(m, torch.nn.Linear))
    assert MT.moe_budget_params(model, t, 3) == 4 * (per_block + shared)
    cfg = TU.TuneConfig(model=str(model_dir("qwen2_moe")), train="gsm8k", out="x", mask="01",
                        rank=3, mlp=True)
    attn = TU.lora_param_count(model, TU.lora_targets(model, [0, 1, 2, 3], False, spec), 3)
    budget = TU.full_depth_budget(model, cfg, spec, 4)
    assert budget == attn + 4 * (per_block + shared)
    # a mask of half the blocks at twice the rank trains exactly the full-depth budget
    peft = TU.apply_lora(model, [2, 3], rank=6, alpha=12, dropout=0.0, mlp=True, spec=spec)
    assert TU.trainable_params(peft) == budget


def test_refusals_before_loading(model_dir):
    from sftscope.errors import SftscopeError

    moe, dense = str(model_dir("mixtral")), str(model_dir("llama"))
    kw = dict(train="gsm8k", out="x", mask="01")
    cases = [(dense, dict(experts="1", method="full"), "mixture-of-experts"),
             (dense, dict(router=True), "mixture-of-experts"),
             (moe, dict(experts="top-load:5", method="full"), "larger than the 4 experts"),
             (moe, dict(experts="0,4", method="full"), "out of range"),
             (moe, dict(experts="1"), "cannot target single experts"),
             (moe, dict(mlp=True, dropout=0.1), "--dropout 0"),
             (moe, dict(router=True, method="full"), "LoRA option")]
    for model, over, needle in cases:
        with pytest.raises(SftscopeError, match=re.escape(needle)):
            TU.TuneConfig(model=model, **kw, **over)


def test_moe_flags_checked_without_torch(model_dir):
    import subprocess
    import sys

    code = ("import sys\nfrom sftscope.config.commands import TuneConfig\n"
            "from sftscope.errors import SftscopeError\ntry:\n"
            f"    TuneConfig(model={str(model_dir('mixtral'))!r}, train='gsm8k', out='x', "
            "mask='01', experts='9', method='full')\n"
            "except SftscopeError as e:\n    print(e)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out
    assert "out of range" in out.stdout


# ------------------------------------------------------------------ eval and sweep

@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_sweep_and_eval_over_moe(family, model_dir, data, tmp_path, capsys):
    base = model_dir(family)
    out = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--model", str(base), "--train", f"gsm8k:{data}",
              "--task", f"gsm8k:{data}", "--segments", "2", "--masks", "01", "--seeds", "1",
              "--no-baseline", "--max-steps", "1", "--n-train", "4", "--batch-size", "2",
              "--micro-batch-size", "2", "--rank", "2", "--mlp", "--eval-limit", "2",
              "--eval-shots", "0", "--eval-max-new-tokens", "2", "--bootstrap", "20",
              "--out", str(out)])
    assert e.value.code == 0, capsys.readouterr().err
    from sftscope.segments import mask_from_text

    summary = pd.read_csv(out / "summary.csv")
    assert {mask_from_text(m) for m in summary["mask"]} == {"01"}
    jobs = list((out / "jobs").glob("*/tune/run.json"))
    assert len(jobs) == 1
    rec = json.loads(jobs[0].read_text())
    assert any(m.endswith("experts.down_proj") for m in rec["modules"])
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(base), "--adapter", str(jobs[0].parent / "adapter"),
              "--task", "gsm8k", "--data", f"gsm8k:{data}", "--limit", "2", "--shots", "0",
              "--max-new-tokens", "2", "--batch-size", "2", "--device", "cpu",
              "--out", str(tmp_path / "eval")])
    assert e.value.code == 0, capsys.readouterr().err
    assert (tmp_path / "eval" / "scores.csv").is_file()
