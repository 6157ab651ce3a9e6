"""Routing capture of mixture-of-experts models, streamed with the hidden-state capture.

Hooks on each sparse block's router see its logits for every token of a batch (the router's
own top-k selection where it returns one); only real tokens count (padding excluded). What
is kept is per sample, never per token beyond one batch:

- ``count`` ``[m, N, E]``: per sparse block and sample, how many of the sample's top-k slots
  each expert took (the expert load of the model).
- ``js`` / ``overlap`` ``[m, N]``: per sample, the sum over its tokens of the Jensen-Shannon
  divergence and the top-k overlap between this model's router and a partner's.

Two ways to compare two models' routers at the same tokens while only one model is in memory:

- ``record`` then ``compare`` (each router on its own model's residual stream): the base's
  pass writes each sample's router probabilities and selections ``[m, T, E]`` / ``[m, T, k]``
  to a store on disk (one file per batch, in the capture cache); the SFT's pass reads those
  of each of its batches' samples and reduces against them. At most one batch is in memory.
- ``apply`` (``--router-input base``): copies of the SFT's routers (``E x H`` each) run in the
  base's pass on the very input the base's routers get; both distributions are there at once.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sftscope.errors import SftscopeError
from sftscope.io import atomic_path, stable_hash
from sftscope.metrics import routing as R

MODES = ("record", "compare", "apply")


def moe_routers(model: nn.Module) -> dict[int, nn.Module]:
    """The router module of each sparse block of ``model`` (block -> module); empty for a
    dense model."""
    from sftscope.load.arch import get_router, moe_info

    info = moe_info(model.config)
    if info is None:
        return {}
    routers = {b: get_router(model, b) for b in info.sparse_blocks}
    missing = [b for b, r in routers.items() if r is None]
    if missing:
        raise SftscopeError(f"blocks {missing} should have a router but none was found; this "
                            f"mixture-of-experts layout is not supported")
    return routers  # type: ignore[return-value]


def routing_shape(config: Any) -> tuple[list[int], int, int] | None:
    """``(sparse blocks, experts, experts per token)`` of an MoE config; None when dense."""
    from sftscope.load.arch import moe_info

    info = moe_info(config)
    if info is None:
        return None
    return list(info.sparse_blocks), int(info.n_experts), int(info.top_k)


def router_copies(model: nn.Module) -> dict[int, nn.Module]:
    """CPU copies of ``model``'s routers (small: ``E x H`` each), to run on another model's
    stream after ``model`` is released (``--router-input base``)."""
    return {b: copy.deepcopy(r).to("cpu").eval() for b, r in moe_routers(model).items()}


@contextlib.contextmanager
def router_hooks(routers: dict[int, nn.Module], fn) -> Iterator[None]:
    """Call ``fn(i, router_input, router_output)`` for the ``i``-th sparse block's router
    during forward passes inside the block."""
    handles = []
    for i, r in enumerate(routers.values()):
        def hook(_mod, args, output, i=i):
            fn(i, args[0], output)
        handles.append(r.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class RouterStore:
    """A base's router probabilities ``[m, T, E]`` (float32) and selections ``[m, T, k]`` per
    sample, in ``folder`` (the capture cache): one file per batch (tensors ``<sample>.probs``
    and ``<sample>.sel``), written by ``record``, read batch by batch by ``compare`` whatever
    the batches then are. Files are written atomically, so a present file is whole; a sample
    in two files (a resumed or re-sharded run) has the same numbers in both."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._index: dict[int, Path] | None = None

    def write(self, samples: list[int], probs: list[torch.Tensor],
              sel: list[torch.Tensor]) -> None:
        tensors = {}
        for s, p, q in zip(samples, probs, sel, strict=True):
            tensors[f"{s}.probs"], tensors[f"{s}.sel"] = p.contiguous(), q.contiguous()
        digest = stable_hash(samples, 12)
        with atomic_path(self.folder / f"{samples[0]}-{len(samples)}-{digest}.safetensors") as t:
            save_file(tensors, str(t))
        self._index = None

    def index(self) -> dict[int, Path]:
        """Sample -> a file holding it (the folder's files read once)."""
        if self._index is None:
            from safetensors import safe_open

            self._index = {}
            for f in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else ():
                try:
                    with safe_open(str(f), "pt") as h:
                        keys = list(h.keys())
                except Exception:  # noqa: BLE001 - an unreadable file holds nothing
                    continue
                self._index.update({int(k.split(".")[0]): f for k in keys
                                    if k.endswith(".probs")})
        return self._index

    def complete(self, samples: list[int]) -> bool:
        self._index = None
        have = self.index()
        return all(s in have for s in samples)

    def read(self, samples: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples' tokens in order (right padding: the real rows of a batch, flattened)
        -> probabilities ``[m, n, E]`` and selections ``[m, n, k]``."""
        from safetensors import safe_open

        have, probs, sel = self.index(), [], []
        for f, group in itertools.groupby(samples, key=lambda s: have.get(s)):
            group = list(group)
            try:
                if f is None:
                    raise FileNotFoundError(group[0])
                with safe_open(str(f), "pt") as h:
                    for s in group:
                        probs.append(h.get_tensor(f"{s}.probs"))
                        sel.append(h.get_tensor(f"{s}.sel"))
            except Exception as e:  # noqa: BLE001 - any unreadable file: one line
                raise SftscopeError(f"the base's router probabilities of sample {group[0]} are "
                                    f"missing or unreadable in {self.folder} "
                                    f"({type(e).__name__}); delete that folder and run "
                                    f"again") from None
        return torch.cat(probs, 1), torch.cat(sel, 1)


@dataclass
class RoutingTask:
    """What a capture does with the routers: ``mode`` (``record``/``compare``/``apply``),
    ``store`` (record/compare), ``partners`` (apply: label -> router copies by block)."""

    mode: str
    blocks: list[int]
    n_experts: int
    top_k: int
    store: RouterStore | None = None
    partners: dict[str, dict[int, nn.Module]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SftscopeError(f"routing mode must be one of {', '.join(MODES)}")
        if self.mode in ("record", "compare") and self.store is None:
            raise SftscopeError(f"routing mode {self.mode} needs a store")

    def names(self) -> list[str]:
        """The per-sample tensors of the result (``routing.<name>``)."""
        out = ["count"]
        if self.mode == "compare":
            out += ["js", "overlap"]
        for label in self.partners if self.mode == "apply" else ():
            out += [f"{label}.count", f"{label}.js", f"{label}.overlap"]
        return out

    def info(self) -> dict:
        return {"mode": self.mode, "blocks": self.blocks, "n_experts": self.n_experts,
                "top_k": self.top_k, "partners": list(self.partners)}


class RoutingReducer:
    """Reduces the routers' outputs of each batch to per-sample sums (``RoutingTask``).

    Driven beside the hidden-state reducer: ``start`` before a batch's forward pass (reads the
    base's stored routing of its samples in ``compare``), ``__call__`` from the router hooks,
    ``finish`` after it (moves the batch's sums to the buffers; ``record`` writes each
    sample's file). Buffers' rows are the samples ``samples`` in order (all ``n`` when None).
    """

    def __init__(self, task: RoutingTask, n: int, samples: list[int] | None = None) -> None:
        self.task = task
        self.rows = None if samples is None else {s: r for r, s in enumerate(samples)}
        n_rows = n if samples is None else len(samples)
        m, e = len(task.blocks), task.n_experts
        self.buf: dict[str, torch.Tensor] = {}
        for name in task.names():
            shape = (m, n_rows, e) if name.endswith("count") else (m, n_rows)
            dtype = torch.int64 if name.endswith("count") else torch.float64
            self.buf[name] = torch.zeros(shape, dtype=dtype)
        self._moved: dict[tuple[str, int], nn.Module] = {}

    def row(self, index: list[int]) -> torch.Tensor:
        if self.rows is None:
            return torch.tensor(index, dtype=torch.long)
        return torch.tensor([self.rows[i] for i in index], dtype=torch.long)

    def start(self, batch) -> None:
        self.batch = batch
        self._cur: dict[str, list[torch.Tensor | None]] = {
            k: [None] * len(self.task.blocks) for k in self.buf}
        self._keep: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(
            self.task.blocks)
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._base = None
        if self.task.mode == "compare":
            assert self.task.store is not None
            self._base = self.task.store.read(batch.index)

    def _where(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat real-token mask ``[B*T]`` and each real token's batch row, on ``device``."""
        if device not in self._dev:
            mask = self.batch.mask.reshape(-1)
            rows = torch.arange(len(self.batch)).repeat_interleave(self.batch.mask.shape[1])
            self._dev[device] = (mask.to(device), rows[mask].to(device))
        return self._dev[device]

    def _sum(self, rows: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self.batch), dtype=v.dtype, device=v.device).index_add_(0, rows, v)

    def _real(self, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
        logits, sel = R.router_selection(out, self.task.top_k)
        flat, _ = self._where(logits.device)
        if logits.shape[0] != flat.shape[0]:
            raise SftscopeError(f"a router returned {logits.shape[0]} rows for a batch of "
                                f"{flat.shape[0]} positions; this MoE layout is not supported")
        return R.router_probs(logits[flat]), sel[flat]

    def _partner(self, label: str, i: int, x: torch.Tensor) -> nn.Module:
        key = (label, i)
        if key not in self._moved:
            r = self.task.partners[label][self.task.blocks[i]]
            self._moved[key] = r.to(x.device)
        return self._moved[key]

    def __call__(self, i: int, x: torch.Tensor, out: Any) -> None:
        p, sel = self._real(out)
        _, rows = self._where(p.device)
        self._cur["count"][i] = R.slot_counts(sel, self.task.n_experts, rows, len(self.batch))
        if self.task.mode == "record":
            self._keep[i] = (p, sel)
        elif self.task.mode == "compare":
            assert self._base is not None
            bp, bs = self._base[0][i].to(p.device), self._base[1][i].to(p.device)
            self._cur["js"][i] = self._sum(rows, R.js_divergence(bp, p))
            self._cur["overlap"][i] = self._sum(rows, R.topk_overlap(bs, sel))
        else:
            for label in self.task.partners:
                q, qsel = self._real(self._partner(label, i, x)(x))
                self._cur[f"{label}.count"][i] = R.slot_counts(qsel, self.task.n_experts, rows,
                                                                len(self.batch))
                self._cur[f"{label}.js"][i] = self._sum(rows, R.js_divergence(p, q))
                self._cur[f"{label}.overlap"][i] = self._sum(rows, R.topk_overlap(sel, qsel))

    def finish(self, batch) -> None:
        """Write the batch's per-sample sums (and, in ``record``, each sample's file)."""
        index = self.row(batch.index)
        for name, per_block in self._cur.items():
            if any(v is None for v in per_block):
                raise SftscopeError("a sparse block's router did not run in the forward pass; "
                                    "this MoE layout is not supported")
            self.buf[name][:, index] = torch.stack([v.cpu() for v in per_block])  # type: ignore
        if self.task.mode == "record":
            assert self.task.store is not None
            probs = torch.stack([k[0].cpu() for k in self._keep])  # type: ignore[index]
            sel = torch.stack([k[1].cpu() for k in self._keep])  # type: ignore[index]
            lengths = batch.mask.sum(1).tolist()
            self.task.store.write(list(batch.index), list(probs.split(lengths, 1)),
                                  list(sel.to(torch.int32).split(lengths, 1)))
        self._cur, self._keep, self._base = {}, [], None

    def discard_current(self) -> None:
        self._cur, self._keep, self._base = {}, [], None

    def state(self) -> dict[str, torch.Tensor]:
        return {f"routing.{k}": v.contiguous() for k, v in self.buf.items()}

    def restore(self, t: dict[str, torch.Tensor]) -> bool:
        want = self.state()
        if any(k not in t or t[k].shape != v.shape or t[k].dtype != v.dtype
               for k, v in want.items()):
            return False
        self.buf = {k: t[f"routing.{k}"].clone() for k in self.buf}
        return True


class WithRouting:
    """The hidden-state reducer and the routing reducer driven as one by ``run_hooked``."""

    def __init__(self, states, routing: RoutingReducer) -> None:
        self.states, self.routing = states, routing

    def start(self, batch) -> None:
        self.states.start(batch)
        self.routing.start(batch)

    def __call__(self, j: int, h: torch.Tensor) -> None:
        self.states(j, h)

    def finish(self, batch) -> None:
        self.routing.finish(batch)  # before the states: a sample is done once both are
        self.states.finish(batch)
