"""Checkpoint chains (base -> s1 -> s2 -> s3 in one run): each pair's numbers are exactly those
of a separate two-model run, for analyze, weights and probe, with and without --consecutive;
labels, refusals, run.json, and the report's one line per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from parallel_worker import one_and_two

from sftscope.chains import (
    chain_pairs,
    default_label,
    model_order,
    pair_label,
    parse_stages,
    split_pair_label,
)
from sftscope.config.commands import AnalyzeConfig, ProbeConfig, WeightsConfig
from sftscope.errors import SftscopeError
from sftscope.experiments.analyze import analyze
from sftscope.experiments.lens import probe
from sftscope.experiments.weights import run_weights

# (chain run's model label, the separate run's label) of each pair of base, s1, s2, s3 with
# --consecutive: the first stage is sft/pair, the others carry their own labels
PAIRS = {
    ("base", "s1"): {"base": "base", "sft": "sft", "pair": "pair"},
    ("base", "s2"): {"base": "base", "s2": "sft", "pair:base-s2": "pair"},
    ("base", "s3"): {"base": "base", "s3": "sft", "pair:base-s3": "pair"},
    ("s1", "s2"): {"sft": "base", "s2": "sft", "pair:sft-s2": "pair"},
    ("s2", "s3"): {"s2": "base", "s3": "sft", "pair:s2-s3": "pair"},
}


@pytest.fixture(scope="module")
def chain(model_dir) -> dict[str, Path]:
    """Tiny llamas of one shape: the base and three stages (different seeds)."""
    return {name: model_dir("llama", seed=i) for i, name in enumerate(["base", "s1", "s2",
                                                                         "s3"])}


def _stages(chain: dict[str, Path]) -> tuple[str, ...]:
    return (f"s2={chain['s2']}", f"s3={chain['s3']}")


def _rows(df: pd.DataFrame, rename: dict[str, str], keys: list[str]) -> pd.DataFrame:
    """The rows of ``rename``'s models, labelled as a two-model run labels them."""
    d = df[df["model"].isin(list(rename))].copy()
    d["model"] = d["model"].map(rename)
    return d.sort_values(keys, kind="stable").reset_index(drop=True)


def _same_pairs(chained: pd.DataFrame, separate: dict[tuple[str, str], pd.DataFrame],
                keys: list[str]) -> None:
    for pair, rename in PAIRS.items():
        want = separate[pair].sort_values(keys, kind="stable").reset_index(drop=True)
        got = _rows(chained, rename, keys)
        assert set(got["model"]) == set(want["model"]), pair
        pd.testing.assert_frame_equal(got, want, check_exact=True, obj=str(pair))


# ----------------------------------------------------------------------------- labels


def test_stage_labels_pairs_and_order(chain, tmp_path):
    stages = parse_stages([f"dpo={chain['s2']}", str(chain["s3"])])
    assert [(s.label, s.spec) for s in stages] == [("dpo", str(chain["s2"])),
                                                   (chain["s3"].name, str(chain["s3"]))]
    assert default_label("org/Model-7B-DPO") == "Model-7B-DPO"
    pairs = chain_pairs(["sft", "dpo", "rlvr"], consecutive=True)
    assert [p.model for p in pairs] == ["pair", "pair:base-dpo", "pair:base-rlvr",
                                        "pair:sft-dpo", "pair:dpo-rlvr"]
    assert [p.model for p in chain_pairs(["sft", "dpo"])] == ["pair", "pair:base-dpo"]
    assert pair_label("base", "sft") == "pair" and pair_label("sft", "dpo") == "pair:sft-dpo"
    order = model_order(["sft", "dpo"], pairs[:2])
    assert sorted(order, key=order.get) == ["base", "sft", "dpo", "pair", "pair:base-dpo"]
    # labels may hold '-': the split is the one whose sides are known stages
    assert split_pair_label("pair:my-sft-rl-v2", {"my-sft", "rl-v2"}) == ("my-sft", "rl-v2")
    assert split_pair_label("pair:base-rl-v2") == ("base", "rl-v2")
    assert split_pair_label("pair") == ("base", "sft") and split_pair_label("dpo") is None
    # a path holding '=' that exists is a path, not LABEL=PATH
    odd = tmp_path / "a=b"
    odd.mkdir()
    assert [(s.label, s.spec) for s in parse_stages([str(odd)])] == [("a_b", str(odd))]


