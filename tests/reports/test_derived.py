"""Labels are promises in every report: the path a record ran is shown, and an
interpreted record's timings stay out of speed charts, compare and the gate, while
its accuracy metrics still count."""

import itertools
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

from infermatrix.reports.compare import compare_runs, render_compare_text
from infermatrix.reports.csv_report import write_csv
from infermatrix.reports.derived import (
    Speedup, ran, shape_label, speedup_details, speedups, timings_meaningful,
)
from infermatrix.reports.gate import evaluate
from infermatrix.reports.html_report import render_html
from infermatrix.reports.markdown_report import render_markdown
from infermatrix.reports.record import shape_parts
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


def test_a_shape_label_reads_as_the_case_ids_shape_part():
    """One tag table: the label every report shows is the case id's shape part with spaces."""
    from infermatrix.bench.matrix import parse_matrix

    matrix = parse_matrix({"cases": [
        {"model": "tiny", "variant": "sdpa", "workload": ["prefill", "decode", "generate", "drift"],
         "prompt_len": 32, "new_tokens": 6},
        {"model": "tiny", "variant": "sdpa", "workload": "attention", "prompt_len": 64, "heads": 8, "kv_heads": 2,
         "head_dim": 32, "causal": [True, False]},
        {"model": "tiny", "variant": "sdpa", "workload": "linear", "batch": 2, "prompt_len": 16,
         "in_features": 64, "out_features": 256},
    ]})
    labels = [shape_label(c.to_dict()) for c in matrix.cases]
    assert labels == ["b1 p32", "b1 p32 n6", "b1 p32 n6", "w4 p32 n6", "b1 p64 h8 kv2 d32 causal",
                      "b1 p64 h8 kv2 d32 full", "b2 p16 k64 n256"]
    assert labels == [c.case_id.rsplit("/", 1)[1].replace("-", " ") for c in matrix.cases]


def test_a_shape_label_shows_any_nonzero_size_field():
    case = {"model": "m", "variant": "v", "workload": "attention", "dtype": "float32", "device": "cpu",
            "batch": 1, "prompt_len": 1, "kv_len": 4096, "heads": 8, "kv_heads": 0, "causal": False,
            "experts": 4, "top_k": 0, "fused": True}
    assert shape_parts(case, ["kv_len", "experts", "causal", "top_k"]) == ["kvlen4096", "experts4", "full"]
    assert shape_label(case) == "b1 p1 kvlen4096 h8 full experts4"  # a field without a tag: its name
    assert shape_label(case, without=["batch", "prompt_len", "experts"]) == "kvlen4096 h8 full"
    assert shape_label({**case, "workload": "prefill"}).endswith("h8 experts4")  # causal: attention only
    assert shape_label({}) == ""


def test_a_named_baseline_is_the_record_a_speedup_is_a_ratio_to():
    reference, sdpa, flex = rec("reference", median=100.0), rec("sdpa", median=50.0), rec("flex", median=25.0)
    for r in (sdpa, flex):
        r.baseline_id = sdpa.case_id  # the matrix's table names sdpa as its baseline
    orphan = rec("triton", median=10.0)
    orphan.baseline_id = "tiny/gone/prefill/float32/cpu/b1-p128"
    slow = interpreted(5.0)
    slow.baseline_id = sdpa.case_id
    s = speedup_details([reference, sdpa, flex, orphan, slow])
    assert set(s) == {reference.case_id, sdpa.case_id, flex.case_id}  # no baseline, no timings: no speedup
    assert s[flex.case_id].ratio == pytest.approx(2.0) and s[flex.case_id].baseline_id == sdpa.case_id
    assert s[flex.case_id].named and s[flex.case_id].baseline == "sdpa" and s[flex.case_id].rounds == 0
    assert s[flex.case_id].ci_low is None and s[flex.case_id].ci_high is None  # a ratio of medians
    assert s[sdpa.case_id] == Speedup(1.0, sdpa.case_id, named=True)  # the baseline row itself
    assert s[reference.case_id] == Speedup(1.0, reference.case_id)  # no baseline named: the reference rule
    drift_base = rec("sdpa", "drift")
    flex.baseline_id = drift_base.case_id
    assert flex.case_id not in speedup_details([drift_base, flex])  # a drift row has no latency to divide


