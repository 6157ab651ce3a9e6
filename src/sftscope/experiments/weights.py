"""Weight change between a Base and an SFT checkpoint, or of a LoRA adapter (METRICS.md).

Both checkpoints are read tensor by tensor with ``safetensors.safe_open`` (one tensor pair in
memory at a time, sharded checkpoints through ``model.safetensors.index.json``); nothing loads a
whole model, so peak memory stays at a few tensors whatever the model's size. Sums of squares
are accumulated in float64. Tensor names map to ``(block, module)`` through the architecture
map of the config's ``model_type`` (``sftscope.load.arch``).

Table (tidy, long): ``block`` (0-based; empty for embeddings, final norm, LM head, totals),
``module``, ``metric``, ``value``.

Modules: ``q k v o`` (fused qkv split where the layout is known, else one ``qkv``), MLP
projections by role (``gate up down fc_in fc_out gate_up``), ``other`` (everything else inside
the block: norms, MoE routers/experts, unmapped projections), the aggregates ``attn`` (attention
projections), ``mlp`` (MLP projections) and ``total`` (every tensor of the block); outside the
blocks ``embed``, ``embed_added``, ``pos_embed``, ``final_norm``, ``lm_head``,
``lm_head_added``, ``other`` and the whole-model ``total``.

Metrics: ``frobenius`` = ``sqrt(sum ||W_sft - W_base||_F^2)`` over the module's tensors and
``relative`` = that divided by ``sqrt(sum ||W_base||_F^2)``. **Biases are part of their module**:
a module's change is the Frobenius norm of all its parameters (weight and bias) as one vector,
so ``attn`` over q/k/v/o is exactly the change of the attention projections' parameters. Added
vocabulary rows (SFT embedding/head larger than the base's) are compared on the shared rows;
the added rows' norm is ``embed_added`` / ``lm_head_added`` (``frobenius``, and ``rows``, the
number of added rows); they count in the whole-model total but not in ``embed``/``lm_head``.
Tied embeddings are counted once, under ``embed`` (no ``lm_head`` row).

Low-rank metrics (per module with a 2-D weight; the spectrum of the weight's change, without the
bias): ``sv1..svK`` (largest singular values), ``energy_rank90`` (smallest ``r`` whose top-``r``
singular values hold 90 % of ``||dW||_F^2``), ``effective_rank`` (Roy-Vetterli on ``sigma``),
``stable_rank`` (``||dW||_F^2 / sigma_1^2``) and ``residual_energy`` (fraction of
``||dW||_F^2`` outside the computed singular values). Matrices whose smaller side is at most
``exact_max`` get an exact SVD (``residual_energy = 0``); larger ones a randomized SVD of rank
``max_rank`` (subspace iteration as in ``torch.svd_lowrank``, 2 power iterations, seeded):
then ``energy_rank90`` is NaN when more than ``max_rank`` directions are needed and
``effective_rank`` is a lower bound (that of the best rank-``max_rank`` approximation; the
truncated distribution majorizes the full one). LoRA adapters get exact spectra from the
``r x r`` core. SVDs run on worker threads while the streaming goes on.

Speed: every torch op runs single-threaded (OpenMP barriers stall whenever cores are shared);
the cores are used by worker threads instead (norm chunks of large tensors, SVD jobs), and the
kernel is asked (``posix_fadvise``) to read the next tensors while the current pair is computed.

A LoRA adapter's change is ``||s B A||_F`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA; per-module ``rank_pattern``/``alpha_pattern``), from ``||BA||^2 = tr((B^T B)(A A^T))``,
never forming ``BA``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from sftscope.config.commands import WeightsConfig
from sftscope.errors import SftscopeError
from sftscope.io import Timer
from sftscope.load.arch import (
    REGISTRY,
    ArchSpec,
    fused_qkv_sizes,
    n_layers,
    spec_for_config,
    split_fused_qkv,
)
from sftscope.load.runtime import resolve_device
from sftscope.progress import track

COLUMNS = ["block", "module", "metric", "value"]
MLP_ROLES = ("gate", "up", "gate_up", "down", "fc_in", "fc_out")
_BLOCK_ORDER = ("q", "k", "v", "qkv", "o", "attn", *MLP_ROLES, "mlp", "other", "total")
_TOP_ORDER = ("embed", "embed_added", "pos_embed", "final_norm", "lm_head", "lm_head_added",
              "other", "total")
_VOCAB_MODULES = ("embed", "lm_head")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_JUNK_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
# Legacy checkpoint names that transformers renames at load time: family -> {old: new}.
_ALIASES = {"gpt_neox": {"embed_out.": "lm_head."}}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CHUNK = 1 << 18  # elements per float64 chunk: two 2 MiB buffers stay in cache
_PREFETCH = 64 << 20  # bytes of upcoming tensors the kernel is asked to read ahead
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


# --------------------------------------------------------------------------- sources


def resolve_source(arg: str | os.PathLike, what: str) -> Path:
    """A local folder for ``arg``: an existing path, else a hub id fetched with
    ``huggingface_hub.snapshot_download`` (config and safetensors files only)."""
    text = str(arg)
    path = Path(os.path.expanduser(text))
    if path.exists():
        if not path.is_dir():
            raise SftscopeError(f"{what} {text} is a file; give the model folder that holds it")
        return path
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise SftscopeError(f"{what} folder {text} does not exist; check the path")
    try:
        import huggingface_hub

        local = huggingface_hub.snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pt"],
        )
    except Exception as e:  # offline, unknown id, gated repo, ...: one clear line
        first = (str(e).splitlines() or [""])[0][:160]
        raise SftscopeError(
            f"{what} {text!r} is not a local folder and could not be fetched from the Hugging "
            f"Face Hub ({type(e).__name__}: {first}); pass a local folder (download it where "
            f"there is network, e.g. `hf download {text} --local-dir DIR`)"
        ) from e
    return Path(local)


def _pickle_error(folder: Path, name: str) -> SftscopeError:
    return SftscopeError(
        f"{folder} holds only pickle weights ({name}); sftscope never unpickles checkpoints. "
        f"Convert once: AutoModelForCausalLM.from_pretrained('{folder}')"
        f".save_pretrained(OUT, safe_serialization=True), then pass OUT"
    )


@dataclass(frozen=True)
class _TensorInfo:
    file: Path
    raw: str  # name inside the file
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte range in the file
    end: int


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse a safetensors header (8-byte length + JSON) and check it against the file size, so
    that a truncated or corrupt file fails before any work is done."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > size - 8 or n > 1 << 30:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise SftscopeError(f"checkpoint file {path} is missing; re-download the checkpoint") from e
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise SftscopeError(
            f"checkpoint file {path} is corrupt or truncated ({e}); re-download or re-save it"
        ) from e
    if not isinstance(header, dict):
        raise SftscopeError(f"checkpoint file {path} has a corrupt header; re-download it")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    out: dict[str, _TensorInfo] = {}
    try:
        end = 0
        for name, meta in header.items():
            lo, hi = (int(x) for x in meta["data_offsets"])
            end = max(end, hi)
            out[name] = _TensorInfo(path, name, str(meta["dtype"]),
                                    tuple(int(s) for s in meta["shape"]), 8 + n + lo, 8 + n + hi)
    except (KeyError, TypeError, ValueError) as e:
        raise SftscopeError(f"checkpoint file {path} has a corrupt header ({e}); "
                            f"re-download it") from e
    if end != data_len:
        raise SftscopeError(
            f"checkpoint file {path} is truncated or corrupt: its header describes {end} bytes "
            f"of tensor data but the file holds {data_len}; re-download or re-save it"
        )
    return out


def _weight_files(folder: Path) -> dict[str, _TensorInfo]:
    """Every tensor of a Hugging Face folder: ``model.safetensors``, the shards named by
    ``model.safetensors.index.json``, or (no index) every ``*.safetensors`` file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SftscopeError(f"{index} is corrupt ({e}); re-download the checkpoint") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise SftscopeError(
                f"{index} names {len(missing)} missing shard(s) ({', '.join(missing[:3])}); "
                f"re-download the checkpoint"
            )
        headers = {f: _read_header(folder / f) for f in files}
        out = {}
        for name, f in weight_map.items():
            if name not in headers[f]:
                raise SftscopeError(f"{index} says {name} is in {f}, but that shard does not "
                                    f"hold it; re-download the checkpoint")
            out[name] = headers[f][name]
        return out
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(
        p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(folder, pickles[0])
        raise SftscopeError(f"{folder} has no model.safetensors (or index); point at a Hugging "
                            f"Face model folder")
    out = {}
    for f in files:
        for name, info in _read_header(f).items():
            if name in out:
                raise SftscopeError(f"tensor {name} is in both {out[name].file.name} and "
                                    f"{f.name}; the folder mixes two checkpoints")
            out[name] = info
    return out


def _load_config(folder: Path) -> Any:
    """The model config (transformers ``AutoConfig``; plain JSON for unknown model types)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise SftscopeError(f"{folder} has no config.json; point at a Hugging Face model folder")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception:  # unknown model_type / custom code: the JSON is enough for us
        try:
            return SimpleNamespace(**json.loads(cfg_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError) as e:
            raise SftscopeError(f"{cfg_path} is not valid JSON ({e})") from e


def _infer_spec(names: list[str], config: Any) -> ArchSpec:
    """A spec from tensor names alone for model types the registry does not know."""
    counts: dict[str, set[int]] = defaultdict(set)
    for n in names:
        m = re.match(r"^(.*?)\.(\d+)\.", n)
        if m:
            counts[m.group(1)].add(int(m.group(2)))
    if not counts:
        raise SftscopeError(
            f"unknown architecture (model_type {getattr(config, 'model_type', '?')!r}): no "
            f"numbered decoder blocks among the tensor names; add an ArchSpec to load/arch.py"
        )
    want = n_layers(config)
    blocks = max(counts, key=lambda p: (len(counts[p]) == want, len(counts[p])))
    parent = blocks.rsplit(".", 1)[0] + "." if "." in blocks else ""
    patterns = {"q": r"q_proj$", "k": r"k_proj$", "v": r"v_proj$",
                "o": r"(o_proj|out_proj|dense)$", "gate": r"gate_proj$", "up": r"up_proj$",
                "down": r"down_proj$", "fc_in": r"fc1$", "fc_out": r"fc2$"}
    attn: dict[str, str] = {}
    mlp: dict[str, str] = {}
    embed = final_norm = ""
    for n in names:
        path = n.rsplit(".", 1)[0]
        m = re.match(rf"^{re.escape(blocks)}\.\d+\.(.+)$", path)
        if m:
            sub = m.group(1)
            for role, pat in patterns.items():
                target = mlp if role in MLP_ROLES else attn
                if re.search(pat, sub) and role not in target and not (
                        role == "o" and "mlp" in sub):
                    target[role] = sub
        elif re.search(r"(embed_tokens|wte|embed_in|word_embeddings)$", path):
            embed = path
        elif re.search(r"(norm|ln_f|final_layernorm|final_layer_norm)$", path) \
                and path.startswith(parent):
            final_norm = path
    return ArchSpec(family=f"generic:{getattr(config, 'model_type', '')}",
                    model_types=(str(getattr(config, "model_type", "")),), blocks=blocks,
                    embed=embed, final_norm=final_norm, attn=attn, mlp=mlp)


def _canonical(name: str, spec: ArchSpec | None) -> str:
    """Checkpoint name -> name relative to the ``*ForCausalLM`` object: strip wrapper prefixes,
    apply legacy aliases, add a missing root prefix (hub GPT-2 files say ``h.0...``)."""
    for p in _JUNK_PREFIXES:
        if name.startswith(p):
            name = name[len(p):]
    if spec is None:
        return name
    for fam_type in spec.model_types:
        for old, new in _ALIASES.get(fam_type, {}).items():
            if name.startswith(old):
                name = new + name[len(old):]
    root = spec.blocks.split(".")[0] + "."
    if "." in spec.blocks and not name.startswith(root) and not name.startswith(spec.head + "."):
        name = root + name
    return name


class Checkpoint:
    """One model folder: config, architecture spec and the byte layout of every tensor."""

    def __init__(self, source: str | os.PathLike, what: str = "model") -> None:
        self.folder = resolve_source(source, what)  # cheap when already a resolved folder
        self.what = what
        self.source = str(source)
        self.config = _load_config(self.folder)
        self.model_type = str(getattr(self.config, "model_type", "") or "")
        raw = _weight_files(self.folder)
        spec = spec_for_config(self.config)
        if spec is not None:
            probe = {_canonical(n, spec) for n in raw}
            if not any(n.startswith(spec.blocks + ".") for n in probe):
                spec = None  # registry paths do not fit this checkpoint: infer
        if spec is None:
            spec = _infer_spec([_canonical(n, None) for n in raw], self.config)
        self.spec = spec
        self.tensors: dict[str, _TensorInfo] = {}
        for n, info in raw.items():
            c = _canonical(n, spec)
            if c in self.tensors:
                raise SftscopeError(f"{self.folder}: tensors {self.tensors[c].raw} and {n} "
                                    f"name the same parameter")
            self.tensors[c] = info
        self._fds: dict[Path, int] = {}

    @property
    def tied(self) -> bool:
        """Output head = input embedding (config says so, or no head tensor is stored)."""
        return bool(getattr(self.config, "tie_word_embeddings", False)) or (
            f"{self.spec.head}.weight" not in self.tensors)

    def get(self, name: str) -> Tensor:
        """One tensor, read with ``safe_open`` (memory-mapped, released when dropped)."""
        from safetensors import safe_open

        info = self.tensors[name]
        try:
            with safe_open(str(info.file), framework="pt") as f:
                return f.get_tensor(info.raw)
        except Exception as e:  # safetensors raises its own error types on bad files
            raise SftscopeError(
                f"could not read {info.raw} from {info.file} ({type(e).__name__}: "
                f"{str(e)[:160]}); the file is corrupt or truncated: re-download or re-save it"
            ) from e

    def nbytes(self, name: str) -> int:
        info = self.tensors[name]
        return info.end - info.start

    def advise(self, name: str) -> int:
        """Ask the kernel to read a tensor's bytes ahead (overlaps disk reads with compute);
        returns the tensor's size in bytes."""
        info = self.tensors[name]
        if hasattr(os, "posix_fadvise"):
            try:
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
                os.posix_fadvise(fd, info.start, info.end - info.start, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
        return info.end - info.start

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


# --------------------------------------------------------------------------- naming


@dataclass(frozen=True)
class _Slot:
    block: int | None
    module: str
    param: str  # weight, bias, ...


@functools.lru_cache(maxsize=64)
def _block_re(blocks: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(blocks)}\.(\d+)\.(.+)$")


def _classify(name: str, spec: ArchSpec) -> _Slot | None:
    """``(block, module, param)`` of a canonical tensor name; None for non-parameter buffers."""
    path, _, param = name.rpartition(".")
    if param in ("inv_freq", "masked_bias"):
        return None
    m = _block_re(spec.blocks).match(path)
    if m:
        sub = m.group(2)
        if spec.conv1d and sub == "attn" and param == "bias":
            return None  # GPT-2's causal-mask buffer in old checkpoints
        role = spec.module_roles().get(sub, "other")
        return _Slot(int(m.group(1)), role, param)
    if path == spec.embed:
        return _Slot(None, "embed", param)
    if path in spec.extra_embeds:
        return _Slot(None, "pos_embed", param)
    if spec.final_norm and path == spec.final_norm:
        return _Slot(None, "final_norm", param)
    if path == spec.head:
        return _Slot(None, "lm_head", param)
    return _Slot(None, "other", param)


def _fused_split_ok(spec: ArchSpec, config: Any, shape: tuple[int, ...]) -> bool:
    """Whether ``split_fused_qkv`` applies to a fused tensor of this shape and config."""
    if spec.fused_layout not in ("concat", "neox") or isinstance(config, SimpleNamespace):
        return False
    rows = shape[1] if (spec.conv1d and len(shape) == 2) else shape[0]
    try:
        if spec.fused_layout == "concat":
            return rows == sum(fused_qkv_sizes(config))
        heads = int(config.num_attention_heads)
        return rows % (3 * heads) == 0
    except (AttributeError, TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- numerics


class _Norms:
    """Squared norms accumulated in float64 without full-size copies: chunk by chunk through
    two reusable float64 buffers (2 MiB each, cache-resident) per worker. A large tensor is cut
    into chunk-aligned contiguous parts, one per worker thread (torch ops release the GIL and
    each runs single-threaded, so no OpenMP barrier can stall); part sums are added in a fixed
    order, so results are deterministic for a given worker count."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = max(1, workers)
        self.bufs = [(torch.empty(_CHUNK, dtype=torch.float64),
                      torch.empty(_CHUNK, dtype=torch.float64)) for _ in range(self.workers)]
        self.pool = ThreadPoolExecutor(self.workers - 1) if self.workers > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def _parts(self, n: int) -> list[tuple[int, int]]:
        if self.pool is None or n < 2 * _CHUNK:
            return [(0, n)]
        per = math.ceil(math.ceil(n / _CHUNK) / self.workers) * _CHUNK
        return [(lo, min(lo + per, n)) for lo in range(0, n, per)]

    def _map(self, fn: Any, n: int) -> list[Any]:
        parts = self._parts(n)
        futures = [self.pool.submit(fn, j, lo, hi) for j, (lo, hi) in enumerate(parts) if j]
        return [fn(0, *parts[0])] + [f.result() for f in futures]

    def sq_diff(self, s: Tensor, b: Tensor) -> tuple[float, float]:
        """``(||s - b||^2, ||b||^2)``."""
        s, b = s.reshape(-1), b.reshape(-1)

        def part(j: int, lo: int, hi: int) -> tuple[float, float]:
            ba, bb = self.bufs[j]
            d2 = b2 = 0.0
            for i in range(lo, hi, _CHUNK):
                m = min(_CHUNK, hi - i)
                xa, xb = ba[:m], bb[:m]
                xa.copy_(s[i:i + m])
                xb.copy_(b[i:i + m])
                b2 += float(torch.dot(xb, xb))
                xa.sub_(xb)
                d2 += float(torch.dot(xa, xa))
            return d2, b2

        res = self._map(part, s.numel())
        return math.fsum(r[0] for r in res), math.fsum(r[1] for r in res)

    def sq(self, x: Tensor) -> float:
        """``||x||^2``."""
        x = x.reshape(-1)

        def part(j: int, lo: int, hi: int) -> float:
            ba = self.bufs[j][0]
            out = 0.0
            for i in range(lo, hi, _CHUNK):
                m = min(_CHUNK, hi - i)
                xa = ba[:m]
                xa.copy_(x[i:i + m])
                out += float(torch.dot(xa, xa))
            return out

        return math.fsum(self._map(part, x.numel()))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run torch ops on ``n`` threads inside the block, then restore the previous count.

    The streamed norms are memory-bound chunk operations: one thread runs them at memory speed,
    and OpenMP barriers between threads stall badly whenever the cores are shared with other
    work (measured: a 2 MiB float64 dot 40 us on one thread, 23 ms on two busy cores)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sq64(x: Tensor) -> float:
    x = x.reshape(-1)
    return float(torch.dot(x, x))


def erank(sigma: Tensor) -> float:
    """Roy-Vetterli effective rank ``exp(-sum q log q)``, ``q = sigma / sum sigma``."""
    s = sigma.double().clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    q = s[s > 0] / total
    return math.exp(float(-(q * q.log()).sum()))


def spectrum_metrics(sigma: Tensor, energy: float, top_k: int, n_sv: int) -> dict[str, float]:
    """Low-rank metrics from singular values (descending) and the exact ``||dW||_F^2``.

    ``n_sv`` is ``min(rows, cols)``: ``sv_i`` rows exist for ``i <= min(top_k, n_sv)``."""
    sigma = sigma.double().cpu().clamp_min(0)
    out: dict[str, float] = {}
    for i in range(min(top_k, n_sv)):
        out[f"sv{i + 1}"] = float(sigma[i]) if i < sigma.numel() else 0.0
    captured = float((sigma**2).sum())
    if energy <= 0 or captured <= 0:
        out.update(effective_rank=0.0, energy_rank90=0.0, stable_rank=0.0, residual_energy=0.0)
        return out
    residual = max(energy - captured, 0.0) / energy
    if residual < 1e-9:
        residual = 0.0
    cum = torch.cumsum(sigma**2, 0)
    # The denominator is the exact energy; tiny round-off must not push r past the true rank.
    hit = (cum >= 0.9 * min(energy, captured) if residual == 0.0 else cum >= 0.9 * energy)
    r90 = float(int(hit.nonzero()[0, 0]) + 1) if bool(hit.any()) else math.nan
    out.update(effective_rank=erank(sigma), energy_rank90=r90,
               stable_rank=energy / float(sigma[0]) ** 2, residual_energy=residual)
    return out


def randomized_svdvals(x: Tensor, q: int, niter: int = 2, seed: int = 0) -> Tensor:
    """Top-``q`` singular values by randomized subspace iteration (Halko, Martinsson & Tropp
    2011: the algorithm of ``torch.svd_lowrank``), with its own seeded generator so that the
    result is deterministic and threads can run it side by side."""
    if x.shape[0] < x.shape[1]:
        x = x.T
    gen = torch.Generator(device=x.device).manual_seed(seed)
    omega = torch.randn(x.shape[1], q, generator=gen, dtype=x.dtype, device=x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(x.T @ basis).Q
        basis = torch.linalg.qr(x @ basis).Q
    return torch.linalg.svdvals(basis.T @ x)


def _svdvals(d: Tensor, device: str, exact_max: int, max_rank: int) -> Tensor:
    """Singular values of ``d`` in float64: exact when small, randomized otherwise."""
    dev = torch.device(device)
    x = d.to(device=dev, dtype=torch.float64)
    try:
        if min(x.shape) <= max(exact_max, 2 * max_rank):
            return torch.linalg.svdvals(x)
        return randomized_svdvals(x, min(max_rank, min(x.shape)))
    except RuntimeError:
        if dev.type == "cpu":
            raise
        return _svdvals(d.cpu(), "cpu", exact_max, max_rank)


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

    def _job(self, key: tuple[int | None, str], d: Tensor, energy: float) -> tuple:
        t0 = time.perf_counter()
        try:
            sigma = _svdvals(d, self.device, self.exact_max, self.max_rank)
            out = spectrum_metrics(sigma, energy, self.top_k, min(d.shape))
        except RuntimeError:  # non-finite weights or a solver that did not converge
            names = [f"sv{i + 1}" for i in range(min(self.top_k, min(d.shape)))]
            out = dict.fromkeys([*names, "effective_rank", "energy_rank90", "stable_rank",
                                 "residual_energy"], math.nan)
        return key, out, time.perf_counter() - t0

    def submit(self, key: tuple[int | None, str], d: Tensor, energy: float) -> None:
        nbytes = d.numel() * d.element_size()
        while self.pending and (len(self.pending) >= self.workers
                                or self.inflight + nbytes > self.max_bytes):
            self._collect_one()
        self.pending.append((self.pool.submit(self._job, key, d, energy), nbytes))
        self.inflight += nbytes

    def _collect_one(self) -> None:
        fut, nbytes = self.pending.popleft()
        t0 = time.perf_counter()
        key, metrics, busy = fut.result()
        self.waited += time.perf_counter() - t0
        self.acc.lowrank[key] = metrics
        self.busy += busy
        self.inflight -= nbytes

    def finish(self) -> None:
        while self.pending:
            self._collect_one()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- accumulation


class _Acc:
    """Per ``(block, module)``: squared change, squared base norm, weight-only change energy and
    low-rank metrics; ``added`` holds the norm and row count of added vocabulary rows."""

    def __init__(self) -> None:
        self.d2: dict[tuple[int | None, str], float] = defaultdict(float)
        self.b2: dict[tuple[int | None, str], float] = defaultdict(float)
        self.lowrank: dict[tuple[int | None, str], dict[str, float]] = {}
        self.added_rows: dict[str, int] = defaultdict(int)

    def add(self, key: tuple[int | None, str], d2: float, b2: float) -> None:
        self.d2[key] += d2
        self.b2[key] += b2


def _table(acc: _Acc, has_base: bool) -> pd.DataFrame:
    """Module rows, then the aggregates, in a stable order."""
    rows: list[tuple[int | None, str, str, float]] = []
    keys = set(acc.d2) | set(acc.b2)
    blocks = sorted({b for b, _ in keys if b is not None})

    def emit(block: int | None, module: str, d2: float, b2: float) -> None:
        rows.append((block, module, "frobenius", math.sqrt(d2)))
        if module.endswith("_added"):
            rows.append((block, module, "rows", float(acc.added_rows[module])))
        elif has_base:
            rows.append((block, module, "relative",
                         math.sqrt(d2) / math.sqrt(b2) if b2 > 0 else math.nan))
        for metric, value in acc.lowrank.get((block, module), {}).items():
            rows.append((block, module, metric, value))

    tot_d2 = tot_b2 = 0.0
    for b in blocks:
        mods = {m for bb, m in keys if bb == b}
        groups = {"attn": ("q", "k", "v", "qkv", "o"), "mlp": MLP_ROLES,
                  "total": tuple(mods)}
        for module in _BLOCK_ORDER:
            if module in groups:
                members = [m for m in groups[module] if m in mods]
                if not members:
                    continue
                emit(b, module, sum(acc.d2[(b, m)] for m in members),
                     sum(acc.b2[(b, m)] for m in members))
            elif module in mods:
                emit(b, module, acc.d2[(b, module)], acc.b2[(b, module)])
        tot_d2 += sum(acc.d2[(b, m)] for m in mods)
        tot_b2 += sum(acc.b2[(b, m)] for m in mods)
    top = {m for bb, m in keys if bb is None}
    for module in _TOP_ORDER:
        if module in top:
            emit(None, module, acc.d2[(None, module)], acc.b2[(None, module)])
            tot_d2 += acc.d2[(None, module)]
            tot_b2 += acc.b2[(None, module)]
    if keys:
        emit(None, "total", tot_d2, tot_b2)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["block"] = df["block"].astype("Int64")
    return df


# --------------------------------------------------------------------------- full checkpoints


@dataclass
class _Item:
    """One base/SFT tensor pair and where its change goes."""

    slot: _Slot
    base: str | None
    sft: str | None
    fused: bool = False
    vocab: bool = False


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
            lst = [n for n in lst if _classify(n, spec) is not None]
            if lst:
                other = "SFT" if which == "base" else "base"
                raise SftscopeError(
                    f"{len(lst)} tensor(s) are in the {which} checkpoint but not in the {other} "
                    f"one (first: {lst[0]}); the checkpoints are different architectures"
                )
    for n in names:
        slot = _classify(n, spec)
        info = base.tensors[n]
        if slot is None or info.dtype not in _FLOAT_DTYPES:
            skipped.append(n)
            continue
        items.append(_Item(slot, n, n if sft is not None else None,
                           fused=slot.module == "qkv"
                           and _fused_split_ok(spec, base.config, info.shape),
                           vocab=slot.module in _VOCAB_MODULES))
    # The output head: tied heads are the embedding, counted once under ``embed``.
    tied_b = base.tied
    tied_s = sft.tied if sft is not None else tied_b
    if not (tied_b and tied_s):
        src_b = embed_w if tied_b else head_w
        src_s = (embed_w if tied_s else head_w) if sft is not None else None
        if src_b not in base.tensors or (sft is not None and src_s not in sft.tensors):
            raise SftscopeError(f"no LM head ({head_w}) and no embedding ({embed_w}) found; the "
                                f"architecture map does not fit {base.model_type!r}")
        items.append(_Item(_Slot(None, "lm_head", "weight"), src_b, src_s, vocab=True))
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


def _n_blocks(ckpt: Checkpoint, items: list[_Item]) -> int:
    found = [it.slot.block for it in items if it.slot.block is not None]
    cfg = n_layers(ckpt.config)
    return max(cfg or 0, (max(found) + 1) if found else 0)


def _full_pass(base: Checkpoint, sft: Checkpoint | None, items: list[_Item], acc: _Acc,
               low_rank: bool, top_k: int, device: str, exact_max: int, max_rank: int,
               timer: Timer) -> None:
    """Stream every tensor pair once; ``sft=None`` computes base norms only (adapter mode).

    All torch ops run single-threaded (``_torch_threads(1)``); the cores are used by worker
    threads instead: streamed norms split over ``_Norms`` workers, SVDs over ``_Spectra``
    workers that overlap with the streaming."""
    threads = torch.get_num_threads()
    norms = _Norms(min(threads, 8))
    spectra = (_Spectra(acc, top_k, device, exact_max, max_rank, threads)
               if low_rank and sft is not None else None)
    try:
        with _torch_threads(1):
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
            _one_pair(base, sft, it, acc, norms, spectra, spec)
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)


def _one_pair(base: Checkpoint, sft: Checkpoint | None, it: _Item, acc: _Acc, norms: _Norms,
              spectra: _Spectra | None, spec: ArchSpec) -> None:
    """Read one tensor pair and add its change to the accumulators (its spectrum is queued)."""
    b = base.get(it.base)
    s = sft.get(it.sft) if sft is not None else None
    key = (it.slot.block, it.slot.module)
    if s is not None and it.vocab and s.shape[0] > b.shape[0]:
        added = s[b.shape[0]:]
        acc.add((None, f"{it.slot.module}_added"), norms.sq(added), 0.0)
        acc.added_rows[f"{it.slot.module}_added"] = max(
            acc.added_rows[f"{it.slot.module}_added"], added.shape[0])
        s = s[: b.shape[0]]
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
                spectra.submit(pkey, dp, d2)
        return
    if (spectra is not None and s is not None and b.dim() == 2 and it.slot.param == "weight"
            and it.slot.module != "other"):
        d = s.to(torch.float64)
        d.sub_(b)
        d2 = _sq64(d)
        acc.add(key, d2, norms.sq(b))
        spectra.submit(key, d, d2)
    elif s is not None:
        acc.add(key, *norms.sq_diff(s, b))
    else:
        acc.add(key, 0.0, norms.sq(b))


# --------------------------------------------------------------------------- adapters


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern rule: a key matches when the module name ends with it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass
class _LoraModule:
    path: str  # canonical module path (relative to the *ForCausalLM object)
    a: str  # tensor names in the adapter file
    b: str
    embedding: bool
    bias: str | None = None  # lora_B bias (lora_bias=True): the module's bias moves by s * bias


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, _TensorInfo],
                                         list[_LoraModule], list[str]]:
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise SftscopeError(f"adapter folder {folder} has no adapter_config.json; point "
                            f"--adapter at a PEFT LoRA folder (adapter_config.json + "
                            f"adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SftscopeError(f"{cfg_path} is not valid JSON ({e.msg})") from e
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise SftscopeError(f"{folder} is a {ptype} adapter; --adapter supports LoRA only")
    if cfg.get("use_dora"):
        raise SftscopeError(f"{folder} is a DoRA adapter (use_dora): its change depends on the "
                            f"base weights' column norms; merge it and compare with --sft")
    wfile = folder / "adapter_model.safetensors"
    if not wfile.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise _pickle_error(folder, pickles[0])
        raise SftscopeError(f"adapter folder {folder} has no adapter_model.safetensors")
    tensors = _read_header(wfile)
    factors: dict[str, dict[str, str]] = defaultdict(dict)
    other: list[str] = []
    for name in tensors:
        m = re.match(r"^(.*)\.lora_(A|B)(?:\.[^.]+)?\.weight$", name) or re.match(
            r"^(.*)\.lora_embedding_(A|B)(?:\.[^.]+)?$", name)
        mb = re.match(r"^(.*)\.lora_B(?:\.[^.]+)?\.bias$", name)  # PEFT lora_bias=True
        if m:
            factors[m.group(1)][m.group(2) + ("e" if "embedding" in name else "")] = name
        elif mb:
            factors[mb.group(1)]["bias"] = name
        else:
            other.append(name)
    mods: list[_LoraModule] = []
    for path, f in sorted(factors.items()):
        emb = "Ae" in f or "Be" in f
        a, b = (f.get("Ae"), f.get("Be")) if emb else (f.get("A"), f.get("B"))
        if a is None or b is None:
            raise SftscopeError(f"adapter {wfile} has only one LoRA factor of {path}; "
                                f"the file is incomplete")
        mods.append(_LoraModule(_canonical(path, None), a, b, emb, f.get("bias")))
    if not mods:
        raise SftscopeError(f"adapter {wfile} holds no LoRA factors (lora_A/lora_B)")
    return cfg, tensors, mods, other


def _adapter_spec(paths: list[str]) -> ArchSpec:
    """The registered spec whose block paths fit the adapted modules best (no base given)."""
    best, score = None, 0
    for spec in REGISTRY:
        roles = spec.module_roles()
        pat = re.compile(rf"^{re.escape(spec.blocks)}\.\d+\.(.+)$")
        n = sum(1 for p in paths if (m := pat.match(p)) and m.group(1) in roles)
        if n > score:
            best, score = spec, n
    if best is None:
        return _infer_spec([p + ".weight" for p in paths], SimpleNamespace(model_type=""))
    return best


def _adapter_pass(adapter: Path, base: Checkpoint | None, acc: _Acc, low_rank: bool,
                  top_k: int, device: str, notes: list[str], timer: Timer) -> tuple[int, dict]:
    """Change of every adapted module from its LoRA factors, never forming ``B A``."""
    from safetensors import safe_open

    cfg, tensors, mods, other = _read_adapter(adapter)
    spec = base.spec if base is not None else _adapter_spec([m.path for m in mods])
    for m in mods:
        m.path = _canonical(m.path, spec)
    config = base.config if base is not None else None
    r_default = int(cfg.get("r", 8))
    alpha_default = float(cfg.get("lora_alpha", r_default))
    rslora = bool(cfg.get("use_rslora", False))
    if other:
        notes.append(f"adapter: {len(other)} non-LoRA tensor(s) (e.g. {other[0]}: "
                     f"modules_to_save or trainable tokens) are not counted")
    blocks: set[int] = set()
    wfile = adapter / "adapter_model.safetensors"
    scales: dict[str, float] = {}
    try:
        handle = safe_open(str(wfile), framework="pt")
    except Exception as e:
        raise SftscopeError(f"could not read {wfile} ({type(e).__name__}: {str(e)[:160]}); the "
                            f"file is corrupt: re-save the adapter") from e
    with handle as f:
        for mod in track(mods, "weights: adapter modules"):
            a = f.get_tensor(mod.a).to(torch.float64)  # (r, in) or (r, vocab) for embeddings
            b = f.get_tensor(mod.b).to(torch.float64)  # (out, r) or (dim, r)
            r = a.shape[0]
            if b.shape[1] != r:
                raise SftscopeError(f"adapter {mod.path}: lora_A has rank {r} but lora_B "
                                    f"{b.shape[1]}; the adapter is corrupt")
            rank = int(_pattern(cfg.get("rank_pattern"), mod.path, r_default))
            if rank != r:
                raise SftscopeError(f"adapter {mod.path}: adapter_config.json says rank {rank} "
                                    f"but the tensors have rank {r}")
            alpha = float(_pattern(cfg.get("alpha_pattern"), mod.path, alpha_default))
            scale = alpha / math.sqrt(r) if rslora else alpha / r
            scales[mod.path] = scale
            slot = _classify(mod.path + ".weight", spec) or _Slot(None, "other", "weight")
            if slot.block is not None:
                blocks.add(slot.block)
            if base is not None:
                _check_adapter_shape(base, mod, slot, a, b, spec)
            parts = {slot.module: b}
            if slot.module == "qkv" and config is not None:
                shape = base.tensors[mod.path + ".weight"].shape
                if _fused_split_ok(spec, config, shape):
                    parts = split_fused_qkv(b, replace(spec, conv1d=False), config)
            gram_a = a @ a.T  # r x r
            ra = torch.linalg.qr(a.T, mode="r").R if low_rank else None
            bias_parts: dict[str, Tensor] = {}
            if mod.bias is not None:
                bias = f.get_tensor(mod.bias).to(torch.float64)
                bias_parts = {slot.module: bias}
                if len(parts) > 1:
                    bias_parts = split_fused_qkv(bias, replace(spec, conv1d=False), config)
            for role, bp in parts.items():
                bp = bp.contiguous()
                d2 = scale**2 * float((bp.T @ bp * gram_a).sum())  # tr((B^T B)(A A^T))
                key = (slot.block, role)
                bias_d2 = scale**2 * _sq64(bias_parts[role]) if role in bias_parts else 0.0
                acc.add(key, d2 + bias_d2, 0.0)
                if low_rank:
                    with timer("low_rank"):
                        rb = torch.linalg.qr(bp, mode="r").R
                        core = rb @ ra.T  # B A = Qb (Rb Ra^T) Qa^T: same singular values
                        sigma = torch.linalg.svdvals(core.to(device)).cpu() * abs(scale)
                        acc.lowrank[key] = spectrum_metrics(
                            sigma, d2, top_k, min(bp.shape[0], a.shape[1]))
    n_blocks = (max(blocks) + 1) if blocks else 0
    info = {"rank": r_default, "lora_alpha": alpha_default, "use_rslora": rslora,
            "modules": len(mods), "scales": sorted(set(scales.values()))}
    return n_blocks, info


def _check_adapter_shape(base: Checkpoint, mod: _LoraModule, slot: _Slot, a: Tensor,
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
    timer = Timer()
    notes: list[str] = []
    acc = _Acc()
    opened: list[Checkpoint] = []
    try:
        with timer("plan"):
            # Every path first (a typo fails at once), then configs and headers.
            b_dir = resolve_source(base, "base") if base is not None else None
            s_dir = resolve_source(sft, "SFT") if sft is not None else None
            a_dir = resolve_source(adapter, "adapter") if adapter is not None else None
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
                with _torch_threads(1):  # r x r problems: threads only add overhead
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
    )
    return df


def run_weights(
    config: WeightsConfig | str | os.PathLike,
    base: str | os.PathLike | None = None,
    sft: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    **options: Any,
) -> pd.DataFrame:
    """``weight_change`` plus its run folder: ``out/weights.<fmt>`` and ``out/run.json``
    (atomic writes; what ``sftscope weights`` does). Takes a :class:`WeightsConfig`, or
    ``(out, base, sft, adapter, **options)``."""
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
    with timer("total"):
        table = weight_change(cfg.base, cfg.sft, cfg.adapter, low_rank=cfg.low_rank,
                              top_k=cfg.top_k, device=device, max_rank=cfg.max_rank,
                              exact_max=cfg.exact_max)
    with timer("write"):
        io.write_tables(table, cfg.out, "weights", cfg.formats)
    attrs = dict(table.attrs)
    timings = {**attrs.pop("timings", {}), **timer.seconds}
    finish_run(cfg.out, io.run_record(
        "weights", cfg.record(), n_blocks=attrs.pop("n_blocks", 0), timings=timings, **attrs))
    return table
