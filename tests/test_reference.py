"""``--preset reference`` against a plain, loop-based re-implementation of the authors' research
code's formulas (its ``metric_utils.py``: prompt/dataset entropy, curvature, sparsity, effective
rank, spectral metrics, L2 norm, CKA, cosine, mean shift), in float64.

Each ``rc_*`` function follows the research code step by step, epsilons included, with Python
loops over samples and positions; nothing here calls sftscope's metric code. Every reference
metric must agree within 1e-5 relative, per metric, on random states and on a tiny model's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sftscope import metrics as M
from sftscope.capture.stream import CaptureConfig, capture
from sftscope.load import data as D
from sftscope.load.models import load_model

REF = M.get_options("reference")
TOL = 1e-5
GROUP = 10  # the research code streams sample files ten at a time

# ----------------------------------------------------------------------------- the formulas


def rc_matrix_alpha_entropy(eigs: np.ndarray) -> float:
    """alpha = 1: eigenvalues clamped at 1e-10, p = lam / (sum + 1e-10), -sum p log(p + 1e-10)."""
    lam = [max(float(e), 1e-10) for e in eigs]
    trace = sum(lam)
    if trace < 1e-10:
        return 0.0
    p = [x / (trace + 1e-10) for x in lam]
    return -sum(q * math.log(q + 1e-10) for q in p)


def rc_unit(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for i, row in enumerate(x):
        out[i] = row / (math.sqrt(sum(float(v) * float(v) for v in row)) + 1e-10)
    return out


def rc_prompt_entropy(sample: np.ndarray) -> float:
    """One padded sample [T, D]: Gram of unit rows / D + 1e-6 I, its singular values, entropy,
    divided by log(min(T, D))."""
    t, d = sample.shape
    x = rc_unit(sample)
    gram = np.zeros((t, t))
    for a in range(t):
        for b in range(t):
            gram[a, b] = float(x[a] @ x[b]) / d
        gram[a, a] += 1e-6
    eigs = np.linalg.svd(gram, compute_uv=False)
    return rc_matrix_alpha_entropy(eigs) / math.log(min(t, d))


def rc_dataset_entropy(z: np.ndarray) -> float:
    n, d = z.shape
    x = rc_unit(z)
    if n > d:
        eigs = np.linalg.svd(x, compute_uv=False) ** 2
    else:
        gram = x @ x.T / d
        for i in range(n):
            gram[i, i] += 1e-6
        eigs = np.linalg.svd(gram, compute_uv=False)
    return rc_matrix_alpha_entropy(eigs) / math.log(min(n, d))


def rc_cos(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> float:
    """torch.nn.functional.cosine_similarity: each norm floored at eps."""
    na = max(math.sqrt(float(a @ a)), eps)
    nb = max(math.sqrt(float(b @ b)), eps)
    return float(a @ b) / (na * nb)


def rc_curvature(sample: np.ndarray) -> float:
    """Mean over t of arccos(clamp(cos(v_t, v_t+1), -0.999, 0.999)) of one padded sample."""
    angles = []
    for t in range(sample.shape[0] - 2):
        v1 = sample[t + 1] - sample[t]
        v2 = sample[t + 2] - sample[t + 1]
        c = min(max(rc_cos(v1, v2), -0.999), 0.999)
        angles.append(math.acos(c))
    return sum(angles) / len(angles)


def rc_sparsity_group(samples: list[np.ndarray]) -> list[float]:
    """Threshold 0.01 * max|x| over all samples of the group; each sample's fraction below."""
    top = max(abs(float(v)) for s in samples for v in s.ravel())
    thr = 0.01 * top
    return [sum(1 for v in s.ravel() if abs(float(v)) < thr) / s.size for s in samples]


def rc_effective_rank_norm(z: np.ndarray) -> float:
    s = np.linalg.svd(z, compute_uv=False)
    den = sum(float(x) ** 2 + 1e-9 for x in s)
    p = [float(x) ** 2 / den for x in s]
    ent = -sum(q * math.log(q + 1e-9) for q in p)
    return math.exp(ent) / min(z.shape)


