"""Padding-free ("packed") training batches for ``tune``.

A packed batch holds the examples concatenated in rows (:class:`PackCollator`), with
per-example position ids that restart at 0 and no attention mask, as transformers'
``DataCollatorWithFlattening`` lays them out. transformers then confines attention to each
example (``masking_utils`` finds the packed sequences from the
position ids; flash-attention kernels take the boundaries directly), and the first label of
each example is -100, so no example predicts across a boundary. The per-token loss is that of
the padded batch, without the compute spent on padding.

Whether a model honours this is checked, not assumed: before training, :func:`packing_exact`
runs two examples packed and padded and compares the log-probabilities at every real position.
``--packing auto`` (the default) packs when that check passes and batches hold more than one
example (a single example has no padding to save); ``on`` refuses a model that fails it;
``off`` pads. ``run.json`` records the choice and why.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sftscope.errors import SftscopeError

EXACT_ATOL = {torch.float32: 1e-4, torch.float64: 1e-8}  # log-prob difference deemed exact
LOW_PRECISION_ATOL = 5e-2  # bfloat16/float16: kernels of other shapes round differently


class PackCollator:
    """Padding-free batches: the examples of a micro-batch packed first-fit-decreasing into
    rows as wide as its longest example, position ids restarting at 0 for each example, labels
    -100 at each example's first token (it must not be predicted from the example before), no
    attention mask. A row's unused tail is filler (``pad_id``, labels -100, positions of its
    own), attending only to itself. Rows as wide as the longest example keep the attention cost
    at most that of padding (transformers' ``DataCollatorWithFlattening`` makes one row of every
    example: on kernels without variable-length attention its cost grows with the square of the
    whole batch)."""

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


def packing_collator(pad_id: int) -> PackCollator:
    """The collator of a packed ``tune``."""
    return PackCollator(pad_id)


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


def choose_packing(mode: str, model: nn.Module, examples: Sequence[dict[str, list[int]]],
                   pad_id: int, micro_batch: int) -> tuple[bool, str]:
    """Pack or pad, and why (``mode``: auto / on / off)."""
    if mode == "off":
        return False, "off (--packing off)"
    if micro_batch < 2 and mode == "auto":
        return False, "off: one example per forward pass has no padding to save"
    if len(examples) < 2:
        return False, "off: fewer than two training examples"
    ok, diff = packing_exact(model, examples[:2], pad_id)
    if ok:
        return True, f"on: packed and padded log-probabilities agree (max diff {diff:.2g})"
    if mode == "on":
        raise SftscopeError(f"--packing on: {type(model).__name__} does not confine attention "
                            f"to each packed example (log-probabilities differ by {diff:.3g}); "
                            f"use --packing off")
    return False, f"off: this model does not honour packed position ids (diff {diff:.3g})"
