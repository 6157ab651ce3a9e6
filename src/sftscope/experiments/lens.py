"""``sftscope probe``: the logit lens, layer by layer, streamed.

For every hidden state ``j = 0..L`` (0 = the input of block 0, ``j = b+1`` = the output of block
``b`` before the final norm) the lens logits are ``head(final_norm(h_j))`` (soft-capped when the
model caps its logits); at ``j = L`` they are the model's own logits. Per layer we keep only
per-sample sums (correct next tokens, loss, answer probability and rank, agreement with the
other model), never the logits of the dataset: one forward pass per model per batch, with the
lens applied inside the block hooks, only at the positions something is scored at, in chunks
of rows (the head is the costly part on a large vocabulary: ``V x D`` per position and layer).

Scored next tokens (``tokens``): ``all`` = every pair of real tokens (the paper's curve);
``answer`` = the answers' tokens only (far cheaper: a few positions per sample).

Answers (teacher-forced, on the sample's own tokens): the MMLU letter (``meta["letter"]``)
right after the prompt; for a GSM8K-style chain of thought the final answer after the last
``####`` of the answer, given the prompt *and the reasoning* up to ``#### `` (the token after
``Answer:`` is the start of the reasoning, not the answer); else a free-text answer's first
content token. ``answer_prob`` is the probability of all the answer's tokens (their product),
``answer_rank`` the rank of its first token. Whitespace-only tokens the tokenizer splits off
before the answer (a space before digits) are context, not answer.

Intervals: a sample-level (cluster) bootstrap for everything summed over tokens or samples
(tokens of one sample are not independent); Wilson only for ``choice_accuracy`` (one 0/1 per
item).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sftscope.capture.engine import HookedBatch, run_hooked
from sftscope.capture.hooks import hidden_state_hooks, inner_model
from sftscope.capture.lens import Lens
from sftscope.chains import (
    BASE,
    FIRST,
    Stage,
    chain_pairs,
    chain_record,
    model_order,
    pair_label,
)
from sftscope.config.commands import ProbeConfig
from sftscope.config.core import build
from sftscope.errors import SftscopeError
from sftscope.experiments.analyze import check_chain, check_chain_tokenizers
from sftscope.experiments.context import Models, RunContext, validating
from sftscope.experiments.distributions import (
    SHIFT_KINDS,
    distribution_table,
    merge_dist_sums,
    pair_distributions,
    shifts_table,
)
from sftscope.experiments.tuned_lens import (
    TUNED_SUFFIX,
    kl_table,
    kl_to_final_sums,
    train_translators,
    training_split,
    translator_key,
    translators_for,
)
from sftscope.io import Timer, run_record, stable_hash, write_tables
from sftscope.load import data as D
from sftscope.load.arch import (
    get_blocks,
)
from sftscope.load.models import (
    LoadOptions,
    check_adapter_base,
    check_vocab,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    pair_tokenizer,
    source_label,
)
from sftscope.load.runtime import model_bytes, release
from sftscope.metrics.stats import cluster_ratio_ci, proportion_ci
from sftscope.parallel import empty_like_table, join
from sftscope.progress import plan, stage, staged

PROBE_COLUMNS = ["layer", "model", "metric", "value", "ci_low", "ci_high", "n"]
DEFAULT_CHUNK = 1 << 24  # logits elements per lens chunk (64 MiB in float32)


# ---------------------------------------------------------------------------------------------
# The lens


def forward_states(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> None:
    """One forward pass of the decoder without the LM head (states reach the hooks)."""
    dev = input_device(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(dev), "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask.to(dev)
    inner_model(model)(**kwargs)


@torch.inference_mode()
def hidden_states(model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """All hidden states ``j = 0..L`` of one batch (small inputs only: tests, inspection)."""
    states: dict[int, torch.Tensor] = {}
    with hidden_state_hooks(model, lambda j, h: states.__setitem__(j, h.detach().clone())):
        forward_states(model, input_ids, attention_mask)
    return [states[j] for j in sorted(states)]


@torch.inference_mode()
def lens_logits(model: nn.Module, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Lens logits ``[B, T, V]`` of every layer ``j = 0..L`` (small inputs only)."""
    lens = Lens(model)
    return [lens(h) for h in hidden_states(model, input_ids, attention_mask)]


# ---------------------------------------------------------------------------------------------
# Answer and choice slots


@dataclass(frozen=True)
class AnswerSlot:
    """The answer's tokens and the positions that predict them, teacher-forced: position
    ``positions[i]`` of the text predicts its next token ``targets[i]``."""

    positions: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def position(self) -> int:
        """Where the answer's first token is predicted (its rank is measured there)."""
        return self.positions[0]

    @property
    def target(self) -> int:
        """The answer's first token."""
        return self.targets[0]


@dataclass(frozen=True)
class ChoiceSlot:
    """Position after the prompt, one candidate token per option, and the correct option."""

    position: int
    candidates: tuple[int, ...]
    correct: int


FINAL_MARK = "####"
_FINAL = re.compile(r"####[ \t]*([^\n]*\S)")  # GSM8K: the final answer after its last ####


def _is_space(tokenizer, tid: int) -> bool:
    return tokenizer.decode([tid]).strip() == ""


def _continuation(tokenizer, prompt: str, answer: str, tokens: Sequence[int], plen: int,
                  special: bool) -> list[int] | None:
    full = tokenizer(prompt + answer, add_special_tokens=special)["input_ids"]
    if list(full[:plen]) != list(tokens[:plen]):
        return None  # the answer merged with the end of the prompt: no clean boundary
    return list(full[plen:])


def answer_span(sample: D.Sample, text: str, prompt: str | None) -> tuple[int, int, bool] | None:
    """Where the answer is in the rendered ``text``: ``(start, end, whole)``, character offsets.

    The gold choice of a choice task (the MMLU letter ``meta["letter"]``, an ARC answer text)
    right after the prompt; else the final answer after the
    last ``####`` of the answer (GSM8K-style chain of thought: the reasoning before it is not
    the answer), starting right after ``####`` so that the space before the number is context;
    else the free-text answer after the prompt, of which only the first content token is
    scored (``whole`` False). None when the sample has no prompt/answer split.
    """
    if prompt is None or not text.startswith(prompt):
        return None
    p = len(prompt)
    rest = text[p:]
    if not rest.strip():
        return None
    letter = sample.meta.get("letter") or gold_choice(sample.meta)
    if letter:
        i = rest.find(str(letter))
        return None if i < 0 else (p, p + i + len(str(letter)), True)
    finals = list(_FINAL.finditer(rest))
    if finals:
        m = finals[-1]
        return p + m.start() + len(FINAL_MARK), p + m.end(1), True
    return p, len(text), False


