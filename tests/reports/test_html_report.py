import base64
import hashlib
import html
import math
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest

from infermatrix.reports.derived import pareto_front, speedups
from infermatrix.reports.html_report import HTML_FILE, render_html, write_html
from infermatrix.reports.record import Record

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
HOSTILE = "<script>alert(1)</script>\"'&"
ENV = {"python": "3.11.7", "platform": "Linux-x86_64", "cpu": "AMD EPYC", "cpu_count": 2, "cpu_affinity": [0, 1],
       "torch_threads": 2, "torch_interop_threads": 2, "omp_num_threads": None, "cuda_available": False,
       "gpu": None, "git_sha": "bd954d046f1790df57c7b3e89785d89027306b67",
       "eval_text": {"path": "pydoc_data.topics", "sha256": "71f2ff5d" * 8},
       "peaks": {"cpu": {"bandwidth_gbs": 32.9, "device": "cpu", "gemm_tflops": {"float32": 0.163,
                                                                                 "bfloat16": 0.0193},
                         "measured_at": "2026-11-28T12:42:21+00:00"}},
       "versions": {"torch": "2.13.0+cpu", "infermatrix": "0.1.0"}, "settings": {"target_ci": 0.02}}


# ----------------------------------------------------------------- records like a real run's


def case(variant="reference", workload="prefill", *, model="smollm2-135m", dtype="float32", device="cpu",
         batch=1, prompt_len=128, new_tokens=0, windows=0, heads=0, kv_heads=0, head_dim=0, causal=True,
         in_features=0, out_features=0):
    return {"model": model, "variant": variant, "workload": workload, "dtype": dtype, "device": device,
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "windows": windows,
            "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "causal": causal,
            "in_features": in_features, "out_features": out_features}


def case_id(c):
    shape = (f"w{c['windows']}-p{c['prompt_len']}-n{c['new_tokens']}" if c["workload"] == "drift"
             else f"b{c['batch']}-p{c['prompt_len']}" + (f"-n{c['new_tokens']}" if c["new_tokens"] else ""))
    return f"{c['model']}/{c['variant']}/{c['workload']}/{c['dtype']}/{c['device']}/{shape}"


def speed(variant, workload="prefill", latency=100.0, *, samples=0, env=ENV, **shape):
    c = case(variant, workload, **shape)
    tokens = c["batch"] * (c["new_tokens"] or c["prompt_len"])
    metrics = {"latency_ms_p50": latency, "latency_ms_mean": latency * 1.01, "latency_ms_ci_rel": 0.03,
               "latency_ms_n": 12, "latency_ms_noisy": False, "pct_of_limit": 5000.0 / latency,
               "bound": "compute", "flops": 3.5e10, "bytes_moved": 7.4e8, "weight_bytes": 538_000_000}
    if workload in ("prefill", "decode", "generate"):
        metrics["tokens_per_s"] = tokens / latency * 1000.0
    raw = {"latency_ms": [latency * (1 + 0.001 * i) for i in range(samples)]} if samples else {}
    return Record(case_id=case_id(c), case=c, status="ok", metrics=metrics, samples=raw, env=env,
                  started_at="2026-11-28T13:14:57+00:00", duration_s=9.0)


def drift(variant, dtype="float32", kl=0.0, ppl=0.0, *, env=ENV, model="smollm2-135m"):
    c = case(variant, "drift", model=model, dtype=dtype, batch=0, prompt_len=128, new_tokens=6, windows=2)
    metrics = {"kl_mean": kl, "kl_p99": kl * 10, "ppl_delta_pct": ppl, "top1_agree_pct": 100.0 - 1e4 * kl,
               "ppl": 21.0, "ppl_ref": 21.0, "sqnr_db": float("inf") if kl == 0 else 40.0, "eval_tokens": 256}
    return Record(case_id=case_id(c), case=c, status="ok", metrics=metrics, env=env,
                  started_at="2026-11-28T13:15:57+00:00", duration_s=5.7)


def bad(variant, status="failed", reason="CUDA out of memory", workload="prefill", **shape):
    c = case(variant, workload, **shape)
    return Record(case_id=case_id(c), case=c, status=status, reason=reason, env=ENV, duration_s=1.0)


