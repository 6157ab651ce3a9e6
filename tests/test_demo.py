"""``sftscope demo --quick`` end to end: every step, a report with every section, caching."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sftscope.cli import main
from sftscope.demo.run import STEPS, DemoConfig, run_demo
from sftscope.segments import masks_from_text

pytestmark = pytest.mark.slow

SECTIONS = ["Fig. 1", "Fig. 2", "Fig. 3", "Fig. 4", "Fig. 5", "Fig. 6", "Fig. 7",
            "Patterns of the paper"]


def test_demo_quick_end_to_end_and_cached(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    res = run_demo(DemoConfig(out=str(out), quick=True))
    assert set(res.runs) == set(STEPS) - {"report"}
    html = (out / "report.html").read_text()
    for s in SECTIONS:
        assert s in html, s
    assert html.count("<img") >= 8
    assert "src=\"http" not in html and "href=\"http" not in html
    rec = json.loads((out / "run.json").read_text())
    assert rec["command"] == "demo" and rec["seeds"]["demo"] == 0
    assert {"analyze", "weights", "probe", "swap", "sweep", "report", "total"} <= set(
        rec["timings"])
    assert len(rec["patterns"]) == 5 and all("evidence" in p for p in rec["patterns"])
    # Each step left an ordinary run folder that other commands read.
    assert not pd.read_csv(out / "analyze" / "metrics.csv").empty
    summary = masks_from_text(pd.read_csv(out / "sweep" / "summary.csv"))
    assert {"11111", "01000"} <= set(summary["mask"])
    assert (out / "sweep" / "suggest_validation.csv").exists()

    # Second run: the pair is cached and finished sweep jobs are not run again.
    import sftscope.experiments.sweep as S

    calls = []
    real = S.tune_and_evaluate
    monkeypatch.setattr(S, "tune_and_evaluate", lambda job: calls.append(job) or real(job))
    again = run_demo(DemoConfig(out=str(out), quick=True, skip=("probe", "swap")))
    assert again.pair["cached"] is True
    assert calls == []
    assert any(k.startswith("pair (cached)") for k in again.timings)


def test_demo_bad_skip_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--skip", "everything"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "unknown step" in err and len(err.splitlines()) == 1


def test_demo_moe_quick(tmp_path):
    """``demo --moe --quick``: a Mixtral pair trained here, routing drift, per-expert weight
    rows and the report's MoE figures; swap and the sweep left out."""
    out = tmp_path / "demo"
    res = run_demo(DemoConfig(out=str(out), quick=True, moe=True))
    assert set(res.runs) == {"analyze", "weights", "probe"}
    cfg = json.loads((out / "pair-moe" / "base" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4
    routing = pd.read_csv(out / "analyze" / "routing.csv")
    assert {"js_divergence", "topk_overlap", "load", "load_entropy"} == set(routing.metric)
    assert (routing[routing.metric == "js_divergence"].value > 0).all()
    weights = pd.read_csv(out / "weights" / "weights.csv")
    assert {"router", "experts", "expert"} <= set(weights.module)
    html = (out / "report.html").read_text()
    assert "Fig. 13" in html and "Router JS divergence is largest" in html
    assert "mixture-of-experts" in html
    for stem in ("fig13_routing_drift", "fig13b_expert_load", "fig13c_expert_weights"):
        assert (out / "figures" / f"{stem}.png").is_file(), stem


def test_demo_moe_family_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--moe", "--family", "olmo2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--moe trains a Mixtral pair" in err and len(err.splitlines()) == 1
