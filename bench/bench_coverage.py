"""Coverage of candidate confidence intervals for sftscope's token-level ratios (accuracy, loss)
and per-sample means, simulated with clustered tokens: measure, don't guess.

    python bench/bench_coverage.py [--sims 1000 --boot 1000 --seed 0 --level 0.95]
    python bench/bench_coverage.py --quick        # a small grid, a few hundred simulations
    python bench/bench_coverage.py --only loss --ns 10,1000   # part of the grid

Accuracy (``sum(correct) / sum(tokens)`` over samples): each sample has a length drawn from a
heavy-tailed law (lognormal sigma 1 or 1.5, Pareto alpha 1.5; capped at 4096 tokens) and its
own difficulty ``q_i ~ Beta`` with mean ``p`` and intra-sample correlation ``rho`` (a sample
is easy or hard as a whole: its tokens are clustered); ``correct_i ~ Binomial(len_i, q_i)``.
The grid: ``p`` 0.01 ... 0.5, samples 10 ... 1000, the three length laws, ``rho`` 0.1 and
0.5. Loss (``sum(loss) / sum(tokens)``): per-sample mean loss ``mu_i`` lognormal (sigma 0.5,
1; skewed), token losses Gamma; and plain means of skewed per-sample values (``den = 1``).

Candidates (each with the same ``B`` resamples of samples, drawn once per sample count):
``pct`` percentile cluster bootstrap, ``bca`` BCa cluster bootstrap (jackknife acceleration),
``boot_t`` studentised cluster bootstrap, ``t`` Student-t on the linearised ratio,
``t_df`` Student-t on Satterthwaite's effective degrees of freedom of the linearised
variance, ``t_jack_df`` the same with the jackknife standard error, ``boot_t_df`` the
bootstrap-t with each quantile at least ``t_df``'s, ``boot_t_jdf`` that with the larger of
the linearised and jackknife standard errors, ``boot_t_jdf_wK`` that with tail probabilities
shrunk by ``sqrt(n / K)`` below K samples (``boot_t_jdf_w100`` is
``sftscope.metrics.stats.cluster_bootstrap_t``, the interval of losses and means),
``boot_t_log`` the bootstrap-t of ``log(ratio)`` (positive data), ``hall`` Student-t with
Hall's skewness transform, ``wilson_n`` Wilson with n = samples, ``wilson_kish`` Wilson with
n = Kish's effective number of samples, ``wilson_deff`` Wilson with n_eff = p(1-p) / var
(linearised cluster
variance, the design effect) floored at Kish's n, ``wilson_deff_t`` the same with a Student-t
quantile (df = samples - 1). Prints, per method, the coverage (share of simulations whose
interval holds the true value) and the mean width, cell by cell, then each method's minimum
coverage over the grid, and a markdown table (minimum coverage per sample count, median width
relative to the percentile bootstrap) as in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import numpy as np
from scipy import stats as sps

CAP = 4096


def lengths(rng: np.random.Generator, law: str, shape: tuple[int, int]) -> np.ndarray:
    """Tokens per sample (heavy-tailed, >= 1, capped)."""
    if law == "lognormal1":
        d = np.exp(rng.normal(math.log(20), 1.0, shape))
    elif law == "lognormal1.5":
        d = np.exp(rng.normal(math.log(20), 1.5, shape))
    elif law == "pareto1.5":
        d = 5 * (1 + rng.pareto(1.5, shape))
    else:
        raise ValueError(law)
    return np.clip(np.ceil(d), 1, CAP)


def accuracy_data(rng, sims: int, n: int, p: float, law: str, rho: float):
    """Per-sample correct counts and tokens ``[sims, n]``; the truth is ``p``."""
    d = lengths(rng, law, (sims, n))
    a, b = p * (1 - rho) / rho, (1 - p) * (1 - rho) / rho
    q = rng.beta(a, b, (sims, n))
    return rng.binomial(d.astype(np.int64), q).astype(float), d


def loss_data(rng, sims: int, n: int, sigma: float, law: str | None):
    """Per-sample loss sums and tokens (``law`` None: plain per-sample values, den 1)."""
    mu = np.exp(rng.normal(-sigma * sigma / 2, sigma, (sims, n)))  # E[mu] = 1
    if law is None:
        return mu, np.ones((sims, n))
    d = lengths(rng, law, (sims, n))
    k = 2.0  # token losses Gamma(2, mu/2): sum over d tokens is Gamma(2d, mu/2)
    return rng.gamma(k * d, mu / k), d


# ----------------------------------------------------------------------------- intervals

def _lin(x: np.ndarray, d: np.ndarray):
    """Ratio, its linearised standard error (n/(n-1) corrected), Kish's effective n."""
    n = x.shape[1]
    r = x.sum(1) / d.sum(1)
    dbar = d.mean(1)
    resid = x - r[:, None] * d
    se = np.sqrt((resid ** 2).sum(1) / (n * (n - 1))) / dbar
    kish = d.sum(1) ** 2 / (d ** 2).sum(1)
    return r, se, kish


