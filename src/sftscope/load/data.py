"""Datasets: registered ones with the paper's formatting, and local JSONL/CSV/Parquet/text files.

A data source is one of:
- ``gsm8k`` (a registered name: loaded through ``datasets`` from the hub, where reachable);
- ``gsm8k:path/to/file.jsonl`` (a registered format on a local file with the same fields);
- ``preference:path/to/file.jsonl`` (``prompt``, ``chosen``, ``rejected``, each a text or a
  list of chat messages; a sample is prompt + chosen, the pair is in its meta);
- ``preference:hh-rlhf`` (a registered hub set of a local-only format, ``SETS``: its rows are
  converted into that format's records, a row that cannot be is refused or skipped;
  ``preference:hh-rlhf@REVISION`` reads a hub revision: branch, tag or commit);
- ``path/to/file.jsonl|.csv|.parquet|.txt`` (generic: ``text_field`` or ``template``).
Every sample keeps its ``prompt`` and ``answer`` when the format knows them, so probing and
evaluation can find the position right after the prompt. The GSM8K and MMLU formats are the
evaluation tasks' own (``sftscope.tasks``), so analysis and evaluation see the same prompts.

Never silently wrong: a record that is not an object, lacks a field the format needs, or has a
null/NaN/empty text is refused with its line or record number, or skipped and counted when the
caller asks (``skip_bad``). Nothing here imports torch at module level, so a command can check
its data (:func:`check_source`, :func:`check_template`) before loading a model.

One path for analysis, probe, swap and suggest: :func:`prepare` (read, format, validate,
seeded subsample, tokenize, count truncation). One chat prompt for training, evaluation and
analysis: :func:`chat_prompt`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftscope.errors import SftscopeError, quoted
from sftscope.tasks import LETTERS, get_task, preference, task_names
from sftscope.tasks.base import is_missing, text_problem

if TYPE_CHECKING:
    import torch

__all__ = ["LETTERS", "REGISTRY", "SETS", "Batch", "DatasetSpec", "Prepared", "RecordSet", "Sample",
           "TokenizedSet", "chat_prompt", "check_source", "check_template", "dataset_names",
           "iter_batches", "load_records", "load_samples", "pad_batch", "parse_source", "prepare",
           "read_records", "read_samples", "render", "spec_of", "tokenize"]

TEXT_SUFFIXES = (".txt", ".text", ".md")
KNOWN_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet") + TEXT_SUFFIXES


@dataclass
class Sample:
    """One text; ``prompt + answer == text`` when the format has an answer."""

    text: str
    prompt: str | None = None
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class BadRecord(ValueError):
    """A record a format cannot use (the message says why, without the location)."""


Formatter = Callable[[dict], Sample]


def _task_format(name: str) -> Formatter:
    task = get_task(name)

    def fmt(r: dict) -> Sample:
        problem = task.problem(r)
        if problem:
            raise BadRecord(problem)
        if task.analysis_sample is None:
            raise SftscopeError(f"the {name} format has no analysis text; give --text-field "
                                f"or --template")
        s = task.analysis_sample(r)
        return Sample(s.text, s.prompt, s.answer, dict(s.meta))
    return fmt


def _text(key: str) -> Formatter:
    def fmt(r: dict) -> Sample:
        if key not in r:
            raise BadRecord(f"lacks field {key!r} (it has: {', '.join(map(str, r))})")
        problem = text_problem(r, key)
        if problem:
            raise BadRecord(problem)
        return Sample(str(r[key]))
    return fmt


def _humaneval(r: dict) -> Sample:
    problem = text_problem(r, "prompt")
    if problem:
        raise BadRecord(problem)
    sol = r.get("canonical_solution")
    sol = None if is_missing(sol) else str(sol)
    return Sample(str(r["prompt"]) + (sol or ""), str(r["prompt"]), sol)


def _mt_bench(r: dict) -> Sample:
    turns = r.get("prompt")
    if turns is None:
        turns = r.get("turns")
    if hasattr(turns, "__len__") and not isinstance(turns, (str, dict)):
        turns = "\n".join(str(t) for t in turns)
    if is_missing(turns):
        raise BadRecord("has no 'prompt' or 'turns' text")
    return Sample(str(turns))


def _preference(r: dict) -> Sample:
    """A preference pair: the sample is prompt + chosen (what analysis of it sees); the pair
    itself (as given: text or chat messages) is in ``meta["pair"]``."""
    problem = preference.check(r)
    if problem:
        raise BadRecord(problem)
    s = preference.analysis_sample(r)
    return Sample(s.text, s.prompt, s.answer, dict(s.meta))


@dataclass(frozen=True)
class DatasetSpec:
    """Where a registered dataset lives on the hub and how its records become samples.

    ``hub=None``: a local-only format (``NAME:FILE``). ``blank_ok``: blank texts are part of
    the dataset (WikiText's empty lines); they are dropped and counted instead of refused.
    ``convert``: turns a hub row into a record of the format (``ValueError``: it cannot).
    ``splits``: the hub's names for the usual split names (``train`` -> ``train_prefs``).
    ``revision``: the hub revision read (None: the default branch).
    """

    hub: str | None
    config: str | None
    split: str
    fields: tuple[str, ...]
    format: Formatter
    blank_ok: bool = False
    convert: Callable[[dict], dict] | None = None
    splits: tuple[tuple[str, str], ...] = ()
    revision: str | None = None

    def hub_split(self, split: str | None) -> str:
        """The hub's name of ``split`` (the default split when None)."""
        return dict(self.splits).get(split or self.split, split or self.split)


def _task_spec(name: str) -> DatasetSpec:
    task = get_task(name)
    assert task.hub is not None
    return DatasetSpec(task.hub.hub, task.hub.config, task.hub.split, task.fields,
                       _task_format(name))


REGISTRY: dict[str, DatasetSpec] = {  # text datasets; every task with hub data is one too
    "wikitext": DatasetSpec("Salesforce/wikitext", "wikitext-2-raw-v1", "test", ("text",),
                            _text("text"), blank_ok=True),
    "ifeval": DatasetSpec("google/IFEval", None, "train", ("prompt",), _text("prompt")),
    "humaneval": DatasetSpec("openai/openai_humaneval", None, "test", ("prompt",), _humaneval),
    "mt_bench": DatasetSpec("HuggingFaceH4/mt_bench_prompts", None, "train", ("prompt",),
                            _mt_bench),
    "toxigen": DatasetSpec("toxigen/toxigen-data", "annotated", "test", ("text",), _text("text")),
    "preference": DatasetSpec(None, None, "train", preference.FIELDS, _preference),
}


def _preference_set(hub: str, split: str, convert: Callable[[dict], dict],
                    splits: tuple[tuple[str, str], ...] = ()) -> DatasetSpec:
    return DatasetSpec(hub, None, split, preference.FIELDS, _preference, convert=convert,
                       splits=splits)


SETS: dict[str, dict[str, DatasetSpec]] = {  # FORMAT:NAME, hub sets of a local-only format
    "preference": {
        "hh-rlhf": _preference_set("Anthropic/hh-rlhf", "train", preference.from_dialogues),
        "ultrafeedback": _preference_set(
            "HuggingFaceH4/ultrafeedback_binarized", "train_prefs",
            preference.from_conversations, (("train", "train_prefs"), ("test", "test_prefs"))),
        "orca-dpo": _preference_set("argilla/distilabel-intel-orca-dpo-pairs", "train",
                                    preference.from_instruction),
    },
}


# ------------------------------------------------------------------ reading records

@dataclass
class RecordSet:
    """Records of a source, where each came from (``line 3``), and what reading skipped."""

    source: str
    records: list[dict]
    where: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-1:]).lower()


