"""The one paired comparison (metrics/paired.py): same items under two conditions; a winner only
when the interval of the per-item difference excludes 0."""

from __future__ import annotations

import math

import pytest

from sftscope.errors import SftscopeError
from sftscope.metrics.paired import paired_difference


def test_clear_binary_winner_at_n8():
    d = paired_difference([1] * 8, [0] * 8)
    assert d.method == "newcombe" and d.n == 8 and d.mean == 1.0
    assert d.significant and d.low > 0.5 and d.high == 1.0
    assert d.winner("sft", "base") == "sft"
    assert d.winner("sft", "base", higher_is_better=False) == "base"


def test_binary_tie_and_small_n_are_not_significant():
    tie = paired_difference([1, 0] * 4, [1, 0] * 4)
    assert tie.mean == 0 and tie.low < 0 < tie.high and not tie.significant
    assert tie.winner("a", "b") is None
    # two discordant items of eight: a difference, but not at this n
    few = paired_difference([1, 1, 0, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 1, 0, 0])
    assert few.mean == 0.25 and not few.significant
    one = paired_difference([1], [0])
    assert one.n == 1 and not one.significant


def test_newcombe_matches_a_hand_computation():
    # 2x2 table: both 12, only a 9, only b 2, neither 21 (n = 44)
    a = [1] * 21 + [0] * 23
    b = [1] * 12 + [0] * 9 + [1] * 2 + [0] * 21
    d = paired_difference(a, b)
    assert d.mean == pytest.approx(7 / 44)
    assert d.low == pytest.approx(0.01124, abs=1e-4) and d.high == pytest.approx(0.29537, abs=1e-4)
    assert d.significant


def test_paired_beats_overlapping_independent_intervals():
    # losses: each item lower under a by ~0.5 although the items vary a lot (independent
    # intervals of the two means overlap widely); the paired interval excludes 0
    b = [1.0, 3.0, 2.0, 5.0, 0.5, 4.0, 2.5, 6.0]
    a = [x - 0.5 + 0.01 * i for i, x in enumerate(b)]
    d = paired_difference(a, b)
    assert d.method == "bootstrap-t" and d.high < 0 and d.significant
    assert d.winner("a", "b", higher_is_better=False) == "a"


def test_mean_kind_weights_nan_and_degenerate_cases():
    d = paired_difference([0.5, 1.0, math.nan], [0.5, 0.0, 0.2], weights=[1, 3, 1])
    assert d.n == 2 and d.mean == pytest.approx(0.75) and d.method == "bootstrap-t"
    assert not paired_difference([2.0], [1.0]).significant  # one pair: no interval
    same = paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same.mean == 0 and not same.significant
    empty = paired_difference([], [])
    assert empty.n == 0 and math.isnan(empty.mean) and not empty.significant


def test_bad_input_is_one_clear_error():
    with pytest.raises(SftscopeError, match="one value per item"):
        paired_difference([1, 0], [1])
    with pytest.raises(SftscopeError, match="unknown paired kind"):
        paired_difference([1], [0], kind="t")
    with pytest.raises(SftscopeError, match="0/1"):
        paired_difference([0.5], [1], kind="binary")
    with pytest.raises(SftscopeError, match="mean kind only"):
        paired_difference([1], [0], kind="binary", weights=[2])
    with pytest.raises(SftscopeError, match="level"):
        paired_difference([1], [0], level=95)
