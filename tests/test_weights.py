"""``sftscope weights``: streamed weight change vs direct torch computations (tiny checkpoints)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from sftscope.errors import SftscopeError
from sftscope.experiments.weights import run_weights, weight_change
from sftscope.load.tiny import build_tiny_model
from sftscope.metrics.lowrank import effective_rank_of as erank

LLAMA = dict(n_layers=3, hidden=32, n_heads=4)
ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
         "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
         "down": "mlp.down_proj"}
VOCAB = 64


def val(df: pd.DataFrame, block, module: str, metric: str = "frobenius") -> float:
    blk = df["block"].isna() if block is None else df["block"] == block
    sel = df[blk & (df["module"] == module) & (df["metric"] == metric)]
    assert len(sel) == 1, (block, module, metric, len(sel))
    return float(sel["value"].iloc[0])


def _perturb(model, edits: dict[str, float], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, scale in edits.items():
            p = params[name]
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Base and SFT llama folders; SFT changes chosen modules of blocks 0 and 2 only."""
    root = tmp_path_factory.mktemp("llama-pair")
    model = build_tiny_model("llama", VOCAB, seed=0, **LLAMA)
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "base-sharded", max_shard_size="20KB")
    _perturb(model, {"model.layers.0.self_attn.q_proj.weight": 0.01,
                     "model.layers.0.mlp.down_proj.weight": 0.02,
                     "model.layers.2.self_attn.v_proj.weight": 0.03,
                     "model.layers.2.input_layernorm.weight": 0.1,
                     "model.embed_tokens.weight": 0.001,
                     "lm_head.weight": 0.002})
    model.save_pretrained(root / "sft")
    model.save_pretrained(root / "sft-sharded", max_shard_size="20KB")
    return root


