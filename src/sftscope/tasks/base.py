"""What an evaluation task is, and the helpers every task shares (no torch, no file I/O).

A task module (``sftscope/tasks/<name>.py``) defines one module-level ``TASK = Task(...)``:
where its data lives, which fields a record needs, how a record becomes a prompt (and an
analysis sample), how an answer is scored, and which metric is primary. The registry in
``sftscope.tasks`` finds every such module, so adding a task is adding one file.

Kinds, and what the evaluator does with each:
- ``generate``: greedy completion of ``prompt(record, shots)`` until ``stops`` or EOS, then
  ``score(completion, record)`` (per-item fields, with one boolean per metric);
- ``choice``: log-likelihood of each of ``continuations(record)`` after the prompt, tokenised
  in context as lm-evaluation-harness does (:func:`encode_pair`); correct = argmax is gold
  (``accuracy``); with ``choice_texts``, also ``accuracy_norm`` (lm-eval's ``acc_norm``: the
  argmax of the log-likelihood divided by the choice's length in characters);
- ``loss``: mean token loss of the texts of any text source (no prompt, no answer).

Most tasks are declared as lm-eval declares them, with :func:`choice_task` (``doc_to_text``,
``doc_to_choice``, ``doc_to_target``) or :func:`generate_task`; the factories fill in the
prompt with its shots, the continuations, the checks and the analysis sample.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftscope.errors import SftscopeError, quoted

LETTERS = "ABCDEFGHIJ"
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
KINDS = ("generate", "choice", "loss")
SAMPLERS = ("random", "first_n")


@dataclass(frozen=True)
class HubData:
    """Where a dataset lives on the Hugging Face hub (id, config, default split)."""

    hub: str
    config: str | None
    split: str


@dataclass(frozen=True)
class AnalysisSample:
    """What analysis needs from one record: the prompt, the answer after it, metadata."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass(frozen=True)
class Task:
    """One evaluation task. Only ``name``, ``kind``, ``metrics`` and ``primary`` are always
    needed; the callables a kind uses are listed in the module docstring."""

    name: str
    kind: str
    summary: str
    metrics: tuple[str, ...]
    primary: str
    default_data: str
    lower_is_better: bool = False
    hub: HubData | None = None
    fields: tuple[str, ...] = ()
    gold_fields: tuple[str, ...] = ()
    shot_split: str | None = None
    default_shots: int = 0
    shot_sampler: str = "random"
    shot_key: Callable[[dict], Any] | None = None
    stops: tuple[str, ...] = ()
    check: Callable[[dict], str | None] | None = None
    prompt: Callable[[dict, Sequence[dict]], str] | None = None
    score: Callable[[str, dict], dict[str, Any]] | None = None
    continuations: Callable[[dict], list[str]] | None = None
    labels: Callable[[dict], list[str]] | None = None
    gold_index: Callable[[dict], int] | None = None
    analysis_sample: Callable[[dict], AnalysisSample] | None = None
    describe: Callable[[dict], dict[str, Any]] | None = None
    item_values: Callable[[dict], dict[str, float | None]] | None = None
    choice_texts: Callable[[dict], list[str]] | None = None
    shots_skip_item: bool = False  # lm-eval draws n + 1 shots and drops the item, as from the
    # evaluated split, whatever the pool (its sampler does so when the config has no test split)

    def item_metrics(self) -> tuple[str, ...]:
        """The per-item scores a sweep summarises and ranks by (``item_values``' keys)."""
        if self.item_values is None:
            return self.metrics
        return tuple(self.item_values({}))

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if self.primary not in self.metrics:
            raise ValueError(f"task {self.name}: primary {self.primary!r} is not a metric")
        if self.shot_sampler not in SAMPLERS:
            raise ValueError(f"task {self.name}: shot_sampler {self.shot_sampler!r}")
        need = {"generate": ("prompt", "score", "check"),
                "choice": ("prompt", "continuations", "labels", "gold_index", "check"),
                "loss": ()}[self.kind]
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"task {self.name} ({self.kind}) lacks {', '.join(missing)}")

    @property
    def has_items(self) -> bool:
        """Whether the task scores records with answers (not plain text)."""
        return self.kind != "loss"

    def problem(self, record: Any) -> str | None:
        """What is wrong with a record for this task (None: nothing)."""
        if not isinstance(record, dict):
            return f"is not an object (got {type(record).__name__})"
        missing = [f for f in self.fields if f not in record]
        if missing:
            return (f"lacks field(s) {', '.join(missing)} that the {self.name} task needs "
                    f"(it has: {', '.join(map(str, record)) or 'no fields'})")
        return self.check(record) if self.check is not None else None


# ------------------------------------------------------------------ values of records

