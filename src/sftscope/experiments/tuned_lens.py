"""The tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the
Tuned Lens", arXiv 2303.08112): a learned affine translator per hidden state before the logit
lens, because the logit lens misreads early layers whose basis differs from the last one's.

For each hidden state ``j < L`` a translator ``T_j(h) = h + W_j h + b_j``, initialised at the
identity (``W_j = 0``, ``b_j = 0``), is trained with the model frozen to minimise
``KL(P_L || softmax(head(final_norm(T_j(h_j)))))`` over the real token positions of a training
split, ``P_L`` the model's own output distribution (the paper's distillation loss; Adam here,
where the paper uses SGD with Nesterov momentum). ``j = L`` needs no translator. Translators
are saved as safetensors named by a key of the model's content fingerprint and every training
option, so a probe reuses them only for the model and the settings they were trained with.

Implemented here (the ``tuned-lens`` package pins transformers 4); cite the paper above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sftscope.capture.engine import batches
from sftscope.capture.lens import Lens
from sftscope.errors import SftscopeError
from sftscope.experiments.distributions import kl_rows, scored_positions, states_at
from sftscope.io import atomic_path, stable_hash
from sftscope.load import data as D
from sftscope.load.arch import get_blocks
from sftscope.metrics.stats import cluster_ratio_ci
from sftscope.progress import track

TUNED_SUFFIX = " (tuned lens)"


class Translators(nn.Module):
    """One affine map per hidden state ``j = 0..L-1``: ``h + h W_j^T + b_j`` (identity at init);
    float32, applied in float32."""

    def __init__(self, n_states: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_states, width, width))
        self.bias = nn.Parameter(torch.zeros(n_states, width))

    @property
    def n_states(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, j: int, h: torch.Tensor) -> torch.Tensor:
        """``T_j(h)`` for ``j < n_states``; the state itself at the top (``j = L``)."""
        if j >= self.n_states:
            return h
        x = h.float().to(self.weight.device)
        return x + x @ self.weight[j].T + self.bias[j]


def translator_key(fingerprint: dict[str, Any], options: dict[str, Any]) -> str:
    """What a set of translators is valid for: the model's content and the training options."""
    return stable_hash({"model": fingerprint.get("hash") or fingerprint, **options})


def _train_rows(model: nn.Module, tok: D.TokenizedSet, pad_id: int, batch_size: int,
                max_rows: int, gen: torch.Generator):
    """Endless batches of the training split: every state's rows at (at most ``max_rows``)
    random real positions, and the model's output log-probabilities there."""
    lens = Lens(model)
    while True:
        order = torch.randperm(len(tok), generator=gen).tolist()
        for batch in batches(tok, batch_size, pad_id, order):
            rb, rt = batch.mask.nonzero(as_tuple=True)
            if len(rb) > max_rows:
                keep = torch.randperm(len(rb), generator=gen)[:max_rows].sort().values
                rb, rt = rb[keep], rt[keep]
            with torch.no_grad():
                states = states_at(model, batch.input_ids, batch.attention_mask, rb, rt,
                                    "tuned lens training")
                final = torch.log_softmax(lens(states[-1]), dim=-1)
            yield states, final


