"""Report sections of the optimization view: training dynamics (Fig. 10), seed robustness of a
sweep (Fig. 7c) and steering (Fig. 11), from synthetic run folders."""

from __future__ import annotations

import html as H
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sftscope.report import numbers as N

MODULES = ("q", "k", "v", "o")


def _run_json(folder: Path, command: str, n_blocks: int, extra: dict | None = None,
              **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"command": command, "config": config, "n_blocks": n_blocks, **(extra or {})}
    (folder / "run.json").write_text(json.dumps(rec))
    return folder


def make_dynamics(folder: Path, n_blocks: int = 10, trained=range(2, 8), steps=(5, 10, 15),
                  method: str = "lora") -> Path:
    """A tune folder with dynamics.csv: the update grows with depth and time, the gradient
    with depth (the paper's picture)."""
    rows = []
    for s in steps:
        for b in range(n_blocks):
            for i, m in enumerate(MODULES):
                if b in trained:
                    rows.append((s, b, m, 0.1 * (b + 1) / (1 + i),
                                 0.01 * s * (b + 1) * (1 + 0.1 * i)))
                else:
                    rows.append((s, b, m, np.nan, 0.0))
    pd.DataFrame(rows, columns=["step", "block", "module", "grad_norm", "update_norm"]).to_csv(
        folder.mkdir(parents=True, exist_ok=True) or folder / "dynamics.csv", index=False)
    result = {"method": method, "mask": "01110", "blocks": list(trained), "n_blocks": n_blocks,
              "rank": None if method == "full" else 8, "trainable_params": 1000,
              "full_depth_params": 2000 if method == "full" else 1000, "steps": max(steps),
              "loss_history": [3.0, 2.5, 2.0]}
    return _run_json(folder, "tune", n_blocks, {"result": result, "method": method},
                     model="org/tiny-base", mask="01110", rank=64, logging_steps=5)


def make_weights(folder: Path, n_blocks: int = 10) -> Path:
    rows = [(b, "attn", m, 0.01 * (b + 1) ** 2) for b in range(n_blocks)
            for m in ("frobenius", "relative")]
    _run_json(folder, "weights", n_blocks, base="org/tiny-base", sft="org/tiny-base-SFT")
    pd.DataFrame(rows, columns=["block", "module", "metric", "value"]).to_csv(
        folder / "weights.csv", index=False)
    return folder


def make_sweep_jobs(folder: Path, seeds=(0, 1, 2), n_blocks: int = 10) -> Path:
    """A sweep folder with per-job result.json files (and its summary)."""
    means = {"11111": 0.30, "01000": 0.38, "10000": 0.22}
    offsets = {0: 0.0, 1: 0.02, 2: -0.03}
    for mask, v in means.items():
        for s in seeds:
            d = folder / "jobs" / f"{mask}-s{s}"
            d.mkdir(parents=True)
            bump = 0.05 if (mask == "10000" and s == 1) else 0.0
            (d / "result.json").write_text(json.dumps({
                "mask": mask, "seed": s, "scores": {"flexible_extract": v + offsets[s] + bump,
                                                    "strict_match": v - 0.1}}))
    rows = [(m, len(seeds), "flexible_extract", v, v - 0.05, v + 0.05, 50, np.nan)
            for m, v in means.items()]
    pd.DataFrame(rows, columns=["mask", "seeds", "trainable_params", "metric", "mean", "ci_low",
                                "ci_high", "n_items"]).to_csv(folder / "summary.csv",
                                                              index=False)
    return _run_json(folder, "sweep", n_blocks, {"primary_metric": "flexible_extract"},
                     model="org/tiny-base", segments=5)


def make_steer(folder: Path) -> Path:
    rows = []
    for s, loss in ((0.0, 2.0), (1.0, 1.9), (4.0, 2.6)):
        rows.append((s, "loss", loss, loss - 0.04, loss + 0.04, 50))  # apart: a winner
        rows.append((s, "new_tokens", 10 + s, 9 + s, 11 + s, 8))
    pd.DataFrame(rows, columns=["scale", "metric", "value", "ci_low", "ci_high", "n"]).to_csv(
        folder.mkdir(parents=True, exist_ok=True) or folder / "steer.csv", index=False)
    return _run_json(folder, "steer", 10, {"layer": 6, "vector": {"direction": "mean",
                                                                   "norm": 3.5}},
                     base="org/tiny-base", sft="org/tiny-base-SFT", layer=6)


def _text(path: Path) -> str:
    return re.sub(r"\s+", " ", H.unescape(re.sub(r"<[^>]+>", " ", path.read_text())))


def _not_blank(png: Path) -> None:
    from matplotlib.image import imread

    img = imread(str(png))
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.01, png


# ------------------------------------------------------------------ numbers


