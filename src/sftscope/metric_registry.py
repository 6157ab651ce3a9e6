"""The metric catalogue: what each metric name in sftscope's tables is and how to show it.

One entry per name: ``kind`` (what it measures), ``direction`` (``higher`` or ``lower`` is
better for scores; ``None`` for descriptive measurements such as CKA or effective rank, which
are neither good nor bad), ``log`` (plot on a log axis when its values span orders of
magnitude), ``order`` (display order within its kind), ``label`` and ``bounds`` (the range the
value and its interval must lie in, e.g. ``(0, 1)`` for an accuracy or a probability).

The report (figures, findings, verdicts) and the sweep (ranking masks) both ask this module:
there is no other list of loss-like names. A name that is not registered gets a spec from
explicit name rules (``delta_<metric>``, ``sv<i>``, ``*_accuracy``, ``*correct``, names with a
``loss``/``nll``/``ppl``/``perplexity``/``error`` word).

A metric that analyze computes is declared once, on its function, with
:func:`register_metric` (as lm-eval's ``register_metric``): the decorator records its spec and
the function at its level (``token``: per sample from a padded batch; ``dataset``: from one
layer's pooled matrix; ``pair``: from the base and SFT pooled matrices). The capture, analyze's
tables and ``delta_`` rows and the report's panels are built from these declarations; the
functions themselves live in :mod:`sftscope.metrics` (importing it registers them). A user's
metric (``sftscope.register_metric(name, fn)``, ``fn`` of the pooled states) is the same
declaration at the ``dataset`` (or, ``pair=True``, ``pair``) level.
Scores of other commands (accuracy, loss, weights, suggest signals) are the entries below.

Pure Python: no torch, so the CLI can import it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from sftscope.errors import SftscopeError, quoted

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
    # routing.csv (analyze of a mixture-of-experts pair: experiments.routing computes these
    # from the captured router sums, not a registered analyze function)
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
    _m("accuracy_norm", "accuracy", HIGHER, order=15, label="accuracy (per-character norm)",
       bounds=UNIT),
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


LEVELS = ("token", "dataset", "pair")


@dataclass(frozen=True)
class MetricFunction:
    """A registered metric function: ``fn`` returns the metric's value, or a dict of it and its
    ``variants`` (further names it produces under given options, e.g. entropy normalisations).

    ``token``: ``fn(batch) -> [B]`` per-sample values of a padded batch (``metrics.TokenBatch``);
    ``dataset``: ``fn(layer) -> float`` of one layer's pooled matrix (``metrics.PooledLayer``);
    ``pair``: ``fn(zb, zs, opts) -> float`` of the base and SFT pooled matrices.
    ``user``: registered by a user's call (a name a later call may replace)."""

    name: str
    level: str
    fn: Callable[..., Any]
    variants: Callable[[Any], Iterable[str]] | None = None
    user: bool = False

    def names(self, opts: Any) -> tuple[str, ...]:
        """Every name this function returns under ``opts``: its own, then its variants."""
        return (self.name, *(self.variants(opts) if self.variants else ()))

    def compute(self, *args: Any) -> dict[str, Any]:
        """name -> value (the function's own name when it returns one value)."""
        out = self.fn(*args)
        return dict(out) if isinstance(out, dict) else {self.name: out}


FUNCTIONS: dict[str, dict[str, MetricFunction]] = {level: {} for level in LEVELS}


def register_metric(name: str, fn: Callable[..., Any] | None = None, *, pair: bool = False,
                    level: str | None = None, kind: str | None = None,
                    direction: str | None = None, log: bool = False, order: int = 1000,
                    label: str = "", bounds: tuple[float | None, float | None] = (None, None),
                    variants: Callable[[Any], Iterable[str]] | None = None) -> Any:
    """Declare the metric ``name``: analyze computes it, writes its rows (and ``delta_`` rows),
    :func:`sftscope.analyze_pair` adds them, and the report draws it; nothing else needs editing.

    Two forms of the one declaration:

    - ``@register_metric(name, level=...)`` on a function of ``metrics.TokenBatch`` /
      ``PooledLayer`` / ``PooledPair`` (the built-in metrics, in :mod:`sftscope.metrics`);
      returns the function.
    - ``register_metric(name, fn)`` (the public ``sftscope.register_metric``): ``fn(z)`` of one
      layer's pooled states ``[N, D]`` (a ``dataset`` metric, rows ``model`` base / sft), or
      with ``pair=True`` ``fn(zb, zs)`` of both models' states (a ``pair`` metric); its name
      must not be a built-in one, a failure is an error naming it; returns the declaration.

    ``kind`` defaults to ``pair`` at the pair level, else ``single``; ``direction``:
    ``higher`` / ``lower`` for a score with a better direction."""
    if fn is not None and level is None:
        return _register_user(name, fn, pair=pair, label=label, direction=direction)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    def declare(f: Callable[..., Any]) -> Callable[..., Any]:
        _declare(MetricFunction(name, level, f, variants),
                 MetricSpec(name, kind or ("pair" if level == "pair" else "single"), direction,
                            log, order, label, bounds))
        return f

    return declare if fn is None else declare(fn)


def _declare(metric: MetricFunction, spec: MetricSpec) -> MetricFunction:
    register(spec)
    FUNCTIONS[metric.level][metric.name] = metric
    return metric


def _register_user(name: str, fn: Callable[..., Any], *, pair: bool, label: str,
                   direction: str | None) -> MetricFunction:
    """A user's metric on pooled states, checked and declared at the ``dataset`` or ``pair``
    level like a built-in one."""
    if not isinstance(name, str) or not name.isidentifier():
        raise SftscopeError(f"name {name!r}: give a metric name of letters, digits and _")
    if not callable(fn):
        raise SftscopeError(f"fn for metric {name!r} is not callable; give a function of "
                            f"{'(zb, zs)' if pair else '(z)'} returning a float")
    if direction not in (None, HIGHER, LOWER):
        raise SftscopeError(f"direction {direction!r}: use None, 'higher' or 'lower'")
    users = {f.name for funcs in FUNCTIONS.values() for f in funcs.values() if f.user}
    if (None, name) in REGISTRY and name not in users:
        raise SftscopeError(f"name {name!r} is a built-in metric; choose another name")
    unregister_metric(name)  # a replaced user metric may change level

    def value(x: Any) -> float:
        try:
            return float(fn(x.zb, x.zs) if pair else fn(x.z))
        except Exception as e:  # the user's code: say whose it is
            raise SftscopeError(f"registered metric {name!r} failed: "
                                f"{quoted(e)}") from e

    level = "pair" if pair else "dataset"
    return _declare(MetricFunction(name, level, value, user=True),
                    MetricSpec(name, "pair" if pair else "single", direction, label=label))


def unregister_metric(name: str) -> None:
    """Remove a metric declared with :func:`register_metric` (its name leaves the catalogue)."""
    for funcs in FUNCTIONS.values():
        funcs.pop(name, None)
    REGISTRY.pop((None, name), None)


def metric_functions(level: str) -> list[MetricFunction]:
    """The functions declared at ``level``, in declaration order."""
    return list(FUNCTIONS[level].values())


def metric_names(level: str, opts: Any = None) -> tuple[str, ...]:
    """Every name the functions of ``level`` produce under ``opts``: the metrics in
    declaration order, then their variants."""
    funcs = metric_functions(level)
    return (*(f.name for f in funcs), *(v for f in funcs for v in f.names(opts)[1:]))


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
