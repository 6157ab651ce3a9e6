"""Steer findings from constructed tables: every scale against scale 0 by a paired test on
the same items (steer_items.csv); a better scale is named only when the paired interval
excludes 0."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sftscope.metrics.paired import paired_difference
from sftscope.report import numbers as N
from sftscope.report.sections import steer_findings, steer_vectors


def _tables(per_scale: dict[float, np.ndarray], metric: str = "accuracy"
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """steer.csv (mean and a wide interval per scale) and steer_items.csv from item scores."""
    rows, items = [], []
    for s, v in per_scale.items():
        m = float(np.mean(v))
        rows.append({"scale": s, "metric": metric, "value": m, "ci_low": m - 0.2,
                     "ci_high": m + 0.2, "n": len(v)})
        items += [{"scale": s, "metric": metric, "item": i, "value": float(x)}
                  for i, x in enumerate(v)]
    return pd.DataFrame(rows), pd.DataFrame(items)


def _text(per_scale, metric="accuracy") -> str:
    return " ".join(steer_findings(N.steer_data(*_tables(per_scale, metric))))


def test_n8_one_item_better_is_not_distinguishable():
    base = np.array([1, 0, 0, 1, 0, 0, 1, 0])
    up = base.copy()
    up[1] = 1  # one more item right: 0.375 -> 0.5
    text = _text({0.0: base, 1.0: up, 2.0: base})
    assert "accuracy: no scale is distinguishable from the unsteered base (0.375) at n = 8" \
        in text
    assert "the best, scale 1.00: paired difference +0.125" in text and "not significant" in text
    assert "is best at" not in text


def test_clear_paired_winner_is_named_with_its_interval():
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.3).astype(float)
    up = base.copy()
    up[np.flatnonzero(base == 0)[:60]] = 1  # 60 items fixed, none broken
    text = _text({0.0: base, 1.0: up, 4.0: np.zeros(200)})
    d = paired_difference(up, base)
    assert d.significant and d.low > 0
    assert (f"accuracy is best at scale 1.00 ({float(up.mean()):.3f} against the unsteered "
            f"base {float(base.mean()):.3f}; paired difference {d.mean:+.4g} "
            f"[{d.low:+.4g}, {d.high:+.4g}] over n = 200 items)") in text
    assert "scale 4.00 significantly worse (paired)" in text


def test_paired_beats_overlapping_intervals_for_losses():
    """Every item's loss drops by 0.05 at scale 1, far below the spread across items: the
    intervals overlap but the paired test names the winner; scale 3 is no different."""
    rng = np.random.default_rng(1)
    base = 2.0 + rng.normal(0, 0.5, 40)
    noise = rng.normal(0, 0.3, 40)
    text = _text({0.0: base, 1.0: base - 0.05, 3.0: base + noise - noise.mean()}, "loss")
    assert "loss is best at scale 1.00" in text and "paired difference -0.05" in text
    assert "significantly worse" not in text


def test_every_scale_worse_and_ties():
    base = np.ones(100)
    worse = base.copy()
    worse[:40] = 0
    text = _text({0.0: base, 1.0: worse, 2.0: np.zeros(100)})
    assert "accuracy: every scale is significantly worse than the unsteered base (1.000; the " \
           "least bad, scale 1.00: paired difference -0.4" in text
    tie = _text({0.0: base, 1.0: base.copy(), 2.0: base.copy()})
    assert "accuracy is 1.000 at every scale" in tie


def test_some_worse_none_better():
    rng = np.random.default_rng(2)
    base = (rng.random(100) < 0.5).astype(float)
    up = base.copy()
    up[np.flatnonzero(base == 0)[:2]] = 1
    text = _text({0.0: base, 0.5: up, 8.0: np.zeros(100)})
    assert f"accuracy: no scale beats the unsteered base ({base.mean():.3f}) at n = 100 " \
           "(the best, scale 0.50: paired difference +0.02" in text
    assert "not significant); scale 8.00 significantly worse (paired)" in text


def test_runs_without_items_fall_back_to_intervals_and_vectors_of_old_runs():
    table, _ = _tables({0.0: np.array([0.0, 1.0]), 1.0: np.array([1.0, 1.0])})
    text = " ".join(steer_findings(N.steer_data(table)))
    assert "no per-item scores for a paired test" in text
    old = steer_vectors({"layer": 6, "vector": {"direction": "mean", "norm": 3.5}}, 10)
    assert old["layers"] == "6" and old["n_layers"] == 1 and old["norms"] == [3.5]
    new = steer_vectors({"layers": [1, 2, 3, 7], "vectors": [
        {"direction": "pc1", "norm": x} for x in (1.0, 2.0, 3.0, 4.0)]}, 10)
    assert new["layers"] == "1-3,7" and new["n_layers"] == 4


def test_multi_layer_run_is_named_in_the_finding():
    table, items = _tables({0.0: np.ones(4), 1.0: np.ones(4)})
    data = N.steer_data(table, items)
    data.extra["vectors"] = {N.DEFAULT_RUN: steer_vectors(
        {"layers": [1, 3], "vectors": [{"direction": "mean", "norm": 1.0},
                                       {"direction": "mean", "norm": 2.5}]}, 4)}
    (text,) = steer_findings(data)
    assert "At hidden states j = 1,3 (one pass) of 4 (mean vectors, norms 1.000-2.500): " in text
