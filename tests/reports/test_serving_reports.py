"""The reports of the serve workload: which serve cases make a rate sweep (a line per
variant and batching), each line's highest offered rate meeting the SLO, the Serving
sections of summary.md and report.html (drawn in Chromium), the serving metrics in
results.csv, the summary tables and the gate, and no generic sweep made of serve cases."""

import csv
import html
import sys
from pathlib import Path

import pytest

from infermatrix.reports.compare import CSV_METRICS, DIRECTION, HIGHER, LOWER
from infermatrix.reports.csv_report import write_csv
from infermatrix.reports.derived import (
    SERVE_TABLE_HEADERS, is_speed_metric, serve_line_name, serve_slo_text, serve_table_row, serving_curves,
    shape_label, shown_columns, sweeps,
)
from infermatrix.reports.gate import evaluate, parse_rule
from infermatrix.reports.html_report import render_html, write_html
from infermatrix.reports.markdown_report import render_markdown
from infermatrix.reports.record import Record
from infermatrix.reports.table import render_table

sys.path.insert(0, str(Path(__file__).parent))
from test_html_report import CHROMIUM, ENV, HOSTILE, chromium_page, overlapping, parse  # noqa: E402

SDPA, MATH = "sdpa+paged_kv_cache", "math+paged_kv_cache"
SLO = {"slo_ttft_ms": 2000.0, "slo_itl_ms": 200.0, "slo_pct": 90}
RATES = (0.5, 1.0, 2.0, 4.0)
SERVE_METRICS = ("ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "e2e_ms_p50",
                 "e2e_ms_p90", "e2e_ms_p99", "request_throughput", "tokens_per_s", "goodput_rps", "slo_attainment",
                 "meets_slo", "preemptions", "peak_kv_blocks", "kv_blocks", "requests_completed", "stream_s",
                 "offered_rate")


# ----------------------------------------------------------------- records like the serve workload's


def serve_case(variant=SDPA, rate=2.0, *, batching="continuous", prompt_len=256, new_tokens=64, concurrency=0,
               requests=64, slo=SLO, model="smollm2-135m"):
    return {"model": model, "variant": variant, "workload": "serve", "dtype": "float32", "device": "cpu",
            "batch": 0, "prompt_len": prompt_len, "new_tokens": new_tokens, "windows": 0, "kv_len": 0, "heads": 0,
            "kv_heads": 0, "head_dim": 0, "causal": True, "in_features": 0, "out_features": 0, "task": "continue",
            "rate": rate, "concurrency": concurrency, "requests": requests, **slo, "batching": batching}


def served(variant=SDPA, rate=2.0, *, ttft=100.0, itl=40.0, attainment=1.0, status="ok", metrics=None, **fields):
    """A serve record: its TTFT p99 `ttft` ms, ITL p99 `itl` ms, `attainment` of its
    requests meeting the SLO (meets_slo from it and slo_pct, absent without an SLO)."""
    c = serve_case(variant, rate, **fields)
    cid = (f"{c['model']}/{variant}/serve/float32/cpu/p{c['prompt_len']}-n{c['new_tokens']}-r{rate:g}"
           f"-c{c['concurrency']}-{c['batching']}")
    if status != "ok":
        return Record(case_id=cid, case=c, status=status, reason="boom", env=ENV)
    m = {"ttft_ms_p50": ttft / 3, "ttft_ms_p90": ttft / 2, "ttft_ms_p99": ttft, "itl_ms_p50": itl / 3,
         "itl_ms_p90": itl / 2, "itl_ms_p99": itl, "e2e_ms_p50": ttft + 64 * itl / 3, "e2e_ms_p90": ttft + 64 * itl / 2,
         "e2e_ms_p99": ttft + 64 * itl, "request_throughput": rate or 1.0, "tokens_per_s": 64 * (rate or 1.0),
         "goodput_rps": (rate or 1.0) * attainment, "slo_attainment": attainment, "preemptions": 0,
         "peak_kv_blocks": 24, "kv_blocks": 64, "requests_completed": 64, "stream_s": 64 / (rate or 1.0),
         "offered_rate": rate}
    if c.get("slo_pct"):
        m["meets_slo"] = 1.0 if attainment * 100 >= c["slo_pct"] else 0.0
    m.update(metrics or {})
    samples = {"ttft_ms": [ttft / 3, ttft / 2, ttft], "itl_ms": [itl / 3, itl / 2, itl],
               "e2e_ms": [m["e2e_ms_p50"], m["e2e_ms_p99"]]}
    return Record(case_id=cid, case=c, status="ok", metrics=m, samples=samples, env=ENV,
                  started_at="2026-11-28T13:14:57+00:00", duration_s=30.0)


