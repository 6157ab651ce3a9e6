"""Evaluate a model (optionally with a LoRA adapter) on a registered task (``sftscope.tasks``).

What the evaluator does depends on the task's kind; what is asked and how it is scored is the
task module's (one file per task):
- ``generate`` (GSM8K, lm-evaluation-harness ``gsm8k`` v3): seeded shots, greedy, batched
  left-padded ``model.generate`` up to 256 new tokens, cut at the task's stop strings or EOS,
  scored by the task (GSM8K: lm-eval's ``strict_match`` and ``flexible_extract``, plus
  ``numeric_match``). Saved completions can be re-scored without a model (``rescore``).
- ``choice`` (MMLU): log-likelihood of each continuation after the prompt, tokenised in
  context as lm-eval does; accuracy of the argmax.
- ``loss`` (perplexity, retention): mean token loss on general text with the adapter disabled
  (before) and enabled (after), and the paired delta.
Every score carries its item count and a confidence interval (Wilson for accuracies, Student t
over items for losses). Files: ``scores.csv``, ``predictions-<task>.jsonl``, ``run.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from sftscope.config.commands import EvalConfig
from sftscope.config.core import defaults
from sftscope.errors import SftscopeError
from sftscope.io import Timer, atomic_path, run_record, write_table
from sftscope.load.adapters import adapter_folder, load_adapter
from sftscope.load.data import chat_prompt, pad_batch, read_samples
from sftscope.load.items import load_task_items, read_completions, task_source
from sftscope.load.models import LoadOptions, fingerprint, load_model, load_tokenizer
from sftscope.load.runtime import dtype_name, input_device, resolve_device, resolve_dtype
from sftscope.load.runtime import pad_id as pad_id_of
from sftscope.load.sources import BLOCK_KEYS, get_key
from sftscope.metrics.stats import mean_ci, proportion_ci
from sftscope.progress import plan, say, stage, staged, track
from sftscope.runs import check_out, finish_run, start_run
from sftscope.tasks import Task, all_tasks, get_task
from sftscope.tasks.base import encode_pair, encode_prompt, trim_at_stop

SCORE_COLUMNS = ["task", "metric", "value", "ci_low", "ci_high", "n"]


@dataclass
class Score:
    """One row of ``scores.csv``."""

    task: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int


@dataclass
class EvalResult:
    """Scores (with n and CIs), where the files went, and how long it took."""

    task: str
    scores: list[Score]
    n: int
    out: str | None = None
    scores_path: str | None = None
    predictions_path: str | None = None
    adapter: str | None = None
    shots: int = 0
    shot_source: str | None = None
    n_truncated: int = 0
    generated_tokens: int = 0
    tokens_per_s: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rescored_from: str | None = None

    def score(self, metric: str) -> Score:
        """The score named ``metric`` (e.g. ``flexible_extract``, ``accuracy``)."""
        for s in self.scores:
            if s.metric == metric:
                return s
        raise KeyError(f"{self.task} has no metric {metric!r}; it has "
                       f"{', '.join(s.metric for s in self.scores)}")

    def table(self) -> pd.DataFrame:
        """The scores as a tidy table (the columns of ``scores.csv``)."""
        return pd.DataFrame([asdict(s) for s in self.scores], columns=SCORE_COLUMNS)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalResult:
        """Rebuild from ``asdict`` output (as stored in run.json)."""
        d = dict(d)
        d["scores"] = [Score(**s) for s in d.get("scores", [])]
        return cls(**d)


def resolve_config(cfg: EvalConfig) -> EvalConfig:
    """Apply the preset (to fields left at their defaults) and the task's default shots."""
    task = get_task(cfg.task)
    task_source(task.name, cfg.data)
    if cfg.rescore is not None and task.kind != "generate":
        raise SftscopeError(f"--rescore re-scores generated text; task {task.name} does not "
                            f"generate (re-scoring works for "
                            f"{', '.join(_generate_tasks()) or 'no task'})")
    if cfg.preset == "reference":
        d = SimpleNamespace(**defaults(EvalConfig))
        changes: dict[str, Any] = {}
        if cfg.shots is None:
            changes["shots"] = 0
        if cfg.max_new_tokens == d.max_new_tokens:
            changes["max_new_tokens"] = 64
        if cfg.limit == d.limit:
            changes["limit"] = 100
        cfg = replace(cfg, **changes)
    if cfg.shots is None:
        cfg = replace(cfg, shots=task.default_shots)
    return cfg


