"""The serve workload in the harness: its records, case ids, and the refusals when a
matrix is read."""

import pytest

from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from refusals import refusal

QUICK = {"isolate": False}
SERVE = {"model": "tiny", "workload": "serve", "variant": "paged_kv_cache+sdpa", "batch": 4, "prompt_len": 24,
         "new_tokens": 6, "requests": 10}


def quiet(line):
    pass


def test_a_serve_record_has_latency_percentiles_throughput_and_pool_figures(tmp_path):
    matrix = parse_matrix({"run": QUICK, "cases": [{**SERVE, "concurrency": 3}]})
    record = run_matrix(matrix, tmp_path, log=quiet)[0]
    assert record.status == "ok", record.reason
    m = record.metrics
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert 0 < m[f"{name}_p50"] <= m[f"{name}_p90"] <= m[f"{name}_p99"]
        assert record.samples[name]
    assert m["requests_completed"] == 10 and len(record.samples["ttft_ms"]) == 10
    assert m["tokens_per_s"] > 0 and m["request_throughput"] > 0 and "goodput_rps" not in m  # no SLO given
    assert 0 < m["peak_kv_blocks"] <= m["kv_blocks"] == 4 * 3  # 36 + 9 - 1 positions: 3 blocks, 4 running
    assert m["mean_step_tokens"] > 1 and record.metrics["attention_path"] == "paged_gather"
    assert record.case_id == "tiny/sdpa+paged_kv_cache/serve/float32/cpu/b4-p24-n6-q10-c3-tb256"


def test_a_rate_sweep_with_an_slo_records_goodput_and_whether_each_rate_meets_it(tmp_path):
    matrix = parse_matrix({"run": QUICK, "cases": [{**SERVE, "rate": [5.0, 50.0], "slo_ttft_ms": 60000.0,
                                                   "slo_itl_ms": 60000.0}]})
    records = run_matrix(matrix, tmp_path, log=quiet)
    assert [r.case["rate"] for r in records] == [5.0, 50.0]
    for r in records:  # a minute is met by every request
        assert r.status == "ok" and r.metrics["meets_slo"] == 1.0 and r.metrics["slo_attainment"] == 1.0
        assert r.metrics["offered_rate"] == r.case["rate"] and "-rate" in r.case_id and "-slo90" in r.case_id


@pytest.mark.parametrize("table, message", [
    ('rate = 0', "rate must be above 0 requests/s"),
    ('rate = [-1.0, 2.0]', "rate must be a number >= 0"),
    ('rate = 2.0\nslo_ttft_ms = 500.0', "an SLO (slo_ttft_ms, slo_itl_ms) is judged along a rate sweep"),
    ('concurrency = 2\nslo_itl_ms = 50.0', "is judged along a rate sweep"),
    ('rate = 2.0\nkv_blocks = 2', "kv_blocks = 2 blocks of 16 positions cannot hold the longest request"),
    ('rate = 2.0\nvariant = "kv_cache+sdpa"', "kv_cache is a static cache"),
    ('rate = 2.0\nvariant = "sdpa"', "use paged_kv_cache"),
    ('rate = 2.0\nconcurrency = 2', "one of them"),
    ('concurrency = 2\nbatching = "dynamic"', "unknown batching 'dynamic'"),
    ('concurrency = 2\nvariant = "paged_kv_cache(block=12)+sdpa"', "block=12: give a power of two"),
    ('rate = 2.0\nbatch = 8\ntoken_budget = 4', "raise token_budget to at least batch"),
    ('rate = [1.0, 2.0]\nslo_ttft_ms = 100.0\nslo_pct = 150', "slo_pct (150) is a share of requests"),
    ('concurrency = 2\nvariant = "paged_kv_cache+flex"', "paged_kv_cache with flex"),
    ('workload = "decode"', "paged_kv_cache serves a stream of requests (the serve workload"),
])
def test_bad_serve_input_is_one_line_and_exit_2(tmp_path, table, message):
    lines = {"model": '"tiny"', "workload": '"serve"', "variant": '"paged_kv_cache+sdpa"', "prompt_len": "64",
             "new_tokens": "16"}
    for line in table.splitlines():
        lines[line.split(" = ")[0]] = line.split(" = ", 1)[1]
    assert message in refusal(tmp_path, "[[cases]]\n" + "".join(f"{k} = {v}\n" for k, v in lines.items()))
