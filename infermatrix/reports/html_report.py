"""report.html: one self-contained page per run, readable offline.

The page is a Jinja2 template, templates/report.html.j2 (autoescaped), with its
stylesheet and its little vanilla script (table sort and filter, the drift-metric
toggle), templates/report.css and report.js, inlined as they are; the charts are
drawn here as inline SVG fragments: no network, no third-party code. A
Content-Security-Policy pins the page's only script by its hash, so even text that
escaped escaping could not run. Every string taken from a record is escaped (`_esc`,
html.escape's entities, in the fragments and, as the template's finalize, in the
page). Raw samples are not embedded (the page stays small). This module gathers
what the page shows; the template lays it out.

Page anatomy (stable hooks for tests and scrapers):

* ``#summary`` the run header, ``#env`` the environment (``dl.env``);
* ``table#results``: ``th[data-col][data-type=num|text]``, rows ``tr.row`` with
  ``data-case-id`` and ``data-{model,variant,workload,dtype,status}``, cells
  ``td[data-col][data-value]``; ``input#filter`` and ``select.col-filter[data-col]``
  (``#filter-model``, ...), ``#row-count``;
* ``svg.chart[data-chart=latency|tokens|speedup|limit|pareto]`` (``data-workload``,
  ``data-metric=kl|ppl`` on the scatter), bars ``rect.bar``, points ``.point``,
  the front's points ``.point.pareto`` and line ``.pareto-front``; a chart
  without data is ``div.chart.nodata`` saying "no data"; a block-sparse layout
  (metric ``attention_layout``) is ``svg.chart[data-chart=layout]``;
* ``svg.chart[data-chart=sweep]`` (``data-along``, ``data-metric``, ``data-workload``,
  ``data-x-scale=log|linear``): a line ``polyline.series[data-series]`` per variant, its
  points ``circle.point[data-case-id]``, dense variants of a density sweep ``line.level``;
  ``svg.chart[data-chart=roofline][data-device]``: ceilings ``line.ceiling.bandwidth`` and
  ``line.ceiling.compute[data-dtype]``, cases ``.point[data-case-id]``;
* ``#serving``: per rate sweep of the serve workload a ``div.serve-group``, its charts
  ``svg.chart[data-chart=serve]`` (``data-metric=ttft_ms_p99|itl_ms_p99|goodput_rps``,
  ``data-along=rate``) drawn as the sweeps are, points missing the SLO ``circle.point.missed``
  (hollow), a static-batching line ``polyline.series.dashed``, the SLO's bound ``line.slo``
  and the offered load ``polyline.offered``; its table ``table.serve-table``, rows
  ``tr[data-line][data-max-rate]``;
* ``table#problems``: the failed and skipped cases, ``tr.problem[data-status]``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from infermatrix.reports.derived import (
    CONTINUOUS, DENSITY, DRIFT, REFERENCE, SERVE_TABLE_HEADERS, SPEEDUP, Column, Roofline, Speedup, Sweep, case_key,
    column_value, cpu_features_text, energy_text, is_peer, is_serve_record, is_speed_record,
    latency_p50, latency_unit, metric_label, pareto_front, ran, rooflines, serve_slo_text, serve_table_row,
    serving_curves, shape_label, shown_columns, speedup_details, sweep_axis_label, sweeps,
)
from infermatrix.reports.record import Record

HTML_FILE = "report.html"

# -------------------------------------------------------------------- values


def _esc(value: object) -> Markup:
    """Text from a record, safe in element content and in quoted attributes (html.escape's
    entities; None is blank). The chart fragments escape with it, and the template's
    finalize runs every value through it, so the page escapes one way; markup already
    made safe passes as it is."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def _num(value: object) -> float | None:
    """A finite float, or None (missing, NaN, inf, bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _short(value: float) -> str:
    """Axis tick text: compact, no float noise."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}"
    if value == int(value):  # 10,000, not 1e+04
        return f"{int(value):,}"
    return f"{value:,.4g}"


# -------------------------------------------------------------------- colors

_PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777",
            "#4f46e5", "#65a30d", "#0d9488", "#c2410c", "#7c3aed", "#be123c", "#0369a1", "#a16207"]
_REFERENCE_COLOR = "#6b7280"
_MARKERS = ["circle", "square", "triangle", "diamond"]


def _variant_colors(records: Sequence[Record]) -> dict[str, str]:
    variants = sorted({str(r.case.get("variant", "")) for r in records}, key=lambda v: (v != REFERENCE, v))
    colors, i = {}, 0
    for v in variants:
        if v == REFERENCE:
            colors[v] = _REFERENCE_COLOR
        else:
            colors[v] = _PALETTE[i % len(_PALETTE)]
            i += 1
    return colors


