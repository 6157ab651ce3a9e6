"""``sftscope sweep``: segment LoRA over masks x seeds, resumable and shardable, with statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from sftscope.cli import app
from sftscope.cli.options import formats_option, split_formats
from sftscope.errors import SftscopeError


def parse_kv(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["rank=8", "mlp=true"]`` -> ``{"rank": 8, "mlp": True}`` (YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for p in pairs or []:
        key, sep, val = p.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SftscopeError(f"{flag} {p!r}: write KEY=VALUE, e.g. {flag} warmup_steps=10")
        try:
            out[key] = yaml.safe_load(val) if val.strip() else None
        except yaml.YAMLError:
            out[key] = val
    return out


@app.command()
def sweep(
    out: Path = typer.Option(..., help="Sweep folder: sweep.json, jobs/MASK-sSEED/, "
                             "summary.csv, position.csv, run.json."),
    model: str | None = typer.Option(None, help="Base model to tune: local folder or hub id "
                                     "(optional with --summarize-only)."),
    train: str | None = typer.Option(None, help="Training data: gsm8k, gsm8k:FILE, or a "
                                     ".jsonl/.csv/.parquet/.txt file."),
    eval_: str | None = typer.Option(None, "--eval", help="Evaluation: gsm8k, gsm8k:FILE, "
                                     "mmlu:FILE or perplexity:SOURCE."),
    segments: int = typer.Option(5, help="Equal depth segments K (masks have K characters, "
                                 "bottom segment first)."),
    masks: str = typer.Option("paper", help="Mask groups or masks, comma-separated: singles "
                              "(one segment each + full depth), paper (the paper's masks for "
                              "K = 3, 5, 10), all (every non-empty mask), or masks like "
                              "01000,01100. 11111 is always added (the p-values are against "
                              "it) unless --no-baseline."),
    seeds: str = typer.Option("3", help="A count (3 = seeds 0,1,2) or a comma list (0,5,7)."),
    baseline: bool = typer.Option(True, help="Add the full-depth mask if missing."),
    # tune options (passed through; unset = tune's default)
    rank: float | None = typer.Option(None, help="Full-depth LoRA rank (the equal budget)."),
    lr: float | None = typer.Option(None, help="Learning rate."),
    epochs: float | None = typer.Option(None, help="Training epochs."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps."),
    batch_size: int | None = typer.Option(None, help="Effective training batch size."),
    micro_batch_size: int | None = typer.Option(None, help="Per-device micro batch."),
    n_train: int | None = typer.Option(None, help="Training examples (seeded subsample)."),
    max_length: int | None = typer.Option(None, help="Longest training example in tokens "
                                          "(default: keep every example whole)."),
    preset: str | None = typer.Option(None, help="default, or reference (the research code's "
                                      "choices for tune and eval)."),
    mlp: bool | None = typer.Option(None, "--mlp/--no-mlp", help="LoRA on the MLP too."),
    rslora: bool | None = typer.Option(None, "--rslora/--no-rslora", help="rsLoRA scaling."),
    alpha_ratio: float | None = typer.Option(None, help="alpha / r (kept constant)."),
    dtype: str | None = typer.Option(None, help="auto, float32 or bfloat16."),
    chat_template: bool | None = typer.Option(None, "--chat-template/--no-chat-template",
                                              help="Wrap prompts in the chat template."),
    gradient_checkpointing: bool | None = typer.Option(
        None, "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Activation checkpointing (less memory)."),
    revision: str | None = typer.Option(None, help="Hub revision of the model."),
    tune_opt: list[str] | None = typer.Option(None, help="Any other tune option KEY=VALUE "
                                              "(repeatable), e.g. --tune-opt warmup_steps=10."),
    # evaluation options
    limit: int | None = typer.Option(None, help="Evaluate the first N items only."),
    shots: int | None = typer.Option(None, help="Few-shot examples (default: the task's)."),
    max_new_tokens: int | None = typer.Option(None, help="Generation length (GSM8K)."),
    eval_batch_size: int | None = typer.Option(None, help="Evaluation batch size."),
    fewshot_data: str | None = typer.Option(None, help="Where shots come from (default: the "
                                            "train split / the evaluated file)."),
    eval_opt: list[str] | None = typer.Option(None, help="Any other eval option KEY=VALUE "
                                              "(repeatable)."),
    # sweep control
    metric: str | None = typer.Option(None, help="Metric for ranking and validation (default: "
                                      "exact_match_flexible for GSM8K, accuracy for MMLU)."),
    job_index: int = typer.Option(0, envvar="SFTSCOPE_JOB_INDEX", help="This process runs "
                                  "jobs I, I+N, I+2N, ... (one process per GPU)."),
    num_jobs: int = typer.Option(1, envvar="SFTSCOPE_NUM_JOBS", help="Number of processes N "
                                 "sharing the job list."),
    summarize_only: bool = typer.Option(False, help="Run no job: merge the finished jobs into "
                                        "summary.csv and position.csv."),
    validate_suggest: bool = typer.Option(False, help="Also run `suggest` (angular, gradient, "
                                          "pair with --sft, combined) and report where each "
                                          "proposal ranks among the swept masks."),
    sft: str | None = typer.Option(None, help="An SFT model of the same base, for the pair "
                                   "method of --validate-suggest."),
    suggest_opt: list[str] | None = typer.Option(None, help="suggest option KEY=VALUE for "
                                                 "--validate-suggest (repeatable), e.g. "
                                                 "--suggest-opt max_active=3."),
    level: float = typer.Option(0.95, help="Confidence level of the intervals."),
    n_boot: int = typer.Option(2000, help="Bootstrap replicates of the seed x item CI."),
    formats: str = formats_option(),
) -> None:
    """Tune (equal-budget segment LoRA) and evaluate every mask x seed, each a resumable job in
    OUT/jobs/MASK-sSEED/; then write summary.csv (mean and CI over seeds and items, p-value
    paired against 11111) and position.csv (one-segment masks by depth).

    Run the same command again to resume: finished jobs are never repeated, an unfinished one
    continues from its last checkpoint. A folder made with other settings is refused.

    Several GPUs: one process per device, then merge:

    `CUDA_VISIBLE_DEVICES=0 sftscope sweep ... --job-index 0 --num-jobs 4 &`

    `...`

    `CUDA_VISIBLE_DEVICES=3 sftscope sweep ... --job-index 3 --num-jobs 4 &`

    `wait; sftscope sweep ... --summarize-only`
    """
    from sftscope.experiments.sweep import SweepConfig, run_sweep
    from sftscope.progress import say

    tune = {k: v for k, v in dict(
        rank=rank, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        micro_batch_size=micro_batch_size, n_train=n_train, max_length=max_length,
        preset=preset, mlp=mlp, rslora=rslora, alpha_ratio=alpha_ratio, dtype=dtype,
        chat_template=chat_template, gradient_checkpointing=gradient_checkpointing,
        revision=revision).items() if v is not None}
    tune.update(parse_kv(tune_opt, "--tune-opt"))
    evaluation = {k: v for k, v in dict(
        limit=limit, shots=shots, max_new_tokens=max_new_tokens, batch_size=eval_batch_size,
        fewshot_data=fewshot_data).items() if v is not None}
    evaluation.update(parse_kv(eval_opt, "--eval-opt"))
    cfg = SweepConfig(
        out=str(out), model=model, train=train, eval=eval_, segments=segments, masks=masks,
        seeds=seeds, tune=tune, evaluation=evaluation, metric=metric, baseline=baseline,
        job_index=job_index, num_jobs=num_jobs, summarize_only=summarize_only,
        validate_suggest=validate_suggest, sft=sft,
        suggest=parse_kv(suggest_opt, "--suggest-opt"), level=level, n_boot=n_boot,
        formats=split_formats(formats))
    res = run_sweep(cfg)
    if not res.summary.empty:
        m = res.primary_metric
        sub = res.summary[res.summary["metric"] == m] if m else res.summary
        for r in sub.itertuples(index=False):
            p = "" if r.p_value != r.p_value else f", p={r.p_value:.3g} vs full depth"
            say(f"  {r.mask}  {r.metric} {r.mean:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}] "
                f"({r.seeds} seed(s) x {r.n_items} items{p})")
    if res.validation is not None:
        for r in res.validation.itertuples(index=False):
            where = (f"rank {int(r.rank)} of {r.n_masks}" if r.in_sweep
                     else "not among the swept masks")
            say(f"  suggest {r.method}: {r.mask} -> {where} (best {r.best_mask} "
                f"{r.best_score:.4f})")
    if res.written:
        say(f"wrote {out / 'summary.csv'} and {out / 'position.csv'}")
