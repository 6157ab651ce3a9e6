"""The paper-pattern rules on constructed profiles, and findings that follow the plotted numbers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sftscope.report import numbers as N
from sftscope.report import rules as R
from sftscope.report.sections import pair_findings

L = 20
BLOCKS = (np.arange(L) + 0.5) / L  # block depth (b + 0.5) / L
STATES = np.arange(L + 1) / L      # hidden state depth j / L


# ----------------------------------------------------------------------------- (b) J-shape


@pytest.mark.parametrize("name, profile, verdict", [
    ("J-shape", 0.05 + 0.10 * BLOCKS ** 4, R.YES),
    ("flat", np.full(L, 0.08), R.NO),
    ("monotone rising (linear)", 0.02 + 0.10 * BLOCKS, R.YES),
    ("monotone falling", 0.12 - 0.10 * BLOCKS, R.NO),
    ("hump in the middle", 0.05 + 0.10 * np.sin(np.pi * BLOCKS), R.NO),
    ("zero at both ends", np.where((BLOCKS > 0.2) & (BLOCKS < 0.8), 0.1, 0.0), R.NO),
    ("bottom frozen, top changed", np.where(BLOCKS > 0.5, 0.1, 0.0), R.INCONCLUSIVE),
    ("no change at all", np.zeros(L), R.INCONCLUSIVE),
    ("ties: top exactly 1.5x bottom", np.r_[np.full(4, 0.04), np.full(12, 0.05),
                                            np.full(4, 0.06)], R.YES),
])
def test_j_shape_rule(name, profile, verdict):
    v = R.j_shape_rule(BLOCKS, profile)
    assert v.verdict == verdict, (name, v.text())
    assert "1.5x" in v.rule and "bottom > 0" in v.rule
    assert "bottom" in v.numbers and "top" in v.numbers


def test_j_shape_rule_nans_and_small_samples():
    y = 0.05 + 0.10 * BLOCKS ** 4
    y_nan = y.copy()
    y_nan[[3, 9]] = np.nan
    v = R.j_shape_rule(BLOCKS, y_nan)
    assert v.verdict == R.YES and "2 NaN value(s) left out" in v.numbers
    v = R.j_shape_rule(BLOCKS[:4], y[:4])
    assert v.verdict == R.INCONCLUSIVE and "needs 5" in v.why
    v = R.j_shape_rule(BLOCKS, np.full(L, np.nan))
    assert v.verdict == R.INCONCLUSIVE


def test_edge_means_is_what_the_rule_and_findings_use():
    e = R.edge_means(np.arange(10.0))
    assert (e.bottom, e.top, e.n_edge) == (0.5, 8.5, 2) and e.middle == pytest.approx(4.5)
    assert math.isinf(R.edge_means([0, 1, 1, 1, 1]).ratio)


# ----------------------------------------------------------------------------- (a) CKA


def _cka(drop: float) -> np.ndarray:
    late = np.clip((STATES - 0.8) / 0.2, 0, None)
    return 0.99 - drop * late ** 2


def test_cka_rule_profiles():
    assert R.cka_rule(STATES, _cka(0.3)).verdict == R.YES
    assert R.cka_rule(STATES, _cka(0.0)).verdict == R.NO           # flat: no drop
    assert R.cka_rule(STATES, 0.9 + 0.09 * STATES).verdict == R.NO  # rising
    assert R.cka_rule(STATES, 0.7 - 0.2 * STATES).verdict == R.NO   # low from the start
    assert R.cka_rule(STATES, _cka(0.02)).verdict == R.YES          # a tie at the threshold
    v = R.cka_rule(STATES, _cka(0.015))
    assert v.verdict == R.NO and "drop" in v.why


def test_cka_rule_uses_the_intervals():
    y = _cka(0.05)
    tight = R.cka_rule(STATES, y, y - 0.005, y + 0.005)
    wide = R.cka_rule(STATES, y, y - 0.03, y + 0.03)
    assert tight.verdict == R.YES
    assert wide.verdict == R.INCONCLUSIVE and "overlap" in wide.why
    # the early CKA's interval straddles the 0.95 threshold
    y = np.full(L + 1, 0.955)
    y[-3:] = 0.5
    assert R.cka_rule(STATES, y, y - 0.02, y + 0.02).verdict == R.INCONCLUSIVE


def test_cka_rule_minimums_and_nans():
    assert R.cka_rule([0.0, 0.5, 1.0], [0.99, 0.99, 0.5]).verdict == R.INCONCLUSIVE
    assert R.cka_rule(STATES[:10], _cka(0.3)[:10]).verdict == R.INCONCLUSIVE  # none above 0.8
    y = _cka(0.3)
    y[[1, 2]] = np.nan
    v = R.cka_rule(STATES, y)
    assert v.verdict == R.YES and "NaN" in v.numbers


# ----------------------------------------------------------------------------- (c) lens


def test_lens_rule_profiles():
    sharp = 0.01 + 0.6 * np.clip((STATES - 0.8) / 0.2, 0, None) ** 1.5
    assert R.lens_rule(STATES, sharp).verdict == R.YES
    assert R.lens_rule(STATES, 0.6 * STATES).verdict == R.NO                  # steady rise
    assert R.lens_rule(STATES, np.full(L + 1, 0.3)).verdict == R.NO           # flat
    assert R.lens_rule(STATES, np.zeros(L + 1)).verdict == R.NO               # zero everywhere
    assert R.lens_rule(STATES, 0.6 - 0.5 * STATES).verdict == R.NO            # falling
    # zero everywhere with intervals: the absent rise is within the noise
    z = np.zeros(L + 1)
    assert R.lens_rule(STATES, z, z, z + 0.05).verdict == R.INCONCLUSIVE
    # a real profile, but measured on 12 tokens per layer
    v = R.lens_rule(STATES, sharp, n=np.full(L + 1, 12))
    assert v.verdict == R.INCONCLUSIVE and "n = 12" in v.why and "needs 30" in v.why
    # intervals as wide as the rise
    v = R.lens_rule(STATES, sharp, sharp - 0.4, sharp + 0.4)
    assert v.verdict == R.INCONCLUSIVE


def test_lens_pattern_compares_sft_with_base():
    from sftscope.report.patterns import check_lens

    sharp = 0.01 + 0.6 * np.clip((STATES - 0.8) / 0.2, 0, None) ** 1.5

    def probe(base):
        rows = [pd.DataFrame({"layer": np.arange(L + 1), "model": m, "metric": "accuracy",
                              "value": y, "n": 500}) for m, y in (("sft", sharp), ("base", base))]
        return pd.concat(rows, ignore_index=True)

    both = check_lens(probe(sharp))      # the base shows the same pattern
    assert both.verdict == R.YES and "the base shows it too" in both.why
    assert "base accuracy:" in both.numbers and "the base alone: yes" in both.numbers
    # one arrow, the verdict's: the base's own verdict is not a second "-> no" (demo text)
    assert both.text().count(" -> ") == 1
    alone = check_lens(probe(0.6 * STATES))  # only the fine-tune shows it
    assert alone.verdict == R.YES and "base shows it too" not in alone.why
    assert "the base alone: no" in alone.numbers and alone.text().count(" -> ") == 1


# ----------------------------------------------------------------------------- (d) swap


def _pts(values, half=0.002):
    return {i: R.Point(v, v - half, v + half) for i, v in enumerate(values)}


def test_inverted_u_rule():
    assert R.inverted_u_rule(_pts([0.50, 0.53, 0.54, 0.52, 0.49]), 5).verdict == R.YES
    assert R.inverted_u_rule(_pts([0.55, 0.53, 0.52, 0.52, 0.56]), 5).verdict == R.NO
    assert R.inverted_u_rule(_pts([0.50, 0.503, 0.50, 0.50, 0.49], half=0.01),
                             5).verdict == R.INCONCLUSIVE
    tie = {i: R.Point(0.5) for i in range(5)}  # exact ties, no interval
    assert R.inverted_u_rule(tie, 5).verdict == R.NO
    # the issue's case: a middle segment beats the edges but the central one is the worst of
    # all; the old rule (best middle vs better edge) said yes, an inverted U it is not
    dip = R.inverted_u_rule(_pts([0.50, 0.56, 0.40, 0.55, 0.49]), 5)
    assert dip.verdict == R.NO and "worst middle segment 3/5 0.400" in dip.numbers
    assert "best middle segment 2/5 0.560" in dip.numbers
    # every middle beats both edges
    assert R.inverted_u_rule(_pts([0.50, 0.52, 0.58, 0.53, 0.49]), 5).verdict == R.YES
    # loss: lower is better
    loss = _pts([2.0, 1.8, 1.7, 1.9, 2.1])
    assert R.inverted_u_rule(loss, 5, lower_is_better=True).verdict == R.YES
    assert R.inverted_u_rule(loss, 5, lower_is_better=False).verdict == R.NO
    # too few segments / a missing edge
    assert R.inverted_u_rule(_pts([0.5, 0.6]), 2).verdict == R.INCONCLUSIVE
    missing = _pts([0.5, 0.6, 0.55, 0.52])
    assert R.inverted_u_rule(missing, 5).verdict == R.INCONCLUSIVE
    nan = _pts([0.5, 0.6, 0.55, 0.52, float("nan")])
    assert R.inverted_u_rule(nan, 5).verdict == R.INCONCLUSIVE


def test_all_of():
    y = R.Verdict(R.YES, "r", "a")
    n = R.Verdict(R.NO, "r", "b", "fails: x")
    i = R.Verdict(R.INCONCLUSIVE, "r", "c", "too small")
    assert R.all_of([y, y], "r").verdict == R.YES
    assert R.all_of([y, i], "r").verdict == R.INCONCLUSIVE
    assert R.all_of([y, i, n], "r").verdict == R.NO
    assert R.all_of([], "r").verdict == R.INCONCLUSIVE


# ----------------------------------------------------------------------------- (e) sweep


def _sweep(scores: dict[str, float], p: float = 0.01, seeds: int = 3, items: int = 500,
           half: float = 0.01) -> list[R.MaskScore]:
    return [R.MaskScore(m, v, v - half, v + half, math.nan if m == "11111" else p, seeds, items)
            for m, v in scores.items()]


PAPER = {"11111": 0.28, "10000": 0.22, "01000": 0.375, "00100": 0.31, "00010": 0.27,
         "00001": 0.135}


def test_sweep_rule_paper_like():
    v = R.sweep_rule(_sweep(PAPER))
    assert v.verdict == R.YES, v.text()
    assert "01000 0.375" in v.numbers and "00001 0.135" in v.numbers


def test_sweep_rule_the_issue_case_is_not_yes():
    """The full demo: the edge mask 00001 best, three masks tied, 1 seed, 40 items, p >= 0.08."""
    demo = {"11111": 0.10, "10000": 0.10, "01000": 0.075, "00100": 0.10, "00010": 0.05,
            "00001": 0.125}
    v = R.sweep_rule(_sweep(demo, p=0.08, seeds=1, items=40, half=0.1))
    assert v.verdict == R.INCONCLUSIVE
    assert "1 seed(s) (needs 2)" in v.why and "40 items (needs 100)" in v.why
    # with enough data but p >= 0.05 it stays inconclusive
    assert R.sweep_rule(_sweep(demo, p=0.08, half=0.1)).verdict == R.INCONCLUSIVE


def test_sweep_rule_contrary_and_ties():
    worse = dict(PAPER, **{"01000": 0.20, "00100": 0.21, "00010": 0.19})
    assert R.sweep_rule(_sweep(worse, p=0.01)).verdict == R.NO
    tied = dict.fromkeys(PAPER, 0.3)
    v = R.sweep_rule(_sweep(tied, p=1.0))
    assert v.verdict == R.INCONCLUSIVE
    edge_not_worst = dict(PAPER, **{"00010": 0.05})  # a middle mask is the worst, clearly
    assert R.sweep_rule(_sweep(edge_not_worst, half=0.005)).verdict == R.NO
    # loss-like metric: lower is better
    loss = {m: 1 - v for m, v in PAPER.items()}
    assert R.sweep_rule(_sweep(loss), lower_is_better=True).verdict == R.YES
    assert R.sweep_rule(_sweep({"11111": 0.3, "01000": 0.4})).verdict == R.INCONCLUSIVE


def test_sweep_rule_single_seed_and_nan():
    v = R.sweep_rule(_sweep(PAPER, seeds=1))
    assert v.verdict == R.INCONCLUSIVE and "seed" in v.why
    rows = _sweep(dict(PAPER, **{"00100": float("nan")}))
    assert R.sweep_rule(rows).verdict == R.YES


def test_verdict_text_has_rule_numbers_and_verdict():
    v = R.j_shape_rule(BLOCKS, 0.05 + 0.10 * BLOCKS ** 4)
    text = v.text()
    assert text.startswith("J-shape: mean relative change of the top 20% of blocks >= 1.5x")
    assert "; here bottom " in text and text.rstrip().endswith("-> yes")
    assert v.holds is True
    assert R.Verdict(R.INCONCLUSIVE, "r", "n").holds is None


# ----------------------------------------------------------------------------- findings


def test_trend_word_of_a_rising_curve_never_falls():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(3, 40))
        x = np.sort(rng.uniform(0, 1, n))
        x[-1] = 1.0
        y = np.cumsum(rng.exponential(1, n) * (rng.uniform(size=n) > 0.3))
        y = y * rng.uniform(1e-4, 10) + rng.normal(0, 5)
        row = N.profile(x, y)
        assert row["top_trend"] in ("rises", "stays level", "n/a"), (x, y, row)
    assert N.trend_word(0.99, 0.7, 0.7, 0.99) == "falls"
    assert N.trend_word(0.7, 0.99, 0.7, 0.99) == "rises"
    assert N.trend_word(0.9, 0.9, 0.9, 0.9) == "stays level"


def _metrics(cka: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"layer": np.arange(len(cka)), "metric": "cka", "model": "pair",
                         "value": cka})


def test_pair_findings_follow_the_plotted_curve():
    rising = 0.90 + 0.02 * np.arange(L + 1) / L  # the issue: a curve that rises at the top
    data = N.pair_data(_metrics(rising))
    text = " ".join(pair_findings(data))
    assert "falls" not in text and "rises to 0.920 at the top" in text
    # the numbers the sentence cites are the ones in the figure's frame
    assert data.frame["value"].iloc[-1] == pytest.approx(0.92)
    falling = N.pair_data(_metrics(_cka(0.3)))
    assert "falls to 0.690 at the top" in " ".join(pair_findings(falling))
    flat = N.pair_data(_metrics(np.full(L + 1, 0.98)))
    assert "stays level at 0.980" in " ".join(pair_findings(flat))


def test_pair_findings_never_fall_for_random_rising_curves():
    rng = np.random.default_rng(1)
    for _ in range(50):
        y = np.sort(rng.uniform(0.5, 1.0, L + 1))
        text = " ".join(pair_findings(N.pair_data(_metrics(y))))
        assert "falls" not in text, (y, text)


def test_probability_intervals_are_clipped_with_a_note():
    probe = pd.DataFrame({"layer": [0, 1, 2], "model": "sft", "metric": "answer_prob",
                          "value": [0.001, 0.01, 0.2], "ci_low": [-0.01, -0.002, 0.1],
                          "ci_high": [0.012, 0.02, 1.3], "n": 12})
    data = N.lens_data(probe)
    assert data.frame["ci_low"].min() == 0.0 and data.frame["ci_high"].max() == 1.0
    assert any("3 interval end(s) of answer_prob" in n and "[0, 1]" in n for n in data.notes)
    # a metric without bounds is left alone
    loss = probe.assign(metric="loss_delta")
    assert N.lens_data(loss).frame["ci_low"].min() == -0.01


def test_compare_ties_and_thresholds():
    assert R.compare(0.5, 0.5) == R.FAILS                      # "beats" needs more than a tie
    assert R.compare(0.3, 0.1, 0.2, strict=False) == R.HOLDS   # ">= margin": a tie counts
    assert R.compare(0.3, 0.1, 0.2) == R.FAILS
    assert R.compare(0.6, 0.5, 0.0, (0.55, 0.65), (0.45, 0.56)) == R.UNCLEAR
    assert R.compare(0.6, 0.5, 0.0, (0.57, 0.63), (0.45, 0.55)) == R.HOLDS
    assert R.compare(0.4, 0.5, 0.0, (0.35, 0.45), (0.47, 0.55)) == R.FAILS
    assert R.compare(float("nan"), 0.5) == R.UNCLEAR
    assert R.at_least(0.96, 0.95, (0.94, 0.98)) == R.UNCLEAR
    assert R.compare_p(0.4, 0.3, 0.01) == R.HOLDS and R.compare_p(0.4, 0.3, 0.2) == R.UNCLEAR
    assert R.compare_p(0.2, 0.3, 0.01) == R.FAILS and R.compare_p(0.4, 0.3, None) == R.UNCLEAR


def test_figure_draws_the_numbers_the_sentence_cites():
    from sftscope.report import plots

    y = 0.99 - 0.3 * np.clip((STATES - 0.8) / 0.2, 0, None) ** 2
    data = N.pair_data(_metrics(y))
    fig = plots.plot_pair_metrics(data)
    (line,) = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == L + 1]
    np.testing.assert_allclose(line.get_ydata(), data.frame.sort_values("rel_depth")["value"])
    row = data.summary.iloc[0]
    sentence = " ".join(pair_findings(data))
    assert f"falls to {row['last']:.3f} at the top" in sentence
    assert line.get_ydata()[-1] == pytest.approx(row["last"])
    assert f"{row['boundary']:.3f} at j/L = {row['boundary_depth']:.2f}" in sentence


def test_weight_sentence_and_j_rule_share_the_edge_means():
    from sftscope.report import patterns
    from sftscope.report.sections import weight_findings

    w = pd.DataFrame({"block": np.arange(L), "module": "attn", "metric": "relative",
                      "value": 0.05 + 0.10 * BLOCKS ** 4})
    data = N.weight_data(w)
    row = data.summary.iloc[0]
    text = weight_findings(data)[0]
    v = patterns.check_j_shape(w)
    for value in (row["bottom"], row["top"]):
        assert f"{value:.3f}" in text and f"{value:.3f}" in v.numbers
    assert v.verdict == R.YES


def test_adaptive_precision_near_whole_numbers():
    from sftscope.report.sections import f

    assert f(0.99952) == "0.99952"          # not "1.000": the digits that show the change
    assert f(0.9999999) == "0.9999999"
    assert f(1.0) == "1.000" and f(0.5) == "0.500" and f(0.98765) == "0.988"
    assert f(2.0004) == "2.0004" and f(-0.99996) == "-0.99996"
    assert f(1e-5) == "1e-05" and f(float("nan")) == "n/a"


def test_headline_names_where_the_change_starts():
    from sftscope.report.sections import onset_sentence

    layers = np.arange(31)
    shift = np.where(layers < 13, 0.0, 0.5 * 1.25 ** (layers - 13))
    text = onset_sentence(layers, shift)
    top = 0.5 * 1.25 ** 17
    assert text == (f"unchanged up to j = 12 (mean shift exactly 0); the change starts at "
                    f"j = 13 (mean shift 0.500) and grows {top / 0.5:.0f}x to the top "
                    f"({top:.3f} at j = 30)")
    assert onset_sentence(layers, np.zeros(31)).startswith("the mean shift is exactly 0 at "
                                                            "every j (0..30)")
    assert onset_sentence([0, 1, 2], [0.1, 0.2, 0.25]) == (
        "the change is there from j = 0 (mean shift 0.100) and grows 2.5x to the top "
        "(0.250 at j = 2)")
    assert "shrinks to 0.100 at the top" in onset_sentence([0, 1, 2], [0.0, 0.5, 0.1])
    assert "and is 0.600 at the top" in onset_sentence([0, 1, 2], [0.0, 0.5, 0.6])
    assert onset_sentence([0, 1], [np.nan, np.nan]) is None
    # in the report: the headline leads the pair's findings, with near-1 CKA in full digits
    cka = np.where(layers < 13, 1.0, 1.0 - 4.8e-4 * (layers - 12) / 18)
    df = pd.concat([_metrics(cka), _metrics(shift).assign(metric="mean_shift")])
    text = " ".join(pair_findings(N.pair_data(df)))
    assert text.startswith("Unchanged up to j = 12") and "0.99952 at the top" in text


def _swap_table(values, half):
    rows = [("base", "none", "00000", "base", "accuracy", 0.5, 0.49, 0.51, 100),
            ("sft", "none", "00000", "sft", "accuracy", 0.6, 0.59, 0.61, 100)]
    for i, v in enumerate(values):
        mask = "".join("1" if j == i else "0" for j in range(len(values)))
        rows.append((f"base<-sft[{mask}]", "sft-into-base", mask, "base", "accuracy", v,
                     v - half, v + half, 100))
    return pd.DataFrame(rows, columns=["config", "direction", "mask", "head", "metric",
                                       "value", "ci_low", "ci_high", "n"])


def test_swap_findings_ties_and_overlapping_intervals():
    from sftscope.report.sections import swap_findings

    tie = " ".join(swap_findings(N.swap_data(_swap_table([0.6, 0.5, 0.5, 0.5, 0.5], 0.001))))
    assert "4 segments tie for the worst (0.500" in tie and "worst single" not in tie
    assert "best single segment 1/5 (m10000" in tie or "best single segment 1/5 (10000" in tie
    assert "overlap" not in tie
    close = " ".join(swap_findings(N.swap_data(_swap_table([0.52, 0.5, 0.51, 0.5, 0.49], 0.05))))
    assert "their intervals overlap: no segment is clearly better or worse" in close


def test_sweep_findings_ties():
    from sftscope.report.sections import sweep_findings

    summary = pd.DataFrame({"mask": ["11111", "10000", "01000", "00100", "00001"],
                            "seeds": "0", "metric": "accuracy",
                            "mean": [0.4, 0.3, 0.3, 0.3, 0.3], "ci_low": np.nan,
                            "ci_high": np.nan, "n_items": 200, "p_value": np.nan})
    text = " ".join(sweep_findings(N.sweep_data(summary)))
    assert "4 masks tie for the lowest at 0.300" in text and "worst" not in text


def test_clip_note_counts_values_and_interval_ends_apart():
    df = pd.DataFrame({"layer": [0, 1], "model": "pair", "metric": "cka",
                       "value": [1.0 + 1e-9, 0.9], "ci_low": np.nan, "ci_high": np.nan})
    _, notes = N.clip_to_range(df)
    assert notes and notes[0].startswith("1 value(s) of cka") and "interval" not in notes[0]


def test_j_shape_numbers_never_print_n_a_ratio():
    v = R.j_shape_rule(BLOCKS, np.where(BLOCKS > 0.5, 0.1, 0.0))
    assert "ratio undefined" in v.numbers and "n/a" not in v.numbers


def test_figures_have_no_offset_tick_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from sftscope.report import plots

    y = 0.985 - np.linspace(0, 5e-6, L + 1)  # a tiny range far from 0: matplotlib's offset
    raw = plots.plot_pair_metrics(N.pair_data(_metrics(y)))
    FigureCanvasAgg(raw).draw()
    assert raw.axes[0].yaxis.get_major_formatter().get_offset() != ""  # the defect
    fig = plots.plain_ticks(plots.plot_pair_metrics(N.pair_data(_metrics(y))))
    FigureCanvasAgg(fig).draw()
    assert all(ax.yaxis.get_major_formatter().get_offset() == "" for ax in fig.axes)
    assert fig.axes[0].get_yticklabels()[1].get_text().startswith("0.98499")


def test_cka_near_one_is_drawn_as_one_minus_cka_on_a_log_axis():
    from sftscope.report import plots

    layers = np.arange(L + 1)
    cka = np.where(layers < 8, 1.0, 1.0 - 1e-5 * 1.6 ** (layers - 8))
    fig = plots.plot_pair_metrics(N.pair_data(_metrics(cka)))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_title().startswith("1 - CKA")
    (line,) = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == L + 1]
    np.testing.assert_allclose(line.get_ydata(), 1.0 - cka)
    assert any("8 point(s) exactly 1" in t.get_text() for t in ax.texts)
    # far from 1: the plain CKA on a linear axis
    far = plots.plot_pair_metrics(N.pair_data(_metrics(np.linspace(1.0, 0.7, L + 1))))
    assert far.axes[0].get_yscale() == "linear" and far.axes[0].get_title() == "CKA"


def test_steer_findings_name_no_winner_when_intervals_overlap():
    from sftscope.report.sections import steer_findings

    def table(half):
        v = [0.25, 0.375, 0.25]
        return pd.DataFrame({"scale": [0.0, 1.0, 2.0], "metric": "accuracy", "value": v,
                             "ci_low": [x - half for x in v], "ci_high": [x + half for x in v],
                             "n": 8})

    wide = " ".join(steer_findings(N.steer_data(table(0.3))))  # n = 8: wide intervals
    assert "no scale is clearly better than the unsteered base (0.250" in wide
    assert "intervals overlap, n = 8" in wide and "is best at" not in wide
    narrow = " ".join(steer_findings(N.steer_data(table(0.01))))
    assert "accuracy is best at scale 1.00 (0.375, +0.1250 vs the unsteered base" in narrow


def test_sweep_findings_no_winner_when_the_best_overlaps_the_next():
    from sftscope.report.sections import sweep_findings

    def summary(half):
        mean = [0.40, 0.42, 0.30, 0.30]
        return pd.DataFrame({"mask": ["11111", "01000", "00100", "00001"], "seeds": "0",
                             "metric": "accuracy", "mean": mean,
                             "ci_low": [m - half for m in mean],
                             "ci_high": [m + half for m in mean], "n_items": 8,
                             "p_value": np.nan})

    wide = " ".join(sweep_findings(N.sweep_data(summary(0.2))))
    assert "best mask 01000 0.420 (its interval overlaps the next best, 11111: no clear " \
           "winner)" in wide
    narrow = " ".join(sweep_findings(N.sweep_data(summary(0.005))))
    assert "best mask 01000 0.420," in narrow and "no clear winner" not in narrow


# ----------------------------------------------------------------------------- no intervals


def test_a_verdict_without_intervals_says_so():
    """analyze's default --bootstrap 0 (and probe/swap/sweep with 0) leave no interval: the
    verdict is computed on exact numbers and its line says that no noise check was possible."""
    from sftscope.report.patterns import check_cka

    y = _cka(0.3)
    bare = R.cka_rule(STATES, y, hint="analyze --bootstrap 0")
    assert bare.verdict == R.YES
    assert bare.why == "no interval: analyze --bootstrap 0; noise not checked"
    assert "noise not checked" in bare.text()
    nan = np.full(len(y), np.nan)
    assert "no interval" in R.cka_rule(STATES, y, nan, nan).why
    assert "no interval" not in R.cka_rule(STATES, y, y - 0.001, y + 0.001).why
    sharp = np.where(STATES > 0.8, 0.6, 0.01)
    assert "no interval" in R.lens_rule(STATES, sharp).why
    assert "no interval" not in R.lens_rule(STATES, sharp, sharp - 0.01, sharp + 0.01).why
    vals = [0.50, 0.53, 0.54, 0.52, 0.49]
    u = R.inverted_u_rule({i: R.Point(v) for i, v in enumerate(vals)}, 5, hint="swap --bootstrap 0")
    assert u.verdict == R.YES and "swap --bootstrap 0; noise not checked" in u.why
    assert "no interval" not in R.inverted_u_rule(_pts(vals), 5).why
    assert "no interval" in R.all_of([u, u], "r").why  # a yes over several keeps the note
    rows = [R.MaskScore(m, v, seeds=3, n_items=500) for m, v in PAPER.items()]
    assert "no interval" in R.sweep_rule(rows).why
    assert "no interval" not in R.sweep_rule(_sweep(PAPER)).why
    # the pattern check names the option that switched the intervals off
    df = pd.DataFrame({"layer": np.arange(len(STATES)), "rel_depth": STATES, "metric": "cka",
                       "value": y})
    v = check_cka(df)
    assert "no interval: analyze --bootstrap 0; noise not checked" in v.why, v


# ----------------------------------------------------------------------------- paired swap tests


def _paired_swap(per_item, metric="accuracy", half=0.2, tokens=10):
    """A swap table and its per-item table (swap_items.csv) for one direction: ``per_item[s]``
    holds each item's score after swapping segment ``s`` (correct tokens of ``tokens``, or the
    choice 0/1 for ``choice_accuracy``); the table's intervals are +-``half`` (wide: they
    overlap, so only a paired test can tell the segments apart)."""
    k = len(per_item)
    rows, items = [], []
    for s, vals in enumerate(per_item):
        mask = "".join("1" if j == s else "0" for j in range(k))
        config = f"base<-sft[{mask}]"
        vals = np.asarray(vals, float)
        value = vals.mean() / (tokens if metric == "accuracy" else 1)
        rows.append((config, "sft-into-base", mask, "base", metric, value, value - half,
                     value + half, len(vals)))
        for i, v in enumerate(vals):
            token = metric == "accuracy"
            items.append((config, "sft-into-base", mask, "base", np.nan, i,
                          tokens if token else 1, v if token else 0.0, 1.0,
                          np.nan if token else v))
    swap = pd.DataFrame(rows, columns=["config", "direction", "mask", "head", "metric", "value",
                                       "ci_low", "ci_high", "n"])
    table = pd.DataFrame(items, columns=["config", "direction", "mask", "head", "alpha", "item",
                                         "tokens", "correct", "loss", "choice_correct"])
    return swap, table


BASE_ITEMS = np.array([1, 9, 3, 7, 5, 2, 8, 4, 6, 5, 3, 7, 2, 8, 6, 4])  # correct of 10 tokens


def test_swap_findings_name_a_winner_only_on_a_paired_test():
    from sftscope.report.sections import swap_findings

    # every item gains 2 tokens under segment 3 and loses 1 under segment 1: the intervals of
    # the table (+-0.2) overlap, the paired difference on the same items does not include 0
    shifts = [-1, 0, 2, 0, 0]
    swap, items = _paired_swap([BASE_ITEMS + d for d in shifts])
    text = " ".join(swap_findings(N.swap_data(swap, items)))
    assert "best single segment 3/5" in text and "worst single segment 1/5" in text
    assert "paired difference +0.3 [+0.3, +0.3] over n = 16 items" in text
    assert "not significant" not in text and "overlap" not in text
    # without the per-item scores the overlapping intervals name no winner
    old = " ".join(swap_findings(N.swap_data(swap)))
    assert "their intervals overlap: no segment is clearly better or worse" in old
    assert "best single" not in old


def test_swap_findings_at_small_n_say_not_significant():
    from sftscope.report.sections import swap_findings

    # choice accuracy on 8 items: segment 1 gets two more items right than segment 2
    seg = [[1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 1, 0, 0]]
    swap, items = _paired_swap(seg, metric="choice_accuracy", half=0.01)
    text = " ".join(swap_findings(N.swap_data(swap, items)))
    assert "single-segment swaps range from 0.375" in text and "to 0.625" in text
    assert "(segment 2/3)" in text and "(segment 1/3)" in text
    assert "paired difference +0.25 [" in text and "over n = 8 items" in text
    assert "is not significant at this n: no segment is clearly better or worse" in text
    assert "best single" not in text and "worst single" not in text
    # ties: three segments tie for the worst, all items equal: no test needed to say "same"
    tie = [BASE_ITEMS + 1, BASE_ITEMS, BASE_ITEMS, BASE_ITEMS]
    swap, items = _paired_swap(tie)
    text = " ".join(swap_findings(N.swap_data(swap, items)))
    assert "3 segments tie for the worst" in text and "best single segment 1/4" in text
    swap, items = _paired_swap([BASE_ITEMS] * 4)
    assert "every single-segment swap gives the same" in " ".join(
        swap_findings(N.swap_data(swap, items)))


def test_inverted_u_verdict_uses_the_paired_test():
    from sftscope.report.patterns import check_swap

    # middles beat both edges on every item: yes, although the table's intervals overlap
    swap, items = _paired_swap([BASE_ITEMS + d for d in (0, 2, 1, 2, -1)])
    v = check_swap(swap, items)
    assert v.verdict == R.YES, v
    assert "6 of 6 middle-edge pairs significantly in favour of the middle" in v.numbers
    assert "paired worst middle - better edge +0.1" in v.numbers
    assert check_swap(swap).verdict == R.INCONCLUSIVE  # no items: overlapping intervals
    # the issue's demo: the central segment is the worst of all (sft-into-base): no
    swap, items = _paired_swap([BASE_ITEMS + d for d in (0, 2, -2, 2, 0)])
    assert check_swap(swap, items).verdict == R.NO
    # a middle ahead of the edges on only a few of 8 items: not beyond the noise
    few = [[1, 0, 0, 1, 0, 1, 0, 0], [1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1, 0, 0]]
    swap, items = _paired_swap(few, metric="choice_accuracy", half=0.001)
    assert check_swap(swap).verdict == R.YES  # narrow independent intervals alone said yes
    small = check_swap(swap, items)
    assert small.verdict == R.INCONCLUSIVE and "over n = 8 items" in small.numbers


def test_inverted_u_rule_paired_states():
    from sftscope.metrics.paired import PairedDiff

    pts = _pts([0.50, 0.53, 0.54, 0.52, 0.49])
    win, lose, tie = (PairedDiff(0.03, 0.01, 0.05, 100, "x"), PairedDiff(-0.03, -0.05, -0.01,
                      100, "x"), PairedDiff(0.03, -0.01, 0.07, 100, "x"))
    keys = [(m, e) for m in (1, 2, 3) for e in (0, 4)]
    assert R.inverted_u_rule(pts, 5, paired={k: win for k in keys}).verdict == R.YES
    assert R.inverted_u_rule(pts, 5, paired={**{k: win for k in keys}, (2, 4): tie}
                             ).verdict == R.INCONCLUSIVE
    assert R.inverted_u_rule(pts, 5, paired={**{k: win for k in keys}, (1, 0): lose}
                             ).verdict == R.NO
    # loss: the middle must be lower (a negative difference)
    loss = _pts([2.0, 1.8, 1.7, 1.9, 2.1])
    assert R.inverted_u_rule(loss, 5, lower_is_better=True,
                             paired={k: lose for k in keys}).verdict == R.YES


def test_swap_items_are_read_from_the_run_folder(tmp_path):
    import json

    from sftscope.report.patterns import paper_patterns
    from sftscope.report.runs import load_runs
    from sftscope.segments import masks_as_text

    swap, items = _paired_swap([BASE_ITEMS + d for d in (0, 2, 1, 2, -1)])
    (tmp_path / "run.json").write_text(json.dumps({"command": "swap", "n_blocks": 10,
                                                   "config": {"segments": 5}}))
    masks_as_text(swap).to_csv(tmp_path / "swap.csv", index=False)
    masks_as_text(items).to_csv(tmp_path / "swap_items.csv", index=False)
    run, = load_runs([tmp_path])
    assert len(run.tables["swap_items"]) == 5 * len(BASE_ITEMS)
    d = next(p for p in paper_patterns([tmp_path]) if p["pattern"].startswith("(d)"))
    assert d["verdict"] == R.YES and "6 of 6 middle-edge pairs" in d["numbers"]


# ----------------------------------------------------------------------------- eval comparisons


def _eval_runs(correct, task="mmlu", metric="accuracy", questions=None):
    """scores (Wilson intervals) and predictions of eval runs ``run -> [0/1 per item]``."""
    from sftscope.metrics.stats import proportion_ci

    scores, preds = [], []
    for run, vals in correct.items():
        k, n = int(sum(vals)), len(vals)
        scores.append((run, task, metric, k / n, *proportion_ci(k, n), n))
        qs = questions[run] if questions else [f"q{i}" for i in range(n)]
        preds += [(run, task, json_key(i, q), float(v)) for i, (q, v) in enumerate(zip(qs, vals))]
    s = pd.DataFrame(scores, columns=["run", "task", "metric", "value", "ci_low", "ci_high", "n"])
    p = pd.DataFrame(preds, columns=["run", "task", "item", "correct"])
    return s, p


def json_key(i, q):
    import json

    return json.dumps([i, q])


def test_eval_findings_name_no_winner_at_n8_with_overlapping_intervals():
    from sftscope.report.sections import scores_findings

    runs = {"sft": [1, 1, 0, 1, 0, 1, 1, 0], "base": [1, 0, 0, 1, 0, 1, 0, 0]}
    scores, preds = _eval_runs(runs)
    text = " ".join(scores_findings(N.scores_data(scores)))  # no per-item predictions
    assert ("mmlu accuracy: sft (0.625) and base (0.375) are not distinguishable at n = 8 "
            "(their intervals overlap") in text
    assert "better" not in text
    paired = " ".join(scores_findings(N.scores_data(scores, preds)))
    assert ("sft (0.625) and base (0.375) are not distinguishable at n = 8 (paired difference "
            "+0.25 [") in paired and "over n = 8 shared items" in paired
    tie = " ".join(scores_findings(N.scores_data(*_eval_runs({"a": [1, 0] * 4,
                                                              "b": [0, 1] * 4}))))
    assert "a (0.500) and b (0.500) are not distinguishable at n = 8" in tie


def test_eval_findings_name_a_winner_on_a_paired_test():
    from sftscope.report.sections import scores_findings

    sft = [1] * 30 + [0] * 10
    base = [1] * 10 + [0] * 30  # right only where the sft is right as well
    scores, preds = _eval_runs({"base": base, "sft": sft})
    text = " ".join(scores_findings(N.scores_data(scores, preds)))
    assert "mmlu accuracy: sft (0.750) is better than base (0.250), paired difference +0.5 [" \
        in text and "over n = 40 shared items" in text
    # other items (other questions at the same positions): no pairing, the intervals decide
    qs = {"base": [f"b{i}" for i in range(40)], "sft": [f"s{i}" for i in range(40)]}
    scores, preds = _eval_runs({"base": base, "sft": sft}, questions=qs)
    text = " ".join(scores_findings(N.scores_data(scores, preds)))
    assert "sft (0.750) is better than base (0.250) (their intervals do not overlap" in text


def test_eval_predictions_are_read_and_paired(tmp_path):
    import json

    from sftscope.report.runs import load_runs
    from sftscope.report.sections import SPECS, scores_findings

    for run, vals in {"base": [1] * 10 + [0] * 30, "sft": [1] * 30 + [0] * 10}.items():
        d = tmp_path / run
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"command": "eval", "config": {
            "model": f"org/{run}", "task": "mmlu"}}))
        k = sum(vals)
        pd.DataFrame([("mmlu", "accuracy", k / 40, 0.0, 1.0, 40)],
                     columns=["task", "metric", "value", "ci_low", "ci_high", "n"]).to_csv(
            d / "scores.csv", index=False)
        (d / "predictions-mmlu.jsonl").write_text("".join(
            json.dumps({"index": i, "question": f"q{i}", "subject": "x", "target": "A",
                        "prediction": "A" if v else "B", "correct": bool(v)}) + "\n"
            for i, v in enumerate(vals)))
    runs = load_runs([tmp_path / "base", tmp_path / "sft"])
    assert all(len(r.tables["predictions"]) == 40 for r in runs)
    prepare = next(sp.prepare for sp in SPECS if sp.key == "eval")
    text = " ".join(scores_findings(prepare(runs)))
    assert "is better than" in text and "over n = 40 shared items" in text


def test_several_verdicts_say_whose_reason_is_whose():
    """(d) over two directions: the reason names each direction and its own conclusion (the
    demo printed two reasons side by side without saying which direction failed)."""
    no = R.Verdict(R.NO, "rule", "sft-into-base: 1", "fails: middle beats edges")
    maybe = R.Verdict(R.INCONCLUSIVE, "rule", "base-into-sft: 2", "within the noise")
    v = R.all_of([no, maybe], "rule", ["sft-into-base", "base-into-sft"])
    assert v.verdict == R.NO
    assert v.why == ("sft-into-base: no, fails: middle beats edges; "
                     "base-into-sft: inconclusive, within the noise")
    assert R.all_of([no], "rule", ["sft-into-base"]).why == "fails: middle beats edges"
    assert R.all_of([no, maybe], "rule").why == "fails: middle beats edges; within the noise"
