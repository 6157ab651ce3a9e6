"""Self-contained HTML: inline CSS, figures as base64 PNG, no script, font or network reference."""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

MAX_TABLE_ROWS = 3000

CSS = """
:root { --fg:#1d232b; --muted:#5b6570; --line:#d9dee3; --bg:#ffffff; --soft:#f5f7f9;
        --ok:#17803d; --bad:#b42318; --na:#7a828a; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 1.7em; margin: 0 0 4px; }
h2 { font-size: 1.3em; margin: 40px 0 8px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 16px; }
nav { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
      padding: 8px 14px; margin: 12px 0 20px; font-size: .92em;
      display: flex; flex-wrap: wrap; gap: 4px 16px; }
nav a { color: #1f5fa8; text-decoration: none; white-space: nowrap; }
.findings { background: var(--soft); border-left: 4px solid #1f5fa8; padding: 8px 14px;
            margin: 8px 0 12px; }
.findings p { margin: 4px 0; }
.absent { color: var(--muted); font-style: italic; padding: 6px 0; }
figure { margin: 12px 0 8px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 4px; }
figcaption { color: var(--muted); font-size: .85em; margin-top: 2px; }
details { margin: 6px 0; border: 1px solid var(--line); border-radius: 5px; padding: 4px 10px; }
details > summary { cursor: pointer; font-weight: 600; padding: 2px 0; }
.tablewrap { max-height: 460px; overflow: auto; margin: 6px 0; }
table { border-collapse: collapse; font-size: .83em; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 9px; text-align: right; }
th { background: var(--soft); position: sticky; top: 0; }
td:first-child, th:first-child { text-align: left; }
.runs td, .runs th, .patterns td, .patterns th { text-align: left; vertical-align: top; }
.swatch { display: inline-block; width: 14px; height: 14px; border-radius: 3px;
          vertical-align: -2px; margin-right: 6px; }
.ok { color: var(--ok); font-weight: 700; } .bad { color: var(--bad); font-weight: 700; }
.na { color: var(--na); font-weight: 700; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
            font-size: .88em; }
pre { background: var(--soft); padding: 8px; overflow: auto; max-height: 420px; }
.note { color: var(--muted); font-size: .85em; }
.notice { background: #fff4e5; border: 1px solid #f0b429; border-left: 6px solid #f0b429;
          border-radius: 5px; padding: 10px 14px; margin: 12px 0; font-weight: 600; }
.skipped { background: #fdecea; border-left: 4px solid var(--bad); padding: 6px 14px;
           margin: 8px 0; font-size: .9em; }
.notes { border-left: 4px solid #f0b429; padding: 4px 14px; margin: 6px 0 10px;
         font-size: .9em; }
.notes p { margin: 3px 0; }
.rule { color: var(--muted); font-size: .88em; }
"""


@dataclass
class FigureBlock:
    """One figure: PNG bytes to embed and the files written for it."""

    title: str
    png: bytes
    files: list[Path] = field(default_factory=list)


@dataclass
class TableBlock:
    """The numbers behind a figure (or a result table), with the CSV written for it."""

    title: str
    df: pd.DataFrame
    csv: Path | None = None


@dataclass
class Section:
    """One section of the report; ``absent`` replaces its content when the data is missing."""

    key: str
    title: str
    intro: str = ""
    findings: list[str] = field(default_factory=list)
    figures: list[FigureBlock] = field(default_factory=list)
    tables: list[TableBlock] = field(default_factory=list)
    absent: str | None = None
    notes: list[str] = field(default_factory=list)


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x != x:  # NaN
            return ""
        return f"{x:.4g}"
    return str(x)