def _variant_order(colors: dict[str, str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(colors)}


def _dtype_markers(records: Sequence[Record]) -> dict[str, str]:
    """dtype -> the marker its points take in the scatter charts, in order of appearance."""
    dtypes = list(dict.fromkeys(str(r.case.get("dtype", "")) for r in records))
    return {d: _MARKERS[i % len(_MARKERS)] for i, d in enumerate(dtypes)}


def _marker_key(markers: dict[str, str], shown: set[str]) -> str:
    """The caption's key of the dtype markers shown."""
    return " ".join(f'<span class="marker-key">{_MARKER_GLYPH[m]} {_esc(d)}</span>' for d, m in markers.items()
                    if d in shown)


# -------------------------------------------------------------------- SVG charts


def _nice_step(span: float, n: int = 5) -> float:
    raw = span / n if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = _nice_step(hi - lo, n)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-6:
        if t >= lo - step * 1e-6:
            ticks.append(round(t, 12))
        t += step
    return ticks


def _svg_open(name: str, heading: str, width: float, height: float, **attrs: str) -> str:
    """An SVG chart's opening tag (data-chart, data-* attributes) and its title."""
    extra = "".join(f' data-{k.replace("_", "-")}="{_esc(v)}"' for k, v in attrs.items())
    return (f'<svg class="chart" data-chart="{_esc(name)}"{extra} width="{width:.0f}" height="{height:.0f}"'
            f' viewBox="0 0 {width:.0f} {height:.0f}" role="img" xmlns="http://www.w3.org/2000/svg">'
            f'<title>{_esc(heading)}</title>')


def _no_data(name: str, heading: str, why: str = "no data", figure: str = '<figure class="figure">',
             **attrs: str) -> Markup:
    extra = "".join(f' data-{k}="{_esc(v)}"' for k, v in attrs.items())
    return Markup(f'{figure}<figcaption>{_esc(heading)}</figcaption>'
                  f'<div class="chart nodata" data-chart="{_esc(name)}"{extra}>{_esc(why)}</div></figure>')


class _Bar:
    def __init__(self, variant: str, value: float | None, tip: str):
        self.variant, self.value, self.tip = variant, value, tip


class _Group:
    def __init__(self, lines: list[str], bars: list[_Bar]):
        self.lines, self.bars = lines, bars


def _bar_chart(name: str, heading: str, groups: list[_Group], colors: dict[str, str], *, y_label: str,
               value_fmt: str, baseline: float | None = None, baseline_label: str = "",
               value_labels: bool = False, caption: str = "", **attrs: str) -> Markup:
    values = [b.value for g in groups for b in g.bars if b.value is not None]
    if not values:
        return _no_data(name, heading, **attrs)
    top = max(values + ([baseline] if baseline is not None else []))
    top = top if top > 0 else 1.0
    step = _nice_step(top)
    y_max = step * math.ceil(top * 1.02 / step)  # headroom above the tallest bar
    ticks = _ticks(0.0, y_max)
    bar_w, bar_gap, pad = 14, 2, 18
    n_lines = max(len(g.lines) for g in groups)
    ml, mr, mt, plot_h = 68, (16 + 7 * len(baseline_label) if baseline is not None else 16), 44 if value_labels \
        else 14, 220
    mb = 14 * n_lines + 12
    widths = [max(len(g.bars) * (bar_w + bar_gap) + pad, 86) for g in groups]
    width = ml + sum(widths) + mr
    height = mt + plot_h + mb

    def y_of(v: float) -> float:
        return mt + plot_h * (1 - v / y_max)

    out = [_svg_open(name, heading, width, height, **attrs)]
    for t in ticks:
        y = y_of(t)
        out.append(f'<line class="grid" x1="{ml}" x2="{width - mr}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{_esc(_short(t))}</text>')
    out.append(f'<text class="axis-label" transform="translate(14 {mt + plot_h / 2:.0f}) rotate(-90)"'
               f' text-anchor="middle">{_esc(y_label)}</text>')
    x = ml
    for gi, (group, gw) in enumerate(zip(groups, widths)):
        if gi % 2:
            out.append(f'<rect class="group-bg" x="{x}" y="{mt}" width="{gw}" height="{plot_h}"/>')
        inner = len(group.bars) * (bar_w + bar_gap) - bar_gap
        bx = x + (gw - inner) / 2
        for bar in group.bars:
            color = colors.get(bar.variant, _REFERENCE_COLOR)
            if bar.value is None:
                out.append(f'<text class="missing" x="{bx + bar_w / 2:.1f}" y="{mt + plot_h - 4}"'
                           f' text-anchor="middle"><title>{_esc(bar.tip)}</title>×</text>')
            else:
                y = y_of(bar.value)
                h = max(mt + plot_h - y, 0.5)
                out.append(f'<rect class="bar" x="{bx:.1f}" y="{y:.1f}" width="{bar_w}" height="{h:.1f}"'
                           f' fill="{color}" data-variant="{_esc(bar.variant)}" data-value="{bar.value!r}">'
                           f'<title>{_esc(bar.tip)}</title></rect>')
                if value_labels:
                    out.append(f'<text class="value" transform="translate({bx + bar_w / 2 + 3:.1f} {y - 3:.1f})'
                               f' rotate(-90)">{_esc(value_fmt.format(bar.value))}</text>')
            bx += bar_w + bar_gap
        chars = max(int(gw / 6.2), 4)
        for li, line in enumerate(group.lines):
            text = line if len(line) <= chars else line[:chars - 1] + "…"
            out.append(f'<text class="group-label" x="{x + gw / 2:.1f}" y="{mt + plot_h + 14 * (li + 1)}"'
                       f' text-anchor="middle"><title>{_esc(" · ".join(group.lines))}</title>{_esc(text)}</text>')
        x += gw
    if baseline is not None:
        y = y_of(baseline)
        out.append(f'<line class="baseline" x1="{ml}" x2="{width - mr + 4}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="baseline-label" x="{width - mr + 6}" y="{y + 3:.1f}">{_esc(baseline_label)}</text>')
    out.append(f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + plot_h}"/>'
               f'<line class="axis" x1="{ml}" x2="{width - mr}" y1="{mt + plot_h}" y2="{mt + plot_h}"/></svg>')
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    return Markup(f'<figure class="figure"><figcaption>{_esc(heading)}</figcaption>'
                  f'<div class="scroll">{"".join(out)}</div>{cap}</figure>')


def _marker(kind: str, cx: float, cy: float, cls: str, color: str, attrs: str, tip: str) -> str:
    common = f'class="{cls}" fill="{color}"{attrs}'
    title = f"<title>{_esc(tip)}</title>"
    if kind == "square":
        return f'<rect {common} x="{cx - 4.5:.1f}" y="{cy - 4.5:.1f}" width="9" height="9">{title}</rect>'
    if kind == "triangle":
        pts = f"{cx:.1f},{cy - 6:.1f} {cx + 5.5:.1f},{cy + 4:.1f} {cx - 5.5:.1f},{cy + 4:.1f}"
        return f'<polygon {common} points="{pts}">{title}</polygon>'
    if kind == "diamond":
        pts = f"{cx:.1f},{cy - 6:.1f} {cx + 6:.1f},{cy:.1f} {cx:.1f},{cy + 6:.1f} {cx - 6:.1f},{cy:.1f}"
        return f'<polygon {common} points="{pts}">{title}</polygon>'
    return f'<circle {common} cx="{cx:.1f}" cy="{cy:.1f}" r="5">{title}</circle>'


