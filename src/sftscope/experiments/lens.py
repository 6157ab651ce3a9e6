"""``sftscope probe``: the logit lens, layer by layer, streamed.

For every hidden state ``j = 0..L`` (0 = the input of block 0, ``j = b+1`` = the output of block
``b`` before the final norm) the lens logits are ``head(final_norm(h_j))`` (soft-capped when the
model caps its logits); at ``j = L`` they are the model's own logits. Per layer we keep only
per-sample sums (correct next tokens, loss, answer probability and rank, agreement with the
other model), never the logits of the dataset: one forward pass per model per batch, with the
lens applied inside the block hooks in chunks of rows.

Answer slots (tasks with a known answer): the answer is the MMLU letter (``meta["letter"]``),
the GSM8K final number (``meta["target"]``) or else ``Sample.answer``. Its first *content* token
is measured at the position right after the prompt; a whitespace-only token that the tokenizer
splits off first (a space before digits) is skipped, and when that whitespace is itself in the
text the position after it is used, otherwise the last prompt token.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sftscope.capture.engine import HookedBatch, run_hooked
from sftscope.capture.hooks import hidden_state_hooks, inner_model
from sftscope.config.commands import ProbeConfig
from sftscope.config.core import build
from sftscope.errors import SftscopeError
from sftscope.io import Timer, run_record, write_tables
from sftscope.load import data as D
from sftscope.load.arch import (
    apply_softcap,
    arch_for,
    get_blocks,
    get_final_norm,
    get_head,
    logit_softcap,
)
from sftscope.load.models import (
    LoadOptions,
    check_pair,
    check_vocab,
    fingerprint,
    input_device,
    load_config,
    load_model,
    load_tokenizer,
    pair_tokenizer,
    source_label,
)
from sftscope.load.runtime import model_bytes, release, resolve_device
from sftscope.load.runtime import pad_id as pad_id_of
from sftscope.metrics.stats import bootstrap_ci, mean_ci, proportion_ci
from sftscope.parallel import empty_like_table, join
from sftscope.progress import say
from sftscope.runs import check_out, finish_run, start_run

PROBE_COLUMNS = ["layer", "model", "metric", "value", "ci_low", "ci_high", "n"]
DEFAULT_CHUNK = 1 << 24  # logits elements per lens chunk (64 MiB in float32)


# ---------------------------------------------------------------------------------------------
# The lens


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
    """Position whose next-token distribution is scored, and the token expected there."""

    position: int
    target: int


@dataclass(frozen=True)
class ChoiceSlot:
    """Position after the prompt, one candidate token per option, and the correct option."""

    position: int
    candidates: tuple[int, ...]
    correct: int


def _is_space(tokenizer, tid: int) -> bool:
    return tokenizer.decode([tid]).strip() == ""


def _continuation(tokenizer, prompt: str, answer: str, tokens: Sequence[int], plen: int,
                  special: bool) -> list[int] | None:
    full = tokenizer(prompt + answer, add_special_tokens=special)["input_ids"]
    if list(full[:plen]) != list(tokens[:plen]):
        return None  # the answer merged with the end of the prompt: no clean boundary
    return list(full[plen:])


def _answer_string(sample: D.Sample) -> str | None:
    if sample.meta.get("letter"):
        return " " + str(sample.meta["letter"])
    if sample.meta.get("target"):
        return " " + str(sample.meta["target"])
    return sample.answer


def answer_slots(samples: Sequence[D.Sample], tok: D.TokenizedSet, tokenizer,
                 chat_template: bool = False) -> list[AnswerSlot | None]:
    """Where and what the answer's first content token is, per sample (None: no known answer)."""
    special = not chat_template
    out: list[AnswerSlot | None] = []
    for s, ids, plen in zip(samples, tok.input_ids, tok.prompt_lengths, strict=True):
        ans = _answer_string(s)
        if plen is None or not ans or s.prompt is None:
            out.append(None)
            continue
        _, prompt = D.render(s, tokenizer, chat_template)
        if chat_template:
            ans = ans.lstrip()
        cont = _continuation(tokenizer, prompt or "", ans, ids, plen, special)
        if not cont:
            out.append(None)
            continue
        k = 0
        while k < len(cont) and _is_space(tokenizer, cont[k]):
            k += 1
        if k == len(cont):
            out.append(None)
            continue
        in_text = k > 0 and list(ids[plen:plen + k]) == cont[:k]
        pos = plen - 1 + (k if in_text else 0)
        out.append(AnswerSlot(pos, int(cont[k])))
    return out


