"""The sweep and roofline charts of report.html: which cases make a sweep (and which
field it runs along, which lines it has), where a case sits on the roofline and under
which ceilings, and both drawn in Chromium."""

import html
import math
import sys
from pathlib import Path

import pytest

from infermatrix.reports.derived import (
    DENSITY, density_families, rooflines, shape_label, sweeps,
)
from infermatrix.reports.html_report import render_html, write_html
from infermatrix.reports.record import Record

sys.path.insert(0, str(Path(__file__).parent))
from test_html_report import CHROMIUM, ENV, HOSTILE, case, chromium_page, drift, overlapping, parse  # noqa: E402

PEAKS = ENV["peaks"]["cpu"]  # 32.9 GB/s; float32 0.163, bfloat16 0.0193 TFLOP/s


def timed(variant="reference", workload="attention", latency=10.0, *, metrics=None, env=ENV, status="ok",
          kv_len=0, **fields):
    """An ok speed record with a roofline (flops, bytes, achieved FLOP/s from its latency)."""
    c = {**case(variant, workload, **fields), "kv_len": kv_len}
    flops, moved = 3.0e7 * c["batch"] * c["prompt_len"] / 128, 4.0e6 * c["batch"]
    m = {"latency_ms_p50": latency, "flops": flops, "bytes_moved": moved,
         "achieved_tflops": flops / (latency / 1000) / 1e12, "pct_of_limit": 40.0}
    if workload in ("prefill", "decode"):
        m["tokens_per_s"] = c["batch"] * (c["new_tokens"] or c["prompt_len"]) / latency * 1000
    m.update(metrics or {})
    cid = "/".join(str(c[k]) for k in ("model", "variant", "workload", "dtype", "device")) + "/" + shape_label(c)
    return Record(case_id=cid, case=c, status=status, metrics=m if status == "ok" else {}, env=env,
                  reason=None if status == "ok" else "boom")


def lines(sweep):
    return {s.name: [(p.x, p.y) for p in s.points] for s in sweep.series}


# ----------------------------------------------------------------- which sweep


def test_one_varying_field_makes_one_sweep_with_a_line_per_variant():
    records = [timed(v, latency=t * p / 256, prompt_len=p)
               for p in (256, 512, 1024, 2048, 4096) for v, t in (("sdpa", 1.0), ("reference", 2.0))]
    [sweep] = sweeps(records)
    assert sweep.along == "prompt_len" and sweep.metric == "latency_ms_p50"
    assert [s.name for s in sweep.series] == ["reference", "sdpa"]  # the reference first, as in the legend
    assert lines(sweep)["sdpa"] == [(256, 1.0), (512, 2.0), (1024, 4.0), (2048, 8.0), (4096, 16.0)]
    assert lines(sweep)["reference"] == [(256, 2.0), (512, 4.0), (1024, 8.0), (2048, 16.0), (4096, 32.0)]
    assert "prompt_len" not in sweep.case and "variant" not in sweep.case and sweep.case["workload"] == "attention"
    assert sweep.log_x  # the swept values span over 8×
    assert not sweeps([r for r in records if r.case["prompt_len"] <= 2048])[0].log_x  # 8× exactly: linear


def test_batch_sweeps_show_throughput_and_lengths_show_latency():
    decode = [timed(v, "decode", latency=5.0 * b ** 0.5, batch=b, prompt_len=32, new_tokens=8)
              for b in (1, 2, 4) for v in ("reference", "sdpa")]
    [sweep] = sweeps(decode)
    assert sweep.along == "batch" and sweep.metric == "tokens_per_s"
    assert [x for x, _ in lines(sweep)["sdpa"]] == [1, 2, 4]
    assert math.isclose(lines(sweep)["sdpa"][2][1], 4 * 8 / (5.0 * 2) * 1000)
    attention = [timed("sdpa", batch=b) for b in (1, 2, 4)]  # no tokens/s: latency instead
    assert sweeps(attention)[0].metric == "latency_ms_p50"


