"""``sftscope swap``: hybrids of a Base/SFT pair, built by exchanging decoder blocks.

For each mask (segment ``i`` of ``K`` covers blocks ``[(i*L)//K, ((i+1)*L)//K)``, bottom segment
first) the blocks of the selected segments of the *host* are replaced by the *donor*'s, by
module reference (no weight copies): SFT blocks into the base (``base<-sft[01000]``) and base
blocks into the SFT model (``sft<-base[01000]``). The host keeps its embeddings; the final norm
and the LM head come from the model the user names (``head``). The models are restored after
each hybrid (try/finally), so their outputs afterwards are bit-identical to before.

Each hybrid and both originals are evaluated on the data: teacher-forced next-token accuracy,
loss and perplexity over real tokens and, for multiple-choice (MMLU-style) data, the choice
accuracy by the log-likelihood of the options' first tokens after the prompt. Intervals: a
sample-level (cluster) bootstrap for the token metrics (tokens of one sample are not
independent), Wilson for the choice accuracy (one 0/1 per item).
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from sftscope.config.commands import SwapConfig
from sftscope.config.core import build
from sftscope.errors import SftscopeError
from sftscope.experiments.context import Models, RunContext, open_sharded
from sftscope.experiments.lens import (
    DEFAULT_CHUNK,
    ChoiceSlot,
    LensSums,
    choices_noted,
    is_choice,
    lens_pass,
    merge_sums,
    prepare_data,
)
from sftscope.io import Timer, atomic_dir, run_record, write_tables
from sftscope.load.arch import (
    arch_for,
    check_part,
    get_blocks,
    get_final_norm,
    get_head,
    get_submodule,
    part_paths,
)
from sftscope.load.data import TokenizedSet
from sftscope.load.models import (
    check_adapter_base,
    check_pair,
    load_config,
    pair_tokenizer,
)
from sftscope.metrics.stats import cluster_ratio_ci, proportion_ci
from sftscope.parallel import empty_like_table
from sftscope.progress import plan, say, stage, staged
from sftscope.segments import mask_blocks, mask_group, masks_as_text, parse_mask, segment_bounds

SWAP_COLUMNS = ["config", "direction", "mask", "head", "metric", "value", "ci_low", "ci_high",
                "n", "alpha"]
MIX = "interpolate"  # the direction of interpolated rows
MASK_GROUPS = ("singles", "paper", "all")
DIRECTIONS = {"sft-into-base": ("base", "sft"), "base-into-sft": ("sft", "base")}


# ---------------------------------------------------------------------------------------------
# Module surgery


def _devices(mod: nn.Module) -> set[str]:
    return {str(p.device) for p in mod.parameters()} | {str(b.device) for b in mod.buffers()}


def _signature(mod: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """Parameter names, shapes and dtypes; an in-memory LoRA adapter's factors left out (a
    block with LoRA layers swaps like its base block)."""
    return [(n.replace(".base_layer.", "."), tuple(p.shape), str(p.dtype))
            for n, p in mod.named_parameters() if ".lora_" not in n]


def check_swappable(base: nn.Module, sft: nn.Module) -> int:
    """Refuse a pair whose blocks cannot be exchanged; return the number of blocks."""
    if type(base) is not type(sft):
        raise SftscopeError(f"the pair cannot be swapped: {type(base).__name__} vs "
                            f"{type(sft).__name__}; both models must have the same architecture")
    bb, sb = get_blocks(base), get_blocks(sft)
    if len(bb) != len(sb):
        raise SftscopeError(f"the pair cannot be swapped: {len(bb)} vs {len(sb)} blocks")
    for b, (x, y) in enumerate(zip(bb, sb, strict=True)):
        if type(x) is not type(y) or _signature(x) != _signature(y):
            diff = next(((p, q) for p, q in zip(_signature(x), _signature(y), strict=False)
                         if p != q), None)
            what = f" ({diff[0][0]}: {diff[0][1:]} vs {diff[1][1:]})" if diff else ""
            raise SftscopeError(f"the pair cannot be swapped: block {b} differs between the "
                                f"models{what}")
    if _signature(get_final_norm(base)) != _signature(get_final_norm(sft)):
        raise SftscopeError("the pair cannot be swapped: the final norms differ in shape")
    hb, hs = get_head(base), get_head(sft)
    if hb.weight.shape[1:] != hs.weight.shape[1:]:
        raise SftscopeError("the pair cannot be swapped: the LM heads take different inputs")
    return len(bb)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent) if parent else root, name, module)


def _head_path(model: nn.Module) -> str:
    head = get_head(model)
    for name, mod in model.named_modules():
        if mod is head:
            return name
    raise SftscopeError(f"the LM head of {type(model).__name__} is not a submodule; cannot swap it")


def _same_devices(a: nn.Module, b: nn.Module, what: str, host: str, donor: str) -> None:
    da, db = _devices(a), _devices(b)
    if da != db:
        raise SftscopeError(
            f"{what} of {donor} is on {', '.join(sorted(db))} but {host}'s is on "
            f"{', '.join(sorted(da))}; a swapped-in module must sit where the one it replaces "
            f"does: load both models with the same --device or --device-map"
        )


def _part_modules(host_block: nn.Module, new_block: nn.Module, paths: Sequence[str]
                  ) -> list[tuple[str, nn.Module]]:
    """The donor's modules at ``paths`` of one block, where the host's block has them (a dense
    block of an MoE model has no router)."""
    out = []
    for path in paths:
        try:
            host_block.get_submodule(path)
        except AttributeError:
            continue
        out.append((path, get_submodule(new_block, path)))
    return out


@contextlib.contextmanager
def swapped(host: nn.Module, donor: nn.Module, blocks: Sequence[int], *, head: bool = False,
            names: tuple[str, str] = ("host", "donor"),
            modules: Mapping[int, nn.Module] | None = None,
            parts: str = "all") -> Iterator[nn.Module]:
    """``host`` with ``donor``'s ``blocks`` (and, with ``head``, its final norm and LM head).

    Module references are assigned into the host's ``ModuleList`` (no copies); everything is
    put back on exit, also on errors. Run hybrids with ``use_cache=False`` (blocks keep their
    ``layer_idx``, the same index in both models). ``modules``: put these in at ``blocks``
    instead of the donor's own (the interpolated copies of ``SegmentMix``). ``parts``
    (``arch.SWAP_PARTS``): other than ``all``, only those modules of each block are put in
    (``arch.part_paths``: attention, router, routed experts, shared expert with its gate).
    """
    spec = arch_for(host)
    hb, db = get_blocks(host, spec), get_blocks(donor)
    blocks = sorted(set(int(b) for b in blocks))
    bad = [b for b in blocks if not 0 <= b < len(hb)]
    if bad:
        raise SftscopeError(f"block {bad[0]} does not exist (blocks 0..{len(hb) - 1})")
    new = dict(modules) if modules is not None else {b: db[b] for b in blocks}
    if sorted(new) != blocks:
        raise SftscopeError(f"replacement modules are given for blocks {sorted(new)}, not "
                            f"{blocks}")
    for b in blocks:
        _same_devices(hb[b], new[b], f"block {b}", *names)
    if head:
        _same_devices(get_head(host), get_head(donor), "the LM head", *names)
        _same_devices(get_final_norm(host), get_final_norm(donor), "the final norm", *names)
    if parts != "all":
        check_part(host.config, parts)
    paths = part_paths(spec, parts)
    saved_blocks = {b: hb[b] for b in blocks} if parts == "all" else {}
    saved_parts: list[tuple[nn.Module, str, nn.Module]] = []
    saved_mods: dict[str, nn.Module] = {}
    try:
        for b in blocks:
            if parts == "all":
                hb[b] = new[b]
                continue
            for path, mod in _part_modules(hb[b], new[b], paths):
                saved_parts.append((hb[b], path, hb[b].get_submodule(path)))
                _set_module(hb[b], path, mod)
        if head:
            if spec.final_norm:
                saved_mods[spec.final_norm] = get_final_norm(host, spec)
                _set_module(host, spec.final_norm, get_final_norm(donor))
            path = _head_path(host)
            saved_mods[path] = get_head(host, spec)
            _set_module(host, path, get_head(donor))
        yield host
    finally:
        for b, mod in saved_blocks.items():
            hb[b] = mod
        for block, path, mod in reversed(saved_parts):
            _set_module(block, path, mod)
        for path, mod in saved_mods.items():
            _set_module(host, path, mod)


# ---------------------------------------------------------------------------------------------
# Interpolation


def _lora_layers(mod: nn.Module) -> list[tuple[str, nn.Module]]:
    """The in-memory LoRA layers (PEFT) inside a module, by name."""
    return [(n, m) for n, m in mod.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "scaling") and hasattr(m, "get_base_layer")]


class SegmentMix:
    """Interpolated copies of the blocks of one mask: ``W = (1 - alpha) W_host + alpha W_donor``.

    Only these blocks are copied (once, from the host); ``set(alpha)`` rebuilds their weights in
    place from the two models' own (``torch.lerp``; alpha 0 and 1 are exact copies of the host's
    and the donor's), and ``swapped(host, donor, blocks, modules=mix.blocks)`` puts them in.
    Neither model is changed. Buffers stay the host's.

    When the donor's blocks carry an in-memory LoRA adapter (an adapter as SFT, applied to the
    same base weights as the host), ``W_donor = W + s B A`` and the mix is ``W + alpha s B A``:
    the copies are the donor's blocks with each LoRA scale multiplied by alpha (alpha 1 is then
    the donor's block, alpha 0 adds an exact zero to the base's output).
    """

    def __init__(self, host: nn.Module, donor: nn.Module, blocks: Sequence[int]) -> None:
        hb, db = get_blocks(host), get_blocks(donor)
        self.ids = sorted(set(int(b) for b in blocks))
        self.lora = any(_lora_layers(db[b]) for b in self.ids)
        src = db if self.lora else hb
        self.blocks = {b: copy.deepcopy(src[b]) for b in self.ids}
        self.alpha: float | None = None
        self._params: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._scales: list[tuple[Any, str, float]] = []
        for b in self.ids:
            if self.lora:
                for name, layer in _lora_layers(self.blocks[b]):
                    if getattr(layer, "lora_variant", None):
                        raise SftscopeError(f"block {b} {name}: the adapter uses a LoRA variant "
                                            f"(DoRA...) whose change is not linear in its scale; "
                                            f"merge it into a checkpoint (sftscope.load.models."
                                            f"save_model) to interpolate")
                    for key, scale in layer.scaling.items():
                        self._scales.append((layer, key, float(scale)))
                continue
            theirs = dict(db[b].named_parameters())
            for name, p in self.blocks[b].named_parameters():
                q = theirs[name]
                if p.is_floating_point():
                    self._params.append((p, dict(hb[b].named_parameters())[name], q))

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        """Make the copies the mix at ``alpha`` (in place)."""
        if not 0.0 <= alpha <= 1.0:
            raise SftscopeError(f"alpha {alpha:g} is outside [0, 1]")
        for layer, key, scale in self._scales:
            layer.scaling[key] = scale * alpha
        for mine, h, d in self._params:
            if alpha == 0.0:
                mine.copy_(h)
            elif alpha == 1.0:
                mine.copy_(d)
            else:
                torch.lerp(h, d.to(h.dtype), alpha, out=mine)
        self.alpha = alpha

    @torch.no_grad()
    def plain(self) -> dict[int, nn.Module]:
        """The copies with any LoRA layer merged into its weights and removed (a plain block, as
        a saved checkpoint holds it); the copies themselves are left as they are."""
        if not self.lora:
            return self.blocks
        out = {}
        for b, block in self.blocks.items():
            block = copy.deepcopy(block)
            for name, layer in _lora_layers(block):
                layer.merge()
                _set_module(block, name, layer.get_base_layer())
            out[b] = block
        return out


def mix_folder(out: str | Path, mask: str, alpha: float) -> Path:
    """Where ``save_mix`` writes the mix of ``mask`` at ``alpha``: ``OUT/mix-MASK-aALPHA``."""
    return Path(out) / f"mix-{mask}-a{alpha:g}"


def save_mix(base: nn.Module, sft: nn.Module, mask: str, alpha: float, folder: str | Path, *,
             head: str = "base", tokenizer: Any = None, parts: str = "all") -> Path:
    """Write the base with the blocks of ``mask`` interpolated towards the SFT model at
    ``alpha`` (final norm and LM head per ``head``) as a Hugging Face folder that
    ``AutoModelForCausalLM.from_pretrained`` loads (safetensors, config, and the tokenizer when
    given). Written to ``FOLDER.partial`` first: ``folder`` is whole or absent."""
    n_blocks = check_swappable(base, sft)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    if head == "sft" and tied:
        raise SftscopeError("--save-mix with --head sft: the base ties its LM head to its input "
                            "embeddings, so a saved folder cannot hold the base's embeddings "
                            "and the SFT's head; use --head base")
    folder = Path(folder)
    mix = SegmentMix(base, sft, mask_blocks(mask, n_blocks))
    mix.set(alpha)
    modules = mix.plain()
    if not all(bool(torch.isfinite(p).all()) for m in modules.values() for p in m.parameters()
               if p.is_floating_point()):
        raise SftscopeError(f"--save-mix {mask}:{alpha:g}: the mixed weights are not finite; "
                            "nothing was written")
    from sftscope.load.runtime import quiet_libraries

    with atomic_dir(folder) as tmp, swapped(base, sft, mix.ids, head=head == "sft",
                                            names=("base", "sft"), modules=modules,
                                            parts=parts) as hybrid, \
            quiet_libraries():
        hybrid.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return folder


# ---------------------------------------------------------------------------------------------
# Tables


def score_rows(sums: LensSums, config: str, direction: str, mask: str, head: str, level: float,
          n_boot: int, seed: int, alpha: float = math.nan) -> list[dict[str, Any]]:
    """Accuracy, loss and perplexity with a sample-level (cluster) interval
    (``metrics.stats.cluster_ratio_ci``: Wilson on the effective number of samples for accuracy,
    the studentised cluster bootstrap for loss); choice accuracy (one 0/1 per item) with the
    Wilson interval."""
    rows = []

    def add(metric, value, lo, hi, n):
        rows.append({"config": config, "direction": direction, "mask": mask, "head": head,
                     "metric": metric, "value": float(value), "ci_low": float(lo),
                     "ci_high": float(hi), "n": int(n), "alpha": float(alpha)})

    n_tok = int(sums.tokens.sum())
    if n_tok:
        acc = cluster_ratio_ci(sums.correct[:, 0], sums.tokens, n_boot=n_boot, level=level,
                               seed=seed, bounds=(0.0, 1.0), proportion=True)
        add("accuracy", sums.correct[:, 0].sum() / n_tok, *acc, n_tok)
        loss = sums.loss[:, 0].sum() / n_tok
        lo, hi = cluster_ratio_ci(sums.loss[:, 0], sums.tokens, n_boot=n_boot, level=level,
                                  seed=seed, bounds=(0.0, math.inf))
        add("loss", loss, lo, hi, n_tok)
        add("perplexity", math.exp(loss), math.exp(lo), math.exp(hi), n_tok)  # exp(NaN) = NaN
    has_c = sums.has_choice
    if has_c.any():
        v = sums.choice_correct[has_c, 0]
        k = int(v.sum())
        add("choice_accuracy", k / v.size, *proportion_ci(k, v.size, level), v.size)
    return rows


def swap_masks(segments: int, n_blocks: int, masks: str | Sequence[str] | None) -> list[str]:
    """The one-segment masks of ``segments``, then the extra ``masks`` (validated)."""
    segment_bounds(n_blocks, segments)
    out = ["".join("1" if j == i else "0" for j in range(segments)) for i in range(segments)]
    if masks:
        text = masks if isinstance(masks, str) else ",".join(masks)
        for item in (p.strip() for p in text.split(",") if p.strip()):
            if item not in MASK_GROUPS:
                parse_mask(item, segments)  # the clearest message for a malformed mask
            out += mask_group(item, segments)
    return list(dict.fromkeys(out))


class SwapSums(NamedTuple):
    """One evaluated model: its table labels and lens sums (``alpha``: NaN unless it is an
    interpolated mix)."""

    config: str
    direction: str
    mask: str
    head: str
    sums: LensSums
    alpha: float = math.nan


def mix_config(mask: str, alpha: float) -> str:
    """The ``config`` of an interpolated model: ``base<-mix0.25[01000]``."""
    return f"base<-mix{alpha:g}[{mask}]"


def finite_sums(sums: LensSums, config: str) -> LensSums:
    """``sums``, refused in one line when a model's loss is not finite (its logits overflowed:
    a broken hybrid or mix, whose accuracy would read as a result)."""
    bad = ~np.isfinite(sums.loss).all(axis=1)
    if bad.any():
        raise SftscopeError(f"{config}: non-finite logits on {int(bad.sum())} of {bad.size} "
                            "samples (the model's activations overflow); the swap cannot be "
                            "scored: check the models or use a wider --dtype")
    return sums


def swap_sums(base: nn.Module, sft: nn.Module, tok: TokenizedSet, pad_id: int, *,
              segments: int, masks: Sequence[str], head: str = "base",
              directions: Sequence[str] = tuple(DIRECTIONS),
              choices: Sequence[ChoiceSlot | None] | None = None, batch_size: int = 8,
              chunk_elements: int = DEFAULT_CHUNK, indices: Sequence[int] | None = None,
              alphas: Sequence[float] = (), parts: str = "all") -> tuple[list[SwapSums], int]:
    """The lens sums (last layer) of both loaded originals and each hybrid (``masks`` x
    ``directions``), over the samples ``indices`` (default all), and the number of blocks.

    When the head comes from the donor, the head-only hybrid (mask of zeros) is evaluated too,
    so the effect of the blocks can be told from the effect of the head. With ``alphas``, for
    each mask the base whose blocks there are interpolated towards the SFT model
    (``SegmentMix``; final norm and head per ``head``) at each alpha (direction
    ``interpolate``). ``parts``: swap (and interpolate) only those modules of each block
    (``swapped``). The models are left as they were.
    """
    n_blocks = check_swappable(base, sft)
    models = {"base": base, "sft": sft}
    none = "0" * segments
    found: list[SwapSums] = []

    def run(model: nn.Module, label: str) -> LensSums:
        return finite_sums(lens_pass(model, tok, pad_id, batch_size=batch_size,
                                     layers=[n_blocks], choices=choices,
                                     chunk_elements=chunk_elements, description=label,
                                     indices=indices), label)

    for k in ("base", "sft"):
        found.append(SwapSums(k, "none", none, k, run(models[k], k)))
    for direction in directions:
        host_k, donor_k = DIRECTIONS[direction]
        head_from_donor = head == donor_k
        for mask in ([none] if head_from_donor else []) + list(masks):
            config = f"{host_k}<-{donor_k}[{mask}]"
            with swapped(models[host_k], models[donor_k], mask_blocks(mask, n_blocks),
                         head=head_from_donor, names=(host_k, donor_k), parts=parts) as hybrid:
                found.append(SwapSums(config, direction, mask, head, run(hybrid, config)))
    for mask in masks if alphas else ():
        mix = SegmentMix(base, sft, mask_blocks(mask, n_blocks))  # this mask's blocks only
        for alpha in alphas:
            mix.set(alpha)
            config = mix_config(mask, alpha)
            with swapped(base, sft, mix.ids, head=head == "sft", names=("base", "sft"),
                         modules=mix.blocks, parts=parts) as hybrid:
                found.append(SwapSums(config, MIX, mask, head, run(hybrid, config), alpha))
        del mix
    return found, n_blocks


def swap_table(found: Sequence[SwapSums], level: float = 0.95, n_boot: int = 1000,
               seed: int = 0) -> pd.DataFrame:
    """The tidy table (``SWAP_COLUMNS``) of ``swap_sums``' results."""
    rows: list[dict[str, Any]] = []
    for f in found:
        rows += score_rows(f.sums, f.config, f.direction, f.mask, f.head, level, n_boot, seed,
                      f.alpha)
    return pd.DataFrame(rows, columns=SWAP_COLUMNS)


