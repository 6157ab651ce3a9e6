"""Routing metrics of mixture-of-experts routers (METRICS.md, "Routing drift").

Per token: the Jensen-Shannon divergence (natural log, so in ``[0, ln 2]``) between two
routers' softmax over all experts, and the overlap of the experts they select
(``|top-k(a) ∩ top-k(b)| / k``). Per model: the expert load (each expert's share of the
top-k slots) and its entropy. Pure functions: tensors in, tensors or floats out. The one
home of reading a router's output (its logits and top-k choice) and of counting its slots,
for ``analyze``'s routing capture and ``tune --experts top-load:K`` alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def router_probs(logits: Tensor) -> Tensor:
    """Softmax over the experts of router logits ``[..., E]``, in float32 (as the routers of
    transformers compute it) -> ``[..., E]``."""
    return torch.softmax(logits.float(), dim=-1)


def router_selection(out: Any, k: int) -> tuple[Tensor, Tensor]:
    """Router logits ``[n, E]`` and selected experts ``[n, k]`` from a router's forward output:
    the routers of transformers return ``(logits, scores, indices)``; a bare logits tensor (or
    a tuple without integer indices) is read as softmax-then-top-k routing."""
    if isinstance(out, tuple | list):
        logits = out[0]
        sel = out[2] if len(out) > 2 and torch.is_tensor(out[2]) else None
    else:
        logits, sel = out, None
    logits = logits.reshape(-1, logits.shape[-1])
    if sel is None or sel.shape[-1] != k or sel.dtype.is_floating_point:
        sel = torch.topk(logits.float(), k, dim=-1).indices
    return logits, sel.reshape(-1, k)


def slot_counts(sel: Tensor, n_experts: int, rows: Tensor | None = None,
                n_rows: int = 1) -> Tensor:
    """How many top-k slots each expert took, from selections ``[n, k]`` (distinct experts per
    token): ``[E]`` summed over the tokens, or with ``rows`` (each token's row index) ``[n_rows,
    E]`` per row; int64, on ``sel``'s device."""
    hot = torch.zeros(sel.shape[0], n_experts, dtype=torch.int64, device=sel.device)
    hot.scatter_(1, sel.long(), 1)
    if rows is None:
        return hot.sum(0)
    out = torch.zeros(n_rows, n_experts, dtype=torch.int64, device=sel.device)
    return out.index_add_(0, rows, hot)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence per row of two distributions ``[N, E]`` -> ``[N]``:
    ``JS = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = ½ (p + q)``, natural log, ``0 log 0 = 0``.
    Computed in float64 (a divergence near 0 is a difference of nearly equal terms)."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (torch.log(a) - torch.log(m)), 0.0).sum(-1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(min=0.0)


def topk_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Per row, the share of the ``k`` experts selected by ``a`` ``[N, k]`` that ``b`` ``[N, k]``
    also selects: ``|a ∩ b| / k`` -> ``[N]`` float64 in ``[0, 1]``."""
    k = a.shape[-1]
    hit = (a[:, :, None] == b[:, None, :]).any(-1)
    return hit.sum(-1).double() / k


def load_shares(counts: np.ndarray | Tensor) -> np.ndarray:
    """Expert load from top-k slot counts ``[..., E]``: each expert's share of all slots
    (``count_e / sum counts``; NaN where no slot was counted)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, c / np.where(total > 0, total, 1.0), np.nan)


def load_entropy(load: np.ndarray) -> np.ndarray | float:
    """Shannon entropy (natural log) of expert load distributions ``[..., E]``: ``ln E`` when
    every expert gets the same share, 0 when one gets every slot."""
    x = np.asarray(load, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = -np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0).sum(-1)
    h = np.where(np.isnan(x).any(-1), np.nan, h)
    return float(h) if h.ndim == 0 else h
