"""Datasets: registered ones with the paper's formatting, and local JSONL/CSV/Parquet/text files.

A data source is one of:
- ``gsm8k`` (a registered name: loaded through ``datasets`` from the hub, where reachable);
- ``gsm8k:path/to/file.jsonl`` (a registered format on a local file with the same fields);
- ``path/to/file.jsonl|.csv|.parquet|.txt`` (generic: ``text_field`` or ``template``).
Every sample keeps its ``prompt`` and ``answer`` when the format knows them, so probing and
evaluation can find the position right after the prompt.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftscope.errors import SftscopeError

LETTERS = "ABCDEFGHIJ"


@dataclass
class Sample:
    """One text; ``prompt + answer == text`` when the format has an answer."""

    text: str
    prompt: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _gsm8k(r: dict) -> Sample:
    prompt = f"Question: {r['question']}\nAnswer:"
    answer = f" {r['answer']}"
    return Sample(prompt + answer, prompt, answer, {"target": final_number(r["answer"])})


def _mmlu(r: dict) -> Sample:
    choices = r["choices"]
    if isinstance(choices, str):
        choices = json.loads(choices)
    body = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    prompt = f"{r['question'].strip()}\n{body}\nAnswer:"
    ans = r["answer"]
    letter = LETTERS[int(ans)] if str(ans).isdigit() else str(ans).strip()
    return Sample(f"{prompt} {letter}", prompt, f" {letter}",
                  {"letter": letter, "n_choices": len(choices),
                   "subject": r.get("subject", "")})


def _text(key: str) -> Callable[[dict], Sample]:
    return lambda r: Sample(str(r[key]))


def _humaneval(r: dict) -> Sample:
    return Sample(r["prompt"] + r.get("canonical_solution", ""), r["prompt"],
                  r.get("canonical_solution") or None)


def _mt_bench(r: dict) -> Sample:
    turns = r.get("prompt") or r.get("turns")
    return Sample("\n".join(turns) if isinstance(turns, list) else str(turns))


@dataclass(frozen=True)
class DatasetSpec:
    """Where a registered dataset lives on the hub and how its records become samples."""

    hub: str
    config: str | None
    split: str
    fields: tuple[str, ...]
    format: Callable[[dict], Sample]


REGISTRY: dict[str, DatasetSpec] = {
    "gsm8k": DatasetSpec("openai/gsm8k", "main", "test", ("question", "answer"), _gsm8k),
    "mmlu": DatasetSpec("cais/mmlu", "all", "test", ("question", "choices", "answer"), _mmlu),
    "wikitext": DatasetSpec("Salesforce/wikitext", "wikitext-2-raw-v1", "test", ("text",),
                            _text("text")),
    "ifeval": DatasetSpec("google/IFEval", None, "train", ("prompt",), _text("prompt")),
    "humaneval": DatasetSpec("openai/openai_humaneval", None, "test", ("prompt",), _humaneval),
    "mt_bench": DatasetSpec("HuggingFaceH4/mt_bench_prompts", None, "train", ("prompt",),
                            _mt_bench),
    "toxigen": DatasetSpec("toxigen/toxigen-data", "annotated", "test", ("text",), _text("text")),
}

_NUM = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def final_number(answer: str) -> str | None:
    """The number after ``####`` (GSM8K's convention), commas and ``$`` stripped."""
    if "####" not in answer:
        return None
    tail = answer.split("####")[-1]
    m = _NUM.search(tail)
    return m.group(0).replace(",", "").replace("$", "") if m else None


def read_local(path: Path, split: str | None = None) -> list[dict]:
    """Records of a local JSONL/JSON/CSV/Parquet/text file (text: one record per line)."""
    if not path.exists():
        raise SftscopeError(f"data file {path} does not exist")
    if path.is_dir():
        raise SftscopeError(f"data {path} is a folder; give a .jsonl, .csv, .parquet or .txt file")
    suffix = "".join(path.suffixes[-1:]).lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise SftscopeError(
                                f"{path}, line {i}: not valid JSON ({e.msg})") from e
            return rows
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data.get(split or "data", [])
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",").to_dict("records")
        if suffix == ".parquet":
            import pandas as pd

            return pd.read_parquet(path).to_dict("records")
        if suffix in (".txt", ".text", ".md"):
            return [{"text": ln} for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip()]
    except SftscopeError:
        raise
    except Exception as e:  # pandas/pyarrow parse errors
        raise SftscopeError(f"{path} could not be read ({type(e).__name__}: {e})") from e
    raise SftscopeError(f"data file {path}: unknown format {suffix!r}; "
                        f"use .jsonl, .json, .csv, .parquet or .txt")


def read_hub(spec: DatasetSpec, split: str | None = None) -> list[dict]:
    """Records of a registered dataset, through ``datasets`` (needs a reachable hub)."""
    try:
        import datasets

        ds = datasets.load_dataset(spec.hub, spec.config, split=split or spec.split)
    except Exception as e:  # offline, missing, or gated
        raise SftscopeError(
            f"could not load {spec.hub} from the hub ({type(e).__name__}); offline, pass a "
            f"local file with the same fields ({', '.join(spec.fields)}) as NAME:PATH"
        ) from e
    return [dict(r) for r in ds]


