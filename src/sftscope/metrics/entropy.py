"""Matrix alpha-entropy (the shared core) and the prompt-level entropy (METRICS.md).

Everything spectral runs in float64. Token-level functions take padded batches
``H: [B, T, D]`` with a mask of real tokens ``[B, T]``; padded positions never change a result
(left or right padding, real tokens need not be contiguous).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from functools import cached_property

import torch
from torch import Tensor

from sftscope.errors import SftscopeError
from sftscope.metric_registry import register_metric

NORMALISATIONS = ("max", "logN", "logD", "logNlogD", "raw")
ERANK_WEIGHTS = ("sigma", "sigma2")
RANK_TOLS = ("eps", "reference")
CONDITIONS = ("nonzero", "reference")
ZERO_STEPS = ("skip", "right_angle")
POOLINGS = ("mean", "last")


@dataclass(frozen=True)
class MetricOptions:
    """Every metric choice that METRICS.md leaves open, in one immutable place.

    ``default`` follows METRICS.md. ``reference`` reproduces the authors' research code (its
    ``metric_utils.py``; the entropy follows Skean et al.'s OFSkean/information_flow: the
    spectrum of the Gram matrix of unit rows, normalised to sum to one). What it sets, and why:

    - Token metrics count padding positions (the capture's ``include_padding``): the research
      code stacks padded samples and never applies the attention mask to them.
    - ``ridge = 1e-6``: prompt entropy is that of ``X̂X̂ᵀ / D + 1e-6 I_T`` (``X̂``: the padded
      ``[T, D]`` sample's rows at unit norm), normalised by ``log(min(T, D))``. The ridge comes
      after the division by ``D``: on ``X̂X̂ᵀ`` it is ``1e-6 * D`` (it used to be ``1e-6``).
    - ``dataset_ridge = 1e-6``: dataset entropy gets the same ridge (``ẐẐᵀ / D + 1e-6 I_N``)
      only when ``N <= D``; for ``N > D`` the research code takes ``sigma(Ẑ)^2``, no ridge.
    - ``erank_weights = "sigma2"``: ``exp(H(sigma^2 / sum sigma^2))``, which the research code
      reports only divided by ``min(N, D)`` (our ``effective_rank_norm``).
    - ``rank_tol = "reference"``: rank ``#{sigma > 0.01 sigma_max}``; the research code
      reports ``1 - rank / min(N, D)`` (our ``rank_deficiency_frac``).
    - ``condition = "reference"``: ``sigma_max / (sigma_min + 1e-9)``, ``sigma_min`` the
      smallest of all ``min(N, D)`` singular values, zeros included.
    - ``sparsity_group = 10``: threshold ``0.01 * max|x|`` over a whole padded batch of 10
      samples (the research code streams its sample files ten at a time, in order); each
      sample's fraction uses its group's threshold, so a group's mean (equal lengths) is the
      research code's batch value.
    - ``curvature_zero_steps = "right_angle"``, ``curvature_cos_clip = 0.999``: the research
      code takes ``arccos(clamp(cos(v_t, v_t+1), -0.999, 0.999))`` with torch's
      ``cosine_similarity`` (norms floored at 1e-8): a zero-length step (between identical
      padding states) has cosine 0, i.e. counts as ``pi/2``, and no angle is below
      ``arccos 0.999``.
    - Already equal: CKA (linear, biased), cosine similarity, mean shift, L2 norm (and its
      std, ``ddof = 1``).
    - Not reproduced, on purpose: float32 arithmetic (we use float64); its epsilons (eigenvalues
      clamped at 1e-10 and ``+1e-10`` in the entropy, ``+1e-9`` in the effective rank and CKA),
      which change values by less than 1e-5 relative on real states; 0 instead of NaN for
      fewer than 2 (entropy) or 3 (curvature) positions; its mean over batches of ten, equal to
      our mean over samples when every batch is full.
    """

    alpha: float = 1.0  # order of the matrix entropy (1 = Shannon / von Neumann)
    normalisation: str = "max"  # "max" | "logN" | "logD" | "logNlogD" | "raw": the primary one
    # further normalisations reported too, as <metric>_<norm> (e.g. dataset_entropy_logN)
    entropy_normalisations: tuple[str, ...] = ()
    ridge: float = 0.0  # prompt entropy: added to the diagonal of X̂X̂ᵀ / D (reference: 1e-6)
    dataset_ridge: float = 0.0  # dataset entropy: added to ẐẐᵀ / D, only when N <= D (ref 1e-6)
    erank_weights: str = "sigma"  # "sigma" (Roy-Vetterli) | "sigma2" (reference)
    rank_tol: str = "eps"  # "eps" (numerical rank, compute dtype) | "reference" (> 1 % sigma_max)
    condition: str = "nonzero"  # "nonzero" | "reference": sigma_max / (sigma_min + 1e-9), all sigma
    sparsity_eps: float = 0.01  # |x| < sparsity_eps * max|x| counts as zero
    sparsity_group: int = 1  # samples (in sample order) sharing one max|x| (reference: 10)
    curvature_zero_steps: str = "skip"  # angles at a zero-length step: skipped | pi/2 (reference)
    curvature_cos_clip: float = 1.0  # cos clamped to [-c, c] before arccos (reference: 0.999)
    pooling: str = "mean"  # "mean" | "last": how token rows become one row of Z
    cka_unbiased: bool = False  # debiased HSIC (Song et al. 2012) instead of the biased one

    def __post_init__(self) -> None:
        extra = self.entropy_normalisations
        if isinstance(extra, str):
            extra = tuple(x for x in extra.replace(",", " ").split() if x)
        object.__setattr__(self, "entropy_normalisations", tuple(extra))
        checks = (
            ("normalisation", self.normalisation, NORMALISATIONS),
            ("erank_weights", self.erank_weights, ERANK_WEIGHTS),
            ("rank_tol", self.rank_tol, RANK_TOLS),
            ("condition", self.condition, CONDITIONS),
            ("curvature_zero_steps", self.curvature_zero_steps, ZERO_STEPS),
            ("pooling", self.pooling, POOLINGS),
            *(("entropy normalisation", x, NORMALISATIONS) for x in self.entropy_normalisations),
        )
        for name, value, valid in checks:
            if value not in valid:
                raise SftscopeError(
                    f"unknown {name} {value!r}; use one of {', '.join(valid)}"
                )
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise SftscopeError(f"alpha must be a finite number >= 0, got {self.alpha}")
        for name in ("ridge", "dataset_ridge"):
            if not getattr(self, name) >= 0:
                raise SftscopeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.sparsity_eps > 0:
            raise SftscopeError(f"sparsity_eps must be > 0, got {self.sparsity_eps}")
        if not (isinstance(self.sparsity_group, int) and self.sparsity_group >= 1):
            raise SftscopeError(f"sparsity_group must be an integer >= 1, got "
                                f"{self.sparsity_group!r}")
        if not 0 < self.curvature_cos_clip <= 1:
            raise SftscopeError(f"curvature_cos_clip must be in (0, 1], got "
                                f"{self.curvature_cos_clip}")

    @property
    def extra_normalisations(self) -> tuple[str, ...]:
        """``entropy_normalisations`` without the primary one and without repeats."""
        return tuple(dict.fromkeys(x for x in self.entropy_normalisations
                                   if x != self.normalisation))


PRESETS: dict[str, MetricOptions] = {
    "default": MetricOptions(),
    "reference": MetricOptions(ridge=1e-6, dataset_ridge=1e-6, erank_weights="sigma2",
                               rank_tol="reference", condition="reference", sparsity_group=10,
                               curvature_zero_steps="right_angle", curvature_cos_clip=0.999),
}


def get_options(name: str = "default", **overrides: object) -> MetricOptions:
    """The preset ``name`` with ``overrides`` applied (unknown names fail with the valid ones)."""
    if name not in PRESETS:
        raise SftscopeError(
            f"unknown metric preset {name!r}; use one of {', '.join(sorted(PRESETS))}"
        )
    valid = {f.name for f in fields(MetricOptions)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise SftscopeError(
            f"unknown metric option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}"
        )
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- numerics helpers


def to_f64(x: Tensor) -> Tensor:
    """``x`` as float64, on CPU when the device has no float64 (e.g. MPS)."""
    try:
        return x.to(torch.float64)
    except (RuntimeError, TypeError):
        return x.detach().cpu().to(torch.float64)


class TokenBatch:
    """What a ``token``-level metric function receives: the padded states ``h [B, T, D]`` in
    their own dtype, the real-token ``mask [B, T]``, the options, and one float64 copy of the
    states shared by every metric that needs it (made on first use)."""

    def __init__(self, h: Tensor, mask: Tensor, opts: MetricOptions | None = None) -> None:
        self.h, self.mask, self.opts = h, mask, opts or MetricOptions()

    @cached_property
    def h64(self) -> Tensor:
        return to_f64(self.h)


def _in_f64(op: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``op`` of ``x`` in float64, on the CPU when the device's kernel fails."""
    x = to_f64(x)
    try:
        return op(x)
    except RuntimeError:
        return op(x.cpu()).to(x.device)


def eigvalsh(k: Tensor) -> Tensor:
    """Eigenvalues (ascending) of symmetric ``k`` in float64; CPU fallback if the device fails."""
    return _in_f64(torch.linalg.eigvalsh, k)


def svdvals(z: Tensor) -> Tensor:
    """Singular values (descending) of ``z`` in float64; CPU fallback if the device fails."""
    return _in_f64(torch.linalg.svdvals, z)


def unit_rows(x: Tensor) -> Tensor:
    """Rows scaled to unit L2 norm; zero rows stay zero (they add only zero eigenvalues)."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _check_mask(h: Tensor, mask: Tensor) -> Tensor:
    if h.ndim != 3:
        raise SftscopeError(f"expected hidden states [B, T, D], got shape {tuple(h.shape)}")
    if mask.shape != h.shape[:2]:
        raise SftscopeError(
            f"mask shape {tuple(mask.shape)} does not match hidden states {tuple(h.shape[:2])}"
        )
    return mask.to(device=h.device).bool()


def _as_samples(xs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(xs, Tensor):
        if xs.ndim == 2:
            return [xs]
        if xs.ndim == 3:
            return list(xs)
        raise SftscopeError(f"expected [T, D] or a list of [T_n, D] tensors, got {tuple(xs.shape)}")
    out = list(xs)
    for x in out:
        if x.ndim != 2:
            raise SftscopeError(f"each sample must be [T_n, D], got shape {tuple(x.shape)}")
    return out


def pad_samples(xs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad ``[T_n, D]`` samples into ``H [B, T, D]`` and a bool mask ``[B, T]``."""
    samples = _as_samples(xs)
    if not samples:
        raise SftscopeError("no samples given")
    t_max = max(x.shape[0] for x in samples)
    d = samples[0].shape[1]
    h = samples[0].new_zeros((len(samples), t_max, d))
    mask = torch.zeros((len(samples), t_max), dtype=torch.bool, device=samples[0].device)
    for i, x in enumerate(samples):
        if x.shape[1] != d:
            raise SftscopeError(f"samples have different widths ({x.shape[1]} vs {d})")
        h[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = True
    return h, mask


# ----------------------------------------------------------------------------- entropy core


def alpha_entropy_batch(eigs: Tensor, alpha: float = 1.0) -> Tensor:
    """Matrix alpha-entropy of each row of eigenvalues ``[..., k]`` -> ``[...]`` (float64).

    Eigenvalues are clamped at 0 and normalised to ``p = lambda / sum(lambda)``; only ``p > 0``
    enters, so padding with exact zeros never changes a value. ``alpha == 1`` uses the exact
    Shannon limit ``-sum p log p``. An all-zero spectrum has entropy 0.
    """
    lam = to_f64(eigs).clamp_min(0.0)
    total = lam.sum(dim=-1, keepdim=True)
    p = lam / torch.where(total > 0, total, torch.ones_like(total))
    pos = p > 0
    safe = torch.where(pos, p, torch.ones_like(p))
    if alpha == 1.0:
        return -(torch.where(pos, p * torch.log(safe), torch.zeros_like(p))).sum(dim=-1)
    power = torch.where(pos, safe**alpha, torch.zeros_like(p)).sum(dim=-1)
    out = torch.log(torch.where(power > 0, power, torch.ones_like(power))) / (1.0 - alpha)
    return out


def alpha_entropy(eigs: Tensor, alpha: float = 1.0) -> float:
    """Matrix alpha-entropy ``S_alpha`` (natural log) of one PSD spectrum ``eigs [k]``.

    ``S_alpha = log(sum p^alpha) / (1 - alpha)``, ``S_1 = -sum p log p`` with ``0 log 0 = 0``.
    """
    if eigs.ndim != 1:
        raise SftscopeError(f"alpha_entropy takes one spectrum [k], got {tuple(eigs.shape)}")
    return float(alpha_entropy_batch(eigs, alpha))


def entropy_normaliser(rows: Tensor | float, dim: int, how: str) -> Tensor | float:
    """The divisor of ``normalise_entropy``: log(min(rows, D)), log rows, log D,
    log rows * log D or 1."""
    if how == "raw":
        return 1.0
    if how == "logD":
        return math.log(dim)
    if isinstance(rows, Tensor):
        rows64 = to_f64(rows)
        if how == "logN":
            return torch.log(rows64)
        if how == "logNlogD":
            return torch.log(rows64) * math.log(dim)
        if how == "max":
            return torch.log(rows64.clamp_max(float(dim)))
    else:
        log_rows = math.log(rows) if rows > 0 else -math.inf
        if how == "logN":
            return log_rows
        if how == "logNlogD":
            return log_rows * math.log(dim) if rows > 0 else -math.inf
        if how == "max":
            return math.log(min(rows, dim)) if rows > 0 else -math.inf
    raise SftscopeError(f"unknown normalisation {how!r}; use one of {', '.join(NORMALISATIONS)}")


def normalise_entropy(
    s: Tensor | float, rows: Tensor | int, dim: int, how: str = "max"
) -> Tensor | float:
    """Scale an entropy ``s`` by ``log(min(rows, dim))`` (max), ``log rows``, ``log dim``,
    ``log rows * log dim`` or 1.

    Makes entropies of different sizes comparable (1 = flat spectrum). The value is NaN where
    the divisor is 0 or undefined (one row, or ``D == 1``): such a matrix has no spread to measure.
    """
    norm = entropy_normaliser(rows, dim, how)
    if isinstance(s, Tensor) or isinstance(norm, Tensor):
        s_t = to_f64(torch.as_tensor(s))
        n_t = torch.as_tensor(norm, dtype=torch.float64, device=s_t.device)
        return torch.where(n_t > 0, s_t / torch.where(n_t > 0, n_t, 1.0), torch.nan)
    return float(s) / norm if norm > 0 else math.nan


def _gram(x: Tensor, unit: bool = False) -> Tensor:
    """The smaller Gram of ``x [..., n, D]``: ``x xᵀ`` when ``n <= D``, else ``xᵀ x`` (the same
    non-zero spectrum). ``unit``: that of ``x`` with rows at unit norm; for ``x xᵀ`` by scaling
    with its own diagonal, ``k_ij / (|x_i| |x_j|)``, which saves a pass over ``x`` (zero rows
    stay zero)."""
    n, d = x.shape[-2:]
    if n > d:
        u = unit_rows(x) if unit else x
        return u.transpose(-1, -2) @ u
    k = x @ x.transpose(-1, -2)
    if unit:
        s = k.diagonal(dim1=-2, dim2=-1).sqrt()
        s = torch.where(s > 0, s, torch.ones_like(s))
        k = k / (s[..., :, None] * s[..., None, :])
    return k


def _trimmed_spectra(x: Tensor, unit: bool = False) -> Tensor | None:
    """Each sample's spectrum from its own rows up to its last non-zero one, when that costs
    clearly less than the padded batch (CPU: LAPACK decomposes one matrix at a time, in time
    ``~ n^3``, so a batch padded to its longest sample pays for the padding).

    The rows past a sample's last non-zero row are zero, so its spectrum is that of the trimmed
    rows plus zeros: the same values (to rounding). ``None`` when trimming would not pay.
    """
    b, t, d = x.shape
    nonzero = (x != 0).any(-1)  # [B, T]
    last = torch.where(nonzero.any(-1), t - nonzero.flip(-1).int().argmax(-1), 0).tolist()
    sizes = [min(n, d) for n in last]
    if sum(n ** 3 for n in sizes) > 0.7 * b * min(t, d) ** 3:
        return None
    lam = x.new_zeros((b, min(t, d)))
    for i, n in enumerate(last):
        if n == 0:
            continue
        lam[i, :sizes[i]] = eigvalsh(_gram(x[i, :n], unit)).flip(-1).clamp_min(0.0)
    return lam


def gram_spectrum_batch(x: Tensor, n_rows: Tensor, ridge: float = 0.0,
                        unit: bool = False) -> Tensor:
    """Spectrum of each sample's ``X_n X_nᵀ + ridge I_{T_n}`` from zero-padded rows ``x [B,T,D]``
    (``unit``: of ``X̂_n``, its rows at unit norm).

    ``x`` holds each sample's real rows with every other row exactly zero, so the padded Gram's
    spectrum is the sample's spectrum plus zeros. Uses the ``T x T`` Gram when ``T <= D`` and the
    ``D x D`` form otherwise (same non-zero spectrum). Returns ``[B, T]`` float64: entries
    ``< T_n`` (descending) are the ``T_n x T_n`` spectrum including the ridge, the rest are 0.
    """
    x = to_f64(x)
    b, t, d = x.shape
    # trimming pays on CPU for a padded batch (a batch without padding has nothing to trim)
    ragged = x.device.type == "cpu" and b > 1 and int(n_rows.min()) < t
    lam = _trimmed_spectra(x, unit) if ragged else None
    if lam is None:
        lam = eigvalsh(_gram(x, unit)).flip(-1).clamp_min(0.0)  # descending, [B, min(T, D)]
    if lam.shape[-1] < t:
        lam = torch.cat([lam, lam.new_zeros((b, t - lam.shape[-1]))], dim=-1)
    lam = lam.to(x.device)
    slot = torch.arange(t, device=x.device)[None, :]
    real = slot < n_rows.to(x.device)[:, None]
    # rank <= min(T_n, D), so only the first T_n slots may be non-zero; zero the rest exactly
    return torch.where(real, lam + ridge, torch.zeros_like(lam))


def _prompt_raw(h: Tensor, mask: Tensor, opts: MetricOptions) -> tuple[Tensor, Tensor]:
    """Unnormalised prompt entropy ``[B]`` and real-row counts ``[B]`` of a padded batch."""
    m = _check_mask(h, mask)
    x = to_f64(h)
    m = m.to(x.device)
    if not bool(m.all()):
        # where, not multiply: padded slots may hold NaN/inf (fully masked attention rows)
        x = torch.where(m[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    n_rows = m.sum(dim=1)
    # the ridge is defined on X̂X̂ᵀ / D (research code); entropy ignores the scale, so it is
    # ridge * D on X̂X̂ᵀ
    lam = gram_spectrum_batch(x, n_rows, opts.ridge * h.shape[-1], unit=True)
    return alpha_entropy_batch(lam, opts.alpha), n_rows


def _normalised(s: Tensor, n_rows: Tensor, dim: int, how: str) -> Tensor:
    out = normalise_entropy(s, n_rows.to(s.device), dim, how)
    assert isinstance(out, Tensor)
    return torch.where(n_rows.to(out.device) > 0, out, torch.nan)


def prompt_entropy_batch(h: Tensor, mask: Tensor, opts: MetricOptions | None = None) -> Tensor:
    """Prompt entropy of every sample of a padded batch -> ``[B]`` float64 (NaN if ``T_n < 2``).

    Rows (real tokens) scaled to unit norm, ``S_alpha`` of ``X̂ X̂ᵀ`` (plus ``opts.ridge`` on
    ``X̂ X̂ᵀ / D``) normalised by ``log(min(T_n, D))`` (per ``opts.normalisation``): how spread
    the prompt's tokens are.
    """
    opts = opts or MetricOptions()
    s, n_rows = _prompt_raw(h, mask, opts)
    return _normalised(s, n_rows, h.shape[-1], opts.normalisation)


def _prompt_variants(opts: MetricOptions | None) -> tuple[str, ...]:
    return tuple(f"prompt_entropy_{how}" for how in (opts or MetricOptions()).extra_normalisations)


@register_metric("prompt_entropy", level="token", order=20, label="prompt entropy",
                 bounds=(0.0, None), variants=_prompt_variants)
def _prompt_entropy_metric(batch: TokenBatch) -> dict[str, Tensor]:
    return prompt_entropies_batch(batch.h64, batch.mask, batch.opts)


def prompt_entropies_batch(h: Tensor, mask: Tensor,
                           opts: MetricOptions | None = None) -> dict[str, Tensor]:
    """``prompt_entropy`` (primary normalisation) plus ``prompt_entropy_<norm>`` for every
    further normalisation in ``opts.entropy_normalisations``, from one spectrum per sample."""
    opts = opts or MetricOptions()
    s, n_rows = _prompt_raw(h, mask, opts)
    d = h.shape[-1]
    out = {"prompt_entropy": _normalised(s, n_rows, d, opts.normalisation)}
    for how in opts.extra_normalisations:
        out[f"prompt_entropy_{how}"] = _normalised(s, n_rows, d, how)
    return out


def prompt_entropy(xs: Tensor | Sequence[Tensor], opts: MetricOptions | None = None) -> float:
    """Mean prompt entropy over samples (``[T, D]`` or a list of ``[T_n, D]``), NaNs skipped."""
    vals = torch.cat([prompt_entropy_batch(*pad_samples([x]), opts) for x in _as_samples(xs)])
    return float(torch.nanmean(vals)) if bool((~vals.isnan()).any()) else math.nan


def _dataset_raw(z: Tensor, opts: MetricOptions) -> float:
    if z.ndim != 2:
        raise SftscopeError(f"expected pooled states [N, D], got shape {tuple(z.shape)}")
    n, d = z.shape
    z64 = to_f64(z)[None]
    # research code: ẐẐᵀ / D + ridge I when N <= D; sigma(Ẑ)^2 without a ridge when N > D
    ridge = opts.dataset_ridge * d if n <= d else 0.0
    lam = gram_spectrum_batch(z64, torch.tensor([n], device=z64.device), ridge, unit=True)
    return float(alpha_entropy_batch(lam, opts.alpha)[0])


def dataset_entropy(z: Tensor, opts: MetricOptions | None = None) -> float:
    """Entropy of the pooled matrix ``Z [N, D]``: rows to unit norm, ``S_alpha(Ẑ Ẑᵀ)``, normalised.

    How spread the samples are at this layer (1 = as spread as ``min(N, D)`` directions allow).
    ``opts.dataset_ridge`` is added to ``ẐẐᵀ / D`` when ``N <= D`` (as the research code does).
    """
    opts = opts or MetricOptions()
    s = _dataset_raw(z, opts)
    return float(normalise_entropy(s, z.shape[0], z.shape[1], opts.normalisation))


def dataset_entropies(z: Tensor, opts: MetricOptions | None = None) -> dict[str, float]:
    """``dataset_entropy`` (primary normalisation) plus ``dataset_entropy_<norm>`` for every
    further normalisation in ``opts.entropy_normalisations``, from one spectrum."""
    opts = opts or MetricOptions()
    s = _dataset_raw(z, opts)
    n, d = z.shape
    out = {"dataset_entropy": float(normalise_entropy(s, n, d, opts.normalisation))}
    for how in opts.extra_normalisations:
        out[f"dataset_entropy_{how}"] = float(normalise_entropy(s, n, d, how))
    return out