def _generate_tasks() -> list[str]:
    return [t.name for t in all_tasks() if t.kind == "generate"]


# ------------------------------------------------------------------ devices and loading

def max_context(model) -> int | None:
    """The model's position limit, if it has one."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


# ------------------------------------------------------------------ generation

class StopOnText:
    """Stopping criterion on decoded text: a row is done once a stop string appears in the
    text generated after the prompt (only the last few tokens are decoded each step)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_width: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.start = prompt_width
        longest = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops),
                      default=1)
        self.lookback = 2 * longest + 8
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.start:]
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if new.shape[1] == 0 or not self.stops:
            return self.done.clone().to(input_ids.device)
        tails = self.tokenizer.batch_decode(new[:, -self.lookback:], skip_special_tokens=True)
        for i, text in enumerate(tails):
            if not self.done[i] and any(s in text for s in self.stops):
                self.done[i] = True
        return self.done.clone().to(input_ids.device)


@dataclass
class Generation:
    """One completion: the text up to the stop string, and token counts."""

    completion: str
    raw: str
    prompt_tokens: int
    new_tokens: int
    truncated: bool


def _eos_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, (list, tuple)):
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def eos_text(tokenizer) -> str | None:
    """The EOS token as text (lm-eval adds it to every task's stop strings)."""
    eos = tokenizer.eos_token_id
    return tokenizer.decode([eos], skip_special_tokens=False) if eos is not None else None


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256,
             batch_size: int = 16, stops: tuple[str, ...] = (),
             description: str = "generating") -> list[Generation]:
    """Greedy completions of ``prompts``: batched, left-padded, stopped at a stop string or EOS.

    Prompts are tokenised as lm-eval's HFLM does (no second BOS after a rendered chat
    template), sorted by length (longest first, so memory problems show up at once) and
    returned in input order. Prompts longer than the context minus ``max_new_tokens`` lose
    their oldest tokens (counted in ``truncated``), as lm-eval does. The text is cut at each
    stop string in turn (lm-eval's post-processing).
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    pad_id = pad_id_of(tokenizer)
    eos = _eos_ids(model, tokenizer)
    limit = max_context(model)
    enc: list[list[int]] = []
    truncated: list[bool] = []
    for p in prompts:
        ids = encode_prompt(tokenizer, p)
        cut = limit is not None and len(ids) > limit - max_new_tokens
        if cut:
            ids = ids[len(ids) - max(1, limit - max_new_tokens):]
        enc.append(ids)
        truncated.append(bool(cut))
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    dev = input_device(model)
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
        eos_token_id=eos or None,
        use_cache=bool(getattr(getattr(model, "config", None), "use_cache", True)),
    )
    out: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for batch in track(batches, description):
            ids, mask = pad_batch([enc[i] for i in batch], pad_id, side="left")
            crit = StopOnText(tokenizer, stops, ids.shape[1])
            with torch.no_grad():
                seqs = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                                      generation_config=gen_cfg,
                                      stopping_criteria=StoppingCriteriaList([crit]))
            new = seqs[:, ids.shape[1]:].cpu().tolist()
            for row, i in zip(new, batch):
                # generated tokens end at the first EOS, or at padding after a stop string
                n = next((k for k, t in enumerate(row) if t in eos or t == pad_id), len(row))
                raw = tokenizer.decode(row[:n], skip_special_tokens=True)
                out[i] = Generation(trim_at_stop(raw, stops), raw, len(enc[i]), n,
                                    truncated[i])
    finally:
        model.train(was_training)
    return [g for g in out if g is not None]


# ------------------------------------------------------------------ log-likelihoods

def _sequence_logprobs(model, rows: list[list[int]], starts: list[int], pad_id: int,
                       batch_size: int, description: str) -> list[float]:
    """Sum of log-probabilities of ``row[start:]`` given ``row[:start]``, for each row.

    The model reads ``row[:-1]`` (the last token is only predicted), as lm-eval feeds it.
    """
    dev = input_device(model)
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in track(batches, description):
        ids, mask = pad_batch([rows[i][:-1] for i in batch], pad_id, side="right")
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for r, i in enumerate(batch):  # only the continuation positions, in float32
            row, s = rows[i], starts[i]
            logp = torch.log_softmax(logits[r, s - 1:len(row) - 1].float(), dim=-1)
            tgt = torch.tensor(row[s:], device=logp.device)
            out[i] = float(logp.gather(1, tgt[:, None]).sum())
    return out


def _last_logprobs(model, rows: list[list[int]], pad_id: int, batch_size: int,
                   description: str) -> torch.Tensor:
    """Log-probabilities of the next token after each row: ``[len(rows), vocab]``."""
    dev = input_device(model)
    out: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in track(batches, description):
        ids, mask = pad_batch([rows[i] for i in batch], pad_id, side="right")
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        last = mask.sum(1) - 1
        sel = logits[torch.arange(len(batch)), last.to(logits.device)].float()
        lp = torch.log_softmax(sel, dim=-1).cpu()
        for r, i in enumerate(batch):
            out[i] = lp[r]
    return torch.stack([t for t in out if t is not None])


def choice_scores(model, tokenizer, contexts: list[str], choices: list[list[str]],
                  batch_size: int = 16) -> tuple[list[list[float]], int]:
    """Log-likelihood of each continuation given its context (lm-eval ``loglikelihood``), and
    how many contexts lost their oldest tokens to the model's position limit.

    Each pair is tokenised as lm-eval's ``_encode_pair`` does (the continuation's ids are those
    it has after the context, not alone). When every continuation is one token, one forward
    pass per context scores all of them.
    """
    pad_id = pad_id_of(tokenizer)
    limit = max_context(model)
    pairs = [[encode_pair(tokenizer, c, x) for x in cs] for c, cs in zip(contexts, choices)]
    for c, ps in zip(contexts, pairs):
        if any(not cont for _, cont in ps):
            raise SftscopeError(f"a choice has no token of its own after the context "
                                f"{c[-40:]!r}; the continuations must add text")
    n_cut = 0
    if all(len(cont) == 1 for ps in pairs for _, cont in ps):
        ctx = [ps[0][0] for ps in pairs]
        if limit is not None:
            n_cut = sum(len(c) > limit for c in ctx)
            ctx = [c[-limit:] for c in ctx]
        lp = _last_logprobs(model, ctx, pad_id, batch_size, "scoring choices")
        return [[float(lp[i, cont[0]]) for _, cont in ps] for i, ps in enumerate(pairs)], n_cut
    rows, starts, where = [], [], []
    cut_ctx: set[int] = set()
    for i, ps in enumerate(pairs):
        for j, (ctx_ids, cont) in enumerate(ps):
            row = ctx_ids + cont
            start = len(ctx_ids)
            if limit is not None and len(row) > limit + 1:
                drop = len(row) - (limit + 1)
                row, start = row[drop:], max(1, start - drop)
                cut_ctx.add(i)
            rows.append(row)
            starts.append(start)
            where.append((i, j))
    flat = _sequence_logprobs(model, rows, starts, pad_id, batch_size, "scoring choices")
    res = [[0.0] * len(ps) for ps in pairs]
    for (i, j), v in zip(where, flat):
        res[i][j] = v
    return res, len(cut_ctx)


def choice_logprobs(model, tokenizer, contexts: list[str], choices: list[list[str]],
                    batch_size: int = 16) -> list[list[float]]:
    """The log-likelihoods of :func:`choice_scores`."""
    return choice_scores(model, tokenizer, contexts, choices, batch_size)[0]


def text_losses(model, tokenizer, texts: list[str], *, max_length: int = 1024,
                batch_size: int = 8, description: str = "token loss"
                ) -> tuple[list[float], list[int], int]:
    """Mean token cross-entropy of each text (nats), its token count, and how many were cut."""
    pad_id = pad_id_of(tokenizer)
    enc, n_cut = [], 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            ids, n_cut = ids[:max_length], n_cut + 1
        enc.append(ids)
    keep = [i for i, e in enumerate(enc) if len(e) >= 2]
    losses = [math.nan] * len(texts)
    counts = [0] * len(texts)
    dev = input_device(model)
    batches = [keep[i:i + batch_size] for i in range(0, len(keep), batch_size)]
    for batch in track(batches, description):
        ids, mask = pad_batch([enc[i] for i in batch], pad_id, side="right")
        with torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        for r, i in enumerate(batch):  # one row at a time: float32 logits stay small
            n = len(enc[i])
            tgt = ids[r, 1:n].to(logits.device)
            losses[i] = float(torch.nn.functional.cross_entropy(logits[r, :n - 1].float(), tgt))
            counts[i] = n - 1
    return losses, counts, n_cut


# ------------------------------------------------------------------ scoring

def _accuracy(task: str, metric: str, k: int, n: int, level: float) -> Score:
    lo, hi = proportion_ci(k, n, level) if n else (math.nan, math.nan)
    return Score(task, metric, k / n if n else math.nan, lo, hi, n)


def _mean(task: str, metric: str, values: list[float], level: float,
          transform=None) -> Score:
    vals = [v for v in values if not math.isnan(v)]
    m = sum(vals) / len(vals) if vals else math.nan
    lo, hi = mean_ci(vals, level) if len(vals) >= 2 else (math.nan, math.nan)
    if transform is not None:
        m, lo, hi = transform(m), transform(lo), transform(hi)
    return Score(task, metric, m, lo, hi, len(vals))


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0)) if not math.isnan(x) else math.nan


Run = tuple[list[Score], list[dict], dict[str, Any]]


def score_completions(task: Task, records: list[dict], completions: list[str], level: float,
                      extras: list[dict] | None = None) -> tuple[list[Score], list[dict]]:
    """Score (stop-trimmed) completions of a generation task: one Wilson-interval accuracy per
    task metric, and one predictions row per item (in order) with the task's booleans."""
    assert task.score is not None
    preds = []
    for i, (r, c) in enumerate(zip(records, completions)):
        row = {"index": i, **(task.describe(r) if task.describe else {}), "completion": c,
               **task.score(c, r)}
        row.update(extras[i] if extras else {})
        preds.append(row)
    n = len(preds)
    scores = [_accuracy(task.name, m, sum(bool(p[m]) for p in preds), n, level)
              for m in task.metrics]
    return scores, preds