def _scatter(workload: str, metric: str, points: list[dict], colors: dict[str, str],
             markers: dict[str, str], hidden: bool, over: str) -> Markup:
    label = {"kl": "KL mean", "ppl": "|Δperplexity| %"}[metric]
    heading = f"Speed vs drift — {workload} speedup over {over} vs {label}"
    attrs = {"workload": workload, "metric": metric}
    hide = " hidden" if hidden else ""
    if not points:
        return _no_data("pareto", heading, "no data: no point has both a speedup and a drift",
                        f'<figure class="figure pareto-fig" data-metric="{metric}"'
                        f' data-workload="{_esc(workload)}"{hide}>', **attrs)
    front: set[int] = set()
    lines: list[list[int]] = []
    by_model: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(points):
        by_model[p["model"]].append(i)
    for idx in by_model.values():
        f = pareto_front([(points[i]["x"], points[i]["y"]) for i in idx])
        front.update(idx[k] for k in f)
        lines.append([idx[k] for k in f])

    ml, mr, mt, mb, plot_w, plot_h = 76, 150, 14, 44, 560, 280
    width, height = ml + plot_w + mr, mt + plot_h + mb
    xs = [p["x"] for p in points] + [1.0]
    x_lo, x_hi = min(xs), max(xs)
    span = x_hi - x_lo or 0.2
    x_lo, x_hi = x_lo - 0.08 * span, x_hi + 0.08 * span
    positive = [p["y"] for p in points if p["y"] > 0]
    has_zero = any(p["y"] <= 0 for p in points)
    if positive:
        lo_dec = math.floor(math.log10(min(positive)))
        hi_dec = math.ceil(math.log10(max(positive)))
        hi_dec = max(hi_dec, lo_dec + 1)
    else:
        lo_dec, hi_dec = -1, 0
    zero_dec = lo_dec - 1 if has_zero else lo_dec
    bottom = zero_dec

    def x_of(v: float) -> float:
        return ml + plot_w * (v - x_lo) / (x_hi - x_lo)

    inset = 12  # keep points off the axes

    def y_of(v: float) -> float:
        d = math.log10(v) if v > 0 else zero_dec
        return mt + inset + (plot_h - 2 * inset) * (1 - (d - bottom) / (hi_dec - bottom))

    out = [_svg_open("pareto", heading, width, height, workload=workload, metric=metric)]
    step = max(1, math.ceil((hi_dec - lo_dec) / 8))
    for d in range(lo_dec, hi_dec + 1, step):
        y = y_of(10.0 ** d)
        out.append(f'<line class="grid" x1="{ml}" x2="{ml + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
    if has_zero:
        y = y_of(0.0)
        out.append(f'<line class="grid zero" x1="{ml}" x2="{ml + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">0</text>')
    for t in _ticks(x_lo, x_hi, 6):
        xv = x_of(t)
        out.append(f'<line class="grid" x1="{xv:.1f}" x2="{xv:.1f}" y1="{mt}" y2="{mt + plot_h}"/>'
                   f'<text class="tick" x="{xv:.1f}" y="{mt + plot_h + 16}" text-anchor="middle">'
                   f'{_esc(_short(t))}×</text>')
    x1 = x_of(1.0)
    out.append(f'<line class="baseline" x1="{x1:.1f}" x2="{x1:.1f}" y1="{mt}" y2="{mt + plot_h}"/>')
    out.append(f'<text class="axis-label" x="{ml + plot_w / 2:.0f}" y="{height - 6}" text-anchor="middle">'
               f'speedup over {_esc(over)} ({_esc(workload)}, geometric mean over shapes) →</text>'
               f'<text class="axis-label" transform="translate(14 {mt + plot_h / 2:.0f}) rotate(-90)"'
               f' text-anchor="middle">{_esc(label)} (log) ↑ worse</text>')
    for line in lines:
        if len(line) > 1:
            pts = " ".join(f"{x_of(points[i]['x']):.1f},{y_of(points[i]['y']):.1f}" for i in line)
            out.append(f'<polyline class="pareto-front" points="{pts}"/>')
    label_all = len(points) <= 10
    for i, p in enumerate(points):
        cx, cy = x_of(p["x"]), y_of(p["y"])
        cls = "point pareto" if i in front else "point"
        attrs_s = (f' data-model="{_esc(p["model"])}" data-variant="{_esc(p["variant"])}"'
                   f' data-dtype="{_esc(p["dtype"])}" data-x="{p["x"]!r}" data-y="{p["y"]!r}"')
        out.append(_marker(markers.get(p["dtype"], "circle"), cx, cy, cls,
                           colors.get(p["variant"], _REFERENCE_COLOR), attrs_s, p["tip"]))
        if label_all or i in front:
            out.append(f'<text class="point-label" x="{cx + 8:.1f}" y="{cy + 4:.1f}">'
                       f'{_esc(p["variant"])} · {_esc(p["dtype"])}</text>')
    out.append(f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + plot_h}"/>'
               f'<line class="axis" x1="{ml}" x2="{ml + plot_w}" y1="{mt + plot_h}" y2="{mt + plot_h}"/></svg>')
    legend = _marker_key(markers, {p["dtype"] for p in points})
    over_what = "its baseline" if over != REFERENCE else "the reference of the same dtype"
    caption = (f'Each point is a (model, variant, dtype): x is its {_esc(workload)} speedup over {over_what}, '
               f'y its drift against the fp32 reference (mean over its drift cases). '
               f'Outlined points joined by the line are the Pareto front per model: the fastest for a given '
               f'drift. Markers: {legend}')
    return Markup(f'<figure class="figure pareto-fig" data-metric="{metric}" data-workload="{_esc(workload)}"{hide}>'
                  f'<figcaption>{_esc(heading)}</figcaption><div class="scroll">{"".join(out)}</div>'
                  f'<p class="caption">{caption}</p></figure>')


_MARKER_GLYPH = {"circle": "●", "square": "■", "triangle": "▲", "diamond": "◆"}

# -------------------------------------------------------------------- chart data

