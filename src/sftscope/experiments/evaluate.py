"""Evaluate a model (optionally with a LoRA adapter): GSM8K, MMLU, perplexity.

- GSM8K (lm-evaluation-harness ``gsm8k`` v3 conventions): 5 seeded shots, greedy, batched
  left-padded ``model.generate`` up to 256 new tokens, stop at ``Question:`` or EOS; strict and
  flexible exact match.
- MMLU: log-likelihood of `` A``..`` D`` after ``Answer:`` (0- or k-shot).
- perplexity (retention): mean token loss on general text with the adapter disabled (before)
  and enabled (after), and the paired delta.
Every score carries its item count and a confidence interval (Wilson for accuracies, Student t
over items for losses). Files: ``scores.csv``, ``predictions-<task>.jsonl``, ``run.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from sftscope.errors import SftscopeError
from sftscope.experiments import tasks as T
from sftscope.io import Timer, atomic_path, run_record, write_json, write_table
from sftscope.metrics.stats import mean_ci, proportion_ci
from sftscope.progress import track

PRESETS = ("default", "reference")
SCORE_COLUMNS = ["task", "metric", "value", "ci_low", "ci_high", "n"]


@dataclass(frozen=True)
class EvalConfig:
    """Everything ``evaluate`` needs; mirrored one-to-one by ``sftscope eval`` flags.

    ``shots=None`` means the task default (GSM8K 5, MMLU 0). ``out=None`` writes nothing.
    The ``reference`` preset reproduces the research code (0-shot, 64 new tokens, 100 items)
    for every field left at its default.
    """

    model: str
    task: str = "gsm8k"
    data: str | None = None
    out: str | None = None
    adapter: str | None = None
    split: str | None = None
    shots: int | None = None
    fewshot_data: str | None = None
    fewshot_seed: int = T.FEWSHOT_SEED
    limit: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    max_length: int = 1024
    text_field: str | None = None
    chat_template: bool = False
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    revision: str | None = None
    tokenizer: str | None = None
    level: float = 0.95
    allow_other_base: bool = False
    preset: str = "default"


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

    def score(self, metric: str) -> Score:
        """The score named ``metric`` (e.g. ``exact_match_flexible``, ``accuracy``)."""
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
    if cfg.preset not in PRESETS:
        raise SftscopeError(f"unknown preset {cfg.preset!r}; use {' or '.join(PRESETS)}")
    T.task_source(cfg.task, cfg.data)  # validates the task name
    if cfg.preset == "reference":
        d = EvalConfig(model=cfg.model)
        changes: dict[str, Any] = {}
        if cfg.shots is None:
            changes["shots"] = 0
        if cfg.max_new_tokens == d.max_new_tokens:
            changes["max_new_tokens"] = 64
        if cfg.limit == d.limit:
            changes["limit"] = 100
        cfg = replace(cfg, **changes)
    if cfg.shots is None:
        cfg = replace(cfg, shots=T.DEFAULT_SHOTS[cfg.task])
    if cfg.shots < 0:
        raise SftscopeError(f"--shots must be >= 0, got {cfg.shots}")
    if cfg.limit is not None and cfg.limit < 1:
        raise SftscopeError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise SftscopeError("--batch-size and --max-new-tokens must be >= 1")
    return cfg


# ------------------------------------------------------------------ devices and loading

def auto_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on a bf16-capable GPU, float32 otherwise."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def model_device(model) -> torch.device:
    """Where inputs go (the input embedding's device)."""
    emb = model.get_input_embeddings()
    return emb.weight.device if emb is not None else next(model.parameters()).device


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


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256,
             batch_size: int = 16, stops: tuple[str, ...] = T.GSM8K_STOP,
             description: str = "generating") -> list[Generation]:
    """Greedy completions of ``prompts``: batched, left-padded, stopped at a stop string or EOS.

    Prompts are sorted by length (longest first, so memory problems show up at once) and
    returned in input order. Prompts longer than the context minus ``max_new_tokens`` lose
    their oldest tokens (counted in ``truncated``), as lm-eval does.
    """
    from transformers import GenerationConfig, StoppingCriteriaList

    from sftscope.load.data import pad_batch

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    eos = _eos_ids(model, tokenizer)
    limit = max_context(model)
    enc: list[list[int]] = []
    truncated: list[bool] = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        cut = limit is not None and len(ids) > limit - max_new_tokens
        if cut:
            ids = ids[len(ids) - max(1, limit - max_new_tokens):]
        enc.append(ids)
        truncated.append(bool(cut))
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    dev = model_device(model)
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
                out[i] = Generation(T.trim_at_stop(raw, stops), raw, len(enc[i]), n,
                                    truncated[i])
    finally:
        model.train(was_training)
    return [g for g in out if g is not None]


# ------------------------------------------------------------------ log-likelihoods