def test_llama_matches_direct_computation(llama_pair):
    df = weight_change(llama_pair / "base", llama_pair / "sft", low_rank=False)
    assert list(df.columns) == ["block", "module", "metric", "value", "method"]
    b_sd = load_file(llama_pair / "base" / "model.safetensors")
    s_sd = load_file(llama_pair / "sft" / "model.safetensors")

    def d2b2(name):
        b, s = b_sd[name].double(), s_sd[name].double()
        return float(((s - b) ** 2).sum()), float((b**2).sum())

    for blk in range(3):
        sums = {"attn": [0.0, 0.0], "mlp": [0.0, 0.0]}
        for role, path in ROLES.items():
            d2, b2 = d2b2(f"model.layers.{blk}.{path}.weight")
            group = "attn" if role in "qkvo" else "mlp"
            sums[group][0] += d2
            sums[group][1] += b2
            assert val(df, blk, role) == pytest.approx(math.sqrt(d2), rel=1e-12, abs=0)
            assert val(df, blk, role, "relative") == pytest.approx(math.sqrt(d2 / b2), rel=1e-12)
        for group, (d2, b2) in sums.items():
            assert val(df, blk, group) == pytest.approx(math.sqrt(d2), rel=1e-12, abs=0)
            assert val(df, blk, group, "relative") == pytest.approx(math.sqrt(d2 / b2), rel=1e-12)
    # Unchanged modules and blocks are exactly zero.
    assert (df[(df["block"] == 1) & (df["metric"] == "frobenius")]["value"] == 0.0).all()
    for role in ("k", "v", "o", "gate", "up"):
        assert val(df, 0, role) == 0.0
    assert val(df, 2, "q") == 0.0 and val(df, 2, "mlp") == 0.0
    # The layer norm is outside attn/mlp but inside the block total.
    norm_d2, _ = d2b2("model.layers.2.input_layernorm.weight")
    assert val(df, 2, "other") == pytest.approx(math.sqrt(norm_d2), rel=1e-12)
    assert val(df, 2, "total") == pytest.approx(
        math.sqrt(norm_d2 + d2b2("model.layers.2.self_attn.v_proj.weight")[0]), rel=1e-12)
    for module, name in (("embed", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight"),
                         ("final_norm", "model.norm.weight")):
        d2, b2 = d2b2(name)
        assert val(df, None, module) == pytest.approx(math.sqrt(d2), rel=1e-12, abs=0)
        assert val(df, None, module, "relative") == pytest.approx(math.sqrt(d2 / b2), rel=1e-12)
    total = sum(d2b2(n)[0] for n in b_sd)
    assert val(df, None, "total") == pytest.approx(math.sqrt(total), rel=1e-12)
    assert df.attrs["n_blocks"] == 3 and not df.attrs["tied"]


def test_sharded_equals_unsharded(llama_pair):
    assert (llama_pair / "sft-sharded" / "model.safetensors.index.json").is_file()
    assert len(list((llama_pair / "sft-sharded").glob("*.safetensors"))) > 2
    one = weight_change(llama_pair / "base", llama_pair / "sft", top_k=4)
    sharded = weight_change(llama_pair / "base-sharded", llama_pair / "sft-sharded", top_k=4)
    mixed = weight_change(llama_pair / "base", llama_pair / "sft-sharded", top_k=4)
    pd.testing.assert_frame_equal(one, sharded)
    pd.testing.assert_frame_equal(one, mixed)


def test_low_rank_metrics_of_rank2_change(tmp_path):
    """dW = 2 u1 v1^T + 1 u2 v2^T: sv = (2, 1), 80 % of the energy in the first direction."""
    model = build_tiny_model("llama", VOCAB, seed=0, n_layers=1, hidden=32, n_heads=4)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(3)
    w = model.model.layers[0].mlp.up_proj.weight  # 64 x 32
    u = torch.linalg.qr(torch.randn(w.shape[0], 2, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(w.shape[1], 2, generator=g, dtype=torch.float64)).Q
    delta = 2 * torch.outer(u[:, 0], v[:, 0]) + torch.outer(u[:, 1], v[:, 1])
    with torch.no_grad():
        w.add_(delta.float())
    model.save_pretrained(tmp_path / "sft")
    expected_erank = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    exact = weight_change(tmp_path / "base", tmp_path / "sft", top_k=4)
    # Randomized path: matrices above exact_max get torch.svd_lowrank of rank max_rank.
    rand = weight_change(tmp_path / "base", tmp_path / "sft", top_k=4, max_rank=8, exact_max=4)
    for df in (exact, rand):
        assert val(df, 0, "up", "energy_rank90") == 2
        assert val(df, 0, "up", "effective_rank") == pytest.approx(expected_erank, abs=2e-3)
        assert val(df, 0, "up", "sv1") == pytest.approx(2.0, rel=1e-5)
        assert val(df, 0, "up", "sv2") == pytest.approx(1.0, rel=1e-5)
        assert val(df, 0, "up", "sv3") == pytest.approx(0.0, abs=1e-5)
        assert val(df, 0, "up", "stable_rank") == pytest.approx(1.25, rel=1e-4)
        assert val(df, 0, "up", "residual_energy") == pytest.approx(0.0, abs=1e-6)
        assert val(df, 0, "q", "energy_rank90") == 0 and val(df, 0, "q", "sv1") == 0.0
    assert set(exact[exact["module"] == "up"]["metric"]) >= {"sv1", "sv4", "energy_rank90"}
    assert "sv5" not in set(exact["metric"])
    assert erank(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(3.0)


def test_gpt2_fused_split_tied_and_legacy_names(tmp_path):
    model = build_tiny_model("gpt2", VOCAB, seed=0, n_layers=2, hidden=32, n_heads=4)
    assert model.config.tie_word_embeddings
    model.save_pretrained(tmp_path / "base")
    _perturb(model, {"transformer.h.1.attn.c_attn.weight": 0.01,
                     "transformer.h.1.attn.c_attn.bias": 0.05,
                     "transformer.wte.weight": 0.001})
    model.save_pretrained(tmp_path / "sft")
    df = weight_change(tmp_path / "base", tmp_path / "sft", top_k=2)
    b_sd = load_file(tmp_path / "base" / "model.safetensors")
    s_sd = load_file(tmp_path / "sft" / "model.safetensors")
    assert "lm_head.weight" not in s_sd
    dw = (s_sd["transformer.h.1.attn.c_attn.weight"].double()
          - b_sd["transformer.h.1.attn.c_attn.weight"].double())  # Conv1D: (in, out)
    db = (s_sd["transformer.h.1.attn.c_attn.bias"].double()
          - b_sd["transformer.h.1.attn.c_attn.bias"].double())
    for i, role in enumerate("qkv"):
        part_w, part_b = dw[:, 32 * i:32 * (i + 1)], db[32 * i:32 * (i + 1)]
        expect = math.sqrt(float((part_w**2).sum() + (part_b**2).sum()))
        assert val(df, 1, role) == pytest.approx(expect, rel=1e-12)
        sv = torch.linalg.svdvals(part_w)
        assert val(df, 1, role, "sv1") == pytest.approx(float(sv[0]), rel=1e-9)
    assert val(df, 1, "attn") == pytest.approx(math.sqrt(float((dw**2).sum() + (db**2).sum())),
                                               rel=1e-12)
    assert val(df, 0, "attn") == 0.0 and val(df, 1, "o") == 0.0
    # Tied: the head is the embedding, counted once.
    assert "lm_head" not in set(df["module"]) and df.attrs["tied"]
    emb = (s_sd["transformer.wte.weight"].double() - b_sd["transformer.wte.weight"].double())
    assert val(df, None, "embed") == pytest.approx(float(emb.norm()), rel=1e-12)
    assert any("tied" in n for n in df.attrs["notes"])
    # Hub GPT-2 files name tensors without the ``transformer.`` prefix: same numbers.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "sft" / "config.json").read_text())
    save_file({k.removeprefix("transformer."): v for k, v in s_sd.items()},
              legacy / "model.safetensors")
    pd.testing.assert_frame_equal(df, weight_change(tmp_path / "base", legacy, top_k=2))


def test_resized_vocabulary(tmp_path):
    model = build_tiny_model("llama", VOCAB, seed=0, n_layers=1, hidden=32, n_heads=4)
    model.save_pretrained(tmp_path / "base")
    model.resize_token_embeddings(VOCAB + 5, mean_resizing=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB:] = torch.randn(5, 32)
        model.lm_head.weight[VOCAB:] = torch.randn(5, 32)
        model.model.embed_tokens.weight[:3] += 0.5
    model.save_pretrained(tmp_path / "sft")
    df = weight_change(tmp_path / "base", tmp_path / "sft", top_k=2)
    s = load_file(tmp_path / "sft" / "model.safetensors")
    b = load_file(tmp_path / "base" / "model.safetensors")
    shared = s["model.embed_tokens.weight"][:VOCAB].double() - b["model.embed_tokens.weight"]
    assert val(df, None, "embed") == pytest.approx(float(shared.norm()), rel=1e-12)
    assert val(df, None, "embed_added") == pytest.approx(
        float(s["model.embed_tokens.weight"][VOCAB:].double().norm()), rel=1e-12)
    assert val(df, None, "embed_added", "rows") == 5
    assert val(df, None, "lm_head") == 0.0
    assert val(df, None, "lm_head_added") == pytest.approx(
        float(s["lm_head.weight"][VOCAB:].double().norm()), rel=1e-12)
    # The other way round (a vocabulary that lost rows) is refused.
    with pytest.raises(SftscopeError, match="vocabulary rows"):
        weight_change(tmp_path / "sft", tmp_path / "base")


def test_tied_llama_counted_once(tmp_path):
    model = build_tiny_model("llama", VOCAB, seed=0, n_layers=1, hidden=32, n_heads=4,
                             tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "base")
    _perturb(model, {"model.embed_tokens.weight": 0.01})
    model.save_pretrained(tmp_path / "sft")
    df = run_weights(tmp_path / "run", tmp_path / "base", tmp_path / "sft", low_rank=False)
    assert "lm_head" not in set(df["module"])
    assert val(df, None, "total") == pytest.approx(val(df, None, "embed"), rel=1e-12)
    assert len(pd.read_csv(tmp_path / "run" / "weights.csv")) == len(df)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tied"] is True


def _lora(tmp_path: Path, family: str, targets: list[str], **cfg):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(family, VOCAB, seed=0, n_layers=2, hidden=32, n_heads=4)
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(target_modules=targets, **cfg))
    g = torch.Generator().manual_seed(5)
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in peft_model.named_modules():
            if hasattr(mod, "lora_B") and "default" in mod.lora_B:
                lin = mod.lora_B["default"]
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
                a = mod.lora_A["default"].weight.double()
                key = name.removeprefix("base_model.model.")
                # formed explicitly: the reference
                expected[key] = mod.scaling["default"] * (lin.weight.double() @ a)
                if lin.bias is not None:  # lora_bias=True: the module's bias moves too
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
                    expected[key + ".bias"] = mod.scaling["default"] * lin.bias.double()
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    return expected


def test_lora_adapter_patterns_and_rslora(tmp_path):
    expected = _lora(tmp_path, "llama", ["q_proj", "v_proj"], r=4, lora_alpha=8,
                     use_rslora=True, rank_pattern={"layers.1.self_attn.q_proj": 2},
                     alpha_pattern={"layers.0.self_attn.v_proj": 3})
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"]
    only = weight_change(None, adapter=tmp_path / "adapter", top_k=2)
    with_base = weight_change(tmp_path / "base", adapter=tmp_path / "adapter", top_k=2)
    b_sd = load_file(tmp_path / "base" / "model.safetensors")
    for name, delta in expected.items():
        blk, role = int(name.split(".")[2]), name.split(".")[-1][0]
        want = float(delta.norm())
        assert val(only, blk, role) == pytest.approx(want, rel=1e-10)
        assert val(with_base, blk, role) == pytest.approx(want, rel=1e-10)
        assert val(with_base, blk, role, "relative") == pytest.approx(
            want / float(b_sd[name + ".weight"].double().norm()), rel=1e-10)
        sv = torch.linalg.svdvals(delta)
        assert val(only, blk, role, "sv1") == pytest.approx(float(sv[0]), rel=1e-9)
        assert val(only, blk, role, "energy_rank90") <= (2 if name.endswith("1.self_attn.q_proj")
                                                           else 4)
    assert "relative" not in set(only["metric"])
    assert val(with_base, 0, "k") == 0.0 and val(with_base, 0, "gate") == 0.0
    # The merged checkpoint through the streaming path gives the same change.
    merged = weight_change(tmp_path / "base", tmp_path / "merged", low_rank=False)
    for name in expected:
        blk, role = int(name.split(".")[2]), name.split(".")[-1][0]
        assert val(merged, blk, role) == pytest.approx(val(with_base, blk, role), rel=1e-4)


def test_merged_folder_and_adapter_agree(tmp_path):
    """The same LoRA update read from its adapter (exact r x r core) and from the merged
    checkpoint (exact SVD of the dense change, fp32 rounding noise dropped): same spectra."""
    expected = _lora(tmp_path, "llama", ["q_proj", "v_proj", "down_proj"], r=6, lora_alpha=12,
                     rank_pattern={"layers.1.mlp.down_proj": 3})
    top_k = 8
    adapter = weight_change(tmp_path / "base", adapter=tmp_path / "adapter", top_k=top_k)
    merged = weight_change(tmp_path / "base", tmp_path / "merged", top_k=top_k)
    low = [f"sv{i}" for i in range(1, top_k + 1)] + ["effective_rank", "energy_rank90",
                                                     "stable_rank", "residual_energy"]
    for name in expected:
        blk = int(name.split(".")[2])
        role = {"q_proj": "q", "v_proj": "v", "down_proj": "down"}[name.split(".")[-1]]
        rank = 3 if name == "model.layers.1.mlp.down_proj" else 6
        for metric in low:
            a, m = val(adapter, blk, role, metric), val(merged, blk, role, metric)
            assert m == pytest.approx(a, rel=1e-6, abs=0), (name, metric)
        assert val(adapter, blk, role, f"sv{rank}") > 0 and val(adapter, blk, role,
                                                                f"sv{rank + 1}") == 0.0
        sv = torch.linalg.svdvals(expected[name])
        assert val(adapter, blk, role, "effective_rank") == pytest.approx(
            float(erank(sv[:rank])), rel=1e-9)
    for df in (adapter, merged):
        low_rows = df[df["metric"].isin(low)]
        assert set(low_rows["method"]) == {"exact"}
        assert df[df["metric"].isin(["frobenius", "relative"])]["method"].isna().all()
    # A dense change above exact_max is found by randomized SVD, and says so.
    rand = weight_change(tmp_path / "base", tmp_path / "merged", top_k=4, exact_max=8,
                         max_rank=8)
    q = rand[(rand["block"] == 0) & (rand["module"] == "q") & rand["metric"].isin(low)]
    assert set(q["method"]) == {"randomized"}  # 32 x 32 > max(exact_max, 2 * max_rank)
    assert val(rand, 0, "q", "sv1") == pytest.approx(val(adapter, 0, "q", "sv1"), rel=1e-6)


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT mistakes lora_B.bias for a shard
def test_lora_on_gpt2_fused_qkv_with_bias(tmp_path):
    expected = _lora(tmp_path, "gpt2", ["c_attn"], r=4, lora_alpha=16, fan_in_fan_out=True,
                     lora_bias=True)
    df = weight_change(tmp_path / "base", adapter=tmp_path / "adapter", top_k=2)
    merged = weight_change(tmp_path / "base", tmp_path / "merged", low_rank=False)
    for name, delta in expected.items():  # delta = s B A: (out = 3 * 32, in = 32)
        if name.endswith(".bias"):
            continue
        blk, bias = int(name.split(".")[2]), expected[name + ".bias"]
        for i, role in enumerate("qkv"):
            part, part_b = delta[32 * i:32 * (i + 1)], bias[32 * i:32 * (i + 1)]
            want = math.sqrt(float((part**2).sum() + (part_b**2).sum()))
            assert val(df, blk, role) == pytest.approx(want, rel=1e-10)
            assert val(merged, blk, role) == pytest.approx(want, rel=1e-4)
            assert val(df, blk, role, "sv1") == pytest.approx(
                float(torch.linalg.svdvals(part)[0]), rel=1e-9)
        assert val(df, blk, "attn") == pytest.approx(
            math.sqrt(float((delta**2).sum() + (bias**2).sum())), rel=1e-10)


def test_gpt_neox_interleaved_qkv(tmp_path):
    model = build_tiny_model("gpt_neox", VOCAB, seed=0, n_layers=1, hidden=32, n_heads=4)
    model.save_pretrained(tmp_path / "base")
    _perturb(model, {"gpt_neox.layers.0.attention.query_key_value.weight": 0.01})
    model.save_pretrained(tmp_path / "sft")
    df = weight_change(tmp_path / "base", tmp_path / "sft", low_rank=False)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    dw = (load_file(tmp_path / "sft" / "model.safetensors")[name].double()
          - load_file(tmp_path / "base" / "model.safetensors")[name].double())
    per_head = dw.reshape(4, 3, 8, 32)  # rows grouped per head as [heads, (q, k, v), head_dim]
    for i, role in enumerate("qkv"):
        assert val(df, 0, role) == pytest.approx(float(per_head[:, i].norm()), rel=1e-12)
    assert val(df, None, "lm_head") == 0.0


# ----------------------------------------------------------------------------- CLI


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from sftscope.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_cli_writes_table_and_run_record(llama_pair, tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = _cli(["weights", "--base", str(llama_pair / "base"), "--sft",
                         str(llama_pair / "sft"), "--out", str(run), "--top-k", "3",
                         "--format", "csv,parquet,json"], capsys)
    assert code == 0, err
    table = pd.read_csv(run / "weights.csv")
    api = weight_change(llama_pair / "base", llama_pair / "sft", top_k=3)
    assert list(table.columns) == ["block", "module", "metric", "value", "method"]
    assert len(table) == len(api)
    assert table["value"].to_numpy() == pytest.approx(api["value"].to_numpy(), rel=1e-12,
                                                      nan_ok=True)
    assert (run / "weights.parquet").is_file() and (run / "weights.json").is_file()
    record = json.loads((run / "run.json").read_text())
    assert record["command"] == "weights" and record["n_blocks"] == 3
    assert "stream" in record["timings"]
    code, _, _ = _cli(["weights", "--base", str(llama_pair / "base"), "--sft",
                       str(llama_pair / "sft"), "--out", str(tmp_path / "fast"),
                       "--no-low-rank"], capsys)
    fast = pd.read_csv(tmp_path / "fast" / "weights.csv")
    assert code == 0 and set(fast["metric"]) == {"frobenius", "relative", "unchanged_frac"}


def _bad_inputs(root: Path, llama_pair: Path) -> dict[str, tuple[list[str], str]]:
    base = llama_pair / "base"
    gpt2 = root / "gpt2"
    build_tiny_model("gpt2", VOCAB, n_layers=3, hidden=32).save_pretrained(gpt2)
    wide = root / "wide"
    build_tiny_model("llama", VOCAB, n_layers=3, hidden=48, n_heads=4).save_pretrained(wide)
    missing_shard = root / "missing-shard"
    truncated = root / "truncated"
    for d in (missing_shard, truncated):
        d.mkdir()
        for f in (llama_pair / "sft-sharded").iterdir():
            (d / f.name).write_bytes(f.read_bytes())
    shards = sorted(missing_shard.glob("*.safetensors"))
    shards[1].unlink()
    victim = sorted(truncated.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-100])
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((base / "config.json").read_text())
    torch.save({"x": torch.zeros(2)}, pickled / "pytorch_model.bin")
    no_cfg = root / "adapter-without-config"
    no_cfg.mkdir()
    save_file({"x": torch.zeros(2)}, no_cfg / "adapter_model.safetensors")
    b = ["weights", "--out", str(root / "run"), "--base", str(base)]
    return {
        "architecture": (b + ["--sft", str(gpt2)], "a gpt2 model"),
        "shape": (b + ["--sft", str(wide)], "hidden size 32"),
        "missing shard": (b + ["--sft", str(missing_shard)], "missing shard"),
        "truncated": (b + ["--sft", str(truncated)], "truncated"),
        "pickle": (b + ["--sft", str(pickled)], "save_pretrained"),
        "missing folder": (b + ["--sft", str(root / "nope")], "does not exist"),
        "adapter config": (b + ["--adapter", str(no_cfg)], "adapter_config.json"),
        "both": (b + ["--sft", str(base), "--adapter", str(no_cfg)], "not both"),
        "hub offline": (b + ["--sft", "some-org/some-model"], "pass a local folder"),
        "format": (b + ["--sft", str(base), "--formats", "xlsx"], "unknown format xlsx"),
    }


def test_cli_bad_inputs_exit_2_one_line(llama_pair, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline: no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    cases = _bad_inputs(tmp_path, llama_pair)
    capsys.readouterr()  # drop the progress output of building the inputs
    for case, (argv, needle) in cases.items():
        code, _, err = _cli(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2, (case, err)
        assert len(lines) == 1 and lines[0].startswith("sftscope: error:"), (case, err)
        assert needle in lines[0], (case, lines[0])
        assert "Traceback" not in err
    assert not (tmp_path / "run" / "weights.csv").exists()


def test_cli_subprocess_no_traceback(tmp_path, llama_pair):
    proc = subprocess.run(
        [sys.executable, "-m", "sftscope", "weights", "--base", str(llama_pair / "base"),
         "--sft", str(tmp_path / "missing"), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- update sparsity

def _set_entries(sd: dict[str, torch.Tensor], name: str, n: int) -> None:
    """Change exactly the first ``n`` entries of ``name`` (each to a different value)."""
    flat = sd[name].reshape(-1)
    flat[:n] = flat[:n] + 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unchanged_frac_counts_bit_identical_entries(tmp_path, dtype):
    model = build_tiny_model("llama", VOCAB, seed=0, **LLAMA).to(dtype)
    model.save_pretrained(tmp_path / "base")
    sd = {k: v.clone() for k, v in load_file(tmp_path / "base" / "model.safetensors").items()}
    q, down = "model.layers.1.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight"
    _set_entries(sd, q, 100)
    _set_entries(sd, down, 7)
    k = "model.layers.0.self_attn.k_proj.weight"
    sd[k][0, 0] *= -1.0  # the sign bit only
    sd[k][0, 1] = -0.0 if bool(sd[k][0, 1] == 0) else sd[k][0, 1]  # unchanged unless zero
    (tmp_path / "sft").mkdir()
    save_file(sd, tmp_path / "sft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "sft" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    assert load_file(tmp_path / "sft" / "model.safetensors")[q].dtype == dtype
    df = weight_change(tmp_path / "base", tmp_path / "sft", low_rank=False)
    n_q, n_down = sd[q].numel(), sd[down].numel()
    assert val(df, 1, "q", "unchanged_frac") == pytest.approx(1 - 100 / n_q, abs=1e-12)
    assert val(df, 2, "down", "unchanged_frac") == pytest.approx(1 - 7 / n_down, abs=1e-12)
    assert val(df, 1, "k", "unchanged_frac") == 1.0 and val(df, None, "embed",
                                                            "unchanged_frac") == 1.0
    assert val(df, 0, "k", "unchanged_frac") == pytest.approx(1 - 1 / sd[k].numel(), abs=1e-12)
    n_attn1 = sum(sd[f"model.layers.1.self_attn.{r}_proj.weight"].numel() for r in "qkvo")
    assert val(df, 1, "attn", "unchanged_frac") == pytest.approx(1 - 100 / n_attn1, abs=1e-12)
    total = sum(v.numel() for v in sd.values())
    changed = 100 + 7 + 1
    assert val(df, None, "total", "unchanged_frac") == pytest.approx(1 - changed / total,
                                                                     abs=1e-12)


def test_unchanged_frac_over_a_chain(tmp_path):
    """base -> sft -> dpo: each pair counts its own bit-identical entries (stages side by side)."""
    from sftscope.config.commands import WeightsConfig

    model = build_tiny_model("llama", VOCAB, seed=0, **LLAMA).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    sd = {k: v.clone() for k, v in load_file(tmp_path / "base" / "model.safetensors").items()}
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    for name, n, folder in ((q, 5, "sft"), (v, 3, "dpo")):
        _set_entries(sd, name, n)
        (tmp_path / folder).mkdir()
        save_file(sd, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text(
            (tmp_path / "base" / "config.json").read_text())
    df = run_weights(WeightsConfig(base=str(tmp_path / "base"), sft=str(tmp_path / "sft"),
                                   stages=(f"dpo={tmp_path / 'dpo'}",), consecutive=True,
                                   low_rank=False, out=str(tmp_path / "w")))
    n_q, n_v = sd[q].numel(), sd[v].numel()

    def frac(model: str, block: int, module: str) -> float:
        return val(df[df["model"] == model], block, module, "unchanged_frac")

    assert frac("pair", 0, "q") == pytest.approx(1 - 5 / n_q) and frac("pair", 1, "v") == 1.0
    assert frac("pair:base-dpo", 0, "q") == pytest.approx(1 - 5 / n_q)
    assert frac("pair:base-dpo", 1, "v") == pytest.approx(1 - 3 / n_v)
    assert frac("pair:sft-dpo", 0, "q") == 1.0
    assert frac("pair:sft-dpo", 1, "v") == pytest.approx(1 - 3 / n_v)
    written = pd.read_csv(tmp_path / "w" / "weights.csv")
    assert "unchanged_frac" in set(written["metric"])


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norms_against_float64(tmp_path, monkeypatch, dtype):
    """bf16/fp16 pairs are summed in float32 runs (``_Norms``): every frobenius and relative
    value within the documented bound of float64 sums of the same stored values, and exactly
    where the float32 sums would overflow or underflow (summed again in float64). Small chunks
    and two workers, so that tails, parts and several chunks per tensor are exercised."""
    from sftscope.experiments import weights

    monkeypatch.setattr(weights, "_CHUNK", 512)
    monkeypatch.setattr(weights, "_ROW", 64)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = build_tiny_model("llama", VOCAB, seed=0, **LLAMA).to(dtype)
    model.save_pretrained(tmp_path / "base")
    b_sd = load_file(tmp_path / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    s_sd = {k: (v.double() * (1 + 0.01 * torch.randn(v.shape, generator=g, dtype=torch.float64))
                ).to(dtype) for k, v in b_sd.items()}
    bf16 = dtype == torch.bfloat16
    big = 1e30 if bf16 else 1e3  # bf16: squares past float32's range; fp16: near its own top
    tiny = 1e-30 if bf16 else 1e-6  # bf16: squares below float32's range; fp16: subnormals
    for name, scale in (("model.layers.0.self_attn.q_proj.weight", big),
                        ("model.layers.0.self_attn.k_proj.weight", tiny)):
        b_sd[name] = (b_sd[name].double() * 40 * scale).to(dtype)
        s_sd[name] = (b_sd[name].double() * 1.5).to(dtype)
    v = "model.layers.1.self_attn.v_proj.weight"
    b_sd[v] = torch.zeros_like(b_sd[v])
    s_sd[v] = b_sd[v].clone()
    s_sd[v].view(-1)[-1] = 1e-30 if bf16 else 6e-8  # one tiny change
    for folder, sd in (("base", b_sd), ("sft", s_sd)):
        (tmp_path / folder).mkdir(exist_ok=True)
        save_file(sd, tmp_path / folder / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "sft" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    df = weight_change(tmp_path / "base", tmp_path / "sft", low_rank=False)
    bound = 64 * 2.0**-24  # (_ROW - 1) roundings of a run's float32 sum, plus one per entry
    for block, (module, path) in [(b, r) for b in range(3) for r in ROLES.items()]:
        name = f"model.layers.{block}.{path}.weight"
        bs, ss = b_sd[name].double(), s_sd[name].double()
        d2, b2 = float(((ss - bs) ** 2).sum()), float((bs**2).sum())
        exact = bf16 and block == 0 and module in "qk" or name == v  # summed in float64
        got = val(df, block, module) ** 2
        assert got == pytest.approx(d2, rel=1e-12 if exact else bound, abs=0), name
        assert abs(got / d2 - 1) < (1e-12 if exact else 1e-6), name  # typical: about 1e-8
        if b2 > 0:
            assert val(df, block, module, "relative") ** 2 == pytest.approx(
                d2 / b2, rel=1e-12 if exact else 2 * bound), name
    assert val(df, 1, "v") > 0  # a single tiny change is not lost to underflow


def test_streamed_pairs_the_same_for_any_worker_count(tmp_path, monkeypatch):
    """Pairs read from the files go to the workers as tasks of ``_TASK`` chunks, several pairs
    in flight, in-memory pairs (the low-rank path) in between: every norm and count is
    bit-identical with 1, 2 and 3 workers, and the same as without the low-rank path."""
    from sftscope.experiments import weights

    monkeypatch.setattr(weights, "_CHUNK", 256)
    monkeypatch.setattr(weights, "_TASK", 2)
    monkeypatch.setattr(weights, "_ROW", 64)
    model = build_tiny_model("llama", VOCAB, seed=0, **LLAMA).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    sd = load_file(tmp_path / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    for k, v in sd.items():  # half the entries changed: counts as well as norms
        keep = torch.rand(v.shape, generator=g) < 0.5
        sd[k] = torch.where(keep, v, (v.double() * 1.01 + 1e-3).to(v.dtype))
    (tmp_path / "sft").mkdir()
    save_file(sd, tmp_path / "sft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "sft" / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    tables = {}
    for workers in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda w=workers: w)
        df = weight_change(tmp_path / "base", tmp_path / "sft", low_rank=False)
        assert (df[df.metric == "unchanged_frac"].value.between(0.3, 0.7)).all()
        tables[workers] = df.reset_index(drop=True)
    for workers in (2, 3):
        pd.testing.assert_frame_equal(tables[workers], tables[1], check_exact=True)
    # with the low-rank path, the 1-D tensors (norms) stream between in-memory matrices
    mixed = weight_change(tmp_path / "base", tmp_path / "sft", low_rank=True)
    one_d = mixed[mixed.module.isin(["other", "final_norm"])
                  & mixed.metric.isin(["frobenius", "relative", "unchanged_frac"])]
    want = tables[1].merge(one_d, on=["block", "module", "metric"], suffixes=("", "_mixed"))
    assert len(want) == len(one_d) > 0
    assert (want.value == want.value_mixed).all()