def rounds_record(variant, round_medians, *, p50, group="g1"):
    """A record of an interleaved run: one round per median, three samples around it,
    taken in the rounds of interleave group `group`."""
    r = rec(variant, median=p50)
    r.samples = {"latency_ms": [m * f for m in round_medians for f in (0.99, 1.0, 1.01)],
                 "round_sizes": [3] * len(round_medians)}
    r.env = {**r.env, "interleave": {"group": group, "rounds": len(round_medians), "turn_s": 0.5}}
    return r


def test_paired_rounds_give_the_speedup_and_its_interval():
    """The base drifts from 10 to 24 ms over the run; the variant ran each round about twice
    as fast. The speedup comes from the rounds (not the p50 metrics, set apart here on
    purpose) and reads > 1 for faster."""
    base_rounds = [10.0, 12.0, 14.0, 16.0, 18.0, 20.0, 22.0, 24.0]
    jitter = [-0.02, -0.01, 0.0, 0.01, 0.02, 0.03, -0.03, 0.0]  # symmetric about 0
    new_rounds = [b / 2 * math.exp(d) for b, d in zip(base_rounds, jitter)]
    base = rounds_record("reference", base_rounds, p50=100.0)
    new = rounds_record("sdpa", new_rounds, p50=80.0)
    s = speedup_details([base, new])[new.case_id]
    assert s.rounds == 8 and s.ratio == pytest.approx(2.0)
    assert 1.9 < s.ci_low < 2.0 < s.ci_high < 2.1 and s.baseline_id == base.case_id and not s.named
    slower = speedup_details([rounds_record("reference", new_rounds, p50=1.0),
                              rounds_record("sdpa", base_rounds, p50=1.0)])
    assert slower[new.case_id].ratio == pytest.approx(0.5) and slower[new.case_id].ci_high < 1.0
    # rounds that do not pair (8 against 7, or a single round): the ratio of the p50s, no interval
    for rounds in (new_rounds[:7], new_rounds[:1]):
        uneven = rounds_record("sdpa", rounds, p50=80.0)
        base_one = base if len(rounds) > 1 else rounds_record("reference", base_rounds[:1], p50=100.0)
        s = speedup_details([base_one, uneven])[uneven.case_id]
        assert (s.ratio, s.ci_low, s.ci_high, s.rounds) == (pytest.approx(1.25), None, None, 0)
    # as many rounds, but not taken together (two groups, or an A/B side's rounds): no pairing
    for other in (rounds_record("sdpa", new_rounds, p50=80.0, group="g2"), rounds_record("sdpa", new_rounds, p50=80.0)):
        if other.env["interleave"]["group"] == "g1":
            del other.env["interleave"]
        s = speedup_details([base, other])[other.case_id]
        assert (s.ratio, s.rounds) == (pytest.approx(1.25), 0)



def named_baseline_run():
    """A table whose matrix names sdpa as the baseline, a reference row without one, and a drift row."""
    reference, sdpa, flex = rec("reference", median=100.0), rec("sdpa", median=50.0), rec("flex", median=20.0)
    sdpa.baseline_id = flex.baseline_id = sdpa.case_id
    return [reference, sdpa, flex, rec("triton", "drift")]