def test_no_sweep_when_two_fields_vary_together_or_nothing_varies():
    together = [timed(v, prompt_len=p, batch=b) for v in ("reference", "sdpa")
                for p, b in ((256, 1), (512, 2), (1024, 4))]
    assert sweeps(together) == []
    assert sweeps([timed("reference"), timed("sdpa"), timed("sdpa", "linear")]) == []
    # the default matrix's prefill: dtype and prompt length change together
    assert sweeps([timed("reference", "prefill", prompt_len=128), timed("reference", "prefill", prompt_len=64,
                                                                        dtype="bfloat16")]) == []


def test_a_grid_sweeps_each_field_within_each_row_of_the_other():
    grid = [timed("sdpa", "decode", latency=p / 100 * b, prompt_len=p, batch=b, new_tokens=4)
            for p in (128, 256) for b in (1, 8)]
    found = {(s.along, s.case.get("batch"), s.case.get("prompt_len")) for s in sweeps(grid)}
    assert found == {("prompt_len", 1, None), ("prompt_len", 8, None), ("batch", None, 128), ("batch", None, 256)}


def test_only_timings_that_mean_something_are_points():
    records = [timed("sdpa", prompt_len=p) for p in (256, 512)] + [
        timed("sdpa", prompt_len=1024, metrics={"triton_interpreted": True}),
        timed("sdpa", prompt_len=2048, status="failed"),
        drift("sdpa"), drift("reference")]
    [sweep] = sweeps(records)
    assert [x for x, _ in lines(sweep)["sdpa"]] == [256, 512]


def test_a_kv_len_sweep_counts_zero_as_as_many_keys_as_queries():
    records = [timed(v, prompt_len=1, kv_len=k) for k in (1024, 4096, 16384) for v in ("sdpa", "flex")]
    records += [timed("sdpa", prompt_len=1024), timed("sdpa", prompt_len=1024, kv_len=8192)]
    kv = sweeps(records)
    assert [s.along for s in kv] == ["kv_len", "kv_len"]
    assert [{name: [x for x, _ in pts] for name, pts in lines(s).items()} for s in kv] == [
        {"flex": [1024, 4096, 16384], "sdpa": [1024, 4096, 16384]}, {"sdpa": [1024, 8192]}]


def test_a_density_sweep_joins_variants_differing_in_one_parameter_and_levels_the_dense_ones():
    def sparse(window, density, latency, pattern="sliding", extra=""):
        return timed(f"block_sparse(pattern={pattern},window={window}{extra})", latency=latency, prompt_len=1024,
                     metrics={DENSITY: density})

    records = [timed("sdpa", latency=8.0, prompt_len=1024), sparse(256, 0.4, 5.0), sparse(64, 0.1, 2.0),
               sparse(128, 0.2, 3.0), sparse(512, 0.3, 4.0, "bigbird", ",n_global=1")]
    [sweep] = sweeps(records)
    assert sweep.along == DENSITY and sweep.metric == "latency_ms_p50"
    assert lines(sweep) == {"block_sparse(pattern=sliding,window=*)": [(0.1, 2.0), (0.2, 3.0), (0.4, 5.0)],
                            "block_sparse(pattern=bigbird,window=512,n_global=1)": [(0.3, 4.0)]}
    assert [(level.variant, level.y) for level in sweep.levels] == [("sdpa", 8.0)]
    assert not sweep.log_x  # 0.1 .. 0.4
    # one density, or densities only from variants differing in two parameters: no density sweep
    assert sweeps([timed("sdpa", prompt_len=1024), sparse(64, 0.1, 2.0)]) == []
    assert sweeps([sparse(64, 0.1, 2.0), sparse(128, 0.2, 3.0, "strided")]) == []


