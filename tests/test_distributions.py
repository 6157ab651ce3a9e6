"""Output distributions of a pair: KL by depth, KL to the final layer and URIAL's token-shift
shares, checked against an independent computation from the two models' lens logits."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sftscope.cli import main
from sftscope.experiments.lens import lens_logits, prepare_data, probe
from sftscope.load.arch import get_blocks
from sftscope.load.models import load_model, load_tokenizer

CHANGED = 2  # blocks below this one are the base's, bit for bit


@pytest.fixture(scope="module")
def upper_pair(model_dir, tmp_path_factory):
    """Base and an SFT that differs from it only in blocks >= CHANGED (norm, head and embeddings
    shared): every state j <= CHANGED is identical in the two."""
    base = model_dir("llama", seed=0)
    model = load_model(str(base))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b, block in enumerate(get_blocks(model)):
            if b >= CHANGED:
                for p in block.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    sft = tmp_path_factory.mktemp("upper") / "sft"
    model.save_pretrained(sft)
    load_tokenizer(str(base)).save_pretrained(sft)
    return base, sft


def _direct(base, sft, tok_set):
    """Per layer: summed KL(sft||base), KL(final||j) per model, shift counts, positions."""
    ma, mb = load_model(str(base)), load_model(str(sft))
    n_layers = len(get_blocks(ma)) + 1
    kl = np.zeros(n_layers)
    kfa, kfb = np.zeros(n_layers), np.zeros(n_layers)
    shift = np.zeros(3)
    n = 0
    for ids in tok_set.input_ids:
        x = torch.tensor([ids])
        la = [torch.log_softmax(t[0, :-1].double(), -1) for t in lens_logits(ma, x)]
        lb = [torch.log_softmax(t[0, :-1].double(), -1) for t in lens_logits(mb, x)]
        n += len(ids) - 1
        for j in range(n_layers):
            kl[j] += float((lb[j].exp() * (lb[j] - la[j])).sum())
            kfa[j] += float((la[-1].exp() * (la[-1] - la[j])).sum())
            kfb[j] += float((lb[-1].exp() * (lb[-1] - lb[j])).sum())
        top = lb[-1].argmax(-1)
        rank = (la[-1] > la[-1].gather(1, top[:, None])).sum(-1) + 1
        shift += [int((rank == 1).sum()), int(((rank > 1) & (rank <= 3)).sum()),
                  int((rank > 3).sum())]
    return kl / n, kfa / n, kfb / n, shift / n, n


def _values(df, model, metric):
    sel = df[(df.model == model) & (df.metric == metric)].sort_values("layer")
    return sel.value.to_numpy(), sel


def test_kl_and_shifts_equal_independent_computation(upper_pair, gsm8k_file):
    base, sft = upper_pair
    df = probe(data=f"gsm8k:{gsm8k_file}", base=str(base), sft=str(sft), n=6, batch_size=4,
               max_length=96, n_boot=50)
    tokz = load_tokenizer(str(base))
    _, tok_set, _ = prepare_data(f"gsm8k:{gsm8k_file}", tokz, n=6, seed=0, max_length=96,
                                 chat_template=False, text_field=None, template=None)
    kl, kfa, kfb, shift, n = _direct(base, sft, tok_set)
    got, rows = _values(df, "pair", "kl_pair")
    assert (rows.n == n).all()
    np.testing.assert_allclose(got, kl, rtol=1e-4, atol=1e-7)
    assert np.all(got[:CHANGED + 1] == 0.0)  # exactly: identical states and lenses
    assert np.all(got[CHANGED + 1:] > 0)
    assert ((rows.ci_low <= rows.value + 1e-12) & (rows.value <= rows.ci_high + 1e-12)).all()
    np.testing.assert_allclose(_values(df, "base", "kl_to_final")[0], kfa, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(_values(df, "sft", "kl_to_final")[0], kfb, rtol=1e-4, atol=1e-7)
    assert _values(df, "base", "kl_to_final")[0][-1] == 0.0
    top = df.layer.max()
    for k, kind in enumerate(("shift_unshifted", "shift_marginal", "shift_shifted")):
        v, r = _values(df, "pair", kind)
        assert list(r.layer) == [top]
        assert v[0] == pytest.approx(shift[k], abs=1e-12)


def test_self_pair_is_zero_and_padding_invariant(model_dir, gsm8k_file):
    path = str(model_dir("olmo2"))
    kw = dict(data=f"gsm8k:{gsm8k_file}", base=path, sft=path, n=8, max_length=64, n_boot=20)
    one, four = probe(batch_size=1, **kw), probe(batch_size=4, **kw)
    kl = one[one.metric == "kl_pair"]
    assert len(kl) and np.all(kl.value == 0.0)
    assert one[one.metric == "shift_unshifted"].value.item() == 1.0
    sel = one.metric.str.startswith(("kl_", "shift_"))
    np.testing.assert_allclose(one[sel].value, four[four.metric.str.startswith(("kl_", "shift_"))]
                               .value, rtol=1e-4, atol=1e-6)


def test_cli_writes_shifts_and_no_kl_keeps_one_model(upper_pair, gsm8k_file, tmp_path):
    base, sft = upper_pair
    out = tmp_path / "run"
    args = ["probe", "--base", str(base), "--sft", str(sft), "--data", f"gsm8k:{gsm8k_file}",
            "--limit", "4", "--bootstrap", "0", "--shifts-top", "3"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(out)])
    assert e.value.code == 0
    shifts = pd.read_csv(out / "shifts.csv")
    assert list(shifts.columns) == ["model", "token_id", "token", "count", "share",
                                    "mean_base_rank"]
    assert len(shifts) <= 3 and (shifts.mean_base_rank > 3).all()
    assert shifts["count"].is_monotonic_decreasing
    record = json.loads((out / "run.json").read_text())
    assert "kl_pair" in record["distributions"]
    table = pd.read_csv(out / "probe.csv")
    assert {"kl_pair", "kl_to_final", "shift_shifted"} <= set(table.metric)
    plain = probe(base=str(base), sft=str(sft), data=f"gsm8k:{gsm8k_file}", n=4, n_boot=0,
                  kl=False)
    assert not plain.metric.str.startswith(("kl_", "shift_")).any()
    with pytest.raises(SystemExit) as e:
        main([*args, "--shifts-top", "0"])
    assert e.value.code == 2


def test_report_finds_where_kl_leaves_zero(upper_pair, gsm8k_file, tmp_path):
    from sftscope.report import build_report

    base, sft = upper_pair
    run = tmp_path / "probe"
    probe(base=str(base), sft=str(sft), data=f"gsm8k:{gsm8k_file}", n=4, n_boot=20,
          out=str(run))
    html = build_report([run], out=tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Output distributions by depth (Fig. 3b)" in html
    assert (f"exactly 0 up to j = {CHANGED} and first positive at j = {CHANGED + 1}"
            in html)
    assert "URIAL" in html and (tmp_path / "figures" / "fig3b_distributions.png").is_file()


def _kl_rows(values, shift=(0.5, 0.25, 0.25)):
    rows = [{"layer": j, "model": "pair", "metric": "kl_pair", "value": v, "ci_low": np.nan,
             "ci_high": np.nan, "n": 10} for j, v in enumerate(values)]
    rows += [{"layer": len(values) - 1, "model": "pair", "metric": k, "value": v,
              "ci_low": np.nan, "ci_high": np.nan, "n": 10}
             for k, v in zip(("shift_unshifted", "shift_marginal", "shift_shifted"), shift)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("values,expected", [
    ([0.0, 0.0, 0.0, 0.2, 0.5], "exactly 0 up to j = 2 and first positive at j = 3; 0.500 nats "
                                "at the output (j = 4), largest 0.500 at j = 4"),
    ([0.1, 0.3, 0.2], "positive from j = 0; 0.200 nats at the output (j = 2), largest 0.300 "
                      "at j = 1"),
    ([0.0, 0.0, 0.0], "exactly 0 at every layer (0..2)"),
])
def test_distribution_findings_on_constructed_tables(values, expected):
    from sftscope.report import numbers as N
    from sftscope.report.sections import distribution_findings

    lines = distribution_findings(N.distribution_data(_kl_rows(values)))
    assert expected in lines[0]
    assert "first at 50.0 % of the scored positions, 2nd-3rd at 25.0 % and lower at 25.0 %" \
        in lines[1]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_moe_pairs_kl_tuned_lens_and_ablation(model_dir, gsm8k_file, family):
    """KL by depth, the tuned lens and ablation run on mixture-of-experts models too: a model
    against itself has KL exactly 0 everywhere; an ablated block's deltas are reported."""
    from sftscope.experiments.ablate import ablate

    a, b = str(model_dir(family, seed=0)), str(model_dir(family, seed=1))
    same = probe(base=a, sft=a, data=f"gsm8k:{gsm8k_file}", n=3, n_boot=0)
    assert (same[same.metric == "kl_pair"].value == 0).all()
    pair = probe(base=a, sft=b, data=f"gsm8k:{gsm8k_file}", n=3, n_boot=0, lens="tuned",
                 lens_steps=2, lens_train_limit=3)
    assert (pair[pair.metric == "kl_pair"].value > 0).any()
    assert (pair.model == "sft (tuned lens)").any()
    ab = ablate(model=a, data=f"gsm8k:{gsm8k_file}", n=3, n_boot=0, mode="mean")
    assert set(ab[ab.metric == "delta_loss"].unit) == {"b0", "b1", "b2", "b3"}
