"""``sftscope analyze``: layer-wise metrics of a Base/SFT pair."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app
from sftscope.cli.options import formats_option, split_formats


@app.command()
def analyze(
    base: str = typer.Option(..., help="Base model: local folder or hub id."),
    sft: str = typer.Option(..., help="Fine-tuned model: local folder or hub id."),
    data: str = typer.Option(..., help="Data: a registered name (gsm8k, mmlu, wikitext, ifeval, "
                             "humaneval, mt_bench, toxigen), NAME:FILE for that format on a "
                             "local file, or a .jsonl/.csv/.parquet/.txt file."),
    out: Path = typer.Option(..., help="Run folder for metrics.csv, correlation.csv, run.json."),
    base_revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    sft_revision: str | None = typer.Option(None, help="Hub revision of the SFT model."),
    tokenizer: str = typer.Option("base", help="Tokenizer both models see: base, sft or a path."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("cpu", help="Device, e.g. cpu, cuda, cuda:1, mps."),
    device_map: str | None = typer.Option(None, help="accelerate device map ('auto' shards a "
                                          "model larger than one device)."),
    n_token: int = typer.Option(100, help="Samples for token-level metrics (prompt entropy, "
                                "sparsity, curvature)."),
    n_pooled: int = typer.Option(1000, help="Samples for pooled (dataset-level) metrics."),
    max_length: int = typer.Option(512, help="Longest text in tokens (longer: truncated, "
                                   "counted)."),
    batch_size: int = typer.Option(8, help="Texts per forward pass."),
    seed: int = typer.Option(0, help="Seed of the sample selection and bootstrap."),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat "
                                       "template."),
    text_field: str | None = typer.Option(None, help="Field holding the text (generic files)."),
    template: str | None = typer.Option(None, help="Python format string over record fields, "
                                        "e.g. 'Q: {question}\\nA: {answer}'."),
    split: str | None = typer.Option(None, help="Dataset split (hub datasets)."),
    preset: str = typer.Option("default", help="default, or reference (the authors' research "
                               "code choices, METRICS.md)."),
    alpha: float = typer.Option(1.0, help="Order of the matrix alpha-entropy."),
    normalisation: str = typer.Option("max", help="Entropy normalisation: max, logN, logD, raw."),
    pooling: str = typer.Option("mean", help="Pooled vector per sample: mean or last token."),
    cka_unbiased: bool = typer.Option(False, help="Debiased (unbiased HSIC) CKA."),
    bootstrap: int = typer.Option(0, help="Bootstrap resamples for per-layer CIs (0 = off)."),
    cache_dir: Path | None = typer.Option(None, help="Where captured states are cached "
                                          "(default $SFTSCOPE_CACHE or ~/.cache/sftscope)."),
    formats: str = formats_option(),
) -> None:
    """Stream both models over the data (one forward pass per batch, hooks on every block) and
    write every layer-wise metric: layer = hidden state j (0 = embeddings, j = b+1 = after block
    b). Interrupted runs resume; captured states are cached for re-analysis."""
    from sftscope.experiments.analyze import AnalyzeConfig
    from sftscope.experiments.analyze import analyze as run
    from sftscope.progress import say

    cfg = AnalyzeConfig(
        base=base, sft=sft, data=data, out=str(out), base_revision=base_revision,
        sft_revision=sft_revision, tokenizer=tokenizer, dtype=dtype, device=device,
        device_map=device_map, n_token=n_token, n_pooled=n_pooled, max_length=max_length,
        batch_size=batch_size, seed=seed, chat_template=chat_template, text_field=text_field,
        template=template, split=split, preset=preset, alpha=alpha, normalisation=normalisation,
        pooling=pooling, cka_unbiased=cka_unbiased, bootstrap=bootstrap,
        cache_dir=str(cache_dir) if cache_dir else None, formats=split_formats(formats),
    )
    table = run(cfg)
    say(f"wrote {out / 'metrics.csv'} ({len(table)} rows) and {out / 'run.json'}")