def parse_source(source: str) -> tuple[DatasetSpec | None, Path | None]:
    """Split a data source into (registered format, local path)."""
    name, _, rest = source.partition(":")
    if name in REGISTRY:
        return REGISTRY[name], (Path(rest).expanduser() if rest else None)
    return None, Path(source).expanduser()


def read_records(source: str, split: str | None = None) -> list[dict]:
    """Raw records of a source (hub or local), without formatting."""
    spec, path = parse_source(source)
    if path is not None:
        return read_local(path, split)
    assert spec is not None
    return read_hub(spec, split)


def _template_fn(template: str) -> Callable[[dict], Sample]:
    def fmt(r: dict) -> Sample:
        try:
            text = template.format(**r)
        except KeyError as e:
            raise SftscopeError(f"--template names field {e} that the data does not have "
                                f"(fields: {', '.join(r)})") from e
        return Sample(text)
    return fmt


def load_samples(source: str, *, text_field: str | None = None, template: str | None = None,
                 n: int | None = None, seed: int = 0, split: str | None = None,
                 shuffle: bool = True) -> list[Sample]:
    """Read, format and (seeded) subsample a data source into samples."""
    spec, path = parse_source(source)
    records = read_records(source, split)
    if not records:
        raise SftscopeError(f"data {source} is empty; give a file with at least one record")
    if template:
        fmt = _template_fn(template)
    elif text_field:
        if text_field not in records[0]:
            raise SftscopeError(f"data {source} has no field {text_field!r} "
                                f"(fields: {', '.join(map(str, records[0]))})")
        fmt = _text(text_field)
    elif spec is not None:
        missing = [f for f in spec.fields if f not in records[0]]
        if missing:
            raise SftscopeError(f"data {source} lacks field(s) {', '.join(missing)} that the "
                                f"{source.split(':')[0]} format needs")
        fmt = spec.format
    elif "text" in records[0]:
        fmt = _text("text")
    else:
        raise SftscopeError(f"data {source}: say which field holds the text with --text-field "
                            f"(fields: {', '.join(map(str, records[0]))}) or give --template")
    samples = [fmt(r) for r in records]
    samples = [s for s in samples if s.text.strip()]
    if not samples:
        raise SftscopeError(f"data {source} has no non-empty text")
    for i, s in enumerate(samples):
        s.meta.setdefault("index", i)
    if shuffle:
        random.Random(seed).shuffle(samples)
    return samples[:n] if n else samples


@dataclass
class TokenizedSet:
    """Token ids of samples (no padding), with what truncation did."""

    input_ids: list[list[int]]
    prompt_lengths: list[int | None]
    n_truncated: int
    max_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def render(sample: Sample, tokenizer, chat_template: bool) -> tuple[str, str | None]:
    """The text (and its prompt) as the model sees it, optionally through a chat template."""
    if not chat_template:
        return sample.text, sample.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise SftscopeError("--chat-template is on but the tokenizer has no chat template")
    user = sample.prompt if sample.prompt is not None else sample.text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                           add_generation_prompt=True)
    if sample.answer is None:
        return prompt, None
    return prompt + sample.answer.lstrip(), prompt


def tokenize(samples: list[Sample], tokenizer, max_length: int = 512,
             chat_template: bool = False, add_special_tokens: bool = True) -> TokenizedSet:
    """Tokenize without padding; truncation is counted, never silent."""
    ids: list[list[int]] = []
    plens: list[int | None] = []
    n_trunc = 0
    for s in samples:
        text, prompt = render(s, tokenizer, chat_template)
        special = add_special_tokens and not chat_template
        toks = tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(toks) > max_length:
            n_trunc += 1
            toks = toks[:max_length]
        if not toks:
            toks = [tokenizer.eos_token_id or 0]
        ids.append(list(toks))
        if prompt is not None:
            p = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
            plens.append(p if p < len(toks) else None)
        else:
            plens.append(None)
    return TokenizedSet(ids, plens, n_trunc, max_length)


@dataclass
class Batch:
    """A padded batch: ``index`` holds the positions of its samples in the tokenized set."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: list[int]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """Pad token lists into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "right":
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        else:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids, mask


def iter_batches(tok: TokenizedSet, batch_size: int, pad_id: int, side: str = "right",
                 start: int = 0, sort_by_length: bool = False) -> Iterator[Batch]:
    """Batches in order (from batch number ``start``, for resuming)."""
    order = list(range(len(tok)))
    if sort_by_length:
        order.sort(key=lambda i: len(tok.input_ids[i]))
    for b in range(start, (len(order) + batch_size - 1) // batch_size):
        idx = order[b * batch_size:(b + 1) * batch_size]
        ids, mask = pad_batch([tok.input_ids[i] for i in idx], pad_id, side)
        yield Batch(ids, mask, idx)
