"""steer: the base->SFT vector at a layer, added to the base model at several scales."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from sftscope.config.commands import EvalConfig, SteerConfig
from sftscope.errors import SftscopeError
from sftscope.experiments.steer import STEER_COLUMNS, steer, steering, steering_vector
from sftscope.load.arch import get_blocks
from sftscope.load.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def pair(model_dir):
    return model_dir("llama", seed=0), model_dir("llama", seed=1)  # 4 blocks


@pytest.fixture()
def texts(tmp_path):
    p = tmp_path / "texts.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"The number {i} is followed by {i + 1}."})
                           for i in range(12)) + "\n")
    return p


def _cfg(pair, data, out, **kw):
    base, sft = pair
    kw.setdefault("layers", "2")
    kw.setdefault("device", "cpu")
    return SteerConfig(base=str(base), sft=str(sft), data=str(data), out=str(out), **kw)


# ------------------------------------------------------------------ the vector


def test_vector_mean_and_pc1():
    g = torch.Generator().manual_seed(0)
    zb = torch.randn(50, 8, generator=g)
    u = torch.zeros(8)
    u[3] = 1.0
    coef = 2.0 + torch.randn(50, generator=g)  # every sample moves along e3 by about 2
    zs = zb + coef[:, None] * u
    v, info = steering_vector(zb, zs, "mean")
    torch.testing.assert_close(v, (zs - zb).mean(0))
    assert info["norm"] == pytest.approx(info["mean_shift"])
    v, info = steering_vector(zb, zs, "pc1")
    assert abs(float(v[3])) == pytest.approx(float(v.norm()), rel=1e-6)  # along e3
    assert float(v[3]) > 0  # oriented along the mean shift
    assert float(v.norm()) == pytest.approx(float(coef.square().mean().sqrt()), rel=1e-5)
    assert info["explained"] == pytest.approx(1.0)
    v, info = steering_vector(zb, zs, "pc1", unit=True)
    assert float(v.norm()) == pytest.approx(1.0) and info["natural_norm"] > 1
    with pytest.raises(SftscopeError, match="identical"):
        steering_vector(zb, zb.clone(), "mean", unit=True)


def test_hook_adds_the_vector_where_asked(pair):
    model = load_model(str(pair[0]))
    blocks = get_blocks(model)
    x = torch.randint(5, 300, (2, 7))
    seen: dict[int, torch.Tensor] = {}

    def grab(j):
        def hook(mod, args, kwargs, out):
            seen[j] = (args[0] if args else kwargs["hidden_states"]).clone()
        return hook

    handles = [blocks[b].register_forward_hook(grab(b), with_kwargs=True) for b in range(4)]
    with torch.no_grad():
        model(input_ids=x)
        plain = dict(seen)
        v = torch.randn(model.config.hidden_size)
        for layer in (0, 2):
            with steering(model, {layer: v}, 3.0):
                model(input_ids=x)
            # the input of block `layer` (hidden state j = layer) moved by exactly 3 v
            torch.testing.assert_close(seen[layer] - plain[layer], (3.0 * v).expand_as(
                plain[layer]), atol=1e-5, rtol=0)
            for b in range(layer):  # nothing below changes
                torch.testing.assert_close(seen[b], plain[b], atol=0, rtol=0)
        with steering(model, {2: v}, 0.0):
            model(input_ids=x)
        for b in range(4):
            assert torch.equal(seen[b], plain[b])
    for h in handles:
        h.remove()
    assert not any(blocks[b]._forward_hooks for b in range(4))


def _manual_hooks(model, vectors, scale):
    """Hand-made hooks adding ``scale * v_j`` to hidden state j (the input of block 0 for
    j = 0, else the output of block j - 1): the reference the steering context must equal."""
    blocks = get_blocks(model)
    handles = []
    for j, v in vectors.items():
        if j == 0:
            handles.append(blocks[0].register_forward_pre_hook(
                lambda m, args, kw, v=v: ((args[0] + scale * v, *args[1:]), kw) if args else
                (args, {**kw, "hidden_states": kw["hidden_states"] + scale * v}),
                with_kwargs=True))
        else:
            handles.append(blocks[j - 1].register_forward_hook(
                lambda m, a, out, v=v: (out[0] + scale * v, *out[1:])
                if isinstance(out, tuple) else out + scale * v))
    return handles


@pytest.mark.parametrize("layers", [(1, 3), (0, 1), (0, 2, 4)])
def test_several_layers_equal_their_hooks_by_hand(pair, layers):
    """Steering several layers at once is each layer's vector added at its layer in one
    forward pass (equal to hooks made by hand); at scale 0 it is the plain model."""
    model = load_model(str(pair[0]))
    x = torch.randint(5, 300, (2, 7))
    g = torch.Generator().manual_seed(1)
    vectors = {j: torch.randn(model.config.hidden_size, generator=g) for j in layers}
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with steering(model, vectors, 0.0):
            torch.testing.assert_close(model(input_ids=x).logits, plain, atol=0, rtol=0)
        with steering(model, vectors, 1.5):
            steered = model(input_ids=x).logits
        handles = _manual_hooks(model, vectors, 1.5)
        by_hand = model(input_ids=x).logits
        for h in handles:
            h.remove()
        one = {layers[0]: vectors[layers[0]]}
        with steering(model, one, 1.5):
            first_only = model(input_ids=x).logits
    torch.testing.assert_close(steered, by_hand, atol=1e-5, rtol=0)
    assert not torch.allclose(steered, first_only)  # every layer's hook acted
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in get_blocks(model))


# ------------------------------------------------------------------ the command


def test_steer_perplexity_scale_zero_is_the_base(pair, texts, tmp_path):
    from sftscope.experiments.evaluate import evaluate_model

    out = tmp_path / "run"
    res = steer(_cfg(pair, texts, out, scales="0,1,8", task=f"perplexity:{texts}",
                     eval_limit=6, limit=10))
    t = pd.read_csv(out / "steer.csv")
    assert list(t.columns) == STEER_COLUMNS
    assert sorted(t["scale"].unique()) == [0.0, 1.0, 8.0]
    loss = t[t["metric"] == "loss"].set_index("scale")["value"]
    # scale 0 is the unsteered base, exactly
    model = load_model(str(pair[0]))
    tok = load_tokenizer(str(pair[0]))
    plain = evaluate_model(model, tok, EvalConfig(model=str(pair[0]), task="perplexity",
                                                  data=str(texts), limit=6, batch_size=8))
    assert loss[0.0] == plain.score("loss").value
    assert loss[8.0] != loss[0.0] and loss[1.0] != loss[0.0]
    assert (t["n"] == 6).all()
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "steer" and rec["finished"] and rec["layers"] == [2]
    [vec] = rec["vectors"]
    assert rec["n_blocks"] == 4 and vec["direction"] == "mean" and vec["layer"] == 2
    assert vec["norm"] == pytest.approx(vec["mean_shift"])
    assert res.vectors[0]["n_samples"] == 10
    from safetensors.torch import load_file

    v = load_file(str(out / "steer_vector.safetensors"))["layer_2"]
    assert v.shape == (load_model(str(pair[0])).config.hidden_size,)
    assert float(v.norm()) == pytest.approx(res.vectors[0]["norm"], rel=1e-5)
    assert (out / "scales" / "8" / "predictions-perplexity.jsonl").is_file()
    # every item's loss at every scale, the same items: their mean is the table's loss
    items = pd.read_csv(out / "steer_items.csv")
    assert list(items.columns) == ["scale", "metric", "item", "value"]
    assert set(items["metric"]) == {"loss"}
    per = items.groupby("scale")["value"]
    assert (per.count() == 6).all()
    for s, m in per.mean().items():
        assert m == pytest.approx(loss[s], rel=1e-9)


def test_steer_two_layers_run(pair, texts, tmp_path):
    """``--layers 1,3``: each layer's vector (saved per layer) added at its layer; scale 0 is
    the unsteered base, scale 2 every item's loss as with both hooks made by hand."""
    from safetensors.torch import load_file

    from sftscope.experiments.evaluate import evaluate_model

    out = tmp_path / "run"
    res = steer(_cfg(pair, texts, out, layers="1,3", scales="0,2", task=f"perplexity:{texts}",
                     eval_limit=5, limit=10))
    assert res.layers == [1, 3] and [v["layer"] for v in res.vectors] == [1, 3]
    rec = json.loads((out / "run.json").read_text())
    assert rec["layers"] == [1, 3] and rec["layers_text"] == "1,3"
    assert rec["config"]["layers"] == "1,3"
    t = pd.read_csv(out / "steer.csv", dtype={"layers": str})
    assert set(t["layers"]) == {"1,3"}
    saved = load_file(str(out / "steer_vector.safetensors"))
    assert sorted(saved) == ["layer_1", "layer_3"]
    items = pd.read_csv(out / "steer_items.csv").pivot(index="item", columns="scale",
                                                       values="value")
    model = load_model(str(pair[0]))
    tok = load_tokenizer(str(pair[0]))

    def losses(folder):
        ecfg = EvalConfig(model=str(pair[0]), task="perplexity", data=str(texts), limit=5,
                          batch_size=8, out=str(tmp_path / folder))
        evaluate_model(model, tok, ecfg)
        rows = [json.loads(x) for x in (tmp_path / folder / "predictions-perplexity.jsonl")
                .read_text().splitlines()]
        return [r["loss_after"] for r in rows]

    assert items[0.0].tolist() == losses("plain")
    handles = _manual_hooks(model, {1: saved["layer_1"], 3: saved["layer_3"]}, 2.0)
    by_hand = losses("by_hand")
    for h in handles:
        h.remove()
    assert items[2.0].tolist() == pytest.approx(by_hand, rel=1e-5)
    assert items[2.0].tolist() != items[0.0].tolist()
    # the report reads the per-item scores: its finding is a paired test on the same texts
    from sftscope.report.runs import load_run
    from sftscope.report.sections import steer_findings, steer_prepare

    run = load_run(out)
    assert "steer_items" in run.tables
    text = " ".join(steer_findings(steer_prepare([run])))
    assert "At hidden states j = 1,3 (one pass) of 4" in text, text
    assert "paired difference" in text and "over n = 5 items" in text, text


