"""The paper's depth patterns as stated numeric rules: pure functions, numbers in, a verdict out.

Every rule is a conjunction of *claims*. A claim compares numbers, and where the table gives
confidence intervals (or p-values) it is judged with them:

- a claim **holds** when it is true beyond the noise: for ``A > B + margin`` the lower end of
  ``A``'s interval minus the upper end of ``B``'s exceeds ``margin`` (the intervals do not
  overlap), or a paired test gives ``p < 0.05`` in the claimed direction;
- it **fails** when its opposite is true beyond the noise (or, for exact numbers such as
  weight change, simply when it is false);
- otherwise it is **unclear** (the intervals overlap, or ``p >= 0.05``).

A rule's verdict is ``yes`` when every claim holds and the sample minimums are met, ``no`` when
a claim fails (minimums met), and ``inconclusive`` otherwise. Numbers without intervals are
taken as exact, and the verdict then says so ("no interval: analyze --bootstrap 0; noise not
checked"). Each :class:`Verdict` carries the rule text (with its thresholds), the numbers
it used and the verdict, so that the report prints all three side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sftscope.segments import is_mask

if TYPE_CHECKING:  # the rules take numbers; the paired tests are made by their callers
    from sftscope.metrics.paired import PairedDiff

YES, NO, INCONCLUSIVE = "yes", "no", "inconclusive"
HOLDS, FAILS, UNCLEAR = "holds", "fails", "unclear"

ALPHA = 0.05            # p-values below this count as evidence
TOP = 0.8               # "the final 20 %" of depth starts here (relative depth)
# (a) CKA
CKA_HIGH = 0.95         # CKA over the first 80 % of depth at least this  [paper: > 0.98]
CKA_DROP = 0.02         # ... and the last 20 % at least this much lower  [drops sharply]
CKA_MIN_EARLY = 3       # hidden states needed at j/L <= 0.8
CKA_MIN_LATE = 1        # ... and at j/L > 0.8
# (b) weight change
J_RATIO = 1.5           # top-20 % mean / bottom-20 % mean  [paper: about 0.10 / 0.05 = 2]
J_EDGE = 0.2            # share of blocks in the bottom and top groups
J_MIN_BLOCKS = 5
# (c) logit lens
LENS_RISE = 0.7         # half of the peak is reached only at or after this depth
LENS_NEAR_ZERO = 0.2    # mean accuracy over j/L <= LENS_RISE at most this share of the peak
LENS_MIN_STATES = 5
LENS_MIN_N = 30         # tokens / items per layer, where the table gives n
# (d) swap
SWAP_MIN_SEGMENTS = 3
# (e) sweep
SWEEP_MIN_SEEDS = 2
SWEEP_MIN_ITEMS = 100


@dataclass(frozen=True)
class Verdict:
    """The outcome of one rule: ``verdict`` is yes / no / inconclusive."""

    verdict: str
    rule: str
    numbers: str
    why: str = ""

    @property
    def holds(self) -> bool | None:
        """True / False / None (inconclusive), the old ``holds`` field."""
        return {YES: True, NO: False}.get(self.verdict)

    def text(self) -> str:
        """``rule; here numbers -> verdict (why)``: what the report prints."""
        why = f" ({self.why})" if self.why else ""
        return f"{self.rule}; here {self.numbers} -> {self.verdict}{why}"


# ----------------------------------------------------------------------------- claims


def _f(x: float | None, nd: int = 3) -> str:
    if x is None or not np.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) >= 1000 or abs(x) < 0.001):
        return f"{x:.{nd}g}"
    return f"{x:.{nd}f}"


def _iv(x: float, lo: float | None, hi: float | None) -> tuple[float, float]:
    lo = x if lo is None or not np.isfinite(lo) else min(lo, x)
    hi = x if hi is None or not np.isfinite(hi) else max(hi, x)
    return lo, hi


def compare(a: float, b: float, margin: float = 0.0, a_ci: tuple | None = None,
            b_ci: tuple | None = None, strict: bool = True) -> str:
    """Claim ``a > b + margin`` (``a >= b + margin`` when not ``strict``: a tie at the
    threshold counts) judged with the intervals (``None`` = exact numbers)."""
    if not (np.isfinite(a) and np.isfinite(b)):
        return UNCLEAR
    a_lo, a_hi = _iv(a, *(a_ci or (None, None)))
    b_lo, b_hi = _iv(b, *(b_ci or (None, None)))
    low, high = a_lo - b_hi, a_hi - b_lo

    def ok(d: float) -> bool:
        return d > margin and not _ge(margin, d) if strict else _ge(d, margin)

    if ok(low):
        return HOLDS
    if not ok(high):
        return FAILS
    return UNCLEAR


def at_least(x: float, threshold: float, ci: tuple | None = None) -> str:
    """Claim ``x >= threshold`` judged with ``x``'s interval."""
    if not np.isfinite(x):
        return UNCLEAR
    lo, hi = _iv(x, *(ci or (None, None)))
    if lo >= threshold:
        return HOLDS
    if hi < threshold:
        return FAILS
    return UNCLEAR


