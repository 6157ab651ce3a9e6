"""``sftscope steer``: add the base->SFT shift of one or more hidden states to the base model.

The vector ``v`` at each hidden state ``j`` of ``--layers`` comes from the pooled states
(token mean, or last token) of ``--data`` under both models, captured with the analysis engine
(SFT first, then base: never both models in memory):

- ``mean``: ``mean_n (z_sft,n - z_base,n)``, whose norm is the pair's ``mean_shift`` at ``j``.
- ``pc1``: the top principal direction ``u`` of the per-sample differences ``d_n`` (centred, as
  the research code's PCA), oriented so that ``u . mean_n d_n >= 0`` and sized by the RMS of
  ``d_n . u`` (how far samples moved along it), so that scale 1 is a shift of the size the
  SFT model made.

``--unit`` sets ``||v|| = 1`` (the research code's convention). At each ``--scales`` value
``s`` the base model runs with ``s * v_j`` added to the residual stream at every ``j`` of
``--layers``, all in the same forward pass: a forward hook on the output of block ``j - 1``
(``j = 0``: a pre-hook on block 0's input, the embeddings as the model feeds them), at every
position (prompt and generated tokens). Each ``v_j`` is the shift the SFT model made at ``j``
(measured without steering), so with several layers the shifts added below ``j`` also travel
up to ``j``. ``s = 0`` registers no hook, so it *is* the unsteered base. Per scale: the task
score through the evaluator (``--task``) and/or greedy completions (``--generate``). Files:
``steer.csv`` (layers as ``6-11,14``, scale, metric, value, ci_low, ci_high, n),
``steer_items.csv`` (scale, metric, item, value: every item's score, the same items at every
scale, so that the report compares scales with paired tests), ``steer.jsonl`` (completions),
``steer_vector.safetensors`` (one tensor ``layer_<j>`` per layer), ``scales/<s>/`` (the
evaluator's scores and predictions per scale) and ``run.json``.
"""

from __future__ import annotations

import gc
import math
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from sftscope.capture.stream import CaptureConfig, capture
from sftscope.config.commands import EvalConfig, SteerConfig
from sftscope.errors import SftscopeError
from sftscope.experiments.context import Models, RunContext
from sftscope.experiments.evaluate import eos_text, evaluate_model, generate
from sftscope.experiments.tune import parse_eval_task
from sftscope.io import Timer, atomic_path, run_record, write_table
from sftscope.load.arch import ArchSpec, arch_for, block_output, get_blocks
from sftscope.load.data import pad_batch, read_samples
from sftscope.load.models import (
    LoadOptions,
    check_adapter_base,
    check_pair,
    check_vocab,
    load_config,
    load_model,
    pair_tokenizer,
)
from sftscope.load.runtime import dtype_name, input_device, resolve_device, resolve_dtype
from sftscope.metrics.stats import mean_ci, proportion_ci
from sftscope.progress import plan, say, stage, staged
from sftscope.runs import check_out
from sftscope.segments import block_text
from sftscope.tasks import get_task

__all__ = ["ITEM_COLUMNS", "STEER_COLUMNS", "SteerConfig", "SteerResult", "steer", "steering",
           "steering_vector"]

STEER_COLUMNS = ["layers", "scale", "metric", "value", "ci_low", "ci_high", "n"]
ITEM_COLUMNS = ["scale", "metric", "item", "value"]


@dataclass
class SteerResult:
    """The table written to ``steer.csv``, the per-item scores (``steer_items.csv``), each
    layer's vector's description and where files went."""

    out: str
    layers: list[int]
    n_blocks: int
    table: pd.DataFrame
    vectors: list[dict[str, Any]]
    items: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ITEM_COLUMNS))
    completions_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ the vector