@pytest.mark.parametrize("stages, needle", [
    (("base={s2}",), "reserved"), (("sft={s2}",), "reserved"), (("pair:x={s2}",), "reserved"),
    (("a={s2}", "a={s3}"), "two stages are labelled 'a'"),
    (("{s2}", "{s2}"), "default label is the folder name"),
    (("=",), "empty label|names no checkpoint"),
])
def test_bad_stage_labels_refused(chain, gsm8k_file, tmp_path, stages, needle):
    given = tuple(s.format(s2=chain["s2"], s3=chain["s3"]) for s in stages)
    with pytest.raises(SftscopeError, match=needle):
        AnalyzeConfig(base=str(chain["base"]), sft=str(chain["s1"]), stages=given,
                      data=f"gsm8k:{gsm8k_file}", out=str(tmp_path / "r"))


def test_chain_options_checked_before_work(chain, model_dir, gsm8k_file, tmp_path):
    common = {"data": f"gsm8k:{gsm8k_file}", "out": str(tmp_path / "r")}
    base, s1 = str(chain["base"]), str(chain["s1"])
    with pytest.raises(SftscopeError, match="--consecutive .* --stages"):
        AnalyzeConfig(base=base, sft=s1, consecutive=True, **common)
    with pytest.raises(SftscopeError, match="stage x folder .* does not exist"):
        AnalyzeConfig(base=base, sft=s1, stages=(f"x={tmp_path / 'nope'}",), **common)
    with pytest.raises(SftscopeError, match="blocks"):  # a stage of another depth
        AnalyzeConfig(base=base, sft=s1, stages=(f"x={model_dir('llama', n_layers=6)}",),
                      **common)
    with pytest.raises(SftscopeError, match="give --base and --sft"):
        ProbeConfig(model=base, stages=(f"x={chain['s2']}",), data=common["data"])
    with pytest.raises(SftscopeError, match="give --base and --sft"):
        WeightsConfig(base=base, adapter=str(tmp_path), stages=(str(chain["s2"]),),
                      out=common["out"])


# ----------------------------------------------------------------------------- analyze


def test_analyze_chain_matches_separate_pair_runs(chain, gsm8k_file, tmp_path):
    """base, s1, s2, s3 with --consecutive in one run = five separate pair runs, exactly
    (bootstrap intervals included); the base is captured once, each capture cached."""
    kw = {"data": f"gsm8k:{gsm8k_file}", "n_token": 4, "limit": 6, "max_length": 40,
          "batch_size": 3, "bootstrap": 10}
    out = tmp_path / "chain"
    table = analyze(AnalyzeConfig(base=str(chain["base"]), sft=str(chain["s1"]),
                                  stages=_stages(chain), consecutive=True, out=str(out),
                                  cache_dir=str(tmp_path / "cache"), **kw))
    assert list(dict.fromkeys(table["model"])) == [
        "base", "sft", "s2", "s3", "pair", "pair:base-s2", "pair:base-s3", "pair:sft-s2",
        "pair:s2-s3"]  # training order, not alphabetical
    separate = {(a, b): analyze(AnalyzeConfig(base=str(chain[a]), sft=str(chain[b]),
                                              out=str(tmp_path / f"{a}-{b}"),
                                              cache_dir=str(tmp_path / f"cache-{a}-{b}"),
                                              **kw))
                for a, b in PAIRS}
    keys = ["model", "metric", "layer"]
    _same_pairs(table, separate, keys)
    # the written tables hold the same (read back as written)
    _same_pairs(pd.read_csv(out / "metrics.csv"),
                {k: pd.read_csv(tmp_path / f"{k[0]}-{k[1]}" / "metrics.csv") for k in PAIRS},
                keys)
    corr = pd.read_csv(out / "correlation.csv")
    for pair, rename in PAIRS.items():
        want = pd.read_csv(tmp_path / f"{pair[0]}-{pair[1]}" / "correlation.csv")
        got = _rows(corr, rename, ["model", "metric_a", "metric_b"])
        pd.testing.assert_frame_equal(
            got, want.sort_values(["model", "metric_a", "metric_b"],
                                  kind="stable").reset_index(drop=True), check_exact=True)
    rec = json.loads((out / "run.json").read_text())
    assert [c["label"] for c in rec["chain"]] == ["sft", "s2", "s3"]
    assert [p["model"] for p in rec["pairs"]] == ["pair", "pair:base-s2", "pair:base-s3",
                                                  "pair:sft-s2", "pair:s2-s3"]
    assert set(rec["models"]) == set(rec["capture"]) == {"base", "sft", "s2", "s3"}
    assert "capture_base" in rec["timings"] and "capture_s3" in rec["timings"]
    # one capture per model, cached: a rerun with other dataset-level options reuses them
    assert len(list((tmp_path / "cache").glob("states-*.safetensors"))) == 4
    again = tmp_path / "again"
    analyze(AnalyzeConfig(base=str(chain["base"]), sft=str(chain["s1"]), stages=_stages(chain),
                          out=str(again), cache_dir=str(tmp_path / "cache"),
                          **{**kw, "pooling": "last"}))
    rec = json.loads((again / "run.json").read_text())
    assert all(rec["capture"][k]["cached"] for k in ("base", "sft", "s2", "s3"))
    assert [p["model"] for p in rec["pairs"]] == ["pair", "pair:base-s2", "pair:base-s3"]