ITEMS = "swap_items"  # the per-item table's file stem
ITEM_COLUMNS = ["config", "direction", "mask", "head", "alpha", "item", "tokens", "correct",
                "loss", "choice_correct"]


def item_table(found: Sequence[SwapSums]) -> pd.DataFrame:
    """Per sample (``item``, its index in the data) and evaluated model: scored tokens, correct
    top-1 count, summed loss (nats) and the choice 0/1 (NaN: no choice slot). The same items
    under every hybrid, so the report compares hybrids with paired tests
    (``metrics.paired``) instead of overlapping intervals."""
    frames = []
    for f in found:
        s = f.sums
        n = len(s.tokens)
        choice = s.choice_correct[:, 0] if s.choice_correct.size else np.full(n, np.nan)
        frames.append(pd.DataFrame({
            "config": f.config, "direction": f.direction, "mask": f.mask, "head": f.head,
            "alpha": float(f.alpha), "item": np.arange(n), "tokens": s.tokens.astype(np.int64),
            "correct": s.correct[:, 0], "loss": s.loss[:, 0], "choice_correct": choice}))
    if not frames:
        return pd.DataFrame(columns=ITEM_COLUMNS)
    return pd.concat(frames, ignore_index=True)[ITEM_COLUMNS]


def evaluate_swaps(base: nn.Module, sft: nn.Module, tok: TokenizedSet, pad_id: int, *,
                   segments: int, masks: Sequence[str], head: str = "base",
                   directions: Sequence[str] = tuple(DIRECTIONS),
                   choices: Sequence[ChoiceSlot | None] | None = None, batch_size: int = 8,
                   chunk_elements: int = DEFAULT_CHUNK, level: float = 0.95,
                   n_boot: int = 1000, seed: int = 0, alphas: Sequence[float] = ()
                   ) -> tuple[pd.DataFrame, int]:
    """Evaluate both loaded originals and each hybrid (``swap_sums``, then ``swap_table``).
    Returns the table and the number of blocks. The models are left as they were."""
    found, n_blocks = swap_sums(base, sft, tok, pad_id, segments=segments, masks=masks,
                                head=head, directions=directions, choices=choices,
                                batch_size=batch_size, chunk_elements=chunk_elements,
                                alphas=alphas)
    return swap_table(found, level, n_boot, seed), n_blocks


