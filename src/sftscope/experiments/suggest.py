"""``sftscope suggest``: propose a LoRA mask before any training, with the reason.

The paper chose its Mid-Block range (20-80 % of depth) by hand and lists an automatic choice of
the depth range as a limitation. This module computes cheap per-segment signals and turns each
into a mask. Every method gives one score per segment, **higher = a better place to tune**:

``pair`` (needs an SFT model of the same base)
    How much the pair changed *inside* each segment, so change made further down is not
    counted again: the growth of ``1 - CKA`` from the segment's input hidden state (``j = lo``)
    to its output (``j = hi``), the growth of the relative mean shift over the same span, and
    the mean weight change ``attn relative`` of its blocks (``weights.weight_change``). Each
    signal is clipped at 0, divided by its largest segment value, and the three are averaged.
    The paper (and every pair it measured) shows the largest change in the top ~20 % (CKA drop,
    J-shaped weight change), that this is where forgetting comes from, and that tuning the top
    segment alone is the worst mask (OLMo2-7B ``00001`` 0.135 vs ``11111`` 0.28). So the pair
    method reads a top-segment change as output remapping, never as the place to tune: the
    top segment is not eligible for it (``edges=allow`` lifts this).
``angular`` (base model alone)
    The angular distance ``arccos(cos(h_j, h_{j+1})) / pi`` between consecutive hidden states,
    per token (the first position, an attention sink with outsized norms, is skipped), averaged
    over tokens and samples, then over the blocks of a segment. Layer-pruning work (Gromov et
    al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers") removes blocks with a
    *small* distance with little loss: they barely change the residual stream. Direction chosen
    here: a large distance = a block that does work = a candidate to tune; a small distance =
    near-identity, not worth the budget. With the edges excluded (below) this picks the
    busiest interior segment, usually the one just above the bottom, which is where the paper's
    best masks sit (``01000``, ``01100``, ``01110``); the near-identity deep-middle blocks that
    pruning removes gave only baseline scores in the paper (7B ``00010`` ~0.27).
``gradient`` (base model alone, LoRA-free)
    The Frobenius norm of the gradient of the task loss (completion-only: prompt tokens are
    masked out when the data has prompt/answer fields) with respect to the attention projection
    weights (q, k, v, o or fused qkv) of each block, over a few batches: the gradient of the
    mean token loss of all sampled texts (accumulated, so directions that disagree between
    batches cancel), averaged over a segment's blocks. A large norm = the loss is sensitive
    there = a candidate to tune.
``combined``
    The rank average of the available methods: each method's segment scores become ranks
    scaled to [0, 1] (1 = best), and the mean over methods is the score. ``auto`` = combined.

From scores to a mask (the same rule for every method):

1. Edges: with ``K >= 3`` segments the bottom and top segments are excluded (the paper found
   both edges worst at every scale and at K = 3, 5 and 10), unless the signal is overwhelming:
   the edge's score is at least ``edge_factor`` (default 3) times the best interior score.
   ``combined`` admits an edge only when every component method does. ``edges=allow`` never
   excludes, ``edges=exclude`` always does.
2. ``pick=run`` (default): start at the best eligible segment and grow a contiguous run, one
   neighbour at a time (the better eligible one), while that neighbour scores at least
   ``extend`` (default 0.75) times the best segment, up to ``max_active`` segments (default 2).
   ``pick=top``: the ``max_active`` best eligible segments, contiguous or not.
3. A flat signal (every score 0, e.g. an SFT identical to its base) falls back to the
   segment whose centre is nearest 30 % of depth (the paper's best 7B mask ``01000``), and
   the reason says so.

Files: ``suggest.json`` (mask, method, reason, every method's proposal and the rule settings),
``suggest.csv`` (per-segment scores: method, signal, segment, blocks, depth, value, score,
eligible, chosen) and ``run.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sftscope import metrics as M
from sftscope.capture.engine import run_hooked
from sftscope.config.commands import SuggestConfig
from sftscope.errors import SftscopeError
from sftscope.experiments.context import Models, RunContext
from sftscope.experiments.weights import weight_change
from sftscope.io import Timer, run_record, write_json, write_table
from sftscope.load import data as D
from sftscope.load.arch import arch_for, get_blocks, n_layers
from sftscope.load.data import iter_batches
from sftscope.load.models import (
    LoadOptions,
    check_adapter_base,
    check_pair,
    check_tokenizers,
    fingerprint,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
)
from sftscope.load.runtime import model_bytes, release
from sftscope.load.sources import source_kind
from sftscope.progress import plan, stage, staged, track
from sftscope.runs import check_out
from sftscope.segments import block_text, segment_bounds

METHODS = ("pair", "angular", "gradient", "combined")
CHOICES = ("auto", *METHODS)
SCORE_COLUMNS = ["method", "signal", "segment", "first_block", "last_block", "depth", "value",
                 "score", "eligible", "chosen"]
FALLBACK_DEPTH = 0.3


@dataclass
class Proposal:
    """One method's mask and why."""

    method: str
    mask: str
    blocks: list[int]
    reason: str


