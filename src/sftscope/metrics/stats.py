"""Robustness statistics: bootstrap intervals (per value and per sample cluster), cluster
Wilson and studentised-bootstrap intervals (the methods chosen by ``bench/bench_coverage.py``),
Wilson intervals, paired t-test, and the correlation of metrics across layers. Reused by
analyze, probe, swap, eval, steer and sweep."""

from __future__ import annotations

import math
import warnings
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
    """Bootstrap interval over samples, reproducible for a given ``seed``.

    ``data`` is either per-sample values ``[N]`` (the statistic is their mean, NaNs skipped;
    studentised bootstrap, :func:`cluster_bootstrap_t`, as for every mean) or a function
    ``f(idx) -> float`` evaluated on resampled row indices (``idx`` an int array of length
    ``n``, with repeats; percentile interval): use it for dataset-level metrics, e.g.
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
        if x.size == 1:
            return float(x[0]), float(x[0])
        lo, hi = cluster_bootstrap_t(x[:, None], np.ones(x.size), n_boot, level, seed)
        return float(lo[0]), float(hi[0])
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


def _z(level: float, df: float | None = None) -> float:
    from scipy import stats as sps

    q = 0.5 + level / 2
    return float(sps.norm.ppf(q) if df is None else sps.t.ppf(q, df))


def wilson(p: np.ndarray | float, n: np.ndarray | float, level: float = 0.95
           ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` (possibly effective,
    non-integer) trials; elementwise, inside [0, 1]."""
    z = _z(level)
    p, n = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0), np.asarray(n, dtype=np.float64)
    with np.errstate(all="ignore"):
        den = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / den
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return np.maximum(0.0, centre - half), np.minimum(1.0, centre + half)


def kish_n(den: ArrayLike) -> float:
    """Kish's effective number of samples ``sum(d)^2 / sum(d^2)`` of per-sample weights ``d``
    (= the number of samples when all weigh the same; smaller when a few long samples carry
    most of the tokens)."""
    d = _np(den)
    sq = float((d * d).sum())
    return float(d.sum()) ** 2 / sq if sq > 0 else 0.0


def _columns(num: ArrayLike | np.ndarray, den: ArrayLike) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-sample sums ``[N, K]`` and counts ``[N]``, samples with ``den == 0`` left out."""
    x = np.asarray(num, dtype=np.float64)
    one = x.ndim == 1
    x = x.reshape(x.shape[0], -1)
    d = _np(den)
    if d.shape[0] != x.shape[0]:
        raise SftscopeError(f"cluster interval needs one count per sample, got {d.shape[0]} "
                            f"counts for {x.shape[0]} samples")
    keep = d > 0
    return x[keep], d[keep], one


def cluster_ratio_ci(num: ArrayLike | np.ndarray, den: ArrayLike, n_boot: int = 1000,
                     level: float = 0.95, seed: int = 0,
                     bounds: tuple[float, float] | None = None, *, proportion: bool = False
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Sample-level (cluster) interval of the ratio ``sum(num) / sum(den)``.

    ``num``: per-sample sums ``[N]`` or ``[N, K]`` (one interval per column, e.g. per layer),
    ``den``: per-sample counts ``[N]`` (e.g. tokens; ``den = 1`` gives the mean over samples).
    Tokens of one sample are not independent (a sample is easy or hard as a whole): a Wilson
    interval over tokens ignores that and is far too narrow. Samples with ``den == 0`` carry
    nothing and are left out. Two methods, chosen by a coverage simulation
    (``bench/bench_coverage.py``, docs/metrics.md):

    - ``proportion=True`` (each sample's ``num / den`` lies in [0, 1]: accuracy, agreement,
      probabilities): :func:`cluster_wilson`, the Wilson interval on Kish's effective number of
      samples (the design effect at its largest), >= 95 % coverage over the whole grid, also
      near 0, at 10 samples and with heavy-tailed sample lengths; ``n_boot`` only switches it
      off (0 = no interval).
    - otherwise (loss, rank): :func:`cluster_bootstrap_t`, the studentised cluster bootstrap
      with ``n_boot`` resamples (seeded), floored at Student-t on the effective degrees of
      freedom and widened below :data:`SMALL_N` samples: >= 93 % over the same grid.

    ``bounds`` clips the interval. NaN when ``n_boot < 1`` or fewer than two samples count.
    """
    _check_level(level)
    x, d, one = _columns(num, den)
    nan = np.full(x.shape[1], np.nan)
    if n_boot < 1 or x.shape[0] < 2:
        return (nan[0], nan[0]) if one else (nan, nan.copy())
    if proportion:
        low, high = cluster_wilson(x, d, level)
    else:
        low, high = cluster_bootstrap_t(x, d, n_boot, level, seed)
    if bounds is not None:
        low, high = np.clip(low, *bounds), np.clip(high, *bounds)
    return (float(low[0]), float(high[0])) if one else (low, high)


