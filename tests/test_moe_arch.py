"""Mixture-of-experts architecture knowledge (load/arch.py) on tiny models of each family:
routers, routed experts and shared experts found in memory and in saved checkpoints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sftscope.errors import SftscopeError
from sftscope.load import arch
from sftscope.load.checkpoint import Checkpoint, classify
from sftscope.load.tiny import MOE_FAMILIES


def _load(path):
    from sftscope.load.models import load_model

    return load_model(str(path))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_family_loads_and_maps(model_dir, family):
    """Each tiny MoE family loads through sftscope's loader; every block has its router and
    experts where arch says; the fused in-memory experts equal the saved per-expert tensors."""
    path = model_dir(family)
    model = _load(path)
    spec = arch.arch_for(model)
    assert spec.family == family and arch.is_moe(model) and arch.is_moe(spec)
    info = arch.moe_info(model.config)
    assert (info.n_experts, info.top_k) == (4, 2)
    assert info.shared_expert == (family == "qwen2_moe")
    assert info.sparse_blocks == tuple(range(len(arch.get_blocks(model))))
    hidden = model.config.hidden_size
    ck = Checkpoint(path)
    seen = set()
    for b in range(len(arch.get_blocks(model, spec))):
        router, experts = arch.get_router(model, b), arch.get_experts(model, b)
        assert router.weight.shape == (4, hidden)
        assert experts.gate_up_proj.shape[0] == 4 and experts.gate_up_proj.dim() == 3
        shared = arch.get_shared_expert(model, b)
        assert (shared is not None) == info.shared_expert
        assert (arch.get_shared_expert_gate(model, b) is not None) == info.shared_expert
        for param in ("gate_up_proj", "down_proj"):
            fused = getattr(experts, param).detach()
            for (e, proj), part in arch.expert_slices(spec, param, fused).items():
                name = next(n for n in ck.tensors
                            if (t := arch.moe_tensor(ck.spec, n)) is not None
                            and (t.block, t.role, t.expert, t.proj) == (b, "experts", e, proj))
                assert torch.equal(ck.get(name), part), name
                seen.add((b, e, proj))
    assert len(seen) == 4 * 4 * 3
    # every saved tensor has a role: only norms stay "other"
    for n in ck.tensors:
        slot = classify(n, ck.spec)
        if slot.module == "other":
            assert "norm" in n, n


def test_moe_tensor_roles_both_layouts():
    """On-disk per-expert names and in-memory fused names map to the same roles."""
    mix, qwen = arch.spec_for_config({"model_type": "mixtral"}), \
        arch.spec_for_config({"model_type": "qwen2_moe"})
    assert mix.family == "mixtral" and "mixtral" not in arch.spec_for_config(
        {"model_type": "llama"}).model_types
    t = arch.moe_tensor
    assert t(mix, "model.layers.2.block_sparse_moe.experts.3.w3.weight") == \
        arch.MoeTensor(2, "experts", 3, "up")
    assert t(mix, "model.layers.2.block_sparse_moe.gate.weight") == arch.MoeTensor(2, "router")
    assert t(mix, "model.layers.2.mlp.gate.weight") == arch.MoeTensor(2, "router")
    assert t(mix, "model.layers.0.mlp.experts.gate_up_proj") == arch.MoeTensor(0, "experts")
    assert t(qwen, "model.layers.1.mlp.shared_expert.up_proj.weight") == \
        arch.MoeTensor(1, "shared_expert")
    assert t(qwen, "model.layers.1.mlp.shared_expert_gate.weight") == \
        arch.MoeTensor(1, "shared_expert_gate")
    assert t(qwen, "model.layers.1.mlp.gate_proj.weight") is None  # a dense block's MLP
    assert t(qwen, "model.layers.1.self_attn.q_proj.weight") is None
    assert qwen.role_of("mlp.experts.7.down_proj") == "experts"
    assert qwen.role_of("mlp.gate") == "router" and qwen.role_of("mlp.gate_proj") == "gate"
    fused = torch.arange(2 * 6 * 3).reshape(2, 6, 3)
    parts = arch.expert_slices(qwen, "gate_up_proj", fused)
    assert torch.equal(parts[(1, "gate")], fused[1, :3]) and torch.equal(parts[(1, "up")],
                                                                         fused[1, 3:])
    with pytest.raises(SftscopeError, match="not a fused expert parameter"):
        arch.expert_slices(qwen, "q_proj", fused)


def test_dense_blocks_of_moe_model(tmp_path, tokenizer):
    """Qwen2-MoE's ``mlp_only_layers`` blocks have a dense MLP: no router there, and their
    projections keep their MLP roles."""
    from sftscope.load.tiny import save_tiny_model

    path = save_tiny_model(tmp_path, "qwen2_moe", tokenizer=tokenizer, mlp_only_layers=[1])
    model = _load(path)
    assert arch.moe_info(model.config).sparse_blocks == (0, 2, 3)
    assert arch.get_router(model, 1) is None and arch.get_router(model, 2) is not None
    ck = Checkpoint(path)
    assert classify("model.layers.1.mlp.gate_proj.weight", ck.spec).module == "gate"


def test_dense_model_is_not_moe(model_dir):
    model = _load(model_dir("llama"))
    assert not arch.is_moe(model) and arch.moe_info(model.config) is None
    assert arch.get_router(model, 0) is None and arch.get_experts(model, 0) is None


def test_generic_fallback_never_takes_experts_for_the_mlp():
    """Unmapped expert modules are refused in one line; a shared expert is never the MLP."""
    attn, mlp = arch.infer_roles(["self_attn.q_proj", "mlp.shared_expert.gate_proj",
                                  "mlp.shared_expert.down_proj", "mlp.experts.0.up_proj"])
    assert mlp == {} and attn == {"q": "self_attn.q_proj"}
    names = [f"model.layers.{i}.{p}.weight" for i in range(2)
             for p in ("self_attn.q_proj", "mlp.experts.0.up_proj", "mlp.router")]
    with pytest.raises(SftscopeError, match="mixture of experts.*add an ArchSpec"):
        arch.spec_from_names(names, SimpleNamespace(model_type="newmoe", num_hidden_layers=2))


def test_unmapped_moe_class_refused():
    """A loaded MoE family without an entry (PhiMoE) is refused, naming the class."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("phimoe", vocab_size=64, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=8, num_local_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(SftscopeError, match="PhimoeForCausalLM.*does not map"):
        arch.arch_for(model)


