"""Read pytest-benchmark's JSON as Records, so teams gating with pytest-benchmark
can use `infermatrix report` and `compare` on the same runs.

Benchmarks written by infermatrix's own pytest module (benchmarks/bench_matrix.py)
carry their case in `extra_info`; any other benchmark becomes a case named by its
test, with workload "pytest". Their timings are whole calls: prefill, generate
(ms per generation, tokens/s over batch x new_tokens, as `infermatrix run`
records them), attention and linear.
"""

from __future__ import annotations

from infermatrix.reports.record import Record


def is_pytest_benchmark(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("benchmarks"), list) and "machine_info" in data


def records_from_pytest_benchmark(data: dict) -> list[Record]:
    env = {"machine_info": data.get("machine_info"), "commit_info": data.get("commit_info"),
           "pytest_benchmark_version": data.get("version"), "datetime": data.get("datetime")}
    records = []
    for bench in data["benchmarks"]:
        stats = bench.get("stats", {})
        extra = bench.get("extra_info") or {}
        case = extra.get("case") or {"model": "", "variant": bench.get("name", ""), "workload": "pytest"}
        case_id = extra.get("case_id") or bench.get("fullname") or bench.get("name", "")
        if case.get("workload") == "decode":  # a whole generation under decode's per-token names
            records.append(Record(case_id=case_id, case=case, status="skipped", env=env, reason=(
                "pytest-benchmark timed a whole generation under this decode id, not decode's per-token steps; "
                "re-run benchmarks/bench_matrix.py, which records it as the generate case")))
            continue
        ms = {k: stats[k] * 1e3 for k in ("min", "max", "mean", "stddev", "median", "iqr") if k in stats}
        metrics = {
            "latency_ms_p50": ms.get("median"), "latency_ms_mean": ms.get("mean"), "latency_ms_min": ms.get("min"),
            "latency_ms_max": ms.get("max"), "latency_ms_stdev": ms.get("stddev"), "latency_ms_iqr": ms.get("iqr"),
            "latency_ms_n": stats.get("rounds"), "runs": stats.get("rounds"),
        }
        tokens = extra.get("tokens_per_call")
        if tokens and ms.get("median"):
            metrics["tokens_per_s"] = tokens / (ms["median"] / 1e3)
        samples = {"latency_ms": [x * 1e3 for x in stats["data"]]} if stats.get("data") else {}
        records.append(Record(case_id=case_id, case=case, status="ok", metrics=metrics, samples=samples, env=env))
    return records
