"""A metric is one function with one declaration: registered in a test, it is captured, gets
its rows and ``delta_`` rows in metrics.csv, and the report's figures and tables show it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sftscope import metric_registry as MR
from sftscope import metrics as M
from sftscope.experiments.analyze import AnalyzeConfig, analyze
from sftscope.report import numbers as N
from sftscope.report import plots


@pytest.fixture
def plugin_metrics():
    """Three test metrics, one per level, removed again after the test."""

    @MR.register_metric("test_token_norm", level="token", order=120, label="mean token norm",
                        bounds=(0.0, None))
    def token_norm(batch: M.TokenBatch) -> torch.Tensor:
        norms = torch.linalg.vector_norm(batch.h64, dim=-1) * batch.mask
        return norms.sum(dim=1) / batch.mask.sum(dim=1).clamp_min(1)

    @MR.register_metric("test_max_abs", level="dataset", order=130, label="max |z|")
    def max_abs(layer: M.PooledLayer) -> float:
        return float(layer.z64.abs().max())

    @MR.register_metric("test_gap", level="pair", kind="pair", order=60, label="max row gap")
    def gap(p: M.PooledPair) -> float:
        return float((p.zs.double() - p.zb.double()).norm(dim=-1).max())

    yield ("test_token_norm", "test_max_abs", "test_gap")
    for name in ("test_token_norm", "test_max_abs", "test_gap"):
        MR.unregister_metric(name)
    assert "test_gap" not in MR.metric_names("pair")


def test_registered_metric_values():
    z = torch.tensor([[3.0, -4.0], [1.0, 0.0], [0.0, 2.0]])
    assert "effective_rank" in M.dataset_metric_names()
    assert M.dataset_metrics(z)["spectral_norm"] == pytest.approx(M.spectral_norm(z))
    assert set(M.pair_metrics(z, z)) >= {"cka", "cosine_similarity", "mean_shift"}
    assert M.pair_metrics(z, z)["mean_shift"] == 0.0


def test_registered_metric_reaches_every_table_and_figure(plugin_metrics, model_dir,
                                                          gsm8k_file, tmp_path):
    token, dataset, pair = plugin_metrics
    assert token in M.token_metric_names() and dataset in M.dataset_metric_names()
    h = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [9.0, 9.0]]])
    got = M.token_metrics_batch(h, torch.tensor([[True, True, False]]))
    assert float(got[token][0]) == pytest.approx(3.0)  # (5 + 1) / 2, padding ignored
    base, sft = model_dir("llama", seed=0), model_dir("llama", seed=1)
    cfg = AnalyzeConfig(base=str(base), sft=str(sft), data=f"gsm8k:{gsm8k_file}",
                        out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"), n_token=4,
                        limit=6, max_length=40, batch_size=3)
    analyze(cfg)
    csv = pd.read_csv(tmp_path / "run" / "metrics.csv")
    for model in ("base", "sft"):
        assert {token, dataset} <= set(csv[csv.model == model].metric)
    assert {pair, f"delta_{token}", f"delta_{dataset}"} <= set(csv[csv.model == "pair"].metric)
    assert MR.metric_spec(dataset).label == "max |z|" and MR.metric_spec(pair).kind == "pair"
    # Fig. 2 draws every single-model metric of the table (none cut), Fig. 1 every pair metric
    single = N.single_data(csv)
    names = single.extra["names"]
    assert set(names) == set(csv[csv.model.isin(["base", "sft"])].metric)
    assert {token, dataset, "sparsity", "curvature"} <= set(names)
    assert set(single.frame["metric"]) == set(names)
    fig = plots.plot_single_metrics(csv)
    titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
    assert len(titles) == len(names) and "mean token norm" in titles
    assert pair in N.pair_data(csv).extra["names"]