# (line, rate) -> attainment: sdpa meets the SLO up to 2 req/s, math up to 1, static batching at 0.5 only
ATTAIN = {SDPA: (1.0, 1.0, 0.95, 0.5), MATH: (1.0, 0.92, 0.6, 0.2), "static": (0.9, 0.7, 0.4, 0.1)}


def rate_sweep(**fields):
    """Two variants under continuous batching and sdpa under static batching, at four rates."""
    out = []
    for rate, a_sdpa, a_math, a_static in zip(RATES, *ATTAIN.values()):
        out += [served(SDPA, rate, ttft=100 * rate, itl=30 + 10 * rate, attainment=a_sdpa, **fields),
                served(MATH, rate, ttft=300 * rate, itl=50 + 20 * rate, attainment=a_math, **fields),
                served(SDPA, rate, ttft=400 * rate, itl=40 + 30 * rate, attainment=a_static, batching="static",
                       **fields)]
    return out


def by_name(curves):
    return {line.name: line for line in curves.lines}


# ----------------------------------------------------------------- which curves


def test_a_rate_sweep_makes_a_line_per_variant_and_batching_and_other_shapes_their_own_group():
    records = rate_sweep()
    records += [served(SDPA, rate, prompt_len=512) for rate in (1.0, 2.0)]  # another prompt length: its own group
    records += [served(SDPA, 1.0, prompt_len=1024), served(MATH, 1.0, prompt_len=1024)]  # one rate: no curve
    records += [served(SDPA, 8.0, status="failed"), served(MATH, 8.0, status="skipped")]  # ignored
    records += [served(SDPA, 0.0, concurrency=c) for c in (2, 4)]  # closed loop: no rate to sweep
    first, second = serving_curves(records)
    assert [line.name for line in first.lines] == [MATH, SDPA, f"{SDPA} (static batching)"]
    assert [(line.variant, line.batching) for line in first.lines] == [
        (MATH, "continuous"), (SDPA, "continuous"), (SDPA, "static")]
    assert first.rates == RATES and all(tuple(p.rate for p in line.points) == RATES for line in first.lines)
    assert "variant" not in first.case and "rate" not in first.case and "batching" not in first.case
    assert first.case["prompt_len"] == 256 and first.case["workload"] == "serve"
    assert (first.slo_ttft_ms, first.slo_itl_ms, first.slo_pct) == (2000.0, 200.0, 90)
    sdpa = by_name(first)[SDPA]
    assert [(p.ttft_ms_p99, p.itl_ms_p99) for p in sdpa.points] == [(50.0, 35.0), (100.0, 40.0), (200.0, 50.0),
                                                                    (400.0, 70.0)]
    assert [p.tokens_per_s for p in sdpa.points] == [32.0, 64.0, 128.0, 256.0]
    assert [p.case_id for p in sdpa.points] == [r.case_id for r in records[:12:3]]
    assert second.case["prompt_len"] == 512 and [line.name for line in second.lines] == [SDPA]
    assert second.rates == (1.0, 2.0)
    assert serving_curves(records[-6:]) == []  # one rate, failed, closed loop
    assert first.label == "smollm2-135m · float32 · cpu · p256 n64 q64"


