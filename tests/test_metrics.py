"""Metrics (METRICS.md) against independent float64 numpy formulas, known values, invariances
and padding invariance of the batched versions."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from sftscope.errors import SftscopeError
from sftscope.metrics import (
    PRESETS,
    CKAAccumulator,
    MetricOptions,
    alpha_entropy,
    bootstrap_ci,
    cka,
    condition_number,
    correlation_matrix,
    correlation_pairs,
    cosine_similarity,
    cosine_similarity_batch,
    curvature,
    curvature_batch,
    dataset_entropy,
    dataset_metrics,
    delta,
    effective_rank,
    get_options,
    l2_norm,
    mean_ci,
    mean_shift,
    mean_shift_relative,
    normalise_entropy,
    paired_ttest,
    pool_batch,
    prompt_entropy,
    prompt_entropy_batch,
    proportion_ci,
    rank_deficiency,
    sparsity,
    sparsity_batch,
    spectral_norm,
    spectrum,
    token_metrics_batch,
)

REF = PRESETS["reference"]

# ----------------------------------------------------------------------------- numpy references


def np_entropy(lam: np.ndarray, alpha: float = 1.0) -> float:
    lam = np.clip(np.asarray(lam, dtype=np.float64), 0, None)
    p = lam / lam.sum()
    p = p[p > 0]
    if alpha == 1.0:
        return float(-(p * np.log(p)).sum())
    return float(np.log((p**alpha).sum()) / (1 - alpha))


def np_prompt_entropy(x: np.ndarray, ridge: float = 0.0, alpha: float = 1.0) -> float:
    """T x T Gram of unit rows divided by D, plus the ridge, always (never switches form)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    xh = x / np.where(norms > 0, norms, 1.0)
    k = xh @ xh.T / x.shape[1] + ridge * np.eye(x.shape[0])
    s = np_entropy(np.linalg.eigvalsh(k), alpha)
    return s / np.log(min(x.shape[0], x.shape[1]))


def np_sparsity(x: np.ndarray, eps: float = 0.01) -> float:
    a = np.abs(np.asarray(x, dtype=np.float64))
    return float((a < eps * a.max()).mean())


