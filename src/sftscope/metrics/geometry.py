"""Token geometry (sparsity, curvature, pooling) and base-vs-SFT pair metrics (METRICS.md).

Batched functions take padded ``H [B, T, D]`` (any float dtype, any device) and a mask of real
tokens ``[B, T]``; padded positions never change a result, whatever they hold and wherever
they are (left, right or in between).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sftscope.errors import SftscopeError
from sftscope.metric_registry import UNIT, metric_functions, metric_names, register_metric
from sftscope.metrics.entropy import (
    MetricOptions,
    TokenBatch,
    _as_samples,
    _check_mask,
    pad_samples,
    to_f64,
)

# ----------------------------------------------------------------------------- pooling


def pool_batch(h: Tensor, mask: Tensor, how: str = "mean") -> Tensor:
    """One row per sample from its real tokens: masked mean or last real token -> ``[B, D]``.

    Builds the pooled matrix ``Z`` of METRICS.md. Output dtype is at least float32 (the mean is
    accumulated in it); every sample needs at least one real token.
    """
    m = _check_mask(h, mask)
    counts = m.sum(dim=1)
    if bool((counts == 0).any()):
        raise SftscopeError("a sample has no real tokens (empty prompt?); drop it before pooling")
    dtype = torch.promote_types(h.dtype, torch.float32)
    if how == "mean":
        x = torch.where(m[..., None], h.to(dtype), torch.zeros((), dtype=dtype, device=h.device))
        return x.sum(dim=1) / counts[:, None].to(dtype)
    if how == "last":
        pos = torch.arange(h.shape[1], device=h.device)[None, :]
        last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values
        return h[torch.arange(h.shape[0], device=h.device), last].to(dtype)
    raise SftscopeError(f"unknown pooling {how!r}; use mean or last")


# ----------------------------------------------------------------------------- sparsity


def _masked_abs(h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``|h|`` in the states' own float dtype (exact) with every excluded position exactly 0,
    and the mask on its device."""
    m = _check_mask(h, mask)
    a = (h if h.is_floating_point() else h.to(torch.float64)).abs()
    if bool(m.all()):
        return a, m
    return torch.where(m[..., None], a, torch.zeros((), dtype=a.dtype, device=a.device)), m


def _below(a: Tensor, thr: Tensor) -> Tensor:
    """``a < thr`` for ``a`` of any float dtype against float64 thresholds ``thr`` (broadcast),
    exactly as if ``a`` were converted to float64, without converting it: each threshold is
    rounded up to the next value of ``a``'s dtype (no value of that dtype lies between)."""
    if a.dtype == torch.float64:
        return a < thr.to(a.device)
    t = thr.to(a.dtype)  # on thr's device (the CPU where a's device has no float64)
    t = torch.where(t.to(torch.float64) < thr, torch.nextafter(t, torch.full_like(t, math.inf)),
                    t)
    return a < t.to(a.device)


def sparsity_batch(h: Tensor, mask: Tensor, opts: MetricOptions | None = None,
                   groups: Tensor | None = None) -> Tensor:
    """Per sample, the fraction of real-token entries with ``|x| < eps * max|x|`` -> ``[B]``.

    How many near-zero coordinates a layer's states have (float64; NaN where ``T_n == 0``).
    ``max|x|`` is the sample's own, or with ``groups`` (an id per sample, ``[B]``) the maximum
    over all samples of its group in this batch (the research code's batch-wide threshold).
    An all-zero sample gives 0 (strict ``<`` against a zero threshold). Counted in the states'
    own dtype, exactly: ``|x|`` and its maximum are exact there, the threshold ``eps * max|x|``
    is float64.
    """
    opts = opts or MetricOptions()
    a, m = _masked_abs(h, mask)
    smax = to_f64(a.amax(dim=(1, 2)))  # exact; on CPU where the device has no float64
    if groups is not None:
        g = torch.as_tensor(groups, device=smax.device).long()
        if g.shape != smax.shape:
            raise SftscopeError(f"groups must have one id per sample ({smax.shape[0]}), got "
                                f"{tuple(g.shape)}")
        _, inv = torch.unique(g, return_inverse=True)
        gmax = smax.new_zeros(int(inv.max()) + 1).scatter_reduce(0, inv, smax, "amax")
        smax = gmax[inv]
    thr = opts.sparsity_eps * smax
    # excluded positions are 0 in ``a``: below any threshold > 0, so they are taken off again
    small = _below(a, thr[:, None, None]).sum(dim=(1, 2), dtype=torch.int64).to(thr.device)
    excluded = (~m).sum(dim=1).to(thr.device) * a.shape[-1]
    small = (small - torch.where(thr > 0, excluded, 0)).to(torch.float64)
    total = m.sum(dim=1).to(thr.device).to(torch.float64) * h.shape[-1]
    return torch.where(total > 0, small / total.clamp_min(1.0), torch.nan)