def merge_swap_sums(parts: Sequence[tuple[Sequence[int], list[SwapSums] | None]]
                    ) -> list[SwapSums]:
    """Every rank's ``(share, swap_sums)`` joined per evaluated model (``merge_sums``)."""
    got = [(i, f) for i, f in parts if f is not None]
    if not got:
        raise SftscopeError("no swap results to merge: no process ran a sample")
    return [first._replace(sums=merge_sums([(i, f[k].sums) for i, f in got]))
            for k, first in enumerate(got[0][1])]


# ---------------------------------------------------------------------------------------------
# The experiment


class SwapPlan(NamedTuple):
    """What validation found, before any model runs: the run context (the pair, tokenizer,
    tokenized data, notes and run folder), the masks and the data's choice slots."""

    ctx: RunContext
    info: Any  # load.models.check_pair's result (n_blocks, notes)
    masks: list[str]
    choices: list[ChoiceSlot | None]


def plan_swap(cfg: SwapConfig) -> SwapPlan:
    """Every check of the pair, the masks and the data, before any model is loaded (so a
    mistake costs one line, not a probe of the whole base)."""
    pair = Models.pair(cfg.base, cfg.sft, cfg.base_revision, cfg.sft_revision)
    specs, revs = pair.specs, pair.revs
    cfgs = {k: load_config(v, revision=revs[k], base=pair.bases[k],
                           base_revision=cfg.base_revision) for k, v in specs.items()}
    info = check_pair(cfgs["base"], cfgs["sft"], cfg.base, cfg.sft,
                      allow_mixed=cfg.allow_mixed_pair)
    check_adapter_base(cfg.sft, cfg.base, cfg.sft_revision, base_revision=cfg.base_revision,
                       allow_other_base=cfg.allow_other_base)
    check_part(cfgs["base"], cfg.parts)
    if cfgs["base"].model_type != cfgs["sft"].model_type:
        raise SftscopeError(f"the pair cannot be swapped: model types "
                            f"{cfgs['base'].model_type} and {cfgs['sft'].model_type} differ")
    if cfg.save_mix and cfg.head == "sft" and getattr(cfgs["base"], "tie_word_embeddings",
                                                      False):
        raise SftscopeError("--save-mix with --head sft: the base ties its LM head to its "
                            "input embeddings, so a saved folder cannot hold the base's "
                            "embeddings and the SFT's head; use --head base")
    mask_list = swap_masks(cfg.segments, info.n_blocks, cfg.masks)
    ctx = RunContext("swap", Path(cfg.out) if cfg.out is not None else None, pair,
                     notes=list(info.notes))
    ctx.tokenizer, tok_notes = pair_tokenizer(specs["base"], specs["sft"], cfg.tokenizer,
                                              revisions=revs, chat_template=cfg.chat_template)
    ctx.notes += tok_notes
    samples, ctx.tokens, data_notes = prepare_data(
        cfg.data, ctx.tokenizer, n=cfg.limit, seed=cfg.seed, max_length=cfg.max_length,
        chat_template=cfg.chat_template, text_field=cfg.text_field, template=cfg.template,
        split=cfg.split, skip_bad=cfg.skip_bad_records)
    ctx.notes += data_notes
    choices: list[ChoiceSlot | None] = [None] * len(samples)
    if any(is_choice(s) for s in samples):
        choices = choices_noted(samples, ctx.tokens, ctx.tokenizer, cfg.chat_template,
                                ctx.notes)
    return SwapPlan(ctx, info, mask_list, choices)


