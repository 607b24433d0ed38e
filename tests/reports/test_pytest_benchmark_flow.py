"""Teams that gate with pytest-benchmark keep their habit: the matrix's cases run as
pytest-benchmark benchmarks, `--benchmark-compare-fail` works on them, and
`infermatrix report`/`compare` read the JSON."""

import json
import subprocess
import sys
from pathlib import Path

from infermatrix.reports.run import load_run

MODULE = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_matrix.py"
MATRIX = """
[run]
seed = 0

[[cases]]
model = "tiny"
variant = ["reference", "sdpa"]
workload = ["prefill", "drift"]
prompt_len = 16
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
    assert "2 passed, 2 skipped" in first.stdout  # drift is accuracy, not time
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
    assert sorted(r.case_id for r in run.records) == ["tiny/reference/prefill/float32/cpu/b1-p16",
                                                      "tiny/sdpa/prefill/float32/cpu/b1-p16"]
    rec = run.records[0]
    assert rec.case["model"] == "tiny" and len(rec.samples["latency_ms"]) >= 3 and rec.metrics["tokens_per_s"] > 0
