"""``sftscope weights``: per-module weight change of an SFT checkpoint or a LoRA adapter."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app
from sftscope.cli.options import split_formats


@app.command()
def weights(
    base: str | None = typer.Option(None, help="Base model: local folder or hub id (optional "
                                    "with --adapter: it adds the relative rows)."),
    sft: str | None = typer.Option(None, help="Fine-tuned model: local folder or hub id."),
    adapter: str | None = typer.Option(None, help="PEFT LoRA folder (adapter_config.json + "
                                       "adapter_model.safetensors), instead of --sft."),
    out: Path = typer.Option(..., help="Run folder for weights.csv and run.json."),
    low_rank: bool = typer.Option(True, "--low-rank/--no-low-rank", help="Also measure how "
                                  "low-rank each module's change is (SVD); off = pure streaming."),
    top_k: int = typer.Option(8, help="Largest singular values reported per module (sv1..svK)."),
    max_rank: int = typer.Option(64, help="Rank of the randomized SVD for matrices larger than "
                                 "--exact-max on their smaller side."),
    exact_max: int = typer.Option(512, help="Exact SVD when the smaller side is at most this."),
    device: str = typer.Option("cpu", help="Device for the SVDs, e.g. cpu, cuda."),
    formats: str = typer.Option("csv", "--formats", "--format",
                                help="Table formats, comma-separated: csv, parquet, json."),
) -> None:
    """Weight change per block and module (Base vs SFT, or a LoRA adapter).

    Streams both checkpoints tensor by tensor (never a whole model in memory) and writes
    weights.csv: block = decoder block (0-based), module = q/k/v/o, MLP projections, attn (all
    attention projections), embed, final_norm, lm_head, ...; metric = frobenius, relative, and
    the low-rank metrics (sv1.., effective_rank, energy_rank90, ...)."""
    fmts = split_formats(formats)
    from sftscope.experiments.weights import run_weights
    from sftscope.progress import say

    table = run_weights(out, base, sft, adapter, low_rank=low_rank, top_k=top_k, device=device,
                        max_rank=max_rank, exact_max=exact_max, formats=fmts)
    names = ", ".join(str(out / f"weights.{f}") for f in fmts)
    say(f"wrote {names} ({len(table)} rows) and {out / 'run.json'}")
