"""The report's MoE section: the routing-concentration rule on constructed profiles, and its
sentences and figures from constructed routing.csv / weights.csv tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sftscope.report import numbers as N
from sftscope.report import plots
from sftscope.report import rules as R
from sftscope.report.sections import routing_findings, routing_tables


def test_rule_concentrated_top():
    js = [0.01, 0.01, 0.01, 0.01, 0.05, 0.05]
    v = R.routing_rule(js)
    assert v.verdict == R.YES and "top" in v.why
    assert "largest: top, 5.000x the next" in v.numbers


def test_rule_spread_and_intervals():
    js = np.array([0.02, 0.02, 0.021, 0.021, 0.022, 0.022])
    assert R.routing_rule(js).verdict == R.NO  # exact numbers, factor 1.05 < 1.5
    top = [0.01, 0.01, 0.01, 0.01, 0.03, 0.03]
    lo = [0.005] * 4 + [0.012] * 2
    hi = [0.02] * 4 + [0.05] * 2
    v = R.routing_rule(top, lo, hi)  # 3x, but the intervals overlap
    assert v.verdict == R.INCONCLUSIVE and "overlap" in v.why
    narrow = R.routing_rule(top, [0.009] * 4 + [0.029] * 2, [0.011] * 4 + [0.031] * 2)
    assert narrow.verdict == R.YES


def test_rule_without_intervals_says_so():
    """--bootstrap 0: the numbers are taken as exact and the verdict says it had no
    interval, as every other verdict does; with intervals no such note."""
    js = [0.01, 0.01, 0.01, 0.01, 0.05, 0.05]
    for lo, hi in ((None, None), ([math.nan] * 6, [math.nan] * 6)):
        v = R.routing_rule(js, lo, hi, hint="analyze --bootstrap 0")
        assert v.verdict == R.YES
        assert v.why == ("concentrated in the top segment; no interval: analyze --bootstrap 0; "
                         "noise not checked")
        assert "[" not in v.numbers  # no made-up [x, x] interval
    v = R.routing_rule(js, [x * 0.99 for x in js], [x * 1.01 for x in js])
    assert v.why == "concentrated in the top segment" and "top 0.0500 [0.0495, 0.0505]" in \
        v.numbers
    flat = R.routing_rule([0.02] * 6)
    assert flat.verdict == R.NO and flat.why == "spread over depth; no interval; noise not checked"


def test_findings_without_intervals():
    js = [0.01, 0.01, 0.012, 0.011, 0.06, 0.05]
    table = _routing_table(js)
    table[["ci_low", "ci_high"]] = math.nan
    lines = routing_findings(N.routing_data(table))
    assert lines[1].startswith("Verdict: routing drift concentrates")
    assert lines[1].endswith("-> yes (concentrated in the top segment; no interval: analyze "
                             "--bootstrap 0; noise not checked).")
    with_ci = routing_findings(N.routing_data(_routing_table(js)))
    assert "no interval" not in with_ci[1]


def test_rule_minimums():
    assert R.routing_rule([0.1, 0.2]).verdict == R.INCONCLUSIVE
    assert R.routing_rule([0.0] * 4).verdict == R.INCONCLUSIVE
    segs = R.routing_segments([1, 2, 3, 4, 5, 6, 7])
    assert [s.n for s in segs] == [3, 2, 2] and segs[0].mean == 2.0


def _routing_table(js: list[float]) -> pd.DataFrame:
    rows = []
    for b, v in enumerate(js):
        rows.append((b, math.nan, "js_divergence", "pair", v, v * 0.9, v * 1.1))
        rows.append((b, math.nan, "topk_overlap", "pair", 1 - 5 * v, math.nan, math.nan))
        for model, ent in (("base", 1.2), ("sft", 1.0)):
            rows.append((b, math.nan, "load_entropy", model, ent, math.nan, math.nan))
            for e in range(4):
                rows.append((b, e, "load", model, 0.25 + (0.1 if e == b % 4 else -0.1 / 3)
                             * (model == "sft"), math.nan, math.nan))
    df = pd.DataFrame(rows, columns=["block", "expert", "metric", "model", "value", "ci_low",
                                     "ci_high"])
    df.insert(0, "n_blocks", len(js))
    df.insert(0, "run", "moe")
    return df


def test_findings_from_numbers():
    js = [0.01, 0.01, 0.012, 0.011, 0.06, 0.05]
    weights = pd.DataFrame({"run": "moe", "block": [0, 0, 1, 1, 1], "module":
                            ["attn", "expert", "expert", "expert", "mlp"],
                            "expert": [np.nan, 0, 0, 1, np.nan],
                            "metric": "relative", "value": [0.1, 0.02, 0.03, 0.09, 0.2]})
    data = N.routing_data(_routing_table(js), weights)
    lines = routing_findings(data)
    assert lines[0].startswith("Router JS divergence is largest at block 4 (0.0600 "
                               "[0.0540, 0.0660] nats) over 6 sparse blocks (mean 0.0255)")
    assert "top-k overlap is lowest at block 4 (0.700, mean 0.873)" in lines[0]
    assert "mean expert-load entropy 1.200 (base) vs 1.000 (SFT) nats" in lines[0]
    assert lines[1].startswith("Verdict: routing drift concentrates") and "-> yes" in lines[1]
    assert "top 0.0550" in lines[1]
    assert lines[2] == ("[moe] The routed expert that changed most is expert 1 of block 1 "
                        "(relative 0.090); the median over 3 experts is 0.030.")
    assert {t[0] for t in routing_tables(data)} == {
        "fig13_routing_drift", "fig13b_expert_load", "fig13c_expert_weights",
        "fig13_routing_verdict"}
    # the module heatmap of Fig. 4b leaves the per-expert rows to this section
    assert "expert" not in set(N.weight_data(weights).extra["all"]["module"])


@pytest.mark.parametrize("plot", [plots.plot_routing_drift,
                                  lambda d, c=None: plots.plot_expert_load(d),
                                  lambda d, c=None: plots.plot_expert_weights(d)])
def test_figures_draw(plot):
    weights = pd.DataFrame({"run": "moe", "block": [0, 1], "module": "expert", "expert": [0, 1],
                            "metric": "relative", "value": [0.02, 0.03]})
    data = N.routing_data(_routing_table([0.01, 0.02, 0.03]), weights)
    fig = plot(data, None)
    assert fig.axes


def _moe_dynamics() -> pd.DataFrame:
    """One recorded step of a 2-block MoE tune: attention o, the router, the shared expert
    and its gate, and 8 routed experts per block, each small (0.2) but together large."""
    rows = []
    for b in (0, 1):
        rows += [(b, "o", math.nan, 0.4), (b, "router", math.nan, 0.05),
                 (b, "shared_expert", math.nan, 0.3), (b, "shared_expert_gate", math.nan, 0.4)]
        rows += [(b, "expert", e, 0.2) for e in range(8)]
    df = pd.DataFrame(rows, columns=["block", "module", "expert", "update_norm"])
    return df.assign(run="moe", step=10, grad_norm=1.0)


def test_module_changed_most_compares_experts_as_one_module():
    """A single expert's update (0.2) is not set against whole modules (o: 0.4): the routed
    experts of a block count as one module, the norm of all of them (sqrt(8) x 0.2 = 0.566),
    and the shared expert's gate is part of the shared expert (0.5); the sentence says so."""
    from sftscope.report.sections import dynamics_findings

    data = N.dynamics_data(_moe_dynamics())
    s = data.summary.iloc[0]
    assert s["most_module"] == "experts" and s["most_value"] == pytest.approx(0.2 * math.sqrt(8))
    assert s["least_module"] == "router" and s["module_scope"] == N.EXPERTS_AS_ONE
    means = N.module_extremes(_moe_dynamics(), "update_norm", changed_only=True)
    assert means["most_module"] == "experts"
    line = dynamics_findings(data)[0]
    assert ("of the modules (per block, a sparse block's routed experts together as one "
            "module, 'experts'), experts changed most on average (0.566) and router least "
            "(0.050)") in line
    # (compared per expert, as before, the attention's o (0.4) beat every expert (0.2));
    # with no routed experts the sentence is the plain one
    dense = N.dynamics_data(_moe_dynamics().query("module != 'expert'"))
    assert dense.summary.iloc[0]["most_module"] == "shared_expert"
    assert "routed experts" not in dynamics_findings(dense)[0]


