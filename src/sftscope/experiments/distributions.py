"""Output distributions of a pair, depth by depth: KL by depth and the token-shift map.

At hidden state ``j`` a model's lens distribution is ``softmax(head(final_norm(h_j)))``
(:class:`~sftscope.experiments.lens.Lens`; at ``j = L`` the model's own output). At every
scored next-token position (probe's ``--tokens``: every pair of real tokens, or the answers'):

- ``kl_pair(j)`` = KL(P_b,j || P_a,j) = sum_v P_b log(P_b / P_a), natural log, ``a`` the
  reference (the base) and ``b`` the fine-tune: how far the fine-tune's lens reading at depth
  ``j`` is from the base's at the same depth. Exactly 0 where the two states and lenses agree.
- ``kl_to_final(j)`` per model = KL(P_L || P_j): how far depth ``j`` is from the model's output.
- Token shift (URIAL, Lin et al. 2024, "The Unlocking Spell on Base LLMs") at ``j = L``: the
  base's rank ``r`` of the fine-tune's top-1 token: ``unshifted`` r = 1, ``marginal``
  r in {2, 3}, ``shifted`` r > 3; ``shifts.csv`` lists the tokens most often shifted to.

Both models run on each batch, one forward pass each, so both are resident during this pass
(``--no-kl`` keeps probe at one model at a time). Of a batch only the states at the scored
positions are kept, and only until the batch is reduced; the logits go through the lens
``chunk_elements`` at a time. Per-sample sums, so shares of several processes add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sftscope.capture.engine import batches, state_name
from sftscope.capture.hooks import hidden_state_hooks, inner_model
from sftscope.capture.lens import Lens
from sftscope.errors import SftscopeError
from sftscope.load import data as D
from sftscope.load.arch import get_blocks
from sftscope.load.models import check_vocab, input_device, load_model
from sftscope.load.runtime import model_bytes, release
from sftscope.metrics.stats import cluster_ratio_ci
from sftscope.progress import stage, track

SHIFT_KINDS = ("shift_unshifted", "shift_marginal", "shift_shifted")
SHIFTS_COLUMNS = ["model", "token_id", "token", "count", "share", "mean_base_rank"]


@dataclass
class DistSums:
    """Per-sample sums of one pair over one tokenized set; columns = ``layers``."""

    layers: list[int]
    tokens: np.ndarray            # [N] scored next-token positions
    kl_pair: np.ndarray           # [N, J] sum of KL(P_b,j || P_a,j)
    kl_final_a: np.ndarray        # [N, J] sum of KL(P_a,L || P_a,j)
    kl_final_b: np.ndarray        # [N, J] sum of KL(P_b,L || P_b,j)
    shift: np.ndarray             # [N, 3] positions unshifted / marginal / shifted
    shifted: dict[int, list[float]] = field(default_factory=dict)  # token -> [count, rank sum]


def empty_sums(n: int, layers: Sequence[int]) -> DistSums:
    """Zero sums for ``n`` samples."""
    j = len(layers)
    return DistSums(list(layers), np.zeros(n), np.zeros((n, j)), np.zeros((n, j)),
                    np.zeros((n, j)), np.zeros((n, 3)))


def merge_dist_sums(parts: Sequence[tuple[Sequence[int], DistSums | None]]) -> DistSums:
    """The sums of every rank's share ``(indices, sums)`` in one ``DistSums``."""
    got = [(list(i), p) for i, p in parts if p is not None]
    if not got:
        raise SftscopeError("no distribution sums to merge: no process ran a sample")
    first = got[0][1]
    out = empty_sums(len(first.tokens), first.layers)
    for idx, part in got:
        rows = np.asarray(idx, dtype=np.int64)
        for f in ("tokens", "kl_pair", "kl_final_a", "kl_final_b", "shift"):
            getattr(out, f)[rows] = getattr(part, f)[rows]
        for t, (c, r) in part.shifted.items():
            acc = out.shifted.setdefault(t, [0.0, 0.0])
            acc[0] += c
            acc[1] += r
    return out


