"""The Ray executor on a local Ray instance started here: a small matrix runs, a crashed
task is a failed record for its case, and the run goes on."""

import sys

import pytest

from infermatrix.bench.matrix import Case, parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.errors import UserError
from infermatrix.reports.record import read_records

ray = pytest.importorskip("ray", reason="the Ray executor is an extra: pip install 'infermatrix[ray]'")

from infermatrix.bench.ray_executor import RayExecutor  # noqa: E402

QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 10, "max_time_s": 0.2}


@pytest.fixture(scope="module")
def local_ray():
    # tests/conftest.py put the fault plugin on PYTHONPATH, which Ray's workers inherit
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def matrix(isolate, fault):
    return parse_matrix({"run": {**QUICK, "isolate": isolate, "timeout_s": 120}, "cases": [
        {"model": "tiny", "variant": ["reference", "sdpa", f"sdpa+fault(kind={fault})"], "workload": "attention",
         "prompt_len": 16},
        {"model": "tiny", "variant": "reference", "workload": "linear", "prompt_len": 8, "device": ["cpu", "cuda"]},
    ]})


def test_a_worker_that_dies_is_a_failed_record_and_the_run_goes_on(local_ray, tmp_path):
    """isolate = false: the case runs in the Ray worker itself, so the segfault kills it."""
    m = matrix(isolate=False, fault="segfault")
    lines = []
    records = run_matrix(m, tmp_path, log=lines.append, executor=RayExecutor(log=lines.append))
    by_id = {r.case_id: r for r in records}
    assert sorted(by_id) == sorted(c.case_id for c in m.cases)
    assert sorted(r.case_id for r in read_records(tmp_path)) == sorted(by_id)  # streamed into records.jsonl
    crashed = by_id["tiny/sdpa+fault(kind=segfault)/attention/float32/cpu/b1-p16-causal"]
    assert crashed.status == "failed" and crashed.reason.startswith("Ray task lost (WorkerCrashedError)")
    gpu = by_id["tiny/reference/linear/float32/cuda/b1-p8"]
    assert (gpu.status, gpu.reason) == ("skipped", "needs CUDA (1 GPU on one node; no node of the Ray cluster "
                                                   "has any)")
    ok = [r for r in records if r.status == "ok"]
    assert len(ok) == 3 and all(r.metrics["latency_ms_p50"] > 0 for r in ok)
    assert all(r.env["executor"] == "ray" and r.env["peaks"]["cpu"]["bandwidth_gbs"] > 0 for r in ok)
    assert "ray: 1 nodes, 2 CPUs, 0 GPUs" in lines
    assert ray.is_initialized()  # a cluster the executor did not start is left running


def test_isolated_cases_crash_in_their_own_process_on_the_worker(local_ray, tmp_path):
    m = matrix(isolate=True, fault="exit")
    records = {r.case_id: r for r in run_matrix(m, tmp_path, log=lambda line: None, executor=RayExecutor())}
    crashed = records["tiny/sdpa+fault(kind=exit)/attention/float32/cpu/b1-p16-causal"]
    assert (crashed.status, crashed.reason) == ("failed", "case process exited with status 3 without a record")
    ok = [r for r in records.values() if r.status == "ok"]
    assert len(ok) == 3 and all(r.metrics["peak_rss_bytes"] > 0 for r in ok)  # measured in the case's process


def test_each_case_asks_for_what_it_needs():
    nodes = [{"Resources": {"CPU": 16.0, "GPU": 2.0}}, {"Resources": {"CPU": 8.0}}]
    executor = RayExecutor()
    assert executor._resources(Case("tiny", "sdpa", device="cuda"), nodes) == {"num_gpus": 1, "num_cpus": 1}
    assert executor._resources(Case("tiny", "sdpa", device="cuda:1"), nodes) == {"num_gpus": 2, "num_cpus": 1}
    assert "no node of the Ray cluster has more than 2" in executor._resources(Case("tiny", "sdpa", device="cuda:2"),
                                                                               nodes)
    assert executor._resources(Case("tiny", "sdpa"), nodes) == {"num_cpus": 8.0}  # a whole (smallest) node
    assert RayExecutor(cpus_per_case=2)._resources(Case("tiny", "sdpa"), nodes) == {"num_cpus": 2}
    with pytest.raises(UserError, match="--cpus-per-case must be positive"):
        RayExecutor(cpus_per_case=0)


def test_without_ray_installed_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"--executor ray needs Ray: pip install 'infermatrix\[ray\]'"):
        RayExecutor()


def test_an_address_nothing_listens_on_is_refused_at_once():
    from infermatrix.bench.ray_executor import _check_reachable

    with pytest.raises(UserError, match=r"--address 127.0.0.1:1: nothing answers there .*ray start --head --port=1"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("ray://head:10001")  # left to Ray
    _check_reachable(None)