def run_swap(cfg: SwapConfig, sp: SwapPlan, share: Sequence[int], device: str, timer: Timer,
             *, save: bool, done: dict[str, list[str]]
             ) -> tuple[list[SwapSums] | None, int | None]:
    """Load the pair, score originals and hybrids over the samples ``share`` (``swap_sums``),
    and, with ``save``, write the ``--save-mix`` folders (their paths in ``done['saved']``)."""
    if not share:
        return None, None
    ctx = sp.ctx
    opts = ctx.load_options(cfg, device=device)
    stage("load base and sft")
    with ctx.models.loaded(opts, ctx.tokens, timer) as models:
        done["part_modules"] = [p or "(whole block)" for p in
                                part_paths(arch_for(models["base"]), cfg.parts)]
        stage("score originals and hybrids")
        with timer("evaluate"):
            result = swap_sums(
                models["base"], models["sft"], ctx.tokens, ctx.pad_id,
                segments=cfg.segments, masks=sp.masks, head=cfg.head,
                directions=list(DIRECTIONS) if cfg.directions == "both" else [cfg.directions],
                choices=sp.choices, batch_size=cfg.batch_size,
                chunk_elements=cfg.chunk_elements, indices=share, alphas=cfg.alphas,
                parts=cfg.parts)
        if save and cfg.mixes():
            stage("save mixes")
            with timer("save_mix"):
                for mask, alpha in cfg.mixes():
                    where = save_mix(models["base"], models["sft"], mask, alpha,
                                     mix_folder(cfg.out, mask, alpha), head=cfg.head,
                                     tokenizer=ctx.tokenizer, parts=cfg.parts)
                    done.setdefault("saved", []).append(str(where))
                    say(f"wrote {where}")
        return result