def test_adapter_stage_default_label_and_pair(chain, gsm8k_file, tmp_path):
    """A PEFT adapter as a further stage: applied to --base in memory, labelled by its folder
    and rank, its pair with the base that of a separate run with the adapter as --sft."""
    from peft import LoraConfig, get_peft_model

    from sftscope.load.models import load_model

    peft = get_peft_model(load_model(str(chain["base"])),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.fill_(0.05)
    peft.save_pretrained(tmp_path / "lora")
    kw = {"data": f"gsm8k:{gsm8k_file}", "n_token": 3, "limit": 6, "max_length": 40,
          "batch_size": 3, "bootstrap": 0, "cache_dir": str(tmp_path / "cache")}
    cfg = AnalyzeConfig(base=str(chain["base"]), sft=str(chain["s1"]),
                        stages=(str(tmp_path / "lora"),), out=str(tmp_path / "chain"), **kw)
    label = cfg.chain()[0].label
    assert label == "adapter lora r2"
    table = analyze(cfg)
    one = analyze(AnalyzeConfig(base=str(chain["base"]), sft=str(tmp_path / "lora"),
                                out=str(tmp_path / "one"), **kw))
    got = _rows(table, {"base": "base", label: "sft", f"pair:base-{label}": "pair"},
                ["model", "metric", "layer"])
    pd.testing.assert_frame_equal(got, one.sort_values(["model", "metric", "layer"])
                                  .reset_index(drop=True), check_exact=True)


# ----------------------------------------------------------------------------- weights


def test_weights_chain_matches_separate_pair_runs(chain, tmp_path):
    out = tmp_path / "chain"
    table = run_weights(WeightsConfig(base=str(chain["base"]), sft=str(chain["s1"]),
                                      stages=_stages(chain), consecutive=True, out=str(out),
                                      top_k=3))
    assert list(table.columns) == ["model", "block", "module", "metric", "value", "method"]
    assert list(dict.fromkeys(table["model"])) == ["pair", "pair:base-s2", "pair:base-s3",
                                                   "pair:sft-s2", "pair:s2-s3"]
    for (a, b), rename in PAIRS.items():
        label = next(k for k, v in rename.items() if v == "pair")
        one = run_weights(WeightsConfig(base=str(chain[a]), sft=str(chain[b]), top_k=3,
                                        out=str(tmp_path / f"{a}-{b}")))
        got = table[table["model"] == label].drop(columns="model").reset_index(drop=True)
        pd.testing.assert_frame_equal(got, one.reset_index(drop=True), check_exact=True)
    rec = json.loads((out / "run.json").read_text())
    assert [c["label"] for c in rec["chain"]] == ["sft", "s2", "s3"] and rec["n_blocks"] == 4
    saved = pd.read_csv(out / "weights.csv")
    assert set(saved["model"]) == set(table["model"])
    # a single pair keeps its table as it was (no model column)
    assert "model" not in pd.read_csv(tmp_path / "base-s1" / "weights.csv").columns


# ----------------------------------------------------------------------------- probe


def test_probe_chain_matches_separate_pair_runs(chain, gsm8k_file, tmp_path):
    kw = {"data": f"gsm8k:{gsm8k_file}", "max_length": 40, "batch_size": 3, "bootstrap": 20}
    out = tmp_path / "chain"
    table = probe(ProbeConfig(base=str(chain["base"]), sft=str(chain["s1"]),
                              stages=_stages(chain), consecutive=True, out=str(out), **kw))
    assert set(table["model"]) == {"base", "sft", "s2", "s3", "pair", "pair:base-s2",
                                   "pair:base-s3", "pair:sft-s2", "pair:s2-s3"}
    agree = table[table["metric"] == "agreement"]
    assert set(agree["model"]) == {"pair", "pair:base-s2", "pair:base-s3", "pair:sft-s2",
                                   "pair:s2-s3"}
    separate = {(a, b): probe(ProbeConfig(base=str(chain[a]), sft=str(chain[b]), **kw))
                for a, b in PAIRS}
    _same_pairs(table, separate, ["model", "metric", "layer"])
    rec = json.loads((out / "run.json").read_text())
    assert [c["label"] for c in rec["chain"]] == ["sft", "s2", "s3"]
    assert set(rec["models"]) == {"base", "sft", "s2", "s3"}


# ----------------------------------------------------------------------------- report


def test_report_draws_one_line_per_stage_and_checks_the_first_pair(chain, gsm8k_file,
                                                                    tmp_path):
    from sftscope.report import numbers as N
    from sftscope.report import plots
    from sftscope.report.build import build_report
    from sftscope.report.patterns import paper_patterns
    from sftscope.report.runs import load_run

    kw = {"data": f"gsm8k:{gsm8k_file}", "n_token": 3, "limit": 6, "max_length": 40,
          "batch_size": 3, "bootstrap": 0, "cache_dir": str(tmp_path / "cache")}
    stages = _stages(chain)
    analyze(AnalyzeConfig(base=str(chain["base"]), sft=str(chain["s1"]), stages=stages,
                          consecutive=True, out=str(tmp_path / "an"), **kw))
    analyze(AnalyzeConfig(base=str(chain["base"]), sft=str(chain["s1"]),
                          out=str(tmp_path / "one"), **kw))
    run_weights(WeightsConfig(base=str(chain["base"]), sft=str(chain["s1"]), stages=stages,
                              out=str(tmp_path / "w"), low_rank=False))
    probe(ProbeConfig(base=str(chain["base"]), sft=str(chain["s1"]), stages=stages,
                      consecutive=True, data=kw["data"], max_length=40, bootstrap=0,
                      out=str(tmp_path / "p")))
    run = load_run(tmp_path / "an")
    assert run.label == f"{chain['base'].name} chain"
    metrics = run.tables["metrics"]
    fig1 = N.pair_data(metrics)
    assert list(dict.fromkeys(fig1.frame[N.RUN])) == ["sft", "s2", "s3", "sft\u2192s2",
                                                      "s2\u2192s3"]
    fig2 = N.single_data(metrics)
    assert list(dict.fromkeys(fig2.frame[N.RUN])) == ["base", "sft", "s2", "s3"]
    assert set(fig2.extra["gaps"][N.RUN]) == {"sft", "s2", "s3"}  # each stage vs the base
    lens = N.lens_data(load_run(tmp_path / "p").tables["probe"])
    assert set(lens.frame[N.RUN]) == {"base", "sft", "s2", "s3", "sft\u2192s2", "s2\u2192s3"}
    weights = N.weight_data(load_run(tmp_path / "w").tables["weights"])
    assert list(weights.summary[N.RUN]) == ["sft", "s2", "s3"]
    for fig in (plots.plot_pair_metrics(fig1), plots.plot_single_metrics(fig2),
                plots.plot_logit_lens(lens), plots.plot_weight_change(weights)):
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert {"sft", "s2", "s3"} <= set(labels), labels
    # the paper's checks read the first pair only: the same verdicts and numbers as the pair
    checks = paper_patterns([tmp_path / "an"])
    assert checks == paper_patterns([tmp_path / "one"])
    html = build_report([tmp_path / "an", tmp_path / "w", tmp_path / "p"],
                        out=tmp_path / "report.html")
    assert f"{chain['base'].name} chain [s3]" in html.read_text()


# ----------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_chain_and_interpolation_on_two_processes(chain, gsm8k_file, tmp_path):
    """torchrun, 2 CPU processes (gloo; tests/parallel_worker.py): a chained analyze and probe
    and an interpolating swap write the tables of one process."""
    import os

    import numpy as np


    root = Path(__file__).resolve().parents[1]
    base, s1 = str(chain["base"]), str(chain["s1"])
    common = {"data": f"gsm8k:{gsm8k_file}", "max_length": 40, "batch_size": 3,
              "device": "cpu", "bootstrap": 10}
    link = {"base": base, "sft": s1, "stages": list(_stages(chain)), "consecutive": True}
    an = {**link, "n_token": 4, **common}
    pr = {**link, **common}
    sw = {"base": base, "sft": s1, "segments": 2, "alphas": [0.5], **common}
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1",
           "SFTSCOPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = one_and_two(tmp_path, an, pr, sw, env)
    one, two = tmp_path / "one", tmp_path / "two"
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, table in (("analyze", "metrics"), ("probe", "probe"), ("swap", "swap")):
        a = pd.read_csv(two / name / f"{table}.csv")
        b = pd.read_csv(one / name / f"{table}.csv")
        assert list(a.columns) == list(b.columns) and len(a) == len(b), name
        for c in a.columns:
            if a[c].dtype.kind == "f":
                np.testing.assert_allclose(a[c], b[c], rtol=1e-6, atol=1e-9, equal_nan=True)
            else:
                assert list(a[c]) == list(b[c]), (name, c)
        assert json.loads((two / name / "run.json").read_text())["world_size"] == 2
    assert "pair:s2-s3" in set(pd.read_csv(two / "analyze" / "metrics.csv")["model"])
    assert (pd.read_csv(two / "swap" / "swap.csv")["alpha"] == 0.5).any()