def compare_p(a: float, b: float, p: float | None) -> str:
    """Claim ``a > b`` judged by a paired test's p-value (``p < ALPHA`` needed either way)."""
    if p is None or not np.isfinite(p) or not (np.isfinite(a) and np.isfinite(b)):
        return UNCLEAR
    if p < ALPHA and a > b:
        return HOLDS
    if p < ALPHA and a < b:
        return FAILS
    return UNCLEAR


def exact(ok: bool) -> str:
    return HOLDS if ok else FAILS


def _ge(a: float, b: float, rel: float = 1e-9) -> bool:
    """``a >= b`` where an exact tie counts (rounding of the inputs aside)."""
    return bool(a >= b - rel * max(abs(a), abs(b), 1e-300))


def no_interval(hint: str = "") -> str:
    """What a verdict says when it had no interval to judge the noise with (``hint``: how the
    intervals were switched off, e.g. ``analyze --bootstrap 0``)."""
    return f"no interval{': ' + hint if hint else ''}; noise not checked"


def _has_ci(*cis: tuple | None) -> bool:
    """Every interval given and finite."""
    return all(c is not None and all(v is not None and np.isfinite(v) for v in c) for c in cis)


def combine(claims: Sequence[tuple[str, str]], rule: str, numbers: str,
            too_small: str = "", no_ci: str = "") -> Verdict:
    """yes if every claim holds, no if one fails, else inconclusive; ``too_small`` (the unmet
    minimum) makes it inconclusive whatever the claims say; ``no_ci`` (see
    :func:`no_interval`) is added to the reason when the numbers had no interval."""
    if too_small:
        return Verdict(INCONCLUSIVE, rule, numbers, f"too small: {too_small}")
    failed = [name for name, c in claims if c == FAILS]
    unclear = [name for name, c in claims if c == UNCLEAR]
    if failed:
        why, verdict = "fails: " + ", ".join(failed), NO
    elif unclear:
        why, verdict = ("within the noise (intervals overlap or p >= 0.05): "
                        + ", ".join(unclear)), INCONCLUSIVE
    else:
        why, verdict = "", YES
    return Verdict(verdict, rule, numbers, "; ".join(w for w in (why, no_ci) if w))


def _arrays(*cols: Sequence[float] | None) -> list[np.ndarray | None]:
    return [None if c is None else np.asarray(c, dtype=float) for c in cols]