def _groups(records: list[Record], value, tip, order: dict[str, int], multi: dict[str, bool]) -> list[_Group]:
    """Records grouped by their case without the variant; one bar per variant."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(case_key(r.case, variant=""), []).append(r)
    out = []
    for members in groups.values():
        members.sort(key=lambda r: order.get(str(r.case.get("variant")), 1 << 30))
        c = members[0].case
        lines = [shape_label(c) or "-", str(c.get("dtype", ""))]
        if multi["workload"]:
            lines.insert(0, str(c.get("workload", "")))
        if multi["model"]:
            lines.append(str(c.get("model", "")))
        if multi["device"]:
            lines.append(str(c.get("device", "")))
        out.append(_Group(lines, [_Bar(str(r.case.get("variant", "")), value(r), tip(r)) for r in members]))
    return out


def _multi(records: list[Record]) -> dict[str, bool]:
    return {k: len({str(r.case.get(k)) for r in records}) > 1 for k in ("model", "device", "workload")}


def _tip(r: Record, what: str, value: float | None, fmt: str) -> str:
    head = f"{r.case.get('variant')} — {r.case_id}"
    if r.status != "ok":
        return f"{head}: {r.status}" + (f": {r.reason}" if r.reason else "")
    return f"{head}: {what} " + ("n/a" if value is None else fmt.format(value))


def _workloads(records: list[Record]) -> list[str]:
    return list(dict.fromkeys(str(r.case.get("workload", "")) for r in records))


def _latency_charts(speed: list[Record], colors: dict[str, str]) -> Markup:
    workloads = _workloads(speed)
    if not workloads:
        return _no_data("latency", "Latency", "no data: no speed cases")
    parts = []
    for w in workloads:
        rs = [r for r in speed if r.case.get("workload") == w]
        unit = latency_unit(w)
        groups = _groups(rs, latency_p50, lambda r: _tip(r, "p50", latency_p50(r), "{:,.3f} ms"),
                         _variant_order(colors), {**_multi(rs), "workload": False})
        parts.append(_bar_chart("latency", f"{w}: latency p50 ({unit}), lower is better", groups, colors,
                                y_label=unit, value_fmt="{:.3g}", workload=w))
    return Markup("".join(parts))


def _token_charts(speed: list[Record], colors: dict[str, str]) -> Markup:
    def tps(r):
        return _num(r.metrics.get("tokens_per_s")) if r.status == "ok" else None

    workloads = [w for w in _workloads(speed) if any(r.case.get("workload") == w and tps(r) is not None
                                                     for r in speed)]
    if not workloads:
        return _no_data("tokens", "Tokens per second", "no data: no case reports tokens/s")
    parts = []
    for w in workloads:
        rs = [r for r in speed if r.case.get("workload") == w and (tps(r) is not None or r.status != "ok")]
        groups = _groups(rs, tps, lambda r: _tip(r, "tokens/s", tps(r), "{:,.1f}"), _variant_order(colors),
                         {**_multi(rs), "workload": False})
        parts.append(_bar_chart("tokens", f"{w}: tokens per second, higher is better", groups, colors,
                                y_label="tokens/s", value_fmt="{:.3g}", workload=w))
    return Markup("".join(parts))


def _speedup_chart(speed: list[Record], colors: dict[str, str], speedup: dict[str, Speedup], over: str) -> Markup:
    paired = [r for r in speed if r.case_id in speedup and speedup[r.case_id].baseline_id != r.case_id]
    if not paired:
        named = any(r.baseline_id for r in speed)
        none = not named and not any(r.case.get("variant") == REFERENCE for r in speed)
        why = "no data: no reference cases to compare with" if none else "no data: no paired cases"
        return _no_data("speedup", f"Speedup over {over}", why)
    groups = _groups(paired, lambda r: speedup[r.case_id].ratio,
                     lambda r: f"{r.case.get('variant')} — {r.case_id}: {speedup[r.case_id].summary()}",
                     _variant_order(colors), _multi(paired))
    if over == REFERENCE:
        heading, caption = ("Speedup over the reference variant (same case), higher is better",
                            "Ratio of latency_ms_p50: reference over the variant, for the same model, workload, "
                            "dtype, device and shape.")
    else:
        heading, caption = ("Speedup over the baseline, higher is better",
                            "Ratio of latency_ms_p50: the baseline the matrix names over the case (from paired "
                            "rounds where both ran interleaved; the table's tooltips give the interval); a case "
                            "whose matrix names none is measured against the reference variant of the same case.")
    word = "reference" if over == REFERENCE else "baseline"
    return _bar_chart("speedup", heading, groups, colors, y_label=f"× {word} latency", value_fmt="{:.2f}×",
                      baseline=1.0, baseline_label=f"{word} = 1×", value_labels=True, caption=caption)


def _limit_chart(speed: list[Record], colors: dict[str, str]) -> Markup:
    def pct(r):
        return _num(r.metrics.get("pct_of_limit"))

    limit = [r for r in speed if r.status == "ok" and pct(r) is not None]
    if not limit:
        return _no_data("limit", "% of the hardware limit")
    groups = _groups(limit, pct, lambda r: _tip(r, "% of limit", pct(r), "{:.1f}%") +
                     (f" ({r.metrics.get('bound')}-bound)" if r.metrics.get("bound") else ""),
                     _variant_order(colors), _multi(limit))
    return _bar_chart("limit", "% of the hardware limit (roofline time over measured time)", groups,
                      colors, y_label="% of limit", value_fmt="{:.0f}%", baseline=100.0,
                      baseline_label="roofline", caption="The limit is max(FLOPs / peak FLOP/s, "
                      "bytes / peak bandwidth) with the machine's measured peaks.")


def _pareto_points(records: list[Record], workload: str, metric: str, speedup: dict[str, Speedup],
                   over: str) -> list[dict]:
    key = {"kl": "kl_mean", "ppl": "ppl_delta_pct"}[metric]
    drift: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        value = _num(r.metrics.get(key))
        if r.status == "ok" and r.case.get("workload") == DRIFT and value is not None:
            c = r.case
            value = abs(value) if metric == "ppl" else max(value, 0.0)
            drift[(c.get("model"), c.get("variant"), c.get("dtype"), c.get("device"))].append(value)
            drift[(c.get("model"), c.get("variant"), c.get("dtype"), None)].append(value)
    ratios: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.case.get("workload") == workload and r.case_id in speedup:
            c = r.case
            key = (c.get("model"), c.get("variant"), c.get("dtype"), c.get("device"))
            ratios[key].append(speedup[r.case_id].ratio)
    points = []
    for (model, variant, dtype, device), xs in ratios.items():
        ys = drift.get((model, variant, dtype, device)) or drift.get((model, variant, dtype, None))
        if not ys:
            continue
        x = math.exp(sum(math.log(v) for v in xs) / len(xs))
        y = sum(ys) / len(ys)
        y_text = f"{y:.3e}" if metric == "kl" else f"{y:.3f}%"
        tip = (f"{model} · {variant} · {dtype} · {device}: {x:.3f}× over {over} "
               f"(geomean of {len(xs)} {workload} case{'s' if len(xs) > 1 else ''}); "
               f"{'KL mean' if metric == 'kl' else '|Δppl|'} {y_text}")
        points.append({"model": str(model), "variant": str(variant), "dtype": str(dtype), "x": x, "y": y,
                       "tip": tip})
    return points


def _pareto_charts(records: list[Record], colors: dict[str, str], speedup: dict[str, Speedup], over: str) -> Markup:
    markers = _dtype_markers(records)
    workloads = list(dict.fromkeys(str(r.case.get("workload")) for r in records
                                   if is_speed_record(r) and r.case_id in speedup))
    parts = []
    has_drift = any(r.case.get("workload") == DRIFT and r.status == "ok" for r in records)
    if not workloads or not has_drift:
        why = "no data: " + ("no drift cases" if not has_drift else f"no speed cases paired with {over}")
        parts.append(_no_data("pareto", "Speed vs drift", why))
    for w in workloads:
        for metric in ("kl", "ppl"):
            parts.append(_scatter(w, metric, _pareto_points(records, w, metric, speedup, over), colors, markers,
                                  hidden=metric != "kl", over=over))
    return Markup("".join(parts))


def _layout_pictures(records: list[Record]) -> Markup:
    """Block-sparse attention layouts (metric `attention_layout`: rows of hex digits
    0..f, the share of active blocks per cell, joined by '/') as small SVG grids."""
    figures = []
    seen = set()
    for r in records:
        grid = r.metrics.get("attention_layout")
        if r.status != "ok" or not isinstance(grid, str):
            continue
        rows = [row for row in grid.split("/") if row]
        key = (str(r.case.get("variant")), r.case.get("prompt_len"), grid)
        if not rows or key in seen or any(c not in "0123456789abcdef" for row in rows for c in row):
            continue
        seen.add(key)
        cell = max(2, 128 // max(len(rows), 1))
        rects = "".join(f'<rect x="{j * cell}" y="{i * cell}" width="{cell}" height="{cell}" '
                        f'fill-opacity="{int(c, 16) / 15:.2f}"/>'
                        for i, row in enumerate(rows) for j, c in enumerate(row) if c != "0")
        size = cell * len(rows)
        density = _num(r.metrics.get("attention_density"))
        caption = f"{r.case.get('variant')}, seq {r.case.get('prompt_len')}" + (
            f", density {density:.1%}" if density is not None else "")
        figures.append(f'<figure class="figure layout" data-case-id="{_esc(r.case_id)}">'
                       f'<svg class="chart" data-chart="layout" width="{size}" height="{size}" '
                       f'viewBox="0 0 {size} {size}" role="img" aria-label="{_esc(caption)}">'
                       f'<rect width="{size}" height="{size}" fill="none" stroke="#999"/>'
                       f'<g fill="#1f77b4">{rects}</g></svg><figcaption>{_esc(caption)}</figcaption></figure>')
    return Markup("".join(figures))


# -------------------------------------------------------------------- roofline and sweeps


def _decade(d: int) -> str:
    """A log axis's tick at 10**d: 0.01, 100, 10,000; 1e-05 beyond."""
    return f"{10.0 ** d:,g}" if -3 <= d <= 4 else f"1e{d}"


