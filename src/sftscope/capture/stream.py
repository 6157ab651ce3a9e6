"""Streamed capture: one forward pass per batch, each layer reduced on the device as it passes.

Kept per model: pooled vectors (masked mean and last real token) ``[L+1, N, D]`` and, for the
first ``n_token`` samples, per-sample token-level metrics (prompt entropy, sparsity, curvature)
``[L+1, n_token]``. Per-token states of the dataset are never held. Results are cached as
safetensors keyed by model, data and options; an interrupted capture resumes at the last
checkpointed batch.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sftscope import metrics as M
from sftscope.capture.hooks import hidden_state_hooks, inner_model
from sftscope.errors import SftscopeError
from sftscope.io import atomic_path, stable_hash
from sftscope.load.arch import get_blocks
from sftscope.load.data import TokenizedSet, iter_batches
from sftscope.load.models import input_device
from sftscope.metrics.entropy import to_f64
from sftscope.progress import track

TOKEN_METRICS = ("prompt_entropy", "sparsity", "curvature")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CaptureConfig:
    """What a capture computes; everything here enters the cache key."""

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
    checkpoint_every_s: float = 60.0

    def key_fields(self) -> dict:
        d = asdict(self)
        d.pop("checkpoint_every_s")
        d.pop("batch_size")
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
    """Per-layer reductions of one model over one tokenized dataset."""

    pooled_mean: torch.Tensor          # [L+1, N, D] float32
    pooled_last: torch.Tensor          # [L+1, N, D] float32
    token: dict[str, torch.Tensor]     # name -> [L+1, n_token] float64 (NaN = not defined)
    n_tokens: torch.Tensor             # [N] real tokens per sample
    info: dict = field(default_factory=dict)

    @property
    def n_states(self) -> int:
        return int(self.pooled_mean.shape[0])

    def pooled(self, how: str = "mean") -> torch.Tensor:
        return self.pooled_last if how == "last" else self.pooled_mean

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"pooled_mean": self.pooled_mean, "pooled_last": self.pooled_last,
               "n_tokens": self.n_tokens}
        out.update({f"token.{k}": v for k, v in self.token.items()})
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], info: dict) -> CaptureResult:
        token = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("token.")}
        return cls(t["pooled_mean"], t["pooled_last"], token, t["n_tokens"], info)


def cache_key(model_fp: dict, tok: TokenizedSet, cfg: CaptureConfig) -> str:
    """Identify a capture by model fingerprint, exact token ids and options."""
    return stable_hash({"model": model_fp, "ids": stable_hash(tok.input_ids, 32),
                        "cfg": cfg.key_fields(), "v": FORMAT_VERSION}, 20)


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"sftscope": json.dumps(meta)})


def load_cached(path: Path) -> CaptureResult | None:
    """A finished capture from ``path``, or None when there is none (or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("sftscope", "{}"))
        return CaptureResult.from_tensors(load_file(str(path)), meta)
    except Exception:  # a corrupt cache is recomputed, never trusted
        return None


