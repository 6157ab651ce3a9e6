"""Dataset-level spectral metrics of the pooled matrix ``Z [N, D]`` (METRICS.md).

``dataset_metrics`` gets everything from two decompositions: singular values of raw ``Z``
(effective rank, rank deficiency, spectral norm, condition number) and the spectrum of the
row-normalised Gram (dataset entropy). The single-metric functions are for notebooks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sftscope.errors import SftscopeError
from sftscope.metrics.entropy import (
    MetricOptions,
    alpha_entropy_batch,
    dataset_entropy,
    svdvals,
    to_f64,
)
from sftscope.metrics.geometry import l2_norm

_EPS64 = float(torch.finfo(torch.float64).eps)


def _check_z(z: Tensor) -> Tensor:
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise SftscopeError(f"expected a non-empty pooled matrix [N, D], got {tuple(z.shape)}")
    return z


def spectrum(z: Tensor) -> Tensor:
    """Singular values of ``Z`` (descending, float64, ``min(N, D)`` of them), in one pass."""
    return svdvals(_check_z(z))


def _numerical_tol(sigma: Tensor, n: int, d: int) -> float:
    smax = float(sigma.max()) if sigma.numel() else 0.0
    return smax * max(n, d) * _EPS64


def _erank(sigma: Tensor, weights: str) -> float:
    w = sigma.clamp_min(0.0) ** (2 if weights == "sigma2" else 1)
    if float(w.sum()) <= 0:
        return 0.0
    return math.exp(float(alpha_entropy_batch(w, 1.0)))


def _rank(sigma: Tensor, n: int, d: int, rank_tol: str) -> int:
    smax = float(sigma.max()) if sigma.numel() else 0.0
    tol = 0.01 * smax if rank_tol == "reference" else _numerical_tol(sigma, n, d)
    return int((sigma > tol).sum()) if smax > 0 else 0


def _condition(sigma: Tensor, n: int, d: int) -> float:
    nonzero = sigma[sigma > _numerical_tol(sigma, n, d)]
    if nonzero.numel() == 0:
        return math.nan
    return float(nonzero.max() / nonzero.min())


def effective_rank(
    z: Tensor, opts: MetricOptions | None = None, *, normalised: bool = False
) -> float:
    """Roy-Vetterli effective rank ``exp(H(sigma / sum sigma))``: how many directions the samples
    really use (``sigma^2`` weights under the reference preset); ``normalised`` divides by
    ``min(N, D)``."""
    opts = opts or MetricOptions()
    n, d = _check_z(z).shape
    e = _erank(spectrum(z), opts.erank_weights)
    return e / min(n, d) if normalised else e


def rank_deficiency(
    z: Tensor, opts: MetricOptions | None = None, *, fraction: bool = False
) -> float:
    """``min(N, D) - rank(Z)`` (numerical rank, or the reference 1 % rule); ``fraction``
    divides by ``min(N, D)``. Counts directions the layer collapsed."""
    opts = opts or MetricOptions()
    n, d = _check_z(z).shape
    k = min(n, d)
    missing = k - _rank(spectrum(z), n, d, opts.rank_tol)
    return missing / k if fraction else float(missing)


def spectral_norm(z: Tensor) -> float:
    """Largest singular value of ``Z``: the strongest direction's scale."""
    return float(spectrum(z).max())


def condition_number(z: Tensor) -> float:
    """``sigma_max / sigma_min`` over the numerically non-zero singular values (NaN if none):
    how anisotropic the used directions are."""
    n, d = _check_z(z).shape
    return _condition(spectrum(z), n, d)


def dataset_metrics(z: Tensor, opts: MetricOptions | None = None) -> dict[str, float]:
    """All dataset-level metrics of one pooled matrix, from one SVD of ``Z`` plus one spectrum of
    the row-normalised Gram.

    Keys: dataset_entropy, effective_rank, effective_rank_norm, rank_deficiency,
    rank_deficiency_frac, spectral_norm, condition_number, l2_norm.
    """
    opts = opts or MetricOptions()
    n, d = _check_z(z).shape
    z64 = to_f64(z)
    sigma = svdvals(z64)
    k = min(n, d)
    er = _erank(sigma, opts.erank_weights)
    missing = k - _rank(sigma, n, d, opts.rank_tol)
    return {
        "dataset_entropy": dataset_entropy(z64, opts),
        "effective_rank": er,
        "effective_rank_norm": er / k,
        "rank_deficiency": float(missing),
        "rank_deficiency_frac": missing / k,
        "spectral_norm": float(sigma.max()),
        "condition_number": _condition(sigma, n, d),
        "l2_norm": l2_norm(z64),
    }
