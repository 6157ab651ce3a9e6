"""Routing drift of mixture-of-experts pairs: ``routing.csv`` against an independent
computation from the models' router logits (``output_router_logits=True``), padding, caches,
shares, ``--router-input base`` and the pure routing metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from sftscope.capture.routing import RouterStore, RoutingTask, routing_shape
from sftscope.capture.stream import CaptureConfig, capture, merge_shards
from sftscope.experiments.analyze import AnalyzeConfig, analyze
from sftscope.load import data as D
from sftscope.load.arch import get_router
from sftscope.load.models import load_model
from sftscope.load.tiny import MOE_FAMILIES
from sftscope.metrics import routing as R

TEXTS = ["a b c d e f g h i j", "one two", "x y z 1 2 3", "hello there friend", "7 8",
         "the quick brown fox jumps"]


# ----------------------------------------------------------------------------- pure metrics


def test_js_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    torch.testing.assert_close(R.js_divergence(p, q),
                               torch.tensor([math.log(2), 0.0, 0.0], dtype=torch.float64))
    a, b = torch.softmax(torch.randn(5, 6), -1), torch.softmax(torch.randn(5, 6), -1)
    torch.testing.assert_close(R.js_divergence(a, b), R.js_divergence(b, a))
    m = 0.5 * (a + b)
    kl = lambda x, y: (x * (x / y).log()).sum(-1)  # noqa: E731
    torch.testing.assert_close(R.js_divergence(a, b).float(), 0.5 * kl(a, m) + 0.5 * kl(b, m))


def test_overlap_and_load():
    a = torch.tensor([[0, 1], [2, 3], [0, 3]])
    b = torch.tensor([[1, 0], [0, 1], [3, 2]])
    assert R.topk_overlap(a, b).tolist() == [1.0, 0.0, 0.5]
    assert R.load_shares(np.array([2, 2, 0, 0])).tolist() == [0.5, 0.5, 0.0, 0.0]
    assert R.load_entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert R.load_entropy(np.array([1.0, 0, 0])) == 0.0


def test_router_selection_and_slot_counts():
    """One home for reading a router's output and counting slots (capture and tune)."""
    logits = torch.tensor([[0.1, 2.0, 1.0, -1.0], [3.0, 0.0, 0.5, 0.2], [0.0, 0.1, 0.2, 0.3]])
    idx = torch.tensor([[1, 2], [0, 2], [3, 2]])
    for out in (logits, (logits,), (logits, torch.ones(3, 2), idx)):
        got_logits, sel = R.router_selection(out, 2)
        assert torch.equal(got_logits, logits) and sel.tolist() == idx.tolist()
    # a router's own choice is taken as it is (not re-derived from its logits)
    own = torch.tensor([[0, 3], [1, 2], [0, 1]])
    assert R.router_selection((logits, None, own), 2)[1].tolist() == own.tolist()
    assert R.slot_counts(idx, 4).tolist() == torch.bincount(idx.reshape(-1), minlength=4
                                                            ).tolist() == [1, 1, 3, 1]
    per_row = R.slot_counts(idx, 4, torch.tensor([0, 1, 1]), 2)
    assert per_row.tolist() == [[0, 1, 1, 0], [1, 0, 2, 1]]


# ----------------------------------------------------------------------------- helpers


def _data(tmp_path: Path) -> Path:
    f = tmp_path / "d.jsonl"
    f.write_text("".join(f'{{"text": "{t}"}}\n' for t in TEXTS))
    return f


def _cfg(base, sft, data, out, cache, **kw) -> AnalyzeConfig:
    kw = {"n_token": 2, "limit": len(TEXTS), "max_length": 32, "batch_size": 4, **kw}
    return AnalyzeConfig(base=str(base), sft=str(sft), data=str(data), out=str(out),
                         cache_dir=str(cache), **kw)


