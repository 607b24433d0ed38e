"""compare_runs on synthetic records built with seeded samples."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from infermatrix.reports.compare import (
    DIRECTION, HIGHER, LOWER, _exact_u_cdf, compare_metric, compare_runs, latency_samples, mann_whitney_p,
    ratio_ci, render_compare_html, render_compare_markdown, render_compare_text,
)
from infermatrix.reports.record import Record

DRIFT = {"kl_mean": 0.0015, "kl_max": 0.03, "top1_agree_pct": 97.0, "ppl_delta_pct": -0.2, "dp_rms": 0.8,
         "logits_rel_l2": 0.013, "sqnr_db": 37.0, "greedy_match_len": 6.0, "logits_max_abs": 1.4}


def rec(variant="sdpa", workload="prefill", *, median=10.0, spread=0.01, n=30, seed=0, status="ok",
        new_tokens=9, metrics=None, case_id=None, reason=None):
    """A record whose per-call (prefill/attention) or per-token (decode) latency samples
    are lognormal around `median`; metrics derived from them as the runner does."""
    case = {"model": "tiny", "variant": variant, "workload": workload, "dtype": "float32", "device": "cpu",
            "batch": 1, "prompt_len": 128, "new_tokens": new_tokens if workload == "decode" else 0}
    cid = case_id or f"tiny/{variant}/{workload}/float32/cpu/b1-p128"
    if status != "ok":
        return Record(case_id=cid, case=case, status=status, reason=reason or "boom")
    xs = median * np.exp(np.random.default_rng(seed).normal(0.0, spread, n))
    p50 = float(np.median(xs))
    samples, m = {}, {"latency_ms_p50": p50, "peak_rss_bytes": 1e9}
    if workload == "prefill":
        samples["latency_ms"] = xs.tolist()
        m.update(tokens_per_s=128 * 1000 / p50, ttft_ms_p50=p50)
    elif workload == "attention":
        samples["latency_ms"] = xs.tolist()
        m.update(achieved_tflops=1.0 / p50)
    elif workload == "decode":
        samples["generation_ms"] = (xs * (new_tokens - 1)).tolist()
        samples["ttft_ms"] = (xs * 0.9).tolist()
        samples["tpot_ms"] = np.repeat(xs, new_tokens - 1).tolist()
        m.update(tokens_per_s=1000 / p50, ttft_ms_p50=p50 * 0.9, tpot_ms_p50=p50)
    elif workload == "drift":
        m = dict(DRIFT)
    m.update(metrics or {})
    return Record(case_id=cid, case=case, status="ok", metrics=m, samples=samples)


def run(seed=0, **kw):
    return [rec("sdpa", "prefill", seed=seed, **kw), rec("sdpa", "decode", seed=seed + 100, **kw),
            rec("reference", "attention", seed=seed + 200, **kw), rec("sdpa", "drift")]


def change(comparison, case_part, metric):
    [c] = [c for c in comparison.changes if case_part in c.case_id and c.metric == metric]
    return c


def test_identical_runs_show_no_change():
    a = run()
    comp = compare_runs(a, a)
    assert comp.matched == 4 and not comp.only_base and not comp.only_new and not comp.status_changes
    speed = comp.speed()
    assert {c.metric for c in speed} == {"latency_ms_p50", "tokens_per_s", "ttft_ms_p50", "tpot_ms_p50"}
    for c in speed:
        assert c.ratio == pytest.approx(1.0) and not c.significant and c.p_value == pytest.approx(1.0)
        assert c.ci_low < 1.0 < c.ci_high and c.verdict == "same"
    assert all(c.diff == 0 and c.verdict == "same" for c in comp.values())
    text = render_compare_text(comp)
    rows = [line for line in text.splitlines() if line.startswith("tiny/") and "x [" in line]
    assert rows and all(line.split("]")[1].split()[0] == "~" for line in rows)


def test_planted_slowdown_ratio_ci_and_significance():
    base, new = run(seed=0), run(seed=1, median=12.0)
    comp = compare_runs(base, new)
    lat = change(comp, "/prefill/", "latency_ms_p50")
    assert lat.kind == "speed" and lat.ratio == pytest.approx(1.2, rel=0.01)
    assert 1.15 < lat.ci_low < 1.2 < lat.ci_high < 1.25
    assert lat.p_value < 1e-8 and lat.significant and lat.verdict == "worse"
    assert (lat.n_base, lat.n_new) == (30, 30)
    # throughput: the same samples, inverted
    tps = change(comp, "/prefill/", "tokens_per_s")
    assert tps.ratio == pytest.approx(1 / lat.ratio) and tps.p_value == lat.p_value
    assert (tps.ci_low, tps.ci_high) == pytest.approx((1 / lat.ci_high, 1 / lat.ci_low))
    assert tps.verdict == "worse" and tps.base == base[0].metrics["tokens_per_s"]
    text = render_compare_text(comp)
    assert f"{lat.ratio:.2f}x [{lat.ci_low:.2f}, {lat.ci_high:.2f}] *" in text
    assert f"{tps.ratio:.2f}x [{tps.ci_low:.2f}, {tps.ci_high:.2f}] *" in text
    assert "worse" in text


def test_speedup_is_better():
    comp = compare_runs(run(seed=0), run(seed=1, median=8.0))
    assert change(comp, "/attention/", "latency_ms_p50").verdict == "better"
    assert change(comp, "/prefill/", "tokens_per_s").verdict == "better"


def test_twenty_percent_inside_wide_noise_is_not_significant():
    base = [rec(spread=0.5, n=6, seed=3)]
    new = [rec(spread=0.5, n=6, seed=4, median=12.0)]
    lat = change(compare_runs(base, new), "/prefill/", "latency_ms_p50")
    assert lat.p_value >= 0.05 and not lat.significant and lat.verdict == "same"
    assert lat.ci_low < 1.0 < lat.ci_high
    assert f"{lat.ratio:.2f}x [{lat.ci_low:.2f}, {lat.ci_high:.2f}] ~" in render_compare_text(compare_runs(base, new))


def test_decode_is_compared_per_token():
    r = rec("sdpa", "decode", median=20.0, new_tokens=9)
    per_token = latency_samples(r)
    assert per_token == pytest.approx(np.asarray(r.samples["generation_ms"]) / 8)
    assert np.median(per_token) == pytest.approx(r.metrics["latency_ms_p50"])
    c = compare_metric(r, rec("sdpa", "decode", median=25.0, new_tokens=9, seed=5), "latency_ms_p50")
    assert c.base == pytest.approx(r.metrics["latency_ms_p50"]) and c.ratio == pytest.approx(1.25, rel=0.01)
    ttft = compare_metric(r, r, "ttft_ms_p50")
    assert ttft.base == pytest.approx(r.metrics["ttft_ms_p50"]) and ttft.n_base == 30
    assert compare_metric(r, r, "tpot_ms_p50").n_base == 30 * 8


def test_accuracy_metrics_report_base_new_and_difference_without_a_test():
    base = [rec("int8", "drift")]
    new = [rec("int8", "drift", metrics={"kl_mean": 0.0035, "top1_agree_pct": 98.0, "sqnr_db": 37.0})]
    comp = compare_runs(base, new)
    kl = change(comp, "/drift/", "kl_mean")
    assert kl.kind == "value" and kl.p_value is None and not kl.significant
    assert (kl.base, kl.new) == (0.0015, 0.0035) and kl.diff == pytest.approx(0.002) and kl.verdict == "worse"
    assert change(comp, "/drift/", "top1_agree_pct").verdict == "better"
    assert change(comp, "/drift/", "sqnr_db").verdict == "same"
    text = render_compare_text(comp)
    line = next(line for line in text.splitlines() if " kl_mean " in line)
    assert "+0.002" in line and "x [" not in line and "worse" in line


def test_identical_logits_sqnr_reads_back_as_infinity():
    base = rec("reference", "drift", metrics={"sqnr_db": None, "logits_max_abs": 0.0})
    c = compare_metric(base, base, "sqnr_db")
    assert c.base == math.inf and c.diff == 0 and c.verdict == "same"


def test_cases_only_in_one_run_and_status_changes():
    base = [rec("a"), rec("b"), rec("c"), rec("d", status="failed", reason="OOM")]
    new = [rec("a"), rec("c", status="failed", reason="segfault"), rec("d"), rec("e")]
    comp = compare_runs(base, new)
    assert comp.only_base == ["tiny/b/prefill/float32/cpu/b1-p128"]
    assert comp.only_new == ["tiny/e/prefill/float32/cpu/b1-p128"]
    assert [(s.case_id.split("/")[1], s.base, s.new, s.reason) for s in comp.status_changes] == [
        ("c", "ok", "failed", "segfault"), ("d", "failed", "ok", "OOM")]
    assert {c.case_id.split("/")[1] for c in comp.changes} == {"a"}  # only cases ok in both
    text = render_compare_text(comp)
    assert "only in BASE: tiny/b/" in text and "only in NEW: tiny/e/" in text
    assert "tiny/c/prefill/float32/cpu/b1-p128: ok -> failed (segfault)" in text
    md = render_compare_markdown(comp)
    assert "only in NEW: tiny/e/" in md and "ok -> failed" in md


def test_last_record_of_a_case_wins():
    comp = compare_runs([rec(status="failed"), rec()], [rec()])
    assert not comp.status_changes and comp.speed()


def test_too_few_samples_have_no_interval_and_no_significance():
    base, new = [rec(n=2, seed=0)], [rec(n=2, seed=1, median=20.0)]
    lat = change(compare_runs(base, new), "/prefill/", "latency_ms_p50")
    assert lat.ci_low is None and lat.p_value is not None and not lat.significant
    assert "[n/a] ~" in render_compare_text(compare_runs(base, new))


def test_metric_selection_and_missing_metrics():
    comp = compare_runs(run(), run(seed=7), metrics=["latency_ms_p50", "achieved_tflops", "peak_rss_bytes"])
    assert {c.metric for c in comp.changes} == {"latency_ms_p50", "achieved_tflops", "peak_rss_bytes"}
    assert change(comp, "/attention/", "achieved_tflops").kind == "speed"
    assert not [c for c in comp.changes if "/prefill/" in c.case_id and c.metric == "achieved_tflops"]
    assert change(comp, "/prefill/", "peak_rss_bytes").kind == "value"


def test_markdown_and_html_escape():
    evil = "tiny/<script>|x/prefill/float32/cpu/b1"
    base = [rec(case_id=evil), rec("b")]
    new = [rec(case_id=evil, seed=1, median=12.0)]
    comp = compare_runs(base, new)
    md = render_compare_markdown(comp)
    assert "<script>\\|x" in md and "| new/base |" in md and "1.2" in md
    page = render_compare_html(comp)
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<script>" not in page
    assert "&lt;script&gt;|x" in page and 'class="worse"' in page and "http" not in page


def test_direction_table():
    assert DIRECTION["latency_ms_p50"] == DIRECTION["tpot_ms_p50"] == DIRECTION["kl_mean"] == LOWER
    assert DIRECTION["ppl_delta_pct"] == DIRECTION["dp_rms"] == DIRECTION["logits_rel_l2"] == LOWER
    assert DIRECTION["tokens_per_s"] == DIRECTION["achieved_tflops"] == DIRECTION["top1_agree_pct"] == HIGHER
    assert DIRECTION["sqnr_db"] == DIRECTION["greedy_match_len"] == HIGHER
    assert "dp_mean" not in DIRECTION and "flops" not in DIRECTION


def test_exact_u_distribution_matches_enumeration():
    m, n = 3, 5
    counts = [0] * (m * n + 1)
    for xs in itertools.combinations(range(m + n), m):  # ranks of the first sample
        counts[sum(sum(1 for y in range(m + n) if y not in xs and y > x) for x in xs)] += 1
    assert _exact_u_cdf(m, n) == pytest.approx(np.cumsum(counts) / math.comb(m + n, m))
    assert _exact_u_cdf(5, 3) == _exact_u_cdf(3, 5)


def test_interval_excludes_one_exactly_when_the_test_rejects():
    rng = np.random.default_rng(42)
    for _ in range(60):
        m, n = int(rng.integers(3, 14)), int(rng.integers(3, 14))
        x = np.exp(rng.normal(0, 0.1, m))
        y = np.exp(rng.normal(rng.uniform(-0.15, 0.15), 0.1, n))
        ci = ratio_ci(x, y, 0.05)
        p = mann_whitney_p(x, y)
        assert p == pytest.approx(stats.mannwhitneyu(x, y, method="exact").pvalue)
        if ci is None:  # too few samples for a 95% interval: nor can the test reject
            assert p >= 0.05
        else:
            assert (not ci[0] <= 1 <= ci[1]) == (p < 0.05)


def test_large_samples_use_the_normal_approximation():
    rng = np.random.default_rng(0)
    x, y = np.exp(rng.normal(0, 0.05, 200)), np.exp(rng.normal(0.1, 0.05, 200))
    lo, hi = ratio_ci(x, y, 0.05)
    assert lo < math.exp(0.1) < hi and hi / lo < 1.03
    assert mann_whitney_p(x, y) < 1e-10


def test_alpha_is_validated():
    with pytest.raises(ValueError, match="alpha"):
        compare_runs([], [], alpha=1.5)
