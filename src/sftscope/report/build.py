"""``build_report``: run folders in, one self-contained HTML file (and figure files) out."""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pandas as pd

from sftscope import io
from sftscope.errors import SftscopeError, quoted
from sftscope.report import numbers as N
from sftscope.report import plots
from sftscope.report.html import FigureBlock, Section, TableBlock, render_page
from sftscope.report.patterns import paper_patterns
from sftscope.report.runs import DERIVED, TABLES, RunSet, load_runs, spec_of, warn
from sftscope.report.sections import SPECS, FigureSpec
from sftscope.segments import masks_as_text

FORMATS = ("png", "pdf", "svg")


class Writer:
    """Saves figures (PNG bytes kept for embedding) and tables beside them; masks in the
    tables are written in the table form (``m01000``) like every sftscope table."""

    def __init__(self, figdir: Path, formats: Sequence[str]) -> None:
        self.figdir = figdir
        self.formats = formats
        self.written: list[Path] = []

    def figure(self, fig: Any, stem: str, title: str) -> FigureBlock:
        plots.plain_ticks(fig)
        buf = BytesIO()
        fig.savefig(buf, format="png", dpi=plots.DPI, facecolor="white")
        png = buf.getvalue()
        files = []
        for fmt in self.formats:
            data = png
            if fmt != "png":
                b = BytesIO()
                fig.savefig(b, format=fmt, dpi=plots.DPI, facecolor="white")
                data = b.getvalue()
            path = self.figdir / f"{stem}.{fmt}"
            with io.atomic_path(path) as tmp:
                tmp.write_bytes(data)
            files.append(path)
        fig.clear()  # the figure is not registered with pyplot: clearing frees it
        self.written += files
        return FigureBlock(title=title, png=png, files=files)

    def table(self, df: pd.DataFrame, stem: str, title: str) -> TableBlock:
        path = io.write_table(masks_as_text(df), self.figdir / f"{stem}.csv")
        self.written.append(path)
        return TableBlock(title=title, df=df, csv=path)


def build_section(spec: FigureSpec, runs: RunSet, w: Writer, colors: dict[str, str]) -> Section:
    """One section from its spec: the numbers once, then figures, findings, tables, notes."""
    sec = Section(spec.key, spec.title, spec.intro)
    data = spec.prepare(runs)
    if data is None:
        sec.absent = spec.absent(runs)
        return sec
    sec.findings = spec.findings(data)
    for stem, caption, plot in spec.figures:
        title = caption(data) if callable(caption) else caption
        sec.figures.append(w.figure(plot(data, colors), stem, title))
    for stem, title, df in spec.tables(data):
        sec.tables.append(w.table(df, stem, title))
    sec.notes = list(dict.fromkeys(spec.notes(data)))
    return sec


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,pdf"`` or a sequence -> validated formats (png, pdf, svg)."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise SftscopeError(f"figure format(s) {', '.join(bad) or '(none)'} unknown: use "
                            f"{', '.join(FORMATS)} (comma-separated, e.g. png,pdf)")
    return out


def _present(runs: RunSet) -> list[str]:
    return [f"{spec_of(t).stem}" + ("" if "." in spec_of(t).stem else ".csv")
            for t in [*TABLES, *DERIVED] if any(t in r.tables for r in runs)]


def chain_labels(run: Any) -> list[str]:
    """The legend labels of a checkpoint chain's series (``RUN [base]``, ``RUN [sft]``,
    ``RUN [dpo]``, ``RUN [sft→dpo]``: ``numbers.chain_view``), from its run.json, so each
    stage keeps one colour in every figure."""
    chain = run.record.get("chain")
    if not isinstance(chain, list) or len(chain) < 2:
        return []
    stages = [str(c.get("label")) for c in chain if isinstance(c, dict)]
    pairs = [str(p.get("model")) for p in run.record.get("pairs") or [] if isinstance(p, dict)]
    known = set(stages)
    names = ["base", *stages, *(N.chain_series(m, known)[0] for m in pairs)]
    return [f"{run.label} [{x}]" for x in dict.fromkeys(names)]


