"""Teams that gate with pytest-benchmark keep their habit: the matrix's cases run as
pytest-benchmark benchmarks, `--benchmark-compare-fail` works on them, and
`infermatrix report`/`compare` read the JSON."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from infermatrix.bench import workloads
from infermatrix.bench.matrix import Case, RunSettings
from infermatrix.bench.runner import ModelCache, RunContext
from infermatrix.bench.workloads import benchmark_callable, benchmark_case
from infermatrix.errors import UserError
from infermatrix.reports.compare import compare_runs
from infermatrix.reports.pytest_benchmark import records_from_pytest_benchmark
from infermatrix.reports.record import Record
from infermatrix.reports.run import load_run

MODULE = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_matrix.py"
MATRIX = """
[run]
seed = 0

[[cases]]
model = "tiny"
variant = ["reference", "sdpa"]
workload = ["prefill", "drift", "decode"]
prompt_len = 16
new_tokens = 3
"""


def pytest_bench(tmp_path, *args):
    env_matrix = tmp_path / "m.toml"
    env_matrix.write_text(MATRIX)
    cmd = [sys.executable, "-m", "pytest", "-q", str(MODULE), "-p", "no:cacheprovider", "--benchmark-min-rounds=3",
           "--benchmark-max-time=0.05", *args]
    import os

    env = {**os.environ, "INFERMATRIX_MATRIX": str(env_matrix)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_matrix_cases_run_as_pytest_benchmarks_and_compare(tmp_path):
    first = pytest_bench(tmp_path, "--benchmark-save=base", "--benchmark-save-data",
                         f"--benchmark-json={tmp_path / 'out.json'}")
    assert first.returncode == 0, first.stdout[-2000:]
    assert "4 passed, 2 skipped" in first.stdout  # drift is accuracy, not time
    saved = next(tmp_path.glob(".benchmarks/*/0001_base.json"))

    def saved_scaled(name: str, factor: float) -> None:
        data = json.loads(saved.read_text())
        for bench in data["benchmarks"]:
            for key in ("min", "max", "mean", "median", "q1", "q3", "iqr", "stddev", "total"):
                bench["stats"][key] *= factor
        saved.with_name(name).write_text(json.dumps(data))

    # Against saved runs far off reality in each direction, so a noisy machine (this
    # one has slowed whole runs 100x under load) cannot flip either verdict.
    saved_scaled("0002_slow.json", 1000)
    again = pytest_bench(tmp_path, "--benchmark-compare=0002", "--benchmark-compare-fail=median:5%")
    assert again.returncode == 0, again.stdout[-2000:]
    saved_scaled("0003_fast.json", 1 / 1000)
    regressed = pytest_bench(tmp_path, "--benchmark-compare=0003", "--benchmark-compare-fail=median:5%")
    assert regressed.returncode == 1 and "Performance has regressed" in regressed.stdout + regressed.stderr

    run = load_run(tmp_path / "out.json")
    assert sorted(r.case_id for r in run.records) == [  # decode cases are timed, and named, as generate
        "tiny/reference/generate/float32/cpu/b1-p16-n3", "tiny/reference/prefill/float32/cpu/b1-p16",
        "tiny/sdpa/generate/float32/cpu/b1-p16-n3", "tiny/sdpa/prefill/float32/cpu/b1-p16"]
    rec = next(r for r in run.records if r.case["workload"] == "prefill")
    assert rec.case["model"] == "tiny" and len(rec.samples["latency_ms"]) >= 3 and rec.metrics["tokens_per_s"] > 0


# ---------------------------------------------------- what an imported row measured

DECODE_CASE = {"model": "tiny", "variant": "kv_cache+sdpa", "workload": "decode", "dtype": "float32",
               "device": "cpu", "batch": 2, "prompt_len": 16, "new_tokens": 5}
DECODE_ID = "tiny/kv_cache+sdpa/decode/float32/cpu/b2-p16-n5"


def pytest_benchmark_json(case: dict, case_id: str, tokens: int, seconds: list[float]) -> dict:
    """The JSON pytest-benchmark writes for one of bench_matrix.py's benchmarks."""
    stats = {"min": min(seconds), "max": max(seconds), "mean": sum(seconds) / len(seconds), "stddev": 0.0,
             "median": sorted(seconds)[len(seconds) // 2], "iqr": 0.0, "rounds": len(seconds), "data": seconds}
    return {"machine_info": {"node": "x"}, "commit_info": {}, "version": "5.1.0", "datetime": "now",
            "benchmarks": [{"name": f"test_case[{case_id}]", "fullname": f"bench_matrix.py::test_case[{case_id}]",
                            "stats": stats, "extra_info": {"case": case, "case_id": case_id,
                                                           "tokens_per_call": tokens}}]}


def run_generation_record(workload: str, generation_ms: list[float]) -> Record:
    """An `infermatrix run` record of DECODE_CASE's shape: its samples are generations."""
    case = {**DECODE_CASE, "workload": workload}
    per = DECODE_CASE["new_tokens"] - 1 if workload == "decode" else 1  # decode: per output token
    median = sorted(generation_ms)[len(generation_ms) // 2]
    return Record(case_id=DECODE_ID.replace("/decode/", f"/{workload}/"), case=case, status="ok",
                  metrics={"latency_ms_p50": median / per, "tokens_per_s": 2 * (5 - (per != 1)) / (median / 1e3)},
                  samples={"generation_ms": generation_ms})


def test_an_imported_decode_row_is_never_paired_with_a_run_decode_record():
    """bench_matrix.py used to time a whole generation under a decode case's id; a
    run's decode latency is per output token. Such a row is not compared as decode."""
    imported = records_from_pytest_benchmark(pytest_benchmark_json(DECODE_CASE, DECODE_ID, 10,
                                                                   [0.020, 0.021, 0.022, 0.023]))
    run = [run_generation_record("decode", [20.0, 21.0, 22.0, 23.0])]
    comparison = compare_runs(run, imported)
    assert not [c for c in comparison.changes if c.case_id == DECODE_ID]
    assert imported[0].status != "ok" and "generate" in imported[0].reason


def test_decode_cases_are_benchmarked_as_their_generate_twin():
    decode = Case(**DECODE_CASE)
    twin = benchmark_case(decode)
    assert twin.workload == "generate" and twin.case_id == DECODE_ID.replace("/decode/", "/generate/")
    assert benchmark_case(twin) == twin and benchmark_case(replace(decode, workload="prefill")).workload == "prefill"


def test_a_benchmarked_generation_is_what_the_generate_workload_times(monkeypatch):
    """One sample of `infermatrix run`'s generate: all new_tokens steps (the prefill
    included) on a static cache made once, outside the timed call."""
    built = []
    real_decoder = workloads.new_decoder

    def recording_decoder(model, prompt, new_tokens, pad=None, cache=None):
        built.append(cache)
        decoder = real_decoder(model, prompt, new_tokens, pad, cache)
        real_step = decoder.step
        decoder.step = lambda: built.append("step") or real_step()
        return decoder

    monkeypatch.setattr(workloads, "new_decoder", recording_decoder)
    case = benchmark_case(Case(**DECODE_CASE))
    ctx = RunContext(RunSettings(), {})
    fn, tokens = benchmark_callable(case, ctx, ModelCache())
    fn()
    fn()
    assert tokens == 2 * 5  # tokens_per_s = batch * new_tokens / a generation's time, as generate's
    caches = [x for x in built if x != "step"]
    assert len(caches) == 2 and caches[0] is caches[1] is not None
    assert built.count("step") == 2 * 5
    with pytest.raises(UserError, match="benchmark_case"):
        benchmark_callable(Case(**DECODE_CASE), ctx, ModelCache())


def test_an_imported_generate_row_pairs_with_a_run_generate_record_in_the_same_unit():
    generate_id = DECODE_ID.replace("/decode/", "/generate/")
    imported = records_from_pytest_benchmark(pytest_benchmark_json({**DECODE_CASE, "workload": "generate"},
                                                                   generate_id, 10, [0.020, 0.021, 0.022]))
    assert imported[0].metrics["tokens_per_s"] == pytest.approx(10 / 0.021)
    run = [run_generation_record("generate", [20.0, 21.0, 22.0])]
    latency = next(c for c in compare_runs(run, imported).changes if c.metric == "latency_ms_p50")
    assert latency.ratio == pytest.approx(1.0)  # ms per generation on both sides
