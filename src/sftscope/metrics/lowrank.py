"""Spectrum numerics shared by the activation metrics and the weight-change metrics.

- ``effective_rank_of``: the one Roy-Vetterli effective rank (``metrics.spectral`` and the
  weight deltas both use it).
- ``rank_tolerance`` / ``numerical_rank``: which singular values count as non-zero, given the
  precision the matrix was computed (or stored) in.
- ``dense_svdvals``: exact singular values when affordable, else randomized subspace iteration
  (and says which); ``lora_svdvals``: the exact spectrum of ``s B A`` from an ``r x r`` core.
- ``spectrum_metrics``: sv1..svK, energy rank, effective and stable rank of a weight change.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sftscope.errors import SftscopeError
from sftscope.metrics.entropy import alpha_entropy_batch

METHODS = ("exact", "randomized")


def effective_rank_of(sigma: Tensor, weights: str = "sigma") -> float:
    """Roy-Vetterli effective rank ``exp(H(q))``, ``q = w / sum w`` with ``w = sigma`` (or
    ``sigma^2`` for ``weights="sigma2"``); 0 for an all-zero spectrum. Zeros never count, so
    padding a spectrum with zeros leaves it unchanged."""
    if weights not in ("sigma", "sigma2"):
        raise SftscopeError(f"unknown effective-rank weights {weights!r}; use sigma or sigma2")
    s = sigma.detach().to(torch.float64).clamp_min(0.0)
    w = s * s if weights == "sigma2" else s
    if float(w.sum()) <= 0:
        return 0.0
    return math.exp(float(alpha_entropy_batch(w, 1.0)))


def dtype_eps(dtype: torch.dtype | str | None) -> float:
    """Machine epsilon of a floating dtype, given as a torch dtype or its name (``"bfloat16"``,
    ``"torch.float16"``, safetensors' ``"BF16"``); float64's for None."""
    if dtype is None:
        return float(torch.finfo(torch.float64).eps)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}.get(name, name)
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise SftscopeError(f"unknown dtype {dtype!r}; use e.g. float32 or bfloat16")
        dtype = resolved
    if not dtype.is_floating_point:
        raise SftscopeError(f"dtype {dtype} is not a floating-point type")
    return float(torch.finfo(dtype).eps)


def rank_tolerance(sigma_max: float, shape: tuple[int, int],
                   dtype: torch.dtype | str | None) -> float | None:
    """``sigma_max * max(N, D) * eps(dtype)``: singular values at or below it are rounding
    noise of a matrix computed in ``dtype``. None when ``max(N, D) * eps >= 1``: then the
    tolerance reaches ``sigma_max`` and no direction could be told from noise (bf16/fp16 states
    of a wide layer), so a rank is not defined at that precision."""
    factor = max(shape) * dtype_eps(dtype)
    if factor >= 1:
        return None
    return float(sigma_max) * factor


def numerical_rank(sigma: Tensor, shape: tuple[int, int],
                   dtype: torch.dtype | str | None) -> int | None:
    """Number of singular values above ``rank_tolerance`` (None where it is not defined)."""
    smax = float(sigma.max()) if sigma.numel() else 0.0
    if smax <= 0:
        return 0
    tol = rank_tolerance(smax, shape, dtype)
    return None if tol is None else int((sigma > tol).sum())


def drop_noise(sigma: Tensor, shape: tuple[int, int], dtype: torch.dtype | str | None) -> Tensor:
    """``sigma`` with the values at or below ``rank_tolerance`` set to 0 (unchanged where the
    tolerance is not defined): what is left is the change the stored precision can resolve."""
    smax = float(sigma.max()) if sigma.numel() else 0.0
    tol = rank_tolerance(smax, shape, dtype) if smax > 0 else None
    if tol is None:
        return sigma
    return torch.where(sigma > tol, sigma, torch.zeros_like(sigma))


def randomized_svdvals(x: Tensor, q: int, niter: int = 2, seed: int = 0) -> Tensor:
    """Top-``q`` singular values by randomized subspace iteration (Halko, Martinsson & Tropp
    2011: the algorithm of ``torch.svd_lowrank``), with its own seeded generator so that the
    result is deterministic and threads can run it side by side."""
    if x.shape[0] < x.shape[1]:
        x = x.T
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(x.shape[1], q, generator=gen, dtype=x.dtype, device=x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(x.T @ basis).Q
        basis = torch.linalg.qr(x @ basis).Q
    return torch.linalg.svdvals(basis.T @ x)


def dense_svdvals(d: Tensor, device: str | torch.device = "cpu", exact_max: int = 512,
                  max_rank: int = 64) -> tuple[Tensor, str]:
    """Singular values of a dense matrix in float64 and how they were found: ``exact`` (full
    SVD) when the smaller side is at most ``max(exact_max, 2 * max_rank)``, else
    ``randomized`` (the top ``max_rank`` only). Falls back to the CPU if the device fails."""
    dev = torch.device(device)
    x = d.to(device=dev, dtype=torch.float64)
    try:
        if min(x.shape) <= max(exact_max, 2 * max_rank):
            return torch.linalg.svdvals(x), "exact"
        return randomized_svdvals(x, min(max_rank, min(x.shape))), "randomized"
    except RuntimeError:
        if dev.type == "cpu":
            raise
        return dense_svdvals(d.cpu(), "cpu", exact_max, max_rank)


def lora_svdvals(b: Tensor, a: Tensor, scale: float = 1.0) -> Tensor:
    """Exact singular values of ``scale * B A`` (``B [out, r]``, ``A [r, in]``) without
    forming it: ``B = Qb Rb`` and ``Aᵀ = Qa Ra`` give ``B A = Qb (Rb Raᵀ) Qaᵀ``, whose singular
    values are those of the small core ``Rb Raᵀ``. Returned descending, float64."""
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    if b64.shape[1] != a64.shape[0]:
        raise SftscopeError(f"LoRA factors do not fit: B is {list(b64.shape)}, A is "
                            f"{list(a64.shape)}")
    rb = torch.linalg.qr(b64, mode="r").R
    ra = torch.linalg.qr(a64.T, mode="r").R
    return torch.linalg.svdvals(rb @ ra.T) * abs(scale)


def energy_rank(sigma: Tensor, energy: float, frac: float = 0.9) -> float:
    """Smallest ``r`` whose top-``r`` singular values hold ``frac`` of ``energy`` (the exact
    ``||dW||_F^2``); NaN when the given values do not reach it (a truncated spectrum)."""
    s2 = sigma.to(torch.float64).clamp_min(0) ** 2
    captured = float(s2.sum())
    if energy <= 0 or captured <= 0:
        return 0.0
    residual = max(energy - captured, 0.0) / energy
    # The denominator is the exact energy; tiny round-off must not push r past the true rank.
    target = frac * (min(energy, captured) if residual < 1e-9 else energy)
    hit = torch.cumsum(s2, 0) >= target
    return float(int(hit.nonzero()[0, 0]) + 1) if bool(hit.any()) else math.nan


def spectrum_metrics(sigma: Tensor, energy: float, top_k: int, n_sv: int) -> dict[str, float]:
    """Low-rank metrics from singular values (descending) and the exact ``||dW||_F^2``.

    ``n_sv`` is ``min(rows, cols)``: ``sv_i`` rows exist for ``i <= min(top_k, n_sv)``.
    ``effective_rank`` (Roy-Vetterli on ``sigma``), ``energy_rank90``, ``stable_rank``
    (``||dW||_F^2 / sigma_1^2``) and ``residual_energy`` (share of ``||dW||_F^2`` outside the
    given values)."""
    sigma = sigma.detach().to(torch.float64).cpu().clamp_min(0)
    out: dict[str, float] = {}
    for i in range(min(top_k, n_sv)):
        out[f"sv{i + 1}"] = float(sigma[i]) if i < sigma.numel() else 0.0
    captured = float((sigma**2).sum())
    if energy <= 0 or captured <= 0:
        out.update(effective_rank=0.0, energy_rank90=0.0, stable_rank=0.0, residual_energy=0.0)
        return out
    residual = max(energy - captured, 0.0) / energy
    if residual < 1e-9:
        residual = 0.0
    out.update(effective_rank=effective_rank_of(sigma), energy_rank90=energy_rank(sigma, energy),
               stable_rank=energy / float(sigma[0]) ** 2, residual_energy=residual)
    return out
