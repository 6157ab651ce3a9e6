"""Padding-free ("packed") training batches for ``tune``.

A packed batch holds the examples concatenated (:class:`PackCollator`), with per-example
position ids that restart at 0 and no attention mask, as transformers'
``DataCollatorWithFlattening`` lays them out, and the first label of each example is -100, so
no example predicts across a boundary. The per-token loss is that of the padded batch, without
the compute spent on padding.

How attention is confined to each example decides the layout. A model on ``sdpa`` attention
trains with :class:`PerExampleAttention`: attention runs per example (one causal ``sdpa`` call
for each stretch of position ids), so a micro-batch is one row of all its examples, with no
filler and no mask, and attention costs the sum of the squared example lengths. Otherwise
transformers builds a block-diagonal mask from the position ids (``masking_utils``), whose
cost grows with the square of the row, so rows are capped at the longest example and packed
first-fit decreasing (flash-attention kernels take the boundaries from the position ids too).

Whether a model honours this is checked, not assumed: before training, :func:`packing_exact`
runs two examples packed and padded and compares the log-probabilities at every real position.
``--packing auto`` (the default) packs when that check passes and batches hold more than one
example (a single example has no padding to save); ``on`` refuses a model that fails it;
``off`` pads. ``run.json`` records the choice and why.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from sftscope.errors import SftscopeError

EXACT_ATOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # log-prob difference deemed exact
LOW_PRECISION_ATOL = 5e-2  # bfloat16/float16: kernels of other shapes round differently


class PackCollator:
    """Padding-free batches: position ids restarting at 0 for each example, labels -100 at
    each example's first token (it must not be predicted from the example before), no
    attention mask. ``one_row``: the micro-batch is one row of all its examples (for
    per-example attention, :class:`PerExampleAttention`, or flash-attention kernels).
    Otherwise the examples are packed first-fit-decreasing into rows as wide as the longest
    example, and a row's unused tail is filler (``pad_id``, labels -100, positions of its own)
    attending only to itself: with a block-diagonal mask the attention cost grows with the
    square of the row, and rows this wide keep it at most that of padding."""

    def __init__(self, pad_id: int, one_row: bool = False) -> None:
        self.pad_id, self.one_row = pad_id, one_row

    def rows(self, lengths: Sequence[int]) -> list[list[int]]:
        """Example indices per row (first fit, longest first; ``one_row``: all in one)."""
        if self.one_row:
            return [list(range(len(lengths)))]
        width = max(lengths)
        rows: list[list[int]] = []
        free: list[int] = []
        for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
            for r, room in enumerate(free):
                if lengths[i] <= room:
                    rows[r].append(i)
                    free[r] -= lengths[i]
                    break
            else:
                rows.append([i])
                free.append(width - lengths[i])
        return rows

    def __call__(self, feats: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in feats]
        rows = self.rows(lengths)
        width = max(sum(lengths[i] for i in m) for m in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                n = lengths[i]
                ids[r, at:at + n] = torch.tensor(feats[i]["input_ids"])
                labels[r, at + 1:at + n] = torch.tensor(feats[i]["labels"][1:])
                pos[r, at:at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)  # the filler: a sequence of its own
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def packing_collator(pad_id: int, per_example: bool = False) -> PackCollator:
    """The collator of a packed ``tune``: one row per micro-batch when attention runs per
    example, rows of the longest example otherwise."""
    return PackCollator(pad_id, one_row=per_example)


PER_EXAMPLE = "sftscope_per_example_sdpa"  # the attention implementation's registered name
_per_example_calls = [0]  # forward passes that attended per example (the check reads it)


def _segments(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, where each example starts (and the row's end): a new example wherever the
    position does not go up by one, the rule of transformers' ``find_packed_sequence_indices``."""
    n = position_ids.shape[-1]
    new = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    return [[0, *(row.nonzero().flatten() + 1).tolist(), n] for row in new]


def per_example_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention, except on a packed batch without a mask (position
    ids restarting within a row): there each example attends causally to itself alone, one
    ``sdpa`` call per example, so neither a block-diagonal mask nor attention across examples
    is computed. Any other call (a mask, a cache, no position ids) is plain ``sdpa``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, causal = query.shape[2], kwargs.pop("is_causal", None)
    if (attention_mask is not None or position_ids is None or position_ids.dim() != 2
            or key.shape[2] != n or n < 2 or causal is False
            or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      is_causal=causal, **kwargs)
    cuts = _segments(position_ids.expand(query.shape[0], -1))
    if all(len(c) == 2 for c in cuts):  # one example per row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, is_causal=causal,
                                      **kwargs)
    _per_example_calls[0] += 1
    rows = [torch.cat([sdpa_attention_forward(module, query[r:r + 1, :, a:b],
                                              key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
                                              None, is_causal=True, **kwargs)[0]
                       for a, b in zip(c, c[1:])], 1)
            for r, c in enumerate(cuts)]
    return torch.cat(rows), None


