"""Report: the paper's figures, tables and findings from any set of run folders, as one HTML.

``build_report(runs, out)`` reads whatever the run folders hold (see "Output files" in
docs/DEVELOPING.md), overlays runs of different depth on relative-depth axes, writes PNG (and
PDF/SVG) figures plus the CSV behind each figure, and one self-contained HTML file.
``paper_patterns(runs)`` says which of the paper's depth patterns the data shows, each verdict
(yes / no / inconclusive) from a stated numeric rule printed beside the numbers.

Modules: ``runs`` (reading folders, skipping unusable ones with a note), ``numbers`` (the numbers
behind each figure), ``plots`` (figures from tables), ``sections`` (the list of figure specs:
adding a figure = adding a spec), ``rules`` (the pattern rules, pure functions), ``patterns``,
``html`` and ``build``. This module only re-exports.
"""

from __future__ import annotations

from sftscope.report import plots
from sftscope.report.build import FORMATS, build_report, parse_formats
from sftscope.report.patterns import PATTERNS, paper_patterns
from sftscope.report.runs import (
    TABLES,
    Run,
    RunSet,
    combined,
    load_run,
    load_runs,
    read_table,
    run_label,
)
from sftscope.report.sections import SPECS, FigureSpec

__all__ = [
    "FORMATS", "PATTERNS", "SPECS", "TABLES", "FigureSpec", "Run", "RunSet", "build_report",
    "combined", "load_run", "load_runs", "paper_patterns", "parse_formats", "plots",
    "read_table", "run_label",
]
