"""Real workflows on tiny models: a PEFT adapter (or tune run) as the SFT side of every command,
GGUF files wherever a model is accepted, ``tune --merge``.

The invariant behind adapters as the SFT side: the adapter is applied in memory, unmerged, so
every hidden state below the lowest adapted block is bit-identical to the base's.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sftscope
from sftscope.config.commands import (
    AnalyzeConfig,
    EvalConfig,
    ProbeConfig,
    SuggestConfig,
    SwapConfig,
    TuneConfig,
    WeightsConfig,
)
from sftscope.errors import SftscopeError
from sftscope.load.models import LoadOptions, fingerprint, load_model, load_tokenizer, save_model
from sftscope.load.sources import adapter_label, check_model, source_kind

N_LAYERS = 10  # mask 00100 adapts blocks 4 and 5: hidden states j <= 4 are the base's
FIRST = 4


@pytest.fixture(scope="module")
def base(model_dir) -> Path:
    return model_dir("llama", n_layers=N_LAYERS)


@pytest.fixture(scope="module")
def gsm(tmp_path_factory) -> Path:
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples now?",
             "answer": f"He has {a} + {b} = {a + b} apples.\n#### {a + b}"}
            for a, b in [(3, 4), (12, 7), (5, 5), (20, 1), (9, 8), (6, 2), (11, 3), (4, 4)]]
    p = tmp_path_factory.mktemp("data") / "gsm8k.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.fixture(scope="module")
def run(base, gsm, tmp_path_factory) -> Path:
    """A finished tune run (mask 00100, a few steps, large lr so the adapter moves), merged."""
    from sftscope.experiments.tune import tune

    out = tmp_path_factory.mktemp("tune") / "t00100"
    torch.set_num_threads(1)
    tune(TuneConfig(model=str(base), train=f"gsm8k:{gsm}", out=str(out), mask="00100", rank=4,
                    batch_size=4, micro_batch_size=4, max_steps=2, lr=5e-2, run_eval=False,
                    n_train=None, dropout=0.0, seed=3, merge=True))
    return out


def _hidden(model, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states


IDS = torch.tensor([[5, 17, 99, 200, 3, 44, 10, 71], [9, 8, 7, 6, 5, 4, 3, 2]])


# ----------------------------------------------------------------------------- adapters


def test_source_kinds_and_label(base, run):
    assert source_kind(str(base)) == "folder"
    assert source_kind(str(run)) == "adapter" == source_kind(str(run / "adapter"))
    assert source_kind("org/model") == "hub"
    assert source_kind(str(run / "merged")) == "folder"
    src = check_model(str(run))
    assert src.kind == "adapter" and src.path == str(run / "adapter")
    assert src.base is not None and src.base.kind == "folder"
    assert Path(src.base.spec).resolve() == Path(base).resolve()
    assert src.n_blocks == N_LAYERS
    # the label names the run: mask, full-depth rank budget, seed
    assert src.label == adapter_label(run / "adapter") == "adapter m00100 r4 s3"


def test_adapter_bit_identical_below_adapted_blocks(base, run):
    hb = _hidden(load_model(str(base)), IDS)
    m = load_model(str(run))  # the tune run folder; the base comes from its record
    assert type(m).__name__ == "LlamaForCausalLM"  # the base class, with LoRA layers inside
    hs = _hidden(m, IDS)
    for j in range(FIRST + 1):
        assert torch.equal(hb[j], hs[j]), j
    for j in range(FIRST + 1, N_LAYERS + 1):
        assert not torch.equal(hb[j], hs[j]), j
    # --base given explicitly: the same model
    hs2 = _hidden(load_model(str(run / "adapter"), LoadOptions(base=str(base))), IDS)
    assert all(torch.equal(a, b) for a, b in zip(hs, hs2))


def test_merged_folder_matches_adapter(base, run):
    merged = run / "merged"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert (merged / "tokenizer_config.json").is_file()
    assert check_model(str(merged)).kind == "folder"
    ha = _hidden(load_model(str(run)), IDS)
    hm = _hidden(load_model(str(merged)), IDS)
    hb = _hidden(load_model(str(base)), IDS)
    for j in range(FIRST + 1):
        assert torch.equal(hm[j], hb[j])
    for a, b in zip(ha, hm):  # W + sBA merged vs applied: equal up to rounding
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_adapter_base_resolution_and_refusals(base, run, model_dir, tmp_path):
    # an adapter whose recorded base is gone, and no sftscope.json: refuse, say --base
    orphan = tmp_path / "orphan"
    shutil.copytree(run / "adapter", orphan)
    (orphan / "sftscope.json").unlink()
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (orphan / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SftscopeError, match="names no usable base.*pass --base"):
        check_model(str(orphan))
    assert check_model(str(orphan), base=str(base)).kind == "adapter"
    assert adapter_label(orphan) == "adapter orphan r20"
    # a base of other shapes: refused before any load
    wide = model_dir("llama", n_layers=N_LAYERS, hidden=48)
    with pytest.raises(SftscopeError, match="does not fit base"):
        check_model(str(orphan), base=str(wide))
    with pytest.raises(SftscopeError, match="hidden size 32.*hidden size 48"):
        check_model(str(run), base=str(wide))
    shallow = model_dir("llama", n_layers=4)
    with pytest.raises(SftscopeError, match="blocks"):
        check_model(str(run), base=str(shallow))
    # the same shapes, other weights: refused at load unless allowed
    other = model_dir("llama", seed=7, n_layers=N_LAYERS)
    with pytest.raises(SftscopeError, match="another base"):
        load_model(str(run), LoadOptions(base=str(other)))
    load_model(str(run), LoadOptions(base=str(other), allow_other_base=True))
    # configs refuse what cannot work, before any model is loaded
    with pytest.raises(SftscopeError, match="does not fit base"):
        AnalyzeConfig(base=str(wide), sft=str(orphan), data="x.jsonl", out="o")
    with pytest.raises(SftscopeError, match="tune trains a base model"):
        TuneConfig(model=str(run), train="gsm8k", out="o", mask="01")
    with pytest.raises(SftscopeError, match="weights reads adapters with --adapter"):
        WeightsConfig(base=str(base), sft=str(run), out="o")
    with pytest.raises(SftscopeError, match="itself an adapter"):
        EvalConfig(model=str(run), adapter=str(run))
    with pytest.raises(SftscopeError, match="not both"):
        ProbeConfig(model=str(base), base=str(base), data="gsm8k")


def test_fingerprint_and_cache_key_hold_the_adapter(base, run, tmp_path):
    fa = fingerprint(str(run), memo_dir=tmp_path)
    fb = fingerprint(str(base), memo_dir=tmp_path)
    assert fa["kind"] == "adapter" and fa["label"] == "adapter m00100 r4 s3"
    assert fa["base"]["hash"] == fb["hash"] and fa["hash"] != fb["hash"]
    assert fingerprint(str(run / "adapter"), memo_dir=tmp_path)["hash"] == fa["hash"]
    # other adapter content: another hash
    copy = tmp_path / "copy"
    shutil.copytree(run / "adapter", copy)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(copy / "adapter_model.safetensors"))
    k = next(k for k in sd if "lora_B" in k)
    sd[k] = sd[k] + 1e-3
    save_file(sd, str(copy / "adapter_model.safetensors"))
    fc = fingerprint(str(copy), memo_dir=tmp_path)
    assert fc["adapter_hash"] != fa["adapter_hash"] and fc["hash"] != fa["hash"]


def test_analyze_with_adapter_as_sft(base, run, gsm, tmp_path):
    from sftscope.capture.stream import load_cached
    from sftscope.experiments.analyze import analyze
    from sftscope.report.runs import run_label

    cache = tmp_path / "cache"
    out = tmp_path / "an"
    table = analyze(AnalyzeConfig(base=str(base), sft=str(run), data=f"gsm8k:{gsm}",
                                  out=str(out), limit=8, n_token=2, max_length=32,
                                  batch_size=4, cache_dir=str(cache), device="cpu"))
    cka = table[table.metric == "cka"].set_index("layer").value
    assert ((cka.loc[:FIRST] - 1.0).abs() < 1e-9).all(), cka  # equal states (below)
    assert (cka.loc[FIRST + 1:] < 0.9999).all(), cka
    files = sorted(cache.glob("states-*.safetensors"))
    assert len(files) == 2
    a, b = (load_cached(f) for f in files)
    assert torch.equal(a.pooled_mean[:FIRST + 1], b.pooled_mean[:FIRST + 1])
    assert torch.equal(a.pooled_last[:FIRST + 1], b.pooled_last[:FIRST + 1])
    assert not torch.equal(a.pooled_mean[FIRST + 1:], b.pooled_mean[FIRST + 1:])
    rec = json.loads((out / "run.json").read_text())
    assert rec["models"]["sft"]["label"] == "adapter m00100 r4 s3"
    assert rec["models"]["sft"]["base"]["hash"] == rec["models"]["base"]["hash"]
    assert run_label(rec, out) == f"{Path(base).name} vs sft=adapter m00100 r4 s3"


def test_probe_swap_suggest_with_adapter(base, run, gsm):
    from sftscope.experiments.lens import probe
    from sftscope.experiments.suggest import suggest
    from sftscope.experiments.swap import swap

    common = dict(data=f"gsm8k:{gsm}", limit=4, max_length=32, device="cpu")
    one = probe(ProbeConfig(model=str(run / "adapter"), bootstrap=0, **common))
    assert set(one.model) == {"adapter m00100 r4 s3"}
    with_base = probe(ProbeConfig(model=str(run), base=str(base), bootstrap=0, **common))
    assert one.value.tolist() == with_base.value.tolist()
    pair = probe(ProbeConfig(base=str(base), sft=str(run), bootstrap=0, **common))
    agree = pair[pair.metric == "agreement"].set_index("layer").value
    assert (agree.loc[:FIRST] == 1.0).all()
    df = swap(SwapConfig(base=str(base), sft=str(run), segments=5, bootstrap=0, **common))
    loss = df[df.metric == "loss"].set_index("config").value
    # the SFT model with the base's adapted segment back is the base; swapping an
    # unadapted segment changes nothing
    assert loss["sft<-base[00100]"] == loss["base"]
    assert loss["base<-sft[10000]"] == loss["base"]
    assert loss["base<-sft[00100]"] == loss["sft"] != loss["base"]
    sg = suggest(SuggestConfig(base=str(base), sft=str(run), segments=5, method="pair",
                               **common))
    assert sg.mask == "00100"
    w = sg.scores[sg.scores.signal == "weight_change"]
    assert len(w) == 5 and w.value.iloc[2] > 0  # the adapter's own change, per segment


def test_models_load_through_one_place(base, run):
    """Every command loads models with load.models.load_model (adapter and GGUF aware): no
    command module calls from_pretrained itself (the demo builds its own pair: it may)."""
    src = Path(sftscope.__file__).parent
    for path in sorted((src / "experiments").glob("*.py")):
        code = "\n".join(line for line in path.read_text().splitlines()
                          if not line.lstrip().startswith(("#", "``", "\"\"\"")))
        assert ".from_pretrained(" not in code, f"{path.name} loads a model itself"
    import sftscope.experiments.context as cx
    import sftscope.load.models as lm

    assert cx.load_model is lm.load_model
    tok = load_tokenizer(str(run))
    assert tok.convert_ids_to_tokens([5, 6]) == load_tokenizer(str(base)).convert_ids_to_tokens(
        [5, 6])


# ----------------------------------------------------------------------------- GGUF headers


def _gguf_bytes(arch: str = "llama", version: int = 3, blocks: int | None = 2,
                tensors: int = 1, cut: int = 0) -> bytes:
    """A minimal GGUF: a few metadata keys and ``tensors`` float32 tensors of 4 x 8."""
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    kv = [(s("general.architecture"), 8, s(arch)), (s(f"{arch}.embedding_length"), 4,
                                                      struct.pack("<I", 8))]
    if blocks is not None:
        kv.append((s(f"{arch}.block_count"), 4, struct.pack("<I", blocks)))
    out = b"GGUF" + struct.pack("<IQQ", version, tensors, len(kv))
    for k, t, v in kv:
        out += k + struct.pack("<I", t) + v
    for i in range(tensors):
        out += s(f"t{i}") + struct.pack("<I", 2) + struct.pack("<QQ", 8, 4) + struct.pack(
            "<I", 0) + struct.pack("<Q", i * 128)
    out += b"\0" * (-len(out) % 32)
    out += b"\1" * (128 * tensors)
    return out[:len(out) - cut] if cut else out


def test_gguf_header_checks(tmp_path):
    pytest.importorskip("gguf")
    from sftscope.load.gguf import read_gguf

    good = tmp_path / "m.gguf"
    good.write_bytes(_gguf_bytes())
    info = read_gguf(good)
    assert info.architecture == "llama" and info.data_bytes == 128
    src = check_model(str(good))
    assert src.kind == "gguf" and src.n_blocks == 2 and src.config["hidden_size"] == 8
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(good, folder / "x.gguf")
    assert check_model(str(folder)).path == str((folder / "x.gguf").resolve())
    shutil.copy(good, folder / "y.gguf")
    with pytest.raises(SftscopeError, match="holds 2 GGUF files"):
        check_model(str(folder))
    cases = {"truncated": (_gguf_bytes(tensors=2, cut=10), "is truncated"),
             "header": (_gguf_bytes()[:40], "truncated inside its header"),
             "magic": (b"GGML" + _gguf_bytes()[4:], "not a GGUF file"),
             "v1": (_gguf_bytes(version=1), "version 1"),
             "v9": (_gguf_bytes(version=9), "version 9"),
             "bert": (_gguf_bytes(arch="bert"), "not a causal language model"),
             "noblocks": (_gguf_bytes(blocks=None), "block_count")}
    for name, (data, needle) in cases.items():
        p = tmp_path / f"{name}.gguf"
        p.write_bytes(data)
        with pytest.raises(SftscopeError, match=needle):
            check_model(str(p))
    # a model folder with config.json stays a Hugging Face folder
    assert source_kind(str(tmp_path / "nope.gguf")) == "missing"


def test_gguf_type_table_matches_gguf_package():
    gguf = pytest.importorskip("gguf")
    from sftscope.load.gguf import GGML_TYPES

    for tid, (name, block, nbytes) in GGML_TYPES.items():
        t = gguf.GGMLQuantizationType(tid)
        assert t.name == name and gguf.GGML_QUANT_SIZES[t] == (block, nbytes), name


def test_checks_stay_torch_free(run, tmp_path):
    good = tmp_path / "m.gguf"
    good.write_bytes(_gguf_bytes())
    code = ("import sys; from sftscope.load.sources import check_model; "
            f"check_model({str(good)!r}); check_model({str(run)!r}); "
            "from sftscope.config.commands import ProbeConfig; "
            f"ProbeConfig(model={str(run)!r}, data='gsm8k'); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_gguf_needs_package_message(monkeypatch, tmp_path):
    import importlib.util

    good = tmp_path / "m.gguf"
    good.write_bytes(_gguf_bytes())
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(SftscopeError, match="^reading GGUF files needs the gguf package: pip "
                       "install gguf$"):
        check_model(str(good))  # refused before any work
    with pytest.raises(SftscopeError, match="pip install gguf"):
        AnalyzeConfig(base=str(good), sft=str(good), data="x.jsonl", out="o")


# ----------------------------------------------------------------------------- GGUF models


@pytest.fixture(scope="module")
def tiny_gguf(model_dir, tmp_path_factory) -> Path:
    pytest.importorskip("gguf")
    from sftscope.load.tiny import save_tiny_gguf

    hf = model_dir("llama", n_layers=4)
    return save_tiny_gguf(hf, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def test_gguf_loads_like_the_hf_model(model_dir, tiny_gguf, tmp_path):
    hf = model_dir("llama", n_layers=4)
    ha = _hidden(load_model(str(hf)), IDS)
    hg = _hidden(load_model(str(tiny_gguf)), IDS)  # dequantised, q/k un-permuted
    assert all(torch.equal(a, b) for a, b in zip(ha, hg))
    t_hf, t_g = load_tokenizer(str(hf)), load_tokenizer(str(tiny_gguf.parent))
    text = "Tom has 12 apples"
    assert t_hf(text).input_ids == t_g(text).input_ids
    # fingerprinted by content: the file and its folder agree; another file differs
    f1 = fingerprint(str(tiny_gguf), memo_dir=tmp_path)
    assert f1["kind"] == "gguf" and f1["hash"] == fingerprint(str(tiny_gguf.parent),
                                                              memo_dir=tmp_path)["hash"]
    other = tmp_path / "other.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[-1] ^= 1
    other.write_bytes(bytes(data))
    assert fingerprint(str(other), memo_dir=tmp_path)["hash"] != f1["hash"]
    # converted once to a Hugging Face folder: the same model
    conv = save_model(str(tiny_gguf), tmp_path / "conv", LoadOptions(dtype="float32"))
    assert check_model(str(conv)).kind == "folder"
    hc = _hidden(load_model(str(conv)), IDS)
    assert all(torch.equal(a, b) for a, b in zip(ha, hc))


def test_gguf_pair_analyze(model_dir, tiny_gguf, gsm, tmp_path):
    """A GGUF of a model against its Hugging Face folder: the same states, CKA 1 everywhere."""
    from sftscope.experiments.analyze import analyze

    hf = model_dir("llama", n_layers=4)
    table = analyze(AnalyzeConfig(base=str(hf), sft=str(tiny_gguf), data=f"gsm8k:{gsm}",
                                  out=str(tmp_path / "an"), limit=6, n_token=2, max_length=32,
                                  batch_size=3, cache_dir=str(tmp_path / "c"), device="cpu"))
    cka = table[table.metric == "cka"].value
    assert ((cka - 1.0).abs() < 1e-9).all()
    rec = json.loads((tmp_path / "an" / "run.json").read_text())
    assert rec["models"]["sft"]["kind"] == "gguf"


def test_eval_adapter_as_model_matches_adapter_flag(base, run, gsm, tmp_path):
    """``eval --model RUN`` (the adapter applied in memory) generates what ``--model BASE
    --adapter RUN`` (PEFT's own wrapper) does."""
    from sftscope.experiments.evaluate import evaluate

    common = dict(task="gsm8k", data=f"gsm8k:{gsm}", limit=2, shots=0, max_new_tokens=4,
                  batch_size=2, device="cpu")
    evaluate(EvalConfig(model=str(run), out=str(tmp_path / "a"), **common))
    evaluate(EvalConfig(model=str(base), adapter=str(run), out=str(tmp_path / "b"), **common))
    a, b = ((tmp_path / d / "predictions-gsm8k.jsonl").read_text().splitlines() for d in "ab")
    key = "completion"
    assert [json.loads(x)[key] for x in a] == [json.loads(x)[key] for x in b]
    rec = json.loads((tmp_path / "a" / "run.json").read_text())
    assert json.dumps(rec).count("adapter m00100 r4 s3") >= 1


def test_adapter_folder_with_a_config_json(base, run, tmp_path):
    """Some trainers save the base's config.json next to the adapter: still an adapter."""
    a = tmp_path / "a"
    shutil.copytree(run / "adapter", a)
    shutil.copy(Path(base) / "config.json", a / "config.json")
    assert source_kind(str(a)) == "adapter" and check_model(str(a)).kind == "adapter"


def test_adapter_for_another_base_refused_before_any_model_runs(run, gsm, model_dir, tmp_path,
                                                               monkeypatch):
    """Same shapes, other weights: every pair command refuses in validation, before the base
    is loaded or probed (the issue: it used to be refused only after the base's capture)."""
    from sftscope.config.commands import ProbeConfig, SteerConfig, SuggestConfig, SwapConfig
    from sftscope.experiments import analyze as A
    from sftscope.experiments import lens, steer, suggest, swap
    from sftscope.load import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the pair was checked")

    for mod in (models, A, lens, swap, suggest, steer):
        if hasattr(mod, "load_model"):
            monkeypatch.setattr(mod, "load_model", no_load)
    other = str(model_dir("llama", seed=7, n_layers=N_LAYERS))
    data = f"gsm8k:{gsm}"
    small = dict(data=data, limit=4, max_length=32, device="cpu")
    calls = [
        lambda: A.analyze(AnalyzeConfig(base=other, sft=str(run), out=str(tmp_path / "a"),
                                        cache_dir=str(tmp_path / "c"), **small)),
        lambda: lens.probe(ProbeConfig(base=other, sft=str(run), **small)),
        lambda: lens.probe(ProbeConfig(model=str(run), base=other, **small)),
        lambda: swap.swap(SwapConfig(base=other, sft=str(run), segments=2, **small)),
        lambda: suggest.suggest(SuggestConfig(base=other, sft=str(run), segments=2,
                                              method="pair", **small)),
        lambda: steer.steer(SteerConfig(base=other, sft=str(run), layers="1", generate=True,
                                        out=str(tmp_path / "s"), **small)),
    ]
    for call in calls:
        with pytest.raises(SftscopeError, match="trained on another base"):
            call()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("states-*"))


