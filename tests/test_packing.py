"""Packed (padding-free) training batches: the per-token loss of a packed batch equals the
padded loss of the same examples, models that honour packing are detected, and tune records
what it did."""

from __future__ import annotations

import json

import pytest
import torch

from sftscope.errors import SftscopeError
from sftscope.experiments import tune as TU
from sftscope.experiments.packing import (
    PackCollator,
    PerExampleAttention,
    choose_packing,
    packing_collator,
    packing_exact,
)
from sftscope.load.models import load_model


def _examples(n: int = 4):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + 7 * i  # ragged: 5, 12, 19, 26 tokens
        ids = torch.randint(3, 200, (length,), generator=gen).tolist()
        labels = [-100] * (i + 1) + ids[i + 1:]  # a prompt of i + 1 tokens masked
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2", "qwen2"])
def test_packed_loss_equals_padded_loss(model_dir, family):
    model = load_model(str(model_dir(family)))
    ex = _examples()
    packed = packing_collator(0)(ex)
    assert packed["input_ids"].shape == (3, 26)  # 26 | 19 + 5 | 12: first fit, longest first
    pad = TU.PadCollator(0)(ex)
    with torch.no_grad():
        a = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                  labels=packed["labels"], use_cache=False).loss
        b = model(**pad, use_cache=False).loss
    assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-6)
    ok, diff = packing_exact(model, ex, 0)
    assert ok and diff < 1e-4
    with PerExampleAttention(model) as attention:  # one row, attention per example
        one = packing_collator(0, per_example=attention.active)(ex)
        with torch.no_grad():
            c = model(input_ids=one["input_ids"], position_ids=one["position_ids"],
                      labels=one["labels"], use_cache=False).loss
            d = model(**pad, use_cache=False).loss  # padded batches stay plain sdpa
    assert float(c) == pytest.approx(float(b), rel=1e-5, abs=1e-6)
    assert float(d) == pytest.approx(float(b), rel=1e-6, abs=1e-7)
    assert model.config._attn_implementation == "sdpa"  # as loaded, after


@pytest.mark.parametrize("family", ["llama", "gpt2", "olmo2", "qwen2", "mistral"])
def test_tune_chooses_per_example_attention_where_it_runs(model_dir, family):
    """The layout follows what the check saw: one row per micro-batch where attention ran per
    example, else (a sliding-window model) rows of the longest example."""
    model = load_model(str(model_dir(family)))
    with PerExampleAttention(model) as attention:
        packer, why = choose_packing("auto", model, _examples(), 0, micro_batch=4,
                                     attention=attention)
        assert packer is not None and why.startswith("on:"), why
        assert packer.one_row is attention.active
        assert ("attention per example" in why) is attention.active
        assert attention.active is (family != "mistral")  # a sliding window: masked rows
    assert model.config._attn_implementation == "sdpa"


def test_a_model_that_ignores_packing_is_detected(model_dir, monkeypatch):
    model = load_model(str(model_dir("llama")))
    forward = model.forward

    def no_position_ids(*args, **kwargs):  # a model that would attend across examples
        kwargs.pop("position_ids", None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", no_position_ids)
    ok, diff = packing_exact(model, _examples(2), 0)
    assert not ok and diff > 1e-3
    with PerExampleAttention(model) as attention:  # per-example attention is never reached
        packer, why = choose_packing("auto", model, _examples(), 0, micro_batch=4,
                                     attention=attention)
        assert packer is None and "does not honour" in why and not attention.active
    with pytest.raises(SftscopeError, match="--packing on"):
        choose_packing("on", model, _examples(), 0, micro_batch=4)
    assert choose_packing("auto", model, _examples(), 0, micro_batch=1) == (
        None, "off: one example per forward pass has no padding to save")
    assert choose_packing("off", model, _examples(), 0, micro_batch=4)[0] is None


def test_tune_packs_by_default_and_matches_padded_training(model_dir, gsm8k_file, tmp_path):
    base = model_dir("llama", n_layers=4)
    kw = dict(rank=4, batch_size=4, micro_batch_size=4, max_steps=4, lr=5e-3,
              logging_steps=1, save_steps=100, run_eval=False, n_train=None, dropout=0.0,
              mask="0110")
    runs = {}
    for mode in ("auto", "off"):
        out = tmp_path / mode
        runs[mode] = TU.tune(TU.TuneConfig(model=str(base), train=f"gsm8k:{gsm8k_file}",
                                           out=str(out), packing=mode, **kw))
        rec = json.loads((out / "run.json").read_text())
        assert rec["packing"]["used"] is (mode == "auto"), rec["packing"]
        assert ("attention per example" in rec["packing"]["reason"]) is (mode == "auto")
    a, b = runs["auto"].loss_history, runs["off"].loss_history
    assert a == pytest.approx(b, rel=1e-4)  # the same training, without the padding


def test_rows_first_fit_decreasing_and_layout():
    c = PackCollator(9)
    assert c.rows([5, 12, 19, 26]) == [[3], [2, 0], [1]]
    assert c.rows([4, 4, 4, 4]) == [[0], [1], [2], [3]]
    b = c([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
           {"input_ids": [4, 5], "labels": [4, 5]}, {"input_ids": [6], "labels": [6]}])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert b["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    one = PackCollator(9, one_row=True)([{"input_ids": [1, 2], "labels": [1, 2]},
                                         {"input_ids": [3], "labels": [3]}])
    assert one["input_ids"].tolist() == [[1, 2, 3]] and one["position_ids"].tolist() == [
        [0, 1, 0]]


def test_per_example_sdpa_matches_a_block_diagonal_mask():
    from sftscope.experiments.packing import per_example_sdpa

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=gen) for _ in range(3))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 0]])
    seg = (pos != torch.cat([pos[:, :1] - 1, pos[:, :-1]], 1) + 1).cumsum(1)
    same = seg[:, :, None] == seg[:, None, :]
    mask = (same & torch.ones(7, 7, dtype=torch.bool).tril())[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    module = torch.nn.Module()
    got, _ = per_example_sdpa(module, q, k, v, None, position_ids=pos)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-6)
    masked, _ = per_example_sdpa(module, q, k, v, mask, position_ids=pos)  # a mask: plain sdpa
    assert torch.allclose(masked, want.transpose(1, 2), atol=1e-6)