def np_curvature(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    v = np.diff(x, axis=0)
    angles = []
    for a, b in zip(v[:-1], v[1:], strict=True):
        c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        angles.append(np.arccos(np.clip(c, -1, 1)))
    return float(np.mean(angles))


def np_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(
        np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    )


def np_unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al.'s unbiased-centring formulation of Song et al.'s HSIC."""

    def centre(g: np.ndarray) -> np.ndarray:
        n = g.shape[0]
        g = g.copy()
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0)
        return g

    k, l_ = centre(x @ x.T), centre(y @ y.T)
    return float((k * l_).sum() / (np.linalg.norm(k) * np.linalg.norm(l_)))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def orth(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(rand(n, n, seed=seed))
    return q


# ----------------------------------------------------------------------------- options


def test_presets_and_get_options():
    assert get_options("default") == MetricOptions()
    ref = get_options("reference")
    assert (ref.ridge, ref.erank_weights, ref.rank_tol) == (1e-6, "sigma2", "reference")
    assert get_options("reference", alpha=2.0).alpha == 2.0
    with pytest.raises(SftscopeError, match="default.*reference"):
        get_options("nope")
    with pytest.raises(SftscopeError, match="unknown metric option"):
        get_options("default", bogus=1)
    with pytest.raises(SftscopeError, match="normalisation"):
        MetricOptions(normalisation="weird")
    with pytest.raises(SftscopeError):
        MetricOptions(alpha=-1.0)


# ----------------------------------------------------------------------------- entropy core


def test_alpha_entropy_known_values():
    n = 7
    assert alpha_entropy(torch.ones(n), 1.0) == pytest.approx(math.log(n))
    assert alpha_entropy(torch.ones(n), 2.0) == pytest.approx(math.log(n))
    assert alpha_entropy(torch.tensor([3.0, 0, 0, 0]), 1.0) == 0.0
    assert alpha_entropy(torch.tensor([3.0, 0, 0, 0]), 0.5) == pytest.approx(0.0, abs=1e-15)
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0, -1e-12])  # negative noise clamps to 0
    for a in (0.5, 1.0, 2.0, 3.0):
        assert alpha_entropy(lam, a) == pytest.approx(np_entropy(lam.numpy(), a), rel=1e-12)
    # exact zeros appended never change it
    assert alpha_entropy(torch.cat([lam, torch.zeros(5)]), 1.0) == alpha_entropy(lam, 1.0)


def test_alpha_one_is_the_limit():
    lam = torch.tensor([5.0, 3.0, 1.0, 0.2, 0.01], dtype=torch.float64)
    s1 = alpha_entropy(lam, 1.0)
    assert alpha_entropy(lam, 1 - 1e-6) == pytest.approx(s1, abs=1e-5)
    assert alpha_entropy(lam, 1 + 1e-6) == pytest.approx(s1, abs=1e-5)
    assert alpha_entropy(lam, 1 - 1e-6) > s1 > alpha_entropy(lam, 1 + 1e-6)  # decreasing in α


def test_normalise_entropy():
    s = math.log(5)
    assert normalise_entropy(s, 5, 10, "max") == pytest.approx(1.0)
    assert normalise_entropy(s, 20, 5, "max") == pytest.approx(1.0)
    assert normalise_entropy(s, 5, 10, "logN") == pytest.approx(1.0)
    assert normalise_entropy(s, 5, 10, "logD") == pytest.approx(s / math.log(10))
    assert normalise_entropy(s, 5, 10, "raw") == s
    assert math.isnan(normalise_entropy(0.0, 1, 10, "max"))
    t = normalise_entropy(torch.tensor([s, s]), torch.tensor([5, 1]), 10, "max")
    assert t[0].item() == pytest.approx(1.0) and math.isnan(t[1].item())


# ----------------------------------------------------------------------------- prompt entropy


def test_prompt_entropy_known_values():
    assert prompt_entropy(torch.eye(6)) == pytest.approx(1.0)  # identity Gram -> log n
    assert prompt_entropy(orth(8)[:5] * 3.0) == pytest.approx(1.0)  # orthogonal rows, any scale
    one_hot = torch.zeros(5, 8)
    one_hot[:, 2] = torch.arange(1.0, 6.0)
    assert prompt_entropy(one_hot) == pytest.approx(0.0, abs=1e-12)
    raw = prompt_entropy(torch.eye(6), MetricOptions(normalisation="raw"))
    assert raw == pytest.approx(math.log(6))


@pytest.mark.parametrize("t,d", [(6, 16), (16, 6)])
def test_prompt_entropy_matches_numpy_both_forms(t, d):
    x = rand(t, d, seed=t)
    x[2] = 0.0  # a zero row adds a zero eigenvalue, no NaN
    assert prompt_entropy(x) == pytest.approx(np_prompt_entropy(x.numpy()), rel=1e-10)
    assert prompt_entropy(x, REF) == pytest.approx(
        np_prompt_entropy(x.numpy(), ridge=1e-6), rel=1e-10
    )
    a2 = MetricOptions(alpha=2.0)
    assert prompt_entropy(x, a2) == pytest.approx(np_prompt_entropy(x.numpy(), alpha=2.0),
                                                  rel=1e-10)
    # mean over a list of samples
    xs = [x, rand(t + 1, d, seed=99)]
    expect = np.mean([np_prompt_entropy(s.numpy()) for s in xs])
    assert prompt_entropy(xs) == pytest.approx(expect, rel=1e-10)


def test_prompt_entropy_t_greater_than_d_uses_dxd(monkeypatch):
    import sftscope.metrics.entropy as ent

    sizes = []
    real = ent.eigvalsh

    def spy(k):
        sizes.append(tuple(k.shape[-2:]))
        return real(k)

    monkeypatch.setattr(ent, "eigvalsh", spy)
    x = rand(40, 5, seed=3)
    val = prompt_entropy(x)
    assert sizes == [(5, 5)]
    assert val == pytest.approx(np_prompt_entropy(x.numpy()), rel=1e-10)  # numpy uses T x T


def test_reference_ridge_changes_entropy_only_slightly():
    x = rand(5, 32, seed=4)
    a, b = prompt_entropy(x), prompt_entropy(x, REF)
    assert a != b and abs(a - b) < 1e-4


# ----------------------------------------------------------------------------- padding invariance


def _padded_batch(samples, layouts, t_max, junk=1e3):
    """Place samples at given positions, with large junk in every padded slot."""
    b, d = len(samples), samples[0].shape[1]
    h = torch.full((b, t_max, d), junk, dtype=torch.float64) + rand(b, t_max, d, seed=77)
    mask = torch.zeros(b, t_max, dtype=torch.bool)
    for i, (x, pos) in enumerate(zip(samples, layouts, strict=True)):
        h[i, pos] = x
        mask[i, pos] = True
    pads = (~mask).nonzero()
    h[tuple(pads[0])] = math.nan  # fully masked attention rows can hold NaN or inf
    h[tuple(pads[-1])] = math.inf
    return h, mask


def _layouts(lengths, t_max):
    right = list(range(lengths[0]))
    left = list(range(t_max - lengths[1], t_max))
    gaps = list(range(0, 2 * lengths[2], 2))  # non-contiguous real tokens
    return [right, left, gaps]


@pytest.mark.parametrize("d", [16, 4])  # 4: T_max > D so the D x D form runs on the batch
def test_batched_metrics_ignore_padding(d):
    lengths = [5, 7, 4]
    t_max = 9
    samples = [rand(n, d, seed=10 + i) for i, n in enumerate(lengths)]
    samples[1][3] = samples[1][2]  # a zero-length step inside sample 1
    h, mask = _padded_batch(samples, _layouts(lengths, t_max), t_max)
    for opts in (MetricOptions(), REF, MetricOptions(alpha=2.0, normalisation="logN")):
        got = prompt_entropy_batch(h.float(), mask, opts)
        want = torch.tensor(
            [prompt_entropy(s.float(), opts) for s in samples], dtype=torch.float64
        )
        torch.testing.assert_close(got, want.double(), rtol=1e-9, atol=1e-12)
    np_want = [np_prompt_entropy(s.numpy()) for s in samples]
    np.testing.assert_allclose(prompt_entropy_batch(h, mask).numpy(), np_want, rtol=1e-10)
    np.testing.assert_allclose(
        prompt_entropy_batch(h, mask, REF).numpy(),
        [np_prompt_entropy(s.numpy(), ridge=1e-6) for s in samples], rtol=1e-10,
    )
    np.testing.assert_allclose(
        sparsity_batch(h, mask).numpy(), [np_sparsity(s.numpy()) for s in samples], rtol=1e-12
    )
    assert sparsity(samples) == pytest.approx(np.mean([np_sparsity(s.numpy()) for s in samples]))
    means, valid = curvature_batch(h, mask)
    assert valid.all()
    # sample 1 has a zero step: the two angles that touch it are skipped
    v1 = np.diff(samples[1].numpy(), axis=0)
    keep = [np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))
            for a, b in zip(v1[:-1], v1[1:], strict=True)
            if np.linalg.norm(a) > 0 and np.linalg.norm(b) > 0]
    np.testing.assert_allclose(
        means.numpy(), [np_curvature(samples[0].numpy()), np.mean(keep),
                        np_curvature(samples[2].numpy())], rtol=1e-9,
    )
    pooled = pool_batch(h, mask, "mean")
    torch.testing.assert_close(pooled, torch.stack([s.mean(0) for s in samples]))
    last = pool_batch(h, mask, "last")
    torch.testing.assert_close(last, torch.stack([s[-1] for s in samples]))
    hs = h + 0.3 * rand(*h.shape, seed=5)
    cos = cosine_similarity_batch(h, hs, mask)
    for i, pos in enumerate(_layouts(lengths, t_max)):
        assert cos[i].item() == pytest.approx(cosine_similarity(h[i, pos], hs[i, pos]))


def test_batched_metrics_accept_low_precision_and_int_masks():
    h, mask = _padded_batch([rand(6, 8, seed=1), rand(3, 8, seed=2)],
                            [list(range(6)), [3, 4, 5]], 6)
    for dtype in (torch.float32, torch.bfloat16):
        out = prompt_entropy_batch(h.to(dtype), mask.int())
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
        assert torch.isfinite(sparsity_batch(h.to(dtype), mask.long())).all()


def test_empty_and_short_samples():
    h = rand(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    pe = prompt_entropy_batch(h, mask)
    assert math.isfinite(pe[0].item())  # 2 tokens: defined
    assert math.isnan(pe[1].item())
    assert math.isnan(sparsity_batch(h, mask)[1].item())
    means, valid = curvature_batch(h, mask)
    assert not valid.any() and torch.isnan(means).all()
    assert math.isnan(prompt_entropy(rand(1, 8)))  # one token: log(1) = 0 -> undefined
    with pytest.raises(SftscopeError, match="no real tokens"):
        pool_batch(h, mask)


# ----------------------------------------------------------------------------- token geometry


def test_sparsity_hand_built():
    x = torch.tensor([[100.0, 0.5, -0.99, 1.0], [2.0, -100.0, 0.0, 3.0]])
    # threshold 0.01 * 100 = 1: entries 0.5, -0.99, 0.0 are below (1.0 is not: strict)
    assert sparsity(x) == pytest.approx(3 / 8)
    assert sparsity(x, MetricOptions(sparsity_eps=0.05)) == pytest.approx(6 / 8)


def test_curvature_line_and_zigzag():
    line = torch.linspace(0, 1, 7, dtype=torch.float64)[:, None] * torch.tensor(
        [1.0, 2.0, -3.0], dtype=torch.float64
    )
    mean, skipped = curvature(line)
    assert mean == pytest.approx(0.0, abs=1e-12) and skipped == 0
    zig = torch.tensor([[0.0, 0], [1, 0], [1, 1], [2, 1], [2, 2], [3, 2]])
    assert curvature(zig)[0] == pytest.approx(math.pi / 2)
    back = torch.tensor([[0.0, 0], [1, 0], [0, 0]])
    assert curvature(back)[0] == pytest.approx(math.pi)
    mean, skipped = curvature([zig, torch.zeros(2, 2), line])
    assert mean == pytest.approx(math.pi / 4) and skipped == 1
    x = rand(10, 6, seed=8)
    assert curvature(x)[0] == pytest.approx(np_curvature(x.numpy()), rel=1e-10)


# ----------------------------------------------------------------------------- dataset metrics


@pytest.mark.parametrize("n,d", [(12, 30), (40, 9)])
def test_dataset_metrics_match_numpy(n, d):
    z = rand(n, d, seed=n) + 2.0
    out = dataset_metrics(z)
    zn = z.numpy()
    s = np.linalg.svd(zn, compute_uv=False)
    zh = zn / np.linalg.norm(zn, axis=1, keepdims=True)
    ent = np_entropy(np.linalg.eigvalsh(zh @ zh.T)) / np.log(min(n, d))
    er = np.exp(np_entropy(s))
    assert out["dataset_entropy"] == pytest.approx(ent, rel=1e-10)
    assert out["effective_rank"] == pytest.approx(er, rel=1e-10)
    assert out["effective_rank_norm"] == pytest.approx(er / min(n, d), rel=1e-10)
    assert out["rank_deficiency"] == 0 and out["rank_deficiency_frac"] == 0
    assert out["spectral_norm"] == pytest.approx(s.max(), rel=1e-12)
    assert out["condition_number"] == pytest.approx(s.max() / s.min(), rel=1e-8)
    assert out["l2_norm"] == pytest.approx(np.linalg.norm(zn, axis=1).mean(), rel=1e-12)
    # notebook functions agree with the one-pass dict
    assert dataset_entropy(z) == pytest.approx(out["dataset_entropy"], rel=1e-12)
    assert effective_rank(z) == pytest.approx(out["effective_rank"], rel=1e-12)
    assert spectral_norm(z) == pytest.approx(out["spectral_norm"], rel=1e-12)
    assert condition_number(z) == pytest.approx(out["condition_number"], rel=1e-12)
    assert l2_norm(z) == pytest.approx(out["l2_norm"], rel=1e-12)
    torch.testing.assert_close(spectrum(z), torch.from_numpy(s))
    ref = dataset_metrics(z, REF)
    # the research code's ridge: on ẐẐᵀ / D, and only when N <= D
    zk = zh @ zh.T / d + (1e-6 * np.eye(n) if n <= d else 0.0)
    assert ref["dataset_entropy"] == pytest.approx(
        np_entropy(np.linalg.eigvalsh(zk)) / np.log(min(n, d)), rel=1e-10
    )
    assert ref["effective_rank"] == pytest.approx(np.exp(np_entropy(s**2)), rel=1e-10)


def test_effective_rank_of_k_equal_directions():
    k, n, d = 4, 10, 12
    u, v = orth(n, seed=1)[:, :k], orth(d, seed=2)[:, :k]
    z = 3.0 * u @ v.T  # k equal, orthogonal singular values
    assert effective_rank(z) == pytest.approx(k, rel=1e-10)
    assert effective_rank(z, REF) == pytest.approx(k, rel=1e-10)
    assert effective_rank(z, normalised=True) == pytest.approx(k / min(n, d), rel=1e-10)
    z2 = u @ torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)) @ v.T
    assert effective_rank(z2, REF) < effective_rank(z2)  # sigma^2 weights concentrate more


def test_rank_deficiency_and_reference_rule():
    n, d, r = 20, 8, 3
    z = rand(n, r, seed=1) @ rand(r, d, seed=2)
    assert rank_deficiency(z) == d - r
    assert rank_deficiency(z, fraction=True) == pytest.approx((d - r) / d)
    assert dataset_metrics(z)["rank_deficiency"] == d - r
    u, v = orth(n, seed=3)[:, :d], orth(d, seed=4)
    sig = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.005, 1e-3, 1e-9, 0.0], dtype=torch.float64)
    z = u @ torch.diag(sig) @ v.T
    assert rank_deficiency(z) == 1  # only the exact 0 is below max(N, D) * eps
    assert rank_deficiency(z, REF) == 4  # 0.005, 1e-3, 1e-9, 0 are <= 1 % of sigma_max
    assert dataset_metrics(z, REF)["rank_deficiency_frac"] == pytest.approx(1 - 4 / 8)
    assert condition_number(z) == pytest.approx(1.0 / 1e-9, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_deficiency_uses_the_compute_precision(dtype):
    """Rank-r states computed in fp32 / bf16: their rounding noise is not a direction."""
    n, d, r = 40, 24, 6
    z64 = 3.0 * orth(n, seed=1)[:, :r] @ orth(d, seed=2)[:, :r].T  # r equal singular values
    z = z64.to(dtype)
    sigma = spectrum(z)
    assert float(sigma[r]) > 1e-12  # the rounding noise is there...
    assert rank_deficiency(z.double()) < d - r  # ...and float64's tolerance counts it
    assert rank_deficiency(z) == d - r  # default: the dtype of the states given
    stored = z.float()  # pooled states are kept in float32: say what they were computed in
    assert rank_deficiency(stored, compute_dtype=dtype) == d - r
    out = dataset_metrics(stored, compute_dtype=str(dtype).removeprefix("torch."))
    assert out["rank_deficiency"] == d - r
    assert out["rank_deficiency_frac"] == pytest.approx((d - r) / d)
    assert condition_number(stored, compute_dtype=dtype) == pytest.approx(1.0, rel=2e-2)
    assert rank_deficiency(z64) == d - r  # exact in float64 too


def test_rank_undefined_where_the_precision_cannot_resolve_it():
    z = rand(300, 200, seed=1).to(torch.bfloat16)  # 300 * eps(bf16) > 1
    out = dataset_metrics(z.float(), compute_dtype="bfloat16")
    assert math.isnan(out["rank_deficiency"]) and math.isnan(out["rank_deficiency_frac"])
    assert math.isnan(out["condition_number"])
    assert dataset_metrics(z.float(), REF)["rank_deficiency"] == 0  # the 1 % rule still works
    with pytest.raises(SftscopeError, match="dtype"):
        dataset_metrics(z.float(), compute_dtype="int8")


def test_l2_norm_spread_and_several_normalisations():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], dtype=torch.float64)
    out = dataset_metrics(z, MetricOptions(entropy_normalisations=("max", "logN", "raw")))
    norms = np.array([5.0, 1.0, 10.0])
    assert out["l2_norm_std"] == pytest.approx(norms.std(ddof=1))
    assert out["l2_norm_cv"] == pytest.approx(norms.std(ddof=1) / norms.mean())
    raw = out["dataset_entropy_raw"]
    assert "dataset_entropy_max" not in out  # the primary one is dataset_entropy
    assert out["dataset_entropy"] == pytest.approx(raw / math.log(2))
    assert out["dataset_entropy_logN"] == pytest.approx(raw / math.log(3))
    opts = MetricOptions(normalisation="logN", entropy_normalisations="max logNlogD")
    assert opts.entropy_normalisations == ("max", "logNlogD")
    out2 = dataset_metrics(z, opts)
    assert out2["dataset_entropy"] == pytest.approx(out["dataset_entropy_logN"])
    assert out2["dataset_entropy_logNlogD"] == pytest.approx(raw / (math.log(3) * math.log(2)))
    x = rand(7, 5, seed=3)
    h, m = x[None], torch.ones(1, 7, dtype=torch.bool)
    got = token_metrics_batch(h, m, MetricOptions(entropy_normalisations=("raw",)))
    assert set(got) == {"prompt_entropy", "sparsity", "curvature", "prompt_entropy_raw"}
    assert float(got["prompt_entropy_raw"][0]) == pytest.approx(
        float(got["prompt_entropy"][0]) * math.log(5))
    with pytest.raises(SftscopeError, match="normalisation"):
        MetricOptions(entropy_normalisations=("logZ",))
    assert math.isnan(dataset_metrics(z[:1])["l2_norm_std"])
    from sftscope.metric_registry import metric_spec

    for name in [*out, *got]:  # the report knows every name these options produce
        assert metric_spec(name).known and metric_spec(name).kind == "single", name


def test_condition_number_and_norms_of_diag():
    z = torch.diag(torch.tensor([5.0, 2.0, 0.5, 0.0]))
    assert condition_number(z) == pytest.approx(10.0)  # the zero is excluded
    assert spectral_norm(z) == pytest.approx(5.0)
    assert l2_norm(z) == pytest.approx((5 + 2 + 0.5 + 0) / 4)
    assert math.isnan(condition_number(torch.zeros(3, 3)))
    assert rank_deficiency(torch.zeros(3, 5)) == 3
    assert dataset_entropy(torch.eye(5)) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- pair metrics


def test_cosine_and_mean_shift():
    x = rand(9, 5, seed=1)
    assert cosine_similarity(x, x) == pytest.approx(1.0)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert cosine_similarity(x, 2.5 * x) == pytest.approx(1.0)
    c = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    assert mean_shift(x, x + c) == pytest.approx(float(c.norm()))
    assert mean_shift_relative(x, x + c) == pytest.approx(float(c.norm() / x.mean(0).norm()))
    assert math.isnan(mean_shift_relative(torch.zeros(4, 5), x[:4]))


@pytest.mark.parametrize("n,d", [(10, 30), (60, 7)])  # N x N form and D x D form
def test_cka_values_and_invariances(n, d):
    x = rand(n, d, seed=1)
    y = x @ rand(d, d, seed=2) + 0.5 * rand(n, d, seed=3)
    assert cka(x, x) == pytest.approx(1.0)
    base = cka(x, y)
    assert base == pytest.approx(np_cka(x.numpy(), y.numpy()), rel=1e-10)
    q = orth(d, seed=4)
    assert cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert cka(x, y @ q) == pytest.approx(base, rel=1e-10)
    assert cka(7.0 * x, 0.1 * y) == pytest.approx(base, rel=1e-10)
    assert cka(x + 100.0, y - rand(1, d, seed=5)) == pytest.approx(base, rel=1e-8)
    assert cka(x, y[:, : d // 2]) == pytest.approx(
        np_cka(x.numpy(), y[:, : d // 2].numpy()), rel=1e-10
    )  # widths may differ


def test_cka_accumulator_equals_full_cka():
    x = rand(53, 12, seed=1) + 50.0  # large offset: sums must not lose the centring
    y = torch.tanh(x @ rand(12, 9, seed=2) / 10) + 3.0
    acc = CKAAccumulator()
    assert math.isnan(acc.result())
    for i in range(0, 53, 10):
        acc.update(x[i : i + 10].float(), y[i : i + 10].float())
    assert acc.n == 53
    assert acc.result() == pytest.approx(cka(x.float(), y.float()), rel=1e-9)
    per_batch = np.mean([cka(x[i : i + 10], y[i : i + 10]) for i in range(0, 50, 10)])
    assert abs(per_batch - acc.result()) > 1e-3  # averaging per-batch CKA would be wrong


def test_unbiased_cka():
    x = rand(12, 6, seed=1)
    y = x @ rand(6, 5, seed=2) + rand(12, 5, seed=3)
    u = cka(x, y, unbiased=True)
    assert u == pytest.approx(np_unbiased_cka(x.numpy(), y.numpy()), rel=1e-9)
    assert cka(x + 5.0, y, unbiased=True) == pytest.approx(u, rel=1e-9)
    assert cka(x, x, unbiased=True) == pytest.approx(1.0)
    big_x = rand(800, 8, seed=4)
    big_y = big_x @ rand(8, 8, seed=5) + 0.5 * rand(800, 8, seed=6)
    assert cka(big_x, big_y, unbiased=True) == pytest.approx(cka(big_x, big_y), abs=0.01)
    with pytest.raises(SftscopeError, match="more than 3"):
        cka(x[:3], y[:3], unbiased=True)


def test_delta():
    assert delta(0.25, 0.75) == 0.5
    base = np.array([1.0, 2.0, np.nan, 4.0])
    sft = torch.tensor([2.0, 2.5, 9.0, 3.0])
    assert delta(base, sft) == pytest.approx((1.0 + 0.5 - 1.0) / 3)


# ----------------------------------------------------------------------------- stats


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, size=200)
    low, high = bootstrap_ci(x, n_boot=500, seed=1)
    assert low < x.mean() < high
    assert (low, high) == bootstrap_ci(torch.from_numpy(x), n_boot=500, seed=1)  # reproducible
    t_low, t_high = mean_ci(x)
    assert high - low == pytest.approx(t_high - t_low, rel=0.2)
    z = rand(40, 6, seed=2)
    f_low, f_high = bootstrap_ci(lambda idx: l2_norm(z[idx]), n_boot=200, n=40)
    assert f_low < l2_norm(z) < f_high
    with pytest.raises(SftscopeError, match="needs n"):
        bootstrap_ci(lambda idx: 0.0)
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan, math.nan]))


def test_mean_and_proportion_ci():
    x = np.array([1.0, 2.0, 4.0, 7.0, 3.0])
    low, high = mean_ci(x, 0.9)  # 5 samples: wider than Student-t (small-sample widening)
    ref = sps.t.interval(0.9, df=4, loc=x.mean(), scale=sps.sem(x))
    assert low < ref[0] < x.mean() < ref[1] < high
    assert all(math.isnan(v) for v in mean_ci([1.0]))
    # Wilson 95 % for 5/10, and the edges stay in [0, 1]
    assert proportion_ci(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = proportion_ci(0, 20)
    assert low == 0.0 and 0 < high < 0.2
    assert proportion_ci(20, 20)[1] == 1.0
    assert all(math.isnan(v) for v in proportion_ci(0, 0))


def test_paired_ttest():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.nan])
    b = np.array([1.5, 2.1, 3.9, 4.2, 6.0, 1.0])
    t, p = paired_ttest(a, b)
    res = sps.ttest_rel(a[:5], b[:5])
    assert (t, p) == pytest.approx((res.statistic, res.pvalue))
    assert all(math.isnan(v) for v in paired_ttest([1.0], [2.0]))


def test_correlation_matrix_drops_constant_columns():
    df = pd.DataFrame({"a": [1.0, 2, 3, 4], "b": [2.0, 4, 6, 9], "c": [1.0, 1, 1, 1],
                       "d": [4.0, 3, 2, 1]})
    corr = correlation_matrix(df)
    assert list(corr.columns) == ["a", "b", "d"] and corr.attrs["dropped"] == ["c"]
    assert corr.loc["a", "d"] == pytest.approx(-1.0)
    assert corr.loc["a", "b"] == pytest.approx(np.corrcoef(df["a"], df["b"])[0, 1])
    pairs = correlation_pairs(corr)
    assert len(pairs) == 3 and list(pairs.columns) == ["metric_a", "metric_b", "r"]
    assert correlation_matrix(df, "spearman").loc["a", "b"] == pytest.approx(1.0)


def test_solver_failure_falls_back_to_cpu(monkeypatch):
    calls = []

    def flaky(real):
        def solver(x):
            calls.append(real.__name__)
            if len(calls) % 2 == 1:  # first try (the "device") fails, the CPU retry works
                raise RuntimeError("solver failed")
            return real(x)

        return solver

    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky(torch.linalg.eigvalsh))
    monkeypatch.setattr(torch.linalg, "svdvals", flaky(torch.linalg.svdvals))
    assert prompt_entropy(torch.eye(4)) == pytest.approx(1.0)
    assert spectral_norm(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(3.0)
    assert len(calls) == 4


@pytest.mark.parametrize("d", [6, 40])
def test_trimmed_spectra_equal_the_padded_batch(d):
    """On CPU a batch of ragged samples is decomposed sample by sample at its own size; the
    spectrum is the padded Gram's (the rows past a sample's last are zero) to rounding."""
    from sftscope.metrics.entropy import _trimmed_spectra, eigvalsh, gram_spectrum_batch

    g = torch.Generator().manual_seed(0)
    lens = [3, 12, 30, 7, 0, 30]
    x = torch.zeros(len(lens), 30, d, dtype=torch.float64)
    for i, n in enumerate(lens):
        x[i, :n] = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[1, 4] = 0.0  # a zero row inside a sample is kept
    t = x.shape[1]
    k = x @ x.transpose(1, 2) if t <= d else x.transpose(1, 2) @ x
    padded = eigvalsh(k).flip(-1).clamp_min(0.0)
    trimmed = _trimmed_spectra(x)
    assert trimmed is not None and trimmed.shape == padded.shape
    torch.testing.assert_close(trimmed, padded, atol=1e-10, rtol=1e-10)
    n_rows = torch.tensor(lens)
    lam = gram_spectrum_batch(x, n_rows, ridge=0.5)
    assert torch.all(lam[n_rows[:, None] <= torch.arange(t)[None]] == 0)
    same = x[:, :30].clone()
    same[:, :] = torch.randn(same.shape, generator=g, dtype=torch.float64)
    assert _trimmed_spectra(same) is None  # equal lengths: the padded batch is as cheap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparsity_counts_in_the_states_dtype_exactly(dtype):
    """Counting ``|x| < eps * max|x|`` in the states' own dtype gives the float64 count: the
    threshold is rounded up to the dtype, values at and around it included."""
    from sftscope.metrics.geometry import _below

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 50, 20, generator=g).abs().to(dtype)
    thr = torch.tensor([0.01, 0.3, 1.7], dtype=torch.float64) * a.amax(dim=(1, 2)).double()
    # put values exactly at, just below and just above each threshold's rounding in the dtype
    for i, t in enumerate(thr.tolist()):
        near = torch.tensor(t, dtype=dtype)
        a[i, 0, :3] = torch.stack([near, torch.nextafter(near, near.new_tensor(0.0)),
                                   torch.nextafter(near, near.new_tensor(math.inf))])
    got = _below(a, thr[:, None, None])
    assert torch.equal(got, a.double() < thr[:, None, None])
    h = torch.randn(2, 9, 7, generator=g).to(dtype)
    m = torch.ones(2, 9, dtype=torch.bool)
    m[1, 6:] = False
    h[1, 6:] = float("nan")  # padded positions never count
    torch.testing.assert_close(sparsity_batch(h, m),
                               sparsity_batch(torch.where(m[..., None], h.double(), 0.0), m),
                               rtol=0, atol=0)
