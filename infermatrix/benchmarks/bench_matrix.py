"""The matrix's cases as pytest-benchmark benchmarks, for teams that gate with it.

    INFERMATRIX_MATRIX=ci pytest benchmarks/bench_matrix.py --benchmark-save=base
    INFERMATRIX_MATRIX=ci pytest benchmarks/bench_matrix.py \\
        --benchmark-compare --benchmark-compare-fail=median:5%

INFERMATRIX_MATRIX is a matrix file or a built-in name (default: ci). Each case's
timed call runs in this process (no isolation); drift cases are skipped (they
measure accuracy, not time), and a decode case runs as its generate twin (a whole
generation: pytest-benchmark times whole calls, decode's figures are per output
token), once even when the matrix has both. `infermatrix report` and `compare`
read the JSON that `--benchmark-json=FILE` writes: the case rides along in extra_info.
"""

import os

import pytest
import torch

from infermatrix.bench.env import capture_env
from infermatrix.bench.matrix import load_matrix
from infermatrix.bench.runner import ModelCache, RunContext, skip_reason
from infermatrix.bench.workloads import benchmark_callable, benchmark_case

MATRIX = load_matrix(os.environ.get("INFERMATRIX_MATRIX", "ci"))
CONTEXT = RunContext(MATRIX.settings, capture_env())
MODELS = ModelCache(MATRIX.settings.seed)
CASES = list(dict.fromkeys(benchmark_case(case) for case in MATRIX.cases))  # in order, each once


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.case_id)
def test_case(benchmark, case):
    if case.workload == "drift":
        pytest.skip("drift measures accuracy, not time: use `infermatrix run` for it")
    reason = skip_reason(case)
    if reason:
        pytest.skip(reason)
    fn, tokens = benchmark_callable(case, CONTEXT, MODELS)
    benchmark.extra_info.update(case=case.to_dict(), case_id=case.case_id, tokens_per_call=tokens)
    with torch.inference_mode():
        benchmark(fn)
