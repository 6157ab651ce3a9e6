"""``sftscope demo``: the whole pipeline offline on a CPU, ending in a report."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app


@app.command()
def demo(
    out: Path = typer.Option(Path("sftscope-demo"), help="Folder for the pair, every run and "
                             "report.html."),
    seed: int = typer.Option(0, help="Seed of the corpus, training and analyses."),
    quick: bool = typer.Option(False, help="Reduced size (about a minute; used by the tests)."),
    family: str = typer.Option("llama", help="Architecture of the demo pair: llama or olmo2."),
    force: bool = typer.Option(False, help="Retrain the pair even if a cached one exists."),
    segments: int = typer.Option(5, help="Depth segments for swap, suggest and the sweep."),
    sweep_masks: str = typer.Option("singles", help="Masks of the small sweep: singles, paper, "
                                    "all, or a list such as 01000,11111."),
    sweep_seeds: int = typer.Option(1, help="Seeds per mask in the sweep."),
    skip: str = typer.Option("", help="Steps to leave out, comma-separated: analyze, weights, "
                             "probe, swap, sweep, report."),
) -> None:
    """Train a small Base model on a generated corpus and fine-tune a copy (the SFT model),
    both saved as ordinary Hugging Face folders, then run analyze, weights, probe, swap and a
    mask sweep (ranking the training-free mask proposals) on the pair and write one HTML
    report. No network and no GPU needed; the first run takes a few minutes on two CPU cores,
    a second run reuses the pair and finished work."""
    from sftscope.demo.run import DemoConfig, run_demo, time_summary
    from sftscope.progress import say

    res = run_demo(DemoConfig(out=str(out), seed=seed, quick=quick, family=family, force=force,
                              segments=segments, sweep_masks=sweep_masks,
                              sweep_seeds=sweep_seeds,
                              skip=tuple(s.strip() for s in skip.split(",") if s.strip())))
    say("where the time went:\n" + time_summary(res))
    for p in res.patterns:
        mark = {True: "shows", False: "does not show", None: "cannot tell"}[p["holds"]]
        say(f"  {mark:>13}: {p['pattern']} ({p['evidence']})")
    if res.report:
        say(f"report: {res.report}")