def _finite(x: np.ndarray, *others: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Rows where ``x`` (and the first array, the depth) are finite, sorted by depth."""
    keep = np.isfinite(x)
    for o in others[:1]:
        if o is not None:
            keep &= np.isfinite(o)
    out = [x[keep]] + [None if o is None else o[keep] for o in others]
    order = np.argsort(out[1], kind="stable") if out[1] is not None else np.arange(keep.sum())
    return tuple(None if o is None else o[order] for o in out)


def _dropped(n_all: int, n_kept: int) -> str:
    return f" ({n_all - n_kept} NaN value(s) left out)" if n_all > n_kept else ""


# ----------------------------------------------------------------------------- (a) CKA

CKA_RULE = (f"CKA: min over j/L <= {TOP} >= {CKA_HIGH} AND min over j/L > {TOP} lower by >= "
            f"{CKA_DROP}, judged with the CIs where given (needs >= {CKA_MIN_EARLY} hidden "
            f"states at j/L <= {TOP} and >= {CKA_MIN_LATE} above)")


def cka_rule(depth: Sequence[float], cka: Sequence[float], ci_low: Sequence[float] | None = None,
             ci_high: Sequence[float] | None = None, hint: str = "") -> Verdict:
    """(a) CKA stays high over the first 80 % of depth and drops in the final 20 %."""
    d, y, lo, hi = _arrays(depth, cka, ci_low, ci_high)
    n_all = len(y)
    y, d, lo, hi = _finite(y, d, lo, hi)
    early, late = d <= TOP, d > TOP
    small = []
    if early.sum() < CKA_MIN_EARLY:
        small.append(f"{int(early.sum())} hidden states at j/L <= {TOP} (needs "
                     f"{CKA_MIN_EARLY})")
    if late.sum() < CKA_MIN_LATE:
        small.append(f"{int(late.sum())} above {TOP} (needs {CKA_MIN_LATE})")
    if small:
        return combine([], CKA_RULE, f"{len(y)} finite values{_dropped(n_all, len(y))}",
                       "; ".join(small))
    ie = np.flatnonzero(early)[int(np.argmin(y[early]))]
    il = np.flatnonzero(late)[int(np.argmin(y[late]))]

    def ci(i: int) -> tuple | None:
        return None if lo is None else (lo[i], hi[i])

    c1 = at_least(y[ie], CKA_HIGH, ci(ie))
    c2 = compare(y[ie], y[il], CKA_DROP, ci(ie), ci(il), strict=False)

    def show(i: int) -> str:
        ci_txt = "" if lo is None or not np.isfinite(lo[i]) else f" [{_f(lo[i])}, {_f(hi[i])}]"
        return f"{_f(y[i])}{ci_txt} at j/L = {_f(d[i], 2)}"

    numbers = (f"min over j/L <= {TOP} {show(ie)}, min above {show(il)}, drop "
               f"{_f(y[ie] - y[il])}{_dropped(n_all, len(y))}")
    return combine([(f"early CKA >= {CKA_HIGH}", c1), (f"drop >= {CKA_DROP}", c2)], CKA_RULE,
                   numbers, no_ci="" if _has_ci(ci(ie), ci(il)) else no_interval(hint))


# ----------------------------------------------------------------------------- (b) weights

J_RULE = (f"J-shape: mean relative change of the top {J_EDGE:.0%} of blocks >= {J_RATIO}x the "
          f"bottom {J_EDGE:.0%} AND bottom > 0 AND the rise sits at the top (top - middle >= "
          f"middle - bottom); weight change is exact (no interval); needs >= {J_MIN_BLOCKS} "
          f"blocks; all blocks 0, or bottom 0 with top > 0, is inconclusive")


@dataclass(frozen=True)
class EdgeMeans:
    """Mean of a per-block profile over its bottom, middle and top groups of blocks."""

    bottom: float
    middle: float
    top: float
    n_edge: int
    n: int

    @property
    def ratio(self) -> float:
        if self.bottom > 0:
            return self.top / self.bottom
        return math.inf if self.top > 0 else math.nan


def edge_means(values: Sequence[float], share: float = J_EDGE) -> EdgeMeans:
    """Bottom / middle / top means of a depth-ordered profile; each edge group holds
    ``max(1, round(share * n))`` blocks (the findings and the J rule both use this)."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    k = max(1, int(round(share * n)))
    if n == 0:
        return EdgeMeans(math.nan, math.nan, math.nan, 0, 0)
    mid = v[k:n - k] if n > 2 * k else v
    return EdgeMeans(float(v[:k].mean()), float(mid.mean()), float(v[-k:].mean()), k, n)


def j_shape_rule(depth: Sequence[float], change: Sequence[float]) -> Verdict:
    """(b) weight change is J-shaped: larger near the output than in the early blocks."""
    d, y = _arrays(depth, change)
    n_all = len(y)
    y, d = _finite(y, d)
    if len(y) < J_MIN_BLOCKS:
        return combine([], J_RULE, f"{len(y)} blocks{_dropped(n_all, len(y))}",
                       f"{len(y)} blocks with a value (needs {J_MIN_BLOCKS})")
    e = edge_means(y)
    numbers = (f"bottom {_f(e.bottom)}, middle {_f(e.middle)}, top {_f(e.top)} "
               f"({e.n_edge} of {e.n} blocks per edge; "
               + (f"ratio {_f(e.ratio, 2)}x)" if np.isfinite(e.ratio) else "ratio undefined)")
               + _dropped(n_all, len(y)))
    if np.all(y == 0):
        return Verdict(INCONCLUSIVE, J_RULE, numbers,
                       "no block changed at all: are the two checkpoints the same?")
    if e.bottom == 0 and e.top > 0:
        return Verdict(INCONCLUSIVE, J_RULE, numbers,
                       "the bottom blocks did not change, so the ratio is undefined "
                       "(frozen or untrained blocks?)")
    claims = [("bottom > 0", exact(e.bottom > 0)),
              (f"top >= {J_RATIO}x bottom", exact(_ge(e.top, J_RATIO * e.bottom))),
              ("rise at the top", exact(_ge(e.top - e.middle, e.middle - e.bottom)))]
    return combine(claims, J_RULE, numbers)


# ----------------------------------------------------------------------------- (c) logit lens

LENS_RULE = (f"logit lens: mean accuracy over j/L <= {LENS_RISE} <= {LENS_NEAR_ZERO}x the peak "
             f"AND half of the peak first reached at j/L >= {LENS_RISE} AND the peak above "
             f"the largest value at j/L <= {LENS_RISE} beyond the CIs (needs >= "
             f"{LENS_MIN_STATES} hidden states, one above {TOP}, and n >= {LENS_MIN_N} per "
             f"layer where given)")


def lens_rule(depth: Sequence[float], accuracy: Sequence[float],
              ci_low: Sequence[float] | None = None, ci_high: Sequence[float] | None = None,
              n: Sequence[float] | None = None, hint: str = "") -> Verdict:
    """(c) logit-lens accuracy is near 0 for most of the depth and rises in the last ~20 %."""
    d, y, lo, hi, nn = _arrays(depth, accuracy, ci_low, ci_high, n)
    n_all = len(y)
    y, d, lo, hi, nn = _finite(y, d, lo, hi, nn)
    small = []
    if len(y) < LENS_MIN_STATES:
        small.append(f"{len(y)} hidden states (needs {LENS_MIN_STATES})")
    elif not (d > TOP).any():
        small.append(f"no hidden state above j/L = {TOP}")
    if nn is not None and np.isfinite(nn).any() and np.nanmin(nn) < LENS_MIN_N:
        small.append(f"n = {int(np.nanmin(nn))} per layer (needs {LENS_MIN_N})")
    if small:
        return combine([], LENS_RULE, f"{len(y)} values{_dropped(n_all, len(y))}",
                       "; ".join(small))
    ip = int(np.argmax(y))
    peak = float(y[ip])
    early = d <= LENS_RISE
    early_mean = float(y[early].mean()) if early.any() else math.nan
    reached = d[y >= 0.5 * peak] if peak > 0 else d[:1]
    d50 = float(reached.min())
    ie = np.flatnonzero(early)[int(np.argmax(y[early]))] if early.any() else None

    def ci(i: int) -> tuple | None:
        return None if lo is None else (lo[i], hi[i])

    numbers = (f"mean {_f(early_mean)} over j/L <= {LENS_RISE}, peak {_f(peak)} at j/L = "
               f"{_f(d[ip], 2)}, half of the peak first at j/L = {_f(d50, 2)}"
               f"{_dropped(n_all, len(y))}")
    if ie is None:
        return combine([], LENS_RULE, numbers, f"no hidden state at j/L <= {LENS_RISE}")
    numbers += f", largest at j/L <= {LENS_RISE} {_f(y[ie])}"
    claims = [("near 0 early", exact(peak > 0 and early_mean <= LENS_NEAR_ZERO * peak)),
              (f"half of the peak only at j/L >= {LENS_RISE}", exact(peak > 0 and
                                                                  d50 >= LENS_RISE)),
              ("the rise is beyond the noise", compare(peak, float(y[ie]), 0.0, ci(ip), ci(ie)))]
    if peak <= 0:
        claims = claims[2:]  # 0 everywhere: only the (absent) rise can decide
    return combine(claims, LENS_RULE, numbers,
                   no_ci="" if _has_ci(ci(ip), ci(ie)) else no_interval(hint))


# ----------------------------------------------------------------------------- (d) swap

SWAP_RULE = ("swap inverted U: in each direction every middle one-segment swap (segments "
             "2..K-1) scores better than both edge swaps (segments 1 and K), judged by the "
             "paired interval of the per-item differences (same items, swap_items.csv; "
             "without it, beyond the CIs: the worst middle beats the better edge) (needs K >= "
             f"{SWAP_MIN_SEGMENTS} one-segment swaps including both edges)")


@dataclass(frozen=True)
class Point:
    """One estimate with its interval (NaN when the table has none)."""

    value: float
    lo: float = math.nan
    hi: float = math.nan

    def ci(self, lower_is_better: bool = False) -> tuple[float, float]:
        if lower_is_better:
            return (-self.hi, -self.lo)
        return (self.lo, self.hi)

    def score(self, lower_is_better: bool = False) -> float:
        return -self.value if lower_is_better else self.value


def inverted_u_rule(segments: dict[int, Point], k: int, lower_is_better: bool = False,
                    label: str = "", hint: str = "",
                    paired: Mapping[tuple[int, int], PairedDiff] | None = None) -> Verdict:
    """(d) one direction of a swap: ``segments`` maps segment index -> score after swapping it.
    ``paired[(m, e)]``: the paired difference middle ``m`` - edge ``e`` on the same items
    (``metrics.paired``); given, it decides the claim (every middle beats both edges), not
    the overlap of the two independent intervals."""
    seg = {i: p for i, p in segments.items() if np.isfinite(p.value)}
    name = f"{label}: " if label else ""
    if k < SWAP_MIN_SEGMENTS or not {0, k - 1} <= set(seg) or not any(
            0 < i < k - 1 for i in seg):
        return combine([], SWAP_RULE, f"{name}segments {sorted(seg)} of K = {k}",
                       f"needs K >= {SWAP_MIN_SEGMENTS} with both edges and a middle segment")
    lib = lower_is_better
    edge = max((0, k - 1), key=lambda i: seg[i].score(lib))
    middles = [i for i in seg if 0 < i < k - 1]
    mid = min(middles, key=lambda i: seg[i].score(lib))  # the middle must beat BOTH edges
    best = max(middles, key=lambda i: seg[i].score(lib))
    c = compare(seg[mid].score(lib), seg[edge].score(lib), 0.0, seg[mid].ci(lib),
                seg[edge].ci(lib))

    def show(i: int) -> str:
        p = seg[i]
        ci = f" [{_f(p.lo)}, {_f(p.hi)}]" if np.isfinite(p.lo) else ""
        return f"segment {i + 1}/{k} {_f(p.value)}{ci}"

    numbers = (f"{name}worst middle {show(mid)}"
               + (f" (best middle {show(best)})" if best != mid else "")
               + f", better edge {show(edge)}, other edge {show(k - 1 if edge == 0 else 0)}")
    if paired:
        c, text = paired_claim(paired, middles, (0, k - 1), lib, (mid, edge))
        return combine([("every middle segment beats both edges", c)], SWAP_RULE,
                       f"{numbers}; {text}")
    has = _has_ci((seg[mid].lo, seg[mid].hi), (seg[edge].lo, seg[edge].hi))
    return combine([("every middle segment beats both edges", c)], SWAP_RULE, numbers,
                   no_ci="" if has else no_interval(hint))


def paired_claim(paired: Mapping[tuple[int, int], PairedDiff], wins: Sequence[int],
                 losses: Sequence[int], lower_is_better: bool, show: tuple[int, int]
                 ) -> tuple[str, str]:
    """Claim "every ``wins`` item beats every ``losses`` item" from the paired differences
    ``paired[(w, l)]`` (``w - l`` on the same items): holds when every interval excludes 0 on
    the winning side, fails when one excludes it on the other, else unclear (a pair without a
    test is unclear). Also the text: the ``show`` pair's difference and the count."""
    keys = [(w, j) for w in wins for j in losses]
    sign = -1.0 if lower_is_better else 1.0
    states = []
    for key in keys:
        d = paired.get(key)
        if d is None or not d.significant:
            states.append(UNCLEAR)
        else:
            states.append(HOLDS if sign * d.mean > 0 else FAILS)
    state = FAILS if FAILS in states else HOLDS if all(x == HOLDS for x in states) else UNCLEAR
    d = paired.get(show)
    shown = (f"paired worst middle - better edge {d.mean:+.4g} [{d.low:+.4g}, {d.high:+.4g}] "
             f"over n = {d.n} items, " if d is not None else "")
    return state, (f"{shown}{states.count(HOLDS)} of {len(keys)} middle-edge pairs "
                   "significantly in favour of the middle")


def all_of(verdicts: Sequence[Verdict], rule: str,
           names: Sequence[str] | None = None) -> Verdict:
    """One verdict from several (runs, directions): yes if all yes, no if any no. With
    ``names`` (one per verdict) and more than one verdict, each reason says whose it is and
    what that one concluded, so a reader sees which direction failed."""
    if not verdicts:
        return Verdict(INCONCLUSIVE, rule, "no data", "no data")
    values = [v.verdict for v in verdicts]
    numbers = "; ".join(v.numbers for v in verdicts)
    if names is not None and len(verdicts) > 1:
        whys = "; ".join(f"{n}: {v.verdict}" + (f", {v.why}" if v.why else "")
                         for n, v in zip(names, verdicts))
    else:
        whys = "; ".join(dict.fromkeys(v.why for v in verdicts if v.why))
    if all(v == YES for v in values):
        return Verdict(YES, rule, numbers, whys)
    if NO in values:
        return Verdict(NO, rule, numbers, whys)
    return Verdict(INCONCLUSIVE, rule, numbers, whys)


# ----------------------------------------------------------------------------- (e) sweep

SWEEP_RULE = ("sweep: the best middle mask (0 at both ends) beats full depth with p < "
              f"{ALPHA} (CIs if no p-value) AND the lowest-scoring mask other than full depth "
              "is a one-segment edge mask (10000 or 00001), below every other mask beyond the "
              f"CIs (needs >= {SWEEP_MIN_SEEDS} seeds and >= {SWEEP_MIN_ITEMS} items per "
              "mask)")


@dataclass(frozen=True)
class MaskScore:
    """One row of a sweep summary."""

    mask: str
    mean: float
    lo: float = math.nan
    hi: float = math.nan
    p_value: float = math.nan
    seeds: int | None = None
    n_items: int | None = None

    def point(self) -> Point:
        return Point(self.mean, self.lo, self.hi)


def is_full(mask: str) -> bool:
    return is_mask(mask) and set(mask) == {"1"}


def is_middle(mask: str) -> bool:
    """A mask that trains something but neither edge segment."""
    return is_mask(mask) and "1" in mask and mask[0] == "0" and mask[-1] == "0"


def is_edge(mask: str) -> bool:
    """A one-segment mask at the bottom or the top."""
    return is_mask(mask) and mask.count("1") == 1 and (mask[0] == "1" or mask[-1] == "1")


def sweep_rule(rows: Sequence[MaskScore], lower_is_better: bool = False,
               metric: str = "", hint: str = "") -> Verdict:
    """(e) a middle mask beats full depth and an edge mask is the worst."""
    rows = [r for r in rows if np.isfinite(r.mean)]
    by = {r.mask: r for r in rows}
    full = [m for m in by if is_full(m)]
    middle = [m for m in by if is_middle(m)]
    edge = [m for m in by if is_edge(m)]
    what = f" ({metric})" if metric else ""
    if not full or not middle or not edge:
        return combine([], SWEEP_RULE, f"masks {', '.join(by) or 'none'}{what}",
                       "needs the full-depth mask, a middle mask and an edge mask")
    lib = lower_is_better
    f = by[full[0]]
    best = max(middle, key=lambda m: by[m].point().score(lib))
    others = [m for m in by if m not in full]
    worst = min(others, key=lambda m: by[m].point().score(lib))
    worst_edge = min(edge, key=lambda m: by[m].point().score(lib))
    rest = [m for m in others if m not in edge]
    b = by[best]

    def show(r: MaskScore) -> str:
        ci = f" [{_f(r.lo)}, {_f(r.hi)}]" if np.isfinite(r.lo) else ""
        return f"{r.mask} {_f(r.mean)}{ci}"

    p = b.p_value
    if np.isfinite(p):
        c1 = compare_p(b.point().score(lib), f.point().score(lib), p)
    else:
        c1 = compare(b.point().score(lib), f.point().score(lib), 0.0, b.point().ci(lib),
                     f.point().ci(lib))
    has = np.isfinite(p) or _has_ci(b.point().ci(), f.point().ci())
    if rest:
        lowest_rest = min(rest, key=lambda m: by[m].point().score(lib))
        we, lr = by[worst_edge].point(), by[lowest_rest].point()
        c2 = compare(lr.score(lib), we.score(lib), 0.0, lr.ci(lib), we.ci(lib))
        rest_txt = f", lowest other mask {show(by[lowest_rest])}"
        has = has and _has_ci(we.ci(), lr.ci())
    else:
        c2, rest_txt = exact(True), ""
    seeds = [r.seeds for r in rows if r.seeds is not None]
    items = [r.n_items for r in rows if r.n_items is not None]
    small = []
    if seeds and min(seeds) < SWEEP_MIN_SEEDS:
        small.append(f"{min(seeds)} seed(s) (needs {SWEEP_MIN_SEEDS})")
    if items and min(items) < SWEEP_MIN_ITEMS:
        small.append(f"{min(items)} items (needs {SWEEP_MIN_ITEMS})")
    size = (f"; {min(seeds) if seeds else '?'} seed(s), {min(items) if items else '?'} items")
    numbers = (f"best middle {show(b)} (p = {_f(p)}) vs full {show(f)}; worst mask "
               f"{show(by[worst])}, worst edge {show(by[worst_edge])}{rest_txt}{size}{what}")
    return combine([("middle beats full depth", c1), ("an edge mask is the worst", c2)],
                   SWEEP_RULE, numbers, "; ".join(small), "" if has else no_interval(hint))


# ----------------------------------------------------------------------------- routing drift
ROUTING_SEGMENTS = ("bottom", "middle", "top")  # thirds of the sparse blocks by depth
ROUTING_FACTOR = 1.5    # the largest segment mean JS at least this times every other one
ROUTING_MIN_BLOCKS = 3  # one sparse block per segment at least

ROUTING_RULE = (f"routing drift concentrates in one depth segment: split the sparse blocks "
                f"into thirds by depth ({', '.join(ROUTING_SEGMENTS)}); the segment with the "
                f"largest mean JS divergence exceeds {ROUTING_FACTOR}x each other segment's mean, "
                f"judged with segment intervals taken as the means of the blocks' interval ends "
                f"(wider than the mean's own: conservative); overlapping intervals are "
                f"inconclusive (needs >= {ROUTING_MIN_BLOCKS} sparse blocks)")


@dataclass(frozen=True)
class SegmentMean:
    """Mean JS of one depth segment of sparse blocks, with a conservative interval."""

    name: str
    mean: float
    low: float
    high: float
    n: int


def routing_segments(js: Sequence[float], low: Sequence[float] | None = None,
                     high: Sequence[float] | None = None) -> list[SegmentMean]:
    """Depth-ordered per-block JS (and interval ends) -> the bottom / middle / top thirds'
    means (``np.array_split``: the middle and top take the remainder last)."""
    v = np.asarray(js, dtype=float)
    lo = np.asarray(low if low is not None else v, dtype=float)
    hi = np.asarray(high if high is not None else v, dtype=float)
    lo, hi = np.where(np.isfinite(lo), lo, v), np.where(np.isfinite(hi), hi, v)
    out = []
    for name, idx in zip(ROUTING_SEGMENTS, np.array_split(np.arange(len(v)), 3), strict=True):
        if len(idx):
            out.append(SegmentMean(name, float(v[idx].mean()), float(lo[idx].mean()),
                                   float(hi[idx].mean()), len(idx)))
    return out


def routing_rule(js: Sequence[float], low: Sequence[float] | None = None,
                 high: Sequence[float] | None = None, hint: str = "") -> Verdict:
    """Where routing drift concentrates: ``yes`` names the segment and its factor over the
    next one; ``no`` when the largest segment is below the factor beyond the intervals.
    Without every block's interval (``hint``: how they were switched off) the numbers are
    taken as exact and the reason says so (:func:`no_interval`)."""
    v = np.asarray(js, dtype=float)
    if len(v) < ROUTING_MIN_BLOCKS or not np.isfinite(v).all():
        return Verdict(INCONCLUSIVE, ROUTING_RULE, f"{len(v)} sparse blocks", "too few blocks "
                       "or a missing value")
    has = all(c is not None and len(c) == len(v) and np.isfinite(np.asarray(c, float)).all()
              for c in (low, high))
    no_ci = "" if has else no_interval(hint)
    segs = routing_segments(v, low, high)
    ranked = sorted(segs, key=lambda s: s.mean, reverse=True)
    top, second = ranked[0], ranked[1]
    factor = top.mean / second.mean if second.mean > 0 else math.inf
    numbers = "; ".join(f"{s.name} {_f(s.mean, 4)}"
                        + (f" [{_f(s.low, 4)}, {_f(s.high, 4)}]" if has else "")
                        + f" ({s.n} blocks)" for s in segs)
    numbers += f"; largest: {top.name}, {_f(factor, 3)}x the next ({second.name})"

    def verdict(outcome: str, why: str) -> Verdict:
        return Verdict(outcome, ROUTING_RULE, numbers, "; ".join(w for w in (why, no_ci) if w))

    if top.mean <= 0:
        return verdict(INCONCLUSIVE, "no routing drift at all")
    claims = [compare(top.mean, ROUTING_FACTOR * s.mean, 0.0, (top.low, top.high),
                      (ROUTING_FACTOR * s.low, ROUTING_FACTOR * s.high)) for s in ranked[1:]]
    if all(c == HOLDS for c in claims):
        return verdict(YES, f"concentrated in the {top.name} segment")
    if any(c == FAILS for c in claims):
        return verdict(NO, "spread over depth")
    return verdict(INCONCLUSIVE, "the intervals overlap")
