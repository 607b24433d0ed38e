"""Labels are promises in every report: the path a record ran is shown, and an
interpreted record's timings stay out of speed charts, compare and the gate, while
its accuracy metrics still count."""

import sys
from pathlib import Path

from infermatrix.reports.compare import compare_runs, render_compare_text
from infermatrix.reports.derived import ran, timings_meaningful
from infermatrix.reports.gate import evaluate
from infermatrix.reports.html_report import render_html, speedups
from infermatrix.reports.markdown_report import render_markdown
from infermatrix.reports.table import render_table

sys.path.insert(0, str(Path(__file__).parent))
from test_gate import rec  # noqa: E402  (the synthetic record maker the gate tests use)


def interpreted(median, metrics=None, **kw):
    return rec("triton", "prefill", median=median, metrics={"triton_interpreted": True,
                                                            "attention_path": "triton_flash", **(metrics or {})}, **kw)


def test_the_ran_cell_names_each_path_and_the_interpreter():
    sparse = rec("block_sparse+kv_cache", "decode", metrics={"attention_path": "block_sparse_gather",
                                                            "linear_path": "fp32_fallback"})
    assert ran(sparse) == "attention block_sparse_gather, linear fp32_fallback"
    assert ran(interpreted(5.0)) == "attention triton_flash, Triton interpreted"
    assert ran(rec()) == "" and timings_meaningful(rec()) and not timings_meaningful(interpreted(5.0))
    windowed = rec("sdpa", "prefill", metrics={"attention_path": "sdpa", "model_window": 4096})
    assert ran(windowed) == "attention sdpa, model window 4096"  # a model's own sliding window was in force
    records = [rec("reference"), sparse, interpreted(5.0)]
    for page in (render_markdown(records), render_table(records), render_html(records)):
        assert "attention block_sparse_gather, linear fp32_fallback" in page
        assert "attention triton_flash, Triton interpreted" in page


def test_interpreted_timings_are_left_out_of_speedups_and_speed_charts():
    reference = rec("reference", median=10.0)
    page = render_html([reference, interpreted(1000.0)])
    assert speedups([reference, interpreted(1000.0)]) == {reference.case_id: 1.0}
    assert "<title>reference — " in page and "<title>triton — " not in page  # no bar for it in any chart


def test_compare_does_not_time_interpreted_cases_but_compares_their_accuracy():
    base = [interpreted(100.0, seed=1, metrics={"kl_mean": 0.001})]
    new = [interpreted(300.0, seed=2, metrics={"kl_mean": 0.002})]
    comparison = compare_runs(base, new, metrics=["latency_ms_p50", "tokens_per_s", "kl_mean"])
    assert [c.metric for c in comparison.changes] == ["kl_mean"]
    assert comparison.interpreted == [new[0].case_id]
    assert f"timings not compared (Triton interpreted): {new[0].case_id}" in render_compare_text(comparison)


def test_compare_names_a_path_that_changed_under_the_same_label():
    base = [rec("block_sparse+kv_cache", "decode", metrics={"attention_path": "dense_masked"})]
    new = [rec("block_sparse+kv_cache", "decode", metrics={"attention_path": "block_sparse_gather"})]
    text = render_compare_text(compare_runs(base, new))
    assert f"path: {new[0].case_id}: attention_path dense_masked -> block_sparse_gather" in text


def test_the_gate_keeps_interpreted_cases_out_of_speed_rules_only():
    base = [interpreted(100.0, seed=1)]
    slower = [interpreted(300.0, seed=2, metrics={"kl_mean": 0.5})]
    result = evaluate(base, slower, ["latency_ms_p50:+5%", "tokens_per_s:-5%", "kl_mean:<=0.05"])
    assert [f.split(": ")[1] for f in result.failures] == ["kl_mean:<=0.05"]  # accuracy still judged
    assert any("ran Triton in the interpreter; speed rules skip them" in w for w in result.warnings)
    # the same slowdown without the interpreter fails
    plain = evaluate([rec("triton", median=100.0, seed=1)], [rec("triton", median=300.0, seed=2)],
                     ["latency_ms_p50:+5%"])
    assert not plain.passed
