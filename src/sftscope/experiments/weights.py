"""Weight change between a Base and an SFT checkpoint, or of a LoRA adapter (METRICS.md).

Both checkpoints are read tensor by tensor (sharded checkpoints through
``model.safetensors.index.json``): a pair stored alike whose change is only norms and counts is
streamed from the files chunk by chunk (``Checkpoint.reader``), every other pair is read with
``safetensors.safe_open`` (one pair in memory at a time); nothing loads a whole model, so peak
memory stays at a few tensors whatever the model's size. Sums of squares are float64 sums;
bfloat16 and float16 pairs are squared and summed in float32 runs of 256 first (exact squares,
at most 1.5e-5 and typically 1e-8 relative; ``_Norms`` says why). Tensor names map to
``(block, module)`` through the architecture map of the config's ``model_type``
(``sftscope.load.arch``).

Table (tidy, long): ``block`` (0-based; empty for embeddings, final norm, LM head, totals),
``module``, ``metric``, ``value`` (and, for mixture-of-experts checkpoints, ``expert``: the
routed expert's index on ``expert`` rows, empty elsewhere).

Modules: ``q k v o`` (fused qkv split where the layout is known, else one ``qkv``; DeepSeek's
latent attention ``q_a q_b kv_a kv_b``), MLP projections by role (``gate up down fc_in fc_out
gate_up``), the mixture-of-experts parts of a sparse block (``router``: the gate scoring the
experts; ``experts``: all routed experts' parameters as one vector; ``expert``: one row per
routed expert, its gate/up/down parameters as one vector; ``shared_expert``: the shared
expert's projections *and* its gate, Qwen2-MoE's ``shared_expert_gate``), ``other``
(everything else inside the block: norms, unmapped tensors), the aggregates ``attn``
(attention projections), ``mlp`` (all MLP parameters: the dense projections, or router +
routed experts + shared expert) and ``total`` (every tensor of the block); outside the blocks
``embed``, ``embed_added``, ``pos_embed``, ``final_norm``, ``lm_head``, ``lm_head_added``,
``other`` and the whole-model ``total``. Experts are read from either layout, one tensor per
expert (``save_pretrained``, the hub) or fused ``[E, ...]`` tensors sliced per expert; the
base and SFT must use the same one.

Metrics: ``frobenius`` = ``sqrt(sum ||W_sft - W_base||_F^2)`` over the module's tensors and
``relative`` = that divided by ``sqrt(sum ||W_base||_F^2)``. **Biases are part of their module**:
a module's change is the Frobenius norm of all its parameters (weight and bias) as one vector,
so ``attn`` over q/k/v/o is exactly the change of the attention projections' parameters. Added
vocabulary rows (SFT embedding/head larger than the base's) are compared on the shared rows;
the added rows' norm is ``embed_added`` / ``lm_head_added`` (``frobenius``, and ``rows``, the
number of added rows); they count in the whole-model total but not in ``embed``/``lm_head``.
Tied embeddings are counted once, under ``embed`` (no ``lm_head`` row).

Update sparsity: ``unchanged_frac`` = the share of the module's entries (weights and biases)
that are bit-identical in the two checkpoints, compared in their stored dtype (the coarser one
when the two store different dtypes; ``-0.0`` and ``0.0`` differ, as on disk); shared vocabulary
rows only; aggregates pool their modules' entries. Measured for checkpoint pairs (and chains),
not for adapters (a LoRA product changes every entry of its module).

Low-rank metrics (per module with a 2-D weight; the spectrum of the weight's change, without the
bias): ``sv1..svK`` (largest singular values), ``energy_rank90`` (smallest ``r`` whose top-``r``
singular values hold 90 % of ``||dW||_F^2``), ``effective_rank`` (Roy-Vetterli on ``sigma``),
``stable_rank`` (``||dW||_F^2 / sigma_1^2``) and ``residual_energy`` (fraction of
``||dW||_F^2`` outside the computed singular values). The ``method`` column says how each
row's singular values were found. ``exact``: a full SVD for matrices whose smaller side is at
most ``exact_max`` (``residual_energy = 0``), and always for LoRA adapters (the exact spectrum
of ``s B A`` from the SVD of the ``r x r`` core of the QR factors of ``B`` and ``Aᵀ``).
``randomized``: larger dense changes get a randomized SVD of rank ``max_rank`` (subspace
iteration as in ``torch.svd_lowrank``, 2 power iterations, seeded): then ``energy_rank90`` is
NaN when more than ``max_rank`` directions are needed and ``effective_rank`` is a lower bound
(that of the best rank-``max_rank`` approximation; the truncated distribution majorizes the
full one). Singular values at or below ``sigma_1 * max(rows, cols) * eps(stored dtype)`` count
as 0, the rule of the activations' numerical rank (``metrics.lowrank``): the rounding noise of
a merged checkpoint is not a direction, so a merged LoRA folder and its adapter give the same
spectrum (not applied where ``max(rows, cols) * eps >= 1``: bf16/fp16 matrices wider than
128/1024, whose rounding cannot be told from a change). SVDs run on worker threads while the
streaming goes on.

Checkpoint reading lives in ``load.checkpoint``, adapter reading in ``load.adapters`` and the
spectrum numerics in ``metrics.lowrank``; this module streams, accumulates and tabulates.

Speed: every torch op runs single-threaded (OpenMP barriers stall whenever cores are shared);
the cores are used by worker threads instead (streamed pairs as a queue of tasks of a few
chunks, each read and computed by one worker, the next pairs' tasks queued behind the current
one's so that no worker idles at a tensor's end; SVD jobs), and the kernel is asked
(``posix_fadvise``) to read the next tensors while the current pair is computed.

A LoRA adapter's change is ``||s B A||_F`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA; per-module ``rank_pattern``/``alpha_pattern``), from ``||BA||^2 = tr((B^T B)(A A^T))``,
never forming ``BA``.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sftscope.chains import BASE, FIRST, ChainPair, Stage, chain_pairs, chain_record
from sftscope.config.commands import WeightsConfig
from sftscope.errors import SftscopeError
from sftscope.io import Timer
from sftscope.load.adapters import LoraAdapter, LoraModule, adapter_folder, read_lora
from sftscope.load.arch import (
    MLP_ROLES,
    ArchSpec,
    moe_tensor,
    n_layers,
    spec_for_paths,
    split_fused_qkv,
)
from sftscope.load.checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    Slot,
    canonical_name,
    classify,
    fused_split_ok,
    resolve_source,
)
from sftscope.load.runtime import resolve_device, torch_threads
from sftscope.metrics.lowrank import (
    dense_svdvals,
    drop_noise,
    dtype_eps,
    lora_svdvals,
    spectrum_metrics,
)
from sftscope.progress import plan, stage, staged, track

COLUMNS = ["block", "module", "metric", "value", "method"]
_ATTN = ("q", "k", "v", "qkv", "q_a", "q_b", "kv_a", "kv_b", "o")
_MOE = ("router", "experts", "shared_expert")
_BLOCK_ORDER = (*_ATTN, "attn", *MLP_ROLES, *_MOE, "mlp", "other", "total")
# Parameters of several matrices under one key: no single spectrum.
_NO_SPECTRUM = ("other", "experts", "shared_expert")
_TOP_ORDER = ("embed", "embed_added", "pos_embed", "final_norm", "lm_head", "lm_head_added",
              "other", "total")
_VOCAB_MODULES = ("embed", "lm_head")
_CHUNK = 1 << 18  # entries per chunk: each worker's buffers stay in cache
_TASK = 4  # chunks per task of a streamed pair (``_Norms.submit_stored``)
_AHEAD = 3  # tasks per worker queued ahead of the one being computed (``_Streamed``)
_ROW = 256  # float32 squares are summed in runs of this many, the runs' sums in float64
_PART_ROUND = 1024  # entries: the in-memory parts of a tensor are cut at multiples of this
_TINY = 2.0**-60  # float32 chunk sums below this are summed again in float64 (underflow)
_NARROW = (torch.bfloat16, torch.float16)  # dtypes whose squares float32 holds exactly
# stored dtypes read straight from the files (``_Norms.sq_diff_stored``)
_STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64}
_PREFETCH = 64 << 20  # bytes of upcoming tensors the kernel is asked to read ahead


# --------------------------------------------------------------------------- numerics


class _Chunk(NamedTuple):
    """Entries ``i .. i + m`` of ``s`` and ``b``: as stored, as one ``[2, m]`` tensor where
    they are its rows (one conversion copies both; else None), and seen as integers (numpy
    views of the same memory, for ``_Norms._same``)."""

    s: Tensor
    b: Tensor
    both: Tensor | None
    s_bits: np.ndarray
    b_bits: np.ndarray


class _Norms:
    """Squared norms without full-size copies: chunk by chunk through small reusable buffers
    per worker (cache-resident). A large tensor is cut into contiguous parts, one per worker
    thread (torch ops release the GIL and each runs single-threaded, so no OpenMP barrier can
    stall), or, read from the files (``submit_stored``), into tasks of ``_TASK`` chunks that
    any worker takes; part sums are added exactly (``_total``), so results are deterministic
    (for a given worker count in memory, for any in the stored case). ``sq_diff`` counts the
    bit-identical entries in the same pass, while the chunk is in cache, comparing the bits as
    integers (a full-size comparison's bool tensor cost 6x the whole norm: measured 5.0 ns per
    entry against 0.7).

    Arithmetic (``_pair``): bfloat16 and float16 pairs in float32, every other dtype in
    float64. Float32 holds a bf16/fp16 value exactly, the difference of two such values exactly
    unless their exponents are more than 16 (bf16; fp16: 13) apart (then it is rounded once, to
    2^-24 relative), and the square of a value exactly (8 or 11 significant bits, squared: 16
    or 22 of float32's 24); the squares are summed in float32 over runs of ``_ROW`` entries and
    those run sums in float64. So the only rounding beyond one of 2^-24 per entry is in the
    runs' sums: at most ``(_ROW - 1) * 2^-24`` (1.5e-5) relative, about 1e-8 on real weights
    (measured; the tests bound it against float64 sums). A chunk whose float32 sums could have
    overflowed or underflowed (not finite, or below 2^-60 where not every entry is unchanged)
    is summed again in float64. Everything else (float32, float64 checkpoints) is summed in
    float64 as before: exact to about 1e-15."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self.wide = [torch.empty(2, _CHUNK, dtype=torch.float64) for _ in range(self.workers)]
        runs = -(-_CHUNK // _ROW) * _ROW
        self.narrow = [torch.empty(2, runs, dtype=torch.float32) for _ in range(self.workers)]
        self.rows = [(x, x[0], x[1], x.view(2, -1, _ROW)) for x in self.narrow]
        self.equal = [np.empty(_CHUNK, dtype=bool) for _ in range(self.workers)]
        # read buffers: one [2, _CHUNK] pair of chunks of up to 8-byte entries per worker
        self.io = [torch.empty(2 * _CHUNK * 8, dtype=torch.uint8) for _ in range(self.workers)]
        self.io_views = [memoryview(x.numpy()) for x in self.io]
        self.stored: dict[torch.dtype, tuple[list[Tensor], list[_Chunk]]] = {}
        # One pool thread per buffer set: ``_map`` names the set of each part; a streamed task
        # uses its thread's own (``_bind``).
        self.local = threading.local()
        self.ids = itertools.count()
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sftscope-norms",
                                       initializer=self._bind)

    def _bind(self) -> None:
        self.local.j = next(self.ids)

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    def _parts(self, n: int) -> list[tuple[int, int]]:
        """One contiguous part per worker, of equal size (to ``_PART_ROUND`` entries: a split
        at chunk boundaries left one worker a whole chunk more, e.g. 6 against 5)."""
        if self.workers == 1 or n < 2 * _CHUNK:
            return [(0, n)]
        per = math.ceil(n / self.workers / _PART_ROUND) * _PART_ROUND
        return [(lo, min(lo + per, n)) for lo in range(0, n, per)]

    def _map(self, fn: Any, n: int) -> list[Any]:
        parts = self._parts(n)
        futures = [self.pool.submit(fn, j, lo, hi) for j, (lo, hi) in enumerate(parts) if j]
        return [fn(0, *parts[0])] + [f.result() for f in futures]

    def _pairs(self, n: int, chunk: Any, bits: torch.dtype | None) -> tuple[float, float, int]:
        """``(||s - b||^2, ||b||^2, same)`` over ``n`` entries whose chunks ``chunk(j, i, m)``
        gives (a ``_Chunk``: entries ``i .. i + m`` of ``s`` and ``b``)."""
        return _total(self._map(lambda j, lo, hi: self._span(j, lo, hi, chunk, bits), n))

    def _span(self, j: int, lo: int, hi: int, chunk: Any,
              bits: torch.dtype | None) -> tuple[float, float, int]:
        """``_pairs`` of entries ``lo .. hi`` in worker ``j``'s buffers, chunk by chunk."""
        d2 = b2 = 0.0
        same = 0
        for i in range(lo, hi, _CHUNK):
            m = min(_CHUNK, hi - i)
            c = chunk(j, i, m)
            k = self._same(j, c.s_bits, c.b_bits, m) if bits is not None else -1
            same += max(k, 0)
            dc, bc = self._pair(j, c, m, k == m)
            d2 += dc
            b2 += bc
        return d2, b2, same

    def _pair(self, j: int, c: _Chunk, m: int, unchanged: bool) -> tuple[float, float]:
        """``(||s - b||^2, ||b||^2)`` of one chunk of ``m`` entries (the class docstring says
        how); ``unchanged``: every entry of it is bit-identical."""
        if c.s.dtype == c.b.dtype and c.s.dtype in _NARROW:
            # Views are made once for whole chunks: a view or a slice costs 2-5 us of Python,
            # the arithmetic below on a whole chunk about 130 us.
            x, x0, x1, runs = self.rows[j]
            if m < _CHUNK:
                k = -(-m // _ROW) * _ROW
                x = x[:, :k]
                x0, x1, runs = x[0], x[1], x.view(2, -1, _ROW)
            if c.both is not None:
                (x if m == x.shape[1] else x[:, :m]).copy_(c.both)
            else:
                x0[:m].copy_(c.s)
                x1[:m].copy_(c.b)
            if m < x.shape[1]:
                x[:, m:].zero_()
            x0.sub_(x1)
            x.square_()
            d2, b2 = torch.sum(runs, dim=2).sum(dim=1, dtype=torch.float64).tolist()
            if (math.isfinite(d2) and math.isfinite(b2) and b2 >= _TINY
                    and (d2 >= _TINY or unchanged)):
                return d2, b2
        xa, xb = self.wide[j][0, :m], self.wide[j][1, :m]
        xa.copy_(c.s)
        xb.copy_(c.b)
        b2 = float(torch.dot(xb, xb))
        xa.sub_(xb)
        return float(torch.dot(xa, xa)), b2

    def sq_diff(self, s: Tensor, b: Tensor,
                bits: torch.dtype | None = None) -> tuple[float, float, int]:
        """``(||s - b||^2, ||b||^2, same)``: ``same`` the entries equal in the view ``bits``
        of both (``_bit_view``; 0 without it)."""
        s, b = s.reshape(-1), b.reshape(-1)
        sv, bv = (s.view(bits).numpy(), b.view(bits).numpy()) if bits is not None else (s, b)

        def chunk(j: int, i: int, m: int) -> _Chunk:
            return _Chunk(s[i:i + m], b[i:i + m], None, sv[i:i + m], bv[i:i + m])

        return self._pairs(s.numel(), chunk, bits)

    def submit_stored(self, base: Checkpoint, b_name: str, sft: Checkpoint,
                      s_name: str) -> list[Future]:
        """``sq_diff`` of two stored tensors of the same shape and dtype, as tasks of
        ``_TASK`` chunks queued on the workers (``_total`` of their results is the pair's):
        each chunk is read straight from the files into the worker's buffer
        (``Checkpoint.reader``; no tensor-sized allocation, no mapping) and computed while it
        is in cache. Tasks of the next pairs run while a pair's last ones finish, and the
        split does not depend on the worker count."""
        info = base.tensors[b_name]
        dtype = _STORED[info.dtype]
        size = dtype.itemsize
        half = _CHUNK * size
        pairs, whole = self._stored_views(dtype)
        read_s, read_b = sft.reader(s_name), base.reader(b_name)

        def chunk(j: int, i: int, m: int) -> _Chunk:
            view = self.io_views[j]
            read_s(i * size, view[:m * size])
            read_b(i * size, view[half:half + m * size])
            if m == _CHUNK:
                return whole[j]
            p = pairs[j][:, :m]
            return _Chunk(p[0], p[1], p, p[0].view(_INTS[size]).numpy(),
                          p[1].view(_INTS[size]).numpy())

        def task(lo: int, hi: int) -> tuple[float, float, int]:
            return self._span(self.local.j, lo, hi, chunk, _INTS[size])

        n, step = math.prod(info.shape), _TASK * _CHUNK
        return [self.pool.submit(task, lo, min(lo + step, n)) for lo in range(0, n, step)]

    def _stored_views(self, dtype: torch.dtype) -> tuple[list[Tensor], list[_Chunk]]:
        """Per worker, its read buffer as a ``[2, _CHUNK]`` pair of ``dtype`` and that pair as
        a whole ``_Chunk`` (made once: a view costs microseconds)."""
        if dtype not in self.stored:
            bits = _INTS[dtype.itemsize]
            pairs = [x[:2 * _CHUNK * dtype.itemsize].view(dtype).view(2, _CHUNK)
                     for x in self.io]
            self.stored[dtype] = pairs, [_Chunk(p[0], p[1], p, p[0].view(bits).numpy(),
                                                p[1].view(bits).numpy()) for p in pairs]
        return self.stored[dtype]

    def _same(self, j: int, s: np.ndarray, b: np.ndarray, m: int) -> int:
        """Entries of the chunks ``s`` and ``b`` (``m`` entries, integer views) with equal
        bits, through worker ``j``'s bool buffer: numpy's ``equal`` and ``count_nonzero``
        (both release the GIL) took 0.10 ns a pair on a 2^18-entry chunk, against 0.16-0.22
        for torch's XOR, nonzero to bool and the bools summed as int64 words, in two calls
        instead of five."""
        return int(np.count_nonzero(np.equal(s, b, out=self.equal[j][:m])))

    def count_same(self, s: Tensor, b: Tensor, bits: torch.dtype) -> int:
        """Entries of ``s`` and ``b`` equal in their views ``bits``, chunk by chunk."""
        sv, bv = s.reshape(-1).view(bits).numpy(), b.reshape(-1).view(bits).numpy()

        def part(j: int, lo: int, hi: int) -> int:
            same = 0
            for i in range(lo, hi, _CHUNK):
                m = min(_CHUNK, hi - i)
                same += self._same(j, sv[i:i + m], bv[i:i + m], m)
            return same

        return sum(self._map(part, sv.size))

    def sq(self, x: Tensor) -> float:
        """``||x||^2`` (in float64)."""
        x = x.reshape(-1)

        def part(j: int, lo: int, hi: int) -> float:
            ba = self.wide[j][0]
            out = 0.0
            for i in range(lo, hi, _CHUNK):
                m = min(_CHUNK, hi - i)
                xa = ba[:m]
                xa.copy_(x[i:i + m])
                out += float(torch.dot(xa, xa))
            return out

        return math.fsum(self._map(part, x.numel()))


def _total(parts: Any) -> tuple[float, float, int]:
    """``(d2, b2, same)`` of a tensor from those of its parts (float sums correctly rounded:
    the same whatever order the parts finished in)."""
    parts = list(parts)
    return (math.fsum(p[0] for p in parts), math.fsum(p[1] for p in parts),
            sum(p[2] for p in parts))


def _sq64(x: Tensor) -> float:
    x = x.reshape(-1)
    return float(torch.dot(x, x))


class _Spectra:
    """Low-rank metrics off the streaming thread: a pool of workers takes each module's change
    (the torch ops run single-threaded on CPU, so ``workers`` SVDs run side by side; one worker
    for a GPU). In-flight changes are bounded in number and bytes; results are collected on the
    calling thread in submission order."""

    def __init__(self, acc: _Acc, top_k: int, device: str, exact_max: int, max_rank: int,
                 workers: int, max_bytes: int = 1 << 30) -> None:
        self.acc, self.top_k, self.device = acc, top_k, device
        self.exact_max, self.max_rank = exact_max, max_rank
        self.workers = 1 if torch.device(device).type != "cpu" else max(1, workers)
        self.max_bytes = max_bytes
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sftscope-svd")
        self.pending: deque[tuple[Future, int]] = deque()
        self.inflight = 0
        self.busy = 0.0  # seconds inside jobs (summed over workers)
        self.waited = 0.0  # seconds the streaming thread waited for them

    def _job(self, key: tuple[int | None, str], d: Tensor, energy: float, dtype: str) -> tuple:
        t0 = time.perf_counter()
        method = "exact" if min(d.shape) <= max(self.exact_max, 2 * self.max_rank) \
            else "randomized"
        try:
            sigma, method = dense_svdvals(d, self.device, self.exact_max, self.max_rank)
            sigma = drop_noise(sigma, tuple(d.shape), dtype)
            out = spectrum_metrics(sigma, energy, self.top_k, min(d.shape))
        except RuntimeError:  # non-finite weights or a solver that did not converge
            names = [f"sv{i + 1}" for i in range(min(self.top_k, min(d.shape)))]
            out = dict.fromkeys([*names, "effective_rank", "energy_rank90", "stable_rank",
                                 "residual_energy"], math.nan)
        return key, out, method, time.perf_counter() - t0

    def submit(self, key: tuple[int | None, str], d: Tensor, energy: float, dtype: str) -> None:
        """Queue the spectrum of change ``d`` (``energy = ||d||_F^2``), stored as ``dtype``."""
        nbytes = d.numel() * d.element_size()
        while self.pending and (len(self.pending) >= self.workers
                                or self.inflight + nbytes > self.max_bytes):
            self._collect_one()
        self.pending.append((self.pool.submit(self._job, key, d, energy, dtype), nbytes))
        self.inflight += nbytes

    def _collect_one(self) -> None:
        fut, nbytes = self.pending.popleft()
        t0 = time.perf_counter()
        key, metrics, method, busy = fut.result()
        self.waited += time.perf_counter() - t0
        self.acc.lowrank[key] = metrics
        self.acc.methods[key] = method
        self.busy += busy
        self.inflight -= nbytes

    def finish(self) -> None:
        while self.pending:
            self._collect_one()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- accumulation


class _Acc:
    """Per ``(block, module)``: squared change, squared base norm, low-rank metrics and how
    their singular values were found (``exact`` / ``randomized``); ``added_rows`` holds the row
    count of added vocabulary rows."""

    def __init__(self) -> None:
        self.d2: dict[tuple[int | None, str], float] = defaultdict(float)
        self.b2: dict[tuple[int | None, str], float] = defaultdict(float)
        self.lowrank: dict[tuple[int | None, str], dict[str, float]] = {}
        self.methods: dict[tuple[int | None, str], str] = {}
        self.added_rows: dict[str, int] = defaultdict(int)
        self.same: dict[tuple[int | None, str], int] = defaultdict(int)  # bit-identical entries
        self.count: dict[tuple[int | None, str], int] = defaultdict(int)  # entries compared
        self.expert_d2: dict[tuple[int, int], float] = defaultdict(float)
        self.expert_b2: dict[tuple[int, int], float] = defaultdict(float)

    def add_expert(self, block: int, expert: int, d2: float, b2: float) -> None:
        """One routed expert's share (also added to the block's ``experts`` by the caller)."""
        self.expert_d2[(block, expert)] += d2
        self.expert_b2[(block, expert)] += b2

    def add(self, key: tuple[int | None, str], d2: float, b2: float) -> None:
        if not (math.isfinite(d2) and math.isfinite(b2)):  # never a NaN row in the table
            block, module = key
            where = f"block {block}, module {module}" if block is not None else module
            side = "the base" if not math.isfinite(b2) else "the fine-tuned (or adapter)"
            raise SftscopeError(f"{where}: {side} checkpoint holds NaN or Inf weights; the "
                                f"checkpoint is broken (re-save or re-download it)")
        self.d2[key] += d2
        self.b2[key] += b2


def _table(acc: _Acc, has_base: bool) -> pd.DataFrame:
    """Module rows, then the aggregates, in a stable order (per-expert rows after
    ``experts``; the ``expert`` column only for checkpoints with experts)."""
    rows: list[tuple[int | None, str, int | None, str, float, str | None]] = []
    keys = set(acc.d2) | set(acc.b2)
    blocks = sorted({b for b, _ in keys if b is not None})

    def emit(block: int | None, module: str, d2: float, b2: float,
             expert: int | None = None,
             members: Sequence[tuple[int | None, str]] = ()) -> None:
        members = members or [(block, module)]
        rows.append((block, module, expert, "frobenius", math.sqrt(d2), None))
        if module.endswith("_added"):
            rows.append((block, module, None, "rows", float(acc.added_rows[module]), None))
        elif has_base:
            rows.append((block, module, expert, "relative",
                         math.sqrt(d2) / math.sqrt(b2) if b2 > 0 else math.nan, None))
        n = sum(acc.count.get(k, 0) for k in members)
        if n:
            rows.append((block, module, expert, "unchanged_frac",
                         sum(acc.same.get(k, 0) for k in members) / n, None))
        method = acc.methods.get((block, module))
        for metric, value in acc.lowrank.get((block, module), {}).items():
            rows.append((block, module, None, metric, value, method))

    tot_d2 = tot_b2 = 0.0
    for b in blocks:
        mods = {m for bb, m in keys if bb == b}
        groups = {"attn": _ATTN, "mlp": (*MLP_ROLES, *_MOE), "total": tuple(mods)}
        for module in _BLOCK_ORDER:
            if module in groups:
                members = [m for m in groups[module] if m in mods]
                if not members:
                    continue
                emit(b, module, sum(acc.d2[(b, m)] for m in members),
                     sum(acc.b2[(b, m)] for m in members), members=[(b, m) for m in members])
            elif module in mods:
                emit(b, module, acc.d2[(b, module)], acc.b2[(b, module)])
            if module == "experts":
                for (bb, e) in sorted(acc.expert_d2):
                    if bb == b:
                        emit(b, "expert", acc.expert_d2[(b, e)], acc.expert_b2[(b, e)], e)
        tot_d2 += sum(acc.d2[(b, m)] for m in mods)
        tot_b2 += sum(acc.b2[(b, m)] for m in mods)
    top = {m for bb, m in keys if bb is None}
    for module in _TOP_ORDER:
        if module in top:
            emit(None, module, acc.d2[(None, module)], acc.b2[(None, module)])
            tot_d2 += acc.d2[(None, module)]
            tot_b2 += acc.b2[(None, module)]
    if keys:
        emit(None, "total", tot_d2, tot_b2, members=sorted(keys, key=str))
    df = pd.DataFrame(rows, columns=["block", "module", "expert", *COLUMNS[2:]])
    df["block"] = df["block"].astype("Int64")
    df["expert"] = df["expert"].astype("Int64")
    return df if acc.expert_d2 else df.drop(columns="expert")


# --------------------------------------------------------------------------- full checkpoints


@dataclass
class _Item:
    """One base/SFT tensor pair and where its change goes."""

    slot: Slot
    base: str | None
    sft: str | None
    fused: bool = False
    vocab: bool = False
    experts_fused: bool = False  # a fused [E, ...] expert tensor, sliced per expert


def _plan(base: Checkpoint, sft: Checkpoint | None, notes: list[str]) -> list[_Item]:
    """Pair tensors by name and check shapes, before any tensor is read."""
    spec = base.spec
    if sft is not None and sft.model_type != base.model_type:
        raise SftscopeError(
            f"the checkpoints are different architectures: base is {base.model_type!r}, SFT is "
            f"{sft.model_type!r}; compare a fine-tune with its own base"
        )
    head_w = f"{spec.head}.weight"
    embed_w = f"{spec.embed}.weight"
    items: list[_Item] = []
    skipped: list[str] = []
    names = [n for n in base.tensors if n != head_w]
    if sft is not None:
        only_base = sorted(set(names) - set(sft.tensors))
        only_sft = sorted(set(sft.tensors) - set(base.tensors) - {head_w})
        for which, lst in (("base", only_base), ("SFT", only_sft)):
            lst = [n for n in lst if classify(n, spec) is not None]
            if lst:
                other = "SFT" if which == "base" else "base"
                _check_expert_layouts(lst, spec, which)
                raise SftscopeError(
                    f"{len(lst)} tensor(s) are in the {which} checkpoint but not in the {other} "
                    f"one (first: {lst[0]}); the checkpoints are different architectures"
                )
    for n in names:
        slot = classify(n, spec)
        info = base.tensors[n]
        if slot is None or info.dtype not in FLOAT_DTYPES:
            skipped.append(n)
            continue
        if slot.module == "shared_expert_gate":  # its gate is part of the shared expert
            slot = replace(slot, module="shared_expert")
        items.append(_Item(slot, n, n if sft is not None else None,
                           fused=slot.module == "qkv"
                           and fused_split_ok(spec, base.config, info.shape),
                           vocab=slot.module in _VOCAB_MODULES,
                           experts_fused=slot.module == "experts" and slot.expert is None
                           and len(info.shape) >= 2))
    # The output head: tied heads are the embedding, counted once under ``embed``.
    tied_b = base.tied
    tied_s = sft.tied if sft is not None else tied_b
    if not (tied_b and tied_s):
        src_b = embed_w if tied_b else head_w
        src_s = (embed_w if tied_s else head_w) if sft is not None else None
        if src_b not in base.tensors or (sft is not None and src_s not in sft.tensors):
            raise SftscopeError(f"no LM head ({head_w}) and no embedding ({embed_w}) found; the "
                                f"architecture map does not fit {base.model_type!r}")
        items.append(_Item(Slot(None, "lm_head", "weight"), src_b, src_s, vocab=True))
        if tied_b != tied_s:
            notes.append(f"LM head tied to the embedding in {'base' if tied_b else 'SFT'} only: "
                         f"lm_head compares the effective output matrices")
    else:
        notes.append("tied embeddings: the LM head is the input embedding, counted once under "
                     "'embed' (no lm_head row)")
    if skipped:
        notes.append(f"skipped {len(skipped)} non-parameter tensor(s) (buffers, integer "
                     f"tensors), e.g. {skipped[0]}")
    if any(it.slot.module == "qkv" and not it.fused for it in items):
        notes.append("fused qkv reported as one module 'qkv' (layout unknown or no config)")
    if sft is not None:
        for it in items:
            sb, ss = base.tensors[it.base].shape, sft.tensors[it.sft].shape
            if sb == ss:
                continue
            if it.vocab and sb[1:] == ss[1:] and ss[0] > sb[0]:
                continue
            if it.vocab and sb[1:] == ss[1:]:
                raise SftscopeError(
                    f"{it.sft} has {ss[0]} vocabulary rows in the SFT checkpoint but {sb[0]} in "
                    f"the base; sftscope compares an SFT vocabulary that adds rows, not one that "
                    f"removes them (are --base and --sft swapped?)"
                )
            raise SftscopeError(
                f"shape mismatch for {it.base}: base {list(sb)} vs SFT {list(ss)}; the "
                f"checkpoints are different architectures (only vocabulary rows may differ)"
            )
    items.sort(key=lambda it: (str(base.tensors[it.base].file), base.tensors[it.base].start))
    return items


def _check_expert_layouts(names: list[str], spec: ArchSpec, which: str) -> None:
    """Expert tensors in one checkpoint only: one stores them per expert, the other fused."""
    moe = next((t for n in names if (t := moe_tensor(spec, n)) and t.role == "experts"), None)
    if moe is not None:
        have = "one tensor per expert" if moe.expert is not None else "fused [E, ...] tensors"
        raise SftscopeError(
            f"the {which} checkpoint stores block {moe.block}'s experts as {have} and the other "
            f"checkpoint does not; re-save both with save_pretrained (one tensor per expert) "
            f"and compare again"
        )


def _experts_record(items: list[_Item], acc: _Acc) -> dict[str, Any] | None:
    """What was read of a mixture of experts (run.json): the stored layout, the blocks and
    the number of experts with ``expert`` rows; None for a dense model."""
    if not acc.expert_d2:
        return None
    fused = any(it.experts_fused for it in items)
    per = any(it.slot.expert is not None for it in items)
    blocks = sorted({b for b, _ in acc.expert_d2})
    return {"layout": "fused" if fused and not per else "per_expert" if per and not fused
            else "adapter" if not items else "mixed",
            "blocks": blocks, "n_experts": len({e for _, e in acc.expert_d2})}


def _n_blocks(ckpt: Checkpoint, items: list[_Item]) -> int:
    found = [it.slot.block for it in items if it.slot.block is not None]
    cfg = n_layers(ckpt.config)
    return max(cfg or 0, (max(found) + 1) if found else 0)


def _full_pass(base: Checkpoint, sft: Checkpoint | None, items: list[_Item], acc: _Acc,
               low_rank: bool, top_k: int, device: str, exact_max: int, max_rank: int,
               timer: Timer) -> None:
    """Stream every tensor pair once; ``sft=None`` computes base norms only (adapter mode).

    All torch ops run single-threaded (``torch_threads(1)``: the streamed norms are
    memory-bound chunk operations, which one thread runs at memory speed, while OpenMP barriers
    stall whenever the cores are shared; measured: a 2 MiB float64 dot 40 us on one thread,
    23 ms on two busy cores); the cores are used by worker
    threads instead: streamed norms split over ``_Norms`` workers, SVDs over ``_Spectra``
    workers that overlap with the streaming."""
    threads = torch.get_num_threads()
    norms = _Norms(min(threads, 8))
    spectra = (_Spectra(acc, top_k, device, exact_max, max_rank, threads)
               if low_rank and sft is not None else None)
    try:
        with torch_threads(1):
            _stream_items(base, sft, items, acc, norms, spectra)
            if spectra is not None:
                spectra.finish()
    finally:
        norms.close()
        if spectra is not None:
            spectra.close()
    if spectra is not None:
        timer.seconds["low_rank_cpu"] = spectra.busy
        timer.seconds["low_rank_wait"] = spectra.waited


def _stream_items(base: Checkpoint, sft: Checkpoint | None, items: list[_Item], acc: _Acc,
                  norms: _Norms, spectra: _Spectra | None) -> None:
    spec = base.spec
    ahead = 0  # bytes asked for beyond the current pair
    nxt = 0  # next item to ask the kernel for
    # posix_fadvise(WILLNEED) blocks while it queues the reads: a thread of its own issues them.
    prefetch = ThreadPoolExecutor(1, thread_name_prefix="sftscope-prefetch")
    streamed = _Streamed(norms, acc)
    try:
        for i, it in enumerate(track(items, "weights: tensors")):
            # Keep about _PREFETCH bytes of upcoming tensors (at least the next pair) asked
            # for, so the disk reads while this pair is computed.
            while nxt < len(items) and (nxt <= i + 1 or ahead < _PREFETCH):
                prefetch.submit(base.advise, items[nxt].base)
                ahead += base.nbytes(items[nxt].base)
                if sft is not None:
                    prefetch.submit(sft.advise, items[nxt].sft)
                    ahead += sft.nbytes(items[nxt].sft)
                nxt += 1
            ahead -= base.nbytes(it.base) + (sft.nbytes(it.sft) if sft is not None else 0)
            if sft is not None and _streamable(base, sft, it, spectra):
                streamed.submit(base, sft, it)
            else:
                streamed.collect(0)  # the in-memory path uses every worker's buffers
                _one_pair(base, sft, it, acc, norms, spectra, spec)
        streamed.collect(0)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)


class _Streamed:
    """Streamed pairs (``_Norms.submit_stored``) in flight: the pair waited for has ``_AHEAD``
    tasks per worker queued behind it, so no worker idles at the end of a tensor (not even of
    the embedding's 32 tasks); results reach the accumulators in submission order (the same
    sums whatever the timing)."""

    def __init__(self, norms: _Norms, acc: _Acc) -> None:
        self.norms, self.acc = norms, acc
        self.pending: deque[tuple[list[Future], _Item, int]] = deque()
        self.tasks = 0

    def submit(self, base: Checkpoint, sft: Checkpoint, it: _Item) -> None:
        assert it.sft is not None
        futures = self.norms.submit_stored(base, it.base, sft, it.sft)
        self.pending.append((futures, it, math.prod(base.tensors[it.base].shape)))
        self.tasks += len(futures)
        self.collect(_AHEAD * self.norms.workers)

    def collect(self, keep: int) -> None:
        """Add the oldest pairs (waiting for them) while ``keep`` tasks are queued behind."""
        while self.pending and self.tasks - len(self.pending[0][0]) >= keep:
            futures, it, n = self.pending.popleft()
            self.tasks -= len(futures)
            d2, b2, same = _total(f.result() for f in futures)
            _add_change(self.acc, it.slot, d2, b2, same, n)


def _add_change(acc: _Acc, slot: Slot, d2: float, b2: float, same: int = 0,
                count: int = 0) -> None:
    """One tensor's ``||s - b||^2`` and ``||b||^2`` to its module (and, for one expert's
    tensor, to the expert's own row); ``same`` of ``count`` entries bit-identical (none
    compared when ``count`` is 0)."""
    key = (slot.block, slot.module)
    acc.add(key, d2, b2)
    if slot.expert is not None:  # one expert's tensor: to ``experts`` and its own row
        acc.add_expert(slot.block, slot.expert, d2, b2)
    if count:
        acc.same[key] += same
        acc.count[key] += count


def _coarser(a: str, b: str | None) -> str:
    """Of two stored dtypes, the one with the larger rounding error."""
    return a if b is None or dtype_eps(a) >= dtype_eps(b) else b


def _one_pair(base: Checkpoint, sft: Checkpoint | None, it: _Item, acc: _Acc, norms: _Norms,
              spectra: _Spectra | None, spec: ArchSpec) -> None:
    """Read one tensor pair that is not streamed (``_Streamed``) and add its change to the
    accumulators (its spectrum is queued)."""
    b = base.get(it.base)
    s = sft.get(it.sft) if sft is not None else None
    key = (it.slot.block, it.slot.module)
    dtype = _coarser(base.tensors[it.base].dtype,
                     sft.tensors[it.sft].dtype if sft is not None else None)
    if s is not None and it.vocab and s.shape[0] > b.shape[0]:
        added = s[b.shape[0]:]
        acc.add((None, f"{it.slot.module}_added"), norms.sq(added), 0.0)
        acc.added_rows[f"{it.slot.module}_added"] = max(
            acc.added_rows[f"{it.slot.module}_added"], added.shape[0])
        s = s[: b.shape[0]]
    spectrum = s is not None and _spectrum(it, b.dim(), spectra)
    # bit-identical entries: counted in the norm's own pass where there is one over the pair
    bits = _bit_view(s, b) if s is not None else None
    in_pass = bits is not None and not (it.fused or it.experts_fused or spectrum)
    if s is not None and not in_pass:
        _count_unchanged(acc, it, s, b, spec, base.config, norms)
    if it.fused:
        b64 = b.to(torch.float64)
        d64 = (s.to(torch.float64) - b64) if s is not None else None
        b_parts = split_fused_qkv(b64, spec, base.config)
        d_parts = split_fused_qkv(d64, spec, base.config) if d64 is not None else None
        for role in ("q", "k", "v"):
            pkey = (it.slot.block, role)
            dp = d_parts[role].contiguous() if d_parts is not None else None
            d2 = _sq64(dp) if dp is not None else 0.0
            acc.add(pkey, d2, _sq64(b_parts[role].contiguous()))
            if spectra is not None and dp is not None and dp.dim() == 2 \
                    and it.slot.param == "weight":
                spectra.submit(pkey, dp, d2, dtype)
        return
    if it.experts_fused:
        _fused_experts(b, s, it.slot.block, acc, norms)
        return
    if spectrum:  # never one expert's tensor (``_NO_SPECTRUM``)
        assert spectra is not None and s is not None
        d = s.to(torch.float64)
        d.sub_(b)
        d2 = _sq64(d)
        b2, same = norms.sq(b), 0
        spectra.submit(key, d, d2, dtype)
    elif s is not None:
        d2, b2, same = norms.sq_diff(s, b, bits)
    else:
        d2, b2, same = 0.0, norms.sq(b), 0
    _add_change(acc, it.slot, d2, b2, same, s.numel() if in_pass and s is not None else 0)


def _streamable(base: Checkpoint, sft: Checkpoint, it: _Item, spectra: _Spectra | None) -> bool:
    """Whether a pair's change is only norms and counts over both whole tensors, stored alike
    (same shape, same dtype, sizes as the header says): then it is read straight from the
    files chunk by chunk (``_Norms.sq_diff_stored``) instead of as two tensors."""
    b, s = base.tensors[it.base], sft.tensors[it.sft]
    if it.fused or it.experts_fused or b.shape != s.shape or b.dtype != s.dtype \
            or b.dtype not in _STORED or sys.byteorder != "little":  # safetensors' order
        return False
    if _spectrum(it, len(b.shape), spectra):
        return False  # the low-rank metrics need the whole change
    n = math.prod(b.shape) * _STORED[b.dtype].itemsize
    return b.end - b.start == n and s.end - s.start == n


def _spectrum(it: _Item, ndim: int, spectra: _Spectra | None) -> bool:
    """Whether a pair's change gets low-rank metrics: one 2-D weight, when they are asked."""
    return (spectra is not None and ndim == 2 and it.slot.param == "weight"
            and it.slot.module not in _NO_SPECTRUM)


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` seen as integers of the same width: equal bits, equal integers
    (``-0.0`` differs from ``0.0``, as it does on disk)."""
    x = x.to(dtype)
    return x.view(_INTS[x.element_size()])


def _bit_view(s: Tensor, b: Tensor) -> torch.dtype | None:
    """The dtype both are viewed as to compare them entry by entry, when they are stored in
    the same dtype: integers of the same width for floats (what ``_bits`` compares), the dtype
    itself otherwise. None when the dtypes differ (``_count_unchanged`` converts then)."""
    if s.dtype != b.dtype:
        return None
    return _INTS[b.element_size()] if b.is_floating_point() else b.dtype


def _count_unchanged(acc: _Acc, it: _Item, s: Tensor, b: Tensor, spec: ArchSpec,
                     config: dict, norms: _Norms) -> None:
    """``unchanged_frac``'s counts: entries bit-identical in their stored dtype (the coarser
    one when the two checkpoints store different dtypes), per module (fused qkv per role)."""
    bits = _bit_view(s, b)
    if bits is not None and not it.fused:  # chunk by chunk: no full-size bool tensor
        key = (it.slot.block, it.slot.module)
        acc.same[key] += norms.count_same(s, b, bits)
        acc.count[key] += s.numel()
        return
    if b.is_floating_point() and s.is_floating_point():
        dtype = b.dtype if dtype_eps(b.dtype) >= dtype_eps(s.dtype) else s.dtype
        same = _bits(s, dtype) == _bits(b, dtype)
    else:
        same = s == b
    if it.fused:
        parts = split_fused_qkv(same.to(torch.float64), spec, config)
        for role in ("q", "k", "v"):
            acc.same[(it.slot.block, role)] += int(parts[role].sum())
            acc.count[(it.slot.block, role)] += parts[role].numel()
        return
    key = (it.slot.block, it.slot.module)
    acc.same[key] += int(same.sum())
    acc.count[key] += same.numel()


def _fused_experts(b: Tensor, s: Tensor | None, block: int, acc: _Acc, norms: _Norms) -> None:
    """A fused expert tensor ``[E, ...]``: each expert's slice (a view) to its own row and to
    the block's ``experts``."""
    for e in range(b.shape[0]):
        d2, b2 = norms.sq_diff(s[e], b[e])[:2] if s is not None else (0.0, norms.sq(b[e]))
        acc.add((block, "experts"), d2, b2)
        acc.add_expert(block, e, d2, b2)


# --------------------------------------------------------------------------- adapters


def _adapter_pass(folder: Path, base: Checkpoint | None, acc: _Acc, low_rank: bool,
                  top_k: int, device: str, notes: list[str], timer: Timer) -> tuple[int, dict]:
    """Change of every adapted module from its LoRA factors, never forming ``B A``: the norm
    from ``tr((Bᵀ B)(A Aᵀ))``, the spectrum exactly from the ``r x r`` core."""
    from safetensors import safe_open

    lora = read_lora(folder)
    spec = base.spec if base is not None else spec_for_paths([m.path for m in lora.modules])
    for m in lora.modules:
        m.path = canonical_name(m.path, spec)
    _refuse_fused_expert_lora(lora, spec)
    config = base.config if base is not None else None
    if lora.other:
        notes.append(f"adapter: {len(lora.other)} non-LoRA tensor(s) (e.g. {lora.other[0]}: "
                     f"modules_to_save or trainable tokens) are not counted")
    blocks: set[int] = set()
    try:
        handle = safe_open(str(lora.file), framework="pt")
    except Exception as e:
        raise SftscopeError(f"could not read {lora.file} ({type(e).__name__}: "
                            f"{str(e)[:160]}); the file is corrupt: re-save the adapter") from e
    with handle as f:
        for mod in track(lora.modules, "weights: adapter modules"):
            a = f.get_tensor(mod.a).to(torch.float64)  # (r, in) or (r, vocab) for embeddings
            b = f.get_tensor(mod.b).to(torch.float64)  # (out, r) or (dim, r)
            r = a.shape[0]
            if b.shape[1] != r:
                raise SftscopeError(f"adapter {mod.path}: lora_A has rank {r} but lora_B "
                                    f"{b.shape[1]}; the adapter is corrupt")
            mod.rank, mod.alpha, mod.scale = lora.settings(mod.path, r)
            slot = classify(mod.path + ".weight", spec) or Slot(None, "other", "weight")
            if slot.module == "shared_expert_gate":  # part of the shared expert, as above
                slot = replace(slot, module="shared_expert")
            if slot.block is not None:
                blocks.add(slot.block)
            if base is not None:
                _check_adapter_shape(base, mod, slot, a, b, spec)
            parts = {slot.module: b}
            if slot.module == "qkv" and config is not None:
                shape = base.tensors[mod.path + ".weight"].shape
                if fused_split_ok(spec, config, shape):
                    parts = split_fused_qkv(b, replace(spec, conv1d=False), config)
            bias_parts: dict[str, Tensor] = {}
            if mod.bias is not None:
                bias = f.get_tensor(mod.bias).to(torch.float64)
                bias_parts = {slot.module: bias}
                if len(parts) > 1:
                    bias_parts = split_fused_qkv(bias, replace(spec, conv1d=False), config)
            _adapter_module(lora, mod, a, parts, bias_parts, slot, acc, low_rank, top_k,
                            device, timer)
    n_blocks = (max(blocks) + 1) if blocks else 0
    info = {"rank": lora.rank, "lora_alpha": lora.alpha, "use_rslora": lora.rslora,
            "modules": len(lora.modules),
            "scales": sorted({m.scale for m in lora.modules})}
    return n_blocks, info


def _refuse_fused_expert_lora(lora: LoraAdapter, spec: ArchSpec) -> None:
    """LoRA on fused expert parameters (peft ``target_parameters``) has factors of its own
    layout; their change is not measured here: one line, never a wrong number."""
    for m in lora.modules:
        slot = classify(m.path + ".weight", spec)
        if slot is not None and slot.module == "experts" and slot.expert is None:
            raise SftscopeError(
                f"the adapter adapts the fused expert parameters of {m.path} (peft "
                f"target_parameters); weights --adapter does not measure those: merge the "
                f"adapter into a checkpoint (sftscope.load.models.save_model) and compare it "
                f"with --sft"
            )


def _adapter_module(lora: LoraAdapter, mod: LoraModule, a: Tensor, parts: dict[str, Tensor],
                    bias_parts: dict[str, Tensor], slot: Slot, acc: _Acc, low_rank: bool,
                    top_k: int, device: str, timer: Timer) -> None:
    """Accumulate one adapted module (split into q, k, v parts where fused)."""
    scale = mod.scale
    gram_a = a @ a.T  # r x r
    dtype = _coarser(lora.tensors[mod.a].dtype, lora.tensors[mod.b].dtype)
    for role, bp in parts.items():
        bp = bp.contiguous()
        d2 = scale**2 * float((bp.T @ bp * gram_a).sum())  # tr((B^T B)(A A^T))
        key = (slot.block, role)
        bias_d2 = scale**2 * _sq64(bias_parts[role]) if role in bias_parts else 0.0
        acc.add(key, d2 + bias_d2, 0.0)
        if slot.expert is not None:  # one expert's projection (per-expert modules)
            acc.add_expert(slot.block, slot.expert, d2 + bias_d2, 0.0)
        if low_rank and role not in _NO_SPECTRUM:
            with timer("low_rank"):
                sigma = lora_svdvals(bp.to(device), a.to(device), scale).cpu()
                shape = (bp.shape[0], a.shape[1])
                sigma = drop_noise(sigma, shape, dtype)
                acc.lowrank[key] = spectrum_metrics(sigma, d2, top_k, min(shape))
                acc.methods[key] = "exact"


def _check_adapter_shape(base: Checkpoint, mod: LoraModule, slot: Slot, a: Tensor,
                         b: Tensor, spec: ArchSpec) -> None:
    name = mod.path + ".weight"
    if name not in base.tensors:
        raise SftscopeError(f"the adapter changes {mod.path}, which the base checkpoint does "
                            f"not have; is it an adapter of this base?")
    shape = base.tensors[name].shape
    if mod.embedding or spec.conv1d and slot.block is not None:
        want = (a.shape[1], b.shape[0])
    else:
        want = (b.shape[0], a.shape[1])
    if tuple(shape) != want:
        raise SftscopeError(f"adapter {mod.path} has shape {list(want)} but the base weight is "
                            f"{list(shape)}; is it an adapter of this base?")


# --------------------------------------------------------------------------- API


def _check_request(base: object, sft: object, adapter: object, *, low_rank: bool, top_k: int,
                   device: str, max_rank: int) -> None:
    """``weight_change``'s arguments, refused in one line each before anything is read."""
    if (sft is None) == (adapter is None):
        raise SftscopeError("give exactly one of --sft (a fine-tuned checkpoint) or --adapter "
                            "(a LoRA folder)")
    if sft is not None and base is None:
        raise SftscopeError("--sft needs --base: the change is measured against the base")
    if top_k < 1:
        raise SftscopeError(f"--top-k must be at least 1, got {top_k}")
    if max_rank < top_k:
        raise SftscopeError(f"--max-rank ({max_rank}) must be at least --top-k ({top_k})")
    if low_rank:
        try:
            torch.empty(1, device=device)
        except (RuntimeError, ValueError) as e:
            raise SftscopeError(f"--device {device!r} is not available here ({e}); "
                                f"use cpu") from e


def weight_change(
    base: str | os.PathLike | None,
    sft: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    *,
    low_rank: bool = True,
    top_k: int = 8,
    device: str = "cpu",
    max_rank: int = 64,
    exact_max: int = 512,
) -> pd.DataFrame:
    """Per-block, per-module weight change of an SFT checkpoint (or LoRA adapter) vs its base.

    ``base``/``sft``/``adapter``: local folders or hub ids. ``base`` is needed with ``sft``;
    with ``adapter`` it is optional (it adds the ``relative`` rows and the unadapted modules, at
    zero change). ``low_rank=False`` is pure streaming (``frobenius``/``relative`` only);
    otherwise ``top_k`` singular values and the rank metrics per module, with an exact SVD when
    a matrix's smaller side is at most ``exact_max``, else a randomized one of rank ``max_rank``,
    on ``device``. Returns the tidy table (``block, module, metric, value``); ``df.attrs`` holds
    ``n_blocks``, ``model_type``, ``mode``, ``notes``, ``timings`` and ``bytes_read`` for the
    run record.
    """
    _check_request(base, sft, adapter, low_rank=low_rank, top_k=top_k, device=device,
                   max_rank=max_rank)
    timer = Timer()
    notes: list[str] = []
    acc = _Acc()
    opened: list[Checkpoint] = []
    try:
        with timer("plan"):
            # Every path first (a typo fails at once), then configs and headers.
            b_dir = resolve_source(base, "base") if base is not None else None
            s_dir = resolve_source(sft, "SFT") if sft is not None else None
            a_dir = (adapter_folder(resolve_source(adapter, "adapter"))  # or a tune run's
                     if adapter is not None else None)
            b_ck = Checkpoint(b_dir, "base") if b_dir is not None else None
            if b_ck is not None:
                opened.append(b_ck)
            s_ck = Checkpoint(s_dir, "SFT") if s_dir is not None else None
            if s_ck is not None:
                opened.append(s_ck)
            items = _plan(b_ck, s_ck, notes) if b_ck is not None else []
        with timer("stream"):
            if b_ck is not None:
                _full_pass(b_ck, s_ck, items, acc, low_rank, top_k, device, exact_max,
                           max_rank, timer)
            extra: dict[str, Any] = {}
            n_blocks = _n_blocks(b_ck, items) if b_ck is not None else 0
            if a_dir is not None:
                with torch_threads(1):  # r x r problems: threads only add overhead
                    nb, extra = _adapter_pass(a_dir, b_ck, acc, low_rank, top_k, device, notes,
                                              timer)
                if b_ck is None:
                    n_blocks = nb
                    notes.append("no base: n_blocks counts up to the last adapted block")
    finally:
        for ck in opened:
            ck.close()
    with timer("table"):
        df = _table(acc, has_base=b_ck is not None)
    n_bytes = sum(i.end - i.start for ck in opened for i in ck.tensors.values())
    df.attrs.update(
        n_blocks=n_blocks, mode="adapter" if adapter is not None else "checkpoints",
        model_type=b_ck.model_type if b_ck is not None else "",
        family=b_ck.spec.family if b_ck is not None else "",
        tied=bool(b_ck.tied) if b_ck is not None else None,
        notes=notes, timings=dict(timer.seconds), bytes_read=n_bytes,
        adapter=extra if adapter is not None else None,
        experts=_experts_record(items, acc),
    )
    return df


@staged
def chain_weight_change(specs: dict[str, str], pairs: Sequence[ChainPair],
                        **options: Any) -> pd.DataFrame:
    """``weight_change`` of each pair of a checkpoint chain (``specs``: label -> checkpoint;
    ``pairs``: ``chains.chain_pairs``), one after the other, in one table with the pair in a
    ``model`` column (``pair``, ``pair:base-dpo``, ``pair:sft-dpo``, ...) in front. Each pair's
    rows are exactly those of a separate two-checkpoint run (its relative change is relative to
    the pair's first checkpoint). ``df.attrs``: the first pair's, with every pair's notes
    (prefixed), timings and bytes read added up."""
    frames: list[pd.DataFrame] = []
    attrs: dict[str, Any] = {}
    plan(len(pairs))
    for p in pairs:
        stage(p.model)
        df = weight_change(specs[p.a], specs[p.b], **options)
        a = dict(df.attrs)
        if not attrs:
            attrs = {**a, "notes": list(a.get("notes", [])), "timings": {}, "bytes_read": 0}
        else:
            attrs["notes"] += [f"{p.model}: {n}" for n in a.get("notes", [])]
        for k, v in (a.get("timings") or {}).items():
            attrs["timings"][f"{p.model}:{k}"] = v
        attrs["bytes_read"] += int(a.get("bytes_read") or 0)
        df = df.copy()
        df.attrs = {}
        df.insert(0, "model", p.model)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out["block"] = out["block"].astype("Int64")
    out.attrs.update(attrs)
    return out


def run_weights(
    config: WeightsConfig | str | os.PathLike,
    base: str | os.PathLike | None = None,
    sft: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    **options: Any,
) -> pd.DataFrame:
    """``weight_change`` plus its run folder: ``out/weights.<fmt>`` and ``out/run.json``
    (atomic writes; what ``sftscope weights`` does). Takes a :class:`WeightsConfig`, or
    ``(out, base, sft, adapter, **options)``. With ``stages`` (a checkpoint chain): every
    stage against the base, and with ``consecutive`` against the stage before it
    (``chain_weight_change``; the table gets a ``model`` column naming the pair)."""
    from sftscope import io
    from sftscope.runs import check_out, finish_run, start_run

    if isinstance(config, WeightsConfig):
        cfg = config
    else:
        cfg = WeightsConfig(out=str(config), base=None if base is None else str(base),
                            sft=None if sft is None else str(sft),
                            adapter=None if adapter is None else str(adapter), **options)
    check_out(cfg.out, "weights", cfg, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    start_run(cfg.out, "weights", WeightsConfig.OUTPUTS)
    timer = Timer()
    opts = {"low_rank": cfg.low_rank, "top_k": cfg.top_k, "device": device,
            "max_rank": cfg.max_rank, "exact_max": cfg.exact_max}
    chain: dict[str, Any] = {}
    with timer("total"):
        if cfg.stages:
            stages = [Stage(FIRST, str(cfg.sft)), *cfg.chain()]
            pairs = chain_pairs([s.label for s in stages], cfg.consecutive)
            specs = {BASE: str(cfg.base), **{s.label: s.spec for s in stages}}
            table = chain_weight_change(specs, pairs, **opts)
            chain = chain_record(stages, pairs)
        else:
            table = weight_change(cfg.base, cfg.sft, cfg.adapter, **opts)
    with timer("write"):
        io.write_tables(table, cfg.out, "weights", cfg.formats)
    attrs = dict(table.attrs)
    timings = {**attrs.pop("timings", {}), **timer.seconds}
    finish_run(cfg.out, io.run_record(
        "weights", cfg.record(), n_blocks=attrs.pop("n_blocks", 0), timings=timings,
        models=run_models(base=cfg.base, sft=cfg.sft or cfg.adapter), **attrs, **chain))
    return table


def run_models(**specs: str | None) -> dict[str, Any]:
    """run.json's ``models`` (the schema every command writes): role -> fingerprint, an
    adapter's with its label and its base's (``base``: what an adapter applies to)."""
    from sftscope.load.models import fingerprint

    base = specs.get("base") or specs.get("model")
    out: dict[str, Any] = {}
    for role, spec in specs.items():
        if spec is None:
            continue
        try:
            out[role] = fingerprint(spec, base=base if spec != base else None)
        except SftscopeError as e:  # an adapter whose base is gone: still say what it is
            out[role] = {"source": spec, "error": str(e)}
    return out