def test_density_families():
    assert density_families(["sdpa", "bs(pattern=sliding,density=0.1)", "bs(pattern=sliding,density=0.3)",
                             "flex(pattern=sliding,density=0.1)", "bs(pattern=sliding,window=64)+kv_cache",
                             "bs(pattern=sliding,window=128)+kv_cache", "bs(pattern=strided,stride=64)"]) == {
        "sdpa": "sdpa", "bs(pattern=sliding,density=0.1)": "bs(pattern=sliding,density=*)",
        "bs(pattern=sliding,density=0.3)": "bs(pattern=sliding,density=*)",
        "flex(pattern=sliding,density=0.1)": "flex(pattern=sliding,density=0.1)",
        "bs(pattern=sliding,window=64)+kv_cache": "bs(pattern=sliding,window=*)+kv_cache",
        "bs(pattern=sliding,window=128)+kv_cache": "bs(pattern=sliding,window=*)+kv_cache",
        "bs(pattern=strided,stride=64)": "bs(pattern=strided,stride=64)"}
    # patterns crossed with densities: each line runs along density, within one pattern
    crossed = [f"bs(pattern={p},density={d})" for p in ("sliding", "strided") for d in (0.25, 0.5)]
    assert density_families(crossed) == {v: v.replace("0.25", "*").replace("0.5", "*") for v in crossed}


# ----------------------------------------------------------------- roofline


def test_roofline_points_are_intensity_and_achieved_flops_under_the_env_peaks():
    fast = timed("sdpa", latency=2.0, prompt_len=256)
    records = [timed("reference", latency=10.0, prompt_len=256), fast,
               timed("sdpa", latency=1.0, metrics={"triton_interpreted": True}, prompt_len=512),
               timed("sdpa", status="failed", prompt_len=1024), drift("sdpa"),
               timed("linear_only", "linear", metrics={"achieved_tflops": None})]
    [roof] = rooflines(records)
    assert roof.device == "cpu" and roof.measured_at == PEAKS["measured_at"]
    assert math.isclose(roof.bandwidth, 32.9e9)
    assert roof.compute == pytest.approx({"float32": 0.163e12, "bfloat16": 0.0193e12})
    assert [p.case_id for p in roof.points] == [records[0].case_id, fast.case_id]  # no interpreted, failed, drift
    point = roof.points[1]
    assert math.isclose(point.intensity, fast.metrics["flops"] / fast.metrics["bytes_moved"])  # 6e7 / 4e6
    assert math.isclose(point.intensity, 15.0)
    assert math.isclose(point.flops_per_s, 6e7 / 2e-3) and point.variant == "sdpa" and point.dtype == "float32"
    assert math.isclose(roof.ridge("float32"), 0.163e12 / 32.9e9)
    assert roof.ridge("int8") is None


def test_a_roofline_per_device_and_set_of_peaks():
    gpu_env = {**ENV, "peaks": {"cuda": {"bandwidth_gbs": 4000.0, "gemm_tflops": {"bfloat16": 700.0}}}}
    records = [timed("sdpa"), timed("sdpa", device="cuda:0", env=gpu_env, dtype="bfloat16")]
    roofs = rooflines(records)
    assert [(r.device, r.bandwidth, len(r.points)) for r in roofs] == [("cpu", 32.9e9, 1), ("cuda", 4e12, 1)]
    bare = rooflines([timed("sdpa", env={**ENV, "peaks": {}})])
    assert bare[0].bandwidth is None and bare[0].compute == {}


# ----------------------------------------------------------------- on the page


def sweep_run():
    attention = [timed(v, latency=t * (p / 256) ** 2, prompt_len=p)
                 for p in (128, 256, 512, 1024, 2048) for v, t in (("reference", 4.0), ("sdpa", 1.0))]
    attention += [timed(f"block_sparse(pattern=sliding,window={w})", latency=0.5 * w / 64 * p / 256,
                        prompt_len=p, metrics={DENSITY: min(1.0, w / p)}) for p in (128, 256, 512, 1024, 2048)
                  for w in ((64,) if p != 1024 else (64, 128, 256))]
    decode = [timed(v, "decode", latency=20.0 + b, batch=b, prompt_len=32, new_tokens=8)
              for b in (1, 2, 4) for v in ("reference", "sdpa")]
    return attention + decode + [drift("reference"), drift("sdpa", kl=1e-9)]


