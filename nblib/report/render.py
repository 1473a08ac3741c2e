"""Rendering a report: sections of prose, tables and figures, written as one self-contained
HTML page (inline CSS from ``style.css``, figures as base64 PNG, no scripts or external links),
Markdown and a long-format CSV.

Text that comes from data or models (answers, samples, settings) is escaped in every format:
HTML entities in the HTML and the Markdown alike, so a dataset answer ``<script>`` stays text.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from nblib import machine
from nblib.files import atomic_write_text
from nblib.report.tables import RATIO, Stat, format_table, label

CSS = (Path(__file__).with_name("style.css")).read_text(encoding="utf-8").strip()


@dataclass
class Section:
    kind: str  # "text" | "warning" | "table" | "figure"
    title: str
    payload: Any
    note: str = ""
    collapsed: bool = False
    flagged: tuple[str, ...] = ()  # table columns to show in red (unmatched pairs)


@dataclass
class Report:
    """A report assembled section by section, written as HTML, Markdown and CSV."""

    title: str
    profile: str
    machine: dict[str, Any]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    sections: list[Section] = field(default_factory=list)

    def add_text(self, title: str, lines: list[str], note: str = "") -> None:
        """A bullet list (``**bold**`` allowed)."""
        self.sections.append(Section("text", title, list(lines), note))

    def add_warning(self, title: str, lines: list[str]) -> None:
        """A red box (unmatched pairs kept with ``allow_mismatch``)."""
        if lines:
            self.sections.append(Section("warning", title, list(lines)))

    def add_table(self, title: str, table: pd.DataFrame, note: str = "", collapsed: bool = False,
                  flagged: tuple[str, ...] = ()) -> None:
        """A table indexed by metric keys (shown with their labels); the CSV gets raw values."""
        self.sections.append(Section("table", title, table, note, collapsed, tuple(flagged)))

    def add_figure(self, title: str, fig: Figure, note: str = "") -> None:
        """A figure, embedded as a PNG data URI in the HTML and scaled to the page's width."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
        self.sections.append(Section("figure", title, buf.getvalue(), note))

    def add_configs(self, groups: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
        """Each run's settings (and where it trained), plus this stage's ``settings``, as collapsed tables."""
        for stage, title in (("pretrain", "Pretraining configs"), ("finetune", "Fine-tuning configs")):
            chosen = [g for g in groups.values() if g.stage == stage]
            if chosen:
                cols = {g.name: {"trained on": machine_line(g.summary["machine"]), "seeds": ", ".join(map(str, g.seeds)),
                                 **plain(g.summary["config"])} for g in chosen}
                self.add_table(title, pd.DataFrame(cols).rename_axis("setting"), collapsed=True)
        if settings is not None:
            self.add_table("Compare settings", pd.DataFrame({"value": plain(settings)}).rename_axis("setting"), collapsed=True)

    # ---- outputs

    def header_lines(self) -> list[str]:
        return [f"Generated {self.created} · profile **{self.profile}**", f"Machine: {machine_line(self.machine)}"]

    def banner(self) -> str:
        if self.profile != "smoke":
            return ""
        return ("CPU smoke run: tiny models trained for a few minutes. The figures show how the variants "
                "compare at this size, not what a full-size GPT-2 reaches.")

    def html(self) -> str:
        """One self-contained page: inline CSS, base64 PNGs, no scripts or external links."""
        parts = [
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(self.title)}</title>", f"<style>{CSS}</style></head><body>",
            f"<h1>{html.escape(self.title)}</h1>",
            *(f'<p class="meta">{inline(line)}</p>' for line in self.header_lines()),
        ]
        if self.banner():
            parts.append(f'<p class="banner">{html.escape(self.banner())}</p>')
        parts.append("<nav><ul>" + "".join(
            f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections)) + "</ul></nav>")
        for i, s in enumerate(self.sections):
            body = [f'<p class="note">{inline(s.note)}</p>'] if s.note else []
            if s.kind in ("text", "warning"):
                cls = ' class="warning"' if s.kind == "warning" else ""
                body.append(f"<ul{cls}>" + "".join(f"<li>{inline(line)}</li>" for line in s.payload) + "</ul>")
            elif s.kind == "table":
                body.append(f'<div class="scroll">{html_table(s.payload, s.flagged)}</div>')
            else:
                data = base64.b64encode(s.payload).decode("ascii")
                body.append(f'<div class="fig"><img src="data:image/png;base64,{data}" alt="{html.escape(s.title)}"></div>')
            heading = f'<h2 id="s{i}">{html.escape(s.title)}</h2>'
            parts.append(f'{heading}<details><summary>show</summary>{"".join(body)}</details>' if s.collapsed
                         else heading + "".join(body))
        parts.append("</body></html>")
        return "\n".join(parts) + "\n"

    def markdown(self) -> str:
        """The same report as Markdown (figures are only in the HTML)."""
        out = [f"# {escape_md(self.title)}", "", *(f"{escape_md(line)}  " for line in self.header_lines()), ""]
        if self.banner():
            out += [f"> {self.banner()}", ""]
        for s in self.sections:
            out += [f"## {escape_md(s.title)}", ""]
            if s.note:
                out += [escape_md(s.note), ""]
            if s.kind in ("text", "warning"):
                mark = "**⚠** " if s.kind == "warning" else ""
                out += [f"- {mark}{escape_md(line)}" for line in s.payload] + [""]
            elif s.kind == "table":
                out += [md_table(s.payload, s.flagged), ""]
            else:
                out += ["*(figure in compare.html)*", ""]
        return "\n".join(out)

    def csv(self) -> str:
        """Every table in long format: ``table,row,column,value,low,high,n`` (raw numbers, 6 significant digits)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["table", "row", "column", "value", "low", "high", "n"])
        for s in self.sections:
            if s.kind != "table":
                continue
            for row, values in s.payload.iterrows():
                for col, v in values.items():
                    if isinstance(v, Stat):
                        w.writerow([s.title, row, col, csv_value(v.mid), csv_value(v.lo), csv_value(v.hi), v.n])
                    else:
                        w.writerow([s.title, row, col, csv_value(v), "", "", ""])
        return buf.getvalue()

    def write(self, out_dir: str | Path, stem: str = "compare") -> dict[str, Path]:
        """Atomically write ``<stem>.html``, ``<stem>.md`` and ``<stem>.csv`` into ``out_dir``."""
        out_dir = Path(out_dir)
        return {
            "html": atomic_write_text(out_dir / f"{stem}.html", self.html()),
            "md": atomic_write_text(out_dir / f"{stem}.md", self.markdown()),
            "csv": atomic_write_text(out_dir / f"{stem}.csv", self.csv()),
        }


def new_report(profile: str, title: str = "machado-gpt: MHA vs GQA, LoRA vs full fine-tuning") -> Report:
    """An empty report stamped with the profile, this machine and the current time."""
    return Report(title=title, profile=profile, machine=machine.info())


def machine_line(m: dict[str, Any]) -> str:
    gpu = m.get("gpu") or "no GPU"
    load = f", load {m['load_average']}" if m.get("load_average") is not None else ""
    return f"{m.get('cpu', '?')} ({m.get('cpu_cores', '?')} cores{load}), {gpu}, torch {m.get('torch', '?')}"


def plain(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they were written (text, so a seed reads 1337 and not 1,337); lists and dicts as JSON."""
    return {k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else "–" if v is None else str(v)
            for k, v in settings.items()}