def scored_positions(mask: torch.Tensor, index: Sequence[int],
            positions: Sequence[Sequence[int]] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of every scored next-token position of a batch."""
    if positions is None:
        return (mask[:, :-1] & mask[:, 1:]).nonzero(as_tuple=True)
    rows = [r for r, i in enumerate(index) for _ in positions[i]]
    ts = [t for i in index for t in positions[i]]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(ts, dtype=torch.long)


def states_at(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rb: torch.Tensor,
               rt: torch.Tensor, label: str) -> list[torch.Tensor]:
    """One forward pass; every hidden state's rows at the scored positions (copies)."""
    kept: dict[int, torch.Tensor] = {}

    def keep(j: int, h: torch.Tensor) -> None:
        rows = h[rb.to(h.device), rt.to(h.device)]
        if not bool(torch.isfinite(rows).all()):
            raise SftscopeError(f"{label}: {state_name(j)} has NaN or Inf at a scored token; "
                                f"stopped, nothing saved (try --dtype float32)")
        kept[j] = rows

    dev = input_device(model)
    with hidden_state_hooks(model, keep):
        inner_model(model)(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    return [kept[j] for j in sorted(kept)]


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row from log-probabilities (0 log 0 = 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


class _PairReducer:
    """Reduces one batch: both models' kept states through their lenses, chunk by chunk."""

    def __init__(self, lens_a: Lens, lens_b: Lens, layers: Sequence[int], rows_per_chunk: int,
                 sums: DistSums) -> None:
        self.lens_a, self.lens_b = lens_a, lens_b
        self.layers, self.step, self.sums = list(layers), rows_per_chunk, sums
        self.dev = lens_a.device

    def _logp(self, lens: Lens, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(lens(h).to(self.dev), dim=-1)

    def reduce(self, sa: list[torch.Tensor], sb: list[torch.Tensor], rb: torch.Tensor,
               index: Sequence[int]) -> None:
        n_rows, bsz = int(rb.numel()), len(index)
        n_cols = len(self.layers)
        acc = torch.zeros((3, n_cols, bsz), dtype=torch.float64, device=self.dev)
        shift = torch.zeros((bsz, 3), dtype=torch.float64)
        rb_dev = rb.to(self.dev)
        for s in range(0, n_rows, self.step):
            e = min(s + self.step, n_rows)
            rows = rb_dev[s:e]
            fa, fb = self._logp(self.lens_a, sa[-1][s:e]), self._logp(self.lens_b, sb[-1][s:e])
            for c, j in enumerate(self.layers):
                la = fa if j == len(sa) - 1 else self._logp(self.lens_a, sa[j][s:e])
                lb = fb if j == len(sb) - 1 else self._logp(self.lens_b, sb[j][s:e])
                for k, (p, q) in enumerate(((lb, la), (fa, la), (fb, lb))):
                    acc[k, c].index_add_(0, rows, kl_rows(p, q).double())
            self._shift(fa, fb, rows.cpu(), shift)
        idx = np.asarray(index)
        out = acc.cpu().numpy()
        self.sums.kl_pair[idx] += out[0].T
        self.sums.kl_final_a[idx] += out[1].T
        self.sums.kl_final_b[idx] += out[2].T
        self.sums.shift[idx] += shift.numpy()
        self.sums.tokens[idx] += np.bincount(rb.numpy(), minlength=bsz)

    def _shift(self, fa: torch.Tensor, fb: torch.Tensor, rows: torch.Tensor,
               shift: torch.Tensor) -> None:
        """URIAL's categories at the output: the base's rank of the fine-tune's top-1."""
        top = fb.argmax(-1)
        at = fa.gather(1, top[:, None])
        rank = (fa > at).sum(-1) + 1
        kind = torch.where(rank == 1, 0, torch.where(rank <= 3, 1, 2)).cpu()
        shift.index_put_((rows, kind), torch.ones(len(rows), dtype=torch.float64),
                         accumulate=True)
        moved = (kind == 2).nonzero(as_tuple=True)[0]
        for t, r in zip(top.cpu()[moved].tolist(), rank.cpu()[moved].tolist(), strict=True):
            acc = self.sums.shifted.setdefault(int(t), [0.0, 0.0])
            acc[0] += 1
            acc[1] += float(r)


@torch.inference_mode()
def pair_distribution_pass(model_a: nn.Module, model_b: nn.Module, tok: D.TokenizedSet,
                           pad_id: int, *, batch_size: int = 8,
                           positions: Sequence[Sequence[int]] | None = None,
                           chunk_elements: int = 1 << 24, labels: tuple[str, str] = ("a", "b"),
                           indices: Sequence[int] | None = None,
                           description: str = "distributions") -> DistSums:
    """Stream a pair over ``tok``: per sample and depth the summed ``kl_pair`` and each model's
    ``kl_to_final``, and the token-shift counts at the output (see the module docstring).

    ``positions[i]``: the scored next-token positions of sample ``i`` (default every pair of
    real tokens). ``indices``: only these samples (a rank's share)."""
    n_a, n_b = len(get_blocks(model_a)), len(get_blocks(model_b))
    if n_a != n_b:
        raise SftscopeError(f"the pair has {n_a} and {n_b} blocks; KL by depth compares the "
                            f"same depths (use --no-kl)")
    lens_a, lens_b = Lens(model_a), Lens(model_b)
    if lens_a.vocab != lens_b.vocab:
        raise SftscopeError(f"the pair's vocabularies differ ({lens_a.vocab} vs "
                            f"{lens_b.vocab}); KL needs one vocabulary (use --no-kl)")
    layers = list(range(n_a + 1))
    sums = empty_sums(len(tok), layers)
    red = _PairReducer(lens_a, lens_b, layers, max(1, chunk_elements // max(lens_a.vocab, 1)),
                       sums)
    order = list(range(len(tok))) if indices is None else list(indices)
    total = (len(order) + batch_size - 1) // batch_size
    for batch in track(batches(tok, batch_size, pad_id, order), description, total=total,
                       tokens=lambda b: int(b.attention_mask.sum())):
        rb, rt = scored_positions(batch.mask, batch.index, positions)
        if not rb.numel():
            continue
        sa = states_at(model_a, batch.input_ids, batch.attention_mask, rb, rt, labels[0])
        sb = states_at(model_b, batch.input_ids, batch.attention_mask, rb, rt, labels[1])
        red.reduce(sa, sb, rb, batch.index)
    return sums


def _row(layer: int, model: str, metric: str, value: float, lo: float, hi: float,
         n: int) -> dict[str, Any]:
    return {"layer": layer, "model": model, "metric": metric, "value": float(value),
            "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


def distribution_table(sums: DistSums, pair: str, label_a: str, label_b: str, *,
                       level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy probe rows: ``kl_pair`` (model = the pair), ``kl_to_final`` (model = each model)
    per layer, and the three ``shift_*`` shares at the last layer (model = the pair); means over
    the scored positions with a sample-level (cluster) interval (``cluster_ratio_ci``: the
    cluster Wilson interval for the shares, the studentised cluster bootstrap for KL)."""
    n_tok = float(sums.tokens.sum())
    rows: list[dict[str, Any]] = []
    if not n_tok:
        return pd.DataFrame(rows, columns=["layer", "model", "metric", "value", "ci_low",
                                           "ci_high", "n"])

    def ci(num: np.ndarray, bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        return cluster_ratio_ci(num, sums.tokens, n_boot=n_boot, level=level, seed=seed,
                                bounds=bounds, proportion=bounds == (0.0, 1.0))

    inf = (0.0, float("inf"))
    for model, metric, arr in ((pair, "kl_pair", sums.kl_pair),
                               (label_a, "kl_to_final", sums.kl_final_a),
                               (label_b, "kl_to_final", sums.kl_final_b)):
        lo, hi = ci(arr, inf)
        rows += [_row(j, model, metric, arr[:, c].sum() / n_tok, lo[c], hi[c], n_tok)
                 for c, j in enumerate(sums.layers)]
    lo, hi = ci(sums.shift, (0.0, 1.0))
    top = sums.layers[-1]
    rows += [_row(top, pair, kind, sums.shift[:, k].sum() / n_tok, lo[k], hi[k], n_tok)
             for k, kind in enumerate(SHIFT_KINDS)]
    return pd.DataFrame(rows)


def shifts_table(sums: DistSums, pair: str, tokenizer: Any, top: int = 50) -> pd.DataFrame:
    """The fine-tune's top-1 tokens most often shifted (base rank > 3): count, share of all
    shifted positions, mean base rank; most frequent first (ties by token id)."""
    total = sum(c for c, _ in sums.shifted.values())
    items = sorted(sums.shifted.items(), key=lambda kv: (-kv[1][0], kv[0]))[:max(top, 0)]
    rows = [{"model": pair, "token_id": t, "token": tokenizer.decode([t]), "count": int(c),
             "share": c / total, "mean_base_rank": r / c} for t, (c, r) in items]
    return pd.DataFrame(rows, columns=SHIFTS_COLUMNS)


def pair_distributions(specs: dict[str, str], opts: dict[str, Any], pairs: Sequence[Any],
                       tok: D.TokenizedSet, pad_id: int, *, batch_size: int,
                       positions: Sequence[Sequence[int]] | None, chunk_elements: int,
                       share: Sequence[int]) -> dict[str, DistSums]:
    """:func:`pair_distribution_pass` for each pair of a probe run (``pairs``: chain pairs with
    ``model``, ``a``, ``b``), both models loaded for it and released after; this process's
    ``share`` of the samples."""
    found: dict[str, DistSums] = {}
    for p in pairs if share else ():
        stage(f"distributions {p.model}")
        models = {}
        try:
            for k in (p.a, p.b):
                models[k] = load_model(specs[k], opts[k])
                check_vocab(models[k], tok.input_ids, k)
            found[p.model] = pair_distribution_pass(
                models[p.a], models[p.b], tok, pad_id, batch_size=batch_size,
                positions=positions, chunk_elements=chunk_elements, labels=(p.a, p.b),
                indices=share, description=f"distributions {p.model}")
        finally:
            nbytes = sum(model_bytes(m) for m in models.values())
            models.clear()
            release(nbytes)
    return found


@torch.inference_mode()
def output_divergence(model_a: nn.Module, model_b: nn.Module, tok: D.TokenizedSet,
                      pad_id: int, *, batch_size: int = 8,
                      description: str = "output KL") -> dict[str, float]:
    """At the output only, over every pair of real tokens: mean KL(P_b || P_a) and each
    model's next-token loss (nats), with the number of positions; one forward pass of each
    model per batch (both resident)."""
    sums = np.zeros(3)
    n = 0
    total = (len(tok) + batch_size - 1) // batch_size
    for batch in track(batches(tok, batch_size, pad_id), description, total=total):
        rb, rt = scored_positions(batch.mask, batch.index, None)
        if not rb.numel():
            continue
        target = batch.input_ids[rb, rt + 1]
        logp = []
        for m in (model_a, model_b):
            dev = input_device(m)
            logits = m(input_ids=batch.input_ids.to(dev),
                       attention_mask=batch.attention_mask.to(dev), use_cache=False).logits
            logp.append(torch.log_softmax(logits[rb.to(logits.device), rt.to(logits.device)]
                                          .float(), -1).cpu())
        sums += [float(kl_rows(logp[1], logp[0]).sum()),
                 float(-logp[0].gather(1, target[:, None]).sum()),
                 float(-logp[1].gather(1, target[:, None]).sum())]
        n += int(rb.numel())
    kl, la, lb = (sums / n) if n else (np.nan, np.nan, np.nan)
    return {"kl": float(kl), "loss_a": float(la), "loss_b": float(lb), "n_tokens": n}