def test_the_page_draws_each_sweep_and_the_roofline():
    tags = parse(render_html(sweep_run()))
    charts = [a for t, a in tags.tags if t == "svg" and a.get("data-chart") in ("sweep", "roofline")]
    assert [(a["data-chart"], a.get("data-along")) for a in charts] == [
        ("sweep", "prompt_len"), ("sweep", DENSITY), ("sweep", "batch"), ("roofline", None)]
    assert charts[0]["data-x-scale"] == "log" and charts[2]["data-x-scale"] == "linear"
    in_roofline = [a for (t, a), svg in zip(tags.tags, tags.in_svg) if svg.get("data-chart") == "roofline"]
    assert sum("point" in (a.get("class") or "").split() for a in in_roofline) == 15 + 2 + 6
    assert {a["data-dtype"] for a in in_roofline if a.get("class") == "ceiling compute"} == {"float32", "bfloat16"}
    assert sum(a.get("class") == "ceiling bandwidth" for a in in_roofline) == 1


def test_without_sweeps_or_rooflines_the_page_says_so():
    tags = parse(render_html([timed("reference", metrics={"achieved_tflops": None}), timed("sdpa")]))
    nodata = {a.get("data-chart") for t, a in tags.tags if "nodata" in (a.get("class") or "").split()}
    assert "sweep" in nodata and "roofline" not in nodata
    tags = parse(render_html([drift("reference")]))
    assert {"sweep", "roofline"} <= {a.get("data-chart") for t, a in tags.tags
                                     if "nodata" in (a.get("class") or "").split()}


def test_record_text_in_the_new_charts_is_escaped():
    env = {**ENV, "peaks": {"cpu": {**PEAKS, "measured_at": HOSTILE, "gemm_tflops": {HOSTILE: 0.1}}}}
    records = [timed(v, prompt_len=p, model=HOSTILE, env=env, dtype=HOSTILE) for p in (256, 512)
               for v in ("reference", HOSTILE)]
    page = render_html(records)
    assert "<script>alert(1)</script>" not in page and "alert(1)</" not in page
    assert html.escape(HOSTILE) in page
    tags = parse(page)
    assert any(a.get("data-chart") == "sweep" for _, a in tags.tags)
    assert any(a.get("data-chart") == "roofline" for _, a in tags.tags)
    assert [t for t, _ in tags.tags].count("script") == 1


# ----------------------------------------------------------------- in a real browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_in_chromium_the_sweeps_and_roofline_draw_without_errors_or_overlapping_labels(tmp_path):
    path = write_html(sweep_run(), tmp_path)
    errors: list[str] = []
    with chromium_page(path, errors) as page:
        sweeps_drawn = page.locator('svg.chart[data-chart="sweep"]')
        assert sweeps_drawn.count() == 3
        for chart in sweeps_drawn.all():
            chart.scroll_into_view_if_needed()
            box = chart.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 200
            assert box["x"] + box["width"] <= 1400  # fits the width
            for line in chart.locator("polyline.series").all():
                b = line.bounding_box()
                assert b and (b["width"] > 10 or b["height"] > 10)
            ticks = [t.bounding_box() for t in chart.locator("text.tick").all()]
            assert len(ticks) >= 4 and overlapping(ticks) == []
        prompt = page.locator('svg.chart[data-chart="sweep"][data-along="prompt_len"]')
        assert prompt.locator("polyline.series").count() == 3  # reference, sdpa, window=64
        assert prompt.locator("circle.point").count() == 5 * 3 + 2  # and windows 128, 256 alone
        density = page.locator(f'svg.chart[data-chart="sweep"][data-along="{DENSITY}"]')
        assert density.locator("line.level").count() == 2  # reference and sdpa: dense

        roof = page.locator('svg.chart[data-chart="roofline"]')
        roof.scroll_into_view_if_needed()
        assert roof.locator(".point").count() == 23
        for point in roof.locator(".point").all():
            b = point.bounding_box()
            assert b and b["width"] > 0 and b["height"] > 0
        labels = [t.bounding_box() for t in roof.locator("text.ceiling-label, text.tick, text.axis-label").all()]
        assert overlapping(labels) == []
        svg_box = roof.bounding_box()
        for b in labels:  # nothing drawn off the chart
            assert svg_box["x"] <= b["x"] and b["x"] + b["width"] <= svg_box["x"] + svg_box["width"] + 1
        title = roof.locator(".point title").first.text_content()
        assert "FLOP/byte" in title and "/attention/" in title
    assert errors == []