class _Reducer:
    """Receives hidden states from the hooks and reduces them on their device."""

    def __init__(self, n_states: int, n: int, dim: int, n_token: int,
                 opts: M.MetricOptions, include_padding: bool = False) -> None:
        self.pooled_mean = torch.zeros(n_states, n, dim, dtype=torch.float32)
        self.pooled_last = torch.zeros(n_states, n, dim, dtype=torch.float32)
        self.token = {k: torch.full((n_states, n_token), float("nan"), dtype=torch.float64)
                      for k in M.token_metric_names(opts)}
        self.n_token = n_token
        self.opts = opts
        self.include_padding = include_padding
        self._batch: dict[int, tuple] = {}
        # per layer: samples sharing one sparsity threshold (reference: groups of 10)
        self._groups: dict[int, M.SparsityGroups] = {}
        self.dtype: torch.dtype | None = None  # the precision the states are computed in

    @property
    def pending(self) -> bool:
        """Some sparsity group is only partly seen (a checkpoint now would lose it)."""
        return any(g.pending for g in self._groups.values())

    def start(self, mask: torch.Tensor, index: list[int]) -> None:
        self.mask = mask
        self.index = torch.tensor(index)
        self.tok_rows = [i for i, s in enumerate(index) if s < self.n_token]
        self._masks: dict[torch.device, tuple] = {}
        self._batch = {}

    def _mask_on(self, device: torch.device):
        if device not in self._masks:
            m = self.mask.to(device)
            last = (m * torch.arange(m.shape[1], device=device)).argmax(1)
            self._masks[device] = (m, m.sum(1).clamp(min=1), last)
        return self._masks[device]

    def __call__(self, j: int, h: torch.Tensor) -> None:
        self.dtype = h.dtype
        m, count, last = self._mask_on(h.device)
        # torch.where, not a product: a padded position may hold NaN (NaN * 0 = NaN).
        hf = torch.where(m[..., None].bool(), h.float(), 0.0)
        mean = hf.sum(1) / count[:, None].to(hf.dtype)
        lastv = hf[torch.arange(hf.shape[0], device=h.device), last]
        tok = None
        if self.tok_rows:
            rows = torch.tensor(self.tok_rows, device=h.device)
            # one float64 copy of the token rows feeds all three metrics
            hr, ms = h.index_select(0, rows), m.index_select(0, rows)
            hs = to_f64(hr)
            if self.include_padding:
                ms = torch.ones_like(ms)
            tok = M.token_metrics_batch(hs, ms, self.opts)
            if self.opts.sparsity_group > 1:
                grp = self._groups.setdefault(j, M.SparsityGroups(self.opts, self.n_token))
                tok["sparsity"] = grp.add(self.index[self.tok_rows], hr, ms)
        self._batch[j] = (mean, lastv, tok)

    def finish(self) -> None:
        """Move this batch's reductions to the CPU buffers (one copy per layer)."""
        tok_idx = self.index[self.tok_rows] if self.tok_rows else None
        for j, (mean, lastv, tok) in self._batch.items():
            self.pooled_mean[j, self.index] = mean.cpu()
            self.pooled_last[j, self.index] = lastv.cpu()
            if tok is not None:
                for name, val in tok.items():
                    # (indices, values) for samples whose sparsity group just completed
                    idx, v = val if isinstance(val, tuple) else (tok_idx, val)
                    self.token[name][j, idx] = v.detach().to("cpu", torch.float64)
        self._batch = {}


@torch.no_grad()
def capture(model, tok: TokenizedSet, cfg: CaptureConfig, pad_id: int,
            cache_path: Path | None = None, label: str = "model") -> CaptureResult:
    """Run ``model`` over ``tok`` once, reducing every hidden state as it passes.

    With ``cache_path``: return the cached result if present; otherwise checkpoint partial
    progress next to it (``.partial``) and resume from it after an interruption.
    """
    if cache_path is not None and (hit := load_cached(cache_path)) is not None:
        hit.info["cached"] = True
        return hit
    n, n_token = len(tok), min(cfg.n_token, len(tok))
    if n == 0:
        raise SftscopeError("no samples to capture")
    n_blocks = len(get_blocks(model))
    dim = int(model.get_input_embeddings().weight.shape[1])
    red = _Reducer(n_blocks + 1, n, dim, n_token, cfg.metric_options(), cfg.include_padding)
    n_batches = (n + cfg.batch_size - 1) // cfg.batch_size
    start = 0
    partial = cache_path.with_suffix(".partial.safetensors") if cache_path else None
    if partial is not None and (state := load_cached(partial)) is not None:
        start = int(state.info.get("next_batch", 0))
        red.pooled_mean, red.pooled_last, red.token = (state.pooled_mean, state.pooled_last,
                                                      state.token)
    device = input_device(model)
    run = inner_model(model)
    t0 = last_ckpt = time.perf_counter()
    with hidden_state_hooks(model, red):
        batches = iter_batches(tok, cfg.batch_size, pad_id, side="right", start=start)
        for b, batch in enumerate(track(batches, f"capture {label}", total=n_batches - start),
                                  start=start):
            red.start(batch.attention_mask, batch.index)
            run(input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device), use_cache=False)
            red.finish()
            if partial is not None and not red.pending \
                    and time.perf_counter() - last_ckpt > cfg.checkpoint_every_s:
                _checkpoint(partial, red, tok, b + 1)
                last_ckpt = time.perf_counter()
    n_tokens = torch.tensor([len(x) for x in tok.input_ids], dtype=torch.long)
    result = CaptureResult(red.pooled_mean, red.pooled_last, red.token, n_tokens,
                           {"seconds": time.perf_counter() - t0, "resumed_from_batch": start,
                            "n_batches": n_batches, "cached": False,
                            "compute_dtype": str(red.dtype).removeprefix("torch.")
                            if red.dtype is not None else None})
    if cache_path is not None:
        _save(cache_path, result.tensors(), {k: v for k, v in result.info.items()
                                             if k != "cached"})
        if partial is not None:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    return result


def _checkpoint(path: Path, red: _Reducer, tok: TokenizedSet, next_batch: int) -> None:
    n_tokens = torch.tensor([len(x) for x in tok.input_ids], dtype=torch.long)
    state = CaptureResult(red.pooled_mean, red.pooled_last, red.token, n_tokens)
    _save(path, state.tensors(), {"next_batch": next_batch})