def _truncated(record: Any) -> int:
    """The sum of every ``n_truncated`` count in a run record (any depth)."""
    if isinstance(record, dict):
        return sum(int(v) if k == "n_truncated" and isinstance(v, (int, float)) else
                   _truncated(v) for k, v in record.items())
    if isinstance(record, list):
        return sum(_truncated(v) for v in record)
    return 0


def truncation_notes(runs: Any) -> list[str]:
    """One line per run whose prompts or texts were cut (its ``run.json``, and a sweep's
    ``jobs/*/run.json``): truncation changes what was measured, so the report says it."""
    out = []
    for r in runs:
        n = _truncated(r.record)
        jobs = sorted(Path(r.path).glob("jobs/*/run.json")) if r.command == "sweep" else []
        for j in jobs:
            try:
                n += _truncated(io.read_json(j))
            except Exception:  # an unreadable job record is the sweep's business
                continue
        if n:
            where = " (over its jobs)" if jobs else ""
            out.append(f"{r.label}: {n} prompt(s) or text(s) were longer than the limit and "
                       f"were truncated{where}; n_truncated in run.json")
    return out


def build_report(runs: Sequence[str | Path] | str | Path, out: str | Path | None = None,
                 formats: str | Sequence[str] = ("png",), figures_dir: str | Path | None = None,
                 title: str | None = None, notices: Sequence[str] = ()) -> Path:
    """Write the HTML report of ``runs`` (default ``RUN0/report.html``) and its figures
    (default ``figures/`` beside the report, so a report written elsewhere adds nothing to the
    run folders it reads); returns the HTML path. ``notices`` are shown first (the demo
    says there when it ran reduced). Folders that cannot be used are left out with a note (on
    stderr and in the report); it is an error only when none can be used."""
    paths = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(p) for p in runs]
    if not paths:
        raise SftscopeError("give at least one run folder")
    fmts = parse_formats(formats)
    out = Path(out) if out is not None else paths[0] / "report.html"
    if out.exists() and out.is_dir():
        raise SftscopeError(f"--out {out} is a folder; give a file name such as report.html")
    loaded = load_runs(paths)
    figdir = Path(figures_dir) if figures_dir is not None else out.parent / "figures"
    colors = plots.palette(label for r in loaded for label in [r.label, *chain_labels(r)])
    writer = Writer(figdir, fmts)
    sections = []
    for spec in SPECS:
        try:
            sections.append(build_section(spec, loaded, writer, colors))
        except Exception as e:  # one broken section must not cost the whole report
            msg = f"section {spec.title!r} could not be drawn ({quoted(e)})"
            warn(msg)
            sections.append(Section(spec.key, spec.title, spec.intro, absent=msg))
    patterns = paper_patterns(loaded)
    writer.table(pd.DataFrame(patterns), "paper_patterns", "patterns of the paper")
    info = [{"label": r.label, "color": colors[r.label], "command": r.command,
             "n_blocks": r.n_blocks,
             "tables": [spec_of(t).stem + ("" if "." in spec_of(t).stem else ".csv")
                        for t in r.tables] + (["suggest.json"] if "suggest" in r.extra else []),
             "path": str(r.path), "record": r.record} for r in loaded]
    notes = [f"Figures and the CSV behind each are in {figdir}.", *truncation_notes(loaded)]
    present = set(_present(loaded))
    missing = [f"{s.stem}.csv" for s in TABLES.values() if f"{s.stem}.csv" not in present]
    if missing:
        notes.append("Not in these runs: " + ", ".join(missing) + " (their sections say so).")
    if not title:
        labels = list(dict.fromkeys(r.label for r in loaded))
        title = "sftscope report: " + ", ".join(labels[:2]) + (
            f" (+{len(labels) - 2} more)" if len(labels) > 2 else "")
    all_notices = list(dict.fromkeys([*notices, *loaded.notices]))
    page = render_page(title, info, patterns, sections, notes, notices=all_notices,
                       skipped=loaded.skipped)
    io.write_text(out, page)
    return out