def _check_file(path: Path) -> str:
    """The suffix of a readable local data file; refuses missing, folders, unknown formats."""
    if not path.exists():
        raise SftscopeError(f"data file {path} does not exist")
    if path.is_dir():
        raise SftscopeError(f"data {path} is a folder; give a .jsonl, .csv, .parquet or .txt file")
    if not os.access(path, os.R_OK):
        raise SftscopeError(f"data file {path} is not readable (check its permissions)")
    suffix = _suffix(path)
    if suffix not in KNOWN_SUFFIXES:
        raise SftscopeError(f"data file {path}: unknown format {suffix!r}; "
                            f"use .jsonl, .json, .csv, .parquet or .txt")
    return suffix


def _read_jsonl(path: Path, skip_bad: bool) -> RecordSet:
    rows, where, skipped = [], [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"{path}, line {i}: not valid JSON ({e.msg})"
            else:
                if isinstance(obj, dict):
                    rows.append(obj)
                    where.append(f"{path}, line {i}")
                    continue
                problem = (f"{path}, line {i}: is not a JSON object (got "
                           f"{type(obj).__name__ if obj is not None else 'null'})")
            if not skip_bad:
                raise SftscopeError(f"{problem}; fix it or skip bad records")
            skipped.append(problem)
    return RecordSet(str(path), rows, where, skipped)


def _read_local(path: Path, split: str | None, skip_bad: bool) -> RecordSet:
    suffix = _check_file(path)
    try:
        if suffix in (".jsonl", ".ndjson"):
            return _read_jsonl(path, skip_bad)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                data = data.get(split or "data", [])
            if not isinstance(data, list):
                raise SftscopeError(f"{path}: expected a list of records (or {{\"data\": [...]}})")
            rows = data
            where = [f"{path}, record {i}" for i in range(1, len(rows) + 1)]
        elif suffix in (".csv", ".tsv"):
            import pandas as pd

            rows = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",").to_dict("records")
            where = [f"{path}, row {i}" for i in range(1, len(rows) + 1)]
        elif suffix == ".parquet":
            import pandas as pd

            rows = pd.read_parquet(path).to_dict("records")
            where = [f"{path}, row {i}" for i in range(1, len(rows) + 1)]
        else:  # text: one record per non-blank line
            rows, where = [], []
            for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if ln.strip():
                    rows.append({"text": ln})
                    where.append(f"{path}, line {i}")
    except SftscopeError:
        raise
    except Exception as e:  # pandas/pyarrow/unicode errors
        raise SftscopeError(f"{path} could not be read ({quoted(e)})") from e
    out = RecordSet(str(path), [], [])
    for r, w in zip(rows, where):
        if isinstance(r, dict):
            out.records.append(r)
            out.where.append(w)
            continue
        problem = f"{w}: is not an object (got {type(r).__name__})"
        if not skip_bad:
            raise SftscopeError(f"{problem}; fix it or skip bad records")
        out.skipped.append(problem)
    return out


