"""The metric catalogue: what each metric name in sftscope's tables is and how to show it.

One entry per name: ``kind`` (what it measures), ``direction`` (``higher`` or ``lower`` is
better for scores; ``None`` for descriptive measurements such as CKA or effective rank, which
are neither good nor bad), ``log`` (plot on a log axis when its values span orders of
magnitude), ``order`` (display order within its kind), ``label`` and ``bounds`` (the range the
value and its interval must lie in, e.g. ``(0, 1)`` for an accuracy or a probability).

The report (figures, findings, verdicts) and the sweep (ranking masks) both ask this module:
there is no other list of loss-like names. A name that is not registered gets a spec from
explicit name rules (``delta_<metric>``, ``sv<i>``, ``*_accuracy``, ``*correct``, names with a
``loss``/``nll``/``ppl``/``perplexity``/``error`` word); adding a metric = adding one entry.

Pure Python: no torch, so the report and the CLI can import it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

KINDS = ("pair", "single", "weight", "accuracy", "agreement", "probability", "loss",
         "perplexity", "rank", "signal", "distribution", "unknown")
HIGHER, LOWER = "higher", "lower"
UNIT = (0.0, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    """How one metric name is read and shown."""

    name: str
    kind: str
    direction: str | None = None
    log: bool = False
    order: int = 1000
    label: str = ""
    bounds: tuple[float | None, float | None] = (None, None)
    table: str | None = None  # set when the name means something else in another table
    known: bool = True

    @property
    def lower_is_better(self) -> bool:
        return self.direction == LOWER

    @property
    def is_score(self) -> bool:
        """True for metrics with a better direction (accuracy, loss, ...)."""
        return self.direction is not None

    @property
    def display(self) -> str:
        return self.label or self.name.replace("_", " ")


def _m(name: str, kind: str, direction: str | None = None, log: bool = False, order: int = 1000,
       label: str = "", bounds: tuple[float | None, float | None] = (None, None),
       table: str | None = None) -> MetricSpec:
    return MetricSpec(name, kind, direction, log, order, label, bounds, table)


_ENTRIES: list[MetricSpec] = [
    # analyze: base-vs-SFT pair metrics (metrics.csv, model = pair), Fig. 1 order
    _m("cka", "pair", order=10, label="CKA", bounds=UNIT),
    _m("cosine_similarity", "pair", order=20, label="cosine similarity", bounds=(-1.0, 1.0)),
    _m("mean_shift", "pair", log=True, order=30, label="mean shift", bounds=(0.0, None)),
    _m("mean_shift_relative", "pair", order=40, label="relative mean shift",
       bounds=(0.0, None)),
    _m("cka_unbiased", "pair", order=50, label="CKA (unbiased)"),
    # analyze: single-model metrics (model = base / sft), Fig. 2 order
    _m("effective_rank_norm", "single", order=10, label="effective rank / min(N, D)",
       bounds=UNIT),
    _m("prompt_entropy", "single", order=20, label="prompt entropy", bounds=(0.0, None)),
    _m("dataset_entropy", "single", order=30, label="dataset entropy", bounds=(0.0, None)),
    _m("spectral_norm", "single", log=True, order=40, label="spectral norm", bounds=(0.0, None)),
    _m("condition_number", "single", log=True, order=50, label="condition number",
       bounds=(0.0, None)),
    _m("effective_rank", "single", order=60, label="effective rank", bounds=(0.0, None)),
    _m("rank_deficiency", "single", order=70, label="rank deficiency", bounds=(0.0, None)),
    _m("rank_deficiency_frac", "single", order=80, label="rank deficiency (fraction)",
       bounds=UNIT),
    _m("l2_norm", "single", order=90, label="L2 norm", bounds=(0.0, None)),
    _m("l2_norm_std", "single", order=91, label="L2 norm std over samples", bounds=(0.0, None)),
    _m("l2_norm_cv", "single", order=92, label="L2 norm CV (std / mean)", bounds=(0.0, None)),
    _m("sparsity", "single", order=100, label="sparsity", bounds=UNIT),
    _m("curvature", "single", order=110, label="curvature (rad)", bounds=(0.0, None)),
    # routing.csv (analyze of a mixture-of-experts pair)
    _m("js_divergence", "pair", order=60, label="router JS divergence (nats)",
       bounds=(0.0, 0.6931471805599453)),
    _m("topk_overlap", "pair", order=70, label="top-k overlap", bounds=UNIT),
    _m("load", "single", order=120, label="expert load (share of top-k slots)", bounds=UNIT,
       table="routing"),
    _m("load_entropy", "single", order=130, label="expert load entropy (nats)",
       bounds=(0.0, None), table="routing"),
    # weights.csv
    _m("relative", "weight", order=10, label="relative change", bounds=(0.0, None),
       table="weights"),
    _m("frobenius", "weight", order=20, label="Frobenius change", bounds=(0.0, None),
       table="weights"),
    _m("stable_rank", "weight", order=30, label="stable rank of the change", table="weights"),
    _m("effective_rank", "weight", order=40, label="effective rank of the change",
       table="weights"),
    _m("energy_rank90", "weight", order=50, label="rank holding 90 % of the change",
       table="weights"),
    _m("residual_energy", "weight", order=60, label="residual energy", bounds=UNIT,
       table="weights"),
    _m("rows", "weight", order=70, label="added rows", table="weights"),
    _m("unchanged_frac", "weight", order=15, label="share of entries unchanged (bit-identical)",
       bounds=UNIT, table="weights"),
    # probe / swap / eval / sweep scores
    _m("accuracy", "accuracy", HIGHER, order=10, label="accuracy", bounds=UNIT),
    _m("choice_accuracy", "accuracy", HIGHER, order=20, label="choice accuracy", bounds=UNIT),
    _m("margin", "signal", HIGHER, order=25,
       label="preference margin (log p chosen - log p rejected)"),
    _m("exact_match_flexible", "accuracy", HIGHER, order=30, label="exact match (flexible)",
       bounds=UNIT),
    _m("exact_match_strict", "accuracy", HIGHER, order=31, label="exact match (strict)",
       bounds=UNIT),
    _m("flexible_extract", "accuracy", HIGHER, order=32, label="exact match (flexible)",
       bounds=UNIT),
    _m("strict_match", "accuracy", HIGHER, order=33, label="exact match (strict)", bounds=UNIT),
    _m("numeric_match", "accuracy", HIGHER, order=34, label="numeric match (lenient, not lm-eval)",
       bounds=UNIT),
    _m("agreement", "agreement", None, order=40, label="base/SFT agreement", bounds=UNIT),
    _m("answer_prob", "probability", HIGHER, order=50, label="answer probability",
       bounds=UNIT),
    _m("loss", "loss", LOWER, order=60, label="loss", bounds=(0.0, None)),
    _m("loss_after", "loss", LOWER, order=61, label="loss after tuning", bounds=(0.0, None)),
    _m("loss_before", "loss", LOWER, order=62, label="loss before tuning", bounds=(0.0, None)),
    _m("loss_delta", "loss", LOWER, order=63, label="loss change (after - before)"),
    _m("train_loss", "loss", LOWER, order=64, label="training loss", bounds=(0.0, None)),
    _m("nll", "loss", LOWER, order=65, label="negative log-likelihood", bounds=(0.0, None)),
    _m("cross_entropy", "loss", LOWER, order=66, label="cross-entropy", bounds=(0.0, None)),
    _m("perplexity", "perplexity", LOWER, log=True, order=70, label="perplexity",
       bounds=(1.0, None)),
    _m("ppl", "perplexity", LOWER, log=True, order=71, label="perplexity", bounds=(1.0, None)),
    _m("ppl_after", "perplexity", LOWER, log=True, order=72, label="perplexity after tuning",
       bounds=(1.0, None)),
    _m("ppl_before", "perplexity", LOWER, log=True, order=73,
       label="perplexity before tuning", bounds=(1.0, None)),
    _m("ppl_ratio", "perplexity", LOWER, order=74, label="perplexity ratio (after / before)",
       bounds=(0.0, None)),
    _m("answer_rank", "rank", LOWER, log=True, order=80, label="answer rank",
       bounds=(1.0, None)),
    # probe.csv, a pair's output distributions (experiments/distributions.py; descriptive)
    _m("kl_pair", "distribution", order=10, label="KL(SFT || base) of the lens",
       bounds=(0.0, None)),
    _m("kl_to_final", "distribution", order=20, label="KL(output || lens at j)",
       bounds=(0.0, None)),
    _m("shift_unshifted", "distribution", order=30, label="unshifted (base rank 1)",
       bounds=UNIT),
    _m("shift_marginal", "distribution", order=31, label="marginal (base rank 2-3)",
       bounds=UNIT),
    _m("shift_shifted", "distribution", order=32, label="shifted (base rank > 3)",
       bounds=UNIT),
    # steer.csv: what steering did to generation (descriptive)
    _m("new_tokens", "generation", order=90, label="new tokens per completion",
       bounds=(0.0, None)),
    _m("same_as_unsteered", "generation", order=91, label="completions as unsteered",
       bounds=UNIT),
    # dynamics.csv (tune)
    _m("update_norm", "dynamics", order=10, label="update norm ||W_t - W_0||",
       bounds=(0.0, None), table="dynamics"),
    _m("grad_norm", "dynamics", log=True, order=20, label="gradient norm", bounds=(0.0, None),
       table="dynamics"),
    # suggest.csv signals: higher = a better segment to tune
    _m("score", "signal", HIGHER, order=10, label="segment score", table="suggest"),
    _m("angular_distance", "signal", HIGHER, order=20, label="angular distance",
       table="suggest"),
    _m("grad_norm", "signal", HIGHER, order=30, label="gradient norm", table="suggest"),
    _m("cka_growth", "signal", HIGHER, order=40, label="1 - CKA growth", table="suggest"),
    _m("mean_shift_growth", "signal", HIGHER, order=50, label="mean-shift growth",
       table="suggest"),
    _m("weight_change", "signal", HIGHER, order=60, label="weight change", table="suggest"),
]

REGISTRY: dict[tuple[str | None, str], MetricSpec] = {(e.table, e.name): e for e in _ENTRIES}
LOWER_WORDS = ("loss", "nll", "ppl", "perplexity", "error", "err")


def register(spec: MetricSpec) -> MetricSpec:
    """Add or replace an entry (for metrics of new tasks)."""
    REGISTRY[(spec.table, spec.name)] = spec
    return spec


def metric_spec(name: object, table: str | None = None) -> MetricSpec:
    """The spec of a metric name (``table`` picks a table-specific meaning, e.g. ``weights``)."""
    n = str(name)
    if table is not None and (table, n) in REGISTRY:
        return REGISTRY[(table, n)]
    if (None, n) in REGISTRY:
        return REGISTRY[(None, n)]
    if n.startswith("delta_") and len(n) > 6:
        inner = metric_spec(n[6:], table)
        return replace(inner, name=n, direction=None, bounds=(None, None), log=False,
                       label=f"change of {inner.display}", order=inner.order + 500)
    extra = re.fullmatch(r"(prompt|dataset)_entropy_(\w+)", n)  # a further normalisation
    if extra and (None, f"{extra[1]}_entropy") in REGISTRY:
        inner = REGISTRY[(None, f"{extra[1]}_entropy")]
        return replace(inner, name=n, order=inner.order + 1,
                       label=f"{inner.display} ({'raw' if extra[2] == 'raw' else '/ ' + extra[2]})",
                       bounds=(0.0, None if extra[2] == "raw" else inner.bounds[1]))
    if table == "weights" and re.fullmatch(r"sv\d+", n):
        return MetricSpec(n, "weight", order=100 + int(n[2:]), label=f"singular value {n[2:]}")
    if table == "suggest" and n.startswith("rank_"):
        return MetricSpec(n, "signal", HIGHER, order=70, label=f"rank of {n[5:]} (1 = best)",
                          bounds=UNIT, table="suggest")
    low = n.lower()
    words = re.split(r"[^a-z0-9]+", low)
    if any(w in LOWER_WORDS for w in words):
        log = any(w in ("ppl", "perplexity") for w in words)
        return MetricSpec(n, "perplexity" if log else "loss", LOWER, log=log, known=False)
    if low.endswith("accuracy") or low.endswith("correct") or low.startswith("exact_match"):
        return MetricSpec(n, "accuracy", HIGHER, bounds=UNIT, known=False)
    if "agree" in low:
        return MetricSpec(n, "agreement", None, bounds=UNIT, known=False)
    return MetricSpec(n, "unknown", None, known=False)


def lower_is_better(name: object, table: str | None = None) -> bool:
    """True for loss-like scores (loss, perplexity, answer rank, ...)."""
    return metric_spec(name, table).lower_is_better


def direction(name: object, table: str | None = None) -> str:
    """``higher`` or ``lower``: the better direction used to rank scores (an unregistered or
    descriptive name ranks as ``higher``)."""
    return LOWER if lower_is_better(name, table) else HIGHER


def ordered(names: Iterable[object], table: str | None = None) -> list[str]:
    """Names in display order (registered order, then unknown names as given)."""
    items = list(dict.fromkeys(str(n) for n in names))
    pos = {n: i for i, n in enumerate(items)}
    return sorted(items, key=lambda n: (metric_spec(n, table).order, pos[n]))


def label(name: object, table: str | None = None) -> str:
    return metric_spec(name, table).display


def use_log(name: object, values: Iterable[float], table: str | None = None,
            span: float = 30.0) -> bool:
    """Log axis for a log-scale metric whose positive values span more than ``span`` x."""
    if not metric_spec(name, table).log:
        return False
    v = [float(x) for x in values if x == x]
    return bool(v) and min(v) > 0 and max(v) / min(v) > span


def clip_to_bounds(name: object, value: float, table: str | None = None) -> float:
    """``value`` clipped into the metric's bounds (NaN stays NaN)."""
    lo, hi = metric_spec(name, table).bounds
    if value != value:
        return value
    if lo is not None and value < lo:
        return lo
    if hi is not None and value > hi:
        return hi
    return value
