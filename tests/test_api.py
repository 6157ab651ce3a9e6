"""The Python API on loaded models: capture_states, analyze_pair (== `sftscope analyze`),
a registered metric, errors naming the keyword argument, and docs/api.md run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

import sftscope
from sftscope import SftscopeError

TEXTS = [f"Question: what is {a} plus {b}?\nAnswer: {a + b}" for a, b in
         [(1, 2), (3, 4), (10, 5), (7, 7), (2, 9), (12, 30), (5, 5), (8, 1), (6, 3), (4, 4)]]
TEXTS.append("The quick brown fox jumps over the lazy dog " * 6)


@pytest.fixture(scope="module")
def pair(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    return (base, sft, AutoModelForCausalLM.from_pretrained(base),
            AutoModelForCausalLM.from_pretrained(sft), AutoTokenizer.from_pretrained(base))


def test_analyze_pair_equals_cli(pair, tmp_path):
    from sftscope.cli import main

    base, sft, mb, ms, tok = pair
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--base", str(base), "--sft", str(sft), "--data", str(data),
              "--text-field", "text", "--limit", "9", "--n-token", "4", "--bootstrap", "50",
              "--max-length", "24", "--batch-size", "3", "--device", "cpu", "--seed", "3",
              "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert e.value.code == 0
    cli = pd.read_csv(out / "metrics.csv")
    api = sftscope.analyze_pair(mb, ms, tok, TEXTS, limit=9, n_token=4, bootstrap=50,
                                max_length=24, batch_size=3, seed=3)
    assert list(api.columns) == list(cli.columns)
    assert list(api.index) == list(range(len(api)))  # a clean index
    assert len(api) == len(cli) and {"base", "sft", "pair"} == set(api.model)
    assert (api[["layer", "metric", "model"]].values == cli[["layer", "metric", "model"]].values
            ).all()
    for col in ("value", "ci_low", "ci_high"):  # the CSV keeps 17 significant digits
        assert api[col].to_numpy() == pytest.approx(cli[col].to_numpy(), rel=1e-12,
                                                    abs=1e-12, nan_ok=True)
    assert api.attrs["n_truncated"] >= 1  # the long text was cut at 24 tokens


def test_registered_metric_appears(pair):
    _, _, mb, ms, tok = pair
    sftscope.register_metric("top_sv", lambda z: torch.linalg.svdvals(z)[0])
    sftscope.register_metric("rms_gap", lambda a, b: (a - b).pow(2).mean().sqrt(), pair=True)
    try:
        t = sftscope.analyze_pair(mb, ms, tok, TEXTS[:4], n_token=0)
        st = sftscope.capture_states(mb, tok, TEXTS[:4], sample=None)
    finally:
        sftscope.unregister_metric("top_sv")
        sftscope.unregister_metric("rms_gap")
    # the user's numbers, on the states capture_states returns (same texts, as given order:
    # the top singular value and an RMS do not depend on the order)
    top = t[(t.metric == "top_sv") & (t.model == "base")].set_index("layer").value
    want = torch.linalg.svdvals(st.mean).select(-1, 0)
    assert top.to_numpy() == pytest.approx(want.double().numpy(), rel=1e-5)
    assert (t[t.metric == "rms_gap"].model == "pair").all()
    # one declaration with the built-ins: a delta row per layer, the report's spec
    assert len(t[(t.metric == "delta_top_sv") & (t.model == "pair")]) == st.mean.shape[0]
    assert len(t[t.metric == "rms_gap"]) == st.mean.shape[0]
    assert "top_sv" not in set(sftscope.analyze_pair(mb, ms, tok, TEXTS[:4], n_token=0).metric)


def test_capture_states_shapes_and_token_states(pair):
    _, _, mb, _, tok = pair
    st = sftscope.capture_states(mb, tok, TEXTS[:3], sample=1, max_length=16)
    n_layers = mb.config.num_hidden_layers + 1
    assert st.mean.shape == (n_layers, 3, mb.config.hidden_size) == st.last.shape
    assert st.tokens.shape == (n_layers, int(st.n_tokens[1]), mb.config.hidden_size)
    # pooled states are the token states' mean and last row, in the order given
    assert torch.allclose(st.mean[:, 1], st.tokens.mean(dim=1), atol=1e-5)
    assert torch.allclose(st.last[:, 1], st.tokens[:, -1], atol=1e-5)
    frame = st.norms()
    assert list(frame.columns) == ["layer", "sample", "norm"]
    assert list(frame.index) == list(range(n_layers * 3))


@pytest.mark.parametrize("kwargs,needle", [
    ({"n_token": -1}, "n_token must be at least 0"),
    ({"n_tokens": 5}, "n_tokens is not an option here (did you mean n_token?)"),
    ({"pooling": "max"}, "unknown pooling 'max'"),
    ({"bootstrap": "many"}, "bootstrap expects an integer"),
    ({"out": "x"}, "out is not an option here (models and texts are arguments"),
    ({"max_length": 1}, "max_length must be at least 2"),
])
def test_errors_name_the_argument(pair, kwargs, needle):
    _, _, mb, ms, tok = pair
    with pytest.raises(SftscopeError) as e:
        sftscope.analyze_pair(mb, ms, tok, TEXTS[:3], **kwargs)
    assert needle in str(e.value) and "--" not in str(e.value), str(e.value)


def test_bad_arguments(pair, model_dir):
    from transformers import AutoModelForCausalLM

    _, _, mb, ms, tok = pair
    with pytest.raises(SftscopeError, match=r"texts\[1\] is empty"):
        sftscope.analyze_pair(mb, ms, tok, ["a b", " "])
    with pytest.raises(SftscopeError, match="texts: give a list of strings"):
        sftscope.capture_states(mb, tok, "one text")
    with pytest.raises(SftscopeError, match="sft_model is a str"):
        sftscope.analyze_pair(mb, "folder", tok, TEXTS[:2])
    with pytest.raises(SftscopeError, match="sample 5 is outside texts"):
        sftscope.capture_states(mb, tok, TEXTS[:2], sample=5)
    deeper = AutoModelForCausalLM.from_pretrained(model_dir("llama", seed=0, n_layers=6))
    with pytest.raises(SftscopeError, match="base_model and sft_model differ"):
        sftscope.analyze_pair(mb, deeper, tok, TEXTS[:2])
    with pytest.raises(SftscopeError, match="built-in metric"):
        sftscope.register_metric("cka", lambda z: 0.0)


def test_docs_api_example_runs(model_dir, tmp_path, monkeypatch):
    """docs/api.md's code blocks, run in order with its two folders made by the tiny models."""
    import shutil

    doc = Path(__file__).resolve().parents[1] / "docs" / "api.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert blocks
    shutil.copytree(model_dir("llama", seed=0), tmp_path / "base")
    shutil.copytree(model_dir("llama", seed=1), tmp_path / "sft")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    try:
        for code in blocks:
            exec(compile(code, str(doc), "exec"), scope)  # noqa: S102 (our own docs)
    finally:
        sftscope.unregister_metric("top_sv")