def table_html(df: pd.DataFrame, max_rows: int = MAX_TABLE_ROWS) -> str:
    """An escaped HTML table of a DataFrame (first ``max_rows`` rows)."""
    note = ""
    if len(df) > max_rows:
        note = (f'<p class="note">first {max_rows} of {len(df)} rows shown; '
                f"the CSV has all of them</p>")
        df = df.head(max_rows)
    head = "".join(f"<th>{esc(c)}</th>" for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        rows.append("<tr>" + "".join(f"<td>{esc(_fmt(v))}</td>" for v in rec) + "</tr>")
    return (f'<div class="tablewrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>{note}")


def details(summary: str, inner: str, open_: bool = False) -> str:
    return (f"<details{' open' if open_ else ''}><summary>{esc(summary)}</summary>"
            f"{inner}</details>")


def section_html(sec: Section, number: int) -> str:
    parts = [f'<section id="{esc(sec.key)}"><h2>{number}. {esc(sec.title)}</h2>']
    if sec.intro:
        parts.append(f'<p class="sub">{esc(sec.intro)}</p>')
    if sec.absent:
        parts.append(f'<p class="absent">{esc(sec.absent)}</p></section>')
        return "".join(parts)
    if sec.findings:
        parts.append('<div class="findings"><strong>Findings.</strong>'
                     + "".join(f"<p>{esc(f)}</p>" for f in sec.findings) + "</div>")
    if sec.notes:
        parts.append('<div class="notes"><strong>Read with care.</strong>'
                     + "".join(f"<p>{esc(n)}</p>" for n in sec.notes) + "</div>")
    for fig in sec.figures:
        files = ", ".join(f"<code>{esc(p)}</code>" for p in fig.files)
        parts.append(f"<figure>{img_tag(fig.png, fig.title)}<figcaption>{esc(fig.title)}"
                     + (f" - written to {files}" if files else "") + "</figcaption></figure>")
    for tab in sec.tables:
        where = f'<p class="note">CSV: <code>{esc(tab.csv)}</code></p>' if tab.csv else ""
        parts.append(details(f"Table: {tab.title} ({len(tab.df)} rows)",
                             where + table_html(tab.df)))
    parts.append("</section>")
    return "".join(parts)


def runs_table(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        sw = f'<span class="swatch" style="background:{esc(r["color"])}"></span>'
        rows.append(
            f"<tr><td>{sw}{esc(r['label'])}</td><td>{esc(r['command'])}</td>"
            f"<td>{esc(r.get('n_blocks') or '')}</td><td>{esc(', '.join(r['tables']))}</td>"
            f"<td><code>{esc(r['path'])}</code></td></tr>"
        )
    return ('<table class="runs"><thead><tr><th>run (legend)</th><th>command</th>'
            "<th>blocks L</th><th>tables</th><th>folder</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


VERDICT_CLASS = {"yes": "ok", "no": "bad", "inconclusive": "na"}


def patterns_table(patterns: list[dict[str, Any]]) -> str:
    """Pattern, verdict, and the rule with the numbers it was applied to."""
    rows = []
    for p in patterns:
        verdict = str(p.get("verdict") or {True: "yes", False: "no"}.get(p.get("holds"),
                                                                         "inconclusive"))
        mark = f'<span class="{VERDICT_CLASS.get(verdict, "na")}">{esc(verdict)}</span>'
        rule = (f'<div class="rule">rule: {esc(p["rule"])}</div>' if p.get("rule") else "")
        rows.append(f"<tr><td>{esc(p['pattern'])}</td><td>{mark}</td>"
                    f"<td>{rule}<div>here: {esc(p['evidence'])}</div></td></tr>")
    return ('<table class="patterns"><thead><tr><th>pattern of the paper</th>'
            "<th>verdict</th><th>rule, numbers and verdict</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def config_html(runs: list[dict[str, Any]]) -> str:
    out = []
    for r in runs:
        rec = r.get("record") or {}
        versions = rec.get("versions") or {}
        vt = ""
        if isinstance(versions, dict) and versions:
            vt = "<h3>Package versions</h3>" + table_html(
                pd.DataFrame({"package": list(versions), "version": list(versions.values())}))
        cfg = json.dumps(rec.get("config", {}), indent=2, default=str)
        other = {k: v for k, v in rec.items() if k not in ("config", "versions")}
        inner = (f"<h3>Configuration</h3><pre>{esc(cfg)}</pre>{vt}"
                 f"<h3>Other fields of run.json</h3>"
                 f"<pre>{esc(json.dumps(other, indent=2, default=str))}</pre>")
        out.append(details(f"{r['label']} - {r['command']} ({r['path']})", inner))
    return "".join(out)


def render_page(title: str, runs: list[dict[str, Any]], patterns: list[dict[str, Any]],
                sections: list[Section], notes: list[str] | None = None,
                notices: list[str] | None = None, skipped: list[str] | None = None) -> str:
    """The whole report as one HTML string; ``notices`` (e.g. a reduced demo) open the page,
    ``skipped`` lists the folders and tables that could not be used."""
    empty = [s for s in sections if s.absent]
    sections = [s for s in sections if not s.absent]  # the contents list what is there
    nav = "\n".join(f'<a href="#{esc(s.key)}">{i}. {esc(s.title)}</a>'
                    for i, s in enumerate(sections, 1))
    nav += '\n<a href="#patterns">Patterns of the paper</a><a href="#config">Run configuration</a>'
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">sftscope report, {esc(time.strftime("%Y-%m-%d %H:%M"))}; '
        f"{len(runs)} run folder(s). x axes are relative depth: hidden state j / L for "
        "per-layer tables, block (b + 0.5) / L for per-block tables; the dotted vertical line "
        "marks 80 % of depth (the paper's \"final 20 %\").</p>",
    ]
    body += [f'<div class="notice">{esc(n)}</div>' for n in notices or []]
    body += [f"<nav>{nav}</nav>", "<h2 id=\"runs-list\">Runs</h2>", runs_table(runs)]
    if skipped:
        body.append('<div class="skipped"><strong>Not used:</strong>'
                    + "".join(f"<p>{esc(s)}</p>" for s in skipped) + "</div>")
    for n in notes or []:
        body.append(f'<p class="note">{esc(n)}</p>')
    body.append('<h2 id="patterns">Patterns of the paper</h2>'
                '<p class="sub">Which of the paper\'s depth patterns these runs show. Each verdict '
                "comes from the stated rule applied to the numbers beside it: yes when every "
                "condition holds beyond the confidence intervals (or p &lt; 0.05), no when one "
                "fails beyond them, inconclusive when they overlap, p &gt;= 0.05, or the sample "
                "is below the stated minimum (rules in sftscope.report.rules).</p>"
                + patterns_table(patterns))
    body += [section_html(s, i) for i, s in enumerate(sections, 1)]
    if empty:
        body.append('<h2 id="absent">Not in these runs</h2>' + "".join(
            f'<p class="absent" id="{esc(s.key)}">{esc(s.title)}: {esc(s.absent)}</p>'
            for s in empty))
    body.append('<h2 id="config">Run configuration</h2>' + config_html(runs))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(body) + "</main></body></html>\n")