def default_like():
    """A small run shaped like the default matrix, with a failed and a skipped case."""
    return [
        speed("reference", "prefill", 396.0, prompt_len=128), speed("sdpa", "prefill", 400.0, prompt_len=128),
        speed("reference", "prefill", 814.0, prompt_len=256), speed("sdpa", "prefill", 707.0, prompt_len=256),
        speed("reference", "decode", 216.0, prompt_len=32, new_tokens=6),
        speed("sdpa", "decode", 208.0, prompt_len=32, new_tokens=6),
        speed("reference", "attention", 13.6, prompt_len=512, heads=9, kv_heads=3, head_dim=64),
        speed("sdpa", "attention", 6.5, prompt_len=512, heads=9, kv_heads=3, head_dim=64),
        speed("reference", "linear", 1.06, prompt_len=64, in_features=576, out_features=1536),
        speed("reference", "prefill", 1240.0, dtype="bfloat16", prompt_len=64),
        speed("sdpa", "prefill", 1125.0, dtype="bfloat16", prompt_len=64),
        drift("reference"), drift("sdpa", kl=9.3e-12, ppl=-4.8e-5),
        drift("reference", "bfloat16", kl=1.34e-3, ppl=-0.16), drift("sdpa", "bfloat16", kl=1.32e-3, ppl=-0.32),
        bad("triton", "skipped", "needs CUDA"),
        bad("int8_dynamic", "failed", "Traceback (most recent call last):\n  File \"x.py\", line 1\n" * 5
            + "RuntimeError: boom"),
    ]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.svg: dict = {}  # the chart each tag sits in
        self.in_svg: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "svg":
            self.svg = dict(attrs)
        self.tags.append((tag, dict(attrs)))
        self.in_svg.append(self.svg)

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Tags:
    parser = _Tags()
    parser.feed(page)
    return parser


# ----------------------------------------------------------------- unit tests


def test_hostile_strings_are_escaped_everywhere():
    env = {**ENV, "git_sha": HOSTILE, "cpu": HOSTILE, "versions": {"torch": HOSTILE}}
    records = [speed("reference", env=env), speed(HOSTILE, env=env), drift("reference", env=env),
               drift(HOSTILE, kl=1e-3, env=env), bad(HOSTILE, reason=HOSTILE), bad("x", "skipped", HOSTILE)]
    records[1].case["model"] = HOSTILE  # a hostile model too (its speedup pairing is lost, fine)
    page = render_html(records, title=HOSTILE, env=env)
    assert "<script>alert(1)</script>" not in page
    assert "alert(1)</" not in page
    assert html.escape(HOSTILE) in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in page
    tags = parse(page)
    assert [t for t, _ in tags.tags].count("script") == 1  # ours, at the end
    # attributes were not broken out of: any attribute carrying the text carries all of it
    for _, attrs in tags.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), name
            if value and "alert(1)" in value:
                assert HOSTILE in value, (name, value)
    assert HOSTILE in "".join(tags.text)  # shown to the reader as text


def test_page_is_self_contained_and_pins_its_script():
    page = render_html(default_like())
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in page and " src=" not in page
    assert "Content-Security-Policy" in page and "script-src 'sha256-" in page


def test_report_of_300_cases_stays_small_and_omits_samples(tmp_path):
    records = []
    variants = ["reference", "sdpa", "kv_cache", "int8_weight_only", "kv_cache+int8_weight_only", "compile",
                "flex"]
    for v_i, variant in enumerate(variants):
        for dtype in ("float32", "bfloat16"):
            for p in (64, 128, 256, 512, 1024, 2048):
                for workload, extra in (("prefill", {}), ("decode", {"new_tokens": 32}),
                                        ("generate", {"new_tokens": 64})):
                    records.append(speed(variant, workload, 10.0 + v_i + p / 100, samples=300, dtype=dtype,
                                         prompt_len=p, **extra))
            for p in (128, 256):
                records.append(speed(variant, "attention", 1.0 + v_i, samples=300, dtype=dtype, prompt_len=p))
            records.append(drift(variant, dtype, kl=1e-4 * v_i, ppl=0.1 * v_i))
    records += [bad(f"broken{i}", reason="x" * 2000) for i in range(10)]
    assert len(records) >= 300
    path = write_html(records, tmp_path)
    assert path == tmp_path / HTML_FILE
    size = path.stat().st_size
    assert size < 5_000_000, size
    assert size < 2_000_000, size  # far below the limit: no raw samples
    page = path.read_text("utf-8")
    assert repr(records[0].samples["latency_ms"][-1]) not in page
    assert page.count('<tr class="row ') == len(records)


