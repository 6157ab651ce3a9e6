"""What model-running commands share about a run: which models (specs, revisions, the base an
adapter applies to), how each loads and their content identity for run.json (:class:`Models`);
and the run's set-up around them (:class:`RunContext`): the tokenizer and its pad id, the
prepared data, the notes gathered on the way, and the run folder started and finished.

A command reads as plan -> run -> record: its plan fills a ``RunContext`` (validation,
tokenizer, data, notes), its run loads the models with ``load_options`` and feeds them
``tokens`` with ``pad_id``, and its record finishes the folder with the notes and
``fingerprints``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sftscope.io import Timer
from sftscope.load.data import TokenizedSet
from sftscope.load.identity import fingerprint
from sftscope.load.models import LoadOptions, check_vocab, load_model
from sftscope.load.runtime import model_bytes, pad_id, release, resolve_device
from sftscope.parallel import join
from sftscope.progress import say
from sftscope.runs import check_out, finish_run, start_run


@dataclass(frozen=True)
class Models:
    """The models of a run by label: source, revision, and the base an adapter applies to."""

    specs: dict[str, str]
    revs: dict[str, str | None]
    bases: dict[str, str | None]

    @classmethod
    def pair(cls, base: str, sft: str, base_revision: str | None,
             sft_revision: str | None) -> Models:
        """``base`` and ``sft`` (an adapter as SFT applies to ``base``)."""
        return cls({"base": base, "sft": sft}, {"base": base_revision, "sft": sft_revision},
                   {"base": None, "sft": base})

    @classmethod
    def single(cls, spec: str, revision: str | None, label: str = "model") -> Models:
        """One model under ``label``."""
        return cls({label: spec}, {label: revision}, {label: None})

    def load_options(self, cfg: Any, *, device: str) -> dict[str, LoadOptions]:
        """How each model loads (``cfg``: dtype, device map, base revision and
        ``allow_other_base``; ``device``: the resolved device)."""
        return {k: LoadOptions(revision=self.revs[k], dtype=cfg.dtype, device=device,
                               device_map=cfg.device_map, base=self.bases[k],
                               base_revision=cfg.base_revision,
                               allow_other_base=cfg.allow_other_base)
                for k in self.specs}

    def fingerprints(self, base_revision: str | None) -> dict[str, dict]:
        """Each model's content identity, for run.json."""
        return {k: fingerprint(v, self.revs[k], base=self.bases[k], base_revision=base_revision)
                for k, v in self.specs.items()}

    @contextlib.contextmanager
    def loaded(self, opts: dict[str, LoadOptions], tokens: TokenizedSet,
               timer: Timer) -> Iterator[dict[str, nn.Module]]:
        """Every model loaded with its options (timed as ``load``), its vocabulary checked
        against ``tokens``; all released on leaving, after an error too."""
        models: dict[str, nn.Module] = {}
        nbytes = 0
        try:
            with timer("load"):
                for k, spec in self.specs.items():
                    models[k] = load_model(spec, opts[k])
                    nbytes += model_bytes(models[k])
                    check_vocab(models[k], tokens.input_ids, k)
            yield models
        finally:
            models.clear()
            release(nbytes)


@dataclass
class RunContext:
    """One run's set-up for a pair or a model: the models, the tokenizer the data is tokenized
    with, the tokenized data, the notes (validation, tokenizer, data: said once, recorded in
    run.json) and the run folder (``out``; None when the command writes none)."""

    command: str
    out: Path | None
    models: Models
    tokenizer: Any = None
    tokens: TokenizedSet | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        """The id batches are padded with (the tokenizer's pad, else its end of sequence)."""
        return pad_id(self.tokenizer)

    def say_notes(self) -> None:
        """Say every note gathered so far (once, after validation)."""
        for note in self.notes:
            say(f"[yellow]note:[/] {note}")

    def note(self, text: str) -> None:
        """A note found while running: recorded, and said at once."""
        self.notes.append(text)
        say(f"[yellow]note:[/] {text}")

    def start(self, outputs: tuple[str, ...] | list[str], *, main: bool = True) -> None:
        """Start the run folder (clear this command's previous outputs, mark it running);
        nothing without a folder or off the main process."""
        if self.out is not None and main:
            start_run(self.out, self.command, outputs)

    def finish(self, record: dict[str, Any]) -> None:
        """Write run.json last and mark the folder finished."""
        if self.out is not None:
            finish_run(self.out, record)

    def load_options(self, cfg: Any, *, device: str) -> dict[str, LoadOptions]:
        return self.models.load_options(cfg, device=device)

    def fingerprints(self, base_revision: str | None) -> dict[str, dict]:
        return self.models.fingerprints(base_revision)


@contextlib.contextmanager
def validating(par: Any, cfg: Any, command: str, timer: Timer) -> Iterator[str]:
    """Every rank validates alike (all pass or all fail, ``par.together``): the run folder is
    checked first, then the body plans under the ``validate`` timer. Yields the device."""
    with par.together("validation"):
        if cfg.out is not None:
            check_out(cfg.out, command, cfg, overwrite=cfg.overwrite)
        device = par.device or resolve_device(cfg.device)
        with timer("validate"):
            yield device


def open_sharded(cfg: Any, command: str, plan_fn: Callable[[Any], Any]
                 ) -> tuple[Any, Any, Timer, str]:
    """The opening of a command whose samples are shared among processes (swap, ablate):
    validate and plan on every rank alike, say the notes, open the run folder. Returns the
    plan (with its ``ctx``), the process group, the timer and the device."""
    par = join(cfg.device, cfg.device_map)
    timer = Timer()
    with validating(par, cfg, command, timer) as device:
        p = plan_fn(cfg)
    p.ctx.say_notes()
    p.ctx.start(type(cfg).OUTPUTS, main=par.main)
    return p, par, timer, device