def _logits(path: Path, tokenizer, router_of: Path | None = None) -> list[list[torch.Tensor]]:
    """Per sample (alone, no padding), per sparse block: router logits ``[T, E]`` from
    ``output_router_logits``; with ``router_of``: that model's router weights applied to
    this model's router inputs instead."""
    model = load_model(str(path))
    blocks, _, _ = routing_shape(model.config)
    other = load_model(str(router_of)) if router_of is not None else None
    out = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :32]
        if other is None:
            with torch.no_grad():
                got = model(input_ids=ids, output_router_logits=True).router_logits
            out.append([got[b].float() for b in blocks])
            continue
        seen: dict[int, torch.Tensor] = {}
        hooks = [get_router(model, b).register_forward_hook(
            lambda _m, a, _o, b=b, seen=seen: seen.__setitem__(
                b, a[0].reshape(-1, a[0].shape[-1])))
            for b in blocks]
        with torch.no_grad():
            model(input_ids=ids)
        for h in hooks:
            h.remove()
        out.append([seen[b] @ get_router(other, b).weight.T for b in blocks])
    return out


def _expected(lb, ls, k: int) -> dict[tuple, float]:
    """Independent numbers: token-weighted means over every sample's tokens."""
    exp: dict[tuple, float] = {}
    n_blocks, e = len(lb[0]), lb[0][0].shape[-1]
    for i in range(n_blocks):
        pb = torch.cat([torch.softmax(s[i], -1) for s in lb]).double()
        ps = torch.cat([torch.softmax(s[i], -1) for s in ls]).double()
        m = (pb + ps) / 2
        js = 0.5 * (pb * (pb / m).log()).sum(-1) + 0.5 * (ps * (ps / m).log()).sum(-1)
        tb, ts = pb.topk(k).indices, ps.topk(k).indices
        ov = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(tb, ts)])
        exp[("js_divergence", i)] = float(js.mean())
        exp[("topk_overlap", i)] = float(ov.mean())
        for name, t in (("base", tb), ("sft", ts)):
            load = torch.bincount(t.reshape(-1), minlength=e).double() / t.numel()
            exp[("load_entropy", name, i)] = float(-(load[load > 0] * load[load > 0].log()).sum())
            for x in range(e):
                exp[("load", name, i, x)] = float(load[x])
    return exp


def _check(csv: pd.DataFrame, exp: dict[tuple, float], blocks: list[int]) -> None:
    for (metric, *rest), v in exp.items():
        if metric in ("js_divergence", "topk_overlap"):
            row = csv[(csv.metric == metric) & (csv.block == blocks[rest[0]])]
            assert set(row.model) == {"pair"}
        elif metric == "load_entropy":
            row = csv[(csv.metric == metric) & (csv.model == rest[0])
                      & (csv.block == blocks[rest[1]])]
        else:
            row = csv[(csv.metric == metric) & (csv.model == rest[0])
                      & (csv.block == blocks[rest[1]]) & (csv.expert == rest[2])]
        assert len(row) == 1, (metric, rest)
        assert float(row.value.iloc[0]) == pytest.approx(v, abs=1e-5), (metric, rest)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_csv_matches_router_logits(model_dir, tokenizer, tmp_path, family):
    """routing.csv equals the numbers computed from output_router_logits, sample by sample
    without padding, while analyze ran padded batches of 4."""
    base, sft = model_dir(family, seed=0), model_dir(family, seed=1)
    analyze(_cfg(base, sft, _data(tmp_path), tmp_path / "run", tmp_path / "c", bootstrap=50))
    csv = pd.read_csv(tmp_path / "run" / "routing.csv")
    assert list(csv.columns) == ["block", "expert", "metric", "model", "value", "ci_low",
                                 "ci_high"]
    blocks, e, k = routing_shape(load_model(str(base)).config)
    assert csv[csv.metric != "load"].expert.isna().all()
    _check(csv, _expected(_logits(base, tokenizer), _logits(sft, tokenizer), k), blocks)
    js = csv[csv.metric == "js_divergence"]
    assert (js.value > 0).all() and (js.ci_low <= js.value).all() and (js.value <= js.ci_high).all()
    load = csv[(csv.metric == "load")].groupby(["model", "block"]).value.sum()
    np.testing.assert_allclose(load.to_numpy(), 1.0, atol=1e-9)


