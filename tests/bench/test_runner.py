import json
from dataclasses import dataclass

import pandas as pd
import pytest

from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench import runner
from infermatrix.bench.runner import run_matrix
from infermatrix.errors import UserError
from infermatrix.reports.record import read_records
from infermatrix.variants import Variant, base, register_variant


@pytest.fixture
def exploding_variant():
    saved = dict(base._REGISTRY)

    @register_variant("explodes")
    @dataclass(frozen=True)
    class Explodes(Variant):
        axis = "linear"

        def apply(self, model):
            raise RuntimeError("kernel exploded")

    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def small_matrix(**overrides):
    table = {"model": "tiny", "variant": ["reference", "sdpa"], "workload": ["prefill", "decode"],
             "batch": [1, 2], "prompt_len": 16, "new_tokens": 3, **overrides}
    return parse_matrix({"run": {"warmup": 1, "repeat": 2}, "cases": [table]})


def test_run_writes_one_record_and_one_csv_row_per_case(tmp_path):
    matrix = small_matrix()
    records = run_matrix(matrix, tmp_path, log=lambda line: None)
    assert [r.status for r in records] == ["ok"] * 8
    on_disk = read_records(tmp_path)
    assert [r.case_id for r in on_disk] == [c.case_id for c in matrix.cases]
    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 8
    assert {"model", "variant", "workload", "latency_ms_p50", "tokens_per_s", "weight_bytes"} <= set(frame.columns)
    assert (frame["tokens_per_s"] > 0).all()
    decode = on_disk[[c.workload for c in matrix.cases].index("decode")]
    assert len(decode.samples["latency_ms"]) == 2 * 2  # repeat x (new_tokens - 1) decode steps
    assert decode.env["versions"]["torch"]


def test_an_interrupted_run_keeps_its_records_and_csv(tmp_path):
    def interrupt_after_first_case(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_matrix(small_matrix(), tmp_path, log=interrupt_after_first_case)
    assert len(read_records(tmp_path)) == 1
    assert len(pd.read_csv(tmp_path / "results.csv")) == 1


def test_cases_run_grouped_by_model_and_dtype(tmp_path, monkeypatch):
    loads = []
    real_load = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: loads.append(a[:2]) or real_load(*a, **k))
    matrix = small_matrix(dtype=["float32", "bfloat16"], workload="prefill", batch=1)  # 4 cases, 2 dtypes
    run_matrix(matrix, tmp_path, log=lambda line: None)
    assert len(loads) == 2


def test_a_crashing_case_is_a_failed_record_and_the_run_goes_on(tmp_path, exploding_variant):
    matrix = parse_matrix({"run": {"repeat": 1}, "cases": [
        {"model": "tiny", "variant": "explodes+sdpa", "prompt_len": 8},
        {"model": "tiny", "variant": "sdpa", "prompt_len": 8},
    ]})
    records = run_matrix(matrix, tmp_path, log=lambda line: None)
    assert records[0].status == "failed" and "RuntimeError: kernel exploded" in records[0].reason
    assert records[1].status == "ok"
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2


def test_cuda_case_without_a_gpu_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    matrix = parse_matrix({"run": {"repeat": 1}, "cases": [{"model": "tiny", "variant": "sdpa", "device": "cuda"}]})
    rec = run_matrix(matrix, tmp_path, log=lambda line: None)[0]
    assert (rec.status, rec.reason) == ("skipped", "needs CUDA (no CUDA device on this machine)")


def test_an_existing_run_folder_is_not_overwritten(tmp_path):
    run_matrix(small_matrix(workload="prefill", variant="sdpa", batch=1), tmp_path, log=lambda l: None)
    before = (tmp_path / "records.jsonl").read_text()
    with pytest.raises(UserError, match="already holds records.jsonl; choose a new folder"):
        run_matrix(small_matrix(), tmp_path, log=lambda l: None)
    assert (tmp_path / "records.jsonl").read_text() == before
    assert json.loads(before.splitlines()[0])["schema_version"] == 1
