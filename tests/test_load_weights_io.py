"""The reading layer of ``weights``: architecture inference from names and from modules (one
set of tables), checkpoint headers and canonical names, LoRA adapter parsing, and the layering
(evaluate no longer imports tune)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sftscope.errors import SftscopeError
from sftscope.load import arch
from sftscope.load.adapters import adapter_shapes, module_path, read_lora
from sftscope.load.checkpoint import Checkpoint, canonical_name, classify
from sftscope.load.tiny import build_tiny_model

VOCAB = 64


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi", "gpt_neox"])
def test_name_and_module_inference_agree(family):
    """``spec_from_names`` (checkpoints) and the module walk (loaded models) use the same role
    tables, so on the same model they find the same blocks and projections."""
    model = build_tiny_model(family, VOCAB, seed=0, n_layers=2, hidden=32, n_heads=4)
    from_modules = arch._infer_spec(model)
    from_names = arch.spec_from_names(model.state_dict().keys(), model.config)
    assert from_names.blocks == from_modules.blocks
    assert dict(from_names.attn) == dict(from_modules.attn)
    assert dict(from_names.mlp) == dict(from_modules.mlp)
    assert from_names.final_norm == from_modules.final_norm
    assert from_names.embed == from_modules.embed
    registered = arch.spec_for_config(model.config)
    for role, path in from_names.attn.items():  # and they agree with the registry
        assert registered is None or registered.attn.get(role, path) == path


def test_role_tables():
    attn, mlp = arch.infer_roles(["self_attn.q_proj", "self_attn.xq_proj", "mlp.dense",
                                  "self_attn.dense", "mlp.fc1", "mlp.fc2", "mlp.gate_proj"])
    assert attn == {"q": "self_attn.q_proj", "o": "self_attn.dense"}
    assert mlp == {"fc_in": "mlp.fc1", "fc_out": "mlp.fc2", "gate": "mlp.gate_proj"}
    spec = arch.spec_for_paths(["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"])
    assert spec.family == "llama"
    unknown = arch.spec_for_paths(["net.blocks.0.attn.q_proj", "net.blocks.1.attn.q_proj"])
    assert unknown.blocks == "net.blocks" and unknown.attn == {"q": "attn.q_proj"}
    with pytest.raises(SftscopeError, match="no numbered decoder blocks"):
        arch.spec_from_names(["embed.weight"], SimpleNamespace(model_type="x"))


def test_checkpoint_canonical_names_and_slots(tmp_path):
    model = build_tiny_model("gpt2", VOCAB, seed=0, n_layers=2, hidden=32, n_heads=4)
    model.save_pretrained(tmp_path / "m")
    ck = Checkpoint(tmp_path / "m")
    try:
        assert ck.spec.family == "gpt2" and ck.tied
        assert "transformer.h.1.attn.c_attn.weight" in ck.tensors
        slot = classify("transformer.h.1.attn.c_attn.weight", ck.spec)
        assert (slot.block, slot.module, slot.param) == (1, "qkv", "weight")
        assert classify("transformer.wte.weight", ck.spec).module == "embed"
        assert canonical_name("h.0.mlp.c_fc.weight", ck.spec) == "transformer.h.0.mlp.c_fc.weight"
        assert canonical_name("base_model.model.x.y", None) == "x.y"
        t = ck.get("transformer.h.0.mlp.c_fc.weight")
        assert tuple(t.shape) == ck.tensors["transformer.h.0.mlp.c_fc.weight"].shape
    finally:
        ck.close()


def test_checkpoint_reader_reads_stored_bytes_and_fails_in_one_line(tmp_path):
    """``Checkpoint.reader``: any byte range of a tensor's stored data, as ``get`` sees it; a
    file cut short after its header was checked is one clear error, not a short buffer."""
    model = build_tiny_model("llama", VOCAB, seed=0, n_layers=1, hidden=32, n_heads=4)
    model.save_pretrained(tmp_path / "m")
    ck = Checkpoint(tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight"
    try:
        want = ck.get(name).reshape(-1).view(torch.uint8)
        out = torch.empty(400, dtype=torch.uint8)
        ck.reader(name)(100, memoryview(out.numpy()))
        assert torch.equal(out, want[100:500])
        info = ck.tensors[name]
        with pytest.raises(ValueError):
            ck.reader(name)(info.end - info.start - 10, memoryview(out.numpy()))
        with open(info.file, "r+b") as f:
            f.truncate(info.start + 200)
        # the OSError quoted as ``Type: message`` (errors.quoted), then what to do
        with pytest.raises(SftscopeError, match=r"\(OSError: the file ends at byte \d+\); the "
                                                r"file is truncated"):
            ck.reader(name)(100, memoryview(out.numpy()))
    finally:
        ck.close()


def test_adapter_reading(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    pre = "base_model.model.model.layers.0.self_attn"
    save_file({f"{pre}.q_proj.lora_A.weight": torch.randn(4, 32),
               f"{pre}.q_proj.lora_B.weight": torch.randn(32, 4),
               f"{pre}.v_proj.lora_A.weight": torch.randn(2, 32),
               f"{pre}.v_proj.lora_B.weight": torch.randn(32, 2),
               "base_model.model.lm_head.weight": torch.randn(8, 32)},
              folder / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True,
           "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 1}}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    lora = read_lora(folder)
    assert [m.path for m in lora.modules] == ["model.layers.0.self_attn.q_proj",
                                             "model.layers.0.self_attn.v_proj"]
    assert lora.other == ["base_model.model.lm_head.weight"]
    assert lora.settings("model.layers.0.self_attn.q_proj", 4) == (4, 8.0, 8 / 2)  # rsLoRA
    assert lora.settings("model.layers.0.self_attn.v_proj", 2) == (2, 1.0, 1 / 2 ** 0.5)
    with pytest.raises(SftscopeError, match="says rank 4"):
        lora.settings("model.layers.0.self_attn.q_proj", 3)
    assert module_path(f"{pre}.q_proj.lora_B.weight") == "model.layers.0.self_attn.q_proj"
    assert adapter_shapes(folder)[f"{pre}.q_proj.lora_A.weight"] == (4, 32)
    for bad, needle in (({"peft_type": "IA3"}, "LoRA only"), ({"use_dora": True}, "DoRA")):
        (folder / "adapter_config.json").write_text(json.dumps({**cfg, **bad}))
        with pytest.raises(SftscopeError, match=needle):
            read_lora(folder)


def test_evaluate_does_not_import_tune():
    code = ("import sys, sftscope.experiments.evaluate, sftscope.load.adapters; "
            "print('sftscope.experiments.tune' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_atomic_dir_is_whole_or_as_it_was(tmp_path):
    """Model folders (save_model, save_mix) are written beside and renamed over the target."""
    from sftscope.io import atomic_dir

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("half")
        raise RuntimeError("killed while writing")
    assert (folder / "a").read_text() == "old"
    assert not (tmp_path / "m.partial").exists()
    with atomic_dir(folder) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]
    assert not (tmp_path / "m.partial").exists()
