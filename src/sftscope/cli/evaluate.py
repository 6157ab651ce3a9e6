"""``sftscope eval``: GSM8K, MMLU or perplexity of a model, with or without a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., help="Base model: local folder or hub id."),
    task: str = typer.Option("gsm8k", help="gsm8k (generation, strict + flexible exact match), "
                             "mmlu (log-likelihood of A-D) or perplexity (token loss, adapter "
                             "off vs on)."),
    data: str | None = typer.Option(None, help="Items: the hub dataset (default), NAME:FILE or a "
                                    "local FILE in the task's fields; perplexity: any text "
                                    "source (default wikitext)."),
    out: Path | None = typer.Option(None, help="Run folder for scores.csv, "
                                    "predictions-TASK.jsonl and run.json."),
    adapter: str | None = typer.Option(None, help="LoRA adapter folder (RUN/adapter of a tune "
                                       "run, or the run folder)."),
    split: str | None = typer.Option(None, help="Split of a hub dataset (default test)."),
    shots: int | None = typer.Option(None, help="Few-shot examples (default gsm8k 5, mmlu 0)."),
    fewshot_data: str | None = typer.Option(None, help="Shot pool: a local file in the task's "
                                            "fields (default: the hub train/dev split, or the "
                                            "same local file without the item itself)."),
    train_data: str | None = typer.Option(None, help="Alias of --fewshot-data."),
    fewshot_seed: int = typer.Option(1234, help="Seed of the shot draws (lm-eval: 1234)."),
    limit: int | None = typer.Option(None, help="Evaluate the first N items only."),
    max_new_tokens: int = typer.Option(256, help="Generation budget per item."),
    batch_size: int = typer.Option(16, help="Prompts per batch (left-padded generation)."),
    max_length: int = typer.Option(1024, help="Perplexity: longest text in tokens."),
    text_field: str | None = typer.Option(None, help="Perplexity: field holding the text."),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the chat template."),
    dtype: str = typer.Option("auto", help="auto (bf16 on a bf16 GPU, else fp32), bfloat16, "
                              "float32."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    device_map: str | None = typer.Option(None, help="accelerate device map ('auto' shards a "
                                          "large model)."),
    revision: str | None = typer.Option(None, help="Hub revision of the model."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer folder/id (default: the model)."),
    level: float = typer.Option(0.95, help="Confidence level of the intervals."),
    allow_other_base: bool = typer.Option(False, help="Load an adapter recorded for another "
                                          "base of the same shapes."),
    preset: str = typer.Option("default", help="default, or reference (0-shot, 64 new tokens, "
                               "100 items)."),
) -> None:
    """Score a model on a task; every score has its item count and a confidence interval
    (Wilson for accuracies, Student t for losses)."""
    from sftscope.errors import SftscopeError
    from sftscope.experiments.evaluate import EvalConfig, evaluate, format_scores
    from sftscope.progress import say

    if fewshot_data and train_data and fewshot_data != train_data:
        raise SftscopeError("--fewshot-data and --train-data name the same thing; give one")
    cfg = EvalConfig(
        model=model, task=task, data=data, out=str(out) if out else None, adapter=adapter,
        split=split, shots=shots, fewshot_data=fewshot_data or train_data,
        fewshot_seed=fewshot_seed, limit=limit, max_new_tokens=max_new_tokens,
        batch_size=batch_size, max_length=max_length, text_field=text_field,
        chat_template=chat_template, dtype=dtype, device=device, device_map=device_map,
        revision=revision, tokenizer=tokenizer, level=level, allow_other_base=allow_other_base,
        preset=preset,
    )
    res = evaluate(cfg)
    print(format_scores(res))
    if out:
        say(f"wrote {out / 'scores.csv'}, {res.predictions_path} and {out / 'run.json'}")
