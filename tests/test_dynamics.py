"""Training dynamics (dynamics.csv) and full fine-tuning of chosen blocks (tune --method full)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from sftscope.errors import SftscopeError
from sftscope.experiments import tune as TU
from sftscope.experiments.dynamics import (
    DYNAMICS_COLUMNS,
    clean_name,
    locate,
    lora_update_sq,
    param_role,
)
from sftscope.load.arch import arch_for, get_blocks
from sftscope.load.models import load_model

ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = {2 * a}\n#### {2 * a}"}
            for a in (1, 2, 3, 4)] * 4
    p = tmp_path_factory.mktemp("dyn") / "train.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return f"gsm8k:{p}"


def _cfg(model, train, out, **kw):
    base = dict(batch_size=4, micro_batch_size=4, max_steps=4, lr=5e-3, logging_steps=1,
                save_steps=100, run_eval=False, n_train=None)
    if kw.get("method", "lora") == "lora":
        base.update(rank=4, dropout=0.0)
    base.update(kw)
    return TU.TuneConfig(model=str(model), train=train, out=str(out), **base)


# ------------------------------------------------------------------ pieces


def test_lora_update_norm_without_forming_ba():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=g), torch.randn(30, 5, generator=g)
    want = torch.linalg.matrix_norm(2.5 * b @ a).item()
    assert math.sqrt(lora_update_sq(a, b, 2.5).item()) == pytest.approx(want, rel=1e-5)
    assert lora_update_sq(a, torch.zeros(30, 5), 2.0).item() == 0.0


def test_names_and_roles(llama10):
    spec = arch_for(load_model(str(llama10)))
    assert clean_name("base_model.model.model.layers.3._fsdp_wrapped_module.self_attn.q_proj."
                      "lora_A.default.weight") == \
        "model.layers.3.self_attn.q_proj.lora_A.default.weight"
    assert locate("model.layers.3.mlp.up_proj.weight", spec) == (3, "mlp.up_proj.weight")
    assert locate("model.embed_tokens.weight", spec) is None
    assert param_role("self_attn.q_proj.weight", spec) == "q"
    assert param_role("mlp.down_proj.weight", spec) == "down"
    assert param_role("input_layernorm.weight", spec) == "other"


def test_full_method_refuses_lora_options():
    for kw, name in (({"rank": 8}, "--rank"), ({"rslora": True}, "--rslora"),
                     ({"alpha": 16.0}, "--alpha"), ({"mlp": True}, "--mlp")):
        with pytest.raises(SftscopeError, match=f"{name} is a LoRA option"):
            TU.TuneConfig(model="m", train="gsm8k", out="o", mask="01000", method="full", **kw)
    with pytest.raises(SftscopeError, match="unknown --method"):
        TU.TuneConfig(model="m", train="gsm8k", out="o", mask="01000", method="half")


# ------------------------------------------------------------------ LoRA dynamics


def test_lora_dynamics_rows_and_values(llama10, train_file, tmp_path):
    """Rows per step, block and role; zero update outside the mask, and the recorded norms
    are the gradient after backward and ||s B A|| of the saved adapter."""
    from transformers import TrainerCallback

    seen: dict[int, float] = {}

    class Reference(TrainerCallback):  # runs after the recorder, in the same hook
        def on_optimizer_step(self, args, state, control, model=None, **kw):
            mod = model.get_submodule("base_model.model.model.layers.3.self_attn.v_proj")
            sq = sum(float(w.grad.float().square().sum()) for w in (
                mod.lora_A["default"].weight, mod.lora_B["default"].weight))
            seen[state.global_step + 1] = math.sqrt(sq)

    out = tmp_path / "run"
    res = TU.tune(_cfg(llama10, train_file, out, mask="01100", max_steps=5, dynamics_every=2),
                  callbacks=[Reference()])
    d = pd.read_csv(out / "dynamics.csv")
    assert list(d.columns) == DYNAMICS_COLUMNS
    assert sorted(d["step"].unique()) == [2, 4, 5]  # every 2 steps and the last one
    assert len(d) == 3 * 10 * 4
    assert set(d["module"]) == {"q", "k", "v", "o"}
    last = d[d["step"] == 5]
    inside = last["block"].isin([2, 3, 4, 5])
    assert (last.loc[~inside, "update_norm"] == 0.0).all()
    assert last.loc[~inside, "grad_norm"].isna().all()
    assert (last.loc[inside, "update_norm"] > 0).all()
    assert (last.loc[inside, "grad_norm"] > 0).all()
    # the gradient as the optimizer saw it
    for step in (2, 4, 5):
        row = d[(d["step"] == step) & (d["block"] == 3) & (d["module"] == "v")]
        assert row["grad_norm"].iloc[0] == pytest.approx(seen[step], rel=1e-5)
    # the update: ||s B A|| from the saved adapter
    from safetensors.torch import load_file

    w = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for b, role in ((2, "q"), (5, "o")):
        key = f"base_model.model.model.layers.{b}.{ROLES[role]}"
        a, bb = w[f"{key}.lora_A.weight"], w[f"{key}.lora_B.weight"]
        want = torch.linalg.matrix_norm(res.scaling * bb.float() @ a.float()).item()
        got = last[(last["block"] == b) & (last["module"] == role)]["update_norm"].iloc[0]
        assert got == pytest.approx(want, rel=1e-5)
    rec = json.loads((out / "run.json").read_text())
    assert rec["result"]["dynamics"]["steps"] == [2, 4, 5]
    assert rec["result"]["dynamics"]["file"] == "dynamics.csv"


def test_dynamics_off_and_default(llama10, train_file, tmp_path):
    TU.tune(_cfg(llama10, train_file, tmp_path / "off", mask="00001", max_steps=2,
                 dynamics_every=0))
    assert not (tmp_path / "off" / "dynamics.csv").exists()
    TU.tune(_cfg(llama10, train_file, tmp_path / "on", mask="00001", max_steps=3,
                 logging_steps=2))
    d = pd.read_csv(tmp_path / "on" / "dynamics.csv")
    assert sorted(d["step"].unique()) == [2, 3]  # default: every logging step, and the last


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_dynamics_resume_keeps_earlier_rows(llama10, train_file, tmp_path, method, kill_at_step):
    """A killed run resumed from its checkpoint: the rows up to the checkpoint are kept, and
    the update is still measured from step 0 (the base weights, not the checkpoint's)."""
    kw = dict(mask="00110", max_steps=5, save_steps=2, dynamics_every=1, method=method)
    if method == "full":
        kw["lr"] = 1e-3
    ref = TU.tune(_cfg(llama10, train_file, tmp_path / "a", **kw))
    with pytest.raises(KeyboardInterrupt):
        TU.tune(_cfg(llama10, train_file, tmp_path / "b", **kw), callbacks=[kill_at_step(3)])
    first = pd.read_csv(tmp_path / "b" / "dynamics.csv")
    assert sorted(first["step"].unique()) == [1, 2, 3]
    TU.tune(_cfg(llama10, train_file, tmp_path / "b", resume=True, **kw))
    a = pd.read_csv(tmp_path / "a" / "dynamics.csv")
    b = pd.read_csv(tmp_path / "b" / "dynamics.csv")
    assert sorted(b["step"].unique()) == [1, 2, 3, 4, 5] and len(b) == len(a)
    assert ref.steps == 5
    pd.testing.assert_series_equal(a["update_norm"], b["update_norm"], rtol=1e-3,
                                   check_exact=False)
    if method == "full":
        from transformers import AutoModelForCausalLM

        base = load_model(str(llama10)).state_dict()
        tuned = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b" / "model")).state_dict()
        k = "model.layers.5.mlp.up_proj.weight"
        got = b[(b["step"] == 5) & (b["block"] == 5) & (b["module"] == "up")]["update_norm"]
        assert got.iloc[0] == pytest.approx(torch.linalg.matrix_norm(tuned[k] - base[k]).item(),
                                            rel=1e-4)


# ------------------------------------------------------------------ full fine-tuning


@pytest.fixture(scope="module")
def full_run(llama10, train_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    reached: dict[int, int] = {}
    from transformers import TrainerCallback

    class Trace(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            assert not TU.has_input_grad_hook(model)
            for i, blk in enumerate(get_blocks(model)):
                def hook(mod, a, o, i=i):
                    h = o[0] if isinstance(o, tuple) else o
                    if h.requires_grad:
                        h.register_hook(lambda g: reached.__setitem__(i, reached.get(i, 0) + 1))
                blk.register_forward_hook(hook)

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            for n, p in model.named_parameters():
                inside = any(f"layers.{b}." in n for b in (4, 5, 6, 7))
                assert (p.grad is not None) == inside, n

    res = TU.tune(_cfg(llama10, train_file, out, method="full", mask="00110", lr=1e-3,
                       max_steps=4, dynamics_every=2, gradient_checkpointing=True),
                  callbacks=[Trace()])
    return res, out, reached


def test_full_tune_trains_only_the_mask(llama10, full_run):
    from transformers import AutoModelForCausalLM

    res, out, reached = full_run
    assert res.method == "full" and res.adapter_dir is None
    assert res.model_dir == str(out / "model") and res.output_dir == res.model_dir
    assert res.blocks == [4, 5, 6, 7] and res.rank is None
    base = load_model(str(llama10))
    layers = get_blocks(base)
    assert res.trainable_params == sum(p.numel() for b in (4, 5, 6, 7)
                                       for p in layers[b].parameters())
    assert res.full_depth_params == sum(p.numel() for p in layers.parameters())
    tuned = AutoModelForCausalLM.from_pretrained(str(out / "model"))  # an ordinary HF folder
    sd_b, sd_t = base.state_dict(), tuned.state_dict()
    assert sd_b.keys() == sd_t.keys()
    for k in sd_b:
        inside = any(k.startswith(f"model.layers.{b}.") for b in (4, 5, 6, 7))
        if inside:
            assert not torch.equal(sd_b[k], sd_t[k]), k
        else:
            assert torch.equal(sd_b[k], sd_t[k]), k  # bit-identical
    assert (out / "model" / "tokenizer.json").is_file()
    assert not (out / "model" / "training_args.bin").exists()
    assert not (out / "adapter").exists()
    # no backward pass below the lowest trained block
    assert sorted(reached) == [4, 5, 6, 7, 8, 9]
    rec = json.loads((out / "run.json").read_text())
    assert rec["method"] == "full" and rec["trainable_params"] == res.trainable_params
    assert rec["result"]["model_dir"] == res.model_dir


def test_full_tune_dynamics_match_the_saved_weights(llama10, full_run):
    from transformers import AutoModelForCausalLM

    res, out, _ = full_run
    d = pd.read_csv(out / "dynamics.csv")
    assert sorted(d["step"].unique()) == [2, 4]
    assert set(d["module"]) == {*ROLES, "other"}
    last = d[d["step"] == 4]
    inside = last["block"].isin([4, 5, 6, 7])
    assert (last.loc[~inside, "update_norm"] == 0.0).all()
    assert last.loc[~inside, "grad_norm"].isna().all()
    assert (last.loc[inside, "update_norm"] > 0).all() and (last.loc[inside, "grad_norm"] > 0).all()
    base = load_model(str(llama10)).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(str(out / "model")).state_dict()
    for b in (4, 7):
        for role, path in ROLES.items():
            k = f"model.layers.{b}.{path}.weight"
            want = torch.linalg.matrix_norm(tuned[k] - base[k]).item()
            got = last[(last["block"] == b) & (last["module"] == role)]["update_norm"].iloc[0]
            assert got == pytest.approx(want, rel=1e-4), (b, role)
        others = [k for k in base if k.startswith(f"model.layers.{b}.")
                  and not any(p in k for p in ROLES.values())]
        want = math.sqrt(sum(float((tuned[k] - base[k]).square().sum()) for k in others))
        got = last[(last["block"] == b) & (last["module"] == "other")]["update_norm"].iloc[0]
        assert got == pytest.approx(want, rel=1e-4)


def test_full_tune_evaluates_the_model_folder(llama10, gsm8k_file, tmp_path):
    out = tmp_path / "run"
    res = TU.tune(_cfg(llama10, f"gsm8k:{gsm8k_file}", out, method="full", blocks="8-9",
                       max_steps=1, run_eval=True, eval_task=f"gsm8k:{gsm8k_file}",
                       eval_limit=2, eval_shots=0, eval_max_new_tokens=4))
    assert res.eval is not None and res.eval.n == 2
    assert (out / "scores.csv").is_file()
    rec = json.loads((out / "run.json").read_text())
    assert rec["result"]["eval"]["adapter"] is None


@pytest.mark.slow
def test_two_process_ddp_full_tune(llama10, train_file, tmp_path):
    """Two processes (DDP over gloo on the CPU): rank 0 alone writes; the recorded update is
    the saved model's change; frozen weights stay bit-identical."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "SFTSCOPE_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(TU.__file__).parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "sftscope", "tune", "--model", str(llama10), "--train", train_file,
           "--out", str(out), "--mask", "00011", "--method", "full", "--batch-size", "4",
           "--micro-batch-size", "2", "--max-steps", "2", "--n-train", "0", "--no-eval",
           "--dynamics-every", "1", "--lr", "1e-3", "--dtype", "float32"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads((out / "run.json").read_text())
    assert rec["processes"] == 2 and rec["grad_accumulation"] == 1
    d = pd.read_csv(out / "dynamics.csv")
    assert len(d) == 2 * 10 * 8 and not d.duplicated(["step", "block", "module"]).any()
    base = load_model(str(llama10)).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(str(out / "model")).state_dict()
    for k in base:
        if not any(k.startswith(f"model.layers.{b}.") for b in (6, 7, 8, 9)):
            assert torch.equal(base[k], tuned[k]), k
    last = d[d["step"] == 2]
    k = "model.layers.8.self_attn.o_proj.weight"
    got = last[(last["block"] == 8) & (last["module"] == "o")]["update_norm"].iloc[0]
    assert got == pytest.approx(torch.linalg.matrix_norm(tuned[k] - base[k]).item(), rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp2_sharded_norms_are_whole_tensor_norms(llama10, method):
    """FSDP2 shards (2 CPU processes): the all-reduced shard sums equal the norms of the whole
    gradients and updates (checked against ``full_tensor()`` in the worker)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("fsdp_dynamics_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(TU.__file__).parents[2]),
                                          os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(worker), str(llama10), method],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"OK {method}" in p.stdout, (p.stdout + p.stderr)[-3000:]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gpt2_roles_fused_qkv(model_dir, method):
    """GPT-2 (fused qkv, Conv1D weights stored (in, out)): rows by role, the LoRA update is
    ||s B A|| whatever the orientation, the full update is the weights' change."""
    from sftscope.experiments.dynamics import DynamicsRecorder

    model = load_model(str(model_dir("gpt2", n_layers=4)))
    spec = arch_for(model)
    if method == "full":
        TU.unfreeze_blocks(model, [2], spec)
    else:
        model = TU.apply_lora(model, [2], rank=4, alpha=8, mlp=True, spec=spec)
    rec = DynamicsRecorder(model, spec, 4, every=1, method=method, path=None, write=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)  # a known update: 0.01 everywhere
    x = torch.randint(5, 300, (2, 9))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    rows = {(b, m): (g, u) for b, m, _e, g, u in rec.measure(model)}
    mods = {m for _, m in rows}
    want = {"qkv", "o", "fc_in", "fc_out"} | ({"other"} if method == "full" else set())
    assert mods == want
    for (b, _), (g, u) in rows.items():
        if b != 2:
            assert u == 0.0 and math.isnan(g)
            continue
        assert g > 0 and u > 0
    if method == "full":
        w = model.get_submodule("transformer.h.2.attn.c_attn")
        n = w.weight.numel() + w.bias.numel()
        assert rows[(2, "qkv")][1] == pytest.approx(0.01 * math.sqrt(n), rel=1e-4)
    else:
        mod = model.get_submodule("base_model.model.transformer.h.2.mlp.c_fc")
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        want_u = torch.linalg.matrix_norm(mod.scaling["default"] * b @ a).item()
        assert rows[(2, "fc_in")][1] == pytest.approx(want_u, rel=1e-5)
