"""``sftscope report RUN [RUN...]``: one self-contained HTML report plus figures and tables."""

from __future__ import annotations

from pathlib import Path

import typer

from sftscope.cli import app


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(
        ..., help="Run folders written by sftscope commands (analyze, weights, probe, swap, "
        "eval, sweep, demo); several runs are overlaid on relative-depth axes.",
        show_default=False,
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default: report.html in the first RUN)."
    ),
    formats: str = typer.Option(
        "png", "--formats", help="Figure files to write, comma-separated: png, pdf, svg "
        "(the HTML always embeds PNG).",
    ),
    figures_dir: Path | None = typer.Option(
        None, "--figures-dir", help="Folder for figures and the CSV behind each "
        "(default: figures/ in the first RUN).",
    ),
    title: str | None = typer.Option(None, "--title", help="Report title."),
) -> None:
    """Write the paper's figures for whatever the runs hold, with tables, findings and a
    checklist of the paper's patterns, as one HTML file that needs no network."""
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    from sftscope.progress import say
    from sftscope.report import build_report, parse_formats

    path = build_report(runs, out=out, formats=parse_formats(formats), figures_dir=figures_dir,
                        title=title)
    figdir = figures_dir if figures_dir is not None else runs[0] / "figures"
    say(f"report: {path}")
    say(f"figures and tables: {figdir}")
