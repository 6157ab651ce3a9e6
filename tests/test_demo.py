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
    with pytest.raises(SystemExit) as e:
        main(["demo", "--moe", "--stages"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "not combined with --moe" in err and len(err.splitlines()) == 1


def test_demo_stages_quick_renders_the_chain(tmp_path):
    """--stages: DPO then GRPO after the SFT model, and analyze, weights (unchanged_frac) and
    probe over base -> SFT -> DPO -> GRPO, one series per stage in the figures."""
    pytest.importorskip("trl")
    out = tmp_path / "demo"
    res = run_demo(DemoConfig(out=str(out), quick=True, stages=True, skip=("swap", "sweep")))
    assert set(res.stages["runs"]) == {"dpo", "grpo"}
    for stage in ("dpo", "grpo"):
        rec = json.loads((out / "stages" / stage / "run.json").read_text())
        assert rec["objective"] == stage and rec["method"] == "full"
        assert rec["trl"]["reference"] == ("a second copy of the starting model"
                                           if stage == "dpo" else "none (beta 0)")
    pref = [json.loads(x) for x in (out / "stages" / "preference.jsonl").read_text().split("\n")
            if x]
    assert all(p["chosen"] != p["rejected"] and p["chosen"].rpartition("#### ")[0]
               == p["rejected"].rpartition("#### ")[0] for p in pref)
    w = pd.read_csv(out / "weights" / "weights.csv")
    assert {"pair", "pair:base-dpo", "pair:base-grpo", "pair:sft-dpo", "pair:dpo-grpo"} <= set(
        w["model"])
    assert "unchanged_frac" in set(w["metric"])
    for table, name in (("analyze", "metrics.csv"), ("probe", "probe.csv")):
        assert {"dpo", "grpo"} <= set(pd.read_csv(out / table / name)["model"]), table
    for fig in ("fig1_pair_metrics", "fig3_logit_lens", "fig4_weight_change"):
        runs = set(pd.read_csv(out / "figures" / f"{fig}.csv")["run"])
        assert any("[dpo]" in r for r in runs) and any("[grpo]" in r for r in runs), fig
    assert "unchanged_frac" in pd.read_csv(out / "figures" / "fig4_weight_change.csv")
    assert "DPO and GRPO" in (out / "report.html").read_text()