def read_local(path: Path, split: str | None = None) -> list[dict]:
    """Records of a local JSONL/JSON/CSV/Parquet/text file (text: one record per line)."""
    return _read_local(Path(path), split, False).records


def read_hub(spec: DatasetSpec, split: str | None = None, source: str | None = None
             ) -> list[dict]:
    """Rows of a registered dataset, through ``datasets`` (needs a reachable hub)."""
    name = source or spec.hub
    from sftscope.load.runtime import quiet_libraries

    try:
        import datasets

        with quiet_libraries():
            ds = datasets.load_dataset(spec.hub, spec.config, split=spec.hub_split(split),
                                       revision=spec.revision)
    except Exception as e:  # offline, missing, or gated
        fmt = (source or "NAME").partition(":")[0]
        raise SftscopeError(
            f"could not load {name} ({spec.hub}) from the hub ({type(e).__name__}); offline, "
            f"give a local file of {fmt} records (fields {', '.join(spec.fields)}) as "
            f"{fmt}:FILE"
        ) from e
    return [dict(r) for r in ds]


def dataset_names() -> list[str]:
    """Every registered hub dataset name: the tasks with hub data and ``REGISTRY``'s (local-only
    formats such as ``preference`` left out)."""
    tasks = [n for n in task_names() if get_task(n).hub is not None]
    return [*tasks, *(n for n, spec in REGISTRY.items() if n not in tasks and spec.hub),
            *(f"{fmt}:{n}" for fmt, sets in SETS.items() for n in sets)]