def _prompts(task: Task, items, tokenizer, chat: bool) -> list[str]:
    assert task.prompt is not None
    prompts = [task.prompt(r, shots) for r, shots in zip(items.records, items.shots)]
    return [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts


def _items(task: Task, cfg: EvalConfig, timer: Timer):
    with timer("load_data"):
        return load_task_items(task.name, cfg.data, split=cfg.split, limit=cfg.limit,
                               shots=cfg.shots or 0, fewshot_data=cfg.fewshot_data,
                               fewshot_seed=cfg.fewshot_seed, skip_bad=cfg.skip_bad_records)


def _run_generate(task: Task, model, tokenizer, cfg: EvalConfig, timer: Timer) -> Run:
    items = _items(task, cfg, timer)
    prompts = _prompts(task, items, tokenizer, cfg.chat_template)
    eos = eos_text(tokenizer)
    stops = tuple(task.stops) + ((eos,) if eos and eos not in task.stops else ())
    t0 = time.perf_counter()
    with timer("generate"):
        gens = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size, stops=stops, description=task.name)
    secs = time.perf_counter() - t0
    extras = [{"prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
               "truncated": g.truncated} for g in gens]
    scores, preds = score_completions(task, items.records, [g.completion for g in gens],
                                      cfg.level, extras)
    new_tokens = sum(g.new_tokens for g in gens)
    info = {"shot_source": items.shot_source, "n_truncated": sum(g.truncated for g in gens),
            "generated_tokens": new_tokens, "notes": items.notes,
            "tokens_per_s": new_tokens / secs if secs > 0 else None}
    return scores, preds, info