@dataclass
class Suggestion:
    """The proposed mask, the method that proposed it, per-segment scores and the reason.

    ``scores`` is the long table of ``suggest.csv`` (every method and signal); ``proposals``
    holds every computed method's own mask (``sweep --validate-suggest`` ranks each).
    """

    mask: str
    method: str
    scores: pd.DataFrame
    reason: str
    proposals: dict[str, Proposal] = field(default_factory=dict)
    n_blocks: int = 0
    notes: list[str] = field(default_factory=list)

    def method_scores(self, method: str | None = None) -> pd.DataFrame:
        """Per-segment scores of one method (default: the proposing one)."""
        m = method or self.method
        return self.scores[(self.scores["method"] == m) & (self.scores["signal"] == "score")]


# ----------------------------------------------------------------------------- validation


def methods_to_run(cfg: SuggestConfig) -> list[str]:
    """The signal methods a config needs (combined/auto: every one the inputs allow)."""
    if cfg.method in ("auto", "combined"):
        return (["pair"] if cfg.sft else []) + ["angular", "gradient"]
    return [cfg.method]


# ----------------------------------------------------------------------------- selection


def eligible_segments(scores: np.ndarray, method: str, edges: str = "auto",
                      edge_factor: float = 3.0) -> np.ndarray:
    """Which segments a method may propose (the edge rule of the module docstring)."""
    k = len(scores)
    ok = np.ones(k, dtype=bool)
    if edges == "allow" or k < 3:
        return ok
    interior = scores[1:-1]
    best_in = float(np.nanmax(interior)) if interior.size else 0.0
    for e in (0, k - 1):
        if edges == "exclude" or (method == "pair" and e == k - 1):
            ok[e] = False
            continue
        s = float(scores[e]) if np.isfinite(scores[e]) else 0.0
        ok[e] = s > 0 and s >= edge_factor * best_in
    return ok


def _fallback_segment(k: int) -> int:
    centres = [(i + 0.5) / k for i in range(k)]
    return int(np.argmin([abs(c - FALLBACK_DEPTH) for c in centres]))


def prior_mask(k: int) -> str:
    """The prior-only proposal: the one-segment mask whose segment centre is nearest
    ``FALLBACK_DEPTH`` of depth (the paper's best 7B mask; what a flat signal falls back to)."""
    return _mask([_fallback_segment(k)], k)