def _sliding(config: Any) -> bool:
    """Whether some layer of the model attends through a sliding window."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None:
        return any("sliding" in str(k) for k in kinds)
    return (getattr(config, "sliding_window", None) is not None
            and getattr(config, "use_sliding_window", True) is not False)


def per_example_mask(*, attention_mask: torch.Tensor | None = None,
                     config: Any = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask where no padding mask was given (causality and the packed examples are
    :func:`per_example_sdpa`'s to apply, without the square-of-the-row mask); otherwise, and
    for sliding-window models, the ``sdpa`` mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and not _sliding(config):
        return None
    return sdpa_mask(attention_mask=attention_mask, config=config, **kwargs)


class PerExampleAttention:
    """While inside, a model on ``sdpa`` attention runs :func:`per_example_sdpa` (registered
    with transformers as ``PER_EXAMPLE``); :meth:`off` (or leaving) restores ``sdpa``.
    ``active``: whether it is on (not when ``wanted`` is false, for other attention
    implementations, sliding-window models, or models that cannot switch)."""

    def __init__(self, model: nn.Module, wanted: bool = True) -> None:
        self.hf: Any = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.wanted, self.active = wanted, False

    def __enter__(self) -> PerExampleAttention:
        config = getattr(self.hf, "config", None)
        if (not self.wanted or getattr(config, "_attn_implementation", None) != "sdpa"
                or _sliding(config)
                or not hasattr(self.hf, "set_attn_implementation")):
            return self
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(PER_EXAMPLE, per_example_sdpa)
        AttentionMaskInterface.register(PER_EXAMPLE, per_example_mask)
        self.hf.set_attn_implementation(PER_EXAMPLE)
        self.active = self.hf.config._attn_implementation == PER_EXAMPLE
        return self

    def off(self) -> None:
        """Back to ``sdpa``."""
        if self.active:
            self.hf.set_attn_implementation("sdpa")
            self.active = False

    def __exit__(self, *exc: object) -> None:
        self.off()


def _padded(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def packing_exact(model: nn.Module, examples: Sequence[dict[str, list[int]]],
                  pad_id: int) -> tuple[bool, float]:
    """Run ``examples`` packed and padded; whether the log-probabilities at every real position
    agree (to rounding of the model's dtype), and the largest difference."""
    if len(examples) < 2:
        raise SftscopeError("the packing check needs two examples")
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    try:
        packed = PackCollator(pad_id, one_row=True)(  # every example shares the row
            [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples])
        lp = torch.log_softmax(model(input_ids=packed["input_ids"].to(dev),
                                     position_ids=packed["position_ids"].to(dev),
                                     use_cache=False).logits.float(), -1)[0]
        pad = _padded(examples, pad_id)
        lq = torch.log_softmax(model(**{k: v.to(dev) for k, v in pad.items()},
                                     use_cache=False).logits.float(), -1)
    finally:
        model.train(was_training)
    start, diff = 0, 0.0
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        diff = max(diff, float((lp[start:start + n] - lq[i, :n]).abs().max()))
        start += n
    return diff <= EXACT_ATOL.get(dtype, LOW_PRECISION_ATOL), diff


@contextmanager
def _counting() -> Iterator[list[int]]:
    """The per-example attention calls made inside (one number)."""
    start, got = _per_example_calls[0], [0]
    try:
        yield got
    finally:
        got[0] = _per_example_calls[0] - start


def choose_packing(mode: str, model: nn.Module, examples: Sequence[dict[str, list[int]]],
                   pad_id: int, micro_batch: int,
                   attention: PerExampleAttention | None = None) -> tuple[PackCollator | None,
                                                                          str]:
    """The packed collator, or None to pad, and why (``mode``: auto / on / off). With an
    active ``attention`` the check runs through it, and one row per micro-batch is used when
    attention did run per example; otherwise ``attention`` is turned off and rows of the
    longest example, confined by the mask, are checked and used."""
    if mode == "off":
        return None, "off (--packing off)"
    if micro_batch < 2 and mode == "auto":
        return None, "off: one example per forward pass has no padding to save"
    if len(examples) < 2:
        return None, "off: fewer than two training examples"
    if attention is not None and attention.active:
        with _counting() as calls:
            ok, diff = packing_exact(model, examples[:2], pad_id)
        if ok and calls[0]:
            return packing_collator(pad_id, per_example=True), (
                f"on: one row per micro-batch, attention per example; packed and padded "
                f"log-probabilities agree (max diff {diff:.2g})")
        attention.off()
    ok, diff = packing_exact(model, examples[:2], pad_id)
    if ok:
        return packing_collator(pad_id), (
            f"on: rows of the longest example, attention confined by a mask; packed and "
            f"padded log-probabilities agree (max diff {diff:.2g})")
    if mode == "on":
        raise SftscopeError(f"--packing on: {type(model).__name__} does not confine attention "
                            f"to each packed example (log-probabilities differ by {diff:.3g}); "
                            f"use --packing off")
    return None, f"off: this model does not honour packed position ids (diff {diff:.3g})"