def _sequence_logprobs(model, rows: list[list[int]], starts: list[int], pad_id: int,
                       batch_size: int, description: str) -> list[float]:
    """Sum of log-probabilities of ``row[start:]`` given ``row[:start]``, for each row."""
    from sftscope.load.data import pad_batch

    dev = model_device(model)
    out = [0.0] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in track(batches, description):
        ids, mask = pad_batch([rows[i] for i in batch], pad_id, side="right")
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
    from sftscope.load.data import pad_batch

    dev = model_device(model)
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


def choice_logprobs(model, tokenizer, contexts: list[str], choices: list[list[str]],
                    batch_size: int = 16) -> list[list[float]]:
    """Log-likelihood of each continuation given its context (lm-eval ``loglikelihood``).

    Continuations are tokenized on their own and appended to the context tokens. When every
    continuation is a single token, one forward pass per context scores all of them.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ctx = [tokenizer(c, add_special_tokens=True)["input_ids"] for c in contexts]
    cont = [[tokenizer(x, add_special_tokens=False)["input_ids"] for x in cs] for cs in choices]
    if all(len(t) == 1 for cs in cont for t in cs):
        lp = _last_logprobs(model, ctx, pad_id, batch_size, "scoring choices")
        return [[float(lp[i, t[0]]) for t in cs] for i, cs in enumerate(cont)]
    rows, starts, where = [], [], []
    for i, cs in enumerate(cont):
        for j, t in enumerate(cs):
            rows.append(ctx[i] + t)
            starts.append(len(ctx[i]))
            where.append((i, j))
    flat = _sequence_logprobs(model, rows, starts, pad_id, batch_size, "scoring choices")
    res = [[0.0] * len(cs) for cs in cont]
    for (i, j), v in zip(where, flat):
        res[i][j] = v
    return res


def text_losses(model, tokenizer, texts: list[str], *, max_length: int = 1024,
                batch_size: int = 8, description: str = "token loss"
                ) -> tuple[list[float], list[int], int]:
    """Mean token cross-entropy of each text (nats), its token count, and how many were cut."""
    from sftscope.load.data import pad_batch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc, n_cut = [], 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            ids, n_cut = ids[:max_length], n_cut + 1
        enc.append(ids)
    keep = [i for i, e in enumerate(enc) if len(e) >= 2]
    losses = [math.nan] * len(texts)
    counts = [0] * len(texts)
    dev = model_device(model)
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


def _run_gsm8k(model, tokenizer, cfg: EvalConfig, timer: Timer
               ) -> tuple[list[Score], list[dict], dict[str, Any]]:
    with timer("load_data"):
        items = T.load_task_items("gsm8k", cfg.data, split=cfg.split, limit=cfg.limit,
                                  shots=cfg.shots or 0, fewshot_data=cfg.fewshot_data,
                                  fewshot_seed=cfg.fewshot_seed)
    prompts = [T.gsm8k_prompt(r, items.shots[i] if items.shots else None)
               for i, r in enumerate(items.records)]
    if cfg.chat_template:
        prompts = [_chat(tokenizer, p) for p in prompts]
    t0 = time.perf_counter()
    with timer("generate"):
        gens = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                        batch_size=cfg.batch_size, description="gsm8k")
    secs = time.perf_counter() - t0
    preds, k_strict, k_flex = [], 0, 0
    for i, (r, g) in enumerate(zip(items.records, gens)):
        target = T.gsm8k_target(str(r["answer"]))
        s = T.score_gsm8k(g.completion, target)
        k_strict += s["strict_correct"]
        k_flex += s["flexible_correct"]
        preds.append({"index": i, "question": r["question"], "target": target,
                      "completion": g.completion, **s, "prompt_tokens": g.prompt_tokens,
                      "new_tokens": g.new_tokens, "truncated": g.truncated})
    n = len(preds)
    scores = [_accuracy("gsm8k", "exact_match_strict", k_strict, n, cfg.level),
              _accuracy("gsm8k", "exact_match_flexible", k_flex, n, cfg.level)]
    new_tokens = sum(g.new_tokens for g in gens)
    info = {"shot_source": items.shot_source, "n_truncated": sum(g.truncated for g in gens),
            "generated_tokens": new_tokens,
            "tokens_per_s": new_tokens / secs if secs > 0 else None}
    return scores, preds, info


def _chat(tokenizer, prompt: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise SftscopeError("--chat-template is on but the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _run_mmlu(model, tokenizer, cfg: EvalConfig, timer: Timer
              ) -> tuple[list[Score], list[dict], dict[str, Any]]:
    from sftscope.load.data import LETTERS

    with timer("load_data"):
        items = T.load_task_items("mmlu", cfg.data, split=cfg.split, limit=cfg.limit,
                                  shots=cfg.shots or 0, fewshot_data=cfg.fewshot_data,
                                  fewshot_seed=cfg.fewshot_seed)
    contexts = [T.mmlu_prompt(r, items.shots[i] if items.shots else None)
                for i, r in enumerate(items.records)]
    if cfg.chat_template:
        contexts = [_chat(tokenizer, c) for c in contexts]
    letters = [list(LETTERS[: len(T.mmlu_choices(r))]) for r in items.records]
    with timer("score"):
        lps = choice_logprobs(model, tokenizer, contexts, [[f" {x}" for x in ls]
                                                           for ls in letters], cfg.batch_size)
    preds, k = [], 0
    for i, (r, ls, lp) in enumerate(zip(items.records, letters, lps)):
        gold = T.mmlu_answer(r)
        pred = ls[max(range(len(lp)), key=lambda j: lp[j])]
        k += pred == gold
        preds.append({"index": i, "question": r["question"], "subject": r.get("subject", ""),
                      "target": gold, "prediction": pred, "correct": pred == gold,
                      "logprobs": dict(zip(ls, lp))})
    return ([_accuracy("mmlu", "accuracy", k, len(preds), cfg.level)], preds,
            {"shot_source": items.shot_source})


def _run_perplexity(model, tokenizer, cfg: EvalConfig, timer: Timer
                    ) -> tuple[list[Score], list[dict], dict[str, Any]]:
    from sftscope.load.data import load_samples

    source = T.task_source("perplexity", cfg.data)
    with timer("load_data"):
        samples = load_samples(source, text_field=cfg.text_field, n=cfg.limit,
                               split=cfg.split, shuffle=False)
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
    task, lv = "perplexity", cfg.level
    if has_adapter:
        delta = [a - b for a, b in zip(after, before)]
        scores = [_mean(task, "loss_before", before, lv), _mean(task, "loss_after", after, lv),
                  _mean(task, "loss_delta", delta, lv),
                  _mean(task, "ppl_before", before, lv, _exp),
                  _mean(task, "ppl_after", after, lv, _exp),
                  _mean(task, "ppl_ratio", delta, lv, _exp)]
    else:
        scores = [_mean(task, "loss", before, lv), _mean(task, "ppl", before, lv, _exp)]
    preds = [{"index": i, "text": t[:200], "tokens": c, "loss_before": b, "loss_after": a}
             for i, (t, c, b, a) in enumerate(zip(texts, counts, before, after))]
    return scores, preds, {"n_truncated": n_cut}


RUNNERS = {"gsm8k": _run_gsm8k, "mmlu": _run_mmlu, "perplexity": _run_perplexity}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def evaluate_model(model, tokenizer, cfg: EvalConfig, *, timer: Timer | None = None
                   ) -> EvalResult:
    """Run the task on an already loaded model (a PEFT model for adapter runs) and write
    ``scores.csv`` and ``predictions-<task>.jsonl`` into ``cfg.out`` (when set); no run.json.

    ``tune`` calls this on the model it just trained.
    """
    cfg = resolve_config(cfg)
    timer = timer or Timer()
    scores, preds, info = RUNNERS[cfg.task](model, tokenizer, cfg, timer)
    res = EvalResult(task=cfg.task, scores=scores, n=len(preds), out=cfg.out,
                     adapter=cfg.adapter, shots=cfg.shots or 0,
                     shot_source=info.get("shot_source"),
                     n_truncated=int(info.get("n_truncated", 0)),
                     generated_tokens=int(info.get("generated_tokens", 0)),
                     tokens_per_s=info.get("tokens_per_s"), timings=timer.seconds)
    if cfg.out is not None:
        out = Path(cfg.out)
        res.predictions_path = str(out / f"predictions-{cfg.task}.jsonl")
        _write_jsonl(Path(res.predictions_path), preds)
        res.scores_path = str(out / "scores.csv")
        write_table(_merge_scores(out / "scores.csv", res.table(), cfg.task), out / "scores.csv")
    return res


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


def evaluate(config: EvalConfig) -> EvalResult:
    """Load the model (and adapter), evaluate, and write scores, predictions and run.json."""
    from sftscope.load.adapters import adapter_folder, load_adapter
    from sftscope.load.models import LoadOptions, fingerprint, load_model, load_tokenizer

    cfg = resolve_config(config)
    timer = Timer()
    device = auto_device(cfg.device)
    dtype = auto_dtype(cfg.dtype, device)
    if cfg.adapter is not None:
        adapter_folder(cfg.adapter)  # fail before loading the model
    with timer("load_model"):
        tok = load_tokenizer(cfg.tokenizer or cfg.model, revision=cfg.revision)
        model = load_model(cfg.model, LoadOptions(revision=cfg.revision, dtype=dtype,
                                                  device=device, device_map=cfg.device_map))
        if cfg.adapter is not None:
            model = load_adapter(model, cfg.adapter, cfg.model, revision=cfg.revision,
                                 allow_other_base=cfg.allow_other_base)
    res = evaluate_model(model, tok, cfg, timer=timer)
    if cfg.out is not None:
        write_json(Path(cfg.out) / "run.json", run_record(
            "eval", cfg, model=fingerprint(cfg.model, cfg.revision), adapter=cfg.adapter,
            n_blocks=_n_blocks(model), device=device, dtype=dtype, result=res,
            timings=timer.seconds, finished=True))
    return res


def _n_blocks(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    return None
