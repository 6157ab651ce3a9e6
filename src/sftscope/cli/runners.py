"""What each command does once its config is valid: call the Python API, print a summary.

Thin by design: every computation lives in ``sftscope.experiments``; heavy imports happen here,
inside the functions, after validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftscope.config import commands as C


def _say(msg: str) -> None:
    from sftscope.progress import say

    say(msg)


def analyze(cfg: C.AnalyzeConfig) -> None:
    from sftscope.experiments.analyze import analyze as run

    table = run(cfg)
    _say(f"wrote {Path(cfg.out) / 'metrics.csv'} ({len(table)} rows) and "
         f"{Path(cfg.out) / 'run.json'}")


def weights(cfg: C.WeightsConfig) -> None:
    from sftscope.experiments.weights import run_weights

    table = run_weights(cfg)
    names = ", ".join(str(Path(cfg.out) / f"weights.{f}") for f in cfg.formats)
    _say(f"wrote {names} ({len(table)} rows) and {Path(cfg.out) / 'run.json'}")


def probe(cfg: C.ProbeConfig) -> None:
    from sftscope.experiments.lens import probe as run

    table = run(cfg)
    top = table.attrs.get("top1")
    _say(f"wrote {Path(cfg.out) / 'probe.csv'} ({len(table)} rows)"
         + (f", {Path(cfg.out) / 'top1.csv'}" if top is not None else "")
         + f" and {Path(cfg.out) / 'run.json'}")


def _wrote(out: str, name: str, table) -> None:
    """Name the table and run.json written to ``out`` (on the command line there is always a
    run folder: ``--out`` or its default)."""
    _say(f"wrote {Path(out) / f'{name}.csv'} ({len(table)} rows) and {Path(out) / 'run.json'}")


def swap(cfg: C.SwapConfig) -> None:
    from sftscope.experiments.swap import swap as run

    _wrote(cfg.out, "swap", run(cfg))


def ablate(cfg: C.AblateConfig) -> None:
    from sftscope.experiments.ablate import ablate as run

    _wrote(cfg.out, "ablate", run(cfg))


def tune(cfg: C.TuneConfig) -> None:
    from sftscope.experiments.tune import is_main_process
    from sftscope.experiments.tune import tune as run

    res = run(cfg)
    if is_main_process():
        what = f"rank {res.rank}, " if res.method == "lora" else "full fine-tuning, "
        extra = f", {Path(res.out) / 'dynamics.csv'}" if (res.dynamics or {}).get("file") else ""
        _say(f"wrote {res.output_dir} ({res.trainable_params:,} trainable parameters, {what}"
             f"{res.steps} steps){extra} and {Path(res.out) / 'run.json'}")


def evaluate(cfg: C.EvalConfig) -> None:
    from sftscope.experiments.evaluate import evaluate as run
    from sftscope.experiments.evaluate import format_scores

    res = run(cfg)
    print(format_scores(res))
    _say(f"wrote {Path(cfg.out) / 'scores.csv'}, {res.predictions_path} and "
         f"{Path(cfg.out) / 'run.json'}")


def sweep(cfg: C.SweepConfig) -> None:
    from sftscope.experiments.sweep import run_sweep

    res = run_sweep(cfg)
    if res.written and not res.summary.empty:  # a shard that leaves them to --collect: silent
        m = res.primary_metric
        sub = res.summary[res.summary["metric"] == m] if m else res.summary
        for r in sub.itertuples(index=False):
            p = "" if r.p_value != r.p_value else f", p={r.p_value:.3g} vs full depth"
            _say(f"  {r.mask}  {r.metric} {r.mean:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}] "
                 f"({r.seeds} seed(s) x {r.n_items} items{p})")
    if res.validation is not None:
        for r in res.validation.itertuples(index=False):
            where = (f"rank {int(r.rank)} of {r.n_masks}" if r.in_sweep
                     else "not among the swept masks")
            _say(f"  suggest {r.method}: {r.mask} -> {where} (best {r.best_mask} "
                 f"{r.best_score:.4f})")
    if res.written:
        _say(f"wrote {Path(cfg.out) / 'summary.csv'} and {Path(cfg.out) / 'position.csv'}")


def suggest(cfg: C.SuggestConfig) -> None:
    from sftscope.experiments.suggest import suggest as run

    res = run(cfg)
    for m in res.proposals.values():
        sc = res.method_scores(m.method).sort_values("segment")
        prof = " ".join(f"{v:.2f}" for v in sc["score"])
        _say(f"  {m.method:9s} {m.mask}  segment scores (bottom first): {prof}")
    _say(f"[bold]suggested mask {res.mask}[/] ({res.method})")
    _say(f"reason: {res.reason}")
    _say(f"wrote {Path(cfg.out) / 'suggest.json'}, {Path(cfg.out) / 'suggest.csv'} and "
         f"{Path(cfg.out) / 'run.json'}")


def steer(cfg: C.SteerConfig) -> None:
    from sftscope.experiments.steer import steer as run
    from sftscope.segments import block_text

    res = run(cfg)
    _say(f"steered hidden state(s) {block_text(res.layers)}")
    for r in res.table.itertuples(index=False):
        _say(f"  scale {r.scale:g}  {r.metric} {r.value:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}] "
             f"(n={r.n})")
    files = ", ".join(str(Path(cfg.out) / f"steer.{f}") for f in cfg.formats)
    if res.completions_path:
        files += f", {res.completions_path}"
    _say(f"wrote {files} and {Path(cfg.out) / 'run.json'}")


def report(cfg: C.ReportConfig) -> None:
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    from sftscope.report import build_report

    path = build_report(list(cfg.runs), out=cfg.out, formats=cfg.figure_formats,
                        figures_dir=cfg.figures_dir, title=cfg.title)
    figdir = cfg.figures_dir if cfg.figures_dir is not None else path.parent / "figures"
    _say(f"report: {path}")
    _say(f"figures and tables: {figdir}")


def demo(cfg: C.DemoConfig) -> None:
    from sftscope.demo.run import run_demo, time_summary

    res = run_demo(cfg)
    _say("where the time went:\n" + time_summary(res))
    for p in res.patterns:
        mark = {True: "shows", False: "does not show", None: "cannot tell"}.get(
            p.get("holds"), str(p.get("verdict", "")))
        _say(f"  {mark:>13}: {p['pattern']} ({p['evidence']})")
    if res.report:
        _say(f"report: {res.report}")


def data(cfg: C.DataConfig) -> None:
    from sftscope.demo.tasksets import items, run_data

    for name, files in run_data(cfg).items():
        for path in files.values():
            _say(f"wrote {path} ({items(path)} items)" + (f"; use it as {name}:{path}"
                                                 if name in ("gsm8k", "mmlu") else ""))
    _say(f"and {Path(cfg.out) / 'run.json'}")


# name -> (config class, runner, help)
COMMANDS: dict[str, tuple[type, Any, str]] = {
    "analyze": (C.AnalyzeConfig, analyze, """Every layer-wise metric of a Base/SFT pair.