@pytest.mark.parametrize("name", ["empty", "only_failed", "no_drift", "no_reference", "no_speed"])
def test_degrades_gracefully(name):
    records = {
        "empty": [],
        "only_failed": [bad("reference"), bad("sdpa", "skipped", "needs CUDA")],
        "no_drift": [speed("reference"), speed("sdpa", latency=50.0)],
        "no_reference": [speed("sdpa"), speed("triton", latency=50.0), drift("sdpa", kl=1e-9)],
        "no_speed": [drift("reference"), drift("sdpa", kl=1e-9)],
    }[name]
    page = render_html(records)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    tags = parse(page)
    nodata = {a.get("data-chart") for t, a in tags.tags if "nodata" in (a.get("class") or "").split()}
    drawn = {a.get("data-chart") for t, a in tags.tags if t == "svg" and "chart" in (a.get("class") or "")}
    assert "pareto" in nodata and "pareto" not in drawn  # no scatter without speed, reference and drift
    if name in ("empty", "only_failed", "no_speed"):
        assert {"latency", "tokens", "speedup", "limit"} <= nodata
    if name == "no_reference":
        assert "speedup" in nodata and {"latency", "tokens", "limit"} <= drawn
    if name == "no_drift":
        assert {"latency", "tokens", "speedup", "limit"} <= drawn
    if name == "only_failed":
        assert page.count('<tr class="problem"') == 2 and "needs CUDA" in page
        assert 'class="missing"' not in page  # no chart at all, so no missing-bar marks
    else:
        assert page.count('<tr class="problem"') == 0
    assert page.count("no data") >= 1


def test_failed_cases_are_listed_with_their_reasons_and_marked_in_charts():
    page = render_html(default_like())
    tags = parse(page)
    problems = [a for t, a in tags.tags if t == "tr" and a.get("class") == "problem"]
    assert [p["data-status"] for p in problems] == ["failed", "skipped"]  # failures first
    assert "needs CUDA" in page and "RuntimeError: boom" in page
    assert 'class="missing"' in page  # the failed prefill case is a red mark in the latency chart


def test_pareto_front_on_hand_made_points():
    points = [
        (1.0, 0.0),  # 0: the reference: no drift
        (1.5, 1e-3),  # 1: front
        (1.2, 1e-2),  # 2: slower and worse than 1
        (2.0, 5e-2),  # 3: fastest: front
        (1.5, 1e-3),  # 4: equal to 1: both kept
        (0.9, 0.0),  # 5: as exact as 0 but slower
        (2.0, 1e-1),  # 6: as fast as 3 but worse
        (float("nan"), 0.0),  # 7: ignored
        (3.0, float("inf")),  # 8: ignored
    ]
    assert pareto_front(points) == [0, 1, 4, 3]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (2.0, 0.5)]) == [1]


def test_speedup_pairs_the_same_case_under_reference():
    records = [speed("reference", latency=100.0), speed("sdpa", latency=50.0),
               speed("sdpa", latency=50.0, prompt_len=256),  # no reference at this shape
               speed("sdpa", latency=50.0, dtype="bfloat16"),  # nor in this dtype
               bad("triton")]
    s = speedups(records)
    assert s == {records[0].case_id: 1.0, records[1].case_id: 2.0}


def test_scatter_marks_the_front():
    records = [speed("reference", latency=100.0), speed("sdpa", latency=80.0), speed("slow", latency=120.0),
               speed("fast", latency=50.0), drift("reference"), drift("sdpa", kl=1e-10),
               drift("slow", kl=1e-3), drift("fast", kl=1e-2)]
    tags = parse(render_html(records))
    kl = {a["data-variant"]: a for (t, a), svg in zip(tags.tags, tags.in_svg)
          if "point" in (a.get("class") or "").split() and svg.get("data-metric") == "kl"}
    assert len(kl) == 4
    assert {v for v, a in kl.items() if "pareto" in a["class"].split()} == {"reference", "sdpa", "fast"}
    assert math.isclose(float(kl["fast"]["data-x"]), 2.0)
    assert any(a.get("class") == "pareto-front" for _, a in tags.tags)


def test_env_header_shows_versions_and_peaks():
    page = render_html(default_like(), title="nightly")
    for text in ("3.11.7", "2.13.0+cpu", "AMD EPYC", "bd954d046f1790df57c7b3e89785d89027306b67",
                 "71f2ff5d" * 8, "32.9 GB/s", "0.163 TFLOP/s", "torch 2 · interop 2", "<h1>nightly</h1>"):
        assert text in page, text
    page = render_html(default_like(), env={**ENV, "gpu": {"name": "NVIDIA H200", "memory_bytes": 2**37,
                                                           "capability": "9.0", "count": 1}})
    assert "NVIDIA H200 · 128 GiB · sm 9.0" in page


def test_env_shows_what_the_cpu_can_do():
    flags = {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx512_bf16": True, "amx_tile": False,
             "amx_int8": False, "amx_bf16": False}
    page = render_html(default_like(), env={**ENV, "cpu_capability": "AVX512", "cpu_flags": flags})
    text = "torch dispatch AVX512 · has avx2, avx512f, avx512_vnni, avx512_bf16 · lacks amx_tile, amx_int8, amx_bf16"
    assert f"<dt>CPU features</dt><dd>{text}</dd>" in page
    older = render_html(default_like())  # records from before the fields existed
    assert "<dt>CPU features</dt><dd>not recorded</dd>" in older
    assert "Energy counters" not in older  # a run from before energy was read says nothing of it


