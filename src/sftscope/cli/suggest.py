"""``sftscope suggest``: propose a LoRA mask before any training, with the reason."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app
from sftscope.cli.options import formats_option, split_formats


@app.command()
def suggest(
    base: str = typer.Option(..., help="Base model: local folder or hub id."),
    data: str = typer.Option(..., help="Task data: gsm8k, gsm8k:FILE, or a .jsonl/.csv/"
                             ".parquet/.txt file (prompt/answer fields give completion-only "
                             "gradients)."),
    out: Path | None = typer.Option(None, help="Folder for suggest.json, suggest.csv, "
                                    "run.json (optional)."),
    sft: str | None = typer.Option(None, help="A fine-tuned version of the base: enables the "
                                   "pair method."),
    segments: int = typer.Option(5, help="Equal depth segments K."),
    method: str = typer.Option("auto", help="auto (= combined), pair, angular, gradient or "
                               "combined (rank average of the available methods)."),
    max_active: int = typer.Option(2, help="Most segments in the proposal."),
    pick: str = typer.Option("run", help="run: a contiguous run grown from the best segment; "
                             "top: the best --max-active segments."),
    edges: str = typer.Option("auto", help="auto: bottom/top segments only when their score "
                              "is --edge-factor times the best interior one; allow; exclude."),
    edge_factor: float = typer.Option(3.0, help="How much an edge segment must beat the best "
                                      "interior one to be proposed."),
    extend: float = typer.Option(0.75, help="A neighbour joins the run when it scores at least "
                                 "this fraction of the best segment."),
    n_samples: int = typer.Option(64, help="Texts for the hidden-state signals."),
    grad_samples: int = typer.Option(16, help="Texts for the gradient signal."),
    batch_size: int = typer.Option(4, help="Texts per forward pass."),
    max_length: int = typer.Option(256, help="Longest text in tokens (longer: truncated)."),
    seed: int = typer.Option(0, help="Seed of the sample selection."),
    base_revision: str | None = typer.Option(None, help="Hub revision of the base model."),
    sft_revision: str | None = typer.Option(None, help="Hub revision of the SFT model."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
    device_map: str | None = typer.Option(None, help="accelerate device map ('auto' shards)."),
    text_field: str | None = typer.Option(None, help="Field holding the text (generic files)."),
    template: str | None = typer.Option(None, help="Python format string over record fields."),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the chat template."),
    formats: str = formats_option(),
) -> None:
    """Propose which depth segments to tune with LoRA, from signals computed without training:
    pair (where an SFT model changed the base, per segment), angular (how much each base block
    turns the hidden state), gradient (task-loss gradient of the attention projections), and
    combined (rank average). Edge segments are proposed only on an overwhelming signal (the
    paper found them worst); the reason is printed and saved. Check a proposal with
    `sftscope sweep ... --validate-suggest`."""
    from sftscope.experiments.suggest import SuggestConfig
    from sftscope.experiments.suggest import suggest as run
    from sftscope.progress import say

    cfg = SuggestConfig(
        base=base, data=data, out=str(out) if out else None, sft=sft, segments=segments,
        method=method, max_active=max_active, pick=pick, edges=edges, edge_factor=edge_factor,
        extend=extend, n_samples=n_samples, grad_samples=grad_samples, batch_size=batch_size,
        max_length=max_length, seed=seed, base_revision=base_revision,
        sft_revision=sft_revision, dtype=dtype, device=device, device_map=device_map,
        text_field=text_field, template=template, chat_template=chat_template,
        formats=split_formats(formats))
    res = run(cfg)
    for m in res.proposals.values():
        sc = res.method_scores(m.method).sort_values("segment")
        prof = " ".join(f"{v:.2f}" for v in sc["score"])
        say(f"  {m.method:9s} {m.mask}  segment scores (bottom first): {prof}")
    say(f"[bold]suggested mask {res.mask}[/] ({res.method})")
    say(f"reason: {res.reason}")
    if out:
        say(f"wrote {out / 'suggest.json'}, {out / 'suggest.csv'} and {out / 'run.json'}")
