"""What model-running commands share about their models: which models (specs, revisions, the
base an adapter applies to), how each loads, and their content identity for run.json (probe,
swap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftscope.load.identity import fingerprint
from sftscope.load.models import LoadOptions


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
