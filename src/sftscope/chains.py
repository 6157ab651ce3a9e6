"""Checkpoint chains: several fine-tuning stages of one family analysed in one run.

A chain is the base plus an ordered list of SFT-side stages (base, SFT, DPO, RLVR, Instruct):
``--sft`` is the first stage and ``--stages`` names the further ones, each ``LABEL=PATH`` or a
bare path (label: the folder or file name, the last part of a hub id, or an adapter's run
label). Every stage is compared with the base; with ``--consecutive`` also with the stage
before it (sft -> dpo -> rlvr).

Labels in tables (the ``model`` column), chosen so that the first stage reads as a plain pair:

* single-model rows: ``base``, ``sft`` (the first stage), then each further stage's label;
* pair rows: ``pair`` (base vs the first stage), ``pair:base-LABEL`` (base vs a further stage)
  and ``pair:PREV-LABEL`` (a stage vs the one before it, with ``--consecutive``).

``run.json`` records the chain (``chain``: label, source and kind of each stage) and its pairs
(``pairs``: model label, the two stages). Torch-free: the config checks use it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftscope.errors import SftscopeError
from sftscope.load.sources import adapter_folder, adapter_label, expand, source_kind

BASE = "base"
FIRST = "sft"
PAIR = "pair"
PAIR_PREFIX = "pair:"
RESERVED = (BASE, FIRST, PAIR)
_BAD_CHARS = (",", "=", ":", "\n", "\t")


@dataclass(frozen=True)
class Stage:
    """One SFT-side checkpoint of a chain: its table label and its model reference."""

    label: str
    spec: str
    revision: str | None = None


@dataclass(frozen=True)
class ChainPair:
    """Two members of a chain compared with each other: ``a`` -> ``b``, written as ``model``."""

    model: str
    a: str
    b: str

    @property
    def first(self) -> bool:
        """The base-vs-first-stage pair (``pair``): the one the paper's checks read."""
        return self.model == PAIR


def pair_label(a: str, b: str) -> str:
    """The ``model`` column of pair rows: ``pair`` for base vs the first stage, else
    ``pair:A-B``."""
    return PAIR if (a, b) == (BASE, FIRST) else f"{PAIR_PREFIX}{a}-{b}"


def is_pair_label(model: object) -> bool:
    """Whether a ``model`` value names a pair (``pair`` or ``pair:A-B``)."""
    m = str(model)
    return m == PAIR or m.startswith(PAIR_PREFIX)


def default_label(spec: str, base: str | None = None) -> str:
    """A stage's label when none is given: an adapter's run label (``adapter m00100 r64 s0``),
    else the folder or file name (a GGUF file without its suffix), else the hub id's last
    part."""
    kind = source_kind(spec)
    if kind == "adapter":
        try:
            return adapter_label(adapter_folder(spec))
        except SftscopeError:
            pass
    path = Path(expand(spec))
    if os.path.exists(path):
        name = path.resolve().name
        return path.stem if path.is_file() and name.lower().endswith(".gguf") else name
    return str(spec).rstrip("/").split("/")[-1]


def check_label(label: str, where: str = "--stages") -> str:
    """A usable stage label (text), or a one-line error saying what to change."""
    label = label.strip()
    if not label:
        raise SftscopeError(f"{where}: a stage has an empty label; write LABEL=PATH")
    if label in RESERVED or label.startswith(PAIR_PREFIX):
        raise SftscopeError(f"{where}: the label {label!r} is reserved (base, sft and pair name "
                            f"the base, the first stage (--sft) and the pairs); choose another "
                            f"with LABEL=PATH")
    bad = [c for c in _BAD_CHARS if c in label]
    if bad:
        raise SftscopeError(f"{where}: the label {label!r} contains {bad[0]!r}; use letters, "
                            f"digits, spaces, '-', '_' or '.'")
    return label