def _run_choice(task: Task, model, tokenizer, cfg: EvalConfig, timer: Timer) -> Run:
    assert task.continuations and task.labels and task.gold_index
    items = _items(task, cfg, timer)
    contexts = _prompts(task, items, tokenizer, cfg.chat_template)
    conts = [task.continuations(r) for r in items.records]
    with timer("score"):
        lps, n_cut = choice_scores(model, tokenizer, contexts, conts, cfg.batch_size)
    preds = [_choice_row(task, i, r, lp) for i, (r, lp) in enumerate(zip(items.records, lps))]
    scores = [_accuracy(task.name, m, sum(bool(p[col]) for p in preds), len(preds), cfg.level)
              for m, col in (("accuracy", "correct"), ("accuracy_norm", "correct_norm"))
              if m in task.metrics]
    if task.item_values is not None:  # a choice task's other metrics: means over its items
        vals = [task.item_values(p) for p in preds]
        for m in (m for m in task.metrics if m not in ("accuracy", "accuracy_norm")):
            scores.append(_mean(task.name, m, [math.nan if v.get(m) is None else float(v[m])
                                               for v in vals], cfg.level))
    return (scores, preds,
            {"shot_source": items.shot_source, "n_truncated": n_cut, "notes": items.notes})


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # ties: the first, as np.argmax


