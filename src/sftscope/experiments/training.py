"""What tune and the TRL objectives share: the training set's shape, the count of trainable
parameters, and removing input-gradient hooks (``experiments.tune`` explains why none is
needed). Its own module so that ``objectives`` needs nothing of ``tune``, which imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class TrainSet:
    """Tokenized training examples and what truncation did."""

    examples: list[dict[str, list[int]]]
    max_length: int
    longest: int
    n_truncated: int
    n_dropped: int


def trainable_params(model: nn.Module) -> int:
    """Number of parameters that require a gradient."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def drop_input_grad_hooks(model: nn.Module) -> None:
    """Remove ``enable_input_require_grads`` hooks: they would make every block below the
    lowest adapted one take part in the backward pass for nothing."""
    for mod in model.modules():
        if getattr(mod, "_require_grads_hooks", None) and hasattr(mod,
                                                                  "disable_input_require_grads"):
            mod.disable_input_require_grads()
