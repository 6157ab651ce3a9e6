"""The metric registry (one list of directions, scales and labels) and masks in tables."""

from __future__ import annotations

import pandas as pd
import pytest

from sftscope import metric_registry as MR
from sftscope.segments import (
    mask_from_text,
    mask_sort_key,
    mask_text,
    masks_as_text,
    masks_from_text,
)


@pytest.mark.parametrize("name, lower", [
    ("accuracy", False), ("choice_accuracy", False), ("exact_match_strict", False),
    ("exact_match_flexible", False), ("strict_match", False), ("flexible_extract", False),
    ("answer_prob", False), ("loss", True), ("loss_after", True), ("loss_delta", True),
    ("perplexity", True), ("ppl_ratio", True), ("answer_rank", True), ("nll", True),
    ("cross_entropy", True), ("val_error_rate", True), ("my_task_correct", False),
    ("effective_rank", False), ("cka", False), ("prompt_entropy", False),
])
def test_direction(name, lower):
    assert MR.lower_is_better(name) is lower


def test_gsm8k_names_old_and_new_are_accuracies():
    for old, new in (("exact_match_strict", "strict_match"),
                     ("exact_match_flexible", "flexible_extract")):
        a, b = MR.metric_spec(old), MR.metric_spec(new)
        assert a.kind == b.kind == "accuracy" and a.direction == b.direction == MR.HIGHER
        assert a.bounds == b.bounds == (0.0, 1.0) and a.label == b.label


def test_descriptive_metrics_have_no_direction_and_table_meanings():
    for name in ("cka", "effective_rank", "mean_shift", "agreement"):
        assert MR.metric_spec(name).direction is None
    # the same name in weights.csv is the rank of the weight change
    assert MR.metric_spec("effective_rank", "weights").kind == "weight"
    assert MR.metric_spec("sv3", "weights").label == "singular value 3"
    # suggest's rank signals: 1 = best segment, higher is better
    assert MR.metric_spec("rank_angular", "suggest").direction == MR.HIGHER
    d = MR.metric_spec("delta_prompt_entropy")
    assert d.kind == "single" and d.direction is None and "prompt entropy" in d.label


def test_one_registry_for_sweep_and_report():
    from sftscope.experiments import sweep
    from sftscope.report import plots

    assert sweep.lower_is_better is MR.lower_is_better
    assert plots.lower_is_better is MR.lower_is_better
    assert not hasattr(sweep, "mask_order")
    assert plots.mask_sort_key is mask_sort_key


def test_order_log_and_bounds():
    assert MR.ordered(["mean_shift", "foo", "cka", "cosine_similarity"]) == [
        "cka", "cosine_similarity", "mean_shift", "foo"]
    assert MR.use_log("condition_number", [1, 1e4]) and not MR.use_log("cka", [1e-4, 1])
    assert not MR.use_log("spectral_norm", [1, 2])
    assert MR.clip_to_bounds("answer_prob", -0.1) == 0.0
    assert MR.clip_to_bounds("accuracy", 1.2) == 1.0
    assert MR.clip_to_bounds("loss_delta", -3.0) == -3.0


def test_register_a_new_metric():
    spec = MR.register(MR.MetricSpec("pass_at_1", "accuracy", MR.HIGHER, bounds=(0.0, 1.0)))
    try:
        assert MR.metric_spec("pass_at_1") is spec and not MR.lower_is_better("pass_at_1")
    finally:
        MR.REGISTRY.pop((None, "pass_at_1"))


# ----------------------------------------------------------------------------- masks


def test_mask_text_round_trip():
    for m in ("00100", "1", "0110", "11111"):
        assert mask_text(m) == "m" + m
        assert mask_from_text(mask_text(m)) == m
        assert mask_from_text(m) == m
    assert mask_text(mask_text("01")) == "m01"  # idempotent
    # what a CSV reader made of a mask, repaired when the segment count is known
    assert mask_from_text(100, k=5) == "00100" and mask_from_text(100.0, k=5) == "00100"
    assert mask_from_text("100.0", k=5) == "00100" and mask_from_text(100) == "100"
    assert mask_from_text(float("nan")) == "" and mask_from_text(None) == ""
    assert mask_from_text("mean") == "mean" and mask_text("") == ""


def test_masks_survive_plain_read_csv(tmp_path):
    df = pd.DataFrame({"mask": ["11111", "00100", "01000"], "best_mask": "00100",
                       "mean": [0.1, 0.2, 0.3]})
    p = tmp_path / "t.csv"
    masks_as_text(df).to_csv(p, index=False)
    raw = pd.read_csv(p)
    assert list(raw["mask"]) == ["m11111", "m00100", "m01000"]
    back = masks_from_text(raw)
    assert list(back["mask"]) == ["11111", "00100", "01000"]
    assert (back["best_mask"] == "00100").all()
    assert list(df["mask"]) == ["11111", "00100", "01000"]  # the writer copied


def test_mask_sort_key_is_the_one_order():
    masks = ["01110", "10001", "00001", "11111", "01100", "10000", "00110", "00100", "xyz"]
    assert sorted(masks, key=mask_sort_key) == [
        "11111", "10000", "00100", "00001", "01100", "10001", "00110", "01110", "xyz"]
    # prefixed and plain masks sort the same
    assert mask_sort_key("m01000") == mask_sort_key("01000")


def test_sweep_summary_order_and_written_form(tmp_path):
    """summarize orders by mask_sort_key; the table form keeps 00100 as text for read_csv."""
    from sftscope.experiments.sweep import position_table, summarize

    items = pd.DataFrame([(m, s, i, "accuracy", float((i + len(m.split("1")[0])) % 2))
                          for m in ("11111", "00100", "10000") for s in (0, 1)
                          for i in range(6)],
                         columns=["mask", "seed", "item", "metric", "value"])
    summary = summarize(items, n_blocks=10, n_boot=50)
    assert list(summary["mask"]) == ["11111", "10000", "00100"]  # mask_sort_key
    p = tmp_path / "summary.csv"
    masks_as_text(summary).to_csv(p, index=False)
    assert set(pd.read_csv(p)["mask"]) == {"m11111", "m00100", "m10000"}
    pos = position_table(summary, 10)
    assert set(pos["mask"]) == {"00100", "10000"}
