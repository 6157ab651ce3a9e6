"""``sftscope swap``: evaluate Base/SFT hybrids built by exchanging segments of blocks."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app


@app.command()
def swap(
    base: str = typer.Option(..., help="Base model: local folder or hub id."),
    sft: str = typer.Option(..., help="Fine-tuned model: local folder or hub id."),
    data: str = typer.Option(..., help="Data: a registered name, NAME:FILE (mmlu: adds choice "
                             "accuracy), or a .jsonl/.csv/.parquet/.txt file."),
    out: Path = typer.Option(..., help="Run folder for swap.csv and run.json."),
    segments: int = typer.Option(5, help="Number of equal depth segments K."),
    masks: str | None = typer.Option(None, help="Extra masks besides the K one-segment masks: "
                                     "01000,00110 (bottom segment first), or paper, all."),
    head: str = typer.Option("base", help="Final norm and LM head of every hybrid: base or sft."),
    directions: str = typer.Option("both", help="both, sft-into-base or base-into-sft."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer: base, sft or a path (default: "
                                         "base's; the SFT's with --chat-template)."),
    base_revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    sft_revision: str | None = typer.Option(None, help="Hub revision of the SFT model."),
    max_length: int = typer.Option(512, help="Longest text in tokens (longer: truncated, "
                                   "counted)."),
    batch_size: int = typer.Option(8, help="Texts per forward pass."),
    n: int = typer.Option(100, help="Number of samples (seeded subsample)."),
    seed: int = typer.Option(0, help="Seed of the sample selection and bootstrap."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device, e.g. cpu, cuda, cuda:1, mps, auto."),
    device_map: str | None = typer.Option(None, help="accelerate device map (both models must "
                                          "place each block on the same device)."),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat "
                                       "template."),
    text_field: str | None = typer.Option(None, help="Field holding the text (generic files)."),
    template: str | None = typer.Option(None, help="Python format string over record fields."),
    split: str | None = typer.Option(None, help="Dataset split (hub datasets)."),
    level: float = typer.Option(0.95, help="Confidence level of the intervals."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the loss intervals "
                                  "(0 = none)."),
) -> None:
    """Swap the blocks of each segment between base and SFT (module references, no copies; both
    directions; embeddings stay with the host, final norm and head from --head) and evaluate
    every hybrid and both originals: token accuracy, loss, perplexity, MMLU choice accuracy.
    Writes swap.csv and run.json."""
    from sftscope.experiments.swap import swap as run
    from sftscope.progress import say

    table = run(base=base, sft=sft, data=data, out=out, segments=segments, masks=masks,
                head=head, directions=directions, tokenizer=tokenizer, max_length=max_length,
                batch_size=batch_size, n=n, seed=seed, dtype=dtype, device=device,
                device_map=device_map, chat_template=chat_template, text_field=text_field,
                template=template, split=split, level=level, n_boot=bootstrap,
                base_revision=base_revision, sft_revision=sft_revision)
    say(f"wrote {out / 'swap.csv'} ({len(table)} rows) and {out / 'run.json'}")
