"""``sftscope tune``: segment (Mid-Block) LoRA at an equal parameter budget."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app


@app.command()
def tune(
    model: str = typer.Option(..., help="Base model: local folder or hub id."),
    train: str = typer.Option(..., help="Training data: gsm8k (hub), gsm8k:FILE.jsonl (GSM8K "
                              "fields question/answer), or a .jsonl/.csv/.txt file of text."),
    out: Path = typer.Option(..., help="Run folder: adapter/, run.json, checkpoints/, scores."),
    mask: str | None = typer.Option(None, help="Segments to adapt, bottom segment first, e.g. "
                                    "01000 (second fifth). Or use --blocks."),
    segments: int | None = typer.Option(None, help="Number of segments (default: the mask's "
                                        "length; a mask of another length is an error)."),
    blocks: str | None = typer.Option(None, help="Explicit 0-based blocks instead of a mask, "
                                      "e.g. 6-11,14."),
    rank: float = typer.Option(64, help="Full-depth LoRA rank (the budget): m of L blocks get "
                               "rank round(rank*L/m)."),
    alpha_ratio: float = typer.Option(2.0, help="alpha = ratio x rank (constant alpha/r)."),
    alpha: float | None = typer.Option(None, help="Fixed alpha for every mask (the research "
                                       "code's 128; overrides --alpha-ratio)."),
    rslora: bool = typer.Option(False, help="Rank-stabilised scale alpha/sqrt(r), alpha = "
                                "ratio x sqrt(full rank)."),
    mlp: bool = typer.Option(False, help="Adapt the MLP projections too (default attention "
                             "q, k, v, o only)."),
    dropout: float = typer.Option(0.05, help="LoRA dropout."),
    lr: float = typer.Option(1e-4, help="Learning rate (AdamW, linear decay)."),
    epochs: float = typer.Option(1.0, help="Epochs over the training examples."),
    max_steps: int | None = typer.Option(None, help="Stop after this many optimizer steps."),
    batch_size: int = typer.Option(32, help="Effective batch (micro batch x accumulation x "
                                   "processes)."),
    micro_batch_size: int = typer.Option(8, help="Examples per forward pass per device."),
    warmup_steps: float = typer.Option(0, help="Warm-up steps (a value < 1 is a ratio)."),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
    max_length: int | None = typer.Option(None, help="Truncate examples to this many tokens "
                                          "(default: keep every example whole; counted)."),
    completion_only: bool = typer.Option(True, help="Loss on the answer only (prompt tokens "
                                         "masked); --no-completion-only trains on all text."),
    chat_template: bool = typer.Option(False, help="Format prompts with the tokenizer's chat "
                                       "template."),
    n_train: int = typer.Option(2000, help="Training examples (seeded subsample; 0 = all)."),
    data_seed: int = typer.Option(0, help="Seed of the training subsample."),
    train_split: str = typer.Option("train", help="Split of a hub dataset."),
    text_field: str | None = typer.Option(None, help="Field holding the text (generic files)."),
    seed: int = typer.Option(0, help="Seed of LoRA init, data order and dropout."),
    dtype: str = typer.Option("auto", help="auto (bf16 on a bf16 GPU, else fp32), bfloat16, "
                              "float32."),
    gradient_checkpointing: bool = typer.Option(False, help="Non-reentrant activation "
                                                "checkpointing (no forced input gradients)."),
    save_steps: int = typer.Option(100, help="Checkpoint every N steps (for --resume)."),
    keep_checkpoints: bool = typer.Option(False, help="Keep RUN/checkpoints after success."),
    logging_steps: int = typer.Option(10, help="Log the loss every N steps."),
    resume: bool = typer.Option(False, help="Continue a killed run from its last checkpoint "
                                "(a finished run is reused)."),
    report_to: str = typer.Option("none", help="none, tensorboard or wandb."),
    revision: str | None = typer.Option(None, help="Hub revision of the model."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer folder/id (default: the model)."),
    preset: str = typer.Option("default", help="default, or reference: the research code "
                               "(alpha 128, 128-token truncation, loss on the whole text, 0-shot "
                               "eval with 64 new tokens on 100 items)."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the evaluation at the end."),
    eval_task: str | None = typer.Option(None, help="Evaluate after training: gsm8k, "
                                         "gsm8k:FILE, mmlu:FILE or perplexity:SOURCE "
                                         "(default gsm8k when training on hub gsm8k)."),
    eval_limit: int | None = typer.Option(None, help="Evaluate the first N items only."),
    eval_shots: int | None = typer.Option(None, help="Few-shot examples (default: gsm8k 5, "
                                          "mmlu 0)."),
    fewshot_data: str | None = typer.Option(None, help="Shot pool for the evaluation (a local "
                                            "file in the task's fields)."),
    eval_max_new_tokens: int = typer.Option(256, help="Generation budget of the evaluation."),
    eval_batch_size: int = typer.Option(16, help="Prompts per generate call."),
) -> None:
    """Train LoRA on the blocks a mask selects at the full-depth parameter budget, save
    RUN/adapter (PEFT) and RUN/run.json, then evaluate.

    Several GPUs: `accelerate launch -m sftscope tune ...` (or `accelerate launch --no_python
    sftscope tune ...`); Trainer runs DDP, FSDP or DeepSpeed from accelerate's config, and
    --batch-size stays the effective batch over all processes.
    """
    from sftscope.experiments.tune import TuneConfig, is_main_process
    from sftscope.experiments.tune import tune as run
    from sftscope.progress import say

    cfg = TuneConfig(
        model=model, train=train, out=str(out), mask=mask, segments=segments, blocks=blocks,
        rank=rank, alpha_ratio=alpha_ratio, alpha=alpha, rslora=rslora, mlp=mlp,
        dropout=dropout, lr=lr, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        micro_batch_size=micro_batch_size, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_length=max_length, completion_only=completion_only,
        chat_template=chat_template, n_train=n_train or None, data_seed=data_seed,
        train_split=train_split, text_field=text_field, seed=seed, dtype=dtype,
        gradient_checkpointing=gradient_checkpointing, save_steps=save_steps,
        keep_checkpoints=keep_checkpoints, logging_steps=logging_steps, resume=resume,
        report_to=report_to, revision=revision, tokenizer=tokenizer, preset=preset,
        run_eval=not no_eval, eval_task=eval_task, eval_limit=eval_limit,
        eval_shots=eval_shots, eval_fewshot_data=fewshot_data,
        eval_max_new_tokens=eval_max_new_tokens, eval_batch_size=eval_batch_size,
    )
    res = run(cfg)
    if is_main_process():
        say(f"wrote {res.adapter_dir} ({res.trainable_params:,} trainable parameters, rank "
            f"{res.rank}, {res.steps} steps) and {Path(res.out) / 'run.json'}")
