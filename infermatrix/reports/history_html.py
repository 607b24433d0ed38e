"""history.html: one offline page, a line chart per series of the history.

Commits run along the x axis (short SHAs, or the date of a run without one), the
metric up the y axis; the fitted levels are dashed lines and each change point a
vertical line, red for a regression step, green for an improvement, grey within the
threshold (reports.history.judge). Inline SVG and CSS only: no script, no fetch (a
Content-Security-Policy forbids both); every text from a record is escaped.

Page anatomy: ``table#series`` (a row per series, ``tr[data-verdict]``), then per
series ``figure.series[data-case-id][data-verdict]`` with ``svg.chart`` holding
``polyline.trend``, ``circle.point``, ``line.level`` and ``line.change[data-kind]``.
"""

from __future__ import annotations

from pathlib import Path

from infermatrix.reports.history import Verdict, render_threshold
from infermatrix.reports.html_report import _esc, _short, _ticks

_W, _H = 760, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 50, 20, 70  # room for the rotated commit labels
_KIND_COLOR = {"regression": "#dc2626", "improvement": "#16a34a", "small": "#9ca3af"}
_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #111827; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; } td, th { padding: 2px 10px; border-bottom: 1px solid #e5e7eb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr[data-verdict=regression] td { color: #b91c1c; font-weight: 600; }
figure.series { margin: 2em 0; } figcaption { font-weight: 600; overflow-wrap: anywhere; }
svg.chart { background: #fff; border: 1px solid #e5e7eb; }
.axis { stroke: #374151; } .grid { stroke: #f3f4f6; } .tick { font-size: 11px; fill: #374151; }
.trend { fill: none; stroke: #2563eb; stroke-width: 1.5; } .point { fill: #2563eb; }
.level { stroke: #6b7280; stroke-dasharray: 5 4; } .change { stroke-width: 1.5; }
.note { color: #4b5563; }
"""


def _status(v: Verdict) -> str:
    return "skipped" if v.skipped else "regression" if v.regression else "ok"


def _chart(v: Verdict) -> str:
    points = v.series.points
    values = [p.value for p in points]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.05 or 1.0
    ticks = _ticks(lo - pad, hi + pad)
    y0, y1 = min(ticks[0], lo - pad), max(ticks[-1], hi + pad)
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    step = width / max(len(points) - 1, 1)

    def x(i: float) -> float:
        return _LEFT + (i * step if len(points) > 1 else width / 2)

    def y(value: float) -> float:
        return _TOP + height * (1 - (value - y0) / (y1 - y0))

    out = [f'<svg class="chart" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img" '
           f'aria-label="{_esc(v.series.metric)} by commit">']
    for t in ticks:
        out.append(f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
                   f'<text class="tick" x="{_LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end">{_esc(_short(t))}</text>')
    out.append(f'<line class="axis" x1="{_LEFT}" x2="{_LEFT}" y1="{_TOP}" y2="{_TOP + height}"/>'
               f'<line class="axis" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_TOP + height}" y2="{_TOP + height}"/>')
    every = max(1, round(len(points) / 30))  # at most ~30 labels
    for i, p in enumerate(points):
        if i % every == 0 or i == len(points) - 1:
            out.append(f'<text class="tick" transform="translate({x(i):.1f},{_TOP + height + 12}) rotate(45)">'
                       f'{_esc(p.label)}</text>')
    for seg in v.segments:
        out.append(f'<line class="level" x1="{x(seg.start):.1f}" x2="{x(seg.end - 1):.1f}" '
                   f'y1="{y(seg.level):.1f}" y2="{y(seg.level):.1f}"><title>level {_esc(_short(seg.level))}</title>'
                   '</line>')
    for s in v.steps:
        at = x(s.index - 0.5)
        out.append(f'<line class="change" data-kind="{s.kind}" stroke="{_KIND_COLOR[s.kind]}" x1="{at:.1f}" '
                   f'x2="{at:.1f}" y1="{_TOP}" y2="{_TOP + height}"><title>change point at '
                   f'{_esc(points[s.index].label)}: {s.change:+.1%} ({s.kind})</title></line>'
                   f'<text class="tick" x="{at + 3:.1f}" y="{_TOP + 12}" fill="{_KIND_COLOR[s.kind]}">'
                   f'{s.change:+.1%}</text>')
    coords = " ".join(f"{x(i):.1f},{y(p.value):.1f}" for i, p in enumerate(points))
    out.append(f'<polyline class="trend" points="{coords}"/>')
    for i, p in enumerate(points):
        out.append(f'<circle class="point" cx="{x(i):.1f}" cy="{y(p.value):.1f}" r="3"><title>'
                   f'{_esc(p.sha or p.label)} {_esc(p.date)}: {_esc(_short(p.value))} '
                   f'({p.runs} run{"s" * (p.runs != 1)})</title></circle>')
    out.append(f'<text class="tick" x="14" y="{_TOP + height / 2:.0f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {_TOP + height / 2:.0f})">{_esc(v.series.metric)}</text></svg>')
    return "".join(out)


def _row(v: Verdict) -> str:
    latest = v.series.points[-1]
    change = f"{v.change:+.1%}" if v.change is not None else ""
    note = v.skipped or f"{len(v.steps)} change point{'s' * (len(v.steps) != 1)}"
    return (f'<tr data-verdict="{_status(v)}"><td>{_esc(v.series.name)}</td>'
            f'<td class="num">{len(v.series.points)}</td>'
            f'<td class="num">{_esc(_short(latest.value))}</td><td class="num">{change}</td><td>{_status(v)}</td>'
            f'<td>{_esc(note)}</td></tr>')


def render_history_html(verdicts: list[Verdict], *, metric: str, threshold: float, source: str) -> str:
    figures = []
    for v in verdicts:
        note = f'<p class="note">{_esc(v.skipped)}</p>' if v.skipped else ""
        figures.append(f'<figure class="series" data-case-id="{_esc(v.series.case_id)}" data-verdict="{_status(v)}">'
                       f'<figcaption>{_esc(v.series.name)}</figcaption>{note}{_chart(v)}</figure>')
    regressed = sum(v.regression for v in verdicts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>infermatrix history: {_esc(metric)}</title><style>{_CSS}</style></head>
<body><h1>infermatrix history: {_esc(metric)}</h1>
<p class="note">{_esc(source)}: {len(verdicts)} series; {regressed} regressed beyond
{_esc(render_threshold(threshold))} (latest level against the best before it; change points from a penalized piecewise-constant fit of the log values).</p>
<table id="series"><thead><tr><th>series</th><th>commits</th><th>latest</th><th>regressed by</th><th>verdict</th><th></th>
</tr></thead><tbody>{"".join(_row(v) for v in verdicts)}</tbody></table>
{"".join(figures)}
</body></html>
"""


def write_history_html(verdicts: list[Verdict], out: Path, **options) -> Path:
    out = Path(out)
    out.write_text(render_history_html(verdicts, **options), encoding="utf-8")
    return out