def test_dynamics_numbers_block_totals_and_summary(tmp_path):
    d = pd.read_csv(make_dynamics(tmp_path / "t") / "dynamics.csv")
    data = N.dynamics_data(d)
    f = data.frame
    assert set(f["step"]) == {15} and len(f) == 10
    b5 = f[f["block"] == 5].iloc[0]
    assert b5["update_norm"] == pytest.approx(0.01 * 15 * 6 * math.sqrt(
        sum((1 + 0.1 * i) ** 2 for i in range(4))))
    assert b5["grad_norm"] == pytest.approx(0.6 * math.sqrt(sum(1 / (1 + i) ** 2
                                                               for i in range(4))))
    assert f[f["block"] == 0]["grad_norm"].isna().all()
    assert (f[f["block"] == 0]["update_norm"] == 0).all()
    assert b5["rel_depth"] == pytest.approx(0.55)
    s = data.summary.iloc[0]
    assert (s["max_block"], s["first_trained"], s["last_trained"], s["n_trained"]) == (7, 2, 7, 6)
    assert s["grad_ratio"] == pytest.approx(8 / 3)
    assert s["most_module"] == "o" and s["least_module"] == "q"
    steps = data.extra["steps"]
    assert sorted(steps["step"].unique()) == [5, 10, 15] and len(steps) == 30


def test_seed_numbers(tmp_path):
    from sftscope.report.runs import load_run

    run = load_run(make_sweep_jobs(tmp_path / "sw"))
    t = run.tables["seed_scores"]
    assert len(t) == 3 * 3 * 2 and set(t["mask"]) == {"11111", "01000", "10000"}
    data = N.seed_data(t, {"run": "flexible_extract"})
    assert set(data.frame["metric"]) == {"flexible_extract"}
    s = data.summary.set_index("mask")
    assert s.loc["01000", "seeds"] == 3
    assert s.loc["01000", "mean"] == pytest.approx(0.38 - 0.01 / 3)
    assert s.loc["01000", "sd"] == pytest.approx(np.std([0.38, 0.40, 0.35], ddof=1))
    r = data.extra["runs"].iloc[0]
    assert r["best"] == "01000" and r["best_in"] == 3 and r["n_common"] == 3
    assert r["most_variable"] == "10000" and r["full"] == "11111"
    assert r["gap"] == pytest.approx(0.08)
    one = N.seed_data(t[t["seed"] == 0])
    assert one.empty  # one seed per mask: nothing to spread


# ------------------------------------------------------------------ the report


def test_report_sections_dynamics_seeds_steer(tmp_path):
    from sftscope.report import build_report

    runs = [make_dynamics(tmp_path / "lora"),
            make_dynamics(tmp_path / "full", method="full", trained=range(4, 10)),
            make_weights(tmp_path / "w"), make_sweep_jobs(tmp_path / "sweep"),
            make_steer(tmp_path / "steer")]
    out = build_report(runs, out=tmp_path / "r.html", figures_dir=tmp_path / "figs")
    text = _text(out)
    for heading in ("Training dynamics by depth (Fig. 10", "Seed robustness of the sweep "
                    "(Fig. 7c)", "Steering along the base -> SFT shift (Fig. 11)"):
        assert heading in text
    assert "No training dynamics" not in text and "No steering results" not in text
    for stem in ("fig10_dynamics", "fig10b_grad_heatmap", "fig7c_seed_spread", "fig11_steer"):
        _not_blank(tmp_path / "figs" / f"{stem}.png")
    assert "[tiny-base (lora)] At step 15 (the last of 3 recorded), the update is largest at " \
           "block 7 (relative depth 0.75, 2.773); 6 of 10 blocks trained (blocks 2-7)" in text
    assert "(2.67x)" in text
    assert "base -> SFT attn relative change (beside, dashed) is largest at relative depth " \
           "0.95" in text
    assert "flexible_extract over seeds: best mask by mean 01000 (0.377, sd 0.025), also the " \
           "best in 3 of the 3 seeds every mask has" in text
    assert "the most seed-sensitive mask is 10000" in text
    assert "At hidden state j = 6 of 10 (mean vector, norm 3.500): loss is best at scale " \
           "1.00 (1.900, -0.1000 vs the unsteered base 2.000; intervals apart, no per-item " \
           "scores for a paired test)" in text
    assert "new_tokens goes from 10.000 at scale 0.00 to 14.000 at scale 4.00" in text
    assert "[tiny-base (full)] full fine-tuning, mask 01110" in text
    assert "of all blocks' parameters" in text
    t = pd.read_csv(tmp_path / "figs" / "fig10_dynamics.csv")
    assert {"run", "step", "block", "grad_norm", "update_norm", "rel_depth"} <= set(t.columns)
    assert len(t) == 20
    seeds = pd.read_csv(tmp_path / "figs" / "fig7c_seed_spread.csv")
    assert set(seeds["mask"]) == {"m11111", "m01000", "m10000"}


def test_sections_absent_without_their_tables(tmp_path):
    from sftscope.report import build_report

    sweep = make_sweep_jobs(tmp_path / "sweep", seeds=(0,))
    out = build_report([sweep], out=tmp_path / "r.html", figures_dir=tmp_path / "figs")
    text = _text(out)
    assert "No sweeps with two or more seeds per mask in these runs" in text
    assert "No training dynamics in these runs (needs dynamics.csv (`sftscope tune`))" in text
    assert "No steering results in these runs" in text
    assert not (tmp_path / "figs" / "fig7c_seed_spread.png").exists()