def rc_spectral(z: np.ndarray) -> dict[str, float]:
    s = np.linalg.svd(z, compute_uv=False)
    smax, smin = float(s[0]), float(s[-1])
    rank = sum(1 for x in s if x > 0.01 * smax)
    return {"spectral_norm": smax, "condition_number": smax / (smin + 1e-9),
            "rank_deficiency_frac": 1.0 - rank / min(z.shape)}


def rc_l2(z: np.ndarray) -> dict[str, float]:
    norms = [math.sqrt(float(r @ r)) for r in z]
    mean = sum(norms) / len(norms)
    std = math.sqrt(sum((x - mean) ** 2 for x in norms) / (len(norms) - 1))
    return {"l2_norm": mean, "l2_norm_std": std}


def rc_cka(x: np.ndarray, y: np.ndarray) -> float:
    def centred_gram(a: np.ndarray) -> np.ndarray:
        g = a @ a.T
        mean = g.mean(axis=0, keepdims=True)
        return g - mean - mean.T + mean.mean()

    gx, gy = centred_gram(x), centred_gram(y)
    return float((gx * gy).sum() / (math.sqrt(float((gx**2).sum() * (gy**2).sum())) + 1e-9))


def rc_pair(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    cos = sum(rc_cos(a, b) for a, b in zip(x, y, strict=True)) / len(x)
    shift = x.mean(axis=0) - y.mean(axis=0)
    return {"cka": rc_cka(x, y), "cosine_similarity": cos,
            "mean_shift": math.sqrt(float(shift @ shift))}


# ----------------------------------------------------------------------------- comparison


def rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def worst(pairs: list[tuple[float, float]]) -> float:
    return max(rel(float(a), float(b)) for a, b in pairs)


def ours_dataset(z: torch.Tensor) -> dict[str, float]:
    return M.dataset_metrics(z, REF)


def dataset_report(zs: list[torch.Tensor]) -> dict[str, float]:
    """Per dataset metric, the worst relative difference over the matrices ``zs``."""
    out: dict[str, list] = {}
    for z in zs:
        ours = ours_dataset(z)
        zn = z.double().numpy()
        theirs = {"dataset_entropy": rc_dataset_entropy(zn),
                  "effective_rank_norm": rc_effective_rank_norm(zn),
                  **rc_spectral(zn), **rc_l2(zn)}
        for k, v in theirs.items():
            out.setdefault(k, []).append((ours[k], v))
    return {k: worst(v) for k, v in out.items()}


def pair_report(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    out: dict[str, list] = {}
    for zb, zs in pairs:
        ours = {"cka": M.cka(zb, zs, unbiased=REF.cka_unbiased),
                "cosine_similarity": M.cosine_similarity(zb, zs),
                "mean_shift": M.mean_shift(zb, zs)}
        for k, v in rc_pair(zb.double().numpy(), zs.double().numpy()).items():
            out.setdefault(k, []).append((ours[k], v))
    return {k: worst(v) for k, v in out.items()}


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _random_batch(n: int, t: int, d: int, seed: int) -> torch.Tensor:
    """Padded-looking states: real rows, then padding rows with steps of every kind."""
    h = rand(n, t, d, seed=seed)
    for i in range(n):
        pad_from = t - 1 - (i % 4)  # 0..3 padding positions
        h[i, pad_from:] = h[i, pad_from - 1] * 0.5  # identical padding states: zero steps
    h[0, 1] = h[0, 0] + 1e-3 * rand(d, seed=seed + 1)  # two nearly equal rows
    h[1, :4] = torch.linspace(0, 1, 4, dtype=torch.float64)[:, None] * h[1, 4]  # a straight line
    return h


# ----------------------------------------------------------------------------- random states


@pytest.mark.parametrize("t,d", [(9, 16), (12, 5)])  # T < D, and T > D (the D x D form)
def test_token_metrics_match_research_formulas_on_random_states(t, d):
    n = 25  # two full groups of ten and a partial one
    h = _random_batch(n, t, d, seed=t * d)
    ones = torch.ones(n, t, dtype=torch.bool)
    ent = M.prompt_entropy_batch(h, ones, REF)
    curv, valid = M.curvature_batch(h, ones, REF)
    assert bool(valid.all())
    groups = torch.arange(n) // GROUP
    spa = M.sparsity_batch(h, ones, REF, groups=groups)
    hn = h.numpy()
    want_ent = [rc_prompt_entropy(hn[i]) for i in range(n)]
    want_curv = [rc_curvature(hn[i]) for i in range(n)]
    want_spa = [v for g in range(0, n, GROUP) for v in rc_sparsity_group(list(hn[g:g + GROUP]))]
    report = {"prompt_entropy": worst(list(zip(ent.tolist(), want_ent, strict=True))),
              "curvature": worst(list(zip(curv.tolist(), want_curv, strict=True))),
              "sparsity": worst(list(zip(spa.tolist(), want_spa, strict=True)))}
    # the batch values the research code reports (means over a group of ten)
    for g in range(0, n, GROUP):
        report["prompt_entropy_batch"] = max(report.get("prompt_entropy_batch", 0.0), rel(
            float(ent[g:g + GROUP].mean()), float(np.mean(want_ent[g:g + GROUP]))))
    assert max(report.values()) < TOL, report
    # the zero steps count as pi/2 and the clamp bites: the default differs
    curv_default, _ = M.curvature_batch(h, ones)
    assert float((curv_default - curv).abs().max()) > 1e-3
    # the same groups streamed in uneven batches, out of order within a batch
    acc = M.SparsityGroups(REF, n)
    got = torch.full((n,), math.nan, dtype=torch.float64)
    for lo, hi in ((0, 7), (7, 8), (8, 19), (19, 25)):
        idx = torch.arange(lo, hi).flip(0)
        done_idx, vals = acc.add(idx, h[idx], ones[idx])
        got[done_idx] = vals
    assert not acc.pending
    torch.testing.assert_close(got, spa, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n,d", [(20, 48), (48, 20), (30, 30)])
def test_dataset_and_pair_metrics_match_research_formulas(n, d):
    zb = rand(n, d, seed=n) + 0.5
    zs = zb + 0.3 * rand(n, d, seed=n + 1)
    low = rand(n, 4, seed=3) @ rand(4, d, seed=4)  # rank deficient
    report = dataset_report([zb, zs, low, zb.float()])
    report.update(pair_report([(zb, zs), (zb.float(), zs.float())]))
    assert max(report.values()) < TOL, report


# ----------------------------------------------------------------------------- tiny model


def _hidden_states(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    output_hidden_states=True, use_cache=False)
    return [x.double() for x in out.hidden_states]


TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "Question: What is 12 plus 7? Answer: 19.",
    "Natalia sold clips to 48 of her friends in April.", "A train travels 60 miles in 1 hour.",
    "#### 72", "The sum of 3 and 4 is 7.", "one two three", "hello there, general reader",
    "x y z", "She sold half as many in May.", "Tom has 3 apples and buys 4 more.",
    "What is 5 times 6?", "The lazy dog sleeps.", "Answer: 42", "Jumps over", "a b c d e f",
    "Clips and friends", "12 plus 7 is 19", "miles per hour", "The end.", "Count: 1 2 3 4",
    "Brown fox", "Half as many",
]


def tiny_model_report(model, tokenizer) -> tuple[dict[str, float], object]:
    """Per metric, the worst relative difference between the reference capture and the
    formulas over every layer ``j < L`` and sample; also returns the capture."""
    tok = D.tokenize([D.Sample(t) for t in TEXTS], tokenizer, 64)
    n = len(tok)
    pad = tokenizer.pad_token_id
    cfg = CaptureConfig(batch_size=4, n_token=n, ridge=REF.ridge,
                        sparsity_group=REF.sparsity_group,
                        curvature_zero_steps=REF.curvature_zero_steps,
                        curvature_cos_clip=REF.curvature_cos_clip, include_padding=True)
    res = capture(model, tok, cfg, pad)
    n_layers = res.n_states - 1  # HF's last hidden state is after the final norm: j < L only
    padded: dict[int, list[np.ndarray]] = {j: [None] * n for j in range(n_layers)}
    for batch in D.iter_batches(tok, 4, pad, side="right"):
        states = _hidden_states(model, batch)
        for j in range(n_layers):
            for r, i in enumerate(batch.index):
                padded[j][i] = states[j][r].numpy()
    report: dict[str, float] = {}
    for j in range(n_layers):
        xs = padded[j]
        pairs = {
            "prompt_entropy": [(res.token["prompt_entropy"][j, i], rc_prompt_entropy(xs[i]))
                               for i in range(n)],
            "curvature": [(res.token["curvature"][j, i], rc_curvature(xs[i])) for i in range(n)],
            "sparsity": [(res.token["sparsity"][j, i], v) for g in range(0, n, GROUP)
                         for i, v in zip(range(g, min(g + GROUP, n)),
                                         rc_sparsity_group(xs[g:g + GROUP]), strict=True)],
        }
        for k, v in pairs.items():
            report[k] = max(report.get(k, 0.0), worst(v))
        for k, v in dataset_report([res.pooled_mean[j]]).items():
            report[k] = max(report.get(k, 0.0), v)
    # a second "model": the same states shifted, for the pair metrics
    shifted = [(res.pooled_mean[j], res.pooled_mean[j] + 0.1 * res.pooled_mean[j - 1])
               for j in range(1, n_layers)]
    report.update(pair_report(shifted))
    return report, res


def test_tiny_model_reference_capture_matches_research_formulas(model_dir, tokenizer):
    """The reference capture (padding counted, sparsity groups of ten spanning capture batches
    of four) against the formulas applied to HF's hidden states of the same padded batches."""
    model = load_model(str(model_dir("llama")))
    report, res = tiny_model_report(model, tokenizer)
    assert res.info["compute_dtype"] == "float32"
    assert max(report.values()) < TOL, report
    # padding positions entered: with the real-token mask the values differ
    tok = D.tokenize([D.Sample(t) for t in TEXTS], tokenizer, 64)
    plain = capture(model, tok, CaptureConfig(batch_size=4, n_token=len(tok)),
                    tokenizer.pad_token_id)
    assert float((plain.token["prompt_entropy"] - res.token["prompt_entropy"]).abs()
                 .nan_to_num().max()) > 1e-6


def test_grouped_sparsity_survives_a_resumed_capture(model_dir, tokenizer, tmp_path, monkeypatch):
    """A checkpoint taken while a sparsity group is half seen marks its samples not done, so
    a resumed capture runs them again and loses no group (interrupted between and inside)."""
    from dataclasses import replace

    model = load_model(str(model_dir("llama")))
    tok = D.tokenize([D.Sample(t) for t in TEXTS], tokenizer, 64)
    cfg = CaptureConfig(batch_size=4, n_token=len(tok), sparsity_group=10, include_padding=True,
                        overlap=False)
    full = capture(model, tok, cfg, tokenizer.pad_token_id)
    for stop_at in (6, 4):  # after samples 0..19 (no open group); after 0..11 (group 1 open)
        path = tmp_path / f"states-{stop_at}.safetensors"
        calls = {"n": 0}
        real_forward = type(model.model).forward

        def flaky(self, *a, calls=calls, stop_at=stop_at, real_forward=real_forward, **k):
            calls["n"] += 1
            if calls["n"] == stop_at:
                raise KeyboardInterrupt
            return real_forward(self, *a, **k)

        monkeypatch.setattr(type(model.model), "forward", flaky)
        with pytest.raises(KeyboardInterrupt):
            capture(model, tok, replace(cfg, checkpoint_every=0), tokenizer.pad_token_id,
                    cache_path=path)
        monkeypatch.undo()
        resumed = capture(model, tok, cfg, tokenizer.pad_token_id, cache_path=path)
        assert resumed.info["resumed_samples"] == (20 if stop_at == 6 else 10)
        for k in full.token:
            torch.testing.assert_close(resumed.token[k], full.token[k], equal_nan=True)
    assert not bool(resumed.token["sparsity"].isnan().any())