Streams both models over the data (one forward pass per batch, hooks on every block, base then
SFT) and writes metrics.csv, correlation.csv and run.json. layer = hidden state j (0 =
embeddings, j = b+1 = after block b, before the final norm). An interrupted run resumes;
captured states are cached for re-analysis."""),
    "weights": (C.WeightsConfig, weights, """Weight change per block and module.

Base vs SFT, or a LoRA adapter.

Streams both checkpoints tensor by tensor (never a whole model in memory) and writes
weights.csv: block = decoder block (0-based), module = q/k/v/o, MLP projections, attn, embed,
final_norm, lm_head, ...; metric = frobenius, relative and the low-rank metrics (sv1..,
effective_rank, energy_rank90, ...)."""),
    "probe": (C.ProbeConfig, probe, """Logit lens at every hidden state j = 0..L.

The lens applies the final norm and the LM head: next-token accuracy and loss over real tokens
(--tokens answer: over the answers' tokens only, far faster on a large vocabulary), answer
probability and rank (mmlu: the letter after the prompt; gsm8k: the final answer after ####,
given the prompt and the reasoning), MMLU choice accuracy and, for a pair, base/SFT top-1
agreement; sample-level bootstrap intervals. Writes probe.csv and run.json."""),
    "swap": (C.SwapConfig, swap, """Swap the blocks of each segment between base and SFT.

Module references, no copies; both directions; embeddings stay with the host, final norm and
head from --head. Every hybrid and both originals are evaluated: token accuracy, loss,
perplexity, MMLU choice accuracy. Writes swap.csv and run.json."""),
    "ablate": (C.AblateConfig, ablate, """Which blocks matter, causally: ablate each block
(or each of --segments K) and score.

One model (--model): each unit in turn passes its input through (--mode zero) or adds its mean
update over the data instead of its own (--mode mean). A pair (--base/--sft): each unit of the
SFT is reverted to the base's blocks. Scored as swap scores (token accuracy, loss, perplexity,
MMLU choice accuracy) with delta_accuracy and delta_loss against the unablated model and paired
sample-level bootstrap intervals. Writes ablate.csv and run.json."""),
    "tune": (C.TuneConfig, tune, """Segment (Mid-Block) LoRA at the full-depth budget, or full