def train_translators(model: nn.Module, tok: D.TokenizedSet, pad_id: int, *, steps: int = 100,
                      lr: float = 1e-3, batch_size: int = 8, max_rows: int = 512,
                      seed: int = 0) -> tuple[Translators, list[float]]:
    """Train one translator per hidden state ``j < L`` (model frozen); returns them and the
    mean KL over the states at each step (nats)."""
    if not len(tok):
        raise SftscopeError("the tuned lens has no training texts; give --lens-train")
    n_blocks = len(get_blocks(model))
    lens = Lens(model)
    width = int(model.get_input_embeddings().weight.shape[1])
    torch.manual_seed(seed)
    tr = Translators(n_blocks, width).to(lens.device)
    opt = torch.optim.Adam(tr.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    history: list[float] = []
    rows = _train_rows(model, tok, pad_id, batch_size, max_rows,
                       torch.Generator().manual_seed(seed))
    try:
        for _ in track(range(steps), "tuned lens", total=steps):
            states, final = next(rows)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for j in range(n_blocks):
                logq = torch.log_softmax(lens(tr(j, states[j])), dim=-1)
                loss = kl_rows(final, logq.to(final.device)).mean() / n_blocks
                loss.backward()
                total += float(loss.detach())
            opt.step()
            history.append(total)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return tr.requires_grad_(False), history


def save_translators(tr: Translators, path: Path, meta: dict[str, Any]) -> None:
    """Write the translators (safetensors, atomically) with what they were trained on."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"weight": tr.weight.detach().contiguous().cpu(),
                   "bias": tr.bias.detach().contiguous().cpu()}, str(tmp),
                  metadata={"sftscope": json.dumps(meta, sort_keys=True, default=str)})


def load_translators(path: Path, n_states: int, width: int) -> Translators:
    """Read translators saved by :func:`save_translators` for a model of this shape."""
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise SftscopeError(f"translators {path} could not be read ({type(e).__name__}); "
                            f"remove the file to train them again") from e
    if tuple(t.get("weight", torch.zeros(0)).shape) != (n_states, width, width):
        raise SftscopeError(f"translators {path} do not fit this model ({n_states} states of "
                            f"width {width}); remove the file to train them again")
    tr = Translators(n_states, width)
    with torch.no_grad():
        tr.weight.copy_(t["weight"])
        tr.bias.copy_(t["bias"])
    return tr.requires_grad_(False)


def translators_for(model: nn.Module, folder: str | Path | None, label: str,
                    key: str, train: Any) -> tuple[Translators, dict[str, Any]]:
    """Translators of ``key`` from ``folder`` when saved there, else ``train()`` (and saved
    there when a folder is given); with what was done."""
    n_states = len(get_blocks(model))
    width = int(model.get_input_embeddings().weight.shape[1])
    path = Path(folder).expanduser() / f"{label}-{key}.safetensors" if folder else None
    if path is not None and path.is_file():
        tr = load_translators(path, n_states, width)
        return tr.to(Lens(model).device), {"translators": str(path), "trained": False}
    tr, history = train()
    info: dict[str, Any] = {"trained": True, "loss_first": history[0] if history else math.nan,
                            "loss_last": history[-1] if history else math.nan,
                            "steps": len(history)}
    if path is not None:
        save_translators(tr, path, {"key": key, "label": label, **info})
        info["translators"] = str(path)
    return tr, info


def kl_to_final_sums(model: nn.Module, tr: Translators, tok: D.TokenizedSet, pad_id: int, *,
                     batch_size: int, positions: Sequence[Sequence[int]] | None,
                     chunk_elements: int, indices: Sequence[int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample and state: summed KL(P_L || P_j) of the logit lens and of the tuned lens over
    the scored positions, and the number of positions."""
    lens = Lens(model)
    n_states = len(get_blocks(model)) + 1
    logit, tuned = np.zeros((len(tok), n_states)), np.zeros((len(tok), n_states))
    counts = np.zeros(len(tok))
    step = max(1, chunk_elements // max(lens.vocab, 1))
    order = list(range(len(tok))) if indices is None else list(indices)
    total = (len(order) + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in track(batches(tok, batch_size, pad_id, order), "tuned lens KL",
                           total=total):
            rb, rt = scored_positions(batch.mask, batch.index, positions)
            if not rb.numel():
                continue
            states = states_at(model, batch.input_ids, batch.attention_mask, rb, rt, "model")
            idx = np.asarray(batch.index)[rb.numpy()]
            np.add.at(counts, idx, 1)
            for s in range(0, len(rb), step):
                final = torch.log_softmax(lens(states[-1][s:s + step]), dim=-1)
                for j in range(n_states):
                    h = states[j][s:s + step]
                    for arr, x in ((logit, h), (tuned, tr(j, h))):
                        kl = kl_rows(final, torch.log_softmax(lens(x), dim=-1).to(final.device))
                        np.add.at(arr[:, j], idx[s:s + step], kl.double().cpu().numpy())
    return logit, tuned, counts


def training_split(cfg: Any, tokenizer: Any, probe_samples: Sequence[D.Sample]
                   ) -> tuple[D.TokenizedSet, list[str]]:
    """The tuned lens's training texts: ``--lens-train`` (default ``--data``) without any text
    the probe scores, a seeded subsample of ``--lens-train-limit``; with notes."""
    source = cfg.lens_train or cfg.data
    samples, notes = D.read_samples(source, text_field=cfg.text_field, template=cfg.template,
                                    split=cfg.split, skip_bad=cfg.skip_bad_records,
                                    shuffle=False)
    scored = {s.text for s in probe_samples}
    left = [s for s in samples if s.text not in scored]
    if not left:
        raise SftscopeError(f"the tuned lens needs training texts the probe does not score, "
                            f"but every text of {source} is among them; give --lens-train or "
                            f"a smaller --limit")
    rng = np.random.default_rng(cfg.seed + 1)
    pick = sorted(rng.permutation(len(left))[:cfg.lens_train_limit].tolist())
    tok = D.tokenize([left[i] for i in pick], tokenizer, cfg.max_length,
                     chat_template=cfg.chat_template)
    notes = [f"tuned lens: trained on {len(tok)} texts of {source} that the probe does not "
             f"score"] + [f"tuned lens data: {n}" for n in notes]
    return tok, notes


def kl_table(kl: tuple[np.ndarray, np.ndarray, np.ndarray], label: str, *, level: float,
             n_boot: int, seed: int) -> pd.DataFrame:
    """``kl_to_final`` rows of the logit lens (``label``) and the tuned lens (``label (tuned
    lens)``) per state, sample-level bootstrap intervals."""
    logit, tuned, counts = kl
    n = float(counts.sum())
    rows = []
    for model, arr in ((label, logit), (label + TUNED_SUFFIX, tuned)):
        lo, hi = cluster_ratio_ci(arr, counts, n_boot=n_boot, level=level, seed=seed,
                                  bounds=(0.0, math.inf))
        rows += [{"layer": j, "model": model, "metric": "kl_to_final",
                  "value": arr[:, j].sum() / n if n else math.nan, "ci_low": float(lo[j]),
                  "ci_high": float(hi[j]), "n": int(n)} for j in range(arr.shape[1])]
    return pd.DataFrame(rows)
