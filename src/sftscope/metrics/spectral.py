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
from functools import cached_property

import torch
from torch import Tensor

from sftscope.errors import SftscopeError
from sftscope.metric_registry import UNIT, metric_functions, metric_names, register_metric
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


class PooledLayer:
    """What a ``dataset``-level metric function receives: one layer's pooled matrix ``z``, the
    options and the compute precision, with the decompositions every metric shares (one SVD of
    ``Z`` in float64), each made on first use."""

    def __init__(self, z: Tensor, opts: MetricOptions | None = None,
                 compute_dtype: DType = None) -> None:
        self.n, self.d = _check_z(z).shape
        self.z, self.opts = z, opts or MetricOptions()
        self.k = min(self.n, self.d)
        self.dtype = _dtype(z, compute_dtype)

    @cached_property
    def z64(self) -> Tensor:
        return to_f64(self.z)

    @cached_property
    def sigma(self) -> Tensor:
        return svdvals(self.z64)

    @cached_property
    def missing(self) -> float:
        """``min(N, D) - rank(Z)`` (NaN where the precision resolves no direction)."""
        rank = _rank(self.sigma, self.n, self.d, self.opts.rank_tol, self.dtype)
        return math.nan if rank is None else float(self.k - rank)

    @cached_property
    def effective_rank(self) -> float:
        return effective_rank_of(self.sigma, self.opts.erank_weights)

    @cached_property
    def norm_spread(self) -> tuple[float, float]:
        return l2_norm_spread(self.z64)


def _entropy_variants(opts: MetricOptions | None) -> tuple[str, ...]:
    return tuple(f"dataset_entropy_{how}"
                 for how in (opts or MetricOptions()).extra_normalisations)


@register_metric("dataset_entropy", level="dataset", order=30, label="dataset entropy",
                 bounds=(0.0, None), variants=_entropy_variants)
def _dataset_entropy_metric(p: PooledLayer) -> dict[str, float]:
    return dataset_entropies(p.z64, p.opts)


@register_metric("effective_rank", level="dataset", order=60, label="effective rank",
                 bounds=(0.0, None))
def _effective_rank_metric(p: PooledLayer) -> float:
    return p.effective_rank


@register_metric("effective_rank_norm", level="dataset", order=10,
                 label="effective rank / min(N, D)", bounds=UNIT)
def _effective_rank_norm_metric(p: PooledLayer) -> float:
    return p.effective_rank / p.k


@register_metric("rank_deficiency", level="dataset", order=70, label="rank deficiency",
                 bounds=(0.0, None))
def _rank_deficiency_metric(p: PooledLayer) -> float:
    return p.missing


@register_metric("rank_deficiency_frac", level="dataset", order=80,
                 label="rank deficiency (fraction)", bounds=UNIT)
def _rank_deficiency_frac_metric(p: PooledLayer) -> float:
    return p.missing / p.k


@register_metric("spectral_norm", level="dataset", log=True, order=40, label="spectral norm",
                 bounds=(0.0, None))
def _spectral_norm_metric(p: PooledLayer) -> float:
    return float(p.sigma.max())


@register_metric("condition_number", level="dataset", log=True, order=50,
                 label="condition number", bounds=(0.0, None))
def _condition_number_metric(p: PooledLayer) -> float:
    return _condition(p.sigma, p.n, p.d, p.opts.condition, p.dtype)


@register_metric("l2_norm", level="dataset", order=90, label="L2 norm", bounds=(0.0, None))
def _l2_norm_metric(p: PooledLayer) -> float:
    return l2_norm(p.z64)


@register_metric("l2_norm_std", level="dataset", order=91, label="L2 norm std over samples",
                 bounds=(0.0, None))
def _l2_norm_std_metric(p: PooledLayer) -> float:
    return p.norm_spread[0]


@register_metric("l2_norm_cv", level="dataset", order=92, label="L2 norm CV (std / mean)",
                 bounds=(0.0, None))
def _l2_norm_cv_metric(p: PooledLayer) -> float:
    return p.norm_spread[1]


def dataset_metric_names(opts: MetricOptions | None = None) -> tuple[str, ...]:
    """Names ``dataset_metrics`` returns for ``opts``: the registered ``dataset`` metrics, then
    their variants."""
    return metric_names("dataset", opts or MetricOptions())


def dataset_metrics(z: Tensor, opts: MetricOptions | None = None, *,
                    compute_dtype: DType = None) -> dict[str, float]:
    """Every registered dataset-level metric of one pooled matrix, from one SVD of ``Z`` plus
    one spectrum of the row-normalised Gram (shared through :class:`PooledLayer`).

    Keys: dataset_entropy (+ dataset_entropy_<norm> for ``opts.entropy_normalisations``),
    effective_rank, effective_rank_norm, rank_deficiency, rank_deficiency_frac, spectral_norm,
    condition_number, l2_norm, l2_norm_std (``ddof = 1``), l2_norm_cv (std / mean), and any
    metric declared with ``register_metric(level="dataset")``.
    ``compute_dtype``: the precision the states were computed in (default: ``z.dtype``).
    """
    layer = PooledLayer(z, opts, compute_dtype)
    out: dict[str, float] = {}
    for fn in metric_functions("dataset"):
        out.update({k: float(v) for k, v in fn.compute(layer).items()})
    return out