def test_a_case_run_twice_counts_once_and_interpreted_timings_not_at_all():
    again = served(SDPA, 1.0, ttft=999.0)
    interpreted = served(SDPA, 8.0, metrics={"triton_interpreted": True})
    [curves] = serving_curves([served(SDPA, 1.0), served(SDPA, 2.0), again, interpreted])
    [line] = curves.lines
    assert [(p.rate, p.ttft_ms_p99) for p in line.points] == [(1.0, 999.0), (2.0, 100.0)]  # the later record


def test_the_highest_rate_meeting_the_slo_and_its_goodput():
    curves = by_name(serving_curves(rate_sweep())[0])
    sdpa, math_, static = curves[SDPA], curves[MATH], curves[f"{SDPA} (static batching)"]
    assert (sdpa.max_rate, sdpa.goodput_at_max_rate) == (2.0, pytest.approx(1.9))
    assert (math_.max_rate, math_.goodput_at_max_rate) == (1.0, pytest.approx(0.92))
    assert (static.max_rate, static.goodput_at_max_rate) == (0.5, pytest.approx(0.45))
    assert sdpa.best.ttft_ms_p99 == 200.0 and sdpa.best.itl_ms_p99 == 50.0
    assert sdpa.missed == {sdpa.points[-1].case_id}
    assert serve_table_row(sdpa) == [SDPA, "2", "1.90", "200.0", "50.0"]

    # the highest rate that meets it, not the last before a miss; and a line meeting it at its last rate
    bumpy = [served(SDPA, r, attainment=a) for r, a in zip(RATES, (1.0, 0.5, 0.95, 0.1))]
    [line] = serving_curves(bumpy)[0].lines
    assert line.max_rate == 2.0
    always = [served(SDPA, r, ttft=10 * r) for r in RATES]
    [line] = serving_curves(always)[0].lines
    assert line.max_rate == 4.0 and serve_table_row(line)[1] == "4 (highest run)"

    # none meets it; no SLO given (no meets_slo): no verdict
    [line] = serving_curves([served(SDPA, r, attainment=0.5) for r in RATES])[0].lines
    assert line.best is None and line.max_rate is None and line.goodput_at_max_rate is None and line.judged
    assert serve_table_row(line) == [SDPA, "none", "", "", ""]
    [curves] = serving_curves([served(SDPA, r, slo={}) for r in RATES])
    [line] = curves.lines
    assert line.max_rate is None and not line.judged and line.missed == frozenset()
    assert serve_table_row(line) == [SDPA, "no SLO verdict", "", "", ""]
    assert curves.slo_ttft_ms is None and serve_slo_text(curves.case) == "none given"
    # a goodput of 0 is a figure, not a missing one
    [line] = serving_curves([served(SDPA, r, attainment=0.0) for r in RATES])[0].lines
    assert [p.goodput_rps for p in line.points] == [0.0] * 4


def test_names_labels_and_the_slo_in_words():
    assert serve_line_name(serve_case()) == SDPA
    assert serve_line_name(serve_case(batching="static")) == f"{SDPA} (static batching)"
    assert serve_slo_text(serve_case()) == ("TTFT ≤ 2,000 ms and mean inter-token latency ≤ 200 ms for at least "
                                            "90% of requests")
    assert serve_slo_text(serve_case(slo={"slo_itl_ms": 50.0})) == "mean inter-token latency ≤ 50 ms"
    # the load is in a serve case's shape label (tables tell its rows apart), the SLO is not
    assert shape_label(serve_case()) == "p256 n64 q64 2req/s"
    assert shape_label(serve_case(rate=0.5, batching="static")) == "p256 n64 q64 0.5req/s static-batching"
    assert shape_label(serve_case(rate=0.0, concurrency=8)) == "p256 n64 q64 8clients"
    assert shape_label(serve_case(), without=["rate", "requests"]) == "p256 n64"
    assert shape_label({"workload": "decode", "batch": 1, "prompt_len": 32, "new_tokens": 6}) == "b1 p32 n6"