def _si(value: float) -> str:
    """A rate with an SI prefix, for FLOP/s ticks: 100 M, 10 G, 1 T."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:g} {prefix}"
    return f"{value:g}"


def _spread(ys: list[float], gap: float, low: float, high: float) -> list[float]:
    """Label positions at least `gap` apart, as near their own y as that allows, within [low, high]."""
    order = sorted(range(len(ys)), key=lambda i: ys[i])
    out = list(ys)
    for prev, i in zip([None, *order], order):
        out[i] = max(out[i], low) if prev is None else max(out[i], out[prev] + gap)
    for nxt, i in zip([None, *order[::-1]], order[::-1]):  # the last ones back up inside
        out[i] = min(out[i], high) if nxt is None else min(out[i], out[nxt] - gap)
    return out


def _roofline_chart(roof: Roofline, markers: dict[str, str], colors: dict[str, str], several: bool) -> Markup:
    heading = f"Roofline — {roof.device}" + (f" (peaks measured {roof.measured_at})" if several else "")
    ml, mr, mt, mb, plot_w, plot_h = 64, 200, 14, 46, 560, 320
    width, height = ml + plot_w + mr, mt + plot_h + mb
    ridges = [r for r in (roof.ridge(d) for d in roof.compute) if r is not None]
    xs = [p.intensity for p in roof.points] + ridges
    ys = [p.flops_per_s for p in roof.points]
    x_lo, x_hi = math.floor(math.log10(min(xs) / 1.5)), math.ceil(math.log10(max(xs) * 1.5))
    y_lo = math.floor(math.log10(min(ys) / 1.5))
    y_hi = max(math.ceil(math.log10(max(ys + list(roof.compute.values())) * 1.2)), y_lo + 1)

    def x_of(v: float) -> float:
        return ml + plot_w * (math.log10(v) - x_lo) / (x_hi - x_lo)

    def y_of(v: float) -> float:
        return mt + plot_h * (1 - (math.log10(v) - y_lo) / (y_hi - y_lo))

    out = [_svg_open("roofline", heading, width, height, device=roof.device)]
    for d in range(x_lo, x_hi + 1):
        x = x_of(10.0 ** d)
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + plot_h}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{mt + plot_h + 18}" text-anchor="middle">{_decade(d)}</text>')
    for d in range(y_lo, y_hi + 1):
        y = y_of(10.0 ** d)
        out.append(f'<line class="grid" x1="{ml}" x2="{ml + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{_si(10.0 ** d)}</text>')
    out.append(f'<text class="axis-label" x="{ml + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">'
               f'arithmetic intensity (FLOP per byte moved), log scale →</text>'
               f'<text class="axis-label" transform="translate(14 {mt + plot_h / 2:.0f}) rotate(-90)"'
               f' text-anchor="middle">achieved FLOP/s, log scale ↑</text>')
    top, right = 10.0 ** y_hi, 10.0 ** x_hi
    if roof.bandwidth:
        start = max(10.0 ** x_lo, 10.0 ** y_lo / roof.bandwidth)
        end = min(right, top / roof.bandwidth, max(ridges) if ridges else right)  # then the flat roofs
        if end > start:
            x1, y1, x2, y2 = x_of(start), y_of(start * roof.bandwidth), x_of(end), y_of(end * roof.bandwidth)
            angle = math.degrees(math.atan2(y2 - y1, x2 - x1))
            out.append(f'<line class="ceiling bandwidth" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}">'
                       f'<title>measured copy bandwidth {roof.bandwidth / 1e9:.3g} GB/s</title></line>'
                       f'<text class="ceiling-label" transform="translate({x1 + 0.1 * (x2 - x1):.1f}'
                       f' {y1 + 0.1 * (y2 - y1) - 5:.1f}) rotate({angle:.1f})">'
                       f'memory: {roof.bandwidth / 1e9:.3g} GB/s (copy)</text>')
    peaks = sorted(roof.compute.items(), key=lambda kv: -kv[1])
    label_ys = _spread([y_of(peak) + 4 for _, peak in peaks], 13, mt + 4, mt + plot_h)
    for (dtype, peak), label_y in zip(peaks, label_ys):
        y = y_of(peak)
        x1 = x_of(max(roof.ridge(dtype) or 10.0 ** x_lo, 10.0 ** x_lo))
        glyph = _MARKER_GLYPH[markers.get(dtype, "circle")]
        out.append(f'<line class="ceiling compute" data-dtype="{_esc(dtype)}" x1="{x1:.1f}" x2="{ml + plot_w}"'
                   f' y1="{y:.1f}" y2="{y:.1f}"><title>measured {_esc(dtype)} GEMM peak {peak / 1e12:.3g} TFLOP/s'
                   f'</title></line><text class="ceiling-label" x="{ml + plot_w + 6}" y="{label_y:.1f}">{glyph} '
                   f'{_esc(dtype)} GEMM {peak / 1e12:.3g} TFLOP/s</text>')
    for p in roof.points:
        tip = (f"{p.case_id}: {p.intensity:.3g} FLOP/byte, {_si(p.flops_per_s)}FLOP/s"
               + (f", {p.pct_of_limit:.0f}% of its limit" if p.pct_of_limit is not None else ""))
        attrs = (f' data-case-id="{_esc(p.case_id)}" data-variant="{_esc(p.variant)}" data-dtype="{_esc(p.dtype)}"'
                 f' data-x="{p.intensity!r}" data-y="{p.flops_per_s!r}"')
        out.append(_marker(markers.get(p.dtype, "circle"), x_of(p.intensity), y_of(p.flops_per_s), "point",
                           colors.get(p.variant, _REFERENCE_COLOR), attrs, tip))
    out.append(f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + plot_h}"/>'
               f'<line class="axis" x1="{ml}" x2="{ml + plot_w}" y1="{mt + plot_h}" y2="{mt + plot_h}"/></svg>')
    ceilings = ("The diagonal is the measured copy bandwidth, each flat line a dtype's measured GEMM peak; "
                "a case cannot rise above the lower of the two at its intensity. " if roof.compute and roof.bandwidth
                else f"No peaks were recorded for {_esc(roof.device)}: points only. ")
    caption = (f"Each point is a case, coloured by variant: x its FLOPs over the bytes it must move, y its FLOPs "
               f"over its median time (the roofline's counts; decode per output token). {ceilings}"
               f"Drift cases and cases timed in the Triton interpreter are left out. Markers: "
               f"{_marker_key(markers, {p.dtype for p in roof.points})}")
    return Markup(f'<figure class="figure"><figcaption>{_esc(heading)}</figcaption>'
                  f'<div class="scroll">{"".join(out)}</div><p class="caption">{caption}</p></figure>')


def _roofline_charts(records: list[Record], colors: dict[str, str]) -> Markup:
    roofs = rooflines(records)
    if not roofs:
        return _no_data("roofline", "Roofline", "no data: no speed case with FLOPs, bytes and achieved FLOP/s")
    markers = _dtype_markers(records)
    several = len({roof.device for roof in roofs}) < len(roofs)
    return Markup("".join(_roofline_chart(roof, markers, colors, several) for roof in roofs))


def _x_text(along: str, value: float) -> str:
    return f"{100 * value:.3g}%" if along == DENSITY else f"{value:,.6g}"


def _sweep_chart(sweep: Sweep, colors: dict[str, str], *, chart: str = "sweep",
                 hollow: frozenset[str] = frozenset(), dashed: frozenset[str] = frozenset(),
                 bound: tuple[float, str] | None = None, diagonal: bool = False) -> Markup:
    """A sweep's lines against its swept field. For the serving charts: `chart` names it
    (data-chart), points whose case id is in `hollow` are drawn hollow (missing the SLO),
    series named in `dashed` dashed (a static-batching baseline), `bound` (y, label) is a
    dashed level across the chart (the SLO's bound) and `diagonal` draws y = x (the offered
    load, over a goodput)."""
    workload = str(sweep.case.get("workload", ""))
    x_label, y_label = sweep_axis_label(sweep.along, workload), metric_label(sweep.metric, workload)
    heading = f"{workload}: {y_label.split(' (')[0]} against {x_label.split(' (')[0]}"
    fixed = " · ".join(str(x) for x in (sweep.case.get("model"), sweep.case.get("dtype"), sweep.case.get("device"),
                                        shape_label(sweep.case)) if x)
    ml, mr, mt, mb, plot_w, plot_h = 76, 24, 14, 46, 460, 230
    width, height = ml + plot_w + mr, mt + plot_h + mb
    xs = sorted({p.x for s in sweep.series for p in s.points})
    ys = [p.y for s in sweep.series for p in s.points] + [level.y for level in sweep.levels]
    ys += ([bound[0]] if bound is not None else []) + ([xs[0], xs[-1]] if diagonal else [])
    scale_x = (lambda v: math.log10(v)) if sweep.log_x else (lambda v: v)
    x_lo, x_hi = scale_x(xs[0]), scale_x(xs[-1])
    pad = 0.05 * (x_hi - x_lo) or 0.5  # one x (a serving metric at one rate only): room either side
    x_lo, x_hi = x_lo - pad, x_hi + pad
    # a goodput under y = x reads from 0 on a linear axis, as does one with a zero (no goodput)
    log_y = not diagonal and min(ys) > 0 and max(ys) > 8 * min(ys)
    if log_y:
        y_lo, y_hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        steps = (1, 2, 5) if y_hi - y_lo <= 2 else (1,)
        y_ticks = [m * 10.0 ** d for d in range(y_lo, y_hi + 1) for m in steps if m * 10.0 ** d <= 10.0 ** y_hi]
    else:
        step = _nice_step(max(ys))
        y_lo, y_hi = 0.0, step * max(math.ceil(max(ys) * 1.05 / step), 1)
        y_ticks = _ticks(0.0, y_hi)

    def x_of(v: float) -> float:
        return ml + plot_w * (scale_x(v) - x_lo) / (x_hi - x_lo)

    def y_of(v: float) -> float:
        frac = (math.log10(v) - y_lo) / (y_hi - y_lo) if log_y else (v - y_lo) / (y_hi - y_lo)
        return mt + plot_h * (1 - frac)

    out = [_svg_open(chart, heading, width, height, along=sweep.along, metric=sweep.metric, workload=workload,
                     x_scale="log" if sweep.log_x else "linear", y_scale="log" if log_y else "linear")]
    for t in y_ticks:
        y = y_of(t)
        out.append(f'<line class="grid" x1="{ml}" x2="{ml + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   f'<text class="tick" x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{_esc(_short(t))}</text>')
    last = -math.inf
    for v in xs:  # a tick at each swept value, thinned where they crowd
        x = x_of(v)
        if x - last < 40:
            continue
        last = x
        out.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + plot_h}"/>'
                   f'<text class="tick" x="{x:.1f}" y="{mt + plot_h + 18}" text-anchor="middle">'
                   f'{_esc(_x_text(sweep.along, v))}</text>')
    out.append(f'<text class="axis-label" x="{ml + plot_w / 2:.0f}" y="{height - 8}" text-anchor="middle">'
               f'{_esc(x_label)}{", log scale" if sweep.log_x else ""} →</text>'
               f'<text class="axis-label" transform="translate(14 {mt + plot_h / 2:.0f}) rotate(-90)"'
               f' text-anchor="middle">{_esc(y_label)}{", log scale" if log_y else ""}</text>')
    for level in sweep.levels:
        y = y_of(level.y)
        out.append(f'<line class="level" data-variant="{_esc(level.variant)}" x1="{ml}" x2="{ml + plot_w}"'
                   f' y1="{y:.1f}" y2="{y:.1f}" stroke="{colors.get(level.variant, _REFERENCE_COLOR)}">'
                   f'<title>{_esc(level.variant)} — {_esc(level.case_id)}: {level.y:,.4g} (no density: dense)'
                   f'</title></line>')
    if bound is not None:
        y = y_of(bound[0])
        label_y = y + 12 if y - mt < 14 else y - 4  # under the line when it runs along the top
        out.append(f'<line class="slo" data-y="{bound[0]!r}" x1="{ml}" x2="{ml + plot_w}" y1="{y:.1f}" y2="{y:.1f}">'
                   f'<title>{_esc(bound[1])}</title></line><text class="slo-label" x="{ml + plot_w - 4}"'
                   f' y="{label_y:.1f}" text-anchor="end">{_esc(bound[1])}</text>')
    if diagonal:  # y = x, sampled (the axes' scales may differ), where it is inside the plot
        along = [x_lo + (x_hi - x_lo) * i / 48 for i in range(49)]  # in the x axis's scale
        at = [v for v in (10 ** t if sweep.log_x else t for t in along)
              if v > 0 and y_lo <= (math.log10(v) if log_y else v) <= y_hi]
        if len(at) > 1:
            pts = " ".join(f"{x_of(v):.1f},{y_of(v):.1f}" for v in at)
            out.append(f'<polyline class="offered" points="{pts}"><title>offered load: goodput = rate</title>'
                       f'</polyline>')
    for s in sweep.series:
        color = colors.get(s.variant, _REFERENCE_COLOR)
        if len(s.points) > 1:
            pts = " ".join(f"{x_of(p.x):.1f},{y_of(p.y):.1f}" for p in s.points)
            cls = "series dashed" if s.name in dashed else "series"
            out.append(f'<polyline class="{cls}" data-series="{_esc(s.name)}" points="{pts}" stroke="{color}"/>')
        for p in s.points:
            missed = p.case_id in hollow
            paint = f'fill="#fff" style="stroke:{color}"' if missed else f'fill="{color}"'
            out.append(f'<circle class="{"point missed" if missed else "point"}" data-series="{_esc(s.name)}"'
                       f' data-case-id="{_esc(p.case_id)}" data-x="{p.x!r}" data-y="{p.y!r}" cx="{x_of(p.x):.1f}"'
                       f' cy="{y_of(p.y):.1f}" r="4" {paint}><title>{_esc(s.name)} — {_esc(p.case_id)}:'
                       f' {p.y:,.4g} ({_esc(y_label)}) at {_esc(_x_text(sweep.along, p.x))}'
                       f'{" — misses the SLO" if missed else ""}</title></circle>')
    out.append(f'<line class="axis" x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + plot_h}"/>'
               f'<line class="axis" x1="{ml}" x2="{ml + plot_w}" y1="{mt + plot_h}" y2="{mt + plot_h}"/></svg>')
    legend = "".join(f'<span data-series="{_esc(s.name)}">' + (
        f'<i class="dashed" style="border-color:{colors.get(s.variant, _REFERENCE_COLOR)}"></i>' if s.name in dashed
        else f'<i style="background:{colors.get(s.variant, _REFERENCE_COLOR)}"></i>') + f'{_esc(s.name)}</span>'
        for s in sweep.series)
    legend += "".join(f'<span data-variant="{_esc(v.variant)}"><i class="level" style="border-color:'
                      f'{colors.get(v.variant, _REFERENCE_COLOR)}"></i>{_esc(v.variant)} (dense)</span>'
                      for v in sweep.levels)
    if diagonal:
        legend += '<span class="offered-key"><i class="offered"></i>offered load (goodput = rate)</span>'
    return Markup(f'<figure class="figure sweep"><figcaption>{_esc(heading)}</figcaption>'
                  f'<p class="caption">{_esc(fixed)}</p><div class="scroll">{"".join(out)}</div>'
                  f'<div class="legend sweep-legend">{legend}</div></figure>')


def _sweep_charts(records: list[Record], colors: dict[str, str]) -> Markup:
    found = sweeps(records)
    if not found:
        return _no_data("sweep", "Sweeps", "no sweep: no cases differ in exactly one of prompt_len, kv_len, batch "
                                           "or attention density")
    return Markup("".join(_sweep_chart(sweep, colors) for sweep in found))


# the serving charts: (metric, the SLO field bounding it per request, the bound's label)
_SERVE_CHARTS = (("ttft_ms_p99", "slo_ttft_ms", "SLO: TTFT ≤ {:,.6g} ms"),
                 ("itl_ms_p99", "slo_itl_ms", "SLO: mean ITL ≤ {:,.6g} ms"),
                 ("goodput_rps", None, ""))


def _serving(records: list[Record], colors: dict[str, str]) -> dict | None:
    """The serving section: per rate sweep of the serve workload (serving_curves), its
    p99 TTFT and ITL against the offered rate (the SLO's bound dashed, points missing the
    SLO hollow), its goodput against the rate under y = x, and the table of each line's
    highest rate meeting the SLO. None when the run has no ok serve case."""
    if not any(r.status == "ok" and is_serve_record(r) for r in records):
        return None
    groups = []
    for curves in serving_curves(records):
        hollow = frozenset().union(*(line.missed for line in curves.lines))
        dashed = frozenset(line.name for line in curves.lines if line.batching != CONTINUOUS)
        charts = []
        for metric, slo, label in _SERVE_CHARTS:
            sweep = curves.sweep(metric)
            if not sweep.series:
                continue
            limit = getattr(curves, slo) if slo else None  # ServeCurves.slo_ttft_ms, .slo_itl_ms
            charts.append(_sweep_chart(sweep, colors, chart="serve", hollow=hollow, dashed=dashed,
                                       bound=None if limit is None else (limit, label.format(limit)),
                                       diagonal=metric == "goodput_rps"))
        rows = [{"name": line.name, "variant": line.variant, "max_rate": "" if line.max_rate is None
                 else repr(line.max_rate), "color": colors.get(line.variant, _REFERENCE_COLOR),
                 "cells": serve_table_row(line)} for line in curves.lines]
        groups.append({"label": curves.label, "slo": serve_slo_text(curves.case), "charts": Markup("".join(charts)),
                       "rows": rows})
    nodata = None if groups else _no_data("serve", "Serving", "no curve: no serve cases that differ only in the "
                                                              "offered rate (and variant) at two rates or more")
    return {"groups": groups, "heads": SERVE_TABLE_HEADERS, "nodata": nodata}


# -------------------------------------------------------------------- table

_CASE_COLUMNS = [  # key, header, numeric
    ("model", "model", False), ("variant", "variant", False), ("workload", "workload", False),
    ("dtype", "dtype", False), ("device", "device", False), ("batch", "batch", True),
    ("prompt_len", "prompt", True), ("new_tokens", "new", True), ("windows", "windows", True),
    ("op_shape", "op shape", False), ("status", "status", False), ("ran", "ran", False),
]
_FILTER_COLUMNS = ("model", "variant", "workload", "dtype", "status")
_TITLES = {"latency_ms_p50": "latency_ms_p50: median latency (per call; decode: per output token; "
                             "generate: per generation)",
           "latency_ms_ci_rel": "latency_ms_ci_rel: half-width of the median's 95% CI over the median",
           "speedup": "the baseline's latency_ms_p50 over this case's (from paired rounds when both ran "
                      "interleaved): the case the matrix names as baseline, else the same case under reference",
           "baseline": "the baseline the matrix names, where it differs from this case",
           "op_shape": "attention / linear shape",
           "ran": "the attention / linear implementation that really ran (attention_path, linear_path); "
                  "Triton interpreted: timings left out of charts and speedups",
           "pct_of_limit": "pct_of_limit: roofline time over measured time",
           "ttft_ms_p99": "ttft_ms_p99: 99th percentile of the requests' time to first token, ms (serve)",
           "itl_ms_p99": "itl_ms_p99: 99th percentile of every inter-token gap, ms (serve)",
           "goodput_rps": "goodput_rps: requests per second that met both bounds of the SLO (serve)",
           "slo_attainment": "slo_attainment: the share of requests that met both bounds of the SLO (serve)"}


def _op_shape(case: dict) -> str:
    """The shape fields without a column of their own (attention heads, linear features)."""
    return shape_label(case, without=[key for key, _, numeric in _CASE_COLUMNS if numeric])


def _data_value(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return ""
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


@dataclass(frozen=True)
class _Cell:
    """A results cell: `value` is its data-value (what the page sorts by), `text` what it shows."""

    col: str
    value: object
    text: object
    numeric: bool = False
    title: str | None = None
    badge: bool = False  # the text as a status badge
    peer: bool = False  # a peer badge after the text


def _case_cells(r: Record) -> list[_Cell]:
    c = r.case
    cells = []
    for key, _, numeric in _CASE_COLUMNS:
        if key == "status":
            cells.append(_Cell(key, r.status, r.status, title=r.reason, badge=True))
        elif key in ("op_shape", "ran"):
            text = _op_shape(c) if key == "op_shape" else ran(r)
            cells.append(_Cell(key, text, text))
        elif numeric:
            value = c.get(key)
            shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) and value else None
            cells.append(_Cell(key, _data_value(shown), shown, numeric=True))
        else:
            value = c.get(key, "")
            cells.append(_Cell(key, value, value, peer=key == "variant" and is_peer(r)))
    return cells


def _metric_cells(r: Record, columns: list[Column], speedup: dict[str, Speedup]) -> list[_Cell]:
    cells = []
    for col in columns:
        value = column_value(r, col, speedup)
        if col.metric == "latency_ms_ci_rel" and r.status == "ok" and value is None and \
                (_num(r.metrics.get("latency_ms_n")) or 6) < 6:
            value = float("inf")  # a CI of the median needs 6 samples at 95%
        s = speedup.get(r.case_id) if col.metric == SPEEDUP else None
        cells.append(_Cell(col.metric, _data_value(value) if col.numeric else col.text(value), col.text(value),
                           numeric=col.numeric, title=s.summary() if s is not None else None))
    return cells


def _table(records: list[Record], speedup: dict[str, Speedup]) -> dict:
    """The results table: its filters, headers and rows of cells (value: data-value, for sorting)."""
    columns = shown_columns(records, speedup)
    heads = [{"col": key, "header": header, "type": "num" if numeric else "text", "title": _TITLES.get(key, key)}
             for key, header, numeric in _CASE_COLUMNS]
    heads += [{"col": col.metric, "header": col.header, "type": "num" if col.numeric else "text",
               "title": _TITLES.get(col.metric, col.metric)} for col in columns]
    rows = [{"case_id": r.case_id, "status": r.status,
             "filters": [(col, r.status if col == "status" else r.case.get(col, "")) for col in _FILTER_COLUMNS],
             "cells": _case_cells(r) + _metric_cells(r, columns, speedup)} for r in records]
    filters = [(col, sorted({str(r.status if col == "status" else r.case.get(col, "")) for r in records}))
               for col in _FILTER_COLUMNS]
    return {"filters": filters, "heads": heads, "rows": rows}


def _problems(records: list[Record]) -> list[dict]:
    """The failed and skipped cases, failures first; a long reason folds under its last line."""
    out = []
    for r in sorted((r for r in records if r.status != "ok"), key=lambda r: (r.status != "failed", r.case_id)):
        reason = (r.reason or "(no reason recorded)").rstrip()
        lines = [ln for ln in reason.splitlines() if ln.strip()]
        folded = len(reason) > 300 or len(lines) > 3
        out.append({"status": r.status, "case_id": r.case_id, "reason": reason,
                    "summary": (lines[-1] if lines else reason[:200]) if folded else None})
    return out


# -------------------------------------------------------------------- header and environment


def _env_of(records: list[Record], env: dict | None) -> dict:
    if env:
        return env
    return next((r.env for r in records if r.env), {})


def _gpu_text(gpu: object) -> str:
    if not isinstance(gpu, dict):
        return str(gpu) if gpu else "none"
    mem = _num(gpu.get("memory_bytes"))
    return " · ".join(str(x) for x in (
        gpu.get("name"), f"{mem / 2**30:.0f} GiB" if mem else None,
        f"sm {gpu['capability']}" if gpu.get("capability") else None,
        f"CUDA {gpu['cuda']}" if gpu.get("cuda") else None,
        f"driver {gpu['driver']}" if gpu.get("driver") else None,
        f"×{gpu['count']}" if (gpu.get("count") or 1) > 1 else None) if x)


def _peaks(env: dict) -> list[dict]:
    out = []
    for device, peak in (env.get("peaks") or {}).items():
        if not isinstance(peak, dict):
            continue
        bw = _num(peak.get("bandwidth_gbs"))
        gemm = ", ".join(f"{d} {_num(v):.3g} TFLOP/s" for d, v in (peak.get("gemm_tflops") or {}).items()
                         if _num(v) is not None)
        out.append({"device": device, "bandwidth": f"{bw:.1f} GB/s copy" if bw is not None else "", "gemm": gemm,
                    "measured_at": peak.get("measured_at")})
    return out


def _env_section(records: list[Record], env: dict) -> dict | None:
    """The environment list: plain items before and after the Git SHA, which the
    template lays out with the eval text and the peaks."""
    if not env:
        return None
    versions = env.get("versions") or {}
    threads = [f"torch {env['torch_threads']}" if env.get("torch_threads") is not None else "",
               f"interop {env['torch_interop_threads']}" if env.get("torch_interop_threads") is not None else "",
               f"OMP_NUM_THREADS={env['omp_num_threads']}" if env.get("omp_num_threads") else ""]
    cpu = str(env.get("cpu") or "")
    if env.get("cpu_count"):
        cpu += f" · {env['cpu_count']} logical cores"
    if env.get("cpu_affinity"):
        cpu += f" · affinity {env['cpu_affinity']}"
    eval_text = env.get("eval_text")
    settings = env.get("settings") or {}
    return {
        "before_sha": [("Python", env.get("python")), ("torch", versions.get("torch")),
                       ("Platform", env.get("platform")), ("CPU", cpu), ("CPU features", cpu_features_text(env)),
                       ("GPU", _gpu_text(env.get("gpu"))), ("Threads", " · ".join(t for t in threads if t)),
                       ("Energy counters", energy_text(env) if env.get("energy") else None)],
        "sha": str(env.get("git_sha") or ""),
        "shas": sorted({str(r.env.get("git_sha")) for r in records if r.env.get("git_sha")}),
        "eval_text": ({"path": eval_text.get("path", ""), "sha256": eval_text.get("sha256", "")}
                      if isinstance(eval_text, dict) and eval_text else None),
        "peaks": _peaks(env),
        "after_sha": [("Versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "torch" and v)),
                      ("Settings", ", ".join(f"{k}={v}" for k, v in settings.items()))],
        "json": json.dumps(env, indent=2, sort_keys=True, default=str),
    }


def _summary(records: list[Record]) -> dict:
    started = sorted(r.started_at for r in records if r.started_at)
    distinct = {k: sorted({str(r.case.get(k, "")) for r in records})
                for k in ("model", "variant", "workload", "dtype", "device")}
    return {
        "cases": len(records),
        "counts": [(s, sum(r.status == s for r in records)) for s in ("ok", "skipped", "failed")],
        "started": (started[0] + (f" → {started[-1]}" if started[-1] != started[0] else "")) if started else "",
        "case_time": f"{sum(_num(r.duration_s) or 0.0 for r in records):,.1f} s" if records else "",
        "distinct": [(f"{k}s", ", ".join(v)) for k, v in distinct.items() if any(v)],
    }


# -------------------------------------------------------------------- page


@lru_cache(maxsize=1)
def _templates() -> Environment:
    """The page's templates (package data: templates/report.html.j2, report.css, report.js)."""
    return Environment(loader=PackageLoader("infermatrix.reports", "templates"), autoescape=True,
                       finalize=_esc, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                       undefined=StrictUndefined)


