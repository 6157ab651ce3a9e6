"""Dataset-level spectral metrics of the pooled matrix ``Z [N, D]`` (METRICS.md).

``dataset_metrics`` gets everything from two decompositions: singular values of raw ``Z``
(effective rank, rank deficiency, spectral norm, condition number) and the spectrum of the
row-normalised Gram (dataset entropy). The single-metric functions are for notebooks.

Which singular values are "non-zero" (rank deficiency, condition number) depends on the
precision the states were computed in: pass ``compute_dtype`` (recorded by the capture as
``info["compute_dtype"]``); by default the dtype of ``Z`` itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sftscope.errors import SftscopeError
from sftscope.metrics.entropy import MetricOptions, dataset_entropies, svdvals, to_f64
from sftscope.metrics.geometry import l2_norm, l2_norm_spread
from sftscope.metrics.lowrank import effective_rank_of, numerical_rank, rank_tolerance

DType = torch.dtype | str | None


def _check_z(z: Tensor) -> Tensor:
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise SftscopeError(f"expected a non-empty pooled matrix [N, D], got {tuple(z.shape)}")
    return z


def spectrum(z: Tensor) -> Tensor:
    """Singular values of ``Z`` (descending, float64, ``min(N, D)`` of them), in one pass."""
    return svdvals(_check_z(z))


def _dtype(z: Tensor, compute_dtype: DType) -> DType:
    return compute_dtype if compute_dtype is not None else z.dtype


def _rank(sigma: Tensor, n: int, d: int, rank_tol: str, dtype: DType) -> int | None:
    """Rank of ``Z``: ``#{sigma > 0.01 sigma_max}`` (reference) or the numerical rank at the
    compute precision (None where that precision cannot resolve any direction)."""
    if rank_tol == "reference":
        smax = float(sigma.max()) if sigma.numel() else 0.0
        return int((sigma > 0.01 * smax).sum()) if smax > 0 else 0
    return numerical_rank(sigma, (n, d), dtype)


def _condition(sigma: Tensor, n: int, d: int, rule: str, dtype: DType) -> float:
    if rule == "reference":  # the research code: all singular values, zeros included
        return float(sigma.max()) / (float(sigma.min()) + 1e-9)
    smax = float(sigma.max()) if sigma.numel() else 0.0
    tol = rank_tolerance(smax, (n, d), dtype) if smax > 0 else 0.0
    if tol is None:
        return math.nan
    nonzero = sigma[sigma > tol]
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
    e = effective_rank_of(spectrum(z), opts.erank_weights)
    return e / min(n, d) if normalised else e


def rank_deficiency(
    z: Tensor, opts: MetricOptions | None = None, *, fraction: bool = False,
    compute_dtype: DType = None,
) -> float:
    """``min(N, D) - rank(Z)``: directions the layer collapsed. Rank: ``#{sigma_i > sigma_max *
    max(N, D) * eps(compute_dtype)}`` (NaN where ``max(N, D) * eps >= 1``), or the reference
    1 % rule. ``fraction`` divides by ``min(N, D)``."""
    opts = opts or MetricOptions()
    n, d = _check_z(z).shape
    k = min(n, d)
    rank = _rank(spectrum(z), n, d, opts.rank_tol, _dtype(z, compute_dtype))
    if rank is None:
        return math.nan
    return (k - rank) / k if fraction else float(k - rank)


def spectral_norm(z: Tensor) -> float:
    """Largest singular value of ``Z``: the strongest direction's scale."""
    return float(spectrum(z).max())


def condition_number(z: Tensor, opts: MetricOptions | None = None, *,
                     compute_dtype: DType = None) -> float:
    """``sigma_max / sigma_min`` over the numerically non-zero singular values (same tolerance
    as ``rank_deficiency``; NaN if none): how anisotropic the used directions are. Reference:
    ``sigma_max / (sigma_min + 1e-9)`` over all of them."""
    opts = opts or MetricOptions()
    n, d = _check_z(z).shape
    return _condition(spectrum(z), n, d, opts.condition, _dtype(z, compute_dtype))


def dataset_metrics(z: Tensor, opts: MetricOptions | None = None, *,
                    compute_dtype: DType = None) -> dict[str, float]:
    """All dataset-level metrics of one pooled matrix, from one SVD of ``Z`` plus one spectrum of
    the row-normalised Gram.

    Keys: dataset_entropy (+ dataset_entropy_<norm> for ``opts.entropy_normalisations``),
    effective_rank, effective_rank_norm, rank_deficiency, rank_deficiency_frac, spectral_norm,
    condition_number, l2_norm, l2_norm_std (``ddof = 1``), l2_norm_cv (std / mean).
    ``compute_dtype``: the precision the states were computed in (default: ``z.dtype``).
    """
    opts = opts or MetricOptions()
    n, d = _check_z(z).shape
    dtype = _dtype(z, compute_dtype)
    z64 = to_f64(z)
    sigma = svdvals(z64)
    k = min(n, d)
    er = effective_rank_of(sigma, opts.erank_weights)
    rank = _rank(sigma, n, d, opts.rank_tol, dtype)
    missing = math.nan if rank is None else float(k - rank)
    std, cv = l2_norm_spread(z64)
    return {
        **dataset_entropies(z64, opts),
        "effective_rank": er,
        "effective_rank_norm": er / k,
        "rank_deficiency": missing,
        "rank_deficiency_frac": missing / k,
        "spectral_norm": float(sigma.max()),
        "condition_number": _condition(sigma, n, d, opts.condition, dtype),
        "l2_norm": l2_norm(z64),
        "l2_norm_std": std,
        "l2_norm_cv": cv,
    }