def split_item(item: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` -> (label, path); a bare path -> (None, path). A path that itself holds
    ``=`` (and exists) is taken whole."""
    item = item.strip()
    label, sep, rest = item.partition("=")
    if not sep or os.path.exists(expand(item)):
        return None, item
    return label.strip(), rest.strip()


def parse_stages(items: Iterable[str], base: str | None = None,
                 where: str = "--stages") -> list[Stage]:
    """The further stages (after ``--sft``) from ``LABEL=PATH`` / ``PATH`` items, labels
    checked: unique, not base/sft/pair, no ``, = :`` (torch-free; paths are checked by the
    config). ``base``: what an adapter stage applies to (for its default label)."""
    stages: list[Stage] = []
    for item in items:
        if not str(item).strip():
            continue
        label, spec = split_item(str(item))
        if not spec:
            raise SftscopeError(f"{where}: {item!r} names no checkpoint; write LABEL=PATH or "
                                f"PATH")
        given = label is not None
        if not given:  # a folder name may hold what a label may not
            label = default_label(spec, base)
            for c in _BAD_CHARS:
                label = label.replace(c, "_")
        label = check_label(label, where)
        if any(s.label == label for s in stages):
            how = "" if given else " (the default label is the folder name)"
            raise SftscopeError(f"{where}: two stages are labelled {label!r}{how}; give each a "
                                f"label of its own with LABEL=PATH")
        stages.append(Stage(label, spec))
    return stages


def chain_pairs(labels: Sequence[str], consecutive: bool = False) -> list[ChainPair]:
    """The pairs of a chain whose SFT-side stages are ``labels`` (the first is ``sft``): each
    stage against the base, in order; with ``consecutive`` each stage against the previous
    one as well (after the base pairs)."""
    pairs = [ChainPair(pair_label(BASE, s), BASE, s) for s in labels]
    if consecutive:
        pairs += [ChainPair(pair_label(a, b), a, b) for a, b in zip(labels, labels[1:])]
    return pairs


def chain_record(stages: Sequence[Stage], pairs: Sequence[ChainPair],
                 kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """What run.json keeps about a chain: ``chain`` (each SFT-side stage in order: label,
    source, kind) and ``pairs`` (model label and the two stages of each compared pair)."""
    kinds = kinds or {}
    return {"chain": [{"label": s.label, "source": s.spec, "revision": s.revision,
                       **({"kind": kinds[s.label]} if s.label in kinds else {})}
                      for s in stages],
            "pairs": [{"model": p.model, "a": p.a, "b": p.b} for p in pairs]}


def model_order(labels: Sequence[str], pairs: Sequence[ChainPair]) -> dict[str, int]:
    """Rank of each ``model`` value in a chain's tables: the base, the stages in order, then
    the pairs in ``pairs``' order (tables list a chain in training order, not alphabetically)."""
    names = [BASE, *labels, *(p.model for p in pairs)]
    return {m: i for i, m in enumerate(dict.fromkeys(names))}


def split_pair_label(model: str, known: Iterable[str] = ()) -> tuple[str, str] | None:
    """``pair`` -> (base, sft); ``pair:A-B`` -> (A, B), where labels may hold ``-``: the split
    whose two sides are known stage labels (``known``; base and sft always are), else the
    first split after ``base-``, else the first ``-``. None for a single-model label."""
    m = str(model)
    if m == PAIR:
        return BASE, FIRST
    if not m.startswith(PAIR_PREFIX):
        return None
    body = m[len(PAIR_PREFIX):]
    names = {BASE, FIRST, *known}
    cuts = [i for i, c in enumerate(body) if c == "-"]
    for i in cuts:
        if body[:i] in names and body[i + 1:] in names:
            return body[:i], body[i + 1:]
    if body.startswith(BASE + "-"):
        return BASE, body[len(BASE) + 1:]
    if cuts:
        return body[:cuts[0]], body[cuts[0] + 1:]
    return body, ""


__all__ = ["BASE", "FIRST", "PAIR", "PAIR_PREFIX", "ChainPair", "Stage", "chain_pairs",
           "chain_record", "check_label", "default_label", "is_pair_label", "model_order",
           "pair_label",
           "parse_stages", "split_item", "split_pair_label"]
