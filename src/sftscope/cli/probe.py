"""``sftscope probe``: logit-lens probing, layer by layer (one model, or a Base/SFT pair)."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app


@app.command()
def probe(
    data: str = typer.Option(..., help="Data: a registered name (gsm8k, mmlu, ...), NAME:FILE "
                             "for that format on a local file (answers known: gsm8k:, mmlu:), "
                             "or a .jsonl/.csv/.parquet/.txt file."),
    out: Path = typer.Option(..., help="Run folder for probe.csv and run.json."),
    model: str | None = typer.Option(None, help="One model to probe: local folder or hub id."),
    base: str | None = typer.Option(None, help="Base model of a pair (with --sft)."),
    sft: str | None = typer.Option(None, help="Fine-tuned model of a pair (with --base); the "
                                   "pair adds the per-layer top-1 agreement."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer: base, sft or a path (default: "
                                         "the model's; for a pair the base's, the SFT's with "
                                         "--chat-template)."),
    revision: str | None = typer.Option(None, help="Hub revision of --model."),
    base_revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    sft_revision: str | None = typer.Option(None, help="Hub revision of the SFT model."),
    max_length: int = typer.Option(512, help="Longest text in tokens (longer: truncated, "
                                   "counted)."),
    batch_size: int = typer.Option(8, help="Texts per forward pass."),
    n: int = typer.Option(100, help="Number of samples (seeded subsample)."),
    seed: int = typer.Option(0, help="Seed of the sample selection and bootstrap."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device, e.g. cpu, cuda, cuda:1, mps, auto."),
    device_map: str | None = typer.Option(None, help="accelerate device map ('auto' shards a "
                                          "model larger than one device)."),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat "
                                       "template."),
    text_field: str | None = typer.Option(None, help="Field holding the text (generic files)."),
    template: str | None = typer.Option(None, help="Python format string over record fields, "
                                        "e.g. 'Q: {question}\\nA: {answer}'."),
    split: str | None = typer.Option(None, help="Dataset split (hub datasets)."),
    level: float = typer.Option(0.95, help="Confidence level of the intervals."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for the loss intervals "
                                  "(0 = none)."),
) -> None:
    """Logit lens at every hidden state j = 0..L (0 = embeddings, j = b+1 = after block b; the
    lens applies the final norm and the LM head): next-token accuracy and loss over real
    tokens, answer-token probability and rank after the prompt (gsm8k:, mmlu:), MMLU choice
    accuracy and, for a pair, base/SFT top-1 agreement. Writes probe.csv and run.json."""
    from sftscope.experiments.lens import probe as run
    from sftscope.progress import say

    table = run(data=data, model=model, base=base, sft=sft, out=out, tokenizer=tokenizer,
                max_length=max_length, batch_size=batch_size, n=n, seed=seed, dtype=dtype,
                device=device, device_map=device_map, chat_template=chat_template,
                text_field=text_field, template=template, split=split, level=level,
                n_boot=bootstrap, revision=revision, base_revision=base_revision,
                sft_revision=sft_revision)
    say(f"wrote {out / 'probe.csv'} ({len(table)} rows) and {out / 'run.json'}")