def choose_segments(scores: np.ndarray, eligible: np.ndarray, max_active: int = 2,
                    pick: str = "run", extend: float = 0.75) -> tuple[list[int], str]:
    """Segments to tune from per-segment scores, and a phrase saying why."""
    k = len(scores)
    s = np.where(np.isfinite(scores), scores, 0.0)
    cand = [i for i in range(k) if eligible[i]]
    if not cand or float(np.max(s[cand])) <= 0:
        i = _fallback_segment(k)
        return [i], (f"the signal is flat (no eligible segment scores above 0), so it falls "
                     f"back to segment {i} (centre nearest {FALLBACK_DEPTH:.0%} of depth, the "
                     f"paper's best 7B mask)")
    best = max(cand, key=lambda i: (s[i], -i))
    if pick == "top":
        chosen = sorted(sorted(cand, key=lambda i: (-s[i], i))[:max_active])
        chosen = [i for i in chosen if s[i] > 0] or [best]
        return chosen, (f"the {len(chosen)} best eligible segment(s) "
                        f"({', '.join(f'{i}: {s[i]:.2f}' for i in chosen)})")
    run = [best]
    why = f"segment {best} scores highest ({s[best]:.2f})"
    stop = ""
    while len(run) < max_active:
        nbrs = [i for i in (run[0] - 1, run[-1] + 1) if 0 <= i < k and eligible[i]]
        if not nbrs:
            stop = "no eligible neighbour"
            break
        nb = max(nbrs, key=lambda i: (s[i], -i))
        if s[nb] < extend * s[best]:
            stop = (f"its best eligible neighbour, segment {nb}, scores {s[nb]:.2f} < "
                    f"{extend:g} x {s[best]:.2f}")
            break
        run = sorted([*run, nb])
        why += f"; neighbour segment {nb} scores {s[nb]:.2f} >= {extend:g} x best, so it joins"
    if stop and len(run) < max_active:
        why += f"; {stop}, so the run stops at {len(run)} segment(s)"
    return run, why


def _mask(segs: list[int], k: int) -> str:
    return "".join("1" if i in segs else "0" for i in range(k))


def _blocks(segs: list[int], bounds: list[tuple[int, int]]) -> list[int]:
    return [b for i in segs for b in range(*bounds[i])]


def _normalise(v: np.ndarray) -> np.ndarray:
    """Clip at 0 and divide by the largest value (all zeros stay zeros)."""
    v = np.where(np.isfinite(v), np.maximum(v, 0.0), 0.0)
    top = float(v.max()) if v.size else 0.0
    return v / top if top > 0 else v


def _ranks01(v: np.ndarray) -> np.ndarray:
    """Average ranks scaled to [0, 1] (1 = the highest score)."""
    from scipy.stats import rankdata

    v = np.where(np.isfinite(v), v, -np.inf)
    if v.size < 2:
        return np.ones_like(v, dtype=float)
    return (rankdata(v, method="average") - 1) / (v.size - 1)


# ----------------------------------------------------------------------------- signals


class _StateReducer:
    """Hook callback: per-layer pooled means and per-block angular distance of one batch."""

    def __init__(self, n_states: int, n: int, dim: int, angular: bool) -> None:
        self.pooled = torch.zeros(n_states, n, dim, dtype=torch.float32)
        self.ang_sum = torch.zeros(n_states - 1, dtype=torch.float64)
        self.ang_n = torch.zeros(n_states - 1, dtype=torch.float64)
        self.angular = angular
        self.prev: torch.Tensor | None = None

    def start(self, batch) -> None:
        self.batch = batch
        self.index = torch.tensor(batch.index)
        self.prev = None

    def __call__(self, j: int, h: torch.Tensor) -> None:
        mean, _ = self.batch.pool(h)  # padded positions masked with torch.where
        self.pooled[j, self.index] = mean.cpu()
        if not self.angular:
            return
        hf = h.float()
        if self.prev is not None and j > 0:
            prev = self.prev.to(hf.device)  # blocks may sit on several devices
            cos = torch.nn.functional.cosine_similarity(prev, hf, dim=-1, eps=1e-12)
            ang = torch.arccos(cos.clamp(-1.0, 1.0)).double() / math.pi
            tm = self.batch.mask_on(hf.device).clone()
            if tm.shape[1] > 1:  # skip the first real token (attention sink) where others exist
                first = tm.to(torch.int8).argmax(dim=1)
                several = tm.sum(1) > 1
                tm[torch.arange(tm.shape[0], device=tm.device)[several], first[several]] = False
            self.ang_sum[j - 1] += float(torch.where(tm, ang, 0.0).sum())
            self.ang_n[j - 1] += float(tm.sum())
        self.prev = hf

    def finish(self, batch) -> None:
        self.prev = None


