"""Streamed capture: one forward pass per batch, each layer reduced on the device as it passes.

Kept per model: pooled vectors (masked mean and last real token) ``[L+1, N, D]`` and, for the
first ``n_token`` samples, per-sample token-level metrics (prompt entropy, sparsity, curvature)
``[L+1, n_token]``. Per-token states of the dataset are never held beyond one batch.

Token metrics (float64 eigendecompositions: the costly part) run in worker threads (torch
releases the GIL in its kernels). On CPU, each worker takes whole samples, all hidden states of
one at once and with one intra-op thread; on an accelerator, one worker takes one hidden state
of the batch at a time. Either the workers compute batch b's metrics while later batches run
forward (``overlap``; on CPU in background threads at the lowest priority, which take only the
moments the forward pass leaves its cores idle, and whatever they have not finished when it is
wanted goes to foreground workers), or the forward pass waits for them (``inline``). The
default keeps overlap where its background workers keep up on the first batches and otherwise
measures which is faster (``ScheduleProbe``). The numbers are the same either way, bit for
bit.

Results are cached as safetensors keyed by model content, exact token ids, load settings and
options. A checkpoint (``.partial``) records which samples are done, so a capture interrupted
(SIGINT/SIGTERM: ``Interrupted``) resumes exactly with any batch size; the final file is
written atomically once every sample is done.

A capture may cover a share of the samples (``indices``: one rank of a data-parallel run); its
result holds the pooled vectors of those samples only (``index`` says which) and the token
metrics of those among the first ``n_token``. ``merge_shards`` puts the shares of every rank
back in sample order: the capture one process makes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sftscope import metrics as M
from sftscope.capture.engine import HookedBatch, run_hooked
from sftscope.capture.routing import (
    RoutingReducer,
    RoutingTask,
    WithRouting,
    moe_routers,
    router_hooks,
)
from sftscope.errors import Interrupted, SftscopeError
from sftscope.io import atomic_path, stable_hash
from sftscope.load.arch import get_blocks
from sftscope.load.data import TokenizedSet
from sftscope.load.runtime import input_device
from sftscope.version import __version__

FORMAT_VERSION = 2
CPU_STACK_BYTES = 512 << 20  # CPU: most a batch's token rows at all states may take
LAG_BYTES = 256 << 20  # CPU, overlapped: most the token rows of batches waiting for their
# metrics may take beyond the last batch (the background workers may lag that far behind)


@dataclass(frozen=True)
class CaptureConfig:
    """What a capture computes (fields enter the cache key) and how it runs (those that do
    not: ``batch_size``, ``checkpoint_every``, ``overlap``)."""

    batch_size: int = 8
    n_token: int = 100
    alpha: float = 1.0
    normalisation: str = "max"
    ridge: float = 0.0
    sparsity_eps: float = 0.01
    sparsity_group: int = 1
    curvature_zero_steps: str = "skip"
    curvature_cos_clip: float = 1.0
    entropy_normalisations: tuple[str, ...] = ()
    include_padding: bool = False  # reference preset: research code counted padded positions
    routing: str = ""  # MoE routing capture: its mode and partner (``capture.routing``), as
    # text; "" = none
    checkpoint_every: float = 60.0  # seconds between checkpoints (0: after every batch)
    overlap: bool | None = None  # token metrics of batch b in a worker thread during the
    # forward pass of batch b+1; None: where that pays (``pick_schedule``)

    RUN_ONLY = ("batch_size", "checkpoint_every", "overlap")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SftscopeError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.n_token < 0:
            raise SftscopeError(f"--n-token must be >= 0, got {self.n_token}")
        if not self.checkpoint_every >= 0:
            raise SftscopeError(
                f"--checkpoint-every must be >= 0 seconds, got {self.checkpoint_every}")

    def key_fields(self) -> dict:
        d = asdict(self)
        for k in self.RUN_ONLY:
            if not (k == "batch_size" and self.include_padding):  # padding depends on batches
                d.pop(k)
        if not self.routing:  # captures without routing keep the keys they always had
            d.pop("routing")
        return d

    def metric_options(self) -> M.MetricOptions:
        return M.MetricOptions(alpha=self.alpha, normalisation=self.normalisation,
                               ridge=self.ridge, sparsity_eps=self.sparsity_eps,
                               sparsity_group=self.sparsity_group,
                               curvature_zero_steps=self.curvature_zero_steps,
                               curvature_cos_clip=self.curvature_cos_clip,
                               entropy_normalisations=tuple(self.entropy_normalisations))


@dataclass
class CaptureResult:
    """Per-layer reductions of one model over one tokenized dataset (or a share of it:
    ``index`` then names the samples of the rows, in order)."""

    pooled_mean: torch.Tensor          # [L+1, N, D] float32
    pooled_last: torch.Tensor          # [L+1, N, D] float32
    token: dict[str, torch.Tensor]     # name -> [L+1, n_token] float64 (NaN = not defined)
    n_tokens: torch.Tensor             # [N] real tokens per sample
    info: dict = field(default_factory=dict)
    index: torch.Tensor | None = None  # [N] sample indices of a share (None: all, in order)
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # MoE: per-sample routing
    # sums, sample axis 1 (``capture.routing``); its layout in ``info["routing"]``

    @property
    def n_states(self) -> int:
        return int(self.pooled_mean.shape[0])

    def pooled(self, how: str = "mean") -> torch.Tensor:
        return self.pooled_last if how == "last" else self.pooled_mean

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"pooled_mean": self.pooled_mean, "pooled_last": self.pooled_last,
               "n_tokens": self.n_tokens}
        out.update({f"token.{k}": v for k, v in self.token.items()})
        if self.index is not None:
            out["index"] = self.index
        out.update({f"routing.{k}": v for k, v in self.routing.items()})
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], info: dict) -> CaptureResult:
        token = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("token.")}
        routing = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("routing.")}
        return cls(t["pooled_mean"], t["pooled_last"], token, t["n_tokens"], info,
                   t.get("index"), routing)


def ids_digest(input_ids: list[list[int]]) -> str:
    """SHA-256 of exact token ids (lengths, then ids), independent of how they were made."""
    h = hashlib.sha256()
    h.update(torch.tensor([len(x) for x in input_ids], dtype=torch.int64).numpy().tobytes())
    for x in input_ids:
        h.update(torch.tensor(x, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"sftscope": __version__}
    for name in ("torch", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def cache_key(model_fp: dict, tok: TokenizedSet, cfg: CaptureConfig, *,
              load: dict[str, Any] | None = None, data: dict[str, Any] | None = None,
              pad_id: int | None = None) -> str:
    """Identify a capture by everything that changes its numbers.

    ``model_fp``: ``load.models.fingerprint`` (its content hash; the path does not enter).
    ``load``: how the model runs (resolved dtype, device type, attention implementation).
    ``data``: text options (max length, template, chat template, text field); the exact ids
    enter as well, and ``pad_id`` (the reference preset counts padded positions). Plus the
    options of ``cfg`` that change results, the resolved metric
    options, the file format and the versions of sftscope, torch and transformers.
    """
    model = ({"hash": model_fp["hash"]} if model_fp.get("hash")
             else {"source": model_fp.get("source"), "revision": model_fp.get("revision")})
    return stable_hash({"model": model, "ids": ids_digest(tok.input_ids),
                        "cfg": cfg.key_fields(), "metric_options": asdict(cfg.metric_options()),
                        # a new token metric must not be read from an older capture without it
                        "token_metrics": M.token_metric_names(cfg.metric_options()),
                        "load": load or {}, "data": data or {}, "pad_id": pad_id,
                        "v": FORMAT_VERSION,
                        "versions": _versions()}, 24)


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sftscope": json.dumps(meta)})


def save_capture(path: Path, result: CaptureResult) -> None:
    """Cache a finished capture at ``path`` (atomically)."""
    _save(path, result.tensors(), {k: v for k, v in result.info.items() if k != "cached"})


def shard_path(cache_path: Path, rank: int, world: int, indices: list[int]) -> Path:
    """Where rank ``rank`` of ``world`` caches its share ``indices`` of the capture cached at
    ``cache_path``: its own key (resume works per rank), next to the merged file."""
    digest = stable_hash({"rank": rank, "world": world, "first": indices[:1],
                          "indices": hashlib.sha256(torch.tensor(indices, dtype=torch.int64)
                                                    .numpy().tobytes()).hexdigest()}, 12)
    stem = cache_path.name.removesuffix(".safetensors")
    return cache_path.with_name(f"{stem}.rank{rank}of{world}-{digest}.safetensors")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("sftscope", "{}"))
        return load_file(str(path)), meta
    except Exception:  # a corrupt file is recomputed, never trusted
        return None


def load_cached(path: Path) -> CaptureResult | None:
    """A finished capture from ``path``, or None when there is none (or it is unreadable)."""
    got = _read(path)
    if got is None:
        return None
    tensors, meta = got
    try:
        return CaptureResult.from_tensors(tensors, meta)
    except KeyError:
        return None


def partial_path(cache_path: Path) -> Path:
    """Where the checkpoint of the capture cached at ``cache_path`` lives."""
    return cache_path.with_suffix(".partial.safetensors")


def _token_metrics(hs: torch.Tensor, ms: torch.Tensor, opts: M.MetricOptions
                   ) -> dict[str, torch.Tensor]:
    """Per-sample token metrics of the token rows ``hs [b, T, D]`` of one hidden state ->
    name -> CPU float64 ``[b]`` (NaN where undefined); the accelerator schedule."""
    with torch.inference_mode():
        out = M.token_metrics_batch(hs, ms, opts)
        return {k: v.detach().to("cpu", torch.float64) for k, v in out.items()}


def _sample_metrics(states: list[torch.Tensor], real: torch.Tensor, opts: M.MetricOptions
                    ) -> dict[str, torch.Tensor]:
    """Token metrics of one sample at every hidden state: ``states[j] [T, D]`` its padded rows
    at state j, ``real [T]`` its real positions -> name -> float64 ``[L+1]``; the CPU schedule.

    Every state of a sample has the same real rows, so the states stack without padding into
    one batch ``[L+1, n, D]``: a few large operations instead of many small ones, and nothing
    computed at padded positions."""
    with torch.inference_mode():
        n = int(real.sum())
        if bool(real[:n].all()):  # right padding: the real rows are the first n (a view)
            x = torch.stack([h[:n] for h in states])
        else:
            x = torch.stack([h[real] for h in states])
        return M.token_metrics_batch(x, torch.ones(x.shape[:2], dtype=torch.bool), opts)


def pick_schedule(overlap: bool | None, device: torch.device) -> str:
    """``overlap`` (workers compute batch b's token metrics during batch b+1's forward pass),
    ``inline`` (they compute them after batch b's forward pass, which waits for them) or
    ``auto`` (CPU: overlap where its background workers keep up on the first batches,
    otherwise both timed there and the faster kept, ``ScheduleProbe``).

    ``overlap=None`` (auto): overlap on an accelerator (its metrics thread only queues
    kernels), measured on CPU: which one pays there depends on how busy the cores are, which
    no core count tells. Either way the numbers are the same, bit for bit (bench/README.md has
    the measured ratios).
    """
    if overlap is not None:
        return "overlap" if overlap else "inline"
    return "overlap" if device.type != "cpu" else "auto"


class ScheduleProbe:
    """Picks the schedule of a CPU capture on its first token batches: overlap where the
    background workers keep up, otherwise the faster of the two, timed.

    ``PLAN`` first runs ``WATCH`` token batches overlapped, each batch's metrics collected one
    batch behind. Where the background workers computed at least ``KEEP_SHARE`` of those
    batches' samples themselves, the forward passes' idle moments hold the metrics and
    overlap is kept at once (``kept_by = "share"``): no batch runs inline, which is what the
    probe otherwise costs on an idle machine (bench/README.md). Otherwise the plan goes on: a
    token batch inline, the next one starting the overlap (its metrics left pending) and the
    one after overlapped (its forward pass while the previous batch's metrics run, then
    waiting for them), twice: each timed step runs one forward pass and one batch's metrics.
    An inline step starts with nothing pending. The rate is seconds per token of the forward
    batch, summed over the steps of each schedule; ``choice`` is set after the plan: inline
    only where it is faster by more than ``MARGIN``. Overlap is kept within it: the probe
    times it at its least (one batch behind, where after the probe its background workers may
    fall several behind and use more of the forward passes' idle moments), a busy machine's
    noise on four steps is larger than the margin, and where the background workers get no
    cycles overlap costs about what inline costs (bench/README.md)."""

    PLAN: tuple[str | None, ...] = (None, None, "inline", None, "overlap", "inline", None,
                                    "overlap")
    WATCH = 2  # the first steps, overlapped and untimed, whose background share is looked at
    KEEP_SHARE = 0.5
    MARGIN = 0.10

    def __init__(self) -> None:
        self.k = 0
        self.seconds = {"inline": 0.0, "overlap": 0.0}
        self.tokens = {"inline": 0, "overlap": 0}
        self.choice: str | None = None
        self.kept_by: str | None = None  # "share" (the watch) or "rates" (the timed plan)
        self.share: float | None = None  # the background share seen after the watch
        self._timing: tuple[str, float, int] | None = None

    def mode(self) -> str:
        """The schedule the current token batch runs."""
        return self.choice or self.PLAN[self.k] or "overlap"

    def start(self, tokens: int) -> None:
        """A token batch starts (its forward pass follows)."""
        step = self.PLAN[self.k] if self.choice is None else None
        self._timing = None if step is None else (step, time.perf_counter(), tokens)

    def finish(self, share: float | None = None) -> None:
        """That batch's step is over: count it; decide after the watch from ``share`` (the
        background workers' share of the overlapped samples collected so far; None: none
        collected) or after the last step from the rates."""
        if self.choice is not None:
            return
        if self._timing is not None:
            step, t0, tokens = self._timing
            self.seconds[step] += time.perf_counter() - t0
            self.tokens[step] += tokens
        self.k += 1
        if self.k == self.WATCH:
            self.share = share
            if share is not None and share >= self.KEEP_SHARE:
                self.choice, self.kept_by = "overlap", "share"
        elif self.k == len(self.PLAN):
            rate = self.rates()
            faster = rate["inline"] < rate["overlap"] * (1.0 - self.MARGIN)
            self.choice = "inline" if faster else "overlap"
            self.kept_by = "rates"

    def rates(self) -> dict[str, float]:
        """Seconds per token of each schedule's timed steps (NaN before any)."""
        return {k: self.seconds[k] / self.tokens[k] if self.tokens[k] else math.nan
                for k in self.seconds}

    def info(self) -> dict[str, Any]:
        """What run.json records: the choice (None: too few token batches to decide), what
        made it (the watch's background share or the rates) and both (rates in microseconds
        per token)."""
        return {"choice": self.choice, "steps": self.k, "kept_by": self.kept_by,
                "watch_share": None if self.share is None else round(self.share, 3),
                "us_per_token": {k: round(v * 1e6, 3) for k, v in self.rates().items()}}


def sample_pool(workers: int, background: bool = False) -> ThreadPoolExecutor:
    """The CPU schedule's workers: ``workers`` threads, each computing whole samples with one
    intra-op thread (so a sample's numbers never depend on how many workers there are).
    ``background``: threads at the lowest priority (nice 19, Linux; elsewhere as they are),
    which yield to the forward pass's threads: the overlapped schedule's, so its metrics take
    the forward pass's idle moments rather than its cores. (Nice 19, not ``SCHED_IDLE``: a
    busy machine still gives them a little time, so a task it started ends soon.)"""
    return ThreadPoolExecutor(max(1, workers), thread_name_prefix="sftscope-metrics",
                              initializer=_pin_threads, initargs=(1, background))


def _pin_threads(threads: int, background: bool = False) -> None:
    torch.set_num_threads(threads)
    torch.get_num_threads()  # torch's per-thread set-up runs lazily on the first parallel op
    # and copies the process-wide count then: force it now, while that count is ``threads``
    if background and sys.platform.startswith("linux"):  # there a thread id names the thread
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class _Job:
    """One task of the CPU schedule (a sample's token metrics). With ``rescue``, it is queued
    to the background workers (idle priority) and taken over by the foreground ones
    (``rescue``) once its result is wanted before they have finished it: a queued task moves,
    a running one runs again (the same code with one intra-op thread: the same numbers, bit for
    bit, whichever run ends first). So a busy machine, which leaves the background workers no
    cycles, costs what the inline schedule costs, not a wait on them."""

    def __init__(self, pool: ThreadPoolExecutor, size: int, fn: Callable[..., Any], *args: Any,
                 rescue: ThreadPoolExecutor | None = None) -> None:
        self.size = size  # its cost rank: hurried longest first
        self._call = (fn, args)
        self._rescue = rescue
        self._runs = [pool.submit(fn, *args)]
        self._background = self._runs[0] if rescue is not None else None
        self.in_background: bool | None = None  # with rescue, once read: which run it took

    def hurry(self) -> None:
        """Its result is wanted now: the foreground workers take it unless it is done."""
        if self._rescue is None or self._runs[0].done():
            return
        if self._runs[0].cancel():  # still queued: only the foreground run is left
            self._runs = []
        fn, args = self._call
        self._runs.append(self._rescue.submit(fn, *args))
        self._rescue = None

    def done(self) -> bool:
        return any(run.done() for run in self._runs)

    def result(self) -> Any:
        """The first finished run's result (hurried first)."""
        self.hurry()
        done, _ = wait(self._runs, return_when=FIRST_COMPLETED)
        first = next(iter(done))
        out = first.result()
        if self._background is not None:
            self.in_background = first is self._background
        for run in self._runs:  # a run still queued is not needed any more
            run.cancel()
        return out


def hurry(jobs: list[_Job]) -> None:
    """Hand every unfinished job of ``jobs`` to the foreground workers, longest first."""
    for job in sorted(jobs, key=lambda j: -j.size):
        job.hurry()


def metrics_thread() -> ThreadPoolExecutor:
    """The worker thread of the overlapped schedule, with the main thread's intra-op thread
    count (reductions round differently with another count)."""
    main = torch.get_num_threads()
    ready = threading.Barrier(2)
    pool = ThreadPoolExecutor(1, thread_name_prefix="sftscope-metrics",
                              initializer=_pin_threads, initargs=(main,))
    pool.submit(ready.wait)
    ready.wait()
    torch.set_num_threads(main)
    return pool


class _Reducer:
    """Receives hidden states from the hooks and reduces them on their device.

    Pooled vectors are written when a batch's forward pass ends; its token metrics when they
    are ready (inline: before the next batch; overlapped: at most one batch behind, on CPU as
    far behind as ``LAG_BYTES`` allows). On CPU, worker threads compute them sample by sample
    over every hidden state at once (``_sample_metrics``) once the batch's forward pass has
    ended; on an accelerator, hidden state by hidden state (``_token_metrics``), in one worker
    thread (overlap) or in the main thread. ``done[r]`` is set once everything of the sample
    of row ``r`` is written: the checkpoint records it. Rows are the samples ``samples`` in
    order (all ``n`` when None); token metrics keep the global width ``n_token``."""

    def __init__(self, n_states: int, n: int, dim: int, n_token: int,
                 opts: M.MetricOptions, include_padding: bool = False,
                 schedule: str = "inline", samples: list[int] | None = None,
                 device_type: str = "cpu") -> None:
        self.rows = None if samples is None else {s: r for r, s in enumerate(samples)}
        n_rows = n if samples is None else len(samples)
        self.pooled_mean = torch.zeros(n_states, n_rows, dim, dtype=torch.float32)
        self.pooled_last = torch.zeros(n_states, n_rows, dim, dtype=torch.float32)
        self.token = {k: torch.full((n_states, n_token), float("nan"), dtype=torch.float64)
                      for k in M.token_metric_names(opts)}
        self.done = torch.zeros(n_rows, dtype=torch.bool)
        # per layer: samples sharing one sparsity threshold (reference: groups of 10), fed in
        # the main thread; a group's values are written when its last member has passed
        self._groups: dict[int, M.SparsityGroups] = {}
        self.dtype: torch.dtype | None = None  # the precision the states are computed in
        self.n_token = n_token
        self.opts = opts
        self.include_padding = include_padding
        self.per_sample = device_type == "cpu"
        if schedule == "auto" and not self.per_sample:
            schedule = "overlap"
        self.probe = ScheduleProbe() if schedule == "auto" and n_token > 0 else None
        self._schedule = "inline" if schedule == "auto" and n_token == 0 else schedule
        self.n_states = n_states
        self.pool: ThreadPoolExecutor | None = None
        self.background: ThreadPoolExecutor | None = None  # CPU, overlapped: idle priority
        self.workers = torch.get_num_threads()
        if n_token > 0 and self.per_sample:
            self.pool = sample_pool(self.workers)
            if schedule in ("overlap", "auto"):
                self.background = sample_pool(self.workers, background=True)
        elif n_token > 0 and schedule == "overlap":
            self.pool = metrics_thread()
        self._current: dict[int, tuple] = {}
        self.background_jobs = {True: 0, False: 0}  # overlapped CPU jobs by who ran them
        self._pending: list[tuple[list[int], list[int], Any, int]] = []

    @property
    def schedule(self) -> str:
        """The schedule the current batch runs (the probe's choice once it has made it)."""
        return self._schedule if self.probe is None else self.probe.mode()

    def schedule_info(self) -> dict[str, Any]:
        """What run.json records of the schedule: the one kept, how it was chosen, and the
        share of the overlapped samples' metrics the background workers computed (the rest
        the foreground workers took over while the forward pass waited)."""
        out: dict[str, Any] = ({"token_metrics": self._schedule} if self.probe is None else
                               {"token_metrics": self.probe.choice or "auto",
                                "schedule_probe": self.probe.info()})
        share = self.background_share()
        if share is not None:  # how much of the overlapped work the background workers did
            out["background_share"] = round(share, 3)
        return out

    def background_share(self) -> float | None:
        """The share of the overlapped samples collected so far whose metrics the background
        workers computed themselves (None: none collected)."""
        total = sum(self.background_jobs.values())
        return self.background_jobs[True] / total if total else None

    def row(self, index: list[int]) -> torch.Tensor:
        """Buffer rows of the samples ``index``."""
        if self.rows is None:
            return torch.tensor(index, dtype=torch.long)
        return torch.tensor([self.rows[i] for i in index], dtype=torch.long)

    def held(self) -> list[int]:
        """Samples whose sparsity group is only partly seen (their sparsity is not written)."""
        return sorted({i for g in self._groups.values() for i in g.held()})

    def start(self, batch: HookedBatch) -> None:
        self.batch = batch
        self.tok_rows = [r for r, s in enumerate(batch.index) if s < self.n_token]
        self._rows: dict[torch.device, torch.Tensor] = {}
        self._tok_mask: torch.Tensor | None = None
        self._whole: bool | None = None  # CPU: whether all states of the batch are held
        self._current = {}
        self._held = 0  # bytes of token rows this batch hands to the metrics
        if self.probe is not None and self.tok_rows:
            if self.probe.mode() == "inline":  # an inline step starts with nothing pending
                self.drain()
            self.probe.start(int(batch.attention_mask.sum()))

    def _holds_whole_batch(self, hs: torch.Tensor) -> bool:
        """CPU: whether a batch's token rows at every hidden state (and each worker's float64
        stack of one sample) fit in ``CPU_STACK_BYTES``; otherwise each state's rows go to the
        workers as soon as it passes (a large model on a CPU holds one state at a time)."""
        rows = self.n_states * hs.numel() * hs.element_size()
        stack = self.n_states * hs.shape[1] * hs.shape[2] * 8 * self.workers
        return max(rows, stack) <= CPU_STACK_BYTES

    def _submit(self, states: list[torch.Tensor], ms: torch.Tensor) -> list[_Job]:
        """One job per token row: its metrics at the hidden states ``states`` (``[b, T, D]``
        each, in order). Overlapped, the jobs go to the background workers first (``_Job``).
        The longest rows are submitted first (their cost grows as the cube of their length),
        so no long one is left for one worker at the end while the others idle; the jobs stay
        in row order."""
        assert self.pool is not None
        background = self.schedule == "overlap" and self.background is not None
        jobs: dict[int, _Job] = {}
        lengths = ms.sum(1).tolist()
        for r in sorted(range(ms.shape[0]), key=lambda r: -lengths[r]):
            rows = [h[r] for h in states]
            jobs[r] = (_Job(self.background, lengths[r], _sample_metrics, rows, ms[r], self.opts,
                            rescue=self.pool) if background and self.background is not None
                       else _Job(self.pool, lengths[r], _sample_metrics, rows, ms[r], self.opts))
        return [jobs[r] for r in range(ms.shape[0])]

    def __call__(self, j: int, h: torch.Tensor) -> None:
        self.dtype = h.dtype
        mean, last = self.batch.pool(h)
        tok: Any = None
        grouped: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.tok_rows:
            if h.device not in self._rows:
                self._rows[h.device] = torch.tensor(self.tok_rows, device=h.device)
            rows = self._rows[h.device]
            hs = h.index_select(0, rows)  # a copy: the model may reuse h
            self._held += hs.numel() * hs.element_size()
            ms = self.batch.mask_on(h.device).index_select(0, rows)
            if self.include_padding:
                ms = torch.ones_like(ms)
            if self.per_sample:
                self._tok_mask = ms
                if self._whole is None:
                    self._whole = self._holds_whole_batch(hs)
                if self._whole:
                    tok = hs  # handed to the workers sample by sample when the batch ends
                else:
                    tok = self._submit([hs], ms)
                    if self.schedule == "inline":
                        for job in tok:
                            job.result()
            elif self.pool is not None:
                tok = self.pool.submit(_token_metrics, hs, ms, self.opts)
            else:
                tok = _token_metrics(hs, ms, self.opts)
            if self.opts.sparsity_group > 1:
                grp = self._groups.setdefault(j, M.SparsityGroups(self.opts, self.n_token))
                index = torch.tensor([self.batch.index[r] for r in self.tok_rows])
                grouped = grp.add(index, hs, ms)
        self._current[j] = (mean, last, tok, grouped)

    def finish(self, batch: HookedBatch) -> None:
        """Move this batch's pooled vectors to the CPU buffers; its token metrics follow."""
        index = self.row(batch.index)
        toks = {}
        for j, (mean, last, tok, grouped) in self._current.items():
            self.pooled_mean[j, index] = mean.cpu()
            self.pooled_last[j, index] = last.cpu()
            if tok is not None:
                toks[j] = (tok, grouped)
        self._current = {}
        work: Any = toks
        if self.per_sample and toks:
            assert self._tok_mask is not None
            js = sorted(toks)
            if self._whole:  # one chunk: every state of each sample
                chunks = [(js, self._submit([toks[j][0] for j in js], self._tok_mask))]
            else:  # one chunk per state, submitted as it passed
                chunks = [([j], toks[j][0]) for j in js]
            work = (chunks, {j: toks[j][1] for j in js})
        self._pending.append((batch.index, self.tok_rows, work, self._held))
        while self._pending and self._due():
            self._collect(self._pending.pop(0))
        if self.probe is not None and self.tok_rows:
            self.probe.finish(self.background_share())

    def _due(self) -> bool:
        """Whether the oldest pending batch's metrics are written now: inline at once;
        overlapped once they are ready, or once a later batch has ended while the probe
        watches or times the schedules, on an accelerator, or when the pending batches hold
        more than ``LAG_BYTES``: on CPU the background workers may use the idle moments of
        several forward passes (a wait then hands their rest to the foreground workers)."""
        if self.schedule != "overlap":
            return True
        work = self._pending[0][2]
        if isinstance(work, tuple):
            ready = all(job.done() for _, jobs in work[0] for job in jobs)
        else:
            ready = all(not isinstance(t, Future) or t.done() for t, _ in work.values())
        if ready or len(self._pending) == 1:
            return ready
        probing = self.probe is not None and self.probe.choice is None
        return (self.background is None or probing
                or sum(item[3] for item in self._pending[:-1]) > LAG_BYTES)

    def _collect(self, item: tuple[list[int], list[int], Any, int]) -> None:
        index, tok_rows, work, _ = item
        if tok_rows:
            tok_idx = torch.tensor([index[r] for r in tok_rows])
            # grouped sparsity (one threshold per group) is written when its group completes
            skip = "sparsity" if self.opts.sparsity_group > 1 else None
            grouped_by_layer: dict[int, Any]
            if isinstance(work, tuple):  # CPU: per chunk of states, one result per sample
                chunks, grouped_by_layer = work
                hurry([job for _, jobs in chunks for job in jobs])
                for js, jobs in chunks:
                    layers = torch.tensor(js)
                    for col, job in zip(tok_idx.tolist(), jobs, strict=True):
                        vals = job.result()
                        if job.in_background is not None:
                            self.background_jobs[job.in_background] += 1
                        for name, val in vals.items():
                            if name != skip:
                                self.token[name][layers, col] = val.to(torch.float64)
            else:  # accelerator: one result per layer, every sample
                grouped_by_layer = {j: g for j, (_, g) in work.items()}
                for j, (tok, _) in work.items():
                    vals = tok.result() if isinstance(tok, Future) else tok
                    for name, val in vals.items():
                        if name != skip:
                            self.token[name][j, tok_idx] = val
            for j, grouped in grouped_by_layer.items():
                if grouped is not None:
                    idx, v = grouped
                    self.token["sparsity"][j, idx] = v.to(torch.float64)
        self.done[self.row(index)] = True

    def drain(self) -> None:
        """Wait for every finished batch's token metrics and write them."""
        while self._pending:
            self._collect(self._pending.pop(0))

    def discard_current(self) -> None:
        """Forget a batch whose forward pass did not finish (interrupted)."""
        self._current = {}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.background is not None:  # what it still runs is done by the foreground too:
            # no wait on idle-priority threads a busy machine may leave no cycles
            self.background.shutdown(wait=False, cancel_futures=True)
        self.pool = self.background = None

    def state(self, n_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The checkpoint: buffers and the done mask; samples of a half-seen sparsity group
        count as not done (they are run again on resume)."""
        res = CaptureResult(self.pooled_mean, self.pooled_last, self.token, n_tokens)
        done = self.done.clone()
        held = self.held()
        if held:
            done[self.row(held)] = False
        return {**res.tensors(), "done": done.contiguous()}

    def restore(self, t: dict[str, torch.Tensor]) -> bool:
        """Take over a checkpoint's buffers if they fit this capture; False otherwise."""
        want = {"pooled_mean": self.pooled_mean, "pooled_last": self.pooled_last,
                "done": self.done, **{f"token.{k}": v for k, v in self.token.items()}}
        if any(k not in t or t[k].shape != v.shape or t[k].dtype != v.dtype
               for k, v in want.items()):
            return False
        self.pooled_mean, self.pooled_last = t["pooled_mean"], t["pooled_last"]
        self.token = {k: t[f"token.{k}"] for k in self.token}
        self.done = t["done"].clone()
        return True


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does) while capturing: both checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(_sig, _frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def shard_unit(cfg: CaptureConfig) -> int:
    """Shares of a data-parallel capture are cut at multiples of this: whole batches (each
    sample then runs in the batch it runs in alone: the same padding, the same numbers) and
    whole sparsity groups (a group shares one threshold)."""
    return math.lcm(cfg.batch_size, max(1, cfg.sparsity_group))


def _check_share(indices: list[int], n: int, cfg: CaptureConfig) -> None:
    if any(not 0 <= i < n for i in indices) or len(set(indices)) != len(indices):
        raise SftscopeError(f"capture share: indices must be distinct samples of 0..{n - 1}")
    if cfg.sparsity_group > 1:
        n_token = min(cfg.n_token, n)
        mine = {i for i in indices if i < n_token}
        for g in {i // cfg.sparsity_group for i in mine}:
            members = set(range(g * cfg.sparsity_group, min((g + 1) * cfg.sparsity_group,
                                                            n_token)))
            if not members <= mine:
                raise SftscopeError(f"capture share: sparsity group {g} is split between "
                                    f"shares; cut shares at multiples of {shard_unit(cfg)}")


def _resume(red: _Reducer, rr: RoutingReducer | None, partial: Path | None,
            samples: list[int], cfg: CaptureConfig) -> tuple[list[int], int]:
    """The samples still to run after restoring a checkpoint (if one of this capture is
    there; its routing sums too), and how many it held."""
    resumed = 0
    got = _read(partial) if partial is not None else None
    if (got is not None and got[1].get("n") == len(samples)
            and (rr is None or rr.restore(got[0])) and red.restore(got[0])):
        resumed = int(red.done.sum())
    todo = [i for r, i in enumerate(samples) if not bool(red.done[r])]
    if cfg.include_padding and todo:
        # padded positions count (reference preset): a sample's numbers depend on its batch,
        # so a resume runs whole batches of the original chunking again (batch_size is in
        # the key then; a share starts at a whole batch)
        first = (todo[0] // cfg.batch_size) * cfg.batch_size
        todo = [i for i in samples if i >= first]
    return todo, resumed


def _result(red: _Reducer, rr: RoutingReducer | None, routing: RoutingTask | None,
            n_tokens: torch.Tensor, index: torch.Tensor | None, label: str,
            info: dict[str, Any]) -> CaptureResult:
    """The finished capture of ``red`` (and the routing sums of ``rr``); every sample must be
    done (a capture with a sample missing is never cached)."""
    if not bool(red.done.all()):
        raise AssertionError(f"capture {label}: {int((~red.done).sum())} samples not done")
    result = CaptureResult(red.pooled_mean, red.pooled_last, red.token, n_tokens,
                           {**info, **red.schedule_info(),
                            "compute_dtype": str(red.dtype).removeprefix("torch.")
                            if red.dtype is not None else None, "cached": False}, index)
    if rr is not None and routing is not None:
        result.routing = rr.buf
        result.info["routing"] = routing.info()
    return result


def _run(model, tok: TokenizedSet, cfg: CaptureConfig, pad_id: int, red: _Reducer,
         rr: RoutingReducer | None, todo: list[int], label: str,
         after_batch: Callable[[HookedBatch], None], checkpoint: Callable[[], None],
         partial: Path | None) -> None:
    """The hooked forward passes over ``todo`` (routers hooked too with ``rr``): on SIGINT/
    SIGTERM the done samples are checkpointed and ``Interrupted`` raised; on NaN/Inf the
    checkpoint is removed."""
    try:
        hooks = (contextlib.nullcontext() if rr is None
                 else router_hooks(moe_routers(model), rr))
        with _sigterm_interrupts(), hooks:
            try:
                run_hooked(model, tok, cfg.batch_size, pad_id,
                           red if rr is None else WithRouting(red, rr), indices=todo,
                           description=f"capture {label}", label=label,
                           after_batch=after_batch)
                red.drain()
            except KeyboardInterrupt:
                red.discard_current()
                if rr is not None:
                    rr.discard_current()
                checkpoint()
                raise Interrupted() from None
            except SftscopeError:  # NaN/Inf: nothing of this capture is kept
                if partial is not None:
                    with contextlib.suppress(FileNotFoundError):
                        partial.unlink()
                raise
    finally:
        red.close()


def capture(model, tok: TokenizedSet, cfg: CaptureConfig, pad_id: int,
            cache_path: Path | None = None, label: str = "model",
            indices: list[int] | None = None, routing: RoutingTask | None = None
            ) -> CaptureResult:
    """Run ``model`` over ``tok`` once, reducing every hidden state as it passes.

    With ``cache_path``: return the cached result if present; otherwise checkpoint the done
    samples next to it (``.partial``) every ``cfg.checkpoint_every`` seconds and on SIGINT/
    SIGTERM (then raise ``Interrupted``), and resume from it. A NaN/Inf at a real position
    raises ``SftscopeError`` naming the layer; nothing is cached then.

    ``indices``: capture only these samples (a share of a data-parallel run, cut with
    ``shard_unit``); the result's rows are those samples in the order given (``index``).
    ``routing``: also reduce an MoE model's routers (``capture.routing``; its description
    must be in ``cfg.routing``, which enters the key).
    """
    if cfg.batch_size < 1:
        raise SftscopeError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cache_path is not None and (hit := load_cached(cache_path)) is not None:
        hit.info["cached"] = True
        return hit
    n, n_token = len(tok), min(cfg.n_token, len(tok))
    samples = list(range(n)) if indices is None else [int(i) for i in indices]
    if indices is not None:
        _check_share(samples, n, cfg)
    if not samples:
        raise SftscopeError("no samples to capture")
    n_blocks = len(get_blocks(model))
    dim = int(model.get_input_embeddings().weight.shape[1])
    n_tokens = torch.tensor([len(tok.input_ids[i]) for i in samples], dtype=torch.long)
    device = input_device(model)
    red = _Reducer(n_blocks + 1, n, dim, n_token, cfg.metric_options(), cfg.include_padding,
                   schedule=pick_schedule(cfg.overlap, device),
                   samples=None if indices is None else samples, device_type=device.type)
    rr = None if routing is None else RoutingReducer(
        routing, n, samples=None if indices is None else samples)
    index = None if indices is None else torch.tensor(samples, dtype=torch.long)
    partial = partial_path(cache_path) if cache_path is not None else None
    todo, resumed = _resume(red, rr, partial, samples, cfg)
    t0 = last_ckpt = time.perf_counter()

    def checkpoint() -> None:
        if partial is not None:
            red.drain()
            _save(partial, {**red.state(n_tokens), **(rr.state() if rr else {})},
                  {"n": len(samples), "v": FORMAT_VERSION, "done": int(red.done.sum())})

    def after_batch(_batch: HookedBatch) -> None:
        nonlocal last_ckpt
        if partial is not None and time.perf_counter() - last_ckpt >= cfg.checkpoint_every:
            checkpoint()
            last_ckpt = time.perf_counter()

    _run(model, tok, cfg, pad_id, red, rr, todo, label, after_batch, checkpoint, partial)
    result = _result(red, rr, routing, n_tokens, index, label,
                     {"seconds": time.perf_counter() - t0, "resumed_samples": resumed,
                      "n_samples": len(samples)})
    if cache_path is not None:
        save_capture(cache_path, result)
        if partial is not None:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return result


def merge_shards(parts: list[CaptureResult | None], n: int) -> CaptureResult:
    """The captures of every rank's share (None: a rank that had no sample) put back in
    sample order: what one process capturing all ``n`` samples returns. Pooled rows and token
    counts go to their samples; token metrics are taken from the share that holds each sample
    (copies: the numbers are unchanged)."""
    got = [p for p in parts if p is not None]
    if not got:
        raise SftscopeError("no samples were captured by any process")
    first = got[0]
    n_states, dim = first.pooled_mean.shape[0], first.pooled_mean.shape[2]
    mean = torch.zeros(n_states, n, dim, dtype=torch.float32)
    last = torch.zeros(n_states, n, dim, dtype=torch.float32)
    n_tokens = torch.zeros(n, dtype=torch.long)
    token = {k: torch.full_like(v, float("nan")) for k, v in first.token.items()}
    seen = torch.zeros(n, dtype=torch.bool)
    routing: dict[str, torch.Tensor] = {}
    for p in got:
        idx = p.index if p.index is not None else torch.arange(p.pooled_mean.shape[1])
        if bool(seen[idx].any()):
            raise SftscopeError("capture shares overlap: a sample was captured twice")
        seen[idx] = True
        mean[:, idx] = p.pooled_mean
        last[:, idx] = p.pooled_last
        n_tokens[idx] = p.n_tokens
        cols = idx[idx < token[next(iter(token))].shape[1]] if token else idx[:0]
        for k in token:
            token[k][:, cols] = p.token[k][:, cols]
        for k, v in p.routing.items():
            if k not in routing:
                routing[k] = torch.zeros((v.shape[0], n, *v.shape[2:]), dtype=v.dtype)
            routing[k][:, idx] = v
    if not bool(seen.all()):
        raise SftscopeError(f"capture shares miss {int((~seen).sum())} of {n} samples")
    info = {"seconds": max(float(p.info.get("seconds", 0.0)) for p in got),
            "resumed_samples": sum(int(p.info.get("resumed_samples", 0)) for p in got),
            "n_samples": n, "token_metrics": first.info.get("token_metrics"),
            "compute_dtype": first.info.get("compute_dtype"), "cached": False,
            "ranks": [None if p is None else {
                "samples": int(p.pooled_mean.shape[1]),
                "seconds": float(p.info.get("seconds", 0.0)),
                "cached": bool(p.info.get("cached", False)),
                "resumed_samples": int(p.info.get("resumed_samples", 0))} for p in parts]}
    if "routing" in first.info:
        info["routing"] = first.info["routing"]
    return CaptureResult(mean, last, token, n_tokens, info, routing=routing)