def choice_slots(samples: Sequence[D.Sample], tok: D.TokenizedSet, tokenizer,
                 chat_template: bool = False) -> tuple[list[ChoiceSlot | None], int]:
    """Multiple-choice slots for MMLU-style samples (``meta`` has ``letter``, ``n_choices``).

    Each option is scored by the log-probability of the first token of ``" A"``, ``" B"``, ...
    right after the prompt; items whose options do not start with distinct tokens are left out
    (their count is returned).
    """
    special = not chat_template
    out: list[ChoiceSlot | None] = []
    n_ambiguous = 0
    for s, ids, plen in zip(samples, tok.input_ids, tok.prompt_lengths, strict=True):
        letter, n_choices = s.meta.get("letter"), s.meta.get("n_choices")
        if plen is None or not letter or not n_choices or s.prompt is None:
            out.append(None)
            continue
        _, prompt = D.render(s, tokenizer, chat_template)
        letters = D.LETTERS[: int(n_choices)]
        if letter not in letters:
            out.append(None)
            continue
        firsts = []
        for c in letters:
            cont = _continuation(tokenizer, prompt or "", c if chat_template else " " + c,
                                 ids, plen, special)
            firsts.append(cont[0] if cont else None)
        if None in firsts or len(set(firsts)) != len(firsts):
            n_ambiguous += 1
            out.append(None)
            continue
        out.append(ChoiceSlot(plen - 1, tuple(int(t) for t in firsts), letters.index(letter)))
    return out, n_ambiguous


# ---------------------------------------------------------------------------------------------
# The streamed pass


@dataclass
class LensSums:
    """Per-sample sums over one tokenized set, columns = ``layers`` (hidden-state ``j``)."""

    layers: list[int]
    tokens: np.ndarray            # [N] real next-token targets per sample
    correct: np.ndarray           # [N, J] top-1 == target counts
    loss: np.ndarray              # [N, J] summed cross-entropy (nats)
    answer_prob: np.ndarray       # [N, J] (NaN where no answer slot)
    answer_rank: np.ndarray       # [N, J] 1 = top prediction (NaN where no slot)
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


