"""Report: synthetic run folders of every command -> one self-contained HTML with every figure."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sftscope.errors import SftscopeError
from sftscope.segments import PAPER_MASKS, masks_as_text, masks_from_text, segment_bounds

SECTIONS = [
    "Base vs SFT similarity by depth (Fig. 1)",
    "Single-model metrics by depth (Fig. 2)",
    "Logit lens: next-token prediction by depth (Fig. 3)",
    "Weight change by block (Fig. 4)",
    "Correlation of metrics across layers (Fig. 5)",
    "Layer swapping (Fig. 6)",
    "Segment LoRA sweep (Fig. 7)",
    "Evaluation scores",
    "Patterns of the paper",
    "Run configuration",
]
FIGURES = ["fig1_pair_metrics", "fig2_single_metrics", "fig3_logit_lens", "fig4_weight_change",
           "fig4b_weight_modules", "fig5_correlation", "fig6_swap", "fig7_sweep",
           "fig7b_inverted_u"]
PAIRS = {16: ("allenai/OLMo-2-0425-1B", "allenai/OLMo-2-0425-1B-SFT"),
         32: ("allenai/OLMo-2-1124-7B", "allenai/OLMo-2-1124-7B-SFT")}
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.I)


# ----------------------------------------------------------------------------- synthetic runs


def _run_json(folder: Path, command: str, n_blocks: int | None, extra: dict | None = None,
              **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rec = {"command": command, "argv": ["sftscope", command], "config": config,
           "versions": {"python": "3.11", "sftscope": "0.1.0", "torch": "2.5.0"},
           "created": "2026-01-01T00:00:00", **(extra or {})}
    if n_blocks is not None:
        rec["n_blocks"] = n_blocks
    (folder / "run.json").write_text(json.dumps(rec))


def _ids(n_blocks: int) -> dict:
    base, sft = PAIRS[n_blocks]
    return {"base": base, "sft": sft}


def make_analyze(folder: Path, n_blocks: int, paper_like: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    _run_json(folder, "analyze", n_blocks, dataset="gsm8k", **_ids(n_blocks))
    rows = []
    for j in range(n_blocks + 1):
        x = j / n_blocks
        late = max(0.0, (x - 0.8) / 0.2)
        drop = 0.3 if n_blocks <= 16 else 0.4  # deeper model: larger drop at the top
        cka = 0.995 - 0.002 * x - drop * late**2 if paper_like else 0.9 - 0.01 * x
        pair = {"cka": cka, "cosine_similarity": 0.99 - 0.25 * late**2,
                "mean_shift": 0.5 + 40 * late**3 + rng.uniform(0, 0.05)}
        for m, v in pair.items():
            rows.append((j, m, "pair", v, v - 0.01, v + 0.01))
        for model, f in (("base", 1.0), ("sft", 1.03)):
            single = {"effective_rank_norm": f * (0.2 + 0.5 * np.sin(np.pi * x) ** 0.5),
                      "effective_rank": f * 300 * (0.2 + 0.5 * np.sin(np.pi * x) ** 0.5),
                      "prompt_entropy": f * (0.6 + 0.2 * x),
                      "dataset_entropy": f * (0.7 - 0.1 * x),
                      "spectral_norm": f * (10 + 600 * late**3),
                      "condition_number": f * (1e4 * (1 - 0.9 * np.sin(np.pi * x)))}
            for m, v in single.items():
                rows.append((j, m, model, v, np.nan, np.nan))
    pd.DataFrame(rows, columns=["layer", "metric", "model", "value", "ci_low", "ci_high"]) \
        .to_csv(folder / "metrics.csv", index=False)
    names = ["cka", "cosine_similarity", "mean_shift", "effective_rank_norm", "spectral_norm"]
    corr = []
    for model in ("base", "sft", "pair"):
        for i, a in enumerate(names):
            for b in names[i:]:
                r = 1.0 if a == b else float(np.tanh(rng.normal(0, 1)))
                corr += [(model, a, b, r)] + ([(model, b, a, r)] if a != b else [])
    df = pd.DataFrame(corr, columns=["model", "metric_a", "metric_b", "r"])
    df.to_csv(folder / "correlation.csv", index=False)
    return folder


def make_weights(folder: Path, n_blocks: int, j_shaped: bool = True) -> Path:
    _run_json(folder, "weights", n_blocks, **_ids(n_blocks))
    rows = []
    for b in range(n_blocks):
        x = (b + 0.5) / n_blocks
        rel = (0.05 + 0.08 * x**3) * (1 if n_blocks <= 16 else 1.15) if j_shaped else 0.08
        for mod, f in (("attn", 1.0), ("q", 1.1), ("k", 0.9), ("v", 1.2), ("o", 0.8),
                       ("mlp", 0.7)):
            rows.append((b, mod, "relative", rel * f))
            rows.append((b, mod, "frobenius", rel * f * 40))
            rows.append((b, mod, "stable_rank", 3.0))
    rows.append(("", "embed", "relative", 0.01))
    rows.append(("", "lm_head", "relative", 0.02))
    pd.DataFrame(rows, columns=["block", "module", "metric", "value"]).to_csv(
        folder / "weights.csv", index=False)
    return folder


def make_probe(folder: Path, n_blocks: int, sharp: bool = True) -> Path:
    _run_json(folder, "probe", n_blocks, dataset="mmlu", **_ids(n_blocks))
    rows = []
    for j in range(n_blocks + 1):
        x = j / n_blocks
        top = 0.6 if n_blocks <= 16 else 0.7
        acc = 0.01 + top * max(0.0, (x - 0.8) / 0.2) ** 1.5 if sharp else 0.6 * x
        for model, f in (("base", 0.9), ("sft", 1.0)):
            a = acc * f
            rows.append((j, model, "accuracy", a, a - 0.02, a + 0.02, 500))
            rows.append((j, model, "loss", 10 - 7 * a / 0.6, np.nan, np.nan, 500))
            rows.append((j, model, "answer_rank", 5000 * (1 - a) ** 8 + 1, np.nan, np.nan, 50))
        rows.append((j, "pair", "agreement", 0.3 + 0.6 * x, np.nan, np.nan, 500))
    pd.DataFrame(rows, columns=["layer", "model", "metric", "value", "ci_low", "ci_high", "n"]) \
        .to_csv(folder / "probe.csv", index=False)
    return folder


def make_swap(folder: Path, n_blocks: int, inverted_u: bool = True) -> Path:
    """As ``sftscope swap`` writes it: originals (direction none, mask 00000), hybrids."""
    _run_json(folder, "swap", n_blocks, data="mmlu", segments=5, head="base", **_ids(n_blocks))
    cols = ["config", "direction", "mask", "head", "metric", "value", "ci_low", "ci_high", "n"]
    rows = []
    refs = {"base": 0.520, "sft": 0.540}
    for k, v in refs.items():
        rows.append((k, "none", "00000", k, "accuracy", v, v - 0.01, v + 0.01, 1000))
        rows.append((k, "none", "00000", k, "loss", 3 - v, 2.9 - v, 3.1 - v, 1000))
    shape = [-0.004, 0.002, 0.003, 0.001, -0.006] if inverted_u else [
        0.004, -0.002, -0.003, -0.001, 0.006]
    half = 0.002  # CI half-width: the effect (0.007) is outside the noise
    for direction, host, donor in (("sft-into-base", "base", "sft"),
                                   ("base-into-sft", "sft", "base")):
        masks = ["".join("1" if j == i else "0" for j in range(5)) for i in range(5)]
        for mask in [*masks, "01110"] + (["00000"] if donor == "base" else []):
            d = shape[masks.index(mask)] if mask in masks else 0.002
            v = refs[host] + d
            cfg = f"{host}<-{donor}[{mask}]"
            rows.append((cfg, direction, mask, "base", "accuracy", v, v - half, v + half, 1000))
            rows.append((cfg, direction, mask, "base", "loss", 3 - v, 3 - v - half,
                         3 - v + half, 1000))
    pd.DataFrame(rows, columns=cols).to_csv(folder / "swap.csv", index=False)
    return folder


def make_sweep(folder: Path, n_blocks: int, paper_like: bool = True) -> Path:
    _run_json(folder, "sweep", n_blocks, {"primary_metric": "flexible"},
              model=PAIRS[n_blocks][0], segments=5, rank=64)
    paper = {"11111": 0.28, "10000": 0.22, "01000": 0.375, "00100": 0.31, "00010": 0.27,
             "00001": 0.135, "01100": 0.33, "00110": 0.30, "01110": 0.32}
    flat = {m: 0.30 - 0.01 * i for i, m in enumerate(PAPER_MASKS[5])}
    scores = paper if paper_like else flat
    rows = []
    for m in PAPER_MASKS[5]:
        v = scores[m]
        n_active = sum(hi - lo for bit, (lo, hi) in zip(m, segment_bounds(n_blocks, 5))
                       if bit == "1")
        p = np.nan if m == "11111" else 0.04
        rows.append((m, "0;1;2", 1_000_000 * n_active // n_blocks, "strict", v, v - 0.03,
                     v + 0.03, 1319, p))
        rows.append((m, "0;1;2", 1_000_000 * n_active // n_blocks, "flexible", v + 0.02,
                     v - 0.01, v + 0.05, 1319, p))
    pd.DataFrame(rows, columns=["mask", "seeds", "trainable_params", "metric", "mean",
                                "ci_low", "ci_high", "n_items", "p_value"]).to_csv(
        folder / "summary.csv", index=False)
    return folder


def make_scores(folder: Path, command: str, n_blocks: int) -> Path:
    _run_json(folder, command, n_blocks, model=PAIRS[n_blocks][1], tasks=["gsm8k", "mmlu"])
    pd.DataFrame([("gsm8k", "strict", 0.28, 0.26, 0.30, 1319),
                  ("gsm8k", "flexible", 0.31, 0.29, 0.33, 1319),
                  ("mmlu", "accuracy", 0.52, 0.51, 0.53, 14042)],
                 columns=["task", "metric", "value", "ci_low", "ci_high", "n"]).to_csv(
        folder / "scores.csv", index=False)
    (folder / "predictions-gsm8k.jsonl").write_text('{"id": 0}\n')
    return folder


def make_all(root: Path) -> list[Path]:
    runs = []
    for L in (16, 32):
        runs += [make_analyze(root / f"analyze{L}", L, seed=L), make_weights(root / f"w{L}", L),
                 make_probe(root / f"probe{L}", L), make_swap(root / f"swap{L}", L)]
    runs += [make_sweep(root / "sweep32", 32), make_scores(root / "eval16", "eval", 16)]
    # A demo folder: run.json of its own and one sub-folder per step; a tune run with scores.
    demo = root / "demo"
    _run_json(demo, "demo", None)
    make_sweep(demo / "sweep", 16)
    make_scores(demo / "tune", "tune", 16)
    runs.append(demo)
    return runs


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    from sftscope.report import build_report

    root = tmp_path_factory.mktemp("runs")
    runs = make_all(root)
    out = build_report(runs, out=root / "out" / "report.html")
    return root, runs, out


# ----------------------------------------------------------------------------- tests


def _assert_not_blank(png: Path) -> None:
    from matplotlib.image import imread

    img = imread(str(png))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0.01, f"{png} looks blank"


def test_full_report_has_every_section_and_figure(full_report):
    root, runs, out = full_report
    html = out.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert heading in html, heading
    assert "No swap results" not in html and "No mask-sweep" not in html
    n_img = len(re.findall(r"<img\b", html))
    assert n_img == len(FIGURES)
    assert html.count("data:image/png;base64,") == len(FIGURES)
    assert not EXTERNAL.search(html)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert "<details" in html and "findings" in html.lower()
    # Legend names come from the configs; both depths appear.
    assert "OLMo-2-0425-1B" in html and "OLMo-2-1124-7B" in html
    figdir = root / "out" / "figures"  # beside the report, not in a run folder it reads
    assert not (runs[0] / "figures").exists()
    for stem in FIGURES:
        _assert_not_blank(figdir / f"{stem}.png")
    for stem in ("fig1_pair_metrics", "fig4_weight_change", "fig6_swap", "fig7_sweep",
                 "eval_scores", "paper_patterns"):
        assert (figdir / f"{stem}.csv").is_file()
    t = pd.read_csv(figdir / "fig1_pair_metrics.csv")
    assert {"run", "layer", "rel_depth", "cka", "cka ci_low"} <= set(t.columns)
    assert t["rel_depth"].max() == pytest.approx(1.0) and len(t) == 17 + 33
    w = pd.read_csv(figdir / "fig4_weight_change.csv")
    assert w["rel_depth"].min() == pytest.approx(0.5 / 32)
    scores = pd.read_csv(figdir / "eval_scores.csv")
    assert set(scores["task"]) == {"gsm8k", "mmlu"} and len(scores) == 6  # eval + demo's tune
    sweep = pd.read_csv(figdir / "fig7_sweep.csv")  # masks stay text: m01000
    assert "m01000" in set(sweep["mask"])
    assert "01000" in set(masks_from_text(sweep)["mask"])


def test_findings_numbers(full_report):
    _, _, out = full_report
    html = out.read_text(encoding="utf-8")
    assert "CKA is at least 0.994 over the first 80 % of depth" in html
    assert "falls to 0.693 at the top" in html
    assert re.search(r"weight change is largest at block 31 \(relative depth 0\.98", html)
    assert "flexible: best mask 01000 0.395" in html
    # every verdict is printed with its rule and the numbers it was applied to
    text = _text(html)
    assert "rule: J-shape: mean relative change of the top 20% of blocks >= 1.5x" in text
    assert "here: [OLMo-2-0425-1B vs ...-SFT] attn relative: bottom 0.050" in text
    assert html.count('<span class="ok">yes</span>') == 5 and '<span class="na">' not in html


def test_analyze_only_marks_other_sections_absent(tmp_path):
    from sftscope.report import build_report

    run = make_analyze(tmp_path / "a", 16)
    out = build_report([run], formats="png,pdf")
    assert out == run / "report.html"
    assert (run / "figures" / "fig1_pair_metrics.pdf").read_bytes()[:5] == b"%PDF-"
    html = out.read_text(encoding="utf-8")
    for heading in SECTIONS:
        assert heading in html
    assert "No swap results in these runs" in html
    assert "No logit-lens (probe) results" in html
    assert "No weight-change results" in html
    assert "No mask-sweep results" in html
    assert "No evaluation scores" in html
    assert len(re.findall(r"<img\b", html)) == 3  # Fig. 1, 2, 5
    _assert_not_blank(run / "figures" / "fig1_pair_metrics.png")


def test_paper_patterns_hold_on_paper_like_data(tmp_path):
    from sftscope.report import paper_patterns

    runs = [make_analyze(tmp_path / "a", 32), make_weights(tmp_path / "w", 32),
            make_probe(tmp_path / "p", 32), make_swap(tmp_path / "s", 32),
            make_sweep(tmp_path / "sw", 32)]
    pats = paper_patterns(runs)
    assert len(pats) == 5
    for p in pats:
        assert {"pattern", "holds", "evidence", "verdict", "rule", "numbers"} <= set(p)
        assert p["holds"] is True and p["verdict"] == "yes", p
    assert "01000" in pats[4]["evidence"] and "0.395" in pats[4]["evidence"]
    assert "(flexible)" in pats[4]["evidence"]  # the sweep's primary metric from run.json
    assert "x" in pats[1]["evidence"]


def test_paper_patterns_fail_on_contrary_data(tmp_path):
    from sftscope.report import paper_patterns

    runs = [make_analyze(tmp_path / "a", 16, paper_like=False),
            make_weights(tmp_path / "w", 16, j_shaped=False),
            make_probe(tmp_path / "p", 16, sharp=False),
            make_swap(tmp_path / "s", 16, inverted_u=False),
            make_sweep(tmp_path / "sw", 16, paper_like=False)]
    pats = paper_patterns(runs)
    assert [p["holds"] for p in pats] == [False] * 5, pats
    # Only analyze data: the others have no data (None).
    only = paper_patterns([runs[0]])
    assert only[0]["holds"] is False and [p["holds"] for p in only[1:]] == [None] * 4
    assert "no run has" in only[3]["evidence"]


def test_plot_functions_take_plain_tables(tmp_path):
    from matplotlib.figure import Figure

    from sftscope.report import plots

    a = make_analyze(tmp_path / "a", 16)
    fig = plots.plot_pair_metrics(pd.read_csv(a / "metrics.csv"))
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    assert "j / L" in fig.axes[0].get_xlabel()
    w = make_weights(tmp_path / "w", 16)
    fig = plots.plot_weight_change(pd.read_csv(w / "weights.csv"))
    assert "block" in fig.axes[0].get_xlabel()
    s = make_sweep(tmp_path / "s", 16)
    assert isinstance(plots.plot_sweep_bars(pd.read_csv(s / "summary.csv")), Figure)
    assert isinstance(plots.plot_inverted_u(pd.read_csv(s / "summary.csv")), Figure)
    p = make_probe(tmp_path / "p", 16)
    assert len(plots.plot_logit_lens(pd.read_csv(p / "probe.csv")).axes) >= 2
    assert len(plots.plot_single_metrics(pd.read_csv(a / "metrics.csv")).axes) >= 5
    assert len(plots.plot_correlation(pd.read_csv(a / "correlation.csv")).axes) >= 3
    assert len(plots.plot_weight_heatmap(pd.read_csv(w / "weights.csv")).axes) >= 1
    # a swap table in the written form (m0100 masks) read with a plain read_csv
    sw = make_swap(tmp_path / "sw", 16)
    t = masks_as_text(pd.read_csv(sw / "swap.csv", dtype={"mask": str}))
    t.to_csv(sw / "swap.csv", index=False)
    fig = plots.plot_swap(pd.read_csv(sw / "swap.csv"))
    xs = sorted({round(float(x), 3) for ax in fig.axes[:1] for ln in ax.get_lines()
                 for x in ln.get_xdata() if len(ln.get_xdata()) == 5})
    assert xs == [0.1, 0.3, 0.5, 0.7, 0.9]


def _cli(args: list[str]) -> int:
    from sftscope.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_cli_report_and_bad_input(tmp_path, capsys):
    run = make_probe(tmp_path / "p", 16)
    assert _cli(["report", str(run), "--out", str(tmp_path / "r.html"),
                 "--figures-dir", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "r.html").is_file() and (tmp_path / "figs" / "fig3_logit_lens.png").is_file()
    capsys.readouterr()

    cases = {
        "missing": tmp_path / "nope",
        "file": tmp_path / "r.html",
        "no run.json": tmp_path / "empty",
        "no table": tmp_path / "tune-only",
    }
    (tmp_path / "empty").mkdir()
    _run_json(tmp_path / "tune-only", "tune", 16)
    for what, path in cases.items():
        assert _cli(["report", str(path)]) == 2, what
        err = capsys.readouterr().err.strip()
        assert err.startswith("sftscope: error:") and len(err.splitlines()) == 1, (what, err)
        assert "Traceback" not in err
    assert _cli(["report", str(run), "--formats", "png,gif"]) == 2
    bad = make_swap(tmp_path / "bad", 16)
    pd.DataFrame({"x": [1]}).to_csv(bad / "swap.csv", index=False)
    assert _cli(["report", str(bad)]) == 2
    assert "lacks column" in capsys.readouterr().err
    with pytest.raises(SftscopeError):
        from sftscope.report import build_report

        build_report([tmp_path / "nope"])


CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    _, _, out = full_report
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}"]
    url = out.resolve().as_uri()
    shot = tmp_path / "shot.png"
    r = subprocess.run(common + [f"--screenshot={shot}", "--window-size=1280,2000",
                                 "--enable-logging=stderr", "--v=0", url],
                       capture_output=True, text=True, timeout=90)
    assert shot.is_file(), r.stderr[-2000:]
    _assert_not_blank(shot)
    page_errors = [ln for ln in r.stderr.splitlines()
                   if "Uncaught" in ln or ("CONSOLE" in ln and "file://" in ln)]
    assert not page_errors, page_errors
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True,
                         timeout=90)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img\b", dom.stdout)) == len(FIGURES)
    assert dom.stdout.count('src="data:image/png;base64,') == len(FIGURES)
    for heading in SECTIONS:
        assert heading in dom.stdout.replace("&amp;", "&")


# ----------------------------------------------------------------------------- every run folder


def make_suggest(folder: Path, n_blocks: int = 10, k: int = 5) -> Path:
    """As ``sftscope suggest`` writes it: suggest.csv, suggest.json, run.json."""
    _run_json(folder, "suggest", n_blocks, base="org/tiny-base", segments=k)
    rows = []
    chosen = {"angular": (1, 2), "gradient": (2,), "combined": (1, 2)}
    for method, signal in (("angular", "angular_distance"), ("gradient", "grad_norm"),
                           ("combined", "rank_angular")):
        scores = np.array([0.4, 0.9, 1.0, 0.6, 0.8])
        for name in (signal, "score"):
            for i in range(k):
                lo, hi = segment_bounds(n_blocks, k)[i]
                rows.append((method, name, i, lo, hi - 1, (lo + hi) / 2 / n_blocks,
                             scores[i] * 0.1, scores[i], 0 < i < k - 1, i in chosen[method]))
    pd.DataFrame(rows, columns=["method", "signal", "segment", "first_block", "last_block",
                                "depth", "value", "score", "eligible", "chosen"]).to_csv(
        folder / "suggest.csv", index=False)
    (folder / "suggest.json").write_text(json.dumps({
        "mask": "01100", "method": "combined", "reason": "combined: 01100 because REASON-TEXT",
        "segments": k, "n_blocks": n_blocks,
        "proposals": {m: {"method": m, "mask": "".join("1" if i in c else "0" for i in range(k)),
                          "blocks": [], "reason": f"{m} reason"} for m, c in chosen.items()}}))
    return folder


def make_tune(folder: Path, mask: str = "01100", n_blocks: int = 10) -> Path:
    """As ``sftscope tune`` writes run.json (result with loss_history, budget)."""
    result = {"mask": mask, "segments": len(mask), "blocks": [2, 3, 4, 5], "n_blocks": n_blocks,
              "full_rank": 4.0, "rank": 10, "alpha": 20.0, "trainable_params": 8960,
              "full_depth_params": 8960, "budget_ratio": 1.0, "steps": 5, "seed": 0,
              "train_loss": 5.84, "n_train": 8,
              "loss_history": [5.93, 5.87, 5.81, 5.80, 5.78]}
    _run_json(folder, "tune", n_blocks, {"result": result, "mask": mask, "rank": 10,
                                        "trainable_params": 8960, "finished": True},
              model="org/tiny-base", train="gsm8k", mask=mask, logging_steps=1)
    (folder / "adapter").mkdir()
    return folder


def _text(html: str) -> str:
    import html as H

    return H.unescape(re.sub(r"<[^>]+>", " ", html))


def test_suggest_and_tune_folders(tmp_path):
    from sftscope.report import build_report

    runs = [make_suggest(tmp_path / "suggest"), make_tune(tmp_path / "tune")]
    out = build_report(runs, out=tmp_path / "r.html", figures_dir=tmp_path / "figs")
    text = _text(out.read_text(encoding="utf-8"))
    assert "Training-free mask proposal (Fig. 8)" in text and "Segment LoRA runs (Fig. 9)" in text
    assert "Proposed mask 01100: combined: 01100 because REASON-TEXT" in text
    assert "Each method's proposal: angular 01100, gradient 00100, combined 01100" in text
    assert "mask 01100 (blocks 2-5); rank 10; 8,960 trainable parameters, 100.0 % of the " \
           "full-depth budget 8,960; loss 5.930 -> 5.780" in text
    for stem in ("fig8_suggest", "fig9_loss"):
        _assert_not_blank(tmp_path / "figs" / f"{stem}.png")
    curve = pd.read_csv(tmp_path / "figs" / "fig9_loss.csv")
    assert list(curve["step"]) == [1, 2, 3, 4, 5]
    assert pd.read_csv(tmp_path / "figs" / "tune_runs.csv")["mask"].iloc[0] == "m01100"
    assert "Not used" not in text


def test_tune_loss_curve_prefers_trainer_state(tmp_path):
    from sftscope.report import load_run

    run = make_tune(tmp_path / "tune")
    ck = run / "checkpoints" / "checkpoint-4"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": [
        {"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0}, {"step": 4, "train_runtime": 1}]}))
    r = load_run(run)
    assert list(r.tables["loss_curve"]["step"]) == [2, 4]
    assert r.tables["loss_curve"]["source"].iloc[0] == "trainer_state.json"
    assert r.tables["tune"]["budget_ratio"].iloc[0] == 1.0


def test_unusable_folders_are_skipped_with_a_note(tmp_path, capsys):
    from sftscope.report import build_report

    good = make_probe(tmp_path / "good", 16)
    _run_json(tmp_path / "unknown", "frobnicate", 16)
    bad = make_swap(tmp_path / "corrupt", 16)
    (bad / "swap.csv").write_text('config,mask\n"never closed\n')
    half = make_analyze(tmp_path / "half", 16)
    (half / "correlation.csv").write_text("model,metric_a\nbase\n")  # lacks columns
    (tmp_path / "norun").mkdir()
    paths = [good, tmp_path / "unknown", bad, half, tmp_path / "norun", tmp_path / "missing"]
    capsys.readouterr()
    out = build_report(paths, out=tmp_path / "r.html")
    err = capsys.readouterr().err
    text = _text(out.read_text(encoding="utf-8"))
    assert "Not used:" in text
    for why in ("command 'frobnicate' is not one the report reads", "swap.csv could not be read",
                "correlation.csv lacks column(s)", "norun has no run.json",
                "missing does not exist"):
        assert why in text, why
        assert why in err, why
    assert err.count("sftscope: note:") == 5
    # the usable parts are all there: the probe run and the analyze run's metrics
    assert "Logit lens: next-token prediction by depth (Fig. 3)" in text
    assert "CKA is at least" in text and "No metric correlations" in text


def test_all_folders_unusable_is_one_error(tmp_path):
    from sftscope.report import build_report

    _run_json(tmp_path / "unknown", "frobnicate", 16)
    with pytest.raises(SftscopeError, match="no run folder is usable: .*frobnicate.*nope"):
        build_report([tmp_path / "unknown", tmp_path / "nope"])


def make_zero_sweep(folder: Path) -> Path:
    """A quick demo's sweep: every score 0, one seed, 4 items."""
    _run_json(folder, "sweep", 10, {"primary_metric": "exact_match_flexible"}, model="tiny",
              segments=5)
    rows = [(m, 1, 17920, metric, 0.0, 0.0, 0.49, 4, np.nan if m == "11111" else 1.0)
            for metric in ("exact_match_flexible", "exact_match_strict")
            for m in ["11111", "10000", "01000", "00100", "00010", "00001"]]
    pd.DataFrame(rows, columns=["mask", "seeds", "trainable_params", "metric", "mean", "ci_low",
                                "ci_high", "n_items", "p_value"]).to_csv(
        folder / "summary.csv", index=False)
    return folder