def markdown_rows(md: str) -> list[dict]:
    """The summary table's rows as {header: cell}."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))) for row in table[2:]]


def test_every_table_shows_the_speedup_and_a_named_baseline():
    records = named_baseline_run()
    rows = markdown_rows(render_markdown(records))
    assert [(r["variant"], r["× base"], r["baseline"]) for r in rows] == [
        ("reference", "1.00×", ""), ("sdpa", "1.00×", "itself"), ("flex", "2.50×", "sdpa"), ("triton", "", "")]
    table = render_table(records).splitlines()
    assert table[0].split()[-6:] == ["×base", "baseline", "kl_mean", "top1%", "Δppl%", "status"]
    assert re.search(r" flex .* 2\.50× +sdpa +ok$", table[3]) and re.search(r" 1\.00× +itself +ok$", table[2])
    # without a named baseline there is no baseline column, and the terminal drops a blank speedup column
    plain = [rec("reference", median=100.0), rec("sdpa", median=50.0)]
    assert [(r["× base"], "baseline" in r) for r in markdown_rows(render_markdown(plain))] == [
        ("1.00×", False), ("2.00×", False)]
    assert "×base" in render_table(plain) and "baseline" not in render_table(plain)
    assert "×base" not in render_table([rec("sdpa")]) and "| × base |" in render_markdown([rec("sdpa")])


def test_results_csv_carries_the_speedup_its_interval_and_baseline(tmp_path):
    records = named_baseline_run()
    base_rounds = [10.0, 12.0, 14.0, 16.0, 18.0, 20.0]
    records += [rounds_record("reference", base_rounds, p50=1.0),
                rounds_record("sdpa", [b / 2 for b in base_rounds], p50=1.0)]
    records[-2].case["dtype"] = records[-1].case["dtype"] = "bfloat16"  # their own case, paired in six rounds
    records[-2].case_id, records[-1].case_id = "ref/bf16", "sdpa/bf16"
    write_csv(records, tmp_path)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame.columns[-4:]) == ["speedup", "speedup_ci_low", "speedup_ci_high", "baseline_id"]
    sdpa_id = records[1].case_id
    assert frame["speedup"].tolist()[:3] == [1.0, 1.0, 2.5] and math.isnan(frame["speedup"][3])
    assert frame["baseline_id"].tolist()[:3] == [records[0].case_id, sdpa_id, sdpa_id]
    assert frame["speedup_ci_low"][:4].isna().all()  # ratios of medians: no interval
    assert frame["speedup"][5] == pytest.approx(2.0) and frame["speedup_ci_low"][5] == pytest.approx(2.0)
    assert frame["speedup_ci_high"][5] == pytest.approx(2.0) and frame["baseline_id"][5] == "ref/bf16"


def test_the_page_names_the_baseline_in_cells_and_captions():
    records = named_baseline_run()
    page = render_html(records)
    sdpa_id = records[1].case_id
    assert '<th data-col="speedup" data-type="num"' in page and ">× base</th>" in page
    assert '<th data-col="baseline" data-type="text"' in page
    assert f'data-value="2.5" class="num" title="2.500× over {sdpa_id}">2.50×</td>' in page
    assert '<td data-col="baseline" data-value="sdpa">sdpa</td>' in page
    assert "Speedup over the baseline, higher is better" in page and "baseline = 1×" in page
    assert "over reference" not in page and "× reference latency" not in page
    plain = render_html([rec("reference", median=100.0), rec("sdpa", median=50.0)])
    assert "Speedup over the reference variant (same case)" in plain and 'data-col="baseline"' not in plain


def test_energy_per_token_shows_only_when_measured_and_the_summary_says_which_counters():
    measured = rec("sdpa", metrics={"energy_j": 0.5, "energy_j_per_token": 0.0039, "avg_power_w": 40.0})
    measured.env = {"energy": {"cpu": {"source": "rapl", "counters": ["intel-rapl:0 (package-0)"]},
                               "cuda": {"source": None, "why": "cuda:0: no readable NVML counter"}}}
    md = render_markdown([measured])
    assert [r["J/token"] for r in markdown_rows(md)] == ["0.0039"]
    assert ("Energy counters: cpu rapl (intel-rapl:0 (package-0)) · cuda none: cuda:0: no readable NVML counter"
            in md)
    plain = rec("sdpa")
    plain.env = {"energy": {"cpu": {"source": None, "why": "no readable RAPL counter: /sys/class/powercap does "
                                                            "not exist"}}}
    md = render_markdown([plain])
    assert "J/token" not in md and "Energy counters: cpu none: no readable RAPL counter" in md
    # lower is better, and a gate rule may name it
    result = evaluate([rec("sdpa", metrics={"energy_j_per_token": 1.0})],
                      [rec("sdpa", metrics={"energy_j_per_token": 1.2})], ["energy_j_per_token:+10%"])
    assert not result.passed and "energy_j_per_token" in result.failures[0]
