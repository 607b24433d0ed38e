"""summary.md: a compact Markdown table for PR comments and CI job summaries, and per
rate sweep of the serve workload a Serving table: each line's highest offered rate meeting
the SLO, and its goodput and tail latencies there."""

from __future__ import annotations

from pathlib import Path

from infermatrix.reports.derived import (
    SERVE_TABLE_HEADERS, column_value, cpu_features_text, energy_text, ran, serve_slo_text, serve_table_row,
    serving_curves, shape_label, shown_columns, speedup_details,
)
from infermatrix.reports.record import Record

MARKDOWN_FILE = "summary.md"


def _md(text: object) -> str:
    """A table cell: pipes escaped, newlines flattened."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(records: list[Record], title: str = "infermatrix run") -> str:
    ok = [r for r in records if r.status == "ok"]
    counts = {s: sum(r.status == s for r in records) for s in ("ok", "skipped", "failed")}
    lines = [f"### {_md(title)}", "",
             f"{len(records)} cases: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed", ""]
    env = next((r.env for r in records if r.env), None)
    if env:  # a figure means little without the CPU: bf16/int8 speed differs by ISA
        lines += [f"CPU: {_md(env.get('cpu') or 'unknown')} · {_md(cpu_features_text(env))}", ""]
    if env and env.get("energy"):  # why the energy columns are there, or absent
        lines += [f"Energy counters: {_md(energy_text(env))}", ""]
    if ok:
        speedup = speedup_details(records)
        columns = shown_columns(ok, speedup)
        header = ["model", "variant", "workload", "dtype", "shape"] + [col.header for col in columns] + ["ran"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in ok:
            c = r.case
            cells = [c.get("model", ""), c.get("variant", ""), c.get("workload", ""), c.get("dtype", ""), shape_label(c)]
            cells += [col.text(column_value(r, col, speedup)) for col in columns] + [ran(r)]
            lines.append("| " + " | ".join(_md(x) for x in cells) + " |")
    for curves in serving_curves(records):
        lines += ["", f"#### Serving: {_md(curves.label)}", "",
                  f"Rates {', '.join(f'{rate:g}' for rate in curves.rates)} requests/s. "
                  f"SLO: {_md(serve_slo_text(curves.case))}.", "",
                  "| " + " | ".join(SERVE_TABLE_HEADERS) + " |", "|---|" + "---:|" * (len(SERVE_TABLE_HEADERS) - 1)]
        lines += ["| " + " | ".join(_md(cell) for cell in serve_table_row(line)) + " |" for line in curves.lines]
    problems = [r for r in records if r.status != "ok"]
    if problems:
        lines += ["", "| status | case | reason |", "|---|---|---|"]
        lines += [f"| {r.status} | {_md(r.case_id)} | {_md(r.reason or '')} |" for r in problems]
    return "\n".join(lines) + "\n"


def write_markdown(records: list[Record], out_dir: Path, title: str = "infermatrix run") -> Path:
    path = Path(out_dir) / MARKDOWN_FILE
    path.write_text(render_markdown(records, title), encoding="utf-8")
    return path