def test_env_says_which_energy_counters_were_read_or_why_none():
    energy = {"cpu": {"source": None, "why": "no readable RAPL counter: /sys/class/powercap does not exist"}}
    page = render_html(default_like(), env={**ENV, "energy": energy})
    assert ("<dt>Energy counters</dt><dd>cpu none: no readable RAPL counter: /sys/class/powercap does not "
            "exist</dd>") in page


# ----------------------------------------------------------------- in a real browser


def overlapping(boxes):
    """The pairs of bounding boxes (Playwright's x, y, width, height) that overlap."""
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]]


@contextmanager
def chromium_page(path: Path, errors: list[str]):
    """The page at `path` in headless Chromium, 1400 px wide, loaded; console and page
    errors, and any request that is not for the file itself or a data: URL, go to `errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(10_000)
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else errors.append(
                f"fetch {r.url}"))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            yield page
        finally:
            browser.close()


def _column(page, col):
    return page.eval_on_selector_all(
        "#results tbody tr", f"rows => rows.map(r => r.querySelector('td[data-col=\"{col}\"]')"
                             ".getAttribute('data-value'))")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_in_chromium_sort_filter_and_charts(tmp_path):
    records = default_like()
    path = write_html(records, tmp_path)
    errors: list[str] = []
    with chromium_page(path, errors) as page:
        assert errors == []

        # sort: numeric ascending, then descending; cases without a latency stay last
        header = page.locator('#results th[data-col="latency_ms_p50"]')
        header.click()
        values = _column(page, "latency_ms_p50")
        numbers = [float(v) for v in values if v]
        assert len(numbers) == 11 and numbers == sorted(numbers)
        assert values[:len(numbers)] == [v for v in values if v]  # blanks after numbers
        assert numbers[0] == 1.06 and numbers[-1] == 1240.0  # numeric, not text, order
        assert header.get_attribute("aria-sort") == "ascending"
        header.click()
        values = _column(page, "latency_ms_p50")
        numbers = [float(v) for v in values if v]
        assert numbers == sorted(numbers, reverse=True) and values[:len(numbers)] == [v for v in values if v]
        assert header.get_attribute("aria-sort") == "descending"
        page.locator('#results th[data-col="variant"]').click()
        variants = _column(page, "variant")
        assert variants == sorted(variants)

        # filter: only matching rows stay visible
        rows = page.locator("#results tbody tr")
        assert rows.count() == len(records)
        page.fill("#filter", "sdpa")
        visible = [r for r in rows.all() if r.is_visible()]
        assert len(visible) == 7 and all(r.get_attribute("data-variant") == "sdpa" for r in visible)
        page.fill("#filter", "sdpa bfloat16")
        visible = [r for r in rows.all() if r.is_visible()]
        assert {(r.get_attribute("data-workload")) for r in visible} == {"prefill", "drift"}
        assert page.locator("#row-count").inner_text() == f"2 of {len(records)} cases"
        page.fill("#filter", "")
        page.select_option("#filter-workload", "decode")
        visible = [r for r in rows.all() if r.is_visible()]
        assert len(visible) == 2 and all(r.get_attribute("data-workload") == "decode" for r in visible)
        page.select_option("#filter-workload", "")
        assert sum(r.is_visible() for r in rows.all()) == len(records)

        # charts drew: bars and points with a size
        for name in ("latency", "tokens", "speedup", "limit"):
            chart = page.locator(f'svg.chart[data-chart="{name}"]').first
            box = chart.bounding_box()
            assert box and box["width"] > 100 and box["height"] > 100, name
            bar = chart.locator("rect.bar").first
            bar_box = bar.bounding_box()
            assert bar_box and bar_box["width"] > 0 and bar_box["height"] > 0, name
        scatter = page.locator('svg.chart[data-chart="pareto"][data-metric="kl"]').first
        assert scatter.is_visible()
        assert scatter.locator(".point").count() == 4  # reference and sdpa in two dtypes
        assert scatter.locator(".point.pareto").count() >= 2
        for point in scatter.locator(".point").all():
            b = point.bounding_box()
            assert b and b["width"] > 0 and b["height"] > 0
        page.select_option("#pareto-metric", "ppl")
        assert not scatter.is_visible()
        assert page.locator('svg.chart[data-chart="pareto"][data-metric="ppl"]').first.is_visible()
    assert errors == []


def test_the_policy_pins_the_inlined_script_and_the_assets_ship_with_the_package():
    from importlib.resources import files

    page = render_html(default_like())
    script = page[page.index("<script>") + len("<script>"):page.index("</script>")]
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    assert f"script-src 'sha256-{digest}';" in page  # what runs is what the policy allows
    templates = files("infermatrix.reports") / "templates"
    assert script == templates.joinpath("report.js").read_text("utf-8")
    assert f"<style>{templates.joinpath('report.css').read_text('utf-8')}</style>" in page
