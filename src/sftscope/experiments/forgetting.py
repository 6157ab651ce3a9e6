"""Does a fine-tune's output KL on a retention set predict how much it forgot?

RL's Razor (Shenfeld et al. 2025, arXiv 2509.04259) reports that the KL between the fine-tuned
and the base model's outputs on held-out data, not the size of the weight change, predicts
forgetting. A sweep with ``--retention SOURCE`` measures, for every job (mask x seed), on the
retention texts: ``kl`` = mean over real next-token positions of KL(P_tuned || P_base) at the
output, and ``drop`` = the tuned model's next-token loss minus the base's (nats per token; the
log of the perplexity ratio), then reports across masks the Spearman correlation of the two
with a bootstrap interval over masks (``forgetting.csv``; the report prints it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sftscope.experiments.distributions import output_divergence
from sftscope.load import data as D
from sftscope.load.models import LoadOptions, load_model, load_tokenizer
from sftscope.load.runtime import model_bytes, release
from sftscope.load.runtime import pad_id as pad_id_of
from sftscope.metrics.stats import spearman_ci

FORGETTING_COLUMNS = ["mask", "seeds", "kl", "drop", "loss_base", "loss_tuned", "n_tokens"]


def retention_scores(base: str, tuned: str, *, adapter: bool, source: str, limit: int,
                     max_length: int, batch_size: int, seed: int = 0,
                     revision: str | None = None) -> dict[str, Any]:
    """KL(P_tuned || P_base) and the loss drop of one job on the retention texts. ``tuned``:
    the job's adapter (applied to ``base``) or its fine-tuned model folder."""
    tok = load_tokenizer(base, revision=revision)
    prep = D.prepare(source, tok, n=limit, seed=seed, max_length=max_length)
    models = {}
    try:
        models["base"] = load_model(base, LoadOptions(revision=revision))
        models["tuned"] = load_model(tuned, LoadOptions(base=base if adapter else None,
                                                        base_revision=revision))
        got = output_divergence(models["base"], models["tuned"], prep.tokens, pad_id_of(tok),
                                batch_size=batch_size, description="retention")
    finally:
        nbytes = sum(model_bytes(m) for m in models.values())
        models.clear()
        release(nbytes)
    return {"kl": got["kl"], "loss_base": got["loss_a"], "loss_tuned": got["loss_b"],
            "drop": got["loss_b"] - got["loss_a"], "n_tokens": got["n_tokens"],
            "n_samples": len(prep.tokens)}


def job_retention(jobs_dir: Path) -> pd.DataFrame:
    """The retention scores every finished job recorded (``result.json``'s ``info``)."""
    rows = []
    for d in sorted(p for p in jobs_dir.iterdir() if p.is_dir()) if jobs_dir.is_dir() else ():
        f = d / "result.json"
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        ret = (res.get("info") or {}).get("retention")
        if ret:
            rows.append({"mask": str(res["mask"]), "seed": int(res["seed"]), **ret})
    return pd.DataFrame(rows)


def forgetting_table(jobs: pd.DataFrame, level: float = 0.95, n_boot: int = 2000,
                     seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per mask the mean over seeds of the retention KL and loss drop, and across masks their
    Spearman correlation with a bootstrap interval over masks."""
    if jobs.empty:
        return pd.DataFrame(columns=FORGETTING_COLUMNS), {}
    g = jobs.groupby("mask", sort=True)
    table = pd.DataFrame({
        "mask": list(g.groups), "seeds": [";".join(map(str, sorted(x))) for x in g["seed"]
                                          .apply(list)],
        "kl": g["kl"].mean().to_numpy(), "drop": g["drop"].mean().to_numpy(),
        "loss_base": g["loss_base"].mean().to_numpy(),
        "loss_tuned": g["loss_tuned"].mean().to_numpy(),
        "n_tokens": g["n_tokens"].first().to_numpy()}, columns=FORGETTING_COLUMNS)
    rho, lo, hi = spearman_ci(table["kl"], table["drop"], n_boot=n_boot, level=level, seed=seed)
    return table, {"spearman_kl_drop": rho, "ci_low": lo, "ci_high": hi,
                   "n_masks": len(table), "level": level,
                   "definition": "per mask (mean over seeds): kl = KL(P_tuned || P_base) at the "
                                 "output on the retention texts, drop = tuned minus base "
                                 "next-token loss there; Spearman over masks, bootstrap over "
                                 "masks"}


def correlation_line(corr: dict[str, Any]) -> str:
    """The sentence a sweep prints about it."""
    if not corr or not np.isfinite(corr.get("spearman_kl_drop", np.nan)):
        return ("forgetting: fewer than 3 masks with distinct retention KL and loss drop; no "
                "correlation")
    return (f"forgetting: across {corr['n_masks']} masks, the retention KL and the loss drop "
            f"have Spearman rho {corr['spearman_kl_drop']:.2f} "
            f"[{corr['ci_low']:.2f}, {corr['ci_high']:.2f}]")
