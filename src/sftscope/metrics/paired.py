"""Paired comparison of two conditions scored on the same items (same tokens, same questions):
the interval of the per-item difference ``a - b``. One home for every finding that names a
winner (swap segments, eval models, steer strengths): a winner is named only when this
interval excludes 0, never from two overlapping independent intervals.

Two methods, chosen by ``kind`` (``"auto"`` looks at the values):

- ``"binary"`` (every value 0 or 1: an item right or wrong): the difference of two paired
  proportions, Newcombe's score interval for paired data (his method 10: the two Wilson
  intervals combined with the correlation of the pairs). Only the discordant items move it,
  as in McNemar's test; it is defined at n = 1 and at 0 % and 100 %, where a bootstrap
  collapses to a point.
- ``"mean"`` (losses, per-item accuracies over tokens): the weighted mean of the per-item
  differences, ``sum(w (a - b)) / sum(w)`` (``w`` = tokens per item, or 1), with the
  studentised cluster bootstrap the rest of the tool uses for means
  (:func:`sftscope.metrics.stats.cluster_bootstrap_t`).

Pairs with a NaN on either side are left out; ``n`` counts the pairs used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sftscope.errors import SftscopeError
from sftscope.metrics.stats import cluster_bootstrap_t, wilson

KINDS = ("auto", "binary", "mean")


@dataclass(frozen=True)
class PairedDiff:
    """Mean per-item difference ``a - b`` with its paired interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0 (NaN intervals never are)."""
        return bool(self.low > 0 or self.high < 0)

    def winner(self, a: str, b: str, *, higher_is_better: bool = True) -> str | None:
        """The name of the better side (``a`` or ``b``) when the difference is significant,
        else None."""
        if not self.significant:
            return None
        return a if (self.mean > 0) == higher_is_better else b


def _pairs(a: Sequence[float], b: Sequence[float], weights: Sequence[float] | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64).reshape(-1)
    y = np.asarray(b, dtype=np.float64).reshape(-1)
    w = np.ones_like(x) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if x.shape != y.shape or w.shape != x.shape:
        raise SftscopeError(f"a paired comparison needs one value per item on both sides, got "
                            f"{x.size} and {y.size} values and {w.size} weights")
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(w) & (w > 0)
    return x[keep], y[keep], w[keep]


def _is_binary(x: np.ndarray, y: np.ndarray) -> bool:
    both = np.concatenate([x, y])
    return bool(both.size) and bool(np.isin(both, (0.0, 1.0)).all())


def paired_binary(x: np.ndarray, y: np.ndarray, level: float) -> tuple[float, float, float]:
    """``(p_x - p_y, low, high)`` for paired 0/1 outcomes: Newcombe's interval (method 10)."""
    n = x.size
    both, only_x = float(((x == 1) & (y == 1)).sum()), float(((x == 1) & (y == 0)).sum())
    only_y, none = float(((x == 0) & (y == 1)).sum()), float(((x == 0) & (y == 0)).sum())
    px, py = (both + only_x) / n, (both + only_y) / n
    (lx, ux), (ly, uy) = (map(float, wilson(p, n, level)) for p in (px, py))
    margins = (both + only_x) * (only_y + none) * (both + only_y) * (only_x + none)
    cross = both * none - only_x * only_y
    if cross > 0:  # Newcombe's continuity correction of the correlation
        cross = max(cross - n / 2, 0.0)
    phi = cross / math.sqrt(margins) if margins > 0 else 0.0
    d = px - py
    low = d - math.sqrt(max((px - lx) ** 2 - 2 * phi * (px - lx) * (uy - py) + (uy - py) ** 2,
                            0.0))
    high = d + math.sqrt(max((py - ly) ** 2 - 2 * phi * (py - ly) * (ux - px) + (ux - px) ** 2,
                             0.0))
    return d, max(low, -1.0), min(high, 1.0)


def paired_difference(a: Sequence[float], b: Sequence[float], *, kind: str = "auto",
                      level: float = 0.95, seed: int = 0,
                      weights: Sequence[float] | None = None,
                      n_boot: int = 2000) -> PairedDiff:
    """Paired difference ``a - b`` of two conditions scored on the same items.

    ``a[i]`` and ``b[i]`` are item ``i``'s scores under each condition; ``weights[i]`` (mean
    kind only) its weight, e.g. its number of tokens, so the difference is that of the two
    token-level ratios. ``kind``: ``"binary"``, ``"mean"`` or ``"auto"`` (binary when every
    value is 0 or 1). The interval is NaN (never significant) below two pairs for the mean
    kind and at zero pairs."""
    if kind not in KINDS:
        raise SftscopeError(f"unknown paired kind {kind!r}; use one of {', '.join(KINDS)}")
    if not 0 < level < 1:
        raise SftscopeError(f"confidence level must be between 0 and 1, got {level}")
    x, y, w = _pairs(a, b, weights)
    n = int(x.size)
    if kind == "auto":
        kind = "binary" if weights is None and _is_binary(x, y) else "mean"
    if kind == "binary":
        if weights is not None:
            raise SftscopeError("weights apply to the mean kind only (a 0/1 item weighs one)")
        if not _is_binary(x, y) and n:
            raise SftscopeError("a binary paired comparison needs 0/1 values on both sides")
        if not n:
            return PairedDiff(math.nan, math.nan, math.nan, 0, "newcombe")
        return PairedDiff(*paired_binary(x, y, level), n, "newcombe")
    if not n:
        return PairedDiff(math.nan, math.nan, math.nan, 0, "bootstrap-t")
    diff = (w * (x - y)).sum() / w.sum()
    if n < 2:
        return PairedDiff(float(diff), math.nan, math.nan, n, "bootstrap-t")
    lo, hi = cluster_bootstrap_t((w * (x - y))[:, None], w, max(n_boot, 1), level, seed)
    return PairedDiff(float(diff), float(lo[0]), float(hi[0]), n, "bootstrap-t")
