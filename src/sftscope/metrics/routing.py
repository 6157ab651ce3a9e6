"""Routing metrics of mixture-of-experts routers (METRICS.md, "Routing drift").

Per token: the Jensen-Shannon divergence (natural log, so in ``[0, ln 2]``) between two
routers' softmax over all experts, and the overlap of the experts they select
(``|top-k(a) ∩ top-k(b)| / k``). Per model: the expert load (each expert's share of the
top-k slots) and its entropy. Pure functions: tensors in, tensors or floats out.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def router_probs(logits: Tensor) -> Tensor:
    """Softmax over the experts of router logits ``[..., E]``, in float32 (as the routers of
    transformers compute it) -> ``[..., E]``."""
    return torch.softmax(logits.float(), dim=-1)


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