def test_serve_cases_make_no_generic_sweep():
    # prompt lengths at one rate, even with a latency_ms_p50: the serving curves draw serve cases
    records = [served(v, 2.0, prompt_len=p, metrics={"latency_ms_p50": p / 10}) for p in (128, 256, 512)
               for v in (SDPA, MATH)]
    assert sweeps(records) == [] and sweeps(rate_sweep()) == []
    assert serving_curves(records) == []  # and no rate sweep either: one rate


def test_a_serving_curve_as_sweep_lines():
    curves = serving_curves(rate_sweep())[0]
    sweep = curves.sweep("goodput_rps")
    assert sweep.along == "rate" and sweep.metric == "goodput_rps" and sweep.case == curves.case
    assert [s.name for s in sweep.series] == [MATH, SDPA, f"{SDPA} (static batching)"]
    assert [(p.x, p.y) for p in sweep.series[1].points] == [(0.5, 0.5), (1.0, 1.0), (2.0, 1.9), (4.0, 2.0)]
    assert not sweep.log_x  # 0.5 .. 4 is 8×
    lacking = serving_curves([served(SDPA, r, metrics={"itl_ms_p99": None}) for r in RATES])[0]
    assert lacking.sweep("itl_ms_p99").series == ()


# ----------------------------------------------------------------- tables, CSV, compare and gate


def test_serving_metrics_are_csv_columns_with_a_direction_and_are_timings():
    assert len(CSV_METRICS) == len(set(CSV_METRICS))  # ttft_ms_p50 once
    assert set(SERVE_METRICS) <= set(CSV_METRICS)
    for metric in ("ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p90", "preemptions", "peak_kv_blocks"):
        assert DIRECTION[metric] == LOWER, metric
    for metric in ("request_throughput", "goodput_rps", "slo_attainment", "meets_slo"):
        assert DIRECTION[metric] == HIGHER, metric
    assert "kv_blocks" not in DIRECTION and "offered_rate" not in DIRECTION
    for metric in ("itl_ms_p99", "e2e_ms_p50", "goodput_rps", "request_throughput", "slo_attainment", "meets_slo"):
        assert is_speed_metric(metric), metric  # an interpreted run's figures are left out of compare and gate
    assert not is_speed_metric("kv_blocks") and not is_speed_metric("slo_pct")


def test_results_csv_has_the_serving_columns(tmp_path):
    records = rate_sweep()
    with open(write_csv(records, tmp_path), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert set(SERVE_METRICS) | {"rate", "batching", "concurrency", "slo_ttft_ms"} <= set(rows[0])
    assert float(rows[0]["ttft_ms_p99"]) == 50.0 and float(rows[0]["goodput_rps"]) == 0.5
    assert float(rows[0]["meets_slo"]) == 1.0 and float(rows[-3]["meets_slo"]) == 0.0


def test_the_summary_tables_show_the_serving_columns_only_for_serve_runs():
    records = rate_sweep()
    headers = [c.header for c in shown_columns(records)]
    assert {"TTFT p99", "ITL p99", "goodput/s", "SLO met"} <= set(headers)
    assert not {"TTFT p99", "goodput/s"} & {c.header for c in shown_columns(
        [Record("x", {"workload": "prefill"}, "ok", metrics={"latency_ms_p50": 1.0})])}
    table = render_table(records)
    assert "ttft_p99" in table and "goodput/s" in table and "slo_met" in table
    assert "95%" in table and "0.5req/s static-batching" in table


def test_the_gate_bounds_serving_metrics():
    assert parse_rule("workload=serve:goodput_rps:-10%").relative == pytest.approx(0.1)
    assert parse_rule("ttft_ms_p99:+20%").metric == "ttft_ms_p99"
    base = rate_sweep()
    worse = [served(SDPA, r, ttft=300 * r, attainment=0.5) for r in RATES]
    result = evaluate([r for r in base if r.case["variant"] == SDPA and r.case["batching"] == "continuous"], worse,
                      ["goodput_rps:-10%", "meets_slo:>=1"], fail_on_skip=False)
    assert not result.passed
    assert any("goodput_rps" in f for f in result.failures) and any("meets_slo" in f for f in result.failures)


# ----------------------------------------------------------------- summary.md


def test_summary_md_has_a_serving_section_per_group():
    md = render_markdown(rate_sweep() + [served(SDPA, r, prompt_len=512, attainment=0.1) for r in (1.0, 2.0)])
    lines = md.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("#### Serving: ")]
    assert [lines[i] for i in heads] == ["#### Serving: smollm2-135m · float32 · cpu · p256 n64 q64",
                                         "#### Serving: smollm2-135m · float32 · cpu · p512 n64 q64"]
    first = lines[heads[0]:heads[1]]
    assert ("Rates 0.5, 1, 2, 4 requests/s. SLO: TTFT ≤ 2,000 ms and mean inter-token latency ≤ 200 ms for at "
            "least 90% of requests.") in first
    assert "| " + " | ".join(SERVE_TABLE_HEADERS) + " |" in first
    assert f"| {MATH} | 1 | 0.92 | 300.0 | 70.0 |" in first
    assert f"| {SDPA} | 2 | 1.90 | 200.0 | 50.0 |" in first
    assert f"| {SDPA} (static batching) | 0.5 | 0.45 | 200.0 | 55.0 |" in first
    assert f"| {SDPA} | none |  |  |  |" in lines[heads[1]:]
    assert "#### Serving" not in render_markdown([served(SDPA, 1.0)])  # one rate: no section


