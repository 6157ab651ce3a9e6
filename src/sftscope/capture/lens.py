"""The logit lens of a model: ``head(final_norm(h))``, the reading of a hidden state that
``probe`` (per layer) and the pair's distributions (KL by depth) share."""

from __future__ import annotations

import torch
from torch import nn

from sftscope.load.arch import apply_softcap, arch_for, get_final_norm, get_head, logit_softcap


def _module_device(mod: nn.Module) -> torch.device | None:
    for p in mod.parameters():
        return p.device
    return None


class Lens:
    """``head(final_norm(h))`` (+ soft-capping) of a model, as float32 logits.

    Reads the modules through the architecture map at construction: tied embeddings, other norm
    names and swapped-in heads are whatever the model holds at that time.
    """

    def __init__(self, model: nn.Module):
        spec = arch_for(model)
        self.norm = get_final_norm(model, spec)
        self.head = get_head(model, spec)
        self.cap = logit_softcap(model.config)
        self.norm_device = _module_device(self.norm)
        self.head_device = _module_device(self.head)
        self.vocab = int(getattr(self.head, "out_features", 0) or self.head.weight.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the logits come out."""
        return self.head_device or torch.device("cpu")

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm_device is not None:
            h = h.to(self.norm_device)
        x = self.norm(h)
        if self.head_device is not None:
            x = x.to(self.head_device)
        return apply_softcap(self.head(x).float(), self.cap)