def hidden_profile(model, tok, batch_size: int, pad_id: int, angular: bool = True,
                   label: str = "model") -> tuple[torch.Tensor, np.ndarray]:
    """One pass over ``tok``: pooled means ``[L+1, N, D]`` and per-block angular distance
    ``[L]`` (``arccos(cos(h_b, h_{b+1})) / pi``, token-weighted mean; NaN when not asked)."""
    n_blocks = len(get_blocks(model))
    dim = int(model.get_input_embeddings().weight.shape[1])
    red = _StateReducer(n_blocks + 1, len(tok), dim, angular)
    run_hooked(model, tok, batch_size, pad_id, red, description=f"states {label}", label=label)
    ang = (red.ang_sum / red.ang_n.clamp(min=1)).numpy()
    if not angular:
        ang = np.full(n_blocks, np.nan)
    return red.pooled, ang


def _attn_params(model) -> list[list[torch.nn.Parameter]]:
    """Per block, the weights of its attention projections (q, k, v, o or fused qkv)."""
    spec = arch_for(model)
    paths = list(spec.attn.values()) + ([spec.fused_qkv] if spec.fused_qkv else [])
    out = []
    for b, block in enumerate(get_blocks(model, spec)):
        ps = []
        for p in paths:
            try:
                ps.append(block.get_submodule(p).weight)
            except AttributeError:
                continue
        if not ps:
            raise SftscopeError(f"block {b} of {type(model).__name__} has none of the attention "
                                f"projections {', '.join(paths) or '(none mapped)'}; the gradient "
                                f"method needs them (use --method angular or pair)")
        out.append(ps)
    return out


def gradient_profile(model, tok, batch_size: int, pad_id: int) -> tuple[np.ndarray, int]:
    """Per-block norm of the gradient of the mean completion-token loss over ``tok`` with
    respect to the attention projection weights; also the number of loss tokens."""
    params = _attn_params(model)
    flat = [p for ps in params for p in ps]
    saved = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for p in flat:
        p.requires_grad_(True)
        p.grad = None

    def n_targets(i: int) -> int:
        plen = tok.prompt_lengths[i] or 1
        return max(0, len(tok.input_ids[i]) - max(plen, 1))

    total = sum(n_targets(i) for i in range(len(tok)))
    if total == 0:
        raise SftscopeError("the gradient method found no answer tokens to score (every text "
                            "ends where its prompt does); give data with answers")
    device = input_device(model)
    n_batches = (len(tok) + batch_size - 1) // batch_size
    try:
        for batch in track(iter_batches(tok, batch_size, pad_id), "gradients",
                           total=n_batches):
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            labels = ids.clone()
            labels[mask == 0] = -100
            for r, i in enumerate(batch.index):
                plen = tok.prompt_lengths[i]
                if plen:
                    labels[r, :plen] = -100
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100,
                reduction="sum") / total
            loss.backward()
            del logits, loss
        norms = np.array([math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                        for p in ps if p.grad is not None))
                          for ps in params])
    finally:
        for p in flat:
            p.grad = None
        for p, s in zip(model.parameters(), saved):
            p.requires_grad_(s)
    return norms, total


def pair_layer_signals(pooled_b: torch.Tensor, pooled_s: torch.Tensor) -> pd.DataFrame:
    """Per hidden state ``j``: ``1 - CKA`` and relative mean shift between base and SFT."""
    rows = []
    for j in range(pooled_b.shape[0]):
        zb, zs = pooled_b[j], pooled_s[j]
        c = M.cka(zb, zs)
        rows.append({"layer": j, "one_minus_cka": 1.0 - c if np.isfinite(c) else np.nan,
                     "mean_shift_relative": M.mean_shift_relative(zb, zs)})
    return pd.DataFrame(rows)