def is_missing(value: Any) -> bool:
    """None, NaN (pandas fills empty CSV cells with it) or a blank string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def text_problem(record: dict, name: str) -> str | None:
    """A text field must be a non-blank string (a number is accepted as its text)."""
    v = record.get(name)
    if is_missing(v):
        return f"field {name!r} is {_show(v)}"
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return f"field {name!r} is a {type(v).__name__}, not text"
    return None


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float) and math.isnan(v):
        return "NaN (an empty cell)"
    return "empty"


# ------------------------------------------------------------------ stops and tokenisation

def trim_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` at the stop strings, one after the other (lm-eval's
    ``postprocess_generated_text``: ``text.split(stop)[0]`` for each non-empty stop)."""
    for s in stops:
        if s:
            text = text.split(s)[0]
    return text


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a log-likelihood context as lm-eval's HFLM ``tok_encode``: special tokens
    are added unless the text already starts with the prefix token (BOS, else EOS)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.eos_token_id
    special = True
    if prefix is not None and text.startswith(tokenizer.decode([prefix])):
        special = False
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a generation prompt as HFLM ``tok_batch_encode``: no special tokens when
    the text already starts with the BOS token (a rendered chat template)."""
    bos = getattr(tokenizer, "bos_token", None)
    special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval's ``_encode_pair`` (causal models).

    Whitespace at the end of the context moves to the continuation, the two are tokenised
    together and the continuation is what follows the context's own ids: a SentencePiece
    tokenizer gives `` A`` other ids in context than alone.
    """
    if not context:
        raise SftscopeError("a log-likelihood context is empty; the prompt must not be empty")
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(tokenizer, context + continuation)
    ctx = encode(tokenizer, context)
    return ctx, whole[len(ctx):]


# ------------------------------------------------------------------ shots

def pick_shots(items: Sequence[dict], pool: Sequence[dict], n: int, *, sampler: str = "random",
               key: Callable[[dict], Any] | None = None, seed: int = FEWSHOT_SEED,
               same_pool: bool = False) -> list[list[dict]]:
    """The shots of each item, as lm-eval's samplers draw them.

    ``random``: one ``Random(seed)`` for the whole run and one ``sample(pool, n)`` per item in
    item order; when the pool is the evaluated set, ``n + 1`` are drawn and the item removed.
    ``first_n``: the first ``n`` pool records with the item's ``key`` (MMLU: the same subject),
    the item itself left out when the pool is the evaluated set.
    Raises when a pool is too small.
    """
    if n <= 0:
        return [[] for _ in items]
    out: list[list[dict]] = []
    if sampler == "first_n":
        groups: dict[Any, list[dict]] = {}
        for r in pool:
            groups.setdefault(key(r) if key else None, []).append(r)
        for it in items:
            k = key(it) if key else None
            cand = groups.get(k, [])
            if same_pool:
                cand = [r for r in cand if r != it]
            if len(cand) < n:
                what = f" with {k!r}" if key else ""
                raise SftscopeError(f"{n}-shot prompts need {n} shot records{what} but the shot "
                                    f"pool has {len(cand)}; lower --shots or give "
                                    f"--fewshot-data")
            out.append(list(cand[:n]))
        return out
    need = n + (1 if same_pool else 0)
    if len(pool) < need:
        raise SftscopeError(f"{n}-shot prompts need {need} shot records but the shot pool has "
                            f"{len(pool)}; lower --shots or give --fewshot-data")
    rnd = random.Random(seed)
    pool = list(pool)
    for it in items:
        if not same_pool:
            out.append(rnd.sample(pool, n))
            continue
        drawn = [r for r in rnd.sample(pool, need) if r != it][:n]
        if len(drawn) < n:  # the item occurs more than once in the pool
            rest = [r for r in pool if r != it]
            if len(rest) < n:
                raise SftscopeError(f"{n}-shot prompts need {n} shot records other than the "
                                    f"item but the shot pool has {len(rest)}")
            drawn = rnd.sample(rest, n)
        out.append(drawn)
    return out


# ------------------------------------------------------------------ task factories

Doc = Callable[[dict], Any]


def _problem_of(fields: Sequence[str], *calls: Doc) -> Callable[[dict], str | None]:
    """A record check: every text field non-blank, then every ``call`` works on the record."""
    def check(record: dict) -> str | None:
        for f in fields:
            if isinstance(record.get(f), str) or is_missing(record.get(f)):
                problem = text_problem(record, f)
                if problem:
                    return problem
        try:
            for call in calls:
                call(record)
        except ValueError as e:
            return str(e)
        except (KeyError, TypeError, IndexError, AttributeError) as e:
            return f"cannot be read as this task's record ({quoted(e)})"
        return None
    return check


def fewshot_prompt(record: dict, shots: Sequence[dict], doc_to_text: Doc, gold_text: Doc, *,
                   description: str = "", target_delimiter: str = " ",
                   fewshot_delimiter: str = "\n\n") -> str:
    """lm-eval's few-shot context: ``description``, then each shot's text, the target
    delimiter and its gold answer, each followed by the few-shot delimiter, then the item's
    text."""
    parts = "".join(f"{doc_to_text(d)}{target_delimiter}{gold_text(d)}{fewshot_delimiter}"
                    for d in shots)
    return description + parts + doc_to_text(record)