def spec_of(name: str) -> DatasetSpec | None:
    """The registered dataset called ``name``: one of ``REGISTRY`` or any task with hub data
    (a task added as one file is a data format too)."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name in task_names() and get_task(name).hub is not None:
        return _task_spec(name)
    return None


def parse_source(source: str) -> tuple[DatasetSpec | None, Path | None]:
    """Split a data source into (registered format, local path)."""
    name, _, rest = source.partition(":")
    set_name, at, revision = rest.partition("@")
    if set_name in SETS.get(name, {}):
        if at and not revision:
            raise SftscopeError(f"data {source!r}: name a hub revision after '@' (branch, tag "
                                f"or commit), or drop the '@'")
        spec = SETS[name][set_name]
        return (replace(spec, revision=revision) if revision else spec), None
    spec = spec_of(name)
    if spec is not None:
        return spec, (Path(rest).expanduser() if rest else None)
    return None, Path(source).expanduser()


def load_records(source: str, split: str | None = None, *, skip_bad: bool = False
                 ) -> RecordSet:
    """Records of a source (hub or local) with their locations; lines that are not JSON
    objects are refused, or skipped and listed in ``skipped`` with ``skip_bad``."""
    spec, path = parse_source(source)
    if path is not None:
        return _read_local(path, split, skip_bad)
    assert spec is not None
    _need_file(source, spec)
    rows = read_hub(spec, split, source)
    at = f"@{spec.revision}" if spec.revision else ""
    name = f"{spec.hub}{at} ({spec.hub_split(split)} split)"
    out = RecordSet(source, rows, [f"{name}, record {i}" for i in range(1, len(rows) + 1)])
    return out if spec.convert is None else _converted(out, spec.convert, skip_bad)


def _converted(recs: RecordSet, convert: Callable[[dict], dict], skip_bad: bool) -> RecordSet:
    """A hub set's rows as records of its format; a row that cannot be converted is refused
    with its record number, or skipped and listed."""
    out = RecordSet(recs.source, [], [], list(recs.skipped))
    for r, where in zip(recs.records, recs.where):
        try:
            out.records.append(convert(r))
            out.where.append(where)
        except ValueError as e:
            if not skip_bad:
                raise SftscopeError(f"{where}: {e}; skip bad records to leave such rows "
                                    f"out") from e
            out.skipped.append(f"{where}: {e}")
    return out


def _need_file(source: str, spec: DatasetSpec) -> None:
    """A local-only format named without its file."""
    if spec.hub is None:
        sets = ", ".join(f"{source}:{n}" for n in SETS.get(source, {}))
        raise SftscopeError(f"data {source!r} is a local-only format: give its file as "
                            f"{source}:FILE (fields {', '.join(spec.fields)})"
                            + (f" or a registered hub set ({sets})" if sets else ""))


def read_records(source: str, split: str | None = None) -> list[dict]:
    """Raw records of a source (hub or local), without formatting."""
    return load_records(source, split).records


# ------------------------------------------------------------------ templates

_CONVERSIONS = (None, "r", "s", "a")


def check_template(template: str) -> list[str]:
    """The record fields a ``--template`` names; refuses what ``str.format(**record)`` cannot
    do right: positional fields (``{}``, ``{0}``), unbalanced braces, bad conversions, format
    specs that apply to no value, nested fields in specs, or no field at all."""
    head = f"--template {template!r}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise SftscopeError(f"{head}: {e}; write a literal brace as {{{{ or }}}}") from e
    names: list[str] = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base == "" or base.isdigit():
            raise SftscopeError(f"{head}: positional field {{{name}}}; name a record field, "
                                f"e.g. {{question}}")
        if conv not in _CONVERSIONS:
            raise SftscopeError(f"{head}: conversion !{conv} of {{{name}}}; use !r, !s or !a")
        if spec and ("{" in spec or "}" in spec):
            raise SftscopeError(f"{head}: the format spec of {{{name}}} names another field; "
                                f"nested fields are not supported")
        if spec and not _spec_applies(spec):
            raise SftscopeError(f"{head}: format spec :{spec} of {{{name}}} applies to no "
                                f"value (text or number)")
        if base not in names:
            names.append(base)
    if not names:
        raise SftscopeError(f"{head} names no field, so every text would be the same; use "
                            f"{{field}} for a record field")
    return names


def _spec_applies(spec: str) -> bool:
    for v in ("text", 0, 0.5):
        try:
            format(v, spec)
            return True
        except (ValueError, TypeError):
            continue
    return False


def _template_fn(template: str) -> Formatter:
    names = check_template(template)

    def fmt(r: dict) -> Sample:
        for n in names:
            if n not in r:
                raise BadRecord(f"lacks field {n!r} that --template names "
                                f"(it has: {', '.join(map(str, r))})")
            v = r[n]
            if v is None or (isinstance(v, float) and v != v):
                raise BadRecord(f"field {n!r} is {'null' if v is None else 'NaN (an empty cell)'}")
        try:
            text = template.format(**r)
        except (KeyError, IndexError, AttributeError, ValueError, TypeError) as e:
            raise BadRecord(f"--template cannot format it ({quoted(e)})") from e
        if not text.strip():
            raise BadRecord("--template gives an empty text")
        return Sample(text)
    return fmt


# ------------------------------------------------------------------ samples

def _formatter(source: str, spec: DatasetSpec | None, text_field: str | None,
               template: str | None, first: dict | None) -> tuple[Formatter, bool]:
    """The record formatter for a source, and whether blank texts are dropped (not refused)."""
    if template:
        return _template_fn(template), False
    if text_field:
        return _text(text_field), bool(spec and spec.blank_ok and text_field in spec.fields)
    if spec is not None:
        return spec.format, spec.blank_ok
    if first is not None and "text" not in first:
        raise SftscopeError(f"data {source}: say which field holds the text with --text-field "
                            f"(fields: {', '.join(map(str, first))}) or give --template")
    return _text("text"), False


def read_samples(source: str, *, text_field: str | None = None, template: str | None = None,
                 n: int | None = None, seed: int = 0, split: str | None = None,
                 shuffle: bool = True, skip_bad: bool = False
                 ) -> tuple[list[Sample], list[str]]:
    """Read, format, validate and (seeded) subsample a source: samples and notes.

    Every record is checked (not only the sampled ones). A bad record stops the run with its
    location, or with ``skip_bad`` is left out and counted in the notes.
    """
    spec, path = parse_source(source)
    if n is not None and n < 1:
        raise SftscopeError(f"the number of samples must be at least 1, got {n}")
    recs = load_records(source, split, skip_bad=skip_bad)
    if not recs.records and not recs.skipped:
        raise SftscopeError(f"data {source} is empty; give a file with at least one record")
    fmt, blank_ok = _formatter(source, spec, text_field, template,
                               recs.records[0] if recs.records else None)
    samples: list[Sample] = []
    skipped = list(recs.skipped)
    n_blank = 0
    for i, (r, where) in enumerate(zip(recs.records, recs.where)):
        try:
            s = fmt(r)
        except BadRecord as e:
            if blank_ok and _is_blank_text(r, text_field or "text"):
                n_blank += 1
                continue
            if not skip_bad:
                raise SftscopeError(f"{where}: {e}; fix the record or skip bad records") from e
            skipped.append(f"{where}: {e}")
            continue
        s.meta.setdefault("index", i)
        samples.append(s)
    notes = []
    total = len(recs.records) + len(recs.skipped)
    if skipped:
        notes.append(f"{len(skipped)} of {total} records were skipped as bad "
                     f"(first: {skipped[0]})")
    if n_blank:
        notes.append(f"{n_blank} blank texts of {source} were left out")
    if not samples:
        raise SftscopeError(f"data {source} has no usable record"
                            + (f" ({len(skipped)} bad)" if skipped else ""))
    if shuffle:
        random.Random(seed).shuffle(samples)
    return (samples[:n] if n else samples), notes


def _is_blank_text(r: dict, key: str) -> bool:
    v = r.get(key)
    return isinstance(v, str) and not v.strip()


def load_samples(source: str, *, text_field: str | None = None, template: str | None = None,
                 n: int | None = None, seed: int = 0, split: str | None = None,
                 shuffle: bool = True, skip_bad: bool = False) -> list[Sample]:
    """The samples of :func:`read_samples` (its notes dropped)."""
    return read_samples(source, text_field=text_field, template=template, n=n, seed=seed,
                        split=split, shuffle=shuffle, skip_bad=skip_bad)[0]


# ------------------------------------------------------------------ cheap checks

def check_source(data: str, *, split: str | None = None, text_field: str | None = None,
                 template: str | None = None, need: Sequence[str] = ()) -> None:
    """Check a data source before any model is loaded: a local file exists, is readable and
    of a known format, and its first record has the fields the format needs (``need``, the
    registered format's, the template's, ``text_field``, or ``text``). Hub sources are only
    checked for a valid template (reaching the hub is not cheap)."""
    fields_needed = list(need)
    if template:
        fields_needed += check_template(template)
    spec, path = parse_source(data)
    if path is None:
        if spec is not None:
            _need_file(data, spec)
        return
    suffix = _check_file(path)
    if text_field:
        fields_needed.append(text_field)
    elif not template and spec is not None:
        fields_needed += list(spec.fields)
    elif not template and not need:
        fields_needed.append("text")
    have = _first_fields(path, suffix, split)
    if have is None:
        raise SftscopeError(f"data {data} is empty; give a file with at least one record")
    missing = [f for f in dict.fromkeys(fields_needed) if f not in have]
    if missing:
        hint = (" (say which field holds the text with --text-field or give --template)"
                if missing == ["text"] and not need else "")
        raise SftscopeError(f"data {data} lacks field(s) {', '.join(missing)}{hint} "
                            f"(fields: {', '.join(have)})")


def _first_fields(path: Path, suffix: str, split: str | None) -> list[str] | None:
    """Field names of a file's first record (None: no record)."""
    try:
        if suffix in TEXT_SUFFIXES:
            with open(path, encoding="utf-8") as f:
                return ["text"] if any(ln.strip() for ln in f) else None
        if suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise SftscopeError(f"{path}, line {i}: not valid JSON "
                                                f"({e.msg})") from e
                        if not isinstance(obj, dict):
                            raise SftscopeError(f"{path}, line {i}: is not a JSON object")
                        return [str(k) for k in obj]
            return None
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                header = next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), None)
            return header or None
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        recs = _read_local(path, split, True).records  # .json: the whole file
        return [str(k) for k in recs[0]] if recs else None
    except SftscopeError:
        raise
    except Exception as e:
        raise SftscopeError(f"{path} could not be read ({quoted(e)})") from e