class _LensReducer:
    """Hook callback of ``lens_pass``: per-sample lens sums of one batch at the chosen layers."""

    def __init__(self, sums: LensSums, lens: Lens, col: dict[int, int], rows_per_chunk: int,
                 answers: Sequence[AnswerSlot | None] | None,
                 choices: Sequence[ChoiceSlot | None] | None, record_top1: bool,
                 ref_top1: dict[int, np.ndarray] | None) -> None:
        self.sums, self.lens, self.col = sums, lens, col
        self.rows_per_chunk = rows_per_chunk
        self.answers, self.choices = answers, choices
        self.record_top1, self.ref_top1 = record_top1, ref_top1
        self.ctx: dict[str, Any] = {}

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        ctx = self.ctx
        key = (name, str(device))
        if key not in ctx["cache"]:
            ctx["cache"][key] = ctx[name].to(device)
        return ctx["cache"][key]

    def start(self, batch: HookedBatch) -> None:
        ctx, out_dev, n_cols = self.ctx, self.lens.device, len(self.col)
        ids, mask = batch.input_ids, batch.mask
        bsz = ids.shape[0]
        valid = mask[:, :-1] & mask[:, 1:]
        vb, vt = valid.nonzero(as_tuple=True)
        ctx.clear()
        ctx.update(cache={}, valid=valid, vb=vb, vt=vt, n_valid=int(vb.numel()),
                   targets=ids[:, 1:][valid], row_sample=vb)
        ctx.update({name: torch.zeros((n_cols, bsz), device=out_dev)
                    for name in ("loss", "correct", "agree")})
        if self.record_top1:
            ctx["top1"] = torch.zeros((n_cols, int(vb.numel())), dtype=torch.long,
                                      device=out_dev)
        if self.ref_top1 is not None:
            parts = [torch.as_tensor(self.ref_top1[i], dtype=torch.long) for i in batch.index]
            ref = torch.cat(parts, dim=1) if parts else torch.zeros((n_cols, 0))
            if ref.shape != (n_cols, int(vb.numel())):
                raise SftscopeError("reference top-1 ids do not match this data; run both "
                                    "models on the same tokenized samples")
            ctx["ref"] = ref
        a_rows = [(r, self.answers[i]) for r, i in enumerate(batch.index)
                  if self.answers is not None and self.answers[i] is not None]
        ctx["a_rows"] = a_rows
        ctx["n_ans"] = len(a_rows)
        if a_rows:
            ctx.update(ab=torch.tensor([r for r, _ in a_rows]),
                       at=torch.tensor([a.position for _, a in a_rows]),
                       atarget=torch.tensor([a.target for _, a in a_rows]),
                       aprob=torch.zeros((n_cols, len(a_rows)), device=out_dev),
                       arank=torch.zeros((n_cols, len(a_rows)), device=out_dev))
        c_rows = [(r, self.choices[i]) for r, i in enumerate(batch.index)
                  if self.choices is not None and self.choices[i] is not None]
        ctx["c_rows"] = c_rows
        ctx["n_ch"] = len(c_rows)
        if c_rows:
            width = max(len(ch.candidates) for _, ch in c_rows)
            cand = torch.full((len(c_rows), width), -1, dtype=torch.long)
            for k, (_, ch) in enumerate(c_rows):
                cand[k, : len(ch.candidates)] = torch.tensor(ch.candidates)
            ctx.update(cb=torch.tensor([r for r, _ in c_rows]),
                       ct=torch.tensor([ch.position for _, ch in c_rows]), ccand=cand,
                       cright=torch.tensor([ch.correct for _, ch in c_rows]),
                       ccorrect=torch.zeros((n_cols, len(c_rows)), device=out_dev))

    def __call__(self, j: int, h: torch.Tensor) -> None:
        c = self.col.get(j)
        if c is None:
            return
        ctx, on, lens, out_dev = self.ctx, self._on, self.lens, self.lens.device
        dev = h.device
        if ctx["n_valid"]:
            rows = h[on("vb", dev), on("vt", dev)]  # real positions only: no padding enters
            tgt, rs = on("targets", out_dev), on("row_sample", out_dev)
            ref = on("ref", out_dev)[c] if "ref" in ctx else None
            step = self.rows_per_chunk
            for s in range(0, rows.shape[0], step):
                e = min(s + step, rows.shape[0])
                logits = lens(rows[s:e])
                t = tgt[s:e]
                loss = logits.logsumexp(-1) - logits.gather(1, t[:, None])[:, 0]
                top1 = logits.argmax(-1)
                ctx["loss"][c].index_add_(0, rs[s:e], loss)
                ctx["correct"][c].index_add_(0, rs[s:e], (top1 == t).float())
                if self.record_top1:
                    ctx["top1"][c, s:e] = top1
                if ref is not None:
                    ctx["agree"][c].index_add_(0, rs[s:e], (top1 == ref[s:e]).float())
                del logits
        if ctx["n_ans"]:
            logits = lens(h[on("ab", dev), on("at", dev)])
            t = on("atarget", out_dev)
            tl = logits.gather(1, t[:, None])[:, 0]
            ctx["aprob"][c] = (tl - logits.logsumexp(-1)).exp()
            ctx["arank"][c] = (logits > tl[:, None]).sum(-1).float() + 1
        if ctx["n_ch"]:
            logits = lens(h[on("cb", dev), on("ct", dev)])
            cand = logits.gather(1, on("ccand", out_dev).clamp(min=0))
            cand = cand.masked_fill(on("ccand", out_dev) < 0, -math.inf)
            ctx["ccorrect"][c] = (cand.argmax(-1) == on("cright", out_dev)).float()

    def finish(self, batch: HookedBatch) -> None:
        ctx, sums = self.ctx, self.sums
        valid, a_rows, c_rows = ctx["valid"], ctx["a_rows"], ctx["c_rows"]
        idx = np.asarray(batch.index)
        sums.tokens[idx] += valid.sum(1).numpy()
        sums.loss[idx] += ctx["loss"].double().cpu().numpy().T
        sums.correct[idx] += ctx["correct"].double().cpu().numpy().T
        if sums.agree is not None:
            sums.agree[idx] += ctx["agree"].double().cpu().numpy().T
        if a_rows:
            ai = idx[[r for r, _ in a_rows]]
            sums.answer_prob[ai] = ctx["aprob"].double().cpu().numpy().T
            sums.answer_rank[ai] = ctx["arank"].double().cpu().numpy().T
        if c_rows:
            ci = idx[[r for r, _ in c_rows]]
            sums.choice_correct[ci] = ctx["ccorrect"].double().cpu().numpy().T
        if self.record_top1:
            top = ctx["top1"].to(torch.int32).cpu().numpy()
            counts = valid.sum(1).tolist()
            start = 0
            for i, cnt in zip(batch.index, counts, strict=True):
                sums.top1[i] = top[:, start:start + cnt].copy()
                start += cnt