def generate_task(name: str, *, summary: str, hub: HubData | None, fields: tuple[str, ...],
                  doc_to_text: Doc, doc_to_target: Doc, score: Callable[[str, dict], dict],
                  metrics: tuple[str, ...], primary: str, stops: tuple[str, ...],
                  check: Callable[[dict], str | None], target_delimiter: str = " ",
                  fewshot_delimiter: str = "\n\n", shot_split: str | None = "train",
                  default_shots: int = 0, gold_fields: tuple[str, ...] = (),
                  describe: Callable[[dict], dict[str, Any]] | None = None,
                  meta: Callable[[dict], dict[str, Any]] | None = None) -> Task:
    """A generation task as lm-eval's ``output_type: generate_until`` config declares it: the
    prompt is :func:`fewshot_prompt` over ``doc_to_text`` and ``doc_to_target``, greedy
    completion until ``stops``, ``score(completion, record)`` gives one boolean per metric."""
    def prompt(record: dict, shots: Sequence[dict] = ()) -> str:
        return fewshot_prompt(record, shots, doc_to_text, doc_to_target,
                              target_delimiter=target_delimiter,
                              fewshot_delimiter=fewshot_delimiter)

    def sample(record: dict) -> AnalysisSample:
        return AnalysisSample(doc_to_text(record),
                              f"{target_delimiter}{doc_to_target(record)}",
                              meta(record) if meta else {})

    return Task(
        name=name, kind="generate", summary=summary, metrics=metrics, primary=primary,
        default_data=name, hub=hub, fields=fields, gold_fields=gold_fields,
        shot_split=shot_split, default_shots=default_shots, stops=stops, check=check,
        prompt=prompt, score=score, analysis_sample=sample, describe=describe,
        item_values=lambda row: {m: row.get(m) for m in metrics})


def choice_task(name: str, *, summary: str, hub: HubData | None, fields: tuple[str, ...],
                doc_to_text: Doc, doc_to_choice: Callable[[dict], list[str]],
                doc_to_target: Callable[[dict], int], process: Doc | None = None,
                description: Callable[[dict], str] | None = None,
                labels: Callable[[dict], list[str]] | None = None,
                metrics: tuple[str, ...] = ("accuracy", "accuracy_norm"),
                target_delimiter: str = " ", fewshot_delimiter: str = "\n\n",
                shot_split: str | None = "train", default_shots: int = 0,
                shot_sampler: str = "random", shot_key: Doc | None = None,
                shots_skip_item: bool = False,
                describe: Callable[[dict], dict[str, Any]] | None = None,
                meta: Callable[[dict], dict[str, Any]] | None = None,
                check: Callable[[dict], str | None] | None = None) -> Task:
    """A multiple-choice task as lm-eval's ``output_type: multiple_choice`` config declares it.

    ``process`` (lm-eval's ``process_docs``, per record) runs first; the prompt is
    ``description`` + each shot's ``doc_to_text + target_delimiter + its gold choice`` followed
    by ``fewshot_delimiter``, then the item's ``doc_to_text``; each choice is scored as
    ``target_delimiter + choice``. ``labels``: how predictions name the choices (default
    ``A``, ``B``, ...). ``accuracy_norm`` (when among ``metrics``) divides by each choice's
    length in characters. ``check``: a record check of the task's own (default: the text
    fields are non-blank and the text, the choices and the gold can be read)."""
    doc = process or (lambda r: r)

    def prompt(record: dict, shots: Sequence[dict] = ()) -> str:
        d = doc(record)
        return fewshot_prompt(d, [doc(s) for s in shots], doc_to_text,
                              lambda s: doc_to_choice(s)[doc_to_target(s)],
                              description=description(d) if description else "",
                              target_delimiter=target_delimiter,
                              fewshot_delimiter=fewshot_delimiter)

    def continuations(record: dict) -> list[str]:
        return [target_delimiter + c for c in doc_to_choice(doc(record))]

    def gold(record: dict) -> int:
        d = doc(record)
        i, n = doc_to_target(d), len(doc_to_choice(d))
        if not 0 <= i < n:
            raise ValueError(f"gold index {i} is not one of the {n} choices")
        return i

    def sample(record: dict) -> AnalysisSample:
        d, conts, i = doc(record), continuations(record), gold(record)
        return AnalysisSample(doc_to_text(d), conts[i], {"choices": conts, "gold": i,
                                                         **(meta(record) if meta else {})})

    return Task(
        name=name, kind="choice", summary=summary, metrics=metrics, primary=metrics[0],
        default_data=name, hub=hub, fields=fields, shot_split=shot_split,
        default_shots=default_shots, shot_sampler=shot_sampler, shot_key=shot_key,
        check=check or _problem_of(fields, lambda r: doc_to_text(doc(r)), gold), prompt=prompt,
        continuations=continuations,
        labels=labels or (lambda r: list(LETTERS[: len(doc_to_choice(doc(r)))])),
        gold_index=gold, analysis_sample=sample, describe=describe,
        item_values=lambda row: {m: row.get(col) for m, col in (("accuracy", "correct"),
                                                                 ("accuracy_norm", "correct_norm"))
                                 if m in metrics},
        choice_texts=(lambda r: list(doc_to_choice(doc(r)))) if "accuracy_norm" in metrics
        else None, shots_skip_item=shots_skip_item)