def test_routing_self_pair_and_cache(model_dir, tokenizer, tmp_path):
    """A model against itself: JS 0, overlap 1. A second run reads every capture from the
    cache (same table); without the base's router store the base is captured again."""
    base = model_dir("qwen2_moe", seed=0)
    data = _data(tmp_path)
    analyze(_cfg(base, base, data, tmp_path / "a", tmp_path / "c"))
    csv = pd.read_csv(tmp_path / "a" / "routing.csv")
    assert (csv[csv.metric == "js_divergence"].value.abs() < 1e-12).all()
    assert (csv[csv.metric == "topk_overlap"].value == 1.0).all()
    sft = model_dir("qwen2_moe", seed=1)
    analyze(_cfg(base, sft, data, tmp_path / "b", tmp_path / "c"))
    first = pd.read_csv(tmp_path / "b" / "routing.csv")
    analyze(_cfg(base, sft, data, tmp_path / "b2", tmp_path / "c"))
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "b2" / "routing.csv"))
    for store in (tmp_path / "c").glob("router-*"):
        shutil.rmtree(store)
    analyze(_cfg(base, sft, data, tmp_path / "b3", tmp_path / "c", batch_size=2))
    pd.testing.assert_frame_equal(first, pd.read_csv(tmp_path / "b3" / "routing.csv"))
    run = json.loads((tmp_path / "b3" / "run.json").read_text())
    assert run["capture"]["base"]["cached"] is False and run["capture"]["sft"]["cached"]
    assert run["routing"]["router_input"] == "own" and run["routing"]["top_k"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_router_input_base(model_dir, tokenizer, tmp_path, family):
    """--router-input base: the SFT's routers on the base's router inputs."""
    base, sft = model_dir(family, seed=0), model_dir(family, seed=1)
    analyze(_cfg(base, sft, _data(tmp_path), tmp_path / "run", tmp_path / "c",
                 router_input="base"))
    csv = pd.read_csv(tmp_path / "run" / "routing.csv")
    blocks, _, k = routing_shape(load_model(str(base)).config)
    exp = _expected(_logits(base, tokenizer), _logits(base, tokenizer, router_of=sft), k)
    _check(csv, exp, blocks)


def test_routing_shares_merge_to_one_capture(model_dir, tokenizer, tmp_path):
    """Two shares of a capture (a data-parallel run) merge to the one-process routing sums;
    the store holds each sample's tokens whoever wrote them."""
    path = model_dir("mixtral", seed=0)
    model = load_model(str(path))
    blocks, e, k = routing_shape(model.config)
    tok = D.tokenize([D.Sample(t) for t in TEXTS], tokenizer, 32)
    cfg = CaptureConfig(batch_size=2, n_token=0, routing="record")

    def task(folder: str) -> RoutingTask:
        return RoutingTask("record", blocks, e, k, store=RouterStore(tmp_path / folder))

    whole = capture(model, tok, cfg, tokenizer.pad_token_id, routing=task("one"))
    parts = [capture(model, tok, cfg, tokenizer.pad_token_id, indices=idx, routing=task("two"))
             for idx in ([0, 1, 2, 3], [4, 5])]
    merged = merge_shards(parts, len(TEXTS))
    assert torch.equal(merged.routing["count"], whole.routing["count"])
    assert int(whole.routing["count"].sum()) == len(blocks) * k * sum(map(len, tok.input_ids))
    order = [5, 0, 3, 1, 2, 4]  # across the files of both shares
    a = RouterStore(tmp_path / "one").read(order)
    b = RouterStore(tmp_path / "two").read(order)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (len(blocks), sum(len(tok.input_ids[s]) for s in order), e)
    assert RouterStore(tmp_path / "two").complete(list(range(len(TEXTS))))
    assert not RouterStore(tmp_path / "two").complete([len(TEXTS)])


@pytest.mark.parametrize("mode", ["record", "compare"])
def test_routing_resume_is_exact(model_dir, tokenizer, tmp_path, monkeypatch, mode):
    """Interrupted after two batches, resumed with another batch size: the routing sums and
    the store equal an uninterrupted capture's (the checkpoint carries the routing buffers)."""
    from sftscope.capture.stream import partial_path
    from sftscope.errors import Interrupted

    base = load_model(str(model_dir("olmoe", seed=0)))
    sft = load_model(str(model_dir("olmoe", seed=1)))
    blocks, e, k = routing_shape(base.config)
    tok = D.tokenize([D.Sample(t) for t in TEXTS], tokenizer, 32)
    store = RouterStore(tmp_path / "base")
    capture(base, tok, CaptureConfig(batch_size=3, n_token=0), tokenizer.pad_token_id,
            routing=RoutingTask("record", blocks, e, k, store=store))
    model = base if mode == "record" else sft

    def task() -> RoutingTask:
        where = RouterStore(tmp_path / "again") if mode == "record" else store
        return RoutingTask(mode, blocks, e, k, store=where)

    full = capture(model, tok, CaptureConfig(batch_size=4, n_token=0), tokenizer.pad_token_id,
                   routing=task())
    path = tmp_path / "states.safetensors"
    real = type(model.model).forward
    calls = {"n": 0}

    def flaky(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **kw)

    monkeypatch.setattr(type(model.model), "forward", flaky)
    with pytest.raises(Interrupted):
        capture(model, tok, CaptureConfig(batch_size=2, n_token=0, checkpoint_every=1e9),
                tokenizer.pad_token_id, cache_path=path, routing=task())
    assert partial_path(path).exists()
    monkeypatch.undo()
    resumed = capture(model, tok, CaptureConfig(batch_size=1, n_token=0),
                      tokenizer.pad_token_id, cache_path=path, routing=task())
    assert resumed.info["resumed_samples"] == 4
    assert torch.equal(resumed.routing["count"], full.routing["count"])
    for name in full.routing:
        # other batches pad differently: float32 rounding of the states only
        torch.testing.assert_close(resumed.routing[name], full.routing[name], rtol=1e-5,
                                   atol=1e-7)
    if mode == "record":
        order = list(range(len(TEXTS)))
        got, want = RouterStore(tmp_path / "again").read(order), store.read(order)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("router_input", ["own", "base"])
def test_routing_chain(model_dir, tmp_path, router_input):
    """A chain: each stage against the base (pair, pair:base-LABEL) with its own load rows;
    a stage equal to the base has JS 0 whichever stream the routers read."""
    base, sft = model_dir("qwen3_moe", seed=0), model_dir("qwen3_moe", seed=1)
    analyze(_cfg(base, sft, _data(tmp_path), tmp_path / "run", tmp_path / "c",
                 stages=(f"same={base}",), router_input=router_input))
    csv = pd.read_csv(tmp_path / "run" / "routing.csv")
    assert set(csv.model) == {"base", "sft", "same", "pair", "pair:base-same"}
    js = csv[csv.metric == "js_divergence"]
    assert (js[js.model == "pair:base-same"].value.abs() < 1e-12).all()
    assert (js[js.model == "pair"].value > 0).all()
    load = csv[csv.metric == "load"].pivot_table(index=["block", "expert"], columns="model",
                                                 values="value")
    np.testing.assert_array_equal(load["same"], load["base"])


def test_stage_routing_differently_is_one_line(model_dir, tmp_path):
    from sftscope.errors import SftscopeError
    from sftscope.experiments.routing import check_same_routers

    a = load_model(str(model_dir("mixtral", seed=0))).config
    b = load_model(str(model_dir("mixtral", seed=0, n_experts=8))).config
    check_same_routers(routing_shape(a), {"sft": a})
    with pytest.raises(SftscopeError, match="sft routes differently from the base \\(4 sparse "
                       "blocks, 8 experts, top-2 vs 4 sparse blocks, 4 experts, top-2\\)"):
        check_same_routers(routing_shape(a), {"sft": b})
    with pytest.raises(SftscopeError, match="no routers"):
        check_same_routers(routing_shape(a), {"sft": load_model(str(model_dir("llama"))).config})


def test_routing_enters_the_key_only_when_set():
    assert "routing" not in CaptureConfig().key_fields()
    assert CaptureConfig(routing='{"mode": "record"}').key_fields()["routing"] == \
        '{"mode": "record"}'
