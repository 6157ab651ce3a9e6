"""``weights`` on mixture-of-experts checkpoints: known per-expert, router and shared-expert
deltas come back exactly, from the per-expert layout ``save_pretrained`` writes and from a
fused ``[E, ...]`` layout."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sftscope.errors import SftscopeError
from sftscope.experiments.weights import weight_change
from sftscope.load import arch

_PROJ = {"mixtral": {"gate": "w1", "up": "w3", "down": "w2"},
         "qwen2_moe": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}


def _disk(family: str, block: int, what: str) -> str:
    pre = "block_sparse_moe" if family == "mixtral" else "mlp"
    return f"model.layers.{block}.{pre}.{what}"


def _deltas(family: str) -> dict[str, float]:
    """Tensor -> constant added to every element (per-expert names)."""
    out = {_disk(family, 1, f"experts.2.{_PROJ[family]['gate']}.weight"): 0.5,
           _disk(family, 1, f"experts.2.{_PROJ[family]['down']}.weight"): -0.25,
           _disk(family, 3, "gate.weight"): 0.125}
    if family == "qwen2_moe":
        out["model.layers.0.mlp.shared_expert_gate.weight"] = 1.0
        out["model.layers.0.mlp.shared_expert.up_proj.weight"] = 0.75
    return out


def _sft(base, out, deltas):
    shutil.copytree(base, out)
    sd = load_file(str(base / "model.safetensors"))
    for name, c in deltas.items():
        sd[name] = sd[name] + c
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _fuse(folder, family: str) -> None:
    """Rewrite a saved checkpoint with each block's experts fused as transformers holds them
    in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I])."""
    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    n = arch.moe_info(cfg).n_experts
    p = _PROJ[family]
    for b in range(cfg["num_hidden_layers"]):
        def pop(e, role, b=b):
            return sd.pop(_disk(family, b, f"experts.{e}.{p[role]}.weight"))
        sd[f"model.layers.{b}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([pop(e, "gate"), pop(e, "up")]) for e in range(n)])
        sd[f"model.layers.{b}.mlp.experts.down_proj"] = torch.stack(
            [pop(e, "down") for e in range(n)])
        sd[f"model.layers.{b}.mlp.gate.weight"] = sd.pop(_disk(family, b, "gate.weight"))
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _value(df, block, module, metric="frobenius", expert=None):
    at = df["block"].isna() if block is None else df["block"] == block
    sel = at & (df["module"] == module) & (df["metric"] == metric)
    if expert is not None:
        sel &= df["expert"] == expert
    vals = df.loc[sel, "value"]
    assert len(vals) == 1, (block, module, expert, len(vals))
    return float(vals.iloc[0])


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_known_moe_deltas(tmp_path, model_dir, family, layout):
    src = model_dir(family)
    base = tmp_path / "base"
    shutil.copytree(src, base)
    deltas = _deltas(family)
    sd = load_file(str(base / "model.safetensors"))
    sft = _sft(base, tmp_path / "sft", deltas)
    sd_sft = load_file(str(sft / "model.safetensors"))  # the deltas as stored (float32)
    want = {k: float((sd_sft[k].double() - sd[k].double()).norm()) for k in deltas}
    if layout == "fused":
        _fuse(base, family)
        _fuse(sft, family)
    df = weight_change(base, sft, low_rank=False)
    keys = list(deltas)
    e2 = math.sqrt(want[keys[0]] ** 2 + want[keys[1]] ** 2)
    assert _value(df, 1, "expert", expert=2) == pytest.approx(e2, rel=1e-12)
    assert _value(df, 1, "experts") == pytest.approx(e2, rel=1e-12)
    assert _value(df, 1, "mlp") == pytest.approx(e2, rel=1e-12)
    for e in (0, 1, 3):
        assert _value(df, 1, "expert", expert=e) == 0.0
    assert _value(df, 3, "router") == pytest.approx(want[keys[2]], rel=1e-12)
    assert _value(df, 3, "experts") == 0.0
    # relative change of expert 2 = its change over its own base norm
    p = _PROJ[family]
    b2 = sum(float(sd[_disk(family, 1, f"experts.2.{p[r]}.weight")].double().pow(2).sum())
             for r in p)
    assert _value(df, 1, "expert", "relative", 2) == pytest.approx(e2 / math.sqrt(b2), rel=1e-9)
    if family == "qwen2_moe":
        sh = math.sqrt(want[keys[3]] ** 2 + want[keys[4]] ** 2)
        assert _value(df, 0, "shared_expert") == pytest.approx(sh, rel=1e-12)
        assert _value(df, 0, "mlp") == pytest.approx(sh, rel=1e-12)
    # only norms stay in "other"; the expert column is empty off the expert rows
    other = df[df["module"] == "other"]
    assert other.loc[other["metric"] != "unchanged_frac", "value"].eq(0).all()
    assert other.loc[other["metric"] == "unchanged_frac", "value"].eq(1).all()
    assert df.loc[df["module"] != "expert", "expert"].isna().all()
    assert set(df.loc[df["module"] == "expert", "expert"]) == {0, 1, 2, 3}
    assert df.attrs["experts"] == {"layout": layout, "blocks": [0, 1, 2, 3], "n_experts": 4}
    total = math.sqrt(sum(v ** 2 for v in want.values()))
    assert _value(df, None, "total") == pytest.approx(total, rel=1e-12)


def test_mixed_expert_layouts_refused(tmp_path, model_dir):
    base = tmp_path / "base"
    shutil.copytree(model_dir("qwen3_moe"), base)
    sft = tmp_path / "sft"
    shutil.copytree(base, sft)
    _fuse(sft, "qwen2_moe")  # same names as Qwen3-MoE
    with pytest.raises(SftscopeError, match="experts as .* re-save both"):
        weight_change(base, sft, low_rank=False)


def test_dense_weights_have_no_expert_column(model_dir):
    df = weight_change(model_dir("llama"), model_dir("llama", seed=1), low_rank=False)
    assert "expert" not in df.columns and not arch.is_moe({"model_type": "llama"})
    assert df.attrs["experts"] is None


def test_moe_low_rank_rows(model_dir):
    """With spectra: the router (one matrix) has them; aggregates of several matrices none."""
    df = weight_change(model_dir("olmoe"), model_dir("olmoe", seed=1), top_k=2)
    mods = set(df.loc[df["metric"] == "sv1", "module"])
    assert "router" in mods and not mods & {"experts", "expert", "shared_expert", "mlp"}


def test_moe_lora_adapter(tmp_path, model_dir):
    """A LoRA adapter on attention and the shared expert (and its gate) of a Qwen2-MoE:
    ``--adapter`` files the shared expert's change under ``shared_expert`` as the merged
    checkpoint does; LoRA on fused expert parameters is refused in one line."""
    from peft import LoraConfig, get_peft_model

    from sftscope.load.models import load_model

    base = model_dir("qwen2_moe")
    targets = ["q_proj", "shared_expert.up_proj", "shared_expert_gate"]
    torch.manual_seed(0)
    model = get_peft_model(load_model(str(base)), LoraConfig(
        r=2, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(tmp_path / "ad")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    da = weight_change(base, adapter=tmp_path / "ad", low_rank=False)
    dm = weight_change(base, tmp_path / "merged", low_rank=False)
    for block in range(4):
        for module in ("q", "shared_expert", "mlp"):
            assert _value(da, block, module) == pytest.approx(_value(dm, block, module),
                                                              rel=1e-4)
        assert _value(dm, block, "experts") == 0.0 and _value(dm, block, "router") == 0.0
    torch.manual_seed(0)
    fused = get_peft_model(load_model(str(base)), LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights=False,
        target_parameters=["model.layers.1.mlp.experts.down_proj"]))
    fused.save_pretrained(tmp_path / "fused")
    with pytest.raises(SftscopeError, match="fused expert parameters of model.layers.1"):
        weight_change(base, adapter=tmp_path / "fused", low_rank=False)