# ----------------------------------------------------------------- report.html


def _in_chart(tags, metric):
    """The attributes of the marks of the serving charts of `metric` (the parser keeps the
    last <svg> open past its end: the legend's keys count unless left out by tag)."""
    return [a for (t, a), svg in zip(tags.tags, tags.in_svg) if svg.get("data-chart") == "serve"
            and svg.get("data-metric") == metric and t in ("polyline", "circle", "line")]


def _classes(attrs):
    return (attrs.get("class") or "").split()


def test_the_page_draws_latency_and_goodput_against_the_rate():
    records = rate_sweep() + [served(SDPA, r, prompt_len=512, slo={}) for r in (1.0, 2.0)]
    page = render_html(records)
    tags = parse(page)
    charts = [a for t, a in tags.tags if t == "svg" and a.get("data-chart") == "serve"]
    assert [a["data-metric"] for a in charts] == ["ttft_ms_p99", "itl_ms_p99", "goodput_rps"] * 2
    assert all(a["data-along"] == "rate" for a in charts)
    ttft = _in_chart(tags, "ttft_ms_p99")
    assert sum("series" in _classes(a) for a in ttft) == 3 + 1
    assert sum("dashed" in _classes(a) for a in ttft) == 1  # the static-batching baseline
    assert sum("point" in _classes(a) for a in ttft) == 12 + 2
    assert sum("missed" in _classes(a) for a in ttft) == 1 + 2 + 3  # sdpa at 4, math at 2 and 4, static above 0.5
    assert [a["data-y"] for a in ttft if "slo" in _classes(a)] == ["2000.0"]  # the second group has no SLO
    assert [a["data-y"] for a in _in_chart(tags, "itl_ms_p99") if "slo" in _classes(a)] == ["200.0"]
    goodput = _in_chart(tags, "goodput_rps")
    assert not any("slo" in _classes(a) for a in goodput)
    assert sum("offered" in _classes(a) for a in goodput) == 2
    rows = [a for t, a in tags.tags if t == "tr" and "data-line" in a]
    assert [(a["data-line"], a["data-max-rate"]) for a in rows] == [
        (MATH, "1.0"), (SDPA, "2.0"), (f"{SDPA} (static batching)", "0.5"), (SDPA, "")]
    assert "no SLO verdict" in page and "SLO: none given" in page
    # the serve cases have no latency_ms_p50: no latency bars of crosses for them
    assert not any(a.get("data-chart") == "latency" and a.get("data-workload") == "serve" for _, a in tags.tags)
    assert not any(t == "svg" and a.get("data-chart") == "sweep" for t, a in tags.tags)  # nor generic sweeps