def sparsity(xs: Tensor | Sequence[Tensor], opts: MetricOptions | None = None) -> float:
    """Mean over samples (``[T, D]`` or a list of ``[T_n, D]``) of the per-sample sparsity,
    samples grouped in order by ``opts.sparsity_group`` for the threshold."""
    opts = opts or MetricOptions()
    samples = _as_samples(xs)
    vals = []
    size = opts.sparsity_group
    for lo in range(0, len(samples), size):
        h, m = pad_samples(samples[lo:lo + size])
        vals.append(sparsity_batch(h, m, opts, groups=torch.zeros(h.shape[0], dtype=torch.long)))
    out = torch.cat(vals)
    return float(torch.nanmean(out)) if bool((~out.isnan()).any()) else math.nan


class SparsityGroups:
    """Sparsity with one threshold per group of ``opts.sparsity_group`` consecutive samples
    (sample ``i`` is in group ``i // size``), fed batch by batch in any order.

    A group is computed as soon as all of its members (indices below ``n``) have arrived;
    until then its members' states are kept (in their own dtype, on their device), so at most
    one group's worth of samples is held when batches arrive in sample order.
    """

    def __init__(self, opts: MetricOptions, n: int) -> None:
        self.opts, self.n, self.size = opts, n, opts.sparsity_group
        self._held: dict[int, dict[int, tuple[Tensor, Tensor]]] = {}

    @property
    def pending(self) -> bool:
        """Whether some group has arrived only in part."""
        return bool(self._held)

    def held(self) -> list[int]:
        """Samples of groups that have arrived only in part."""
        return sorted(i for members in self._held.values() for i in members)

    def _members(self, g: int) -> int:
        return min(self.size, self.n - g * self.size)

    def add(self, index: Sequence[int] | Tensor, h: Tensor,
            mask: Tensor) -> tuple[Tensor, Tensor]:
        """Add samples ``index`` (``h [B, T, D]``, real-token ``mask [B, T]``); returns the
        indices and sparsities (float64) of every sample whose group is now complete."""
        m = _check_mask(h, mask)
        idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        if len(idx) != h.shape[0]:
            raise SftscopeError(f"{len(idx)} sample indices for a batch of {h.shape[0]}")
        done: list[int] = []
        for row, i in enumerate(idx):
            if not 0 <= i < self.n:
                raise SftscopeError(f"sample index {i} outside 0..{self.n - 1}")
            g = i // self.size
            self._held.setdefault(g, {})[i] = (h[row], m[row])
            if len(self._held[g]) == self._members(g):
                done.append(g)
        out_idx: list[int] = []
        out_val: list[Tensor] = []
        for g in done:
            members = self._held.pop(g)
            order = sorted(members)
            hs, ms = pad_samples([members[i][0] for i in order])
            # pad_samples' mask marks whole rows; the real-token masks are laid over it
            mask_g = torch.zeros(ms.shape, dtype=torch.bool, device=ms.device)
            for r, i in enumerate(order):
                mask_g[r, : members[i][1].shape[0]] = members[i][1]
            vals = sparsity_batch(hs, mask_g, self.opts,
                                  groups=torch.zeros(len(order), dtype=torch.long))
            out_idx += order
            out_val.append(vals.cpu())
        if not out_idx:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        return torch.tensor(out_idx, dtype=torch.long), torch.cat(out_val)


# ----------------------------------------------------------------------------- curvature


def _angle(a: Tensor, b: Tensor) -> Tensor:
    """Angle between unit vectors, ``2 atan2(|a-b|, |a+b|)``: arccos(a·b) without its
    loss of precision near 0 and pi. ``|a+b|`` is ``sqrt(4 - |a-b|^2)`` (unit vectors), which
    saves two passes over the vectors; near pi, where that loses digits, it is measured."""
    diff = torch.linalg.vector_norm(a - b, dim=-1)
    s2 = 4.0 - diff * diff
    summ = s2.clamp_min(0.0).sqrt()
    near = s2 < 0.25  # |a+b| < 1/2: an angle within 0.51 rad of pi
    if bool(near.any()):
        summ = summ.index_put((near,), torch.linalg.vector_norm(a[near] + b[near], dim=-1))
    return 2.0 * torch.atan2(diff, summ)


_COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's floor on each norm


def curvature_batch(h: Tensor, mask: Tensor,
                    opts: MetricOptions | None = None) -> tuple[Tensor, Tensor]:
    """Mean turning angle (radians) of each sample's token trajectory -> ``([B], valid [B])``.

    ``v_t = x_{t+1} - x_t`` over consecutive real tokens, ``theta_t = angle(v_t, v_{t+1})``:
    how sharply the residual stream turns from token to token (0 = straight line). Default:
    angles that touch a zero-length step (two identical consecutive states) are undefined and
    skipped. ``opts.curvature_zero_steps == "right_angle"`` counts them as ``pi/2`` (the cosine
    of a zero vector taken as 0, norms floored at 1e-8 as torch's ``cosine_similarity`` does),
    and ``opts.curvature_cos_clip < 1`` clamps every cosine to ``[-c, c]`` before the arccos
    (both as the research code). A sample is invalid (NaN) when it has fewer than 3 real tokens
    or no defined angle.
    """
    opts = opts or MetricOptions()
    m = _check_mask(h, mask)
    b, t, _ = h.shape
    n_rows = m.sum(dim=1)
    x = to_f64(h)
    if t > 1 and not bool(m.all()) and bool((m[:, 1:] & ~m[:, :-1]).any()):
        # real tokens not already first (left padding, holes): move them to the front, in
        # order (stable sort), so any padding layout works
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
        x = torch.gather(x, 1, order[..., None].expand(-1, -1, h.shape[-1]))
    if t < 3:
        nan = torch.full((b,), math.nan, dtype=torch.float64, device=x.device)
        return nan, torch.zeros(b, dtype=torch.bool, device=x.device)
    v = x[:, 1:] - x[:, :-1]  # [B, T-1, D]
    norm = torch.linalg.vector_norm(v, dim=-1)
    slot = torch.arange(t - 2, device=x.device)[None, :]
    ok = slot < (n_rows.to(x.device) - 2)[:, None]
    skip_zero = opts.curvature_zero_steps == "skip"
    if skip_zero and opts.curvature_cos_clip >= 1.0:
        u = v / torch.where(norm > 0, norm, torch.ones_like(norm))[..., None]
        theta = _angle(u[:, :-1], u[:, 1:])  # [B, T-2]
    else:
        floor = norm.clamp_min(_COS_EPS)
        cos = (v[:, :-1] * v[:, 1:]).sum(dim=-1) / (floor[:, :-1] * floor[:, 1:])
        clip = opts.curvature_cos_clip
        theta = torch.arccos(cos.clamp(-clip, clip))
    if skip_zero:
        ok = ok & (norm[:, :-1] > 0) & (norm[:, 1:] > 0)
    count = ok.sum(dim=1)
    total = torch.where(ok, theta, torch.zeros_like(theta)).sum(dim=1)
    valid = count > 0
    mean = torch.where(valid, total / count.clamp_min(1).to(torch.float64), torch.nan)
    return mean, valid


def curvature(xs: Tensor | Sequence[Tensor],
              opts: MetricOptions | None = None) -> tuple[float, int]:
    """Mean over valid samples of the per-sample mean angle (radians), and the number skipped."""
    vals = [curvature_batch(*pad_samples([x]), opts) for x in _as_samples(xs)]
    means = torch.cat([v[0] for v in vals])
    valid = torch.cat([v[1] for v in vals])
    skipped = int((~valid).sum())
    return (float(means[valid].mean()) if bool(valid.any()) else math.nan), skipped


# ----------------------------------------------------------------------------- token metrics


@register_metric("sparsity", level="token", order=100, label="sparsity", bounds=UNIT)
def _sparsity_metric(batch: TokenBatch) -> Tensor:
    return sparsity_batch(batch.h, batch.mask, batch.opts)  # exact in the states' own dtype


@register_metric("curvature", level="token", order=110, label="curvature (rad)",
                 bounds=(0.0, None))