def test_steer_vector_is_the_mean_shift_of_analyze(pair, texts, tmp_path):
    """The vector's norm is the pair's mean_shift at that layer (same states, same pooling)."""
    from sftscope.experiments.analyze import AnalyzeConfig, analyze

    table = analyze(AnalyzeConfig(base=str(pair[0]), sft=str(pair[1]), data=str(texts),
                                  out=str(tmp_path / "a"), limit=10, n_token=0, device="cpu",
                                  cache_dir=str(tmp_path / "cache")))
    ms = table[(table.metric == "mean_shift") & (table.layer == 3)]["value"].iloc[0]
    res = steer(_cfg(pair, texts, tmp_path / "s", layers="3", limit=10, scales="0",
                     task=f"perplexity:{texts}", eval_limit=2))
    assert res.vectors[0]["mean_shift"] == pytest.approx(ms, rel=1e-5)


def test_steer_adapter_sft_applies_to_the_given_base(pair, texts, tmp_path):
    """An adapter SFT is loaded onto ``--base`` (as in analyze and swap), not onto the base
    its config records: with a recorded base that is gone, steer still runs, its vector is the
    mean shift of base+adapter over the base, and run.json names the base it applied to."""
    import json as _json

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(str(pair[0])), LoraConfig(r=2, target_modules=["q_proj"],
                                                                 init_lora_weights=False))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    cfg_path = adapter / "adapter_config.json"
    acfg = _json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_path.write_text(_json.dumps(acfg))
    res = steer(SteerConfig(base=str(pair[0]), sft=str(adapter), data=str(texts),
                            out=str(tmp_path / "s"), layers="3", limit=10, scales="0",
                            task=f"perplexity:{texts}", eval_limit=2, device="cpu"))
    assert res.vectors[0]["norm"] > 0
    record = _json.loads((tmp_path / "s" / "run.json").read_text())
    assert str(pair[0]) in _json.dumps(record["models"]["sft"])