def test_the_serving_section_is_there_only_for_serve_runs():
    tags = parse(render_html([served(SDPA, 1.0), served(MATH, 1.0)]))
    assert [a.get("data-chart") for t, a in tags.tags if "nodata" in _classes(a) and
            a.get("data-chart") == "serve"] == ["serve"]
    plain = render_html([Record("x", {"workload": "prefill", "variant": "sdpa"}, "ok",
                                metrics={"latency_ms_p50": 1.0})])
    assert 'id="serving"' not in plain


def test_record_text_in_the_serving_section_is_escaped():
    records = [served(HOSTILE, r, model=HOSTILE, batching=HOSTILE) for r in RATES] + [
        served(SDPA, r, model=HOSTILE) for r in RATES]
    page = render_html(records)
    assert "<script>alert(1)</script>" not in page and "alert(1)</" not in page
    assert html.escape(HOSTILE) in page
    tags = parse(page)
    assert [t for t, _ in tags.tags].count("script") == 1
    assert sum(a.get("data-chart") == "serve" for _, a in tags.tags) == 3
    for _, attrs in tags.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), name
            if value and "alert(1)" in value:
                assert HOSTILE in value, (name, value)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_in_chromium_the_serving_charts_draw_offline_without_errors(tmp_path):
    path = write_html(rate_sweep(), tmp_path)
    errors: list[str] = []
    with chromium_page(path, errors) as page:
        charts = page.locator('#serving svg.chart[data-chart="serve"]')
        assert charts.count() == 3
        for chart in charts.all():
            chart.scroll_into_view_if_needed()
            box = chart.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 200 and box["x"] + box["width"] <= 1400
            assert chart.locator("polyline.series").count() == 3
            assert chart.locator("polyline.series.dashed").count() == 1
            assert chart.locator("circle.point").count() == 12
            assert chart.locator("circle.point.missed").count() == 6
            for point in chart.locator("circle.point").all():
                b = point.bounding_box()
                assert b and b["width"] > 0 and b["height"] > 0
                assert box["y"] <= b["y"] and b["y"] + b["height"] <= box["y"] + box["height"]
            ticks = [t.bounding_box() for t in chart.locator("text.tick").all()]
            assert len(ticks) >= 4 and overlapping(ticks) == []
        for metric, y, bound in (("ttft_ms_p99", "2000.0", "SLO: TTFT ≤ 2,000 ms"),
                                 ("itl_ms_p99", "200.0", "SLO: mean ITL ≤ 200 ms")):
            chart = page.locator(f'#serving svg.chart[data-chart="serve"][data-metric="{metric}"]')
            slo = chart.locator("line.slo")
            assert slo.count() == 1 and slo.get_attribute("data-y") == y
            line, svg = slo.bounding_box(), chart.bounding_box()
            assert line["width"] > 300 and svg["y"] < line["y"] < svg["y"] + svg["height"]
            assert chart.locator("text.slo-label").text_content() == bound
            # hollow: a white fill and the line's colour around it
            missed = chart.locator("circle.point.missed").first
            assert missed.evaluate("c => getComputedStyle(c).fill") == "rgb(255, 255, 255)"
            assert missed.evaluate("c => getComputedStyle(c).stroke") != "rgb(255, 255, 255)"
        goodput = page.locator('#serving svg.chart[data-chart="serve"][data-metric="goodput_rps"]')
        assert goodput.locator("line.slo").count() == 0
        offered = goodput.locator("polyline.offered")
        assert offered.count() == 1
        b = offered.bounding_box()
        assert b and b["width"] > 300 and b["height"] > 100  # y = x across the chart
        rows = page.locator("#serving table.serve-table tbody tr")
        assert rows.count() == 3
        assert [r.get_attribute("data-max-rate") for r in rows.all()] == ["1.0", "2.0", "0.5"]
        assert [c.inner_text() for c in rows.nth(1).locator("td").all()] == [SDPA, "2", "1.90", "200.0", "50.0"]
    assert errors == []