def record_swap(cfg: SwapConfig, sp: SwapPlan, df: pd.DataFrame, items: pd.DataFrame,
                n_blocks: int, timer: Timer, done: dict[str, list[str]],
                parallel: dict[str, Any]) -> None:
    """Write ``swap.csv``, the per-item ``swap_items.csv`` and ``run.json`` into ``cfg.out``."""
    ctx, tok = sp.ctx, sp.ctx.tokens
    bounds = segment_bounds(n_blocks, cfg.segments)
    write_tables(masks_as_text(df), ctx.out, "swap", cfg.formats)  # masks as m0100: text
    write_tables(masks_as_text(items), ctx.out, ITEMS, cfg.formats)
    ctx.finish(run_record(
        "swap", cfg.record(), n_blocks=n_blocks, segments=cfg.segments,
        segment_blocks=[list(range(lo, hi)) for lo, hi in bounds], masks=sp.masks,
        head=cfg.head, embeddings="host (the model receiving the blocks)", parts=cfg.parts,
        part_modules=done.get("part_modules", []),
        models=ctx.fingerprints(cfg.base_revision),
        n_samples=len(tok), n_tokens=int(sum(max(len(i) - 1, 0) for i in tok.input_ids)),
        n_truncated=tok.n_truncated, n_choice_items=sum(c is not None for c in sp.choices),
        alphas=list(cfg.alphas),
        interpolation="per mask: the base with that mask's blocks (1-alpha) x base + "
                      "alpha x SFT (LoRA adapter: alpha x its scale), final norm and head "
                      "per --head; direction interpolate, alpha column (NaN on swap rows)",
        item_scores=f"{ITEMS}: per sample and evaluated model its tokens, correct top-1 "
                    "count, summed loss and choice 0/1, for paired tests across hybrids",
        mixes_saved=done.get("saved", []), notes=ctx.notes, timings=timer.seconds,
        **parallel))