@pytest.mark.parametrize("model_type,kw", [
    ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                         kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                         v_head_dim=8, rope_scaling=None)),
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                     layer_types=["sliding_attention", "full_attention"])),
])
def test_deepseek_and_gpt_oss(tmp_path, model_type, kw):
    """DeepSeek-V3 (shared experts, a dense first block) and gpt-oss (fused on disk, router
    ``mlp.router``): parts found in memory and every saved tensor classified."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1,
                               intermediate_size=8, max_position_embeddings=64, **kw)
    model = AutoModelForCausalLM.from_config(cfg)
    spec = arch.arch_for(model)
    info = arch.moe_info(model.config)
    assert spec.family == model_type and info.n_experts == 4
    assert info.sparse_blocks == ((1,) if model_type == "deepseek_v3" else (0, 1))
    assert arch.get_router(model, 1) is not None and arch.get_experts(model, 1) is not None
    assert (arch.get_shared_expert(model, 1) is not None) == (model_type == "deepseek_v3")
    model.save_pretrained(tmp_path)
    ck = Checkpoint(tmp_path)
    for n in ck.tensors:
        slot = classify(n, ck.spec)
        if slot is not None and slot.module == "other":
            assert "norm" in n or n.endswith("sinks"), n
    if model_type == "gpt_oss":
        t = arch.moe_tensor(ck.spec, "model.layers.1.mlp.experts.gate_up_proj_bias")
        assert t == arch.MoeTensor(1, "experts")
        down = ck.get("model.layers.1.mlp.experts.down_proj")
        parts = arch.expert_slices(spec, "down_proj", down)
        assert set(parts) == {(e, "down_proj") for e in range(4)}


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_moe_gguf_loads(model_dir, tmp_path, family):
    """A tiny MoE written as GGUF (llama.cpp's qwen2moe / qwen3moe layout: experts stacked in
    ``ffn_*_exps``) loads through sftscope as the same model; its header says it is an MoE
    (the expert widths transformers does not read are passed on from it)."""
    pytest.importorskip("gguf")
    from sftscope.load.sources import check_model
    from sftscope.load.tiny import save_tiny_gguf

    hf = model_dir(family)
    gguf = save_tiny_gguf(hf, tmp_path / "tiny.gguf")
    src = check_model(str(gguf))
    assert arch.is_moe(src.config) and arch.moe_info(src.config).n_experts == 4
    a, b = _load(hf), _load(gguf)
    assert arch.arch_for(b).family == family
    ids = torch.tensor([[5, 17, 42, 9, 33]])
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    if family == "qwen3_moe":
        with pytest.raises(SftscopeError, match="no shared expert"):
            arch.check_part(src.config, "shared_expert")


def test_dynamics_roles_of_moe_parameters():
    """Training dynamics file expert tensors by their MoE role, never under ``other``."""
    from sftscope.experiments.dynamics import param_role

    spec = arch.spec_for_config({"model_type": "qwen2_moe"})
    roles = {n: param_role(n, spec) for n in (
        "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight",
        "mlp.shared_expert.up_proj.weight", "mlp.shared_expert_gate.weight",
        "input_layernorm.weight")}
    assert list(roles.values()) == ["experts", "experts", "router", "shared_expert",
                                    "shared_expert_gate", "other"]


def test_moe_under_peft_wrapper():
    """A PeftModel around an MoE keeps its family's map, re-rooted under the wrapper."""
    from peft import LoraConfig, get_peft_model

    from sftscope.load.tiny import build_tiny_model

    model = get_peft_model(build_tiny_model("qwen2_moe", 100),
                           LoraConfig(r=2, target_modules=["q_proj", "shared_expert.up_proj"]))
    spec = arch.arch_for(model)
    assert spec.family == "qwen2_moe" and spec.blocks == "base_model.model.model.layers"
    assert arch.get_router(model, 2) is model.base_model.model.model.layers[2].mlp.gate
    assert arch.get_shared_expert(model, 0) is not None and len(arch.get_blocks(model)) == 4