def _curvature_metric(batch: TokenBatch) -> Tensor:
    curv, valid = curvature_batch(batch.h64, batch.mask, batch.opts)
    return torch.where(valid, curv, torch.full_like(curv, math.nan))


def token_metric_names(opts: MetricOptions | None = None) -> tuple[str, ...]:
    """Names ``token_metrics_batch`` returns for ``opts``, in a stable order: every registered
    ``token`` metric, then their variants."""
    return metric_names("token", opts or MetricOptions())


def token_metrics_batch(h: Tensor, mask: Tensor,
                        opts: MetricOptions | None = None) -> dict[str, Tensor]:
    """Every registered token-level metric of a padded batch, per sample (``[B]`` float64, NaN
    where undefined): prompt entropy (and its further normalisations), sparsity (each sample's
    own threshold: group across batches with ``SparsityGroups``), curvature, and any metric
    declared with ``register_metric(level="token")``. One float64 copy of ``h`` feeds all."""
    batch = TokenBatch(h, mask, opts)
    out: dict[str, Tensor] = {}
    for fn in metric_functions("token"):
        out.update(fn.compute(batch))
    return {k: out[k] for k in token_metric_names(batch.opts)}


# ----------------------------------------------------------------------------- pair metrics


def _pair(zb: Tensor, zs: Tensor) -> tuple[Tensor, Tensor]:
    if zb.ndim != 2 or zs.ndim != 2 or zb.shape[0] != zs.shape[0]:
        raise SftscopeError(
            f"expected two [N, D] matrices with the same rows, got {tuple(zb.shape)} and "
            f"{tuple(zs.shape)}"
        )
    a = to_f64(zb)
    return a, to_f64(zs).to(a.device)