def _choice_row(task: Task, i: int, record: dict, lp: list[float]) -> dict[str, Any]:
    """One predictions row of a choice task: the gold and predicted labels, ``correct`` and,
    with choice texts, ``correct_norm`` (lm-eval's acc_norm: log-likelihood per character)."""
    assert task.labels and task.gold_index
    labels = task.labels(record)
    gold, pred = labels[task.gold_index(record)], labels[_argmax(lp)]
    row = {"index": i, **(task.describe(record) if task.describe else {}),
           "target": gold, "prediction": pred, "correct": pred == gold}
    if task.choice_texts is not None:
        norm = [v / len(t) if t else -math.inf  # lm-eval: a float division by 0
                for v, t in zip(lp, task.choice_texts(record), strict=True)]
        row.update(prediction_norm=labels[_argmax(norm)],
                   correct_norm=labels[_argmax(norm)] == gold)
    return {**row, "logprobs": dict(zip(labels, lp))}


def _run_loss(task: Task, model, tokenizer, cfg: EvalConfig, timer: Timer) -> Run:
    source = task_source(task.name, cfg.data)
    with timer("load_data"):
        samples, notes = read_samples(source, text_field=cfg.text_field, n=cfg.limit,
                                      split=cfg.split, shuffle=False, skip_bad=cfg.skip_bad_records)
    texts = [s.text for s in samples]
    has_adapter = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
    with timer("score"):
        if has_adapter:
            with model.disable_adapter():
                before, counts, n_cut = text_losses(model, tokenizer, texts,
                                                    max_length=cfg.max_length,
                                                    batch_size=cfg.batch_size,
                                                    description="loss (adapter off)")
        else:
            before, counts, n_cut = text_losses(model, tokenizer, texts,
                                                max_length=cfg.max_length,
                                                batch_size=cfg.batch_size, description="loss")
        after = (text_losses(model, tokenizer, texts, max_length=cfg.max_length,
                             batch_size=cfg.batch_size, description="loss (adapter on)")[0]
                 if has_adapter else before)
    name, lv = task.name, cfg.level
    if has_adapter:
        delta = [a - b for a, b in zip(after, before)]
        scores = [_mean(name, "loss_before", before, lv), _mean(name, "loss_after", after, lv),
                  _mean(name, "loss_delta", delta, lv),
                  _mean(name, "ppl_before", before, lv, _exp),
                  _mean(name, "ppl_after", after, lv, _exp),
                  _mean(name, "ppl_ratio", delta, lv, _exp)]
    else:
        scores = [_mean(name, "loss", before, lv), _mean(name, "ppl", before, lv, _exp)]
    preds = [{"index": i, "text": t[:200], "tokens": c, "loss_before": b, "loss_after": a}
             for i, (t, c, b, a) in enumerate(zip(texts, counts, before, after))]
    return scores, preds, {"n_truncated": n_cut, "notes": notes}