def eff_df(resid: np.ndarray) -> np.ndarray:
    """Satterthwaite's effective degrees of freedom of the linearised variance
    ``sum(e^2)``: ``(n - 1) (sum e^2)^2 / (n sum e^4)``, n - 1 when every residual weighs the
    same, near 1 when one long or extreme sample carries the variance."""
    n = resid.shape[1]
    e2 = resid ** 2
    with np.errstate(all="ignore"):
        f = (e2.sum(1) ** 2) / (n * (e2 ** 2).sum(1))
    return np.maximum(np.nan_to_num(f, nan=1.0) * (n - 1), 1.0)


def jack_se(x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Jackknife standard error of the ratio (larger than the linearised one where one sample
    moves the ratio)."""
    n = x.shape[1]
    jack = (x.sum(1, keepdims=True) - x) / (d.sum(1, keepdims=True) - d)
    return np.sqrt((n - 1) / n * ((jack - jack.mean(1, keepdims=True)) ** 2).sum(1))


def wilson(p, n, z):
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return np.maximum(0, centre - half), np.minimum(1, centre + half)


def analytic(x, d, level):
    n = x.shape[1]
    r, se, kish = _lin(x, d)
    z = sps.norm.ppf(0.5 + level / 2)
    t = sps.t.ppf(0.5 + level / 2, n - 1)
    with np.errstate(all="ignore"):
        neff = np.where((r > 0) & (r < 1) & (se > 0), r * (1 - r) / se ** 2, kish)
    neff = np.clip(neff, kish, d.sum(1))
    resid = x - r[:, None] * d
    dbar = d.mean(1)
    with np.errstate(all="ignore"):  # skewness of the linearised values (Hall's transform)
        g = (resid ** 3).mean(1) / ((resid ** 2).mean(1)) ** 1.5 / dbar ** 0
        g = np.nan_to_num(g)
    a3, b = g / (3 * math.sqrt(n)), g / (6 * math.sqrt(n))

    def ginv(y):  # inverse of T + a T^2 + a^2 T^3 / 3 + b = ((1 + a T)^3 - 1) / (3a) + b
        with np.errstate(all="ignore"):
            v = (np.cbrt(1 + 3 * a3 * (y - b)) - 1) / a3
        return np.where(np.abs(a3) > 1e-12, v, y - b)

    df = eff_df(resid)
    tq = sps.t.ppf(0.5 + level / 2, df)
    jse = jack_se(x, d)
    return {
        "t": (r - t * se, r + t * se),
        "t_df": (r - tq * se, r + tq * se),
        "t_jack_df": (r - tq * jse, r + tq * jse),
        "hall": (r - ginv(t) * se, r - ginv(-t) * se),
        "wilson_n": wilson(np.clip(r, 0, 1), np.full_like(r, n), z),
        "wilson_kish": wilson(np.clip(r, 0, 1), kish, z),
        "wilson_deff": wilson(np.clip(r, 0, 1), neff, z),
        "wilson_deff_t": wilson(np.clip(r, 0, 1), neff, t),
    }


def boot(x, d, w, level):
    """Percentile, BCa and bootstrap-t intervals from resample multiplicities ``w [B, n]``."""
    n = x.shape[1]
    r, se, _ = _lin(x, d)
    sx, sd = x @ w.T, d @ w.T                                    # [sims, B]
    with np.errstate(all="ignore"):
        st = sx / sd
        sxx, sxd, sdd = (x * x) @ w.T, (x * d) @ w.T, (d * d) @ w.T
        ss = np.maximum(sxx - 2 * st * sxd + st * st * sdd, 0)
        se_b = np.sqrt(ss / (n * (n - 1))) / (sd / n)
        tstar = (st - r[:, None]) / se_b
    tail = (1 - level) / 2
    st_sorted = np.sort(st, axis=1)
    B = st.shape[1]

    def pick(q):  # row-wise quantile at per-row levels q [sims]
        i = np.clip(np.round(q * (B - 1)).astype(int), 0, B - 1)
        return st_sorted[np.arange(st.shape[0]), i]

    out = {"pct": (pick(np.full(len(r), tail)), pick(np.full(len(r), 1 - tail)))}
    less = (st < r[:, None]).mean(1) + 0.5 * (st == r[:, None]).mean(1)
    z0 = sps.norm.ppf(np.clip(less, 1 / B, 1 - 1 / B))
    jack = (x.sum(1, keepdims=True) - x) / (d.sum(1, keepdims=True) - d)
    dev = jack.mean(1, keepdims=True) - jack
    with np.errstate(all="ignore"):
        acc = (dev ** 3).sum(1) / (6 * ((dev ** 2).sum(1)) ** 1.5)
    acc = np.nan_to_num(acc)
    za = sps.norm.ppf([tail, 1 - tail])
    qs = [sps.norm.cdf(z0 + (z0 + zz) / (1 - acc * (z0 + zz))) for zz in za]
    out["bca"] = (pick(qs[0]), pick(qs[1]))
    tstar = np.where(np.isfinite(tstar), tstar, np.nan)
    with np.errstate(all="ignore"):
        tq = np.nanquantile(tstar, [1 - tail, tail], axis=1)
    out["boot_t"] = (r - tq[0] * se, r - tq[1] * se)
    with np.errstate(all="ignore"):
        ta = np.nanquantile(np.abs(tstar), level, axis=1)
    out["boot_t_sym"] = (r - ta * se, r + ta * se)
    tdf = sps.t.ppf(0.5 + level / 2, eff_df(x - r[:, None] * d))
    out["boot_t_df"] = (r - np.maximum(tq[0], tdf) * se, r - np.minimum(tq[1], -tdf) * se)
    jse = np.maximum(jack_se(x, d), se)
    out["boot_t_jdf"] = (r - np.maximum(tq[0], tdf) * jse, r - np.minimum(tq[1], -tdf) * jse)
    for k in (50, 100, 200):
        tl = tail * min(1.0, math.sqrt(n / k))  # smaller tails below k texts
        with np.errstate(all="ignore"):
            wq = np.nanquantile(tstar, [1 - tl, tl], axis=1)
        wdf = sps.t.ppf(1 - tl, eff_df(x - r[:, None] * d))
        out[f"boot_t_jdf_w{k}"] = (r - np.maximum(wq[0], wdf) * jse,
                                 r - np.minimum(wq[1], -wdf) * jse)
    with np.errstate(all="ignore"):  # bootstrap-t of log(ratio): positive data only
        lt = (np.log(st) - np.log(r)[:, None]) / (se_b / st)
        lt = np.where(np.isfinite(lt), lt, np.nan)
        lq = np.nanquantile(lt, [1 - tail, tail], axis=1)
        lse = se / r
        out["boot_t_log"] = (r * np.exp(-lq[0] * lse), r * np.exp(-lq[1] * lse))
    return out


# ----------------------------------------------------------------------------- driver

def cell(rng, w, kind, level, **kw):
    if kind == "accuracy":
        x, d = accuracy_data(rng, **kw)
        truth, bounds = kw["p"], (0.0, 1.0)
    else:
        x, d = loss_data(rng, **kw)
        truth, bounds = 1.0, (0.0, math.inf)
    ivs = analytic(x, d, level) | boot(x, d, w, level)
    res = {}
    for name, (lo, hi) in ivs.items():
        if kind != "accuracy" and name.startswith("wilson"):
            continue
        lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
        ok = (lo <= truth) & (truth <= hi)
        res[name] = (float(np.mean(ok)), float(np.nanmean(hi - lo)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sims", type=int, default=1000)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", type=float, default=0.95)
    ap.add_argument("--quick", action="store_true", help="small grid, 300 simulations")
    ap.add_argument("--only", choices=["accuracy", "loss"], default=None)
    ap.add_argument("--ns", default="10,30,100,300,1000", help="numbers of texts")
    a = ap.parse_args()
    ns = [int(x) for x in a.ns.split(",")]
    ps = [0.01, 0.03, 0.1, 0.3, 0.5]
    laws = ["lognormal1", "lognormal1.5", "pareto1.5"]
    rhos = [0.1, 0.5]
    if a.quick:
        a.sims, ns, ps, laws, rhos = 300, [10, 100], [0.01, 0.1, 0.5], ["pareto1.5"], [0.5]
    t0 = time.time()
    worst: dict[str, dict[str, tuple[float, str]]] = {}
    cells: list[tuple[str, int, dict[str, tuple[float, float]]]] = []
    for n in ns:
        w = np.random.default_rng(a.seed).multinomial(n, np.full(n, 1 / n), size=a.boot)
        w = w.astype(float)
        grid = [("accuracy", dict(p=p, law=law, rho=rho))
                for p, law, rho in itertools.product(ps, laws, rhos)]
        grid += [("loss", dict(sigma=s, law=law))
                 for s, law in itertools.product([0.5, 1.0], [None, *laws])]
        for c, (kind, kw) in enumerate(grid):  # a cell's seed does not depend on --only
            if a.only not in (None, kind):
                continue
            rng = np.random.default_rng([a.seed, n, c])
            res = cell(rng, w, kind, a.level, sims=a.sims, n=n, **kw)
            cells.append((kind, n, res))
            label = f"{kind} n={n} " + " ".join(f"{k}={v}" for k, v in kw.items())
            print(label + " | " + "  ".join(f"{m} {c:.3f}/{wd:.3g}" for m, (c, wd)
                                            in sorted(res.items())), flush=True)
            for m, (c, _) in res.items():
                best = worst.setdefault(kind, {}).get(m)
                if best is None or c < best[0]:
                    worst[kind][m] = (c, label)
    print(f"\nminimum coverage over the grid (level {a.level}, {a.sims} simulations, "
          f"{a.boot} resamples; {time.time() - t0:.0f} s):")
    for kind, ms in worst.items():
        for m, (c, label) in sorted(ms.items(), key=lambda kv: -kv[1][0]):
            print(f"  {kind:8s} {m:14s} {c:.3f}   at {label}")
    print()
    print(markdown(cells, ns))


def markdown(cells: list[tuple[str, int, dict[str, tuple[float, float]]]], ns: list[int]) -> str:
    """Per kind and method: the minimum coverage at each sample count (over the other grid
    axes) and the median width relative to the percentile bootstrap's, as a markdown table."""
    lines = []
    for kind in dict.fromkeys(k for k, _, _ in cells):
        mine = [(n, r) for k, n, r in cells if k == kind]
        methods = sorted({m for _, r in mine for m in r})
        lines += [f"| {kind}: method | " + " | ".join(f"n={n}" for n in ns)
                  + " | min | width / pct |", "|---" * (len(ns) + 3) + "|"]
        for m in methods:
            mins = [min((r[m][0] for nn, r in mine if nn == n), default=math.nan) for n in ns]
            rel = [r[m][1] / r["pct"][1] for _, r in mine if r["pct"][1] > 0]
            lines.append(f"| {m} | " + " | ".join(f"{c:.3f}" for c in mins)
                         + f" | {np.nanmin(mins):.3f} | {np.nanmedian(rel):.2f} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