def _row_cos(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine in float64; a zero row gives 0."""
    na = torch.linalg.vector_norm(a, dim=-1)
    nb = torch.linalg.vector_norm(b, dim=-1)
    den = na * nb
    return (a * b).sum(dim=-1) / torch.where(den > 0, den, torch.ones_like(den))


def cosine_similarity(zb: Tensor, zs: Tensor) -> float:
    """Mean over rows of ``cos(zb_n, zs_n)``: do base and SFT point the same way per sample?

    Works for pooled rows or for token rows (``[sum T_n, D]``); a zero row counts as 0.
    """
    if zb.shape != zs.shape:
        raise SftscopeError(f"shapes differ: {tuple(zb.shape)} vs {tuple(zs.shape)}")
    a, b = to_f64(zb), to_f64(zs)
    return float(_row_cos(a, b.to(a.device)).mean())


def cosine_similarity_batch(hb: Tensor, hs: Tensor, mask: Tensor) -> Tensor:
    """Per sample, mean token cosine between base and SFT states over real tokens -> ``[B]``.

    For the ``token`` option: the mean over all real tokens is ``sum(out * T_n) / sum(T_n)``.
    """
    m = _check_mask(hb, mask)
    if hb.shape != hs.shape:
        raise SftscopeError(f"shapes differ: {tuple(hb.shape)} vs {tuple(hs.shape)}")
    c = _row_cos(to_f64(hb), to_f64(hs).to(hb.device))
    c = torch.where(m.to(c.device), c, torch.zeros_like(c))
    n = m.sum(dim=1).to(c.device)
    return torch.where(n > 0, c.sum(dim=1) / n.clamp_min(1).to(torch.float64), torch.nan)


def mean_shift(zb: Tensor, zs: Tensor) -> float:
    """``|| mean_n zs_n - mean_n zb_n ||_2``: how far SFT moved the centre of the samples."""
    a, b = _pair(zb, zs)
    return float(torch.linalg.vector_norm(b.mean(dim=0) - a.mean(dim=0)))


def mean_shift_relative(zb: Tensor, zs: Tensor) -> float:
    """``mean_shift / || mean_n zb_n ||_2`` (NaN when the base mean is 0): scale-free shift."""
    a, b = _pair(zb, zs)
    base = float(torch.linalg.vector_norm(a.mean(dim=0)))
    shift = float(torch.linalg.vector_norm(b.mean(dim=0) - a.mean(dim=0)))
    return shift / base if base > 0 else math.nan


def l2_norm(z: Tensor) -> float:
    """Mean over rows of ``||z_n||_2``: the typical scale of the states at this layer."""
    if z.ndim != 2:
        raise SftscopeError(f"expected pooled states [N, D], got shape {tuple(z.shape)}")
    return float(torch.linalg.vector_norm(to_f64(z), dim=1).mean())


def l2_norm_spread(z: Tensor) -> tuple[float, float]:
    """Spread of the per-sample norms ``||z_n||_2``: sample standard deviation (``ddof = 1``,
    as the research code's ``torch.std``) and coefficient of variation (std / mean); NaN with
    fewer than 2 rows (and the CV where the mean is 0)."""
    if z.ndim != 2:
        raise SftscopeError(f"expected pooled states [N, D], got shape {tuple(z.shape)}")
    norms = torch.linalg.vector_norm(to_f64(z), dim=1)
    if norms.numel() < 2:
        return math.nan, math.nan
    std = float(norms.std(correction=1))
    mean = float(norms.mean())
    return std, (std / mean if mean > 0 else math.nan)


def delta(
    base_value: float | Tensor | np.ndarray, sft_value: float | Tensor | np.ndarray
) -> float:
    """SFT minus base. For per-sample arrays, the mean of the per-sample differences (NaN pairs
    skipped), so skipped samples in either model never bias the difference."""
    if isinstance(base_value, Tensor):
        base_value = base_value.detach().cpu().double().numpy()
    if isinstance(sft_value, Tensor):
        sft_value = sft_value.detach().cpu().double().numpy()
    b = np.asarray(base_value, dtype=np.float64)
    s = np.asarray(sft_value, dtype=np.float64)
    if b.ndim == 0 and s.ndim == 0:
        return float(s - b)
    if b.shape != s.shape:
        raise SftscopeError(f"per-sample values differ in shape: {b.shape} vs {s.shape}")
    d = s - b
    d = d[~np.isnan(d)]
    return float(d.mean()) if d.size else math.nan


# ----------------------------------------------------------------------------- CKA


def _centre(x: Tensor) -> Tensor:
    return x - x.mean(dim=0, keepdim=True)


def _unbiased_hsic(k: Tensor, l_: Tensor) -> Tensor:
    """Debiased HSIC estimator of Song et al. (2012) on N x N Grams (diagonals dropped)."""
    n = k.shape[0]
    k = k - torch.diag(torch.diagonal(k))
    l_ = l_ - torch.diag(torch.diagonal(l_))
    term1 = (k * l_).sum()
    term2 = k.sum() * l_.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (k.sum(dim=0) * l_.sum(dim=0)).sum()
    return (term1 + term2 - term3) / (n * (n - 3))


def _cka_from(num: float, den_b: float, den_s: float) -> float:
    den = den_b * den_s
    return num / den if den > 0 else math.nan


def cka(zb: Tensor, zs: Tensor, unbiased: bool = False) -> float:
    """Linear CKA between base and SFT rows: 1 = same geometry up to rotation and scale.

    Biased: ``||Zsᶜᵀ Zbᶜ||²_F / (||Zbᶜᵀ Zbᶜ||_F ||Zsᶜᵀ Zsᶜ||_F)`` on column-centred matrices,
    through the cheaper of the ``N x N`` and ``D x D`` forms. ``unbiased``: debiased HSIC
    (N x N Grams, needs N > 3; can be NaN on tiny N when a self-HSIC estimate is negative).
    """
    a, b = _pair(zb, zs)
    a, b = _centre(a), _centre(b)
    n = a.shape[0]
    if unbiased:
        if n <= 3:
            raise SftscopeError(f"unbiased CKA needs more than 3 samples, got {n}")
        k, l_ = a @ a.T, b @ b.T
        hkl = float(_unbiased_hsic(k, l_))
        hkk = float(_unbiased_hsic(k, k))
        hll = float(_unbiased_hsic(l_, l_))
        if hkk <= 0 or hll <= 0:
            return math.nan
        return hkl / math.sqrt(hkk * hll)
    if n <= max(a.shape[1], b.shape[1]):
        k, l_ = a @ a.T, b @ b.T
        num = float((k * l_).sum())
        return _cka_from(num, float(torch.linalg.norm(k)), float(torch.linalg.norm(l_)))
    num = float(torch.linalg.norm(b.T @ a) ** 2)
    return _cka_from(num, float(torch.linalg.norm(a.T @ a)), float(torch.linalg.norm(b.T @ b)))


class CKAAccumulator:
    """Biased linear CKA accumulated over minibatches, exactly equal to ``cka`` on all rows.

    Keeps float64 sums of X, Y, XᵀY, XᵀX and YᵀY (the HSIC terms), never per-batch CKA, so
    column centring over the full set is exact. Rows are shifted by the first batch's means
    before summing (CKA is translation invariant) to avoid cancellation. Memory: three
    ``D x D`` float64 matrices on the device of the first batch.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift_x: Tensor | None = None
        self._shift_y: Tensor | None = None
        self._sx: Tensor | None = None
        self._sy: Tensor | None = None
        self._xy: Tensor | None = None
        self._xx: Tensor | None = None
        self._yy: Tensor | None = None

    def update(self, xb: Tensor, xs: Tensor) -> None:
        """Add a batch of paired rows (base ``[n, Db]``, SFT ``[n, Ds]``)."""
        x, y = _pair(xb, xs)
        if self._shift_x is None:
            self._shift_x = x.mean(dim=0)
            self._shift_y = y.mean(dim=0)
            self._sx = torch.zeros_like(self._shift_x)
            self._sy = torch.zeros_like(self._shift_y)
            self._xy = x.new_zeros((x.shape[1], y.shape[1]))
            self._xx = x.new_zeros((x.shape[1], x.shape[1]))
            self._yy = y.new_zeros((y.shape[1], y.shape[1]))
        assert self._shift_y is not None and self._sx is not None and self._sy is not None
        assert self._xy is not None and self._xx is not None and self._yy is not None
        if x.shape[1] != self._sx.shape[0] or y.shape[1] != self._sy.shape[0]:
            raise SftscopeError("batch width differs from earlier batches")
        x = x.to(self._sx.device) - self._shift_x
        y = y.to(self._sx.device) - self._shift_y
        self.n += x.shape[0]
        self._sx += x.sum(dim=0)
        self._sy += y.sum(dim=0)
        self._xy += x.T @ y
        self._xx += x.T @ x
        self._yy += y.T @ y

    def result(self) -> float:
        """CKA of all rows seen so far (NaN before any row or for a constant input)."""
        if self.n == 0 or self._sx is None:
            return math.nan
        assert self._sy is not None and self._xy is not None
        assert self._xx is not None and self._yy is not None
        n = float(self.n)
        cxy = self._xy - torch.outer(self._sx, self._sy) / n
        cxx = self._xx - torch.outer(self._sx, self._sx) / n
        cyy = self._yy - torch.outer(self._sy, self._sy) / n
        num = float(torch.linalg.norm(cxy) ** 2)
        return _cka_from(num, float(torch.linalg.norm(cxx)), float(torch.linalg.norm(cyy)))


# ----------------------------------------------------------------------------- registered pairs


class PooledPair:
    """What a ``pair``-level metric function receives: the base and SFT pooled matrices of one
    layer (same rows) and the options."""

    def __init__(self, zb: Tensor, zs: Tensor, opts: MetricOptions | None = None) -> None:
        self.zb, self.zs, self.opts = zb, zs, opts or MetricOptions()


@register_metric("cka", level="pair", kind="pair", order=10, label="CKA", bounds=UNIT)
def _cka_metric(p: PooledPair) -> float:
    return cka(p.zb, p.zs, unbiased=p.opts.cka_unbiased)


@register_metric("cosine_similarity", level="pair", kind="pair", order=20,
                 label="cosine similarity", bounds=(-1.0, 1.0))
def _cosine_metric(p: PooledPair) -> float:
    return cosine_similarity(p.zb, p.zs)


@register_metric("mean_shift", level="pair", kind="pair", log=True, order=30,
                 label="mean shift", bounds=(0.0, None))
def _mean_shift_metric(p: PooledPair) -> float:
    return mean_shift(p.zb, p.zs)


@register_metric("mean_shift_relative", level="pair", kind="pair", order=40,
                 label="relative mean shift", bounds=(0.0, None))
def _mean_shift_relative_metric(p: PooledPair) -> float:
    return mean_shift_relative(p.zb, p.zs)


def pair_metrics(zb: Tensor, zs: Tensor, opts: MetricOptions | None = None) -> dict[str, float]:
    """Every registered ``pair`` metric of one layer's base and SFT pooled matrices."""
    pair = PooledPair(zb, zs, opts)
    out: dict[str, float] = {}
    for fn in metric_functions("pair"):
        out.update({k: float(v) for k, v in fn.compute(pair).items()})
    return out