def test_steer_generate_writes_completions(pair, texts, tmp_path):
    out = tmp_path / "run"
    steer(_cfg(pair, texts, out, layers="0", scales="0,50", generate=True, n_prompts=3,
               max_new_tokens=4, direction="pc1", limit=8))
    lines = [json.loads(x) for x in (out / "steer.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {x["scale"] for x in lines} == {0.0, 50.0}
    assert {"prompt", "completion", "new_tokens", "index"} <= set(lines[0])
    t = pd.read_csv(out / "steer.csv")
    same = t[t["metric"] == "same_as_unsteered"].set_index("scale")["value"]
    assert same[0.0] == 1.0
    assert set(t["metric"]) == {"new_tokens", "same_as_unsteered"}


def test_steer_config_refuses_bad_input(pair, texts, tmp_path):
    with pytest.raises(SftscopeError, match="needs --task .* or --generate"):
        _cfg(pair, texts, tmp_path / "o")
    with pytest.raises(SftscopeError, match="--layers 5: hidden state 5 is outside the hidden "
                                            "states 0..4"):
        _cfg(pair, texts, tmp_path / "o", layers="5", generate=True)
    with pytest.raises(SftscopeError, match="--layers 1,3-5: hidden state 5 is outside"):
        _cfg(pair, texts, tmp_path / "o", layers="1,3-5", generate=True)
    for bad in ("x", "3-1", "1,,2", "", "-1"):
        with pytest.raises(SftscopeError, match="--layers must list hidden states"):
            _cfg(pair, texts, tmp_path / "o", layers=bad, generate=True)
    assert _cfg(pair, texts, tmp_path / "o", layers="3, 0-1", generate=True
                ).layer_values(4) == [0, 1, 3]
    with pytest.raises(SftscopeError, match="--scales has 'x'"):
        _cfg(pair, texts, tmp_path / "o", scales="0,x", generate=True)
    with pytest.raises(SftscopeError, match="repeats"):
        _cfg(pair, texts, tmp_path / "o", scales="1,1.0", generate=True)
    with pytest.raises(SftscopeError, match="--eval-limit applies to --task"):
        _cfg(pair, texts, tmp_path / "o", generate=True, eval_limit=3)
    with pytest.raises(SftscopeError, match="pc1 needs at least 2"):
        _cfg(pair, texts, tmp_path / "o", generate=True, direction="pc1", limit=1)
    with pytest.raises(SftscopeError, match="unknown task"):
        _cfg(pair, texts, tmp_path / "o", task="squad")
    cfg = _cfg(pair, texts, tmp_path / "o", scales="2,-1,0.5", generate=True)
    assert cfg.scale_values() == [2.0, -1.0, 0.5]


def test_cli_steer_layer_out_of_range_before_loading(pair, texts, tmp_path, capsys):
    from sftscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["steer", "--base", str(pair[0]), "--sft", str(pair[1]), "--data", str(texts),
              "--out", str(tmp_path / "o"), "--layer", "9", "--generate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--layers 9: hidden state 9 is outside" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, needle", [("1,9", "--layers 1,9: hidden state 9 is outside"),
                                         ("2-x", "--layers must list hidden states"),
                                         ("3-1", "--layers must list hidden states")])
def test_cli_steer_bad_layer_list_is_one_line(pair, texts, tmp_path, capsys, bad, needle):
    from sftscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["steer", "--base", str(pair[0]), "--sft", str(pair[1]), "--data", str(texts),
              "--out", str(tmp_path / "o"), "--layers", bad, "--generate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_cli_steer_refuses_scales_that_break_the_model(pair, texts, tmp_path, capsys):
    """--scales 0,1e30 overflows the hidden state: refused in one line naming the scale, exit
    2, before any scoring (it used to score the broken model's empty completions as 0)."""
    from sftscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(["steer", "--base", str(pair[0]), "--sft", str(pair[1]), "--data", str(texts),
              "--out", str(tmp_path / "o"), "--layer", "1", "--generate", "--scales", "0,1e30",
              "--limit", "4", "--n-prompts", "2", "--max-new-tokens", "2"])
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "error" in x]
    assert e.value.code == 2 and len(err) == 1, err
    assert "--scales 1e+30: the steered model gives non-finite or constant logits" in err[0]
    assert not (tmp_path / "o" / "steer.csv").exists()


def test_steer_warns_when_every_completion_is_empty(pair, texts, tmp_path, monkeypatch):
    """A scale at which the model ends every completion at once gets a warning line and a
    note in run.json (its scores describe a broken model)."""
    import sftscope.experiments.evaluate as E
    import sftscope.experiments.steer as S

    real = E.generate

    def gen(model, tok, prompts, **kw):
        got = real(model, tok, prompts, **kw)
        if "scale 3" in kw.get("description", ""):
            return [dataclasses.replace(g, completion="", new_tokens=0) for g in got]
        return got

    monkeypatch.setattr(E, "generate", gen)
    monkeypatch.setattr(S, "generate", gen)  # steer imports it at module level
    out = tmp_path / "run"
    steer(_cfg(pair, texts, out, layers="1", scales="0,3", generate=True, n_prompts=2,
               max_new_tokens=2, limit=4))
    notes = json.loads((out / "run.json").read_text())["notes"]
    assert any(n.startswith("scale 3: every completion is empty") for n in notes), notes
    assert not any(n.startswith("scale 0:") for n in notes)
