"""The one hooked forward loop: capture, the logit lens and suggest all stream through it.

``run_hooked`` pads samples on the right into batches, runs the decoder (no LM head) once per
batch with a hook on every hidden state ``j = 0..L``, and hands each state to a reducer. One
padding policy for every caller: right padding, and padded positions are masked with
``torch.where`` (never multiplied by the mask: a padded position may hold NaN, and NaN * 0 is
NaN). A NaN or Inf at a real (non-padded) position stops the run with one line naming the
layer and the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from sftscope.capture.hooks import hidden_state_hooks, inner_model
from sftscope.errors import SftscopeError
from sftscope.load.data import TokenizedSet, pad_batch
from sftscope.load.models import input_device
from sftscope.progress import track


class HookedBatch:
    """One right-padded batch as reducers see it, with its mask pieces cached per device."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 index: Sequence[int]) -> None:
        self.input_ids = input_ids              # [B, T] long, CPU
        self.attention_mask = attention_mask    # [B, T] long (1 = real token), CPU
        self.index = list(index)                # positions of the rows in the tokenized set
        self.mask = attention_mask.bool()       # [B, T] bool, CPU
        self._on: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._sum: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.index)

    def _cached(self, name: str, device: torch.device, make: Callable[[], torch.Tensor]):
        key = (name, device)
        if key not in self._on:
            self._on[key] = make()
        return self._on[key]

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The bool mask ``[B, T]`` on ``device``."""
        return self._cached("mask", device, lambda: self.mask.to(device))

    def count_on(self, device: torch.device) -> torch.Tensor:
        """Real tokens per row ``[B]`` (long, at least 1) on ``device``."""
        return self._cached("count", device,
                            lambda: self.attention_mask.to(device).sum(1).clamp(min=1))

    def last_on(self, device: torch.device) -> torch.Tensor:
        """Index of each row's last real token ``[B]`` (0 for an empty row) on ``device``."""
        def make() -> torch.Tensor:
            m = self.attention_mask.to(device)
            return (m * torch.arange(m.shape[1], device=device)).argmax(1)

        return self._cached("last", device, make)

    def real_sum(self, h: torch.Tensor) -> torch.Tensor:
        """Sum of ``h`` over each row's real positions -> ``[B, D]`` float32, kept for the
        state last asked about (the NaN guard and the pooling share it).

        On CPU one pass: the mask as weights in a batched product, which is right unless a
        position holds NaN or Inf (0 * NaN is NaN); then the padded positions are zeroed with
        ``torch.where`` first, so NaN there never counts. On an accelerator (where testing
        would synchronise every state) they always are."""
        if self._sum is not None and self._sum[0] is h:
            return self._sum[1]
        hf = h.float()
        if h.device.type == "cpu":
            w = self._cached("weights", h.device, lambda: self.mask[:, None, :].float())
            s = torch.bmm(w, hf).squeeze(1)
            if not bool(torch.isfinite(s).all()):  # the same product, padded positions zeroed:
                # the same numbers, bit for bit, when only a padded position was not finite
                s = torch.bmm(w, torch.where(self.mask_on(h.device)[..., None], hf, 0.0))
                s = s.squeeze(1)
        else:
            s = torch.where(self.mask_on(h.device)[..., None], hf, 0.0).sum(1)
        self._sum = (h, s)
        return s

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean and last real token of ``h`` -> ``([B, D], [B, D])`` float32."""
        mean = self.real_sum(h) / self.count_on(h.device)[:, None].to(torch.float32)
        rows = torch.arange(h.shape[0], device=h.device)
        at = self.last_on(h.device)
        real = self.mask_on(h.device)[rows, at][:, None]  # False only for a row without tokens
        return mean, torch.where(real, h[rows, at].float(), 0.0)


class Reducer(Protocol):
    """What ``run_hooked`` drives: ``start`` before a batch's forward pass, ``__call__`` for
    every hidden state during it (in order ``j = 0..L``), ``finish`` after it."""

    def start(self, batch: HookedBatch) -> None: ...

    def __call__(self, j: int, h: torch.Tensor) -> None: ...

    def finish(self, batch: HookedBatch) -> None: ...


def batches(tok: TokenizedSet, batch_size: int, pad_id: int,
            indices: Sequence[int] | None = None):
    """Right-padded batches of the samples ``indices`` (default all), in the order given."""
    order = list(range(len(tok))) if indices is None else list(indices)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, mask = pad_batch([tok.input_ids[i] for i in idx], pad_id, side="right")
        yield HookedBatch(ids, mask, idx)


def state_name(j: int) -> str:
    """``hidden state j`` with what it is: the embeddings or the output of block ``j - 1``."""
    return f"hidden state {j} ({'embeddings' if j == 0 else f'output of block {j - 1}'})"


class _FiniteGuard:
    """Per batch and hidden state, which rows hold a NaN or Inf at a real position.

    The flags stay on their device and are read once per batch (one synchronisation)."""

    def __init__(self) -> None:
        self.flags: dict[int, torch.Tensor] = {}
        self.dtype = torch.float32

    def check(self, j: int, h: torch.Tensor, batch: HookedBatch) -> None:
        # a float32 sum over the real positions is non-finite iff some entry there is (no
        # overflow at these sizes); the pooling reuses that sum
        self.flags[j] = ~torch.isfinite(batch.real_sum(h)).all(-1)
        self.dtype = h.dtype

    def raise_if_bad(self, batch: HookedBatch, label: str) -> None:
        if not self.flags:
            return
        flags, self.flags = self.flags, {}
        dev = next(iter(flags.values())).device
        bad = torch.stack([f.to(dev) for f in flags.values()]).cpu()  # [J, B]
        if bool(bad.any()):
            k, row = (int(v) for v in bad.nonzero()[0])
            hint = ("does it overflow in this dtype? try --dtype float32"
                    if self.dtype in (torch.float16, torch.bfloat16)
                    else "check the weights for NaN/Inf")
            raise SftscopeError(
                f"{label}: {state_name(list(flags)[k])} has NaN or Inf at a real token of "
                f"sample {batch.index[row]}; stopped, nothing saved ({hint})")


@torch.inference_mode()
def run_hooked(model: nn.Module, tok: TokenizedSet, batch_size: int, pad_id: int,
               reducer: Reducer, *, indices: Sequence[int] | None = None,
               description: str = "states", label: str = "model",
               check_finite: bool = True,
               after_batch: Callable[[HookedBatch], None] | None = None) -> None:
    """Run ``model`` over the samples ``indices`` of ``tok`` (default all) in right-padded
    batches of ``batch_size``, handing every hidden state to ``reducer``.

    ``after_batch(batch)`` runs after ``reducer.finish`` (checkpoints). ``check_finite``:
    refuse NaN/Inf at real positions (one line naming the layer and ``label``).
    """
    if batch_size < 1:
        raise SftscopeError(f"--batch-size must be at least 1, got {batch_size}")
    order = list(range(len(tok))) if indices is None else list(indices)
    device = input_device(model)
    run = inner_model(model)
    guard = _FiniteGuard() if check_finite else None
    current: list[HookedBatch] = []

    def on_state(j: int, h: torch.Tensor) -> None:
        if guard is not None:
            guard.check(j, h, current[0])
        reducer(j, h)

    n_batches = (len(order) + batch_size - 1) // batch_size
    with hidden_state_hooks(model, on_state):
        for batch in track(batches(tok, batch_size, pad_id, order), description,
                           total=n_batches, tokens=lambda b: int(b.attention_mask.sum())):
            current[:] = [batch]
            reducer.start(batch)
            run(input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device), use_cache=False)
            if guard is not None:
                guard.raise_if_bad(batch, label)
            reducer.finish(batch)
            if after_batch is not None:
                after_batch(batch)