def test_weights_module_comparison_names_its_granularity():
    """weights.csv: the per-expert rows stay out of the module comparison (the block's
    'experts' row is all of them); the sentence names the granularity on an MoE only."""
    from sftscope.report.sections import weight_findings

    rows = []
    for b in range(3):
        rows += [(b, "attn", math.nan, 0.1), (b, "o", math.nan, 0.1), (b, "q", math.nan, 0.05),
                 (b, "router", math.nan, 0.02), (b, "experts", math.nan, 0.3),
                 (b, "mlp", math.nan, 0.3)]
        rows += [(b, "expert", e, 0.9 if e == 0 else 0.1) for e in range(4)]
    w = pd.DataFrame(rows, columns=["block", "module", "expert", "value"]).assign(
        run="moe", metric="relative")
    s = N.weight_data(w).summary.iloc[0]
    assert (s["most_module"], s["least_module"]) == ("experts", "router")
    assert s["most_value"] == pytest.approx(0.3)  # the experts row, not expert 0's 0.9
    line = weight_findings(N.weight_data(w))[0]
    assert "of the modules (per block, a sparse block's routed experts together" in line
    dense = w[~w["module"].isin(["expert", "experts", "router"])]
    assert "of the modules, o changes most on average (0.100) and q least (0.050)" in \
        weight_findings(N.weight_data(dense))[0]
