"""``swap --parts`` on a tiny mixture of experts: only the named parameters of a segment are
exchanged (both directions), the hybrid equals a model with those parameters copied, the
originals are restored bit for bit, and parts a model lacks are refused in one line."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from sftscope.cli import main
from sftscope.config.commands import SwapConfig
from sftscope.config.core import build
from sftscope.errors import SftscopeError
from sftscope.experiments.swap import swapped
from sftscope.load import arch
from sftscope.load.models import load_model

PARTS = ("attention", "router", "experts", "shared_expert")


@pytest.fixture(scope="module")
def moe_pair(model_dir, tokenizer, tmp_path_factory):
    """A Qwen2-MoE base (shared expert) and an SFT = base with every block perturbed."""
    base = model_dir("qwen2_moe")
    model = load_model(str(base))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    sft = tmp_path_factory.mktemp("moe-sft")
    model.save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    return base, sft


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _logits(model):
    ids = torch.tensor([[5, 17, 42, 9, 33, 7], [8, 8, 100, 3, 21, 60]])
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("part", PARTS)
def test_part_swap_equals_copied_parameters_and_restores(moe_pair, part):
    base, sft = (load_model(str(p)) for p in moe_pair)
    before = _digest(base), _digest(sft)
    spec = arch.arch_for(base)
    paths = arch.part_paths(spec, part)
    blocks = [1, 2]
    for host, donor in ((base, sft), (sft, base)):  # both directions
        want = copy.deepcopy(host)  # the host with the donor's part parameters copied in
        with torch.no_grad():
            for b in blocks:
                for path in paths:
                    src = arch.get_blocks(donor)[b].get_submodule(path)
                    dst = arch.get_blocks(want)[b].get_submodule(path)
                    dst.load_state_dict(src.state_dict())
        ref = _logits(host)
        with swapped(host, donor, blocks, parts=part) as hybrid:
            for path in paths:
                assert arch.get_blocks(hybrid)[1].get_submodule(path) is \
                    arch.get_blocks(donor)[1].get_submodule(path)
            assert arch.get_blocks(hybrid)[0].get_submodule(paths[0]) is not \
                arch.get_blocks(donor)[0].get_submodule(paths[0])
            out = _logits(hybrid)
        assert torch.equal(out, _logits(want)) and not torch.equal(out, ref)
        assert torch.equal(_logits(host), ref)
    assert (_digest(base), _digest(sft)) == before


def test_part_swap_restored_on_error(moe_pair):
    base, sft = (load_model(str(p)) for p in moe_pair)
    before = _digest(base)
    experts = arch.get_experts(base, 1)
    with pytest.raises(RuntimeError, match="boom"), swapped(base, sft, [0, 1, 2],
                                                            parts="experts"):
        raise RuntimeError("boom")
    assert arch.get_experts(base, 1) is experts and _digest(base) == before


def test_parts_refused_before_loading(moe_pair, model_dir, tmp_path):
    """Parts a model lacks: one line from the config (config.json read torch-free)."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    dense = str(model_dir("llama"))
    with pytest.raises(SftscopeError, match="--parts experts: llama is not a mixture"):
        build(SwapConfig, dict(base=dense, sft=dense, data=str(data), parts="experts"))
    q3 = str(model_dir("qwen3_moe"))
    with pytest.raises(SftscopeError, match="has no shared expert"):
        build(SwapConfig, dict(base=q3, sft=q3, data=str(data), parts="shared_expert"))
    base, sft = moe_pair
    cfg = build(SwapConfig, dict(base=str(base), sft=str(sft), data=str(data),
                                 parts="shared_expert"))
    assert cfg.parts == "shared_expert"


def test_swap_parts_cli(moe_pair, letter_pair, tmp_path, capsys):
    base, sft = moe_pair
    mmlu = letter_pair[2]
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["swap", "--base", str(base), "--sft", str(sft), "--data", f"mmlu:{mmlu}",
              "--out", str(out), "--segments", "2", "--parts", "router", "--bootstrap", "10",
              "--directions", "sft-into-base", "--alphas", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 0, err
    rec = json.loads((out / "run.json").read_text())
    assert rec["parts"] == "router" and rec["part_modules"] == ["mlp.gate"]
    with pytest.raises(SystemExit) as e:
        main(["swap", "--base", str(letter_pair[0]), "--sft", str(letter_pair[1]), "--data",
              f"mmlu:{mmlu}", "--segments", "2", "--parts", "router"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "not a mixture of experts" in err[0]
