"""A user's own layer-wise metrics, registered in one call and computed with the built-in ones.

``register_metric("top_sv", lambda z: float(torch.linalg.svdvals(z)[0]))`` adds a per-model
metric: ``fn(z)`` gets one layer's pooled states ``[N, D]`` (float32, the pooling of the run)
and returns a float; its rows have ``model`` = base / sft. ``pair=True``: ``fn(zb, zs)`` gets
the base's and the SFT model's states of the same samples and its rows have ``model`` = pair.
Both ``analyze`` (run in the same process) and :func:`sftscope.analyze_pair` add the rows;
the name is entered in :mod:`sftscope.metric_registry` so the report can label it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from sftscope.errors import SftscopeError


@dataclass(frozen=True)
class UserMetric:
    """One registered metric: its name, function and whether it compares two models."""

    name: str
    fn: Callable[..., float]
    pair: bool


USER_METRICS: dict[str, UserMetric] = {}


def register_metric(name: str, fn: Callable[..., float], *, pair: bool = False,
                    label: str = "", direction: str | None = None) -> UserMetric:
    """Add (or replace) a metric computed on every layer's pooled states (module docstring).

    ``direction``: ``higher`` / ``lower`` when it is a score with a better direction."""
    from sftscope.metric_registry import REGISTRY, MetricSpec, register

    if not isinstance(name, str) or not name.isidentifier():
        raise SftscopeError(f"name {name!r}: give a metric name of letters, digits and _")
    if not callable(fn):
        raise SftscopeError(f"fn for metric {name!r} is not callable; give a function of "
                            f"{'(zb, zs)' if pair else '(z)'} returning a float")
    if direction not in (None, "higher", "lower"):
        raise SftscopeError(f"direction {direction!r}: use None, 'higher' or 'lower'")
    known = REGISTRY.get((None, name))
    if known is not None and name not in USER_METRICS:
        raise SftscopeError(f"name {name!r} is a built-in metric; choose another name")
    register(MetricSpec(name, "pair" if pair else "single", direction, label=label))
    USER_METRICS[name] = UserMetric(name, fn, pair)
    return USER_METRICS[name]


def unregister_metric(name: str) -> None:
    """Remove a registered metric (its name leaves the catalogue too)."""
    from sftscope.metric_registry import REGISTRY

    if USER_METRICS.pop(name, None) is not None:
        REGISTRY.pop((None, name), None)


def user_values(z: Tensor, other: Tensor | None = None) -> dict[str, float]:
    """The registered single-model metrics of ``z`` (``other`` None) or pair metrics of
    ``(z, other)``; a failing function is an error naming the metric."""
    out: dict[str, float] = {}
    for m in USER_METRICS.values():
        if m.pair != (other is not None):
            continue
        try:
            v = m.fn(z, other) if m.pair else m.fn(z)
            out[m.name] = float(v)
        except Exception as e:  # the user's code: say whose it is
            raise SftscopeError(f"registered metric {m.name!r} failed: "
                                f"{type(e).__name__}: {e}") from e
    return out


__all__ = ["USER_METRICS", "UserMetric", "register_metric", "unregister_metric", "user_values"]