def steering_vector(zb: torch.Tensor, zs: torch.Tensor, direction: str = "mean",
                    unit: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """The steering vector from paired pooled states ``[N, D]`` (base, SFT) and what it is.

    See the module docstring for ``mean`` and ``pc1``; float32 out, float64 inside."""
    if zb.shape != zs.shape or zb.dim() != 2:
        raise SftscopeError(f"pooled states of base {tuple(zb.shape)} and SFT "
                            f"{tuple(zs.shape)} must both be [samples, width]")
    d = zs.double() - zb.double()
    mean = d.mean(0)
    info: dict[str, Any] = {"direction": direction, "n_samples": int(d.shape[0]),
                            "mean_shift": float(mean.norm())}
    if direction == "mean":
        v = mean
    elif direction == "pc1":
        if d.shape[0] < 2:
            raise SftscopeError("--direction pc1 needs at least 2 samples; raise --limit")
        centred = d - mean
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        u = vh[0]
        dot = float(u @ mean)
        if dot < 0 or (dot == 0 and float(u[u.abs().argmax()]) < 0):
            u = -u
        size = float((d @ u).square().mean().sqrt())
        v = u * size
        var = s.square()
        info.update(explained=float(var[0] / var.sum()) if float(var.sum()) > 0 else math.nan,
                    cos_with_mean=float(u @ mean / mean.norm()) if float(mean.norm()) > 0
                    else math.nan)
    else:
        raise SftscopeError(f"unknown direction {direction!r}; use mean or pc1")
    natural = float(v.norm())
    if unit:
        if natural == 0:
            raise SftscopeError("the base and SFT states are identical at this layer: the "
                                "vector is 0 and has no direction to scale to norm 1")
        v = v / natural
    info.update(norm=float(v.norm()), natural_norm=natural, unit=unit)
    return v.float(), info


def _hook(blocks: Any, layer: int, shift: Any) -> Any:
    """Register the hook that applies ``shift`` to hidden state ``layer``; its handle."""
    if layer == 0:
        def pre(_mod, args, kwargs):  # noqa: ANN001
            if args:
                return (shift(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": shift(kwargs["hidden_states"])}

        return blocks[0].register_forward_pre_hook(pre, with_kwargs=True)

    def post(_mod, _args, output):  # noqa: ANN001
        if isinstance(output, (tuple, list)):
            return (shift(block_output(output)), *output[1:])
        return shift(output)

    return blocks[layer - 1].register_forward_hook(post)


@contextmanager
def steering(model: nn.Module, vectors: Mapping[int, torch.Tensor], scale: float,
             spec: ArchSpec | None = None) -> Iterator[None]:
    """Add ``scale * vectors[j]`` to hidden state ``j`` of ``model`` for every ``j`` in
    ``vectors``, inside the blocks (every position), all in one forward pass; ``scale == 0``
    adds no hook at all."""
    if scale == 0:
        yield
        return
    blocks = get_blocks(model, spec or arch_for(model))
    bad = [j for j in vectors if not 0 <= j <= len(blocks)]
    if bad:
        raise SftscopeError(f"--layers {block_text(bad)} is outside 0..{len(blocks)}")
    # each layer's shift in each device and dtype it meets, made once
    cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def shifter(layer: int) -> Any:
        shift_f32 = vectors[layer].float() * float(scale)

        def shift(h: torch.Tensor) -> torch.Tensor:
            key = (layer, h.device, h.dtype)
            if key not in cache:
                cache[key] = shift_f32.to(device=h.device, dtype=h.dtype)
            return h + cache[key]

        return shift

    handles = []
    try:
        for j in sorted(vectors):
            handles.append(_hook(blocks, j, shifter(j)))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------ the run


def _free_memory() -> None:
    """Give freed model memory back (after the caller dropped its last reference)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _pooled(spec: str, opts: LoadOptions, cfg: SteerConfig, layers: list[int], tok,
            pad: int, label: str) -> tuple[dict[int, torch.Tensor], Any]:
    """Pooled states of each hidden state of ``layers`` for every sample, and the loaded
    model (``opts``: the pair's load options, so an adapter SFT applies to ``--base``)."""
    model = load_model(spec, opts)
    check_vocab(model, tok.input_ids, label)
    res = capture(model, tok, CaptureConfig(batch_size=cfg.batch_size, n_token=0), pad,
                  label=label)
    pooled = res.pooled(cfg.pooling)
    return {j: pooled[j].clone() for j in layers}, model


def _prompts(cfg: SteerConfig) -> list[str]:
    samples, _ = read_samples(cfg.prompts or cfg.data, text_field=cfg.text_field,
                              template=None if cfg.prompts else cfg.template, n=cfg.n_prompts,
                              seed=cfg.seed, split=cfg.split, skip_bad=cfg.skip_bad_records)
    return [s.prompt if s.prompt else s.text for s in samples]


def _scale_dir(scale: float) -> str:
    return f"{scale:g}".replace("-", "m")


def _empty_note(scale: float) -> str:
    return (f"scale {scale:g}: every completion is empty (the steered model ends at once); its "
            "scores describe a broken model, not a steered one")


def check_scales(model: nn.Module, tokens, pad: int, vectors: Mapping[int, torch.Tensor],
                 scales: list[float], spec: ArchSpec | None = None, n: int = 4) -> None:
    """Refuse, before anything is scored, every scale at which the steered model's logits on
    the first ``n`` samples are not finite or the same for every token at every position (a
    huge scale overflows the hidden state, a norm layer then zeroes it: the model is broken,
    not steered, and its empty completions would score as accuracy 0)."""
    ids, mask = pad_batch([list(t) for t in tokens.input_ids[:n]], pad)
    dev = input_device(model)
    bad = []
    for s in scales:
        with steering(model, vectors, s, spec), torch.no_grad():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        live = logits[mask.to(dev).bool()].float()
        flat = bool((live.amax(-1) == live.amin(-1)).all())  # the same score for every token
        if flat or not bool(torch.isfinite(live).all()):
            bad.append(s)
    if bad:
        norm = max(float(v.norm()) for v in vectors.values())
        raise SftscopeError(
            f"--scales {','.join(f'{s:g}' for s in bad)}: the steered model gives non-finite "
            f"or constant logits (scale x vector norm {norm:.3g} overflows the hidden state); "
            "use smaller scales")


@dataclass
class _SteerPlan:
    """What ``steer`` validated and prepared before any model runs: the run context (the
    pair, tokenizer, tokenized data, notes and run folder), the resolved device and dtype, the
    scales, layers, task and prompts."""

    ctx: RunContext
    device: str
    dtype: str
    scales: list[float]
    layers: list[int]
    n_blocks: int
    task: tuple[str, str | None] | None
    prompts: list[str]

    @property
    def out(self) -> Path:
        """The run folder (steer always writes one)."""
        assert self.ctx.out is not None
        return self.ctx.out


def _steer_plan(cfg: SteerConfig, timer: Timer) -> _SteerPlan:
    """Validate the pair, the layer and the task; tokenizer, data and prompts; open the run."""
    out = Path(cfg.out).expanduser()
    check_out(out, "steer", cfg, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    with timer("validate"):
        info = check_pair(load_config(cfg.base, cfg.base_revision),
                          load_config(cfg.sft, cfg.sft_revision, base=cfg.base,
                                      base_revision=cfg.base_revision), cfg.base, cfg.sft,
                          allow_mixed=cfg.allow_mixed_pair)
        check_adapter_base(cfg.sft, cfg.base, cfg.sft_revision,
                           base_revision=cfg.base_revision,
                           allow_other_base=cfg.allow_other_base)
        n_blocks = info.n_blocks
        layers = cfg.layer_values(n_blocks)
        task = parse_eval_task(cfg.task, flag="--task") if cfg.task else None
        ctx = RunContext("steer", out, Models.pair(cfg.base, cfg.sft, cfg.base_revision,
                                                   cfg.sft_revision), notes=list(info.notes))
        ctx.tokenizer, tok_notes = pair_tokenizer(cfg.base, cfg.sft, cfg.tokenizer,
                                                  revisions=ctx.models.revs,
                                                  chat_template=cfg.chat_template)
        ctx.notes += tok_notes
    with timer("data"):
        prep = cfg.prepare(ctx.tokenizer)
        ctx.tokens = prep.tokens
        ctx.notes += prep.notes
        prompts = _prompts(cfg) if cfg.generate else []
    ctx.say_notes()
    ctx.start(SteerConfig.OUTPUTS)
    shutil.rmtree(out / "scales", ignore_errors=True)
    return _SteerPlan(ctx, device, dtype_name(resolve_dtype(cfg.dtype, device)),
                      cfg.scale_values(), layers, n_blocks, task, prompts)


def _where(layer: int) -> str:
    return "embeddings" if layer == 0 else f"output of block {layer - 1}"


def _steer_vector(cfg: SteerConfig, p: _SteerPlan, timer: Timer
                  ) -> tuple[dict[int, torch.Tensor], list[dict[str, Any]], Any]:
    """The SFT's then the base's pooled states (never both models in memory), each layer's
    vector (saved, one tensor ``layer_<j>`` each), and the base model they steer."""
    from safetensors.torch import save_file

    pad, tokens = p.ctx.pad_id, p.ctx.tokens
    opts = {k: replace(o, dtype=p.dtype)
            for k, o in p.ctx.load_options(cfg, device=p.device).items()}
    stage("capture sft")
    with timer("capture_sft"):
        zs, sft_model = _pooled(cfg.sft, opts["sft"], cfg, p.layers, tokens, pad, "sft")
        del sft_model  # never both models in memory
        _free_memory()
    stage("capture base")
    with timer("capture_base"):
        zb, model = _pooled(cfg.base, opts["base"], cfg, p.layers, tokens, pad, "base")
    vectors: dict[int, torch.Tensor] = {}
    infos: list[dict[str, Any]] = []
    for j in p.layers:
        vectors[j], vinfo = steering_vector(zb[j], zs[j], cfg.direction, cfg.unit)
        vinfo.update(layer=j, where=_where(j), pooling=cfg.pooling)
        infos.append(vinfo)
        say(f"steering vector at hidden state {j} ({_where(j)}): {cfg.direction}, norm "
            f"{vinfo['norm']:.4g} (base->SFT mean shift {vinfo['mean_shift']:.4g}, "
            f"{vinfo['n_samples']} samples)")
    with atomic_path(p.out / "steer_vector.safetensors") as tmp:
        save_file({f"layer_{j}": v.contiguous() for j, v in vectors.items()}, str(tmp),
                  metadata={f"layer_{x['layer']}.{k}": str(v) for x in infos
                            for k, v in x.items()})
    return vectors, infos, model


def _task_items(path: str, task: str, kind: str, s: float) -> list[dict[str, Any]]:
    """Every item's scores of one scale from the evaluator's predictions file, under the
    names of ``steer.csv``'s metrics (a loss task scores the plain base: ``loss``)."""
    from sftscope.experiments.sweep import read_predictions

    df = read_predictions(path, task)
    if kind == "loss":  # no adapter: the item's loss is its loss_after (= loss_before)
        df = df[df["metric"] == "loss_after"].assign(metric="loss")
    return [{"scale": s, "metric": m, "item": int(i), "value": float(v)}
            for i, m, v in df[["item", "metric", "value"]].itertuples(index=False)]


def _score_scale(cfg: SteerConfig, p: _SteerPlan, model, s: float, timer: Timer,
                 rows: list[dict[str, Any]], gens: list[dict[str, Any]],
                 items: list[dict[str, Any]]) -> list[str] | None:
    """The task's scores, every item's scores and the completions' rows of one scale (the
    model already steered); returns the completions."""
    tok = p.ctx.tokenizer
    if p.task is not None:
        name, data = p.task
        ecfg = EvalConfig(model=cfg.base, revision=cfg.base_revision, task=name, data=data,
                          out=str(p.out / "scales" / _scale_dir(s)), shots=cfg.eval_shots,
                          fewshot_data=cfg.eval_fewshot_data, limit=cfg.eval_limit,
                          max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                          chat_template=cfg.chat_template, level=cfg.level,
                          skip_bad_records=cfg.skip_bad_records)
        with timer(f"eval_{_scale_dir(s)}"):
            res = evaluate_model(model, tok, ecfg)
        if res.n and res.generated_tokens == 0 and res.tokens_per_s is not None:
            p.ctx.notes.append(_empty_note(s))
            say(f"[yellow]warning:[/] {p.ctx.notes[-1]}")
        for sc in res.scores:
            rows.append({"scale": s, "metric": sc.metric, "value": sc.value,
                         "ci_low": sc.ci_low, "ci_high": sc.ci_high, "n": sc.n})
        if res.predictions_path:
            items += _task_items(res.predictions_path, res.task, get_task(res.task).kind, s)
        say(f"scale {s:g}: " + ", ".join(f"{sc.metric} {sc.value:.4f}"
                                         for sc in res.scores[:3]))
    if not cfg.generate:
        return None
    stops = tuple(x for x in (eos_text(tok),) if x)
    with timer(f"generate_{_scale_dir(s)}"):
        got = generate(model, tok, p.prompts, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, stops=stops,
                       description=f"generate (scale {s:g})")
    if not any(g.completion.strip() for g in got):
        p.ctx.notes.append(_empty_note(s))
        say(f"[yellow]warning:[/] {p.ctx.notes[-1]}")
    new = [float(g.new_tokens) for g in got]
    lo, hi = mean_ci(new, cfg.level)
    rows.append({"scale": s, "metric": "new_tokens", "value": sum(new) / len(new),
                 "ci_low": lo, "ci_high": hi, "n": len(new)})
    items += [{"scale": s, "metric": "new_tokens", "item": i, "value": x}
              for i, x in enumerate(new)]
    gens += [{"scale": s, "index": i, "prompt": q, "completion": g.completion,
              "new_tokens": g.new_tokens} for i, (q, g) in enumerate(zip(p.prompts, got))]
    return [g.completion for g in got]


def _same_as_unsteered(cfg: SteerConfig, scales: list[float], gens: list[dict[str, Any]],
                       unsteered: list[str]) -> list[dict[str, Any]]:
    """How many completions steering left unchanged, per scale."""
    rows = []
    for s in scales:
        texts = [g["completion"] for g in gens if g["scale"] == s]
        k = sum(a == b for a, b in zip(texts, unsteered))
        lo, hi = proportion_ci(k, len(texts), cfg.level)
        rows.append({"scale": s, "metric": "same_as_unsteered", "value": k / len(texts),
                     "ci_low": lo, "ci_high": hi, "n": len(texts)})
    return rows


@staged
def steer(cfg: SteerConfig) -> SteerResult:
    """Compute the vectors, steer the base model at every scale, write the run folder."""
    timer = Timer()
    p = _steer_plan(cfg, timer)
    plan(2 + len(p.scales))  # the SFT's and the base's states, then each scale
    vectors, infos, model = _steer_vector(cfg, p, timer)
    spec = arch_for(model)
    with timer("check_scales"):
        check_scales(model, p.ctx.tokens, p.ctx.pad_id, vectors, p.scales, spec)
    rows: list[dict[str, Any]] = []
    gens: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    unsteered: list[str] | None = None
    for s in p.scales:
        stage(f"scale {s:g}")
        with steering(model, vectors, s, spec):
            texts = _score_scale(cfg, p, model, s, timer, rows, gens, items)
        if s == 0 and texts is not None:
            unsteered = texts
    if cfg.generate and unsteered is not None:  # how many completions steering changed
        rows += _same_as_unsteered(cfg, p.scales, gens, unsteered)
    table = pd.DataFrame(rows).assign(layers=block_text(p.layers))[STEER_COLUMNS].sort_values(
        "scale", kind="stable")
    item_table = pd.DataFrame(items, columns=ITEM_COLUMNS).sort_values(
        ["scale", "metric", "item"], kind="stable").reset_index(drop=True)
    result = _steer_record(cfg, p, table.reset_index(drop=True), item_table, gens, infos,
                           timer)
    del model
    _free_memory()
    return result


def _steer_record(cfg: SteerConfig, p: _SteerPlan, table: pd.DataFrame, items: pd.DataFrame,
                  gens: list[dict[str, Any]], infos: list[dict[str, Any]], timer: Timer
                  ) -> SteerResult:
    """Write steer.csv, steer_items.csv, steer.jsonl and run.json."""
    import json

    out = p.out
    for fmt in cfg.formats:
        write_table(table, out / f"steer.{fmt}")
    write_table(items, out / "steer_items.csv")
    comp_path = None
    if cfg.generate:
        comp_path = out / "steer.jsonl"
        with atomic_path(comp_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for g in gens:
                f.write(json.dumps(g) + "\n")
    result = SteerResult(out=str(out), layers=p.layers, n_blocks=p.n_blocks, table=table,
                         vectors=infos, items=items,
                         completions_path=str(comp_path) if comp_path else None,
                         timings=timer.seconds)
    p.ctx.finish(run_record(
        "steer", cfg.record(), n_blocks=p.n_blocks, layers=p.layers,
        layers_text=block_text(p.layers), vectors=infos, scales=p.scales,
        task=p.task[0] if p.task else None,
        models=p.ctx.fingerprints(cfg.base_revision),
        resolved={"device": p.device, "dtype": p.dtype},
        layer_index="hidden state j: 0 = embeddings, j = b+1 = after block b",
        data={"source": cfg.data, "n_samples": len(p.ctx.tokens),
              "n_truncated": p.ctx.tokens.n_truncated, "n_prompts": len(p.prompts)},
        notes=p.ctx.notes, timings=timer.seconds, finished=True))
    return result