def clear_mixes(out: str | Path) -> None:
    """Remove a previous run's ``mix-*`` model folders (and unfinished ones)."""
    for old in Path(out).glob("mix-*"):
        if old.is_dir() and ((old / "config.json").is_file() or old.name.endswith(".partial")):
            shutil.rmtree(old, ignore_errors=True)


@staged
def swap(config: SwapConfig | None = None, /, **options: Any) -> pd.DataFrame:
    """Evaluate both originals and every block-swapped hybrid; return the tidy table.

    Takes a :class:`SwapConfig` or its fields as keywords. ``masks``: extra masks or groups
    (``01000,00110``, ``paper``, ``all``) besides the one-segment masks. ``head``: ``base`` or
    ``sft``, the model whose final norm and LM head every hybrid uses. ``directions``:
    ``both``, ``sft-into-base`` or ``base-into-sft``. ``alphas``: also score, per mask, the
    base with that mask's blocks interpolated towards the SFT model at each alpha (rows with
    direction ``interpolate``, config ``base<-mixALPHA[MASK]`` and the ``alpha`` column; the
    ``alpha`` of swap and original rows is NaN). ``save_mix``: ``MASK:ALPHA`` mixes written
    to ``out/mix-MASK-aALPHA`` (``save_mix``). Columns: ``SWAP_COLUMNS``. With ``out``: writes
    ``swap.csv``, ``swap_items.csv`` (per-item scores, ``ITEM_COLUMNS``) and ``run.json``.
    """
    cfg = config if config is not None else build(SwapConfig, options)
    sp, par, timer, device = open_sharded(cfg, "swap", plan_swap)
    if cfg.out is not None and par.main:
        clear_mixes(cfg.out)
    share = par.shard(len(sp.ctx.tokens), cfg.batch_size)  # all samples when alone
    done: dict[str, list[str]] = {}  # what was swapped and saved, from the loaded model
    plan(3 + bool(cfg.mixes()))  # load the pair, score originals and hybrids, (mixes,) table
    found, n_blocks = par.run(
        lambda: run_swap(cfg, sp, share, device, timer, save=cfg.out is not None and par.main,
                         done=done), "swap")
    parts = par.gather((share, found, n_blocks))
    if parts is None:  # not rank 0: the table is rank 0's
        return empty_like_table(SWAP_COLUMNS)
    stage("table")
    n_blocks = next(b for _, _, b in parts if b is not None)
    merged = merge_swap_sums([(i, f) for i, f, _ in parts])
    df = swap_table(merged, cfg.level, cfg.bootstrap, cfg.seed)
    if cfg.out is not None:
        record_swap(cfg, sp, df, item_table(merged), n_blocks, timer, done,
                    par.record(len(sp.ctx.tokens), cfg.batch_size))
    return df