def test_reduced_demo_says_so_and_empty_panels_say_why(tmp_path):
    from sftscope.report import build_report, paper_patterns, plots

    demo = tmp_path / "demo"
    _run_json(demo, "demo", None, {"reduced": True, "sizes": {"eval_limit": 4}}, quick=True)
    make_zero_sweep(demo / "sweep")
    out = build_report([demo])
    text = _text(out.read_text(encoding="utf-8"))
    assert "Reduced demo" in text and "(eval_limit 4)" in text and "--quick" in text
    assert ("every mask scores 0 on exact_match_flexible (4 items, 1 seed), so its bars have no "
            "height") in text
    (e,) = [p for p in paper_patterns([demo / "sweep"]) if p["pattern"].startswith("(e)")]
    assert e["verdict"] == "inconclusive" and e["holds"] is None
    assert "1 seed(s) (needs 2)" in e["why"] and "4 items (needs 100)" in e["why"]
    fig = plots.plot_sweep_bars(pd.read_csv(demo / "sweep" / "summary.csv"))
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any("every mask scores 0 on exact_match_flexible" in t for t in notes), notes


def test_probability_band_is_clipped_in_the_report(tmp_path):
    from sftscope.report import build_report

    run = make_probe(tmp_path / "p", 16)
    df = pd.read_csv(run / "probe.csv")
    extra = df[df["metric"] == "accuracy"].assign(metric="answer_prob")
    extra["ci_low"] = extra["value"] - 0.05  # a t interval below 0, as the demo's
    pd.concat([df, extra]).to_csv(run / "probe.csv", index=False)
    out = build_report([run])
    t = pd.read_csv(run / "figures" / "fig3_logit_lens.csv")
    assert t["answer_prob ci_low"].min() >= 0 and t["accuracy ci_low"].min() >= 0
    text = _text(out.read_text(encoding="utf-8"))
    assert "of answer_prob fell outside its range [0, 1]" in text