def cluster_wilson(x: np.ndarray, d: np.ndarray, level: float = 0.95
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Wilson interval of ``sum(x) / sum(d)`` per column of ``x [N, K]`` with ``n`` = Kish's
    effective number of samples of ``d [N]``.

    Why it holds: with each sample's share ``x_i / d_i`` in [0, 1] and samples independent,
    the ratio's variance is at most ``p (1 - p) sum(d^2) / sum(d)^2 = p (1 - p) / n_kish``
    (its value when every sample is all right or all wrong), so this is the Wilson interval
    at the largest possible design effect: valid whatever the correlation of tokens within
    a sample, and defined at 0 correct tokens, where every resampling method collapses to
    [0, 0]."""
    p = x.sum(axis=0) / d.sum()
    return wilson(p, np.full(p.shape, kish_n(d)), level)


SMALL_N = 100
"""Below this many samples a loss/mean interval's tails shrink by ``sqrt(n / SMALL_N)`` (a
small-sample widening chosen by ``bench/bench_coverage.py``)."""


def _colsum(a: np.ndarray) -> np.ndarray:
    """Sums of the columns of ``a [N, K]``, each added in the same order whatever ``K`` (a
    column gets, to the last bit, the interval it would get alone)."""
    return np.ascontiguousarray(a.T).sum(axis=1)


def effective_df(resid: np.ndarray) -> np.ndarray:
    """Satterthwaite's effective degrees of freedom of a variance ``sum(e^2)`` of residuals
    ``resid [N, K]`` (per column): ``(N - 1) (sum e^2)^2 / (N sum e^4)``, ``N - 1`` when every
    sample weighs the same and near 1 when one long or extreme sample carries the variance
    (then the variance estimate is as uncertain as one sample's). At least 1."""
    n = resid.shape[0]
    e2 = resid * resid
    with np.errstate(all="ignore"):
        share = (_colsum(e2) ** 2) / (n * _colsum(e2 * e2))
    return np.maximum(np.nan_to_num(share, nan=1.0) * (n - 1), 1.0)


def jackknife_se(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Jackknife standard error of ``sum(x) / sum(d)`` per column of ``x [N, K]`` (samples
    left out one at a time; ``d [N] > 0``): larger than the linearised one where one sample
    moves the ratio."""
    n = x.shape[0]
    with np.errstate(all="ignore"):
        jack = (_colsum(x) - x) / (d.sum() - d)[:, None]
    return np.sqrt((n - 1) / n * _colsum((jack - _colsum(jack) / n) ** 2))


def cluster_bootstrap_t(x: np.ndarray, d: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Interval of ``sum(x) / sum(d)`` per column of ``x [N, K]`` for unbounded values (loss,
    rank, per-sample means): a studentised (bootstrap-t) cluster bootstrap, made safe for
    few samples and heavy tails. Reproducible for a given ``seed``.

    Samples are resampled with all their tokens and each resample's ratio is standardised by
    its own linearised standard error; the interval is ``r - Q_hi * s, r - Q_lo * s`` with

    - ``Q`` the bootstrap quantiles of those standardised ratios (skewed data give an
      asymmetric interval), each at least Student-t's quantile on Satterthwaite's effective
      degrees of freedom (:func:`effective_df`: when a few samples carry the variance, its
      estimate is unreliable and the resamples cannot show it);
    - ``s`` the larger of the linearised and the jackknife standard error
      (:func:`jackknife_se`: a long sample that moves the ratio widens it);
    - below :data:`SMALL_N` samples, tail probabilities shrunk by ``sqrt(N / SMALL_N)``.

    Measured (``bench/bench_coverage.py``, docs/metrics.md): at least 93 % coverage of a 95 %
    interval from 10 to 1,000 samples with skewed losses and heavy-tailed lengths, where the
    plain bootstrap-t covered 84 %."""
    n = x.shape[0]
    r = _colsum(x) / d.sum()
    resid = x - d[:, None] * r
    se = np.sqrt(_colsum(resid ** 2) / (n * (n - 1))) / d.mean()
    xx, xd, dd = x * x, x * d[:, None], d * d
    ts = []
    for w in _resample_blocks(n, n_boot, seed):
        sd = w @ d                                                  # [b]
        with np.errstate(all="ignore"):
            st = (w @ x) / sd[:, None]                              # [b, K]
            ss = w @ xx - 2 * st * (w @ xd) + st * st * (w @ dd)[:, None]
            se_b = np.sqrt(np.maximum(ss, 0.0) / (n * (n - 1))) / (sd / n)[:, None]
            ts.append((st - r) / se_b)
    t = np.concatenate(ts)
    t[~np.isfinite(t)] = np.nan  # a resample of identical samples has no spread
    tail = (1 - level) / 2 * min(1.0, math.sqrt(n / SMALL_N))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        q_lo, q_hi = np.nanquantile(t, [tail, 1 - tail], axis=0)
    from scipy import stats as sps

    floor = sps.t.ppf(1 - tail, effective_df(resid))
    s = np.maximum(jackknife_se(x, d), se)
    low, high = r - np.fmax(q_hi, floor) * s, r - np.fmin(q_lo, -floor) * s
    flat = se == 0  # every sample has the same ratio: the interval is that value
    low, high = np.where(flat, r, low), np.where(flat, r, high)
    return low, high


def cluster_stat_ci(num: ArrayLike | np.ndarray, stat: Callable[[np.ndarray], np.ndarray],
                    n_boot: int = 1000, level: float = 0.95, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Sample-level (cluster) bootstrap interval of a statistic of per-sample sums.

    ``num``: per-sample sums ``[N, K]``; ``stat(totals [b, K]) -> [b, J]`` the statistic of
    ``b`` resamples' column totals at once (e.g. the entropy of an expert load). The same
    resamples as ``cluster_ratio_ci`` for a given ``(N, n_boot, seed)``. NaN when
    ``n_boot < 1`` or fewer than two samples."""
    _check_level(level)
    x = np.asarray(num, dtype=np.float64)
    x = x.reshape(x.shape[0], -1)
    width = np.asarray(stat(x.sum(0, keepdims=True))).shape[-1]
    nan = np.full(width, np.nan)
    if n_boot < 1 or x.shape[0] < 2:
        return nan, nan.copy()
    stats = np.concatenate([np.asarray(stat(w @ x)).reshape(w.shape[0], -1)
                            for w in _resample_blocks(x.shape[0], n_boot, seed)])
    tail = (1 - level) / 2 * 100
    with np.errstate(all="ignore"):
        low, high = np.nanpercentile(stats, [tail, 100 - tail], axis=0)
    return low, high


def mean_ci(values: ArrayLike, level: float = 0.95, n_boot: int = 2000, seed: int = 0
            ) -> tuple[float, float]:
    """Interval ``(low, high)`` for the mean of ``values`` (NaNs skipped; NaN if < 2):
    :func:`cluster_bootstrap_t` with one value per sample, which follows skewed values
    (losses, lengths) where Student-t's symmetric interval misses, and widens with few values
    (measured: ``bench/bench_coverage.py``)."""
    _check_level(level)
    x = _np(values)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    lo, hi = cluster_bootstrap_t(x[:, None], np.ones(x.size), max(n_boot, 1), level, seed)
    return float(lo[0]), float(hi[0])


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` for ``k`` successes out of ``n`` (NaN if n == 0).

    Stays inside [0, 1] and behaves at 0 % and 100 %, unlike the normal interval.
    """
    _check_level(level)
    if n < 0 or k < 0 or k > n:
        raise SftscopeError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return math.nan, math.nan
    lo, hi = wilson(k / n, n, level)
    return float(lo), float(hi)


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
