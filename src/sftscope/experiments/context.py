"""The run context every model-running command shares: which models (specs, revisions, the base
an adapter applies to), how each loads, the tokenizer, the prepared data, the notes, the pad id
and the run folder. A command's ``plan`` builds one; its ``run`` and ``record`` read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftscope.load import data as D
from sftscope.load.identity import fingerprint
from sftscope.load.models import LoadOptions
from sftscope.load.runtime import pad_id as pad_id_of
from sftscope.progress import say
from sftscope.runs import start_run


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


@dataclass
class RunContext:
    """What a command's run needs after its plan: models and their load options, the
    tokenizer, the data (samples, token ids), the notes, the pad id and the run folder."""

    models: Models
    tokenizer: Any
    samples: list[D.Sample]
    tok: D.TokenizedSet
    notes: list[str] = field(default_factory=list)
    opts: dict[str, LoadOptions] = field(default_factory=dict)
    out: Path | None = None

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    def start(self, cfg: Any, command: str, outputs: tuple[str, ...], *, device: str,
              main: bool = True) -> None:
        """After validation: print the notes, fix the load options, open the run folder
        (rank 0)."""
        for note in self.notes:
            say(f"[yellow]note:[/] {note}")
        self.opts = self.models.load_options(cfg, device=device)
        if cfg.out is not None:
            self.out = Path(cfg.out)
            if main:
                start_run(cfg.out, command, outputs)
