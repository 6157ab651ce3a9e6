"""Routing drift of a mixture-of-experts pair: what ``analyze`` captures and ``routing.csv``.

``routing.csv`` (tidy): ``block``, ``expert`` (empty on block rows), ``metric``, ``model``,
``value``, ``ci_low``, ``ci_high``. Per sparse block: ``js_divergence`` and ``topk_overlap``
(``model`` = the pair label), ``load_entropy`` per model; per expert ``load`` per model.
Values are means over real tokens (padding excluded) from per-sample sums; intervals are a
sample-level (cluster) bootstrap (``--bootstrap``; NaN without).

``--router-input own`` (default): each router on its own model's residual stream (the base's
per-token router output is stored on disk by its pass and read batch by batch by the SFT's).
``--router-input base``: the SFT's routers run on the base's stream (in the base's pass), which
separates a router's own change from the drift of the states it reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sftscope import metrics as M
from sftscope.capture.routing import RouterStore, RoutingTask, router_copies, routing_shape
from sftscope.errors import SftscopeError
from sftscope.metrics import routing as R

COLUMNS = ["block", "expert", "metric", "model", "value", "ci_low", "ci_high"]
ROUTER_INPUTS = ("own", "base")


def check_router_input(router_input: str | None, base_config: Any, base: str) -> tuple | None:
    """The routing shape of the pair (None: dense, no routing); ``--router-input`` given for
    a dense pair is refused in one line (None: the default, ``own``)."""
    if router_input is not None and router_input not in ROUTER_INPUTS:
        raise SftscopeError(f"--router-input must be one of {', '.join(ROUTER_INPUTS)}, "
                            f"got {router_input!r}")
    shape = routing_shape(base_config)
    if shape is None and router_input is not None:
        raise SftscopeError(f"--router-input {router_input} needs a mixture-of-experts pair; "
                            f"{base} has no routers (leave the option out)")
    return shape


def check_same_routers(shape: tuple | None, stage_configs: dict[str, Any]) -> None:
    """Every SFT-side stage routes like the base (same sparse blocks, experts and top-k):
    routing is compared router by router; otherwise one line."""
    for label, config in stage_configs.items():
        theirs = routing_shape(config)
        if theirs != shape:
            def say(x: tuple | None) -> str:
                return ("no routers" if x is None else
                        f"{len(x[0])} sparse blocks, {x[1]} experts, top-{x[2]}")
            raise SftscopeError(f"{label} routes differently from the base ({say(theirs)} vs "
                                f"{say(shape)}); routing drift compares the same routers")


@dataclass
class RoutingPlan:
    """How each capture of an analysis takes part in the routing measurement.

    ``cache``: the capture cache (the base's router store lives there); ``load_routers``:
    label -> a function that loads that stage's model and returns copies of its routers
    (``--router-input base``; called only when the base's capture actually runs);
    ``partner_ids``: label -> the stage's content id (enters the base's key)."""

    router_input: str
    blocks: list[int]
    n_experts: int
    top_k: int
    cache: Path
    load_routers: dict[str, Callable[[], dict[int, torch.nn.Module]]] = field(
        default_factory=dict)
    partner_ids: dict[str, Any] = field(default_factory=dict)
    base_key: str | None = None

    def store(self, key: str) -> RouterStore:
        return RouterStore(self.cache / f"router-{key}")

    def base_option(self) -> str:
        """The base capture's ``CaptureConfig.routing`` (it enters the key)."""
        if self.router_input == "own":
            return json.dumps({"mode": "record"})
        return json.dumps({"mode": "apply", "partners": self.partner_ids}, sort_keys=True)

    def stage_option(self) -> str:
        """A stage's ``CaptureConfig.routing``: compared with the base's stored routing (own
        input; the base's key names it), or nothing (base input: measured in the base pass)."""
        if self.router_input == "base":
            return ""
        return json.dumps({"mode": "compare", "base": self.base_key})

    def base_task(self, key: str) -> RoutingTask:
        if self.router_input == "own":
            return RoutingTask("record", self.blocks, self.n_experts, self.top_k,
                               store=self.store(key))
        partners = {label: load() for label, load in self.load_routers.items()}
        for label, routers in partners.items():
            if sorted(routers) != sorted(self.blocks):
                raise SftscopeError(f"stage {label}'s sparse blocks differ from the base's; "
                                    f"--router-input base needs the same routers")
        return RoutingTask("apply", self.blocks, self.n_experts, self.top_k, partners=partners)

    def stage_task(self, _key: str) -> RoutingTask | None:
        if self.router_input == "base":
            return None
        assert self.base_key is not None
        return RoutingTask("compare", self.blocks, self.n_experts, self.top_k,
                           store=self.store(self.base_key))

    def base_ready(self, key: str, n: int) -> bool:
        """Whether a cached base capture can serve: with own input, its stored per-token
        routing must be whole too (the stages read it)."""
        return self.router_input == "base" or self.store(key).complete(list(range(n)))

    def record(self) -> dict:
        return {"router_input": self.router_input, "blocks": self.blocks,
                "n_experts": self.n_experts, "top_k": self.top_k,
                "store": str(self.store(self.base_key)) if self.router_input == "own"
                and self.base_key else None}


def router_loader(spec: str, options: Any) -> Callable[[], dict[int, torch.nn.Module]]:
    """A function loading the model ``spec`` (``LoadOptions``) and returning copies of its
    routers, the model released at once."""
    def load() -> dict[int, torch.nn.Module]:
        from sftscope.load.models import load_model
        from sftscope.load.runtime import model_bytes, release

        model = load_model(spec, options)
        nbytes = model_bytes(model)
        try:
            return router_copies(model)
        finally:
            del model
            release(nbytes)
    return load


def _rows(block_ids: list[int], metric: str, model: str, values: np.ndarray,
          low: np.ndarray, high: np.ndarray, experts: int | None = None) -> list[tuple]:
    """Table rows of per-block values ``[m]`` or per-(block, expert) values ``[m * E]``."""
    out = []
    for i, b in enumerate(block_ids):
        if experts is None:
            out.append((b, pd.NA, metric, model, values[i], low[i], high[i]))
        else:
            for e in range(experts):
                c = i * experts + e
                out.append((b, e, metric, model, values[c], low[c], high[c]))
    return out


def load_rows(count: torch.Tensor, blocks: list[int], model: str, bootstrap: int = 0,
              seed: int = 0) -> list[tuple]:
    """``load`` per (block, expert) and ``load_entropy`` per block of one model, from
    per-sample top-k slot counts ``count [m, N, E]``."""
    m, n, e = count.shape
    x = count.permute(1, 0, 2).reshape(n, m * e).double().numpy()
    total = x.sum(0).reshape(m, e)
    load = R.load_shares(total).reshape(-1)
    nan = np.full(m * e, np.nan)
    lo, hi = nan, nan.copy()
    elo, ehi = np.full(m, np.nan), np.full(m, np.nan)
    if bootstrap:
        def shares(t: np.ndarray) -> np.ndarray:
            return R.load_shares(t.reshape(-1, m, e)).reshape(t.shape[0], -1)

        lo, hi = M.cluster_stat_ci(x, shares, n_boot=bootstrap, seed=seed)
        elo, ehi = M.cluster_stat_ci(
            x, lambda t: R.load_entropy(shares(t).reshape(-1, m, e)), n_boot=bootstrap,
            seed=seed)
    ent = np.atleast_1d(R.load_entropy(load.reshape(m, e)))
    return (_rows(blocks, "load", model, load, lo, hi, experts=e)
            + _rows(blocks, "load_entropy", model, ent, elo, ehi))


def drift_rows(js: torch.Tensor, overlap: torch.Tensor, n_tokens: torch.Tensor,
               blocks: list[int], model: str, bootstrap: int = 0, seed: int = 0
               ) -> list[tuple]:
    """``js_divergence`` and ``topk_overlap`` per block: per-sample sums ``[m, N]`` over the
    real-token counts ``[N]``, token-weighted means with cluster-bootstrap intervals."""
    den = n_tokens.double().numpy()
    out = []
    for name, sums, bounds in (("js_divergence", js, (0.0, float(np.log(2)))),
                               ("topk_overlap", overlap, (0.0, 1.0))):
        x = sums.double().numpy().T  # [N, m]
        value = x.sum(0) / max(den.sum(), 1.0)
        lo, hi = (M.cluster_ratio_ci(x, den, n_boot=bootstrap, seed=seed, bounds=bounds)
                  if bootstrap else (np.full(len(blocks), np.nan),) * 2)
        out += _rows(blocks, name, model, value, lo, hi)
    return out


def frame(rows: list[tuple]) -> pd.DataFrame:
    """``routing.csv``'s rows in order: metric, model, block, expert."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["block"] = df["block"].astype("int64")
    df["expert"] = df["expert"].astype("Int64")
    return df.sort_values(["metric", "model", "block", "expert"], kind="stable",
                          na_position="first").reset_index(drop=True)