def _run(task: Task, model, tokenizer, cfg: EvalConfig, timer: Timer) -> Run:
    """The evaluator of the task's kind."""
    if task.kind == "generate":
        return _run_generate(task, model, tokenizer, cfg, timer)
    if task.kind == "choice":
        return _run_choice(task, model, tokenizer, cfg, timer)
    return _run_loss(task, model, tokenizer, cfg, timer)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def _cut_note(info: dict[str, Any], n: int) -> list[str]:
    """The one line that says how many prompts lost tokens (printed, and in run.json)."""
    k = int(info.get("n_truncated") or 0)
    if not k:
        return []
    return [f"{k} of {n} prompts or texts were longer than the model's context (less "
            "--max-new-tokens when generating) or --max-length and were truncated"]


def _result(cfg: EvalConfig, scores: list[Score], preds: list[dict], info: dict[str, Any],
            timer: Timer) -> EvalResult:
    """The result, with ``scores.csv`` and ``predictions-<task>.jsonl`` written when
    ``cfg.out`` is set."""
    res = EvalResult(task=cfg.task, scores=scores, n=len(preds), out=cfg.out,
                     adapter=cfg.adapter, shots=cfg.shots or 0,
                     shot_source=info.get("shot_source"),
                     n_truncated=int(info.get("n_truncated", 0)),
                     generated_tokens=int(info.get("generated_tokens", 0)),
                     tokens_per_s=info.get("tokens_per_s"), timings=timer.seconds,
                     notes=list(info.get("notes") or []) + _cut_note(info, len(preds)),
                     rescored_from=info.get("rescored_from"))
    if cfg.out is not None:
        out = Path(cfg.out)
        res.predictions_path = str(out / f"predictions-{cfg.task}.jsonl")
        _write_jsonl(Path(res.predictions_path), preds)
        res.scores_path = str(out / "scores.csv")
        write_table(_merge_scores(out / "scores.csv", res.table(), cfg.task), out / "scores.csv")
    return res


def evaluate_model(model, tokenizer, cfg: EvalConfig, *, timer: Timer | None = None
                   ) -> EvalResult:
    """Run the task on an already loaded model (a PEFT model for adapter runs) and write
    ``scores.csv`` and ``predictions-<task>.jsonl`` into ``cfg.out`` (when set); no run.json.

    ``tune`` calls this on the model it just trained.
    """
    cfg = resolve_config(cfg)
    timer = timer or Timer()
    scores, preds, info = _run(get_task(cfg.task), model, tokenizer, cfg, timer)
    res = _result(cfg, scores, preds, info, timer)
    for note in res.notes:
        _say(f"[yellow]note:[/] {note}")
    return res


