"""Robustness statistics: bootstrap intervals (per value and per sample cluster), t and Wilson
intervals, paired t-test, and the correlation of metrics across layers. Reused by analyze,
probe, swap, eval and sweep."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sftscope.errors import SftscopeError

if TYPE_CHECKING:  # scipy and pandas load lazily: importing the metrics stays cheap
    import pandas as pd

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _np(values: ArrayLike) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().to(torch.float64).numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise SftscopeError(f"confidence level must be between 0 and 1, got {level}")


def bootstrap_ci(
    data: ArrayLike | Callable[[np.ndarray], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    *,
    n: int | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval over samples, reproducible for a given ``seed``.

    ``data`` is either per-sample values ``[N]`` (the statistic is their mean, NaNs skipped)
    or a function ``f(idx) -> float`` evaluated on resampled row indices (``idx`` an int array of
    length ``n``, with repeats): use it for dataset-level metrics, e.g.
    ``lambda idx: dataset_metrics(Z[idx])["effective_rank"]``. Rank-type metrics are biased by the
    duplicated rows of a resample; read their intervals as spread, not as exact coverage.
    """
    _check_level(level)
    if n_boot < 1:
        raise SftscopeError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if callable(data):
        if n is None or n < 1:
            raise SftscopeError("bootstrap over a function needs n, the number of rows (>= 1)")
        stats = np.array(
            [float(data(rng.integers(0, n, size=n))) for _ in range(n_boot)], dtype=np.float64
        )
    else:
        x = _np(data)
        x = x[~np.isnan(x)]
        if x.size == 0:
            return math.nan, math.nan
        idx = rng.integers(0, x.size, size=(n_boot, x.size))
        stats = x[idx].mean(axis=1)
    stats = stats[~np.isnan(stats)]
    if stats.size == 0:
        return math.nan, math.nan
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def _resample_blocks(n: int, n_boot: int, seed: int, max_cells: int = 1 << 22):
    """Resample multiplicities ``[b, n]`` (how often each of ``n`` samples is drawn in each of
    ``b`` resamples with replacement), in blocks of resamples (bounded memory), seeded: the
    same ``(n, n_boot, seed)`` always gives the same resamples."""
    rng = np.random.default_rng(seed)
    step = max(1, max_cells // max(n, 1))
    for s in range(0, n_boot, step):
        b = min(step, n_boot - s)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def cluster_ratio_ci(num: ArrayLike | np.ndarray, den: ArrayLike, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0,
                     bounds: tuple[float, float] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sample-level (cluster) bootstrap interval of the ratio ``sum(num) / sum(den)``.

    ``num``: per-sample sums ``[N]`` or ``[N, K]`` (one interval per column, e.g. per layer),
    ``den``: per-sample counts ``[N]`` (e.g. tokens). Each resample draws ``N`` samples with
    replacement, *with all their tokens*, and recomputes the ratio over them: tokens of one
    sample are not independent (a sample is easy or hard as a whole), and a Wilson interval over
    tokens ignores that and is far too narrow. ``den = 1`` gives the mean over samples. Samples
    with ``den == 0`` carry nothing and are left out. Percentile interval, ``n_boot`` resamples,
    reproducible for a given ``seed`` (the same resamples for every column); ``bounds`` clips
    the interval (a probability stays inside ``[0, 1]``). NaN when ``n_boot < 1`` or fewer than
    two samples count.
    """
    _check_level(level)
    x = np.asarray(num, dtype=np.float64)
    one = x.ndim == 1
    x = x.reshape(x.shape[0], -1)
    d = _np(den)
    if d.shape[0] != x.shape[0]:
        raise SftscopeError(f"cluster bootstrap needs one count per sample, got {d.shape[0]} "
                            f"counts for {x.shape[0]} samples")
    keep = d > 0
    x, d = x[keep], d[keep]
    nan = np.full(x.shape[1], np.nan)
    if n_boot < 1 or x.shape[0] < 2:
        return (nan[0], nan[0]) if one else (nan, nan.copy())
    stats = np.concatenate([(w @ x) / (w @ d)[:, None]
                            for w in _resample_blocks(x.shape[0], n_boot, seed)])
    tail = (1 - level) / 2 * 100
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(stats, [tail, 100 - tail], axis=0)
    if bounds is not None:
        low, high = np.clip(low, *bounds), np.clip(high, *bounds)
    return (float(low[0]), float(high[0])) if one else (low, high)


def mean_ci(values: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval ``(low, high)`` for the mean of ``values`` (NaNs skipped; NaN if < 2)."""
    _check_level(level)
    x = _np(values)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    from scipy import stats as sps

    m = float(x.mean())
    se = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = float(sps.t.ppf(0.5 + level / 2, df=x.size - 1)) * se
    return m - half, m + half


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes out of ``n`` (NaN if n == 0).

    Stays inside [0, 1] and behaves at 0 % and 100 %, unlike the normal interval.
    """
    _check_level(level)
    if n < 0 or k < 0 or k > n:
        raise SftscopeError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    from scipy import stats as sps

    z = float(sps.norm.ppf(0.5 + level / 2))
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_ttest(a: ArrayLike, b: ArrayLike) -> tuple[float, float]:
    """Paired t-test of ``a`` vs ``b`` (same samples): ``(t, two-sided p)``.

    Pairs with a NaN on either side are dropped; fewer than 2 pairs give ``(nan, nan)``.
    """
    x, y = _np(a), _np(b)
    if x.shape != y.shape:
        raise SftscopeError(f"paired test needs equal lengths, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.nan, math.nan
    from scipy import stats as sps

    res = sps.ttest_rel(x, y)
    return float(res.statistic), float(res.pvalue)


def correlation_matrix(df_wide: pd.DataFrame, method: str = "pearson") -> pd.DataFrame:
    """Correlation of metrics across layers (rows = layers, columns = metrics).

    Constant (or all-NaN) columns have no correlation and are dropped; their names are in
    ``result.attrs["dropped"]`` so the caller can say so.
    """
    if method not in ("pearson", "spearman", "kendall"):
        raise SftscopeError(f"unknown correlation method {method!r}; use pearson, spearman "
                            "or kendall")
    import pandas as pd

    num = df_wide.apply(pd.to_numeric, errors="coerce")
    dropped = [c for c in num.columns if num[c].nunique(dropna=True) < 2]
    kept = num.drop(columns=dropped)
    out = kept.corr(method=method)
    out.attrs["dropped"] = [str(c) for c in dropped]
    return out


def correlation_pairs(corr: pd.DataFrame) -> pd.DataFrame:
    """Long form ``metric_a, metric_b, r`` of a correlation matrix (upper triangle, a < b)."""
    import pandas as pd

    cols = list(corr.columns)
    rows = [
        {"metric_a": a, "metric_b": b, "r": float(corr.loc[a, b])}
        for i, a in enumerate(cols)
        for b in cols[i + 1:]
    ]
    return pd.DataFrame(rows, columns=["metric_a", "metric_b", "r"])


def spearman_ci(x: ArrayLike, y: ArrayLike, n_boot: int = 1000, level: float = 0.95,
                seed: int = 0) -> tuple[float, float, float]:
    """Spearman rank correlation of paired values (ties get average ranks) with a percentile
    bootstrap interval over the pairs: ``(rho, low, high)``. Resamples in which either side is
    constant have no correlation and are left out. NaN where fewer than 3 finite pairs or a
    side is constant; the interval is NaN when ``n_boot < 1``."""
    from scipy.stats import rankdata

    _check_level(level)
    a, b = _np(x).astype(np.float64), _np(y).astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    nan = (math.nan, math.nan, math.nan)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return nan

    def rho(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        ru, rv = rankdata(u, axis=-1), rankdata(v, axis=-1)
        ru = ru - ru.mean(-1, keepdims=True)
        rv = rv - rv.mean(-1, keepdims=True)
        den = np.sqrt((ru * ru).sum(-1) * (rv * rv).sum(-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (ru * rv).sum(-1) / den

    r = float(rho(a, b))
    if n_boot < 1:
        return r, math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    boot = rho(a[idx], b[idx])
    boot = boot[np.isfinite(boot)]
    if not boot.size:
        return r, math.nan, math.nan
    tail = (1 - level) / 2
    return r, float(np.quantile(boot, tail)), float(np.quantile(boot, 1 - tail))