def _asset(name: str) -> Markup:
    """A stylesheet or script to inline as is: ours, not a record's."""
    environment = _templates()
    source, _, _ = environment.loader.get_source(environment, name)
    return Markup(source)


def render_html(records: list[Record], *, title: str = "infermatrix run", env: dict | None = None) -> str:
    """The whole report as one HTML document (no external resources)."""
    records = list(records)
    colors = _variant_colors(records)
    speedup = speedup_details(records)
    over = "the baseline" if any(s.named for s in speedup.values()) else REFERENCE
    speed = [r for r in records if is_speed_record(r)]
    script = _asset("report.js")
    return _templates().get_template("report.html.j2").render(
        title=title, css=_asset("report.css"), script=script,
        script_hash=base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii"),
        summary=_summary(records), env=_env_section(records, _env_of(records, env)),
        table=_table(records, speedup) if records else None,
        legend=list(colors.items()), over=over,
        charts={"latency": _latency_charts([r for r in speed if not is_serve_record(r)], colors),
                "tokens": _token_charts(speed, colors),
                "speedup": _speedup_chart(speed, colors, speedup, over), "limit": _limit_chart(speed, colors),
                "pareto": _pareto_charts(records, colors, speedup, over), "layouts": _layout_pictures(records),
                "sweeps": _sweep_charts(records, colors), "roofline": _roofline_charts(records, colors)},
        serving=_serving(records, colors),
        problems=_problems(records))


def write_html(records: list[Record], out_dir: Path, *, env: dict | None = None,
               title: str = "infermatrix run") -> Path:
    path = Path(out_dir) / HTML_FILE
    path.write_text(render_html(records, title=title, env=env), encoding="utf-8")
    return path