def rescore(config: EvalConfig) -> EvalResult:
    """Score saved completions again (``config.rescore``, a JSONL file) without a model or a
    tokenizer: each line's ``completion`` is cut at the task's stop strings and scored against
    its ``answer``. Writes the same files as ``evaluate`` (predictions in input order)."""
    cfg = resolve_config(config)
    if cfg.rescore is None:
        raise SftscopeError("rescore needs a file of completions (--rescore FILE.jsonl)")
    if cfg.out is not None:
        check_out(cfg.out, "eval", cfg, overwrite=cfg.overwrite)
    task = get_task(cfg.task)
    timer = Timer()
    with timer("load_data"):
        comp = read_completions(cfg.rescore, task.name, limit=cfg.limit,
                                skip_bad=cfg.skip_bad_records)
    if cfg.out is not None:
        start_run(cfg.out, "eval", EvalConfig.OUTPUTS)
    with timer("score"):
        texts = [trim_at_stop(c, task.stops) for c in comp.completions]
        scores, preds = score_completions(task, comp.records, texts, cfg.level, comp.extras)
    res = _result(cfg, scores, preds, {"rescored_from": comp.path, "notes": comp.notes},
                  timer)
    for note in res.notes:
        _say(f"[yellow]note:[/] {note}")
    if cfg.out is not None:
        finish_run(Path(cfg.out), run_record(
            "eval", cfg.record(), model=None, adapter=None, rescored_from=comp.path, result=res,
            timings=timer.seconds, finished=True))
    return res


def _say(msg: str) -> None:
    say(msg)


def _merge_scores(path: Path, new: pd.DataFrame, task: str) -> pd.DataFrame:
    """Keep other tasks' rows of an existing scores.csv (several tasks may share a run)."""
    if not path.exists():
        return new
    try:
        old = pd.read_csv(path)
    except Exception:  # a corrupt file is replaced
        return new
    if list(old.columns) != SCORE_COLUMNS:
        return new
    return pd.concat([old[old["task"] != task], new], ignore_index=True)


def format_scores(res: EvalResult) -> str:
    """Human-readable lines: metric, value, CI, n."""
    lines = []
    for s in res.scores:
        lines.append(f"{s.task} {s.metric}: {s.value:.4f} "
                     f"[{s.ci_low:.4f}, {s.ci_high:.4f}] (n={s.n})")
    return "\n".join(lines)


@staged
def evaluate(config: EvalConfig) -> EvalResult:
    """Load the model (and adapter), evaluate, and write scores, predictions and run.json.
    With ``config.rescore`` no model is loaded: see :func:`rescore`."""
    if config.rescore is not None:
        return rescore(config)

    cfg = resolve_config(config)
    if not cfg.model:
        raise SftscopeError("eval needs --model (or --rescore FILE to score saved completions)")
    if cfg.out is not None:
        check_out(cfg.out, "eval", cfg, overwrite=cfg.overwrite)
    timer = Timer()
    device = resolve_device(cfg.device)
    dtype = dtype_name(resolve_dtype(cfg.dtype, device))
    if cfg.adapter is not None:
        adapter_folder(cfg.adapter)  # fail before loading the model
    plan(2)
    stage("load model")
    with timer("load_model"):
        tok = load_tokenizer(cfg.tokenizer or cfg.model, revision=cfg.revision)
        model = load_model(cfg.model, LoadOptions(revision=cfg.revision, dtype=dtype,
                                                  device=device, device_map=cfg.device_map))
        if cfg.adapter is not None:
            model = load_adapter(model, cfg.adapter, cfg.model, revision=cfg.revision,
                                 allow_other_base=cfg.allow_other_base)
    if cfg.out is not None:
        start_run(cfg.out, "eval", EvalConfig.OUTPUTS)
    stage(f"evaluate {cfg.task}")
    res = evaluate_model(model, tok, cfg, timer=timer)
    if cfg.out is not None:
        finish_run(Path(cfg.out), run_record(
            "eval", cfg.record(), model=fingerprint(cfg.model, cfg.revision), adapter=cfg.adapter,
            models={"model": fingerprint(cfg.adapter, base=cfg.model) if cfg.adapter
                    else fingerprint(cfg.model, cfg.revision)},
            n_blocks=_n_blocks(model), device=device, dtype=dtype, result=res,
            timings=timer.seconds, finished=True))
    return res


def _n_blocks(model) -> int | None:
    v = get_key(getattr(model, "config", {}) or {}, BLOCK_KEYS)
    return int(v) if isinstance(v, int) else None