fine-tuning of chosen blocks.

--method lora (default) trains LoRA on the blocks a mask selects and saves RUN/adapter (PEFT);
--method full trains every weight of those blocks (embeddings, head and the other blocks
frozen, no backward pass below the lowest trained block) and saves RUN/model, an ordinary
Hugging Face folder with its tokenizer. The research code's frozen-bottom runs (freeze the
bottom floor(L*ratio) blocks, train the rest) are --method full with a mask such as 00111
(ratio 2/5; a mask 0..01..1 of K segments freezes exactly floor(L*a/K) blocks) or --blocks
8-31 for any split. Every run records RUN/dynamics.csv (per block and module: gradient norm
and the norm of the weight change since step 0, every --dynamics-every steps) and RUN/run.json,
then evaluates.

Several GPUs: `accelerate launch -m sftscope tune ...`; the Trainer runs DDP, FSDP or DeepSpeed
from accelerate's config, and --batch-size stays the effective batch over all processes. Full
fine-tuning of a large model: FSDP with fsdp_use_orig_params: true (or fsdp_version: 2) and
fsdp_state_dict_type: FULL_STATE_DICT, or DeepSpeed ZeRO-3 with zero3_save_16bit_model: true,
so that RUN/model is one ordinary folder (dynamics are recorded under DDP and FSDP)."""),
    "eval": (C.EvalConfig, evaluate, """Score a model (optionally with a LoRA adapter) on a task.

GSM8K as lm-evaluation-harness scores it, MMLU by log-likelihood, perplexity retention. Every
score has its item count and a confidence interval (Wilson for accuracies, Student t for
losses)."""),
    "sweep": (C.SweepConfig, sweep, """Tune and evaluate every mask x seed, with statistics.

Each job is a resumable folder OUT/jobs/MASK-sSEED/; then summary.csv (mean and CI over seeds
and items, p-value paired against 11111) and position.csv (one-segment masks by depth). Run the
same command again to resume; a folder made with other settings is refused. Several GPUs or
nodes: one process (or accelerate launch) per shard with --job-index I --num-jobs N writing to
one shared folder, then --collect (docs/cluster.md). Any tune flag
(--rank, --lr, ...) and eval flag (--eval-limit, ...) passes through to every job."""),
    "suggest": (C.SuggestConfig, suggest, """Propose a LoRA mask before any training.

With the reason.

Signals computed without training: pair (where an SFT model changed the base, per segment),
angular (how much each base block turns the hidden state), gradient (task-loss gradient of the
attention projections), combined (rank average). Edge segments are proposed only on an
overwhelming signal. Check a proposal with `sftscope sweep ... --validate-suggest`."""),
    "steer": (C.SteerConfig, steer, """Steer the base model along the base->SFT shift at --layers.

The vector at each hidden state j of --layers (2, or a list such as 6-11,14; 0 = embeddings,
j = b+1 = output of block b) is the mean over --data of SFT minus base pooled states
(--direction mean) or the top principal component of the per-sample differences (pc1). Each
--scales value s adds s times each layer's vector to the base model's residual stream there,
all layers in one forward pass (s = 0 is the unsteered base, exactly), then scores --task
and/or generates on prompts (--generate). Writes steer.csv, steer_items.csv (every item's
score per scale, for paired comparisons), steer.jsonl, the vectors and run.json."""),
    "report": (C.ReportConfig, report, """One self-contained HTML report of run folders.

The paper's figures for whatever the runs hold, with tables, findings and a checklist of the
paper's patterns, each verdict with its rule and numbers; needs no network."""),
    "demo": (C.DemoConfig, demo, """The whole pipeline offline on a CPU, ending in a report.

Trains a small Base model on a generated corpus and fine-tunes a copy (the SFT model), both
saved as ordinary Hugging Face folders, then runs analyze, weights, probe, swap and a mask sweep
on the pair and writes one HTML report. A second run reuses the pair and finished work."""),
    "data": (C.DataConfig, data, """Write generated task sets offline (no hub needed).

NAME... (default all): word problems from the demo generator in three formats: gsm8k
(train.jsonl, test.jsonl), mmlu (dev.jsonl, test.jsonl), preference (train.jsonl,
test.jsonl: prompt, chosen, rejected), each in OUT/NAME/. Test questions appear in no train
record, and no addition or subtraction a test problem needs appears in one. Use them as
--train gsm8k:OUT/gsm8k/train.jsonl, --data gsm8k:OUT/gsm8k/test.jsonl,
--task mmlu:OUT/mmlu/test.jsonl."""),
}