def answer_slots(samples: Sequence[D.Sample], tok: D.TokenizedSet, tokenizer,
                 chat_template: bool = False) -> list[AnswerSlot | None]:
    """The answer tokens of each sample (:func:`answer_span`) and where they are predicted.

    Teacher-forced on the sample's own tokens: the answer is scored given the prompt and, for a
    GSM8K-style answer, the reasoning up to ``#### ``. Whitespace-only tokens at the start of
    the answer (a space the tokenizer splits off before digits) are context, not answer. None
    where the sample has no answer, or its answer is not a clean run of its tokens (cut off by
    ``max_length``, or merged by the tokenizer with the text around it).
    """
    special = not chat_template
    out: list[AnswerSlot | None] = []
    for s, ids in zip(samples, tok.input_ids, strict=True):
        text, prompt = D.render(s, tokenizer, chat_template)
        span = answer_span(s, text, prompt)
        if span is None:
            out.append(None)
            continue
        start, end, whole = span
        pre = list(tokenizer(text[:start], add_special_tokens=special)["input_ids"])
        full = list(tokenizer(text[:end], add_special_tokens=special)["input_ids"])
        if full[:len(pre)] != pre or list(ids[:len(pre)]) != pre:
            out.append(None)  # the answer merged with the text before it: no clean boundary
            continue
        cont = full[len(pre):]
        k = 0
        while k < len(cont) and _is_space(tokenizer, cont[k]):
            k += 1
        if k == len(cont) or len(pre) + k < 1:
            out.append(None)
            continue
        n_ans = len(cont) - k if whole else 1
        if list(ids[len(pre):len(pre) + k + n_ans]) != cont[:k + n_ans]:
            out.append(None)  # truncated, or merged with what follows
            continue
        first = len(pre) + k - 1
        out.append(AnswerSlot(tuple(range(first, first + n_ans)),
                              tuple(int(t) for t in cont[k:k + n_ans])))
    return out


def has_answer(sample: D.Sample) -> bool:
    """Whether the sample's format gives it an answer after a prompt."""
    return sample.prompt is not None and bool(sample.meta.get("letter") or gold_choice(sample.meta)
                                              or sample.answer)


def gold_choice(meta: dict) -> str | None:
    """The gold continuation's text (stripped) of a choice task's sample, or None."""
    conts, gold = meta.get("choices"), meta.get("gold")
    if not conts or gold is None or not 0 <= int(gold) < len(conts):
        return None
    return str(conts[int(gold)]).strip() or None


def _options(meta: dict) -> tuple[list[str], int] | None:
    """A choice sample's continuations and gold index: any choice task's (``meta["choices"]``,
    ``meta["gold"]``), or MMLU-style letters (``meta["letter"]``, ``meta["n_choices"]``)."""
    conts, gold = meta.get("choices"), meta.get("gold")
    if conts and gold is not None and 0 <= int(gold) < len(conts):
        return [str(c) for c in conts], int(gold)
    letter, n_choices = meta.get("letter"), meta.get("n_choices")
    if not letter or not n_choices:
        return None
    letters = D.LETTERS[: int(n_choices)]
    return ([" " + c for c in letters], letters.index(letter)) if letter in letters else None


def is_choice(sample: D.Sample) -> bool:
    """Whether the sample is an item of a choice task (it has options and a gold one)."""
    return _options(sample.meta) is not None


def choice_slots(samples: Sequence[D.Sample], tok: D.TokenizedSet, tokenizer,
                 chat_template: bool = False) -> tuple[list[ChoiceSlot | None], int]:
    """Multiple-choice slots for the samples of any choice task (:func:`_options`).

    Each option is scored by the log-probability of the first token of its continuation
    (`` A``, `` B``, ... for MMLU; the answer texts for ARC or HellaSwag), in context, right
    after the prompt; items whose options do not start with distinct tokens are left out
    (their count is returned).
    """
    special = not chat_template
    out: list[ChoiceSlot | None] = []
    n_ambiguous = 0
    for s, ids, plen in zip(samples, tok.input_ids, tok.prompt_lengths, strict=True):
        opts = _options(s.meta)
        if plen is None or opts is None or s.prompt is None:
            out.append(None)
            continue
        _, prompt = D.render(s, tokenizer, chat_template)
        conts, gold = opts
        firsts = []
        for c in conts:
            cont = _continuation(tokenizer, prompt or "", c.lstrip() if chat_template else c,
                                 ids, plen, special)
            firsts.append(cont[0] if cont else None)
        if None in firsts or len(set(firsts)) != len(firsts):
            n_ambiguous += 1
            out.append(None)
            continue
        out.append(ChoiceSlot(plen - 1, tuple(int(t) for t in firsts), gold))
    return out, n_ambiguous


# ---------------------------------------------------------------------------------------------
# The streamed pass


@dataclass
class LensSums:
    """Per-sample sums over one tokenized set, columns = ``layers`` (hidden-state ``j``).

    A plain container of per-sample arrays: the sums of disjoint sample sets add up (rows are
    samples), so partial results of several processes can be gathered and combined.
    """

    layers: list[int]
    tokens: np.ndarray            # [N] scored next-token positions per sample
    correct: np.ndarray           # [N, J] top-1 == target counts
    loss: np.ndarray              # [N, J] summed cross-entropy (nats)
    answer_prob: np.ndarray       # [N, J] probability of the whole answer (NaN: no answer)
    answer_rank: np.ndarray       # [N, J] rank of its first token, 1 = top (NaN: no answer)
    choice_correct: np.ndarray    # [N, J] 1/0 (NaN where no choice slot)
    agree: np.ndarray | None = None          # [N, J] top-1 agreement counts with a reference
    top1: dict[int, np.ndarray] | None = field(default=None, repr=False)  # sample -> [J, T_i]

    @property
    def has_answer(self) -> np.ndarray:
        return ~np.isnan(self.answer_prob[:, 0]) if self.answer_prob.size else np.zeros(0, bool)

    @property
    def has_choice(self) -> np.ndarray:
        return ~np.isnan(self.choice_correct[:, 0]) if self.choice_correct.size else \
            np.zeros(0, bool)


def n_blocks_of(model: nn.Module) -> int:
    """Number of decoder blocks ``L``."""
    return len(get_blocks(model))


def _slices(rows: torch.Tensor, starts: list[int], total: int) -> list[tuple[int, int]]:
    """For entries sorted by their lens row, the entry range of each chunk of rows."""
    if not rows.numel():
        return [(0, 0)] * len(starts)
    cut = torch.searchsorted(rows, torch.tensor([*starts, total], dtype=rows.dtype)).tolist()
    return list(zip(cut[:-1], cut[1:], strict=True))