# ------------------------------------------------------------------ chat and tokens

def chat_prompt(tokenizer, user: str) -> str:
    """``user`` as the one user turn of the tokenizer's chat template, ready for the reply
    (the one chat prompt of training, evaluation and analysis)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SftscopeError("--chat-template is on but the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


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
    prompt = chat_prompt(tokenizer, sample.prompt if sample.prompt is not None else sample.text)
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
class Prepared:
    """What :func:`prepare` made: the samples, their tokens, and notes for the user."""

    samples: list[Sample]
    tokens: TokenizedSet
    notes: list[str]

    def __iter__(self) -> Iterator[Any]:  # samples, tokens, notes = prepare(...)
        return iter((self.samples, self.tokens, self.notes))


def prepare(source: str, tokenizer, *, text_field: str | None = None,
            template: str | None = None, split: str | None = None, n: int | None = None,
            seed: int = 0, max_length: int = 512, chat_template: bool = False,
            skip_bad: bool = False) -> Prepared:
    """The one data path of analyze, probe, swap and suggest: read the records, format and
    validate them, draw ``n`` with ``seed``, tokenize up to ``max_length`` (through the chat
    template when asked); the notes say what was skipped, short or truncated."""
    if max_length < 1:
        raise SftscopeError(f"--max-length must be at least 1, got {max_length}")
    samples, notes = read_samples(source, text_field=text_field, template=template, n=n,
                                  seed=seed, split=split, skip_bad=skip_bad)
    tok = tokenize(samples, tokenizer, max_length, chat_template=chat_template)
    if n is not None and len(samples) < n:
        notes.append(f"data has {len(samples)} samples, fewer than the {n} asked for")
    if tok.n_truncated:
        notes.append(f"{tok.n_truncated} of {len(tok)} texts were longer than --max-length "
                     f"{max_length} tokens and were truncated")
    return Prepared(samples, tok, notes)


# ------------------------------------------------------------------ batches (torch, lazily)

@dataclass
class Batch:
    """A padded batch: ``index`` holds the positions of its samples in the tokenized set."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    index: list[int]


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right"
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists into ``(input_ids, attention_mask)``."""
    import torch

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
