"""The run's files: CSV and JSON round trips, the Markdown summary, loading every
form of a run, and bad input."""

import json
import math

import pandas as pd
import pytest

from infermatrix.errors import UserError
from infermatrix.reports.csv_report import write_csv
from infermatrix.reports.json_report import write_json
from infermatrix.reports.markdown_report import render_markdown
from infermatrix.reports.record import Record, append_record
from infermatrix.reports.run import load_run, write_reports

CASE = {"model": "tiny", "variant": "sdpa", "workload": "prefill", "dtype": "float32", "device": "cpu",
        "batch": 1, "prompt_len": 16, "new_tokens": 0}


def records():
    ok = Record("tiny/sdpa/prefill", dict(CASE), "ok", metrics={"latency_ms_p50": 1.5, "tokens_per_s": 10666.7,
                                                                "latency_ms_ci_rel": math.inf},
                samples={"latency_ms": [1.4, 1.5, 1.6]}, env={"python": "3.11"})
    drift = Record("tiny/sdpa/drift", {**CASE, "workload": "drift"}, "ok",
                   metrics={"kl_mean": 1.2e-3, "top1_agree_pct": 98.5, "ppl_delta_pct": -0.25, "sqnr_db": math.inf})
    failed = Record("tiny/x|y/prefill", {**CASE, "variant": "x|y"}, "failed", reason="RuntimeError: boom\nat line 3")
    return [ok, drift, failed]


def test_csv_round_trips_through_pandas(tmp_path):
    write_csv(records(), tmp_path)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame["case_id"]) == [r.case_id for r in records()]
    assert frame.loc[0, "latency_ms_p50"] == 1.5 and frame.loc[1, "kl_mean"] == pytest.approx(1.2e-3)
    assert frame.loc[2, "status"] == "failed" and "boom" in frame.loc[2, "reason"]


def test_json_round_trips_and_is_strict(tmp_path):
    path = write_json(records(), tmp_path, {"python": "3.11"}, "[run]\n")
    data = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert data["schema"] == "infermatrix.results" and data["schema_version"] == 1 and data["matrix"] == "[run]\n"
    run = load_run(path)
    assert [r.case_id for r in run.records] == [r.case_id for r in records()]
    assert run.records[0].samples == {"latency_ms": [1.4, 1.5, 1.6]}
    assert run.records[1].metrics["sqnr_db"] is None  # non-finite -> null
    assert run.env == {"python": "3.11"}


def test_markdown_summary_is_a_table_with_problems_listed():
    md = render_markdown(records(), "run 42")
    assert md.startswith("### run 42\n\n3 cases: 2 ok, 0 skipped, 1 failed")
    assert "| tiny | sdpa | prefill | float32 | b1 p16 | 1.50 | n<6 | 10,666.7 |" in md
    assert "| 1.20e-03 | 98.5 | -0.25 |" in md
    assert "| failed | tiny/x\\|y/prefill | RuntimeError: boom at line 3 |" in md  # pipes escaped, one line



def test_markdown_summary_names_the_cpu_and_what_it_can_do():
    env = {"cpu": "AMD EPYC", "cpu_capability": "AVX2",
           "cpu_flags": {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx512_bf16": False}}
    rows = records()
    rows[0].env = env
    md = render_markdown(rows, "run 42")
    assert "CPU: AMD EPYC · torch dispatch AVX2 · has avx2 · lacks avx512f, avx512_vnni, avx512_bf16\n" in md


def test_report_writes_all_four_files(tmp_path):
    for r in records():
        append_record(tmp_path / "records.jsonl", r)
    written = write_reports(load_run(tmp_path), tmp_path)
    assert sorted(p.name for p in written) == ["report.html", "results.csv", "results.json", "summary.md"]
    assert all(p.stat().st_size > 0 for p in written)


def test_a_corrupt_line_is_reported_with_its_number_and_the_rest_loads(tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    for r in records():
        append_record(path, r)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[1], lines[2][:40]]) + "\n")
    run = load_run(tmp_path)
    assert [r.case_id for r in run.records] == ["tiny/sdpa/prefill", "tiny/sdpa/drift"]
    out = capsys.readouterr().out
    assert "records.jsonl:2: skipping" in out and "records.jsonl:4: skipping" in out


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is not a run folder: it has no records.jsonl"),
    (lambda p: None, "does not exist"),
    (lambda p: p.with_suffix(".json").write_text("{"), "is not valid JSON"),
    (lambda p: p.with_suffix(".json").write_text('{"a": 1}'), "neither infermatrix results nor pytest-benchmark"),
])
def test_bad_runs_are_clear_errors(tmp_path, make, message):
    target = tmp_path / "run"
    make(target)
    path = target.with_suffix(".json") if (target.with_suffix(".json")).exists() else target
    with pytest.raises(UserError, match=message):
        load_run(path)


def test_a_different_schema_version_is_refused(tmp_path):
    rec = records()[0]
    rec.schema_version = 99
    append_record(tmp_path / "records.jsonl", rec)
    with pytest.raises(UserError, match="schema version 99; this infermatrix reads version 1"):
        load_run(tmp_path)


def test_pytest_benchmark_json_becomes_records(tmp_path):
    data = {"machine_info": {"cpu": {"brand_raw": "x"}}, "commit_info": {}, "version": "5.1", "datetime": "now",
            "benchmarks": [
                {"name": "test_case[tiny/sdpa/prefill]", "fullname": "bench.py::test_case[tiny/sdpa/prefill]",
                 "extra_info": {"case": CASE, "case_id": "tiny/sdpa/prefill", "tokens_per_call": 16},
                 "stats": {"min": 0.001, "max": 0.003, "mean": 0.002, "stddev": 0.0005, "median": 0.002,
                           "iqr": 0.0004, "rounds": 3, "data": [0.001, 0.002, 0.003]}},
                {"name": "test_other", "fullname": "t.py::test_other", "extra_info": {},
                 "stats": {"min": 0.5, "max": 0.5, "mean": 0.5, "stddev": 0, "median": 0.5, "iqr": 0, "rounds": 1}},
            ]}
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(data))
    run = load_run(path)
    first, other = run.records
    assert first.case_id == "tiny/sdpa/prefill" and first.case == CASE
    assert first.metrics["latency_ms_p50"] == pytest.approx(2.0) and first.metrics["tokens_per_s"] == pytest.approx(8000)
    assert first.samples["latency_ms"] == pytest.approx([1.0, 2.0, 3.0])
    assert other.case_id == "t.py::test_other" and other.case["workload"] == "pytest" and other.samples == {}