def lens_pass(model: nn.Module, tok: D.TokenizedSet, pad_id: int, *, batch_size: int = 8,
              layers: Sequence[int] | None = None,
              answers: Sequence[AnswerSlot | None] | None = None,
              choices: Sequence[ChoiceSlot | None] | None = None,
              record_top1: bool = False, ref_top1: dict[int, np.ndarray] | None = None,
              chunk_elements: int = DEFAULT_CHUNK, description: str = "lens",
              indices: Sequence[int] | None = None) -> LensSums:
    """Stream ``model`` over ``tok`` and reduce the lens at ``layers`` (default all ``0..L``).

    Teacher-forced: position ``t`` predicts token ``t+1``; only pairs of real tokens count.
    ``record_top1`` keeps the top-1 ids per real position (int32, for agreement later);
    ``ref_top1`` (from such a pass over the same set) is compared with this model's top-1.
    One forward pass per batch through ``capture.engine.run_hooked`` (right padding; a
    NaN/Inf at a real position stops the pass). ``indices``: only these samples (a rank's
    share); the other rows keep their initial values (``merge_sums`` joins the shares).
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
    lens = Lens(model)
    rows_per_chunk = max(1, chunk_elements // max(lens.vocab, 1))
    nan = np.full((n, n_cols), np.nan)
    sums = LensSums(layers, np.zeros(n), np.zeros((n, n_cols)), np.zeros((n, n_cols)),
                    nan.copy(), nan.copy(), nan.copy(),
                    agree=np.zeros((n, n_cols)) if ref_top1 is not None else None,
                    top1={} if record_top1 else None)
    red = _LensReducer(sums, lens, col, rows_per_chunk, answers, choices, record_top1,
                       ref_top1)
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


# ---------------------------------------------------------------------------------------------
# Tables


def ratio_ci(num: np.ndarray, den: np.ndarray, level: float, n_boot: int,
             seed: int) -> tuple[float, float]:
    """Bootstrap over samples of ``sum(num)/sum(den)`` (token-weighted mean, samples resampled)."""
    keep = den > 0
    num, den = num[keep], den[keep]
    if num.size < 2 or n_boot < 1:
        return math.nan, math.nan
    return bootstrap_ci(lambda idx: num[idx].sum() / den[idx].sum(), n_boot=n_boot, level=level,
                        seed=seed, n=num.size)


def _row(layer, model, metric, value, lo, hi, n) -> dict[str, Any]:
    return {"layer": layer, "model": model, "metric": metric, "value": float(value),
            "ci_low": float(lo), "ci_high": float(hi), "n": int(n)}


def sums_table(sums: LensSums, model: str, level: float = 0.95, n_boot: int = 1000,
               seed: int = 0, agreement_label: str = "pair") -> pd.DataFrame:
    """Tidy rows (layer, model, metric, value, ci_low, ci_high, n) of one pass.

    Accuracies (token, choice, agreement): Wilson intervals over tokens/items. Loss: token-
    weighted mean with a bootstrap interval over samples. Answer probability and rank: mean over
    samples with a t interval.
    """
    rows: list[dict[str, Any]] = []
    n_tok = int(sums.tokens.sum())
    has_a, has_c = sums.has_answer, sums.has_choice
    for c, j in enumerate(sums.layers):
        if n_tok:
            k = int(round(sums.correct[:, c].sum()))
            rows.append(_row(j, model, "accuracy", k / n_tok, *proportion_ci(k, n_tok, level),
                             n_tok))
            lo, hi = ratio_ci(sums.loss[:, c], sums.tokens, level, n_boot, seed)
            rows.append(_row(j, model, "loss", sums.loss[:, c].sum() / n_tok, lo, hi, n_tok))
        if has_a.any():
            for metric, arr in (("answer_prob", sums.answer_prob), ("answer_rank",
                                                                     sums.answer_rank)):
                v = arr[has_a, c]
                rows.append(_row(j, model, metric, v.mean(), *mean_ci(v, level), v.size))
        if has_c.any():
            v = sums.choice_correct[has_c, c]
            k = int(v.sum())
            rows.append(_row(j, model, "choice_accuracy", k / v.size,
                             *proportion_ci(k, v.size, level), v.size))
        if sums.agree is not None and n_tok:
            k = int(round(sums.agree[:, c].sum()))
            rows.append(_row(j, agreement_label, "agreement", k / n_tok,
                             *proportion_ci(k, n_tok, level), n_tok))
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Shared set-up (probe and swap)


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


def probe(config: ProbeConfig | None = None, /, **options: Any) -> pd.DataFrame:
    """Logit-lens probe of one model (``model``) or of a pair (``base`` and ``sft``).

    Takes a :class:`ProbeConfig`, or its fields as keywords (aliases such as ``n`` and
    ``n_boot`` accepted). Returns the tidy table (``PROBE_COLUMNS``): per layer ``j = 0..L`` the
    teacher-forced next-token ``accuracy`` and ``loss``, ``answer_prob``/``answer_rank`` for
    tasks with a known answer, ``choice_accuracy`` for multiple-choice data and, for a pair, the
    top-1 ``agreement`` of base and SFT (model ``pair``). The pair's models are loaded one after
    the other (the base's top-1 ids are kept, small ints). With ``out``: writes ``probe.csv``
    and ``run.json`` there.
    """
    cfg = config if config is not None else build(ProbeConfig, options)
    par = join(cfg.device, cfg.device_map)
    data, model, base, sft, out = cfg.data, cfg.model, cfg.base, cfg.sft, cfg.out
    tokenizer, max_length, batch_size, n, seed = (cfg.tokenizer, cfg.max_length, cfg.batch_size,
                                                  cfg.limit, cfg.seed)
    dtype, device, device_map, chat_template = cfg.dtype, cfg.device, cfg.device_map, \
        cfg.chat_template
    text_field, template, split, level, n_boot = (cfg.text_field, cfg.template, cfg.split,
                                                  cfg.level, cfg.bootstrap)
    chunk_elements, revision = cfg.chunk_elements, cfg.revision
    base_revision, sft_revision = cfg.base_revision, cfg.sft_revision
    timer = Timer()
    pair = model is None
    if pair:
        specs = {"base": base, "sft": sft}
        revs = {"base": base_revision, "sft": sft_revision}
        bases = {"base": None, "sft": base}  # an adapter as SFT applies to --base
    else:
        label = model_label(model, base)
        specs, revs, bases = {label: model}, {label: revision}, {label: base}
    with par.together("validation"):  # every rank validates; all pass or all fail alike
        if cfg.out is not None:
            check_out(cfg.out, "probe", cfg, overwrite=cfg.overwrite)
        device = par.device or resolve_device(device)
        with timer("validate"):
            cfgs = {k: load_config(v, revision=revs[k], base=bases[k],
                                   base_revision=base_revision) for k, v in specs.items()}
            notes: list[str] = []
            if pair:
                info = check_pair(cfgs["base"], cfgs["sft"], base, sft,
                                  allow_mixed=cfg.allow_mixed_pair)
                notes += info.notes
            if pair:
                tokz, tok_notes = pair_tokenizer(specs["base"], specs["sft"], tokenizer,
                                                 revisions=revs, chat_template=chat_template)
                notes += tok_notes
            else:
                tokz = pick_tokenizer(tokenizer, next(iter(specs)), specs, revs, bases,
                                      base_revision)
            samples, tok, data_notes = prepare_data(
                data, tokz, n=n, seed=seed, max_length=max_length, chat_template=chat_template,
                text_field=text_field, template=template, split=split,
                skip_bad=cfg.skip_bad_records)
            notes += data_notes
            answers = answer_slots(samples, tok, tokz, chat_template)
            choices, n_amb = choice_slots(samples, tok, tokz, chat_template)
            if n_amb:
                notes.append(f"{n_amb} multiple-choice items left out of choice_accuracy: the "
                             f"option letters do not start with distinct tokens")
    for note in notes:
        say(f"[yellow]note:[/] {note}")
    pad_id = pad_id_of(tokz)
    opts = {k: LoadOptions(revision=revs[k], dtype=dtype, device=device, device_map=device_map,
                           base=bases[k], base_revision=base_revision,
                           allow_other_base=cfg.allow_other_base)
            for k in specs}
    if out is not None and par.main:
        start_run(out, "probe", ProbeConfig.OUTPUTS)
    share = par.shard(len(tok), batch_size)  # all samples when alone

    def passes() -> tuple[dict[str, LensSums], int | None]:
        found: dict[str, LensSums] = {}
        ref_top1 = None
        n_blocks = None
        for k, spec in specs.items() if share else ():
            with timer(f"load_{k}"):
                m = load_model(spec, opts[k])
            nbytes = model_bytes(m)
            try:
                check_vocab(m, tok.input_ids, k)
                n_blocks = n_blocks_of(m)
                with timer(f"pass_{k}"):
                    sums = lens_pass(m, tok, pad_id, batch_size=batch_size, answers=answers,
                                     choices=choices, record_top1=pair and k == "base",
                                     ref_top1=ref_top1, chunk_elements=chunk_elements,
                                     description=f"probe {k}", indices=share)
            finally:
                del m
                release(nbytes)
            if pair and k == "base":
                ref_top1 = sums.top1
            found[k] = sums
        for sums in found.values():
            sums.top1 = None  # agreement is counted; the ids need not travel
        return found, n_blocks

    found, n_blocks = par.run(passes, "probe")
    parts = par.gather((share, found, n_blocks))
    if parts is None:  # not rank 0: the tables are rank 0's
        return empty_like_table(PROBE_COLUMNS)
    n_blocks = next(b for _, _, b in parts if b is not None)
    tables = [sums_table(merge_sums([(i, f.get(k)) for i, f, _ in parts]), k, level=level,
                         n_boot=n_boot, seed=seed) for k in specs]
    df = pd.concat(tables, ignore_index=True)
    order = {"accuracy": 0, "loss": 1, "answer_prob": 2, "answer_rank": 3,
             "choice_accuracy": 4, "agreement": 5}
    df = df.sort_values(["layer", "model", "metric"],
                        key=lambda s: s.map(order) if s.name == "metric" else s,
                        kind="stable").reset_index(drop=True)
    if out is not None:
        out = Path(out)
        write_tables(df, out, "probe", cfg.formats)
        finish_run(out, run_record(
            "probe", cfg.record(), n_blocks=n_blocks, n_states=(n_blocks or 0) + 1,
            models={k: fingerprint(v, revs[k], base=bases[k], base_revision=base_revision)
                    for k, v in specs.items()},
            n_samples=len(tok), n_tokens=int(sum(max(len(i) - 1, 0) for i in tok.input_ids)),
            n_truncated=tok.n_truncated, n_answers=sum(a is not None for a in answers),
            n_choices=sum(c is not None for c in choices), notes=notes,
            layer_index="hidden state j: 0 = embeddings (input of block 0), j = b+1 = after "
                        "block b, before the final norm; the lens applies the final norm",
            timings=timer.seconds, **par.record(len(tok), batch_size)))
    return df