def test_weights_and_eval_of_an_adapter_are_labelled_base_plus_adapter(base, run, gsm,
                                                                      tmp_path):
    """One run.json model schema (``models``: role -> fingerprint) for weights and eval too;
    the report labels an adapter's run as base+adapter, never as the bare base."""
    from sftscope.config.commands import EvalConfig
    from sftscope.experiments.evaluate import evaluate
    from sftscope.experiments.weights import run_weights
    from sftscope.report.runs import run_label

    w = tmp_path / "w"
    run_weights(WeightsConfig(adapter=str(run / "adapter"), out=str(w), low_rank=False))
    rec = json.loads((w / "run.json").read_text())
    assert rec["models"]["sft"]["label"] == "adapter m00100 r4 s3"
    assert run_label(rec, w) == f"{Path(base).name}+adapter m00100 r4 s3"
    e = tmp_path / "e"
    evaluate(EvalConfig(model=str(base), adapter=str(run / "adapter"), task="gsm8k",
                        data=f"gsm8k:{gsm}", limit=1, shots=0, max_new_tokens=2,
                        out=str(e), device="cpu"))
    rec = json.loads((e / "run.json").read_text())
    assert rec["models"]["model"]["kind"] == "adapter"
    assert run_label(rec, e) == f"{Path(base).name}+adapter m00100 r4 s3"