class _LensReducer:
    """Hook callback of ``lens_pass``: per-sample lens sums of one batch at the chosen layers.

    Per batch, the positions anything is scored at (next-token entries, answer tokens, choice
    slots) are collected once as unique ``(row, position)`` pairs; at each chosen layer only
    those states are kept (a copy of ``rows x D``), and they go through the final norm and the
    head ``rows_per_chunk`` rows at a time, rows of several layers together when they fit (the
    head's weights are then read once per batch, not once per layer). Each kind of entry keeps
    the index of its lens row (entries are built in row order).
    """

    def __init__(self, sums: LensSums, lens: Lens, col: dict[int, int], rows_per_chunk: int,
                 positions: Sequence[Sequence[int]] | None,
                 answers: Sequence[AnswerSlot | None] | None,
                 choices: Sequence[ChoiceSlot | None] | None, record_top1: bool,
                 ref_top1: dict[int, np.ndarray] | None,
                 transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.sums, self.lens, self.col = sums, lens, col
        self.transform = transform
        self.rows_per_chunk = rows_per_chunk
        self.positions = positions
        self.answers, self.choices = answers, choices
        self.record_top1, self.ref_top1 = record_top1, ref_top1
        self.ctx: dict[str, Any] = {}
        self.pending: list[tuple[int, int, int, torch.Tensor]] = []  # (column, chunk, row, h)
        self.n_pending = 0

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        ctx = self.ctx
        key = (name, str(device))
        if key not in ctx["cache"]:
            ctx["cache"][key] = ctx[name].to(device)
        return ctx["cache"][key]

    def _token_entries(self, batch: HookedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None:  # every pair of real tokens: no padding enters
            valid = batch.mask[:, :-1] & batch.mask[:, 1:]
            return valid.nonzero(as_tuple=True)
        rows = [r for r, i in enumerate(batch.index) for _ in self.positions[i]]
        ts = [t for i in batch.index for t in self.positions[i]]
        return torch.tensor(rows, dtype=torch.long), torch.tensor(ts, dtype=torch.long)

    def start(self, batch: HookedBatch) -> None:
        ctx, out_dev, n_cols = self.ctx, self.lens.device, len(self.col)
        ids = batch.input_ids
        bsz, width = ids.shape
        ctx.clear()
        self.pending, self.n_pending = [], 0
        ctx["cache"] = {}
        tb, tt = self._token_entries(batch)
        ctx.update(tb=tb, n_tok=int(tb.numel()), counts=torch.bincount(tb, minlength=bsz),
                   targets=ids[tb, tt + 1])
        ctx.update({name: torch.zeros((n_cols, bsz), device=out_dev)
                    for name in ("loss", "correct", "agree")})
        if self.record_top1:
            ctx["top1"] = torch.zeros((n_cols, ctx["n_tok"]), dtype=torch.long, device=out_dev)
        if self.ref_top1 is not None:
            parts = [torch.as_tensor(self.ref_top1[i], dtype=torch.long) for i in batch.index]
            ref = torch.cat(parts, dim=1) if parts else torch.zeros((n_cols, 0))
            if ref.shape != (n_cols, ctx["n_tok"]):
                raise SftscopeError("reference top-1 ids do not match this data; run both "
                                    "models on the same tokenized samples and positions")
            ctx["ref"] = ref
        # answer tokens: one entry per token, grouped by slot (k = the slot's index here)
        a_rows = [(r, self.answers[i]) for r, i in enumerate(batch.index)
                  if self.answers is not None and self.answers[i] is not None]
        ab = [r for r, a in a_rows for _ in a.positions]
        at = [t for _, a in a_rows for t in a.positions]
        ctx.update(a_rows=a_rows,
                   atarget=torch.tensor([t for _, a in a_rows for t in a.targets],
                                        dtype=torch.long),
                   aslot=torch.tensor([k for k, (_, a) in enumerate(a_rows)
                                       for _ in a.positions], dtype=torch.long),
                   afirst=torch.tensor([q == 0 for _, a in a_rows
                                        for q in range(len(a.positions))], dtype=torch.bool),
                   alogp=torch.zeros((n_cols, len(a_rows)), device=out_dev),
                   arank=torch.zeros((n_cols, len(a_rows)), device=out_dev))
        c_rows = [(r, self.choices[i]) for r, i in enumerate(batch.index)
                  if self.choices is not None and self.choices[i] is not None]
        width_c = max((len(ch.candidates) for _, ch in c_rows), default=1)
        cand = torch.full((len(c_rows), width_c), -1, dtype=torch.long)
        for k, (_, ch) in enumerate(c_rows):
            cand[k, : len(ch.candidates)] = torch.tensor(ch.candidates)
        ctx.update(c_rows=c_rows, ccand=cand,
                   cright=torch.tensor([ch.correct for _, ch in c_rows], dtype=torch.long),
                   ccorrect=torch.zeros((n_cols, len(c_rows)), device=out_dev))
        # the unique (row, position) pairs that go through the lens
        keys = torch.cat([tb * width + tt,
                          torch.tensor(ab, dtype=torch.long) * width
                          + torch.tensor(at, dtype=torch.long),
                          torch.tensor([r * width + ch.position for r, ch in c_rows],
                                       dtype=torch.long)])
        ukeys, inv = torch.unique(keys, sorted=True, return_inverse=True)
        n_rows = int(ukeys.numel())
        trow, arow, crow = inv.split([ctx["n_tok"], len(ab), len(c_rows)])
        assert all(bool((x[1:] >= x[:-1]).all()) for x in (trow, arow, crow)), "row order"
        starts = list(range(0, n_rows, self.rows_per_chunk))
        ctx.update(ub=ukeys // width, ut=ukeys % width, n_rows=n_rows, starts=starts,
                   trow=trow, arow=arow, crow=crow,
                   tcut=_slices(trow, starts, n_rows), acut=_slices(arow, starts, n_rows),
                   ccut=_slices(crow, starts, n_rows))

    def __call__(self, j: int, h: torch.Tensor) -> None:
        c = self.col.get(j)
        if c is None or not self.ctx["n_rows"]:
            return
        ctx, step, norm_dev = self.ctx, self.rows_per_chunk, self.lens.norm_device
        ub, ut = self._on("ub", h.device), self._on("ut", h.device)
        for q, s in enumerate(ctx["starts"]):
            e = min(s + step, ctx["n_rows"])
            rows = h[ub[s:e], ut[s:e]]  # a copy of the states something is scored at
            if self.transform is not None:  # e.g. the tuned lens's translator of state j
                rows = self.transform(j, rows)
            if norm_dev is not None:
                rows = rows.to(norm_dev)
            if self.n_pending + (e - s) > step:
                self._flush()
            self.pending.append((c, q, s, rows))
            self.n_pending += e - s

    def _flush(self) -> None:
        """Project the pending rows (of one or more layers) through the lens in one pass: with
        few scored positions per layer (answers), the head's ``V x D`` weights are read once
        per batch rather than once per layer."""
        if not self.pending:
            return
        logits = self.lens(torch.cat([p[3] for p in self.pending]))
        off = 0
        for c, q, s, rows in self.pending:
            n = rows.shape[0]
            self._score(c, q, s, logits[off:off + n])
            off += n
        self.pending, self.n_pending = [], 0

    def _targets(self, kind: str, q: int, s: int, logits: torch.Tensor) -> tuple[Any, ...] | None:
        """Chunk ``q``'s scored rows of one kind (``t``: tokens, ``a``: answers): their
        range ``lo, hi``, lens rows ``r`` (relative to lens row ``s``), targets ``t``, the
        index they add into (sample ``tb`` or answer slot ``aslot``) and the targets' logits;
        None when the chunk has none."""
        lo, hi = self.ctx[f"{kind}cut"][q]
        if hi <= lo:
            return None
        names = {"t": ("trow", "targets", "tb"), "a": ("arow", "atarget", "aslot")}[kind]
        r, t, index = (self._on(name, self.lens.device)[lo:hi] for name in names)
        r = r - s
        return lo, hi, r, t, index, logits[r, t]

    def _score(self, c: int, q: int, s: int, logits: torch.Tensor) -> None:
        """Reduce the lens logits of chunk ``q`` (lens rows ``s..``) of layer column ``c``."""
        ctx, on, out_dev = self.ctx, self._on, self.lens.device
        lse = logits.logsumexp(-1)
        top1 = logits.argmax(-1)
        got = self._targets("t", q, s, logits)
        if got is not None:
            lo, hi, r, t, rs, tl = got
            ctx["loss"][c].index_add_(0, rs, lse[r] - tl)
            hit = top1[r]
            ctx["correct"][c].index_add_(0, rs, (hit == t).float())
            if self.record_top1:
                ctx["top1"][c, lo:hi] = hit
            if "ref" in ctx:
                ref = on("ref", out_dev)[c, lo:hi]
                ctx["agree"][c].index_add_(0, rs, (hit == ref).float())
        got = self._targets("a", q, s, logits)
        if got is not None:
            lo, hi, r, t, k, tl = got
            ctx["alogp"][c].index_add_(0, k, tl - lse[r])
            first = on("afirst", out_dev)[lo:hi]
            if bool(first.any()):
                rf = r[first]
                ctx["arank"][c, k[first]] = (logits[rf] > tl[first][:, None]).sum(-1).float() + 1
        lo, hi = ctx["ccut"][q]
        if hi > lo:
            r = on("crow", out_dev)[lo:hi] - s
            cand_ids = on("ccand", out_dev)[lo:hi]
            cand = logits[r[:, None], cand_ids.clamp(min=0)]
            cand = cand.masked_fill(cand_ids < 0, -math.inf)
            ctx["ccorrect"][c, lo:hi] = (cand.argmax(-1) == on("cright", out_dev)[lo:hi]).float()

    def finish(self, batch: HookedBatch) -> None:
        self._flush()
        ctx, sums = self.ctx, self.sums
        a_rows, c_rows = ctx["a_rows"], ctx["c_rows"]
        idx = np.asarray(batch.index)
        counts = ctx["counts"]
        sums.tokens[idx] += counts.numpy()
        sums.loss[idx] += ctx["loss"].double().cpu().numpy().T
        sums.correct[idx] += ctx["correct"].double().cpu().numpy().T
        if sums.agree is not None:
            sums.agree[idx] += ctx["agree"].double().cpu().numpy().T
        if a_rows:
            ai = idx[[r for r, _ in a_rows]]
            sums.answer_prob[ai] = ctx["alogp"].double().exp().cpu().numpy().T
            sums.answer_rank[ai] = ctx["arank"].double().cpu().numpy().T
        if c_rows:
            ci = idx[[r for r, _ in c_rows]]
            sums.choice_correct[ci] = ctx["ccorrect"].double().cpu().numpy().T
        if self.record_top1:
            top = ctx["top1"].to(torch.int32).cpu().numpy()
            start = 0
            for i, cnt in zip(batch.index, counts.tolist(), strict=True):
                sums.top1[i] = top[:, start:start + cnt].copy()
                start += cnt


def answer_positions(answers: Sequence[AnswerSlot | None]) -> list[list[int]]:
    """The next-token positions of ``--tokens answer``: each sample's answer tokens."""
    return [list(a.positions) if a is not None else [] for a in answers]


def lens_pass(model: nn.Module, tok: D.TokenizedSet, pad_id: int, *, batch_size: int = 8,
              layers: Sequence[int] | None = None,
              positions: Sequence[Sequence[int]] | None = None,
              answers: Sequence[AnswerSlot | None] | None = None,
              choices: Sequence[ChoiceSlot | None] | None = None,
              record_top1: bool = False, ref_top1: dict[int, np.ndarray] | None = None,
              chunk_elements: int = DEFAULT_CHUNK, description: str = "lens",
              indices: Sequence[int] | None = None,
              transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> LensSums:
    """Stream ``model`` over ``tok`` and reduce the lens at ``layers`` (default all ``0..L``).

    Teacher-forced: position ``t`` predicts token ``t+1``. Next-token accuracy, loss and
    agreement count the positions ``positions[i]`` of sample ``i`` (default: every pair of
    real tokens). Only the positions something is scored at (those, the answer tokens, the
    choice slots) go through the final norm and the head, in chunks of at most
    ``chunk_elements`` logits. ``record_top1`` keeps the top-1 ids per scored position (int32,
    for agreement later); ``ref_top1`` (from such a pass over the same set and positions) is
    compared with this model's top-1. One forward pass per batch through
    ``capture.engine.run_hooked`` (right padding; a NaN/Inf at a real position stops the pass).
    ``indices``: only these samples (a rank's share); the other rows keep their initial
    values (``merge_sums`` joins the shares). ``transform(j, rows)``: applied to the states of
    layer ``j`` before the lens (the tuned lens's translators).
    """
    n_layers = n_blocks_of(model)
    layers = list(range(n_layers + 1)) if layers is None else [int(j) for j in layers]
    bad = [j for j in layers if not 0 <= j <= n_layers]
    if bad:
        raise SftscopeError(f"layer {bad[0]} does not exist; hidden states are 0..{n_layers}")
    col = {j: c for c, j in enumerate(layers)}
    n, n_cols = len(tok), len(layers)
    if batch_size < 1:
        raise SftscopeError(f"--batch-size must be at least 1, got {batch_size}")
    if positions is not None:
        if len(positions) != n:
            raise SftscopeError(f"positions are given for {len(positions)} samples, the data "
                                f"has {n}")
        positions = [sorted(int(t) for t in p) for p in positions]
        for i, p in enumerate(positions):
            if p and (p[0] < 0 or p[-1] >= len(tok.input_ids[i]) - 1):
                raise SftscopeError(f"sample {i}: positions {p[0]}..{p[-1]} do not all predict "
                                    f"one of its {len(tok.input_ids[i])} tokens")
    lens = Lens(model)
    rows_per_chunk = max(1, chunk_elements // max(lens.vocab, 1))
    nan = np.full((n, n_cols), np.nan)
    sums = LensSums(layers, np.zeros(n), np.zeros((n, n_cols)), np.zeros((n, n_cols)),
                    nan.copy(), nan.copy(), nan.copy(),
                    agree=np.zeros((n, n_cols)) if ref_top1 is not None else None,
                    top1={} if record_top1 else None)
    red = _LensReducer(sums, lens, col, rows_per_chunk, positions, answers, choices,
                       record_top1, ref_top1, transform)
    run_hooked(model, tok, batch_size, pad_id, red, description=description,
               label=description, indices=indices)
    return sums


def merge_sums(parts: Sequence[tuple[Sequence[int], LensSums | None]]) -> LensSums:
    """The per-sample sums of every rank's share ``(indices, sums)`` in one ``LensSums``:
    each sample's rows come from the share that ran it (copies, so the numbers are those of
    one process). Every per-sample array field (first axis = samples) is merged so; any other
    array is an accumulator over samples and is summed; ``top1`` dicts are joined."""
    got = [(list(i), p) for i, p in parts if p is not None]
    if not got:
        raise SftscopeError("no lens sums to merge: no process ran a sample")
    out = copy.deepcopy(got[0][1])
    n = len(out.tokens)
    for idx, part in got[1:]:
        rows = np.asarray(idx, dtype=np.int64)
        for f in dataclasses.fields(part):
            val = getattr(part, f.name)
            if isinstance(val, np.ndarray) and val.ndim >= 1 and val.shape[0] == n:
                getattr(out, f.name)[rows] = val[rows]
            elif isinstance(val, np.ndarray):
                setattr(out, f.name, getattr(out, f.name) + val)
            elif isinstance(val, dict) and getattr(out, f.name) is not None:
                getattr(out, f.name).update({i: val[i] for i in idx if i in val})
    return out


def agreement_counts(top1: dict[int, np.ndarray], ref: dict[int, np.ndarray],
                     n: int, n_cols: int) -> np.ndarray:
    """Per sample and layer, how many scored positions two passes' top-1 ids agree at (the
    ``agree`` sums of a pass run with ``ref_top1=ref``, counted afterwards from two recorded
    passes over the same samples and positions)."""
    out = np.zeros((n, n_cols))
    for i, ids in top1.items():
        other = ref.get(i)
        if other is None or other.shape != ids.shape:
            raise SftscopeError("top-1 ids of two passes do not match; run both models on the "
                                "same tokenized samples and positions")
        out[i] = (ids == other).sum(axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# Tables


def _row(layer, model, metric, value, lo, hi, n) -> dict[str, Any]:
    return {"layer": layer, "model": model, "metric": metric, "value": float(value),
            "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


def sums_table(sums: LensSums, model: str, level: float = 0.95, n_boot: int = 1000,
               seed: int = 0, agreement_label: str = "pair") -> pd.DataFrame:
    """Tidy rows (layer, model, metric, value, ci_low, ci_high, n) of one pass.

    Token-level ratios (``accuracy``, ``loss``, ``agreement``: sums over the scored tokens of
    all samples over their number, ``n`` = tokens) and per-sample means (``answer_prob``,
    ``answer_rank``: ``n`` = samples with an answer) get a sample-level (cluster) interval
    (``metrics.stats.cluster_ratio_ci``: Wilson on the effective number of samples for the
    proportions, the studentised cluster bootstrap with ``n_boot`` resamples, seeded, for
    loss and rank; ``n_boot`` 0 = no interval). ``choice_accuracy`` (one 0/1 per item,
    items independent) keeps the Wilson interval. Probabilities' intervals stay in [0, 1].
    """
    rows: list[dict[str, Any]] = []
    n_tok = int(sums.tokens.sum())
    has_a, has_c = sums.has_answer, sums.has_choice
    unit = (0.0, 1.0)
    agr_ci = None

    def boot(num: np.ndarray, den: np.ndarray, bounds=None) -> tuple[np.ndarray, np.ndarray]:
        return cluster_ratio_ci(num, den, n_boot=n_boot, level=level, seed=seed, bounds=bounds,
                                proportion=bounds == unit)

    if n_tok:
        acc_ci = boot(sums.correct, sums.tokens, unit)
        loss_ci = boot(sums.loss, sums.tokens, (0.0, math.inf))
        agr_ci = boot(sums.agree, sums.tokens, unit) if sums.agree is not None else None
    if has_a.any():
        ones = np.ones(int(has_a.sum()))
        prob_ci = boot(sums.answer_prob[has_a], ones, unit)
        rank_ci = boot(sums.answer_rank[has_a], ones, (1.0, math.inf))
    for c, j in enumerate(sums.layers):
        if n_tok:
            rows.append(_row(j, model, "accuracy", sums.correct[:, c].sum() / n_tok,
                             acc_ci[0][c], acc_ci[1][c], n_tok))
            rows.append(_row(j, model, "loss", sums.loss[:, c].sum() / n_tok,
                             loss_ci[0][c], loss_ci[1][c], n_tok))
        if has_a.any():
            for metric, arr, ci in (("answer_prob", sums.answer_prob, prob_ci),
                                    ("answer_rank", sums.answer_rank, rank_ci)):
                v = arr[has_a, c]
                rows.append(_row(j, model, metric, v.mean(), ci[0][c], ci[1][c], v.size))
        if has_c.any():
            v = sums.choice_correct[has_c, c]
            k = int(v.sum())
            rows.append(_row(j, model, "choice_accuracy", k / v.size,
                             *proportion_ci(k, v.size, level), v.size))
        if agr_ci is not None and n_tok:
            rows.append(_row(j, agreement_label, "agreement", sums.agree[:, c].sum() / n_tok,
                             agr_ci[0][c], agr_ci[1][c], n_tok))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Shared set-up (probe and swap)


def choices_noted(samples: Sequence[D.Sample], tok: D.TokenizedSet, tokenizer,
                  chat_template: bool, notes: list[str]) -> list[ChoiceSlot | None]:
    """``choice_slots``, with a note in ``notes`` when items are left out (probe and swap)."""
    choices, n_amb = choice_slots(samples, tok, tokenizer, chat_template)
    if n_amb:
        notes.append(f"{n_amb} multiple-choice items left out of choice_accuracy: their "
                     f"options do not start with distinct tokens")
    return choices


TOP1_COLUMNS = ["model", "sample", "position", "layer", "token_id", "token", "target_id",
                "target", "correct"]


def top1_rows(sums: LensSums, model: str, tok: D.TokenizedSet, tokenizer,
              positions: Sequence[Sequence[int]] | None,
              answers: Sequence[AnswerSlot | None], n: int) -> list[dict[str, Any]]:
    """The lens's top-1 token at every layer for the samples below ``n`` that this pass
    recorded (``sums.top1``): at the position predicting the answer's first token when the
    sample has one among the scored positions, else at its last scored position."""
    rows: list[dict[str, Any]] = []
    for i in sorted(k for k in (sums.top1 or {}) if k < n):
        ids = sums.top1[i]  # [J, scored positions of sample i, ascending]
        scored = (list(positions[i]) if positions is not None
                  else list(range(len(tok.input_ids[i]) - 1)))
        if not scored:
            continue
        a = answers[i]
        col = scored.index(a.position) if a is not None and a.position in scored else -1
        pos = scored[col]
        target = int(tok.input_ids[i][pos + 1])
        for c, layer in enumerate(sums.layers):
            tid = int(ids[c, col])
            rows.append({"model": model, "sample": i, "position": pos, "layer": layer,
                         "token_id": tid, "token": tokenizer.decode([tid]),
                         "target_id": target, "target": tokenizer.decode([target]),
                         "correct": tid == target})
    return rows


def tuned_lens_pass(model: nn.Module, label: str, tok: D.TokenizedSet, train_tok: D.TokenizedSet,
               pad_id: int, cfg: ProbeConfig, fingerprint: dict[str, Any], *,
               positions: Sequence[Sequence[int]] | None, answers: Any, choices: Any,
               indices: Sequence[int] | None) -> tuple[Any, dict[str, Any]]:
    """One model's tuned-lens sums (every lens metric) and its KL-to-final sums for both
    lenses, with what training did."""
    options = {"steps": cfg.lens_steps, "lr": cfg.lens_lr, "train": cfg.lens_train or cfg.data,
               "limit": cfg.lens_train_limit, "seed": cfg.seed, "max_length": cfg.max_length,
               "train_ids": stable_hash(train_tok.input_ids)}
    key = translator_key(fingerprint, options)
    tr, info = translators_for(
        model, cfg.translators, label, key,
        lambda: train_translators(model, train_tok, pad_id, steps=cfg.lens_steps,
                                  lr=cfg.lens_lr, batch_size=cfg.batch_size, seed=cfg.seed))
    sums = lens_pass(model, tok, pad_id, batch_size=cfg.batch_size, positions=positions,
                     answers=answers, choices=choices, chunk_elements=cfg.chunk_elements,
                     description=f"tuned lens {label}", indices=indices, transform=tr)
    kl = kl_to_final_sums(model, tr, tok, pad_id, batch_size=cfg.batch_size,
                          positions=positions, chunk_elements=cfg.chunk_elements,
                          indices=indices)
    return (sums, kl), {**info, "key": key, "options": options}


def tuned_phase(specs: dict[str, str], opts: dict[str, LoadOptions], fps: dict[str, Any],
                tok: D.TokenizedSet, train_tok: D.TokenizedSet, pad_id: int, cfg: ProbeConfig,
                *, positions: Sequence[Sequence[int]] | None, answers: Any, choices: Any,
                share: Sequence[int]) -> dict[str, Any]:
    """:func:`tuned_lens_pass` for every model of a probe run (each loaded for it, released
    after) on this process's ``share``."""
    found: dict[str, Any] = {}
    for k, spec in specs.items() if share else ():
        stage(f"tuned lens {k}")
        m = load_model(spec, opts[k])
        nbytes = model_bytes(m)
        try:
            found[k] = tuned_lens_pass(m, k, tok, train_tok, pad_id, cfg, fps[k],
                                       positions=positions, answers=answers, choices=choices,
                                       indices=share)
        finally:
            del m
            release(nbytes)
    return found


def tuned_tables(tparts: list[Any], specs: dict[str, str], cfg: ProbeConfig
                 ) -> tuple[list[pd.DataFrame], dict[str, Any]]:
    """The tuned lens's rows of every model (every lens metric, kl_to_final of both lenses)
    from the gathered shares, and what training did per model."""
    tables, infos = [], {}
    for k in specs:
        got = [(i, f[k]) for i, f in tparts if k in f]
        sums = merge_sums([(i, g[0][0]) for i, g in got])
        kl = tuple(sum(g[0][1][q] for _, g in got) for q in range(3))
        tables.append(sums_table(sums, k + TUNED_SUFFIX, level=cfg.level, n_boot=cfg.bootstrap,
                                 seed=cfg.seed))
        tables.append(kl_table(kl, k, level=cfg.level, n_boot=cfg.bootstrap, seed=cfg.seed))
        infos[k] = got[0][1][1]
    return tables, infos


DISTRIBUTIONS_RECORD = (
    "kl_pair: mean over the scored next-token positions of KL(P_b,j || P_a,j) of the pair's "
    "lens distributions (natural log; a = base or the earlier stage); kl_to_final: KL(P_L || "
    "P_j) per model; shift_*: share of scored positions where the base ranks the fine-tune's "
    "top-1 token 1st, 2nd-3rd or lower (URIAL); sample-level bootstrap intervals")


def distribution_tables(dparts: list[Any], pairs: Sequence[Any], tokenizer: Any,
                        cfg: ProbeConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Probe rows (kl_pair, kl_to_final, shift_*) and shifts.csv of every pair, from the
    gathered shares ``(indices, {pair: DistSums})`` of each process."""
    rows, shifts = [], []
    for p in pairs:
        merged = merge_dist_sums([(i, d.get(p.model)) for i, d in dparts])
        rows.append(distribution_table(merged, p.model, p.a, p.b, level=cfg.level,
                                       n_boot=cfg.bootstrap, seed=cfg.seed))
        shifts.append(shifts_table(merged, p.model, tokenizer, cfg.shifts_top))
    table = pd.concat(rows, ignore_index=True)
    table = table.drop_duplicates(["layer", "model", "metric"]).reset_index(drop=True)
    return table, pd.concat(shifts, ignore_index=True)


def model_label(spec: str, base: str | None = None) -> str:
    """A short name for a model: an adapter's tune run, the folder name or the hub id."""
    return source_label(spec, base)


def prepare_data(data: str, tokenizer, *, n: int | None, seed: int, max_length: int,
                 chat_template: bool, text_field: str | None, template: str | None,
                 split: str | None = None, skip_bad: bool = False
                 ) -> tuple[list[D.Sample], D.TokenizedSet, list[str]]:
    """``load.data.prepare`` (the one data path) plus what next-token probing needs: at
    least two tokens somewhere."""
    if n is not None and n < 1:
        raise SftscopeError(f"--n must be at least 1, got {n}")
    if max_length < 2:
        raise SftscopeError(f"--max-length must be at least 2, got {max_length}")
    samples, tok, notes = D.prepare(data, tokenizer, text_field=text_field, template=template,
                                    split=split, n=n, seed=seed, max_length=max_length,
                                    chat_template=chat_template, skip_bad=skip_bad)
    if not any(len(ids) > 1 for ids in tok.input_ids):
        raise SftscopeError(f"data {data}: no text has two tokens or more; nothing to predict")
    return samples, tok, notes


def pick_tokenizer(choice: str | None, default: str, specs: dict[str, str],
                   revs: dict[str, str | None], bases: dict[str, str | None] | None = None,
                   base_revision: str | None = None):
    """``choice``: None (model ``default``'s), a model label (``base``/``sft``) or a path.
    ``bases``: what an adapter among ``specs`` applies to."""
    if choice is None:
        choice = default
    if choice in specs:
        return load_tokenizer(specs[choice], revision=revs.get(choice),
                              base=(bases or {}).get(choice), base_revision=base_revision)
    return load_tokenizer(choice)


# ---------------------------------------------------------------------------------------------
# The experiment


@dataclass
class ProbePlan:
    """What ``probe`` validated and prepared before any model runs: the run context (the
    models, tokenizer, tokenized data, notes and run folder; a pair's chain ``stages`` and
    ``pairs``), the samples with their answers, choices and scored positions, and this
    process's ``share``."""

    cfg: ProbeConfig
    par: Any
    timer: Timer
    stages: list[Stage]
    pairs: list[Any]
    ctx: RunContext
    samples: list[D.Sample] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    choices: list[Any] = field(default_factory=list)
    positions: list[list[int]] | None = None
    train_tok: Any = None
    share: list[int] = field(default_factory=list)
    opts: dict[str, LoadOptions] = field(default_factory=dict)

    @property
    def pair(self) -> bool:
        return self.cfg.model is None

    @property
    def kl(self) -> bool:
        return self.pair and self.cfg.kl

    @property
    def tuned(self) -> bool:
        return self.cfg.lens == "tuned"


def _probe_models(cfg: ProbeConfig, par: Any, timer: Timer) -> ProbePlan:
    """The plan's models: the base then each SFT-side stage of a pair (an adapter applies to
    ``--base``), or the one model, in the plan's run context."""
    out = Path(cfg.out) if cfg.out is not None else None
    if cfg.model is None:
        stages = [Stage(FIRST, cfg.sft, cfg.sft_revision), *cfg.chain()]
        pairs = chain_pairs([st.label for st in stages], cfg.consecutive)
        specs = {BASE: cfg.base, **{st.label: st.spec for st in stages}}
        revs = {BASE: cfg.base_revision, **{st.label: st.revision for st in stages}}
        bases = {BASE: None, **{st.label: cfg.base for st in stages}}
        return ProbePlan(cfg, par, timer, stages, pairs,
                         RunContext("probe", out, Models(specs, revs, bases)))
    label = model_label(cfg.model, cfg.base)
    models = Models({label: cfg.model}, {label: cfg.revision}, {label: cfg.base})
    return ProbePlan(cfg, par, timer, [], [], RunContext("probe", out, models))


def _probe_tokenizer(p: ProbePlan) -> None:
    """Check the model (or the pair's chain) and pick the tokenizer (``p.ctx.tokenizer``)."""
    cfg, ctx, models = p.cfg, p.ctx, p.ctx.models
    if not p.pair:  # the one model's config (a pair's: checked with the chain)
        load_config(cfg.model, revision=cfg.revision, base=cfg.base,
                    base_revision=cfg.base_revision)
        check_adapter_base(cfg.model, cfg.base, cfg.revision, base_revision=cfg.base_revision,
                           allow_other_base=cfg.allow_other_base)
        ctx.tokenizer = pick_tokenizer(cfg.tokenizer, next(iter(models.specs)), models.specs,
                                       models.revs, models.bases, cfg.base_revision)
        return
    _, chain_notes = check_chain(cfg.base, p.stages, base_revision=cfg.base_revision,
                                 allow_mixed=cfg.allow_mixed_pair,
                                 allow_other_base=cfg.allow_other_base)
    ctx.tokenizer, tok_notes = pair_tokenizer(models.specs["base"], models.specs["sft"],
                                              cfg.tokenizer, revisions=models.revs,
                                              chat_template=cfg.chat_template)
    ctx.notes += chain_notes + tok_notes + check_chain_tokenizers(
        ctx.tokenizer, cfg.base, p.stages, base_revision=cfg.base_revision)


def _probe_data(p: ProbePlan) -> None:
    """The data, its answers (with a note on those lost), scored positions, choices and the
    tuned lens's training split."""
    cfg, ctx = p.cfg, p.ctx
    p.samples, ctx.tokens, data_notes = prepare_data(
        cfg.data, ctx.tokenizer, n=cfg.limit, seed=cfg.seed, max_length=cfg.max_length,
        chat_template=cfg.chat_template, text_field=cfg.text_field, template=cfg.template,
        split=cfg.split, skip_bad=cfg.skip_bad_records)
    ctx.notes += data_notes
    p.answers = answer_slots(p.samples, ctx.tokens, ctx.tokenizer, cfg.chat_template)
    n_lost = sum(a is None and has_answer(s) for s, a in zip(p.samples, p.answers, strict=True))
    if n_lost:
        ctx.notes.append(f"{n_lost} of {len(p.samples)} answers are not a clean run of their "
                       f"sample's tokens (cut off by --max-length, or merged by the tokenizer "
                       f"with the text around them): no answer_prob/answer_rank for them")
    if cfg.tokens == "answer":
        if not any(a is not None for a in p.answers):
            raise SftscopeError(f"--tokens answer scores the answers' tokens, but no sample of "
                                f"{cfg.data} has an answer to score (use a task format such as "
                                f"gsm8k: or mmlu:, or --tokens all)")
        p.positions = answer_positions(p.answers)
    p.choices = choices_noted(p.samples, ctx.tokens, ctx.tokenizer, cfg.chat_template,
                              ctx.notes)
    if p.tuned:
        p.train_tok, lens_notes = training_split(cfg, ctx.tokenizer, p.samples)
        ctx.notes += lens_notes


def plan_probe(cfg: ProbeConfig) -> ProbePlan:
    """Validate everything (every rank alike: all pass or all fail), prepare the data, open
    the run folder and announce the stages."""
    p = _probe_models(cfg, join(cfg.device, cfg.device_map), Timer())
    with validating(p.par, cfg, "probe", p.timer) as device:
        _probe_tokenizer(p)
        _probe_data(p)
    p.ctx.say_notes()
    p.opts = p.ctx.load_options(cfg, device=device)
    p.ctx.start(ProbeConfig.OUTPUTS, main=p.par.main)
    p.share = p.par.shard(len(p.ctx.tokens), cfg.batch_size)  # all samples when alone
    # one lens pass per model, each pair's distributions, each model's tuned lens, the tables
    n_models = len(p.ctx.models.specs)
    plan(n_models + (len(p.pairs) if p.kl else 0) + (n_models if p.tuned else 0) + 1)
    return p


def _lens_passes(p: ProbePlan, shown: list[dict[str, Any]]
                 ) -> tuple[dict[str, LensSums], int | None]:
    """This process's logit-lens sums of every model (loaded one after the other) and, for a
    chain's consecutive pairs, their agreement; ``shown`` gets the top1.csv rows."""
    cfg, pair, ctx = p.cfg, p.pair, p.ctx
    found: dict[str, LensSums] = {}
    ref_top1 = None
    prev: tuple[str, dict[int, np.ndarray]] | None = None
    n_blocks = None
    for k, spec in ctx.models.specs.items() if p.share else ():
        stage(f"probe {k}")
        with p.timer(f"load_{k}"):
            m = load_model(spec, p.opts[k])
        nbytes = model_bytes(m)
        try:
            check_vocab(m, ctx.tokens.input_ids, k)
            n_blocks = n_blocks_of(m)
            with p.timer(f"pass_{k}"):
                sums = lens_pass(m, ctx.tokens, ctx.pad_id, batch_size=cfg.batch_size,
                                 positions=p.positions, answers=p.answers, choices=p.choices,
                                 record_top1=(pair and (k == BASE or cfg.consecutive))
                                 or cfg.top1_examples > 0,
                                 ref_top1=ref_top1, chunk_elements=cfg.chunk_elements,
                                 description=f"probe {k}", indices=p.share)
        finally:
            del m
            release(nbytes)
        if cfg.top1_examples:
            shown.extend(top1_rows(sums, k, ctx.tokens, ctx.tokenizer, p.positions, p.answers,
                                   cfg.top1_examples))
        if pair and k == BASE:
            ref_top1 = sums.top1
        elif pair and cfg.consecutive:  # agreement with the stage before, from the ids
            if prev is not None:
                agree = agreement_counts(sums.top1, prev[1], len(ctx.tokens), len(sums.layers))
                found[pair_label(prev[0], k)] = dataclasses.replace(sums, agree=agree,
                                                                    top1=None)
            prev = (k, sums.top1)
        found[k] = sums
    for sums in found.values():
        sums.top1 = None  # agreement is counted; the ids need not travel
    return found, n_blocks


@dataclass
class ProbeParts:
    """What every process computed, gathered on rank 0: the lens passes ``(share, found,
    n_blocks, top1 rows)``, the pairs' distributions and the tuned lens."""

    parts: list[Any]
    dparts: list[Any] | None
    tparts: list[Any] | None


def run_probe(p: ProbePlan) -> ProbeParts | None:
    """Every model's lens pass, each pair's distributions and each model's tuned lens on this
    process's share; the gathered parts on rank 0, None elsewhere."""
    cfg, par, ctx = p.cfg, p.par, p.ctx
    shown: list[dict[str, Any]] = []  # top1.csv rows of this rank's share
    found, n_blocks = par.run(lambda: _lens_passes(p, shown), "probe")
    dparts = tparts = None
    if p.kl:
        dist = par.run(lambda: pair_distributions(
            ctx.models.specs, p.opts, p.pairs, ctx.tokens, ctx.pad_id,
            batch_size=cfg.batch_size,
            positions=p.positions, chunk_elements=cfg.chunk_elements, share=p.share),
            "distributions")
        dparts = par.gather((p.share, dist))
    if p.tuned:
        fps = ctx.fingerprints(cfg.base_revision)
        tuned_found = par.run(lambda: tuned_phase(
            ctx.models.specs, p.opts, fps, ctx.tokens, p.train_tok, ctx.pad_id, cfg,
            positions=p.positions, answers=p.answers, choices=p.choices, share=p.share),
            "tuned lens")
        tparts = par.gather((p.share, tuned_found))
    parts = par.gather((p.share, found, n_blocks, shown))
    return None if parts is None else ProbeParts(parts, dparts, tparts)


def _sorted_probe(df: pd.DataFrame, p: ProbePlan) -> pd.DataFrame:
    """One row per (layer, model, metric), in the metrics' order (a chain's members in
    training order)."""
    df = df.drop_duplicates(["layer", "model", "metric"]).reset_index(drop=True)
    order = {m: i for i, m in enumerate(("accuracy", "loss", "answer_prob", "answer_rank",
                                         "choice_accuracy", "agreement", "kl_pair",
                                         "kl_to_final", *SHIFT_KINDS))}
    ranks = {"metric": order}
    if len(p.stages) > 1:  # a chain: its members in training order
        ranks["model"] = model_order([st.label for st in p.stages], p.pairs)
    return df.sort_values(["layer", "model", "metric"],
                          key=lambda s: s.map(ranks[s.name]) if s.name in ranks else s,
                          kind="stable").reset_index(drop=True)


def probe_tables(p: ProbePlan, got: ProbeParts
                 ) -> tuple[pd.DataFrame, dict[str, LensSums], pd.DataFrame | None, Any]:
    """probe.csv's table from the gathered parts (``attrs["top1"]``: top1.csv's rows), the
    merged sums, shifts.csv's table and what the tuned lens's training did."""
    cfg, pair, parts, specs = p.cfg, p.pair, got.parts, p.ctx.models.specs
    kw = {"level": cfg.level, "n_boot": cfg.bootstrap, "seed": cfg.seed}
    keys = list(specs) + [q.model for q in p.pairs if q.a != BASE]
    merged = {k: merge_sums([(i, f.get(k)) for i, f, _, _ in parts]) for k in keys}
    tables = [sums_table(merged[k], k, agreement_label=pair_label(BASE, k) if pair else "pair",
                         **kw) for k in specs]
    for q in p.pairs:  # consecutive pairs: their agreement rows only
        if q.a != BASE:
            t = sums_table(merged[q.model], q.b, agreement_label=q.model, **kw)
            tables.append(t[t["metric"] == "agreement"])
    shifts, lens_info = None, None
    if got.tparts is not None:
        extra, lens_info = tuned_tables(got.tparts, specs, cfg)
        tables += extra
    if got.dparts is not None:
        dist_tables, shifts = distribution_tables(got.dparts, p.pairs, p.ctx.tokenizer, cfg)
        tables.append(dist_tables)
    # kl_to_final of a pair's models is computed twice: one row each
    df = _sorted_probe(pd.concat(tables, ignore_index=True), p)
    if cfg.top1_examples:  # also in df.attrs["top1"] (a notebook, or no --out)
        rank = {k: r for r, k in enumerate(specs)}
        top = pd.DataFrame([row for *_, rows in parts for row in rows], columns=TOP1_COLUMNS)
        df.attrs["top1"] = top.sort_values(
            ["sample", "model", "layer"], key=lambda c: c.map(rank) if c.name == "model" else c,
            kind="stable").reset_index(drop=True)
    return df, merged, shifts, lens_info


def record_probe(p: ProbePlan, got: ProbeParts) -> pd.DataFrame:
    """The tables, written with run.json when ``out`` is set."""
    stage("tables")
    cfg = p.cfg
    n_blocks = next(b for _, _, b, _ in got.parts if b is not None)
    df, merged, shifts, lens_info = probe_tables(p, got)
    ctx = p.ctx
    if ctx.out is None:
        return df
    out = ctx.out
    write_tables(df, out, "probe", cfg.formats)
    if "top1" in df.attrs:
        write_tables(df.attrs["top1"], out, "top1", cfg.formats)
    if shifts is not None:
        write_tables(shifts, out, "shifts", cfg.formats)
    tok, answers = ctx.tokens, p.answers
    ctx.finish(run_record(
        "probe", cfg.record(), n_blocks=n_blocks, n_states=(n_blocks or 0) + 1,
        models=ctx.fingerprints(cfg.base_revision),
        n_samples=len(tok), n_tokens=int(sum(max(len(i) - 1, 0) for i in tok.input_ids)),
        n_scored_tokens=int(next(iter(merged.values())).tokens.sum()), scored_tokens=cfg.tokens,
        answer=PROBE_ANSWER_RECORD, intervals=PROBE_INTERVALS_RECORD,
        n_truncated=tok.n_truncated, n_answers=sum(a is not None for a in answers),
        n_choices=sum(c is not None for c in p.choices), notes=ctx.notes,
        distributions=DISTRIBUTIONS_RECORD if p.kl else None, tuned_lens=lens_info,
        **(chain_record(p.stages, p.pairs) if p.pair else {}),
        layer_index="hidden state j: 0 = embeddings (input of block 0), j = b+1 = after "
                    "block b, before the final norm; the lens applies the final norm",
        timings=p.timer.seconds, **p.par.record(len(tok), cfg.batch_size)))
    return df


PROBE_ANSWER_RECORD = (
    "choice tasks: the gold option after the prompt (MMLU: its letter); GSM8K-style: the final "
    "answer after ####, given the prompt and the reasoning up to '#### ' (answer_prob: all its "
    "tokens, answer_rank: its first); free text: its first content token")
PROBE_INTERVALS_RECORD = ("sample-level (cluster) bootstrap for accuracy, loss, agreement, "
                          "answer_prob and answer_rank; Wilson for choice_accuracy")


@staged
def probe(config: ProbeConfig | None = None, /, **options: Any) -> pd.DataFrame:
    """Logit-lens probe of one model (``model``) or of a pair (``base`` and ``sft``).

    Takes a :class:`ProbeConfig`, or its fields as keywords (aliases such as ``n`` and
    ``n_boot`` accepted). Returns the tidy table (``PROBE_COLUMNS``): per layer ``j = 0..L`` the
    teacher-forced next-token ``accuracy`` and ``loss`` (over every real token, or with
    ``tokens="answer"`` over the answers' tokens only), ``answer_prob``/``answer_rank`` for
    tasks with a known answer (the MMLU letter; for GSM8K the final answer after ``####``,
    given the prompt and the reasoning), ``choice_accuracy`` for multiple-choice data and, for
    a pair, the top-1 ``agreement`` of base and SFT (model ``pair``) at the same positions.
    Intervals: sample-level bootstrap (``bootstrap`` resamples, seeded by ``seed``; 0 = none),
    Wilson for ``choice_accuracy``. The pair's models are loaded one after the other (the
    base's top-1 ids are kept, small ints). With ``out``: writes ``probe.csv`` and
    ``run.json`` there, and with ``top1_examples`` N ``top1.csv`` (``top1_rows``: what each
    depth predicts for the first N samples).
    """
    cfg = config if config is not None else build(ProbeConfig, options)
    p = plan_probe(cfg)
    got = run_probe(p)
    if got is None:  # not rank 0: the tables are rank 0's
        return empty_like_table(PROBE_COLUMNS)
    return record_probe(p, got)