def inline(text: str) -> str:
    """Escape ``text`` for HTML, turning ``**bold**`` into ``<strong>``."""
    pieces = html.escape(text).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(pieces))


def escape_md(text: str) -> str:
    """Text for Markdown: HTML escaped (renderers pass raw HTML through), ``**bold**`` kept."""
    return html.escape(text, quote=False)


def text_columns(table: pd.DataFrame) -> set[Any]:
    """Columns holding only text (samples): shown left-aligned and wrapped."""
    return {c for c in table.columns if all(isinstance(v, str) for v in table[c])}


LONG_CELL = 40  # characters: a longer cell (a sentence among figures) wraps like a text column


def html_table(table: pd.DataFrame, flagged: tuple[str, ...] = ()) -> str:
    """Rows of formatted cells; text-only columns and long cells are left-aligned and wrap; flagged columns red."""
    shown, texts = format_table(table), text_columns(table)

    def cls(col: Any, header: bool = False, value: str = "") -> str:
        names = []
        if col in texts or len(value) > LONG_CELL:
            names.append("text")
        elif RATIO in str(col) and not header:
            names.append("ratio")
        if col in flagged:
            names.append("mismatch")
        return f' class="{" ".join(names)}"' if names else ""

    head = [f'<th class="name">{html.escape(table.index.name or "")}</th>']
    head += [f"<th{cls(c, True)}>{html.escape(str(c))}{' ⚠' if c in flagged else ''}</th>" for c in table.columns]
    rows = []
    for key, (_, vals) in zip(table.index, shown.iterrows()):
        cells = [f'<th scope="row" class="name">{html.escape(label(key))}</th>']
        cells += [f"<td{cls(col, value=vals[col])}>{html.escape(vals[col])}</td>" for col in table.columns]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _md_cell(text: str) -> str:
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def md_table(table: pd.DataFrame, flagged: tuple[str, ...] = ()) -> str:
    shown, texts = format_table(table), text_columns(table)
    header = [table.index.name or "", *(f"{c} ⚠" if c in flagged else str(c) for c in table.columns)]
    align = [":--"] + [":--" if c in texts else "--:" for c in table.columns]
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "|".join(align) + "|"]
    for key, (_, vals) in zip(table.index, shown.iterrows()):
        lines.append("| " + " | ".join(_md_cell(str(x)) for x in [label(key), *vals]) + " |")
    return "\n".join(lines)


def csv_value(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