def test_old_tables_with_plain_or_numeric_masks(tmp_path):
    """Tables written before the m-prefix (plain 00100) still read as masks."""
    from sftscope.report import load_run, plots

    run = make_sweep(tmp_path / "sw", 16)
    r = load_run(run)
    assert "01000" in set(r.tables["summary"]["mask"])
    # a summary read without dtype (00100 -> 100) is repaired from the longest mask
    fig = plots.plot_sweep_bars(pd.read_csv(run / "summary.csv"))
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert "00100" in labels and "01000" in labels


def test_suggest_validation_shows_baselines(tmp_path):
    """A sweep's suggest check: each proposal's rank beside the prior-only mask's and a random
    interior mask's, in the findings, the validation table and the Fig. 8 figure."""
    from sftscope.experiments.sweep import validate_suggestions
    from sftscope.report import build_report
    from sftscope.segments import masks_as_text

    sweep = make_sweep(tmp_path / "sweep", 16)
    make_suggest(sweep / "suggest", n_blocks=16)
    summary = pd.read_csv(sweep / "summary.csv", dtype={"mask": str})
    val = validate_suggestions(summary, {"combined": "00100", "angular": "01100"}, "flexible")
    masks_as_text(val).to_csv(sweep / "suggest_validation.csv", index=False)
    out = build_report([sweep], out=tmp_path / "r.html", figures_dir=tmp_path / "figs")
    text = _text(out.read_text(encoding="utf-8"))
    # flexible: 01000 .395, 01100 .35, 01110 .34, 00100 .33, ...; interior 01000, 00100, 00010
    # rank 1, 4 and 7
    assert ("combined proposal 00100 ranks 4 of 9 swept masks" in text
            and "the prior-only mask 01000 ranks 1" in text
            and "a random interior mask of its shape 4.0 on average (of 3)" in text), text
    table = pd.read_csv(tmp_path / "figs" / "suggest_validation.csv")
    assert {"prior_mask", "prior_rank", "random_rank", "vs_prior", "vs_random"} <= set(table)
    assert table.set_index("method").loc["combined", "vs_prior"] == 3
    _assert_not_blank(tmp_path / "figs" / "fig8_suggest.png")


def test_contents_list_only_sections_with_data_and_hints_name_missing_rows(tmp_path):
    from sftscope.report import build_report

    run = make_swap(tmp_path / "s", 16)  # a swap run without --alphas
    html = build_report([run]).read_text(encoding="utf-8")
    nav = html[html.index("<nav>"):html.index("</nav>")]
    assert "Layer swapping (Fig. 6)" in nav and "Interpolating" not in nav
    assert "Logit lens" not in nav and "similarity" not in nav
    assert 'id="absent"' in html  # the empty sections, after the ones with data
    # swap.csv is there: the hint does not ask for it, it says what it lacks
    assert "No interpolated segments (swap --alpha) in these runs: their swap.csv has none" in html
    assert "needs swap.csv" not in html
