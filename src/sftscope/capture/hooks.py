"""Hooks that hand every hidden state ``j = 0..L`` of one forward pass to a callback.

``j = 0`` is the input of block 0 (the embedding output, as the model feeds it), ``j = b + 1``
the output of block ``b`` before the final norm. One forward pass, no ``output_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sftscope.load.arch import ArchSpec, arch_for, block_output, get_blocks

StateFn = Callable[[int, torch.Tensor], None]


@contextmanager
def hidden_state_hooks(model: nn.Module, fn: StateFn,
                       spec: ArchSpec | None = None) -> Iterator[nn.ModuleList]:
    """Call ``fn(j, hidden)`` for every hidden state during forward passes inside the block."""
    blocks = get_blocks(model, spec or arch_for(model))
    handles = []

    def pre_hook(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        fn(0, h)

    handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
    for b, block in enumerate(blocks):
        def post_hook(_mod, _args, output, j=b + 1):
            fn(j, block_output(output))

        handles.append(block.register_forward_hook(post_hook))
    try:
        yield blocks
    finally:
        for h in handles:
            h.remove()


def inner_model(model: nn.Module) -> nn.Module:
    """The decoder without the LM head (saves the vocabulary projection when only states matter)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else model