def segment_table(method: str, signals: dict[str, np.ndarray], score: np.ndarray,
                  bounds: list[tuple[int, int]], n_blocks: int) -> pd.DataFrame:
    """Long rows (method, signal, segment, blocks, depth, value, score) for one method."""
    rows = []
    for name, vals in {**signals, "score": score}.items():
        norm = score if name == "score" else _normalise(np.asarray(vals, float))
        for i, (lo, hi) in enumerate(bounds):
            rows.append({"method": method, "signal": name, "segment": i, "first_block": lo,
                         "last_block": hi - 1, "depth": (lo + hi) / 2 / n_blocks,
                         "value": float(vals[i]), "score": float(norm[i])})
    return pd.DataFrame(rows)


def _per_segment(per_block: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    return np.array([float(np.nanmean(per_block[lo:hi])) for lo, hi in bounds])


def _growth(per_state: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
    """Change of a per-hidden-state signal from a segment's input (j = lo) to its output."""
    return np.array([float(per_state[hi] - per_state[lo]) for lo, hi in bounds])


# ----------------------------------------------------------------------------- main


def _load(spec: str, revision: str | None, cfg: SuggestConfig, base: str | None = None):
    return load_model(spec, LoadOptions(revision=revision, dtype=cfg.dtype, device=cfg.device,
                                        device_map=cfg.device_map, base=base,
                                        base_revision=cfg.base_revision,
                                        allow_other_base=cfg.allow_other_base))


def _free(model) -> None:
    nbytes = model_bytes(model)
    del model
    release(nbytes)


def _describe(method: str, segs: list[int], why: str, bounds, n_blocks: int,
              eligible: np.ndarray, scores: np.ndarray) -> str:
    k = len(bounds)
    blocks = _blocks(segs, bounds)
    lo_d = bounds[segs[0]][0] / n_blocks
    hi_d = bounds[segs[-1]][1] / n_blocks
    what = {"pair": "localized base-to-SFT change (1-CKA growth, mean-shift growth, weight "
                    "change)",
            "angular": "angular distance between consecutive hidden states of the base",
            "gradient": "task-loss gradient norm of the attention projections",
            "combined": "rank average of the methods"}[method]
    span = block_text(blocks, "none")
    text = (f"{method}: {_mask(segs, k)} (blocks {span}, {lo_d:.0%}-{hi_d:.0%} of depth)"
            f" by {what}: {why}")
    excluded = [i for i in range(k) if not eligible[i]]
    if excluded:
        s = np.where(np.isfinite(scores), scores, 0.0)
        parts = []
        for i in excluded:
            where = "bottom" if i == 0 else "top"
            if method == "pair" and i == k - 1:
                why_ex = "the pair method's forgetting zone"
            elif method == "combined":
                why_ex = "not overwhelming in every method"
            else:
                why_ex = "not an overwhelming signal"
            higher = f", scored {s[i]:.2f}" if s[i] > s[segs].max() else ""
            parts.append(f"{i} ({where}: {why_ex}{higher})")
        text += f"; edge segment(s) excluded: {', '.join(parts)}"
    return text


@dataclass
class _SuggestPlan:
    """What ``suggest`` validated and prepared before any model runs."""

    want: list[str]
    n_blocks: int
    bounds: list[tuple[int, int]]
    tok_states: Any
    tok_grad: Any
    ctx: RunContext  # the models, tokenizer, data, notes and run folder


def _suggest_plan(cfg: SuggestConfig, timer: Timer) -> _SuggestPlan:
    """Validate the models (the pair's fit, for the pair method) and prepare the texts each
    method needs."""
    if cfg.out is not None:
        check_out(cfg.out, "suggest", cfg, overwrite=cfg.overwrite)
    want = methods_to_run(cfg)
    ctx = RunContext("suggest", Path(cfg.out) if cfg.out is not None else None,
                     Models.pair(cfg.base, cfg.sft, cfg.base_revision, cfg.sft_revision)
                     if "pair" in want else Models.single(cfg.base, cfg.base_revision, "base"))
    notes = ctx.notes
    n_samples = cfg.limit if cfg.limit is not None else 64
    with timer("validate"):
        base_cfg = load_config(cfg.base, cfg.base_revision)
        n_blocks = n_layers(base_cfg)
        if n_blocks is None:
            raise SftscopeError(f"{cfg.base}: the config names no number of blocks")
        ctx.tokenizer = tokenizer = load_tokenizer(cfg.tokenizer or cfg.base, cfg.base_revision)
        if "pair" in want:
            sft_cfg = load_config(cfg.sft, cfg.sft_revision, base=cfg.base,
                                  base_revision=cfg.base_revision)
            info = check_pair(base_cfg, sft_cfg, cfg.base, cfg.sft,
                              allow_mixed=cfg.allow_mixed_pair)
            check_adapter_base(cfg.sft, cfg.base, cfg.sft_revision,
                               base_revision=cfg.base_revision,
                               allow_other_base=cfg.allow_other_base)
            notes += info.notes
            notes += check_tokenizers(tokenizer, load_tokenizer(
                cfg.sft, cfg.sft_revision, base=cfg.base, base_revision=cfg.base_revision))
    with timer("data"):
        n_need = max(n_samples if ("pair" in want or "angular" in want) else 0,
                     cfg.grad_samples if "gradient" in want else 0)
        _, ctx.tokens, data_notes = cfg.prepare(tokenizer, n=n_need or None)
        tok = ctx.tokens
        notes += data_notes
        tok_states = D.TokenizedSet(tok.input_ids[:n_samples],
                                    tok.prompt_lengths[:n_samples], 0, tok.max_length)
        tok_grad = D.TokenizedSet(tok.input_ids[:cfg.grad_samples],
                                  tok.prompt_lengths[:cfg.grad_samples], 0, tok.max_length)
        if "gradient" in want and not any(tok_grad.prompt_lengths):
            notes.append("the data has no prompt/answer fields: the gradient method uses the "
                         "loss on every token")
    return _SuggestPlan(want, n_blocks, segment_bounds(n_blocks, cfg.segments), tok_states,
                        tok_grad, ctx)


def _base_signals(cfg: SuggestConfig, p: _SuggestPlan, timer: Timer,
                  tables: list[pd.DataFrame], scores: dict[str, np.ndarray]):
    """The base's angular and gradient signals; returns its pooled states (pair method)."""
    want, bounds, n_blocks = p.want, p.bounds, p.n_blocks
    stage("base signals")
    with timer("base"):
        model = _load(cfg.base, cfg.base_revision, cfg)
        try:
            pooled_b = None
            if "pair" in want or "angular" in want:
                pooled_b, ang = hidden_profile(model, p.tok_states, cfg.batch_size, p.ctx.pad_id,
                                               angular="angular" in want, label="base")
            if "angular" in want:
                score = _per_segment(ang, bounds)
                scores["angular"] = score
                tables.append(segment_table("angular", {"angular_distance": score},
                                            _normalise(score), bounds, n_blocks))
            if "gradient" in want:
                gnorm, n_loss = gradient_profile(model, p.tok_grad, cfg.batch_size, p.ctx.pad_id)
                score = _per_segment(gnorm, bounds)
                scores["gradient"] = score
                tables.append(segment_table("gradient", {"grad_norm": score},
                                            _normalise(score), bounds, n_blocks))
                p.ctx.notes.append(f"gradient: {len(p.tok_grad)} texts, {n_loss} loss tokens")
        finally:
            _free(model)
    return pooled_b


def _weight_signal(cfg: SuggestConfig, p: _SuggestPlan, timer: Timer) -> np.ndarray | None:
    """The attention's relative weight change per block (None where it cannot be read)."""
    kinds = (source_kind(cfg.base), source_kind(cfg.sft))
    stage("weight change")
    if "gguf" in kinds or kinds[0] == "adapter":
        p.ctx.notes.append("weights: no weight_change signal (it reads safetensors checkpoints "
                       "and adapters of one; a side is a GGUF or the base an adapter)")
        return None
    with timer("weights"):
        wdf = (weight_change(cfg.base, adapter=cfg.sft, low_rank=False)
               if kinds[1] == "adapter" else
               weight_change(cfg.base, sft=cfg.sft, low_rank=False))
        w = wdf[(wdf["module"] == "attn") & (wdf["metric"] == "relative")]
        w = w[pd.to_numeric(w["block"], errors="coerce").notna()]
        per_block = np.full(p.n_blocks, np.nan)
        for b, v in zip(pd.to_numeric(w["block"]).astype(int), w["value"]):
            if 0 <= b < p.n_blocks:
                per_block[b] = float(v)
        p.ctx.notes.extend(f"weights: {n}" for n in wdf.attrs.get("notes", []))
    return per_block


def _pair_signals(cfg: SuggestConfig, p: _SuggestPlan, pooled_b, timer: Timer,
                  tables: list[pd.DataFrame], scores: dict[str, np.ndarray]) -> None:
    """The pair method: the SFT's pooled states against the base's, and the weight change."""
    stage("sft states")
    with timer("sft"):
        model = _load(cfg.sft, cfg.sft_revision, cfg, base=cfg.base)
        rows = model.get_input_embeddings().weight.shape[0]
        if max(max(s) for s in p.tok_states.input_ids) >= rows:
            raise SftscopeError(f"the data uses token ids the SFT model ({rows} embedding "
                                f"rows) lacks; use the base tokenizer")
        try:
            pooled_s, _ = hidden_profile(model, p.tok_states, cfg.batch_size, p.ctx.pad_id,
                                         angular=False, label="sft")
        finally:
            _free(model)
    per_block = _weight_signal(cfg, p, timer)
    layer = pair_layer_signals(pooled_b, pooled_s)
    sig = {"cka_growth": _growth(layer["one_minus_cka"].to_numpy(float), p.bounds),
           "mean_shift_growth": _growth(layer["mean_shift_relative"].to_numpy(float),
                                        p.bounds)}
    if per_block is not None:
        sig["weight_change"] = _per_segment(per_block, p.bounds)
    score = np.mean([_normalise(v) for v in sig.values()], axis=0)
    scores["pair"] = score
    tables.append(segment_table("pair", sig, score, p.bounds, p.n_blocks))


def _propose(cfg: SuggestConfig, p: _SuggestPlan, tables: list[pd.DataFrame],
             method_scores: dict[str, np.ndarray]) -> tuple[pd.DataFrame, dict[str, Proposal]]:
    """A mask per method (and their rank average), and the per-segment table."""
    bounds, n_blocks, k = p.bounds, p.n_blocks, cfg.segments
    proposals: dict[str, Proposal] = {}
    eligible: dict[str, np.ndarray] = {}
    for m, sc in method_scores.items():
        eligible[m] = eligible_segments(_normalise(sc), m, cfg.edges, cfg.edge_factor)
    if len(method_scores) > 1 or cfg.method in ("auto", "combined"):
        comb = np.mean([_ranks01(v) for v in method_scores.values()], axis=0)
        method_scores["combined"] = comb
        eligible["combined"] = np.logical_and.reduce(list(eligible.values()))
        tables.append(segment_table("combined", {f"rank_{m}": _ranks01(v) for m, v in
                                                 method_scores.items() if m != "combined"},
                                    comb, bounds, n_blocks))
    table = pd.concat(tables, ignore_index=True)
    table["eligible"] = True
    table["chosen"] = False
    for m, sc in method_scores.items():
        norm = sc if m == "combined" else _normalise(sc)
        segs, why = choose_segments(norm, eligible[m], cfg.max_active, cfg.pick, cfg.extend)
        proposals[m] = Proposal(m, _mask(segs, k), _blocks(segs, bounds),
                                _describe(m, segs, why, bounds, n_blocks, eligible[m], norm))
        sel = table["method"] == m
        # the score the rule and the reason use (normalised to the best segment), so that the
        # printed reason and the table cite the same numbers; ``value`` keeps the raw score
        srow = sel & (table["signal"] == "score")
        table.loc[srow, "score"] = table.loc[srow, "segment"].map(lambda i, v=norm: float(v[i]))
        table.loc[sel, "eligible"] = table.loc[sel, "segment"].map(lambda i, e=eligible[m]:
                                                                    bool(e[i]))
        table.loc[sel, "chosen"] = table.loc[sel, "segment"].isin(segs)
    return table[SCORE_COLUMNS], proposals


@staged
def suggest(cfg: SuggestConfig) -> Suggestion:
    """Compute the per-segment signals, propose a mask per method and pick one; write
    ``suggest.json``, ``suggest.csv`` and ``run.json`` when ``cfg.out`` is set."""
    timer = Timer()
    p = _suggest_plan(cfg, timer)
    tables: list[pd.DataFrame] = []
    method_scores: dict[str, np.ndarray] = {}
    plan(3 if "pair" in p.want else 1)  # the base's signals (, the SFT's states, weight change)
    pooled_b = _base_signals(cfg, p, timer, tables, method_scores)
    if "pair" in p.want:
        _pair_signals(cfg, p, pooled_b, timer, tables, method_scores)
    table, proposals = _propose(cfg, p, tables, method_scores)
    chosen = "combined" if cfg.method == "auto" else cfg.method
    if chosen not in proposals:  # a single method asked for by name
        chosen = next(iter(proposals))
    best = proposals[chosen]
    others = [f"{q.method} {q.mask}" for m, q in proposals.items() if m != chosen]
    reason = best.reason + (f" (other methods: {', '.join(others)})" if others else "")
    result = Suggestion(mask=best.mask, method=chosen, scores=table, reason=reason,
                        proposals=proposals, n_blocks=p.n_blocks, notes=p.ctx.notes)
    p.ctx.say_notes()
    if cfg.out is not None:
        _suggest_record(cfg, p, result, timer)
    return result


def _suggest_record(cfg: SuggestConfig, p: _SuggestPlan, result: Suggestion,
                    timer: Timer) -> None:
    """Write suggest.csv, suggest.json and run.json."""
    out, best = Path(cfg.out), result.proposals[result.method]
    models_fp = {"base": fingerprint(cfg.base, cfg.base_revision)}
    if "pair" in p.want:
        models_fp["sft"] = fingerprint(cfg.sft, cfg.sft_revision, base=cfg.base,
                                       base_revision=cfg.base_revision)
    p.ctx.start(SuggestConfig.OUTPUTS)
    for fmt in cfg.formats:
        write_table(result.scores, out / f"suggest.{fmt}")
    write_json(out / "suggest.json", {
        "mask": best.mask, "method": result.method, "blocks": best.blocks,
        "reason": result.reason, "segments": cfg.segments, "n_blocks": p.n_blocks,
        "proposals": {m: asdict(q) for m, q in result.proposals.items()},
        "rule": {"edges": cfg.edges, "edge_factor": cfg.edge_factor, "pick": cfg.pick,
                 "max_active": cfg.max_active, "extend": cfg.extend},
    })
    p.ctx.finish(run_record(
        "suggest", cfg.record(), n_blocks=p.n_blocks,
        models=models_fp, data={"source": cfg.data, "n_states": len(p.tok_states),
                                "n_gradient": len(p.tok_grad)},
        suggestion={"mask": best.mask, "method": result.method}, notes=p.ctx.notes,
        timings=timer.seconds, seeds={"data": cfg.seed}))


def proposal_summary(s: Suggestion) -> list[dict[str, Any]]:
    """One dict per method: method, mask, blocks (for printing and validation tables)."""
    return [{"method": m, "mask": p.mask, "blocks": block_text(p.blocks, "none")}
            for m, p in s.proposals.items()]
