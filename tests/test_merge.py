"""Shards of one matrix, run apart and merged, read like one run; bad merges are refused."""

import json

import pytest

from infermatrix.bench.matrix import load_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.bench.shard import shard_matrix
from infermatrix.cli import main
from infermatrix.reports.compare import compare_runs
from infermatrix.reports.record import matrix_sha256, read_records
from infermatrix.reports.run import load_run

MATRIX = """\
[run]
warmup = 1
min_runs = 3
max_runs = 10
max_time_s = 0.2
isolate = false

[[cases]]
model = "tiny"
variant = ["reference", "sdpa"]
workload = ["attention", "prefill"]
prompt_len = [16, 32]

[[cases]]
model = "tiny"
variant = "reference"
workload = "linear"
batch = [1, 2]
prompt_len = 8
"""


def quiet(line):
    pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The matrix run whole, and as three shards (each writes its own run folder)."""
    root = tmp_path_factory.mktemp("merge")
    (root / "m.toml").write_text(MATRIX)
    matrix = load_matrix(root / "m.toml")
    run_matrix(matrix, root / "whole", log=quiet)
    for k in (1, 2, 3):
        run_matrix(shard_matrix(matrix, k, 3), root / f"shard{k}", log=quiet)
    return root


def case_ids(folder):
    return sorted(r.case_id for r in read_records(folder))


def test_merged_shards_equal_a_single_run_and_report_compare_gate_work(shards, tmp_path, capsys):
    sources = [str(shards / f"shard{k}") for k in (1, 2, 3)]
    assert all(case_ids(s) for s in sources)  # every shard ran some of the cases
    out = tmp_path / "merged"
    assert main(["merge", *sources, "--out", str(out)]) == 0
    assert f"merged 10 cases from 3 runs -> {out}" in capsys.readouterr().out
    assert case_ids(out) == case_ids(shards / "whole") and len(case_ids(out)) == 10
    assert (out / "matrix.toml").read_text() == MATRIX and (out / "report.html").is_file()
    shard_of = {r.case_id: r.env["shard"]["index"] for r in read_records(out)}  # each record's env kept
    assert sorted(set(shard_of.values())) == [1, 2, 3]
    for k in (1, 2, 3):
        assert {cid for cid, i in shard_of.items() if i == k} == set(case_ids(shards / f"shard{k}"))

    comparison = compare_runs(load_run(shards / "whole").records, load_run(out).records)
    assert comparison.matched == 10 and not comparison.only_base and not comparison.only_new
    assert main(["report", str(out)]) == 0
    assert main(["gate", str(shards / "whole"), str(out), "--fail", "latency_ms_p50:+100000%"]) == 0
    assert "gate: PASS" in capsys.readouterr().out


def test_duplicates_and_conflicts_are_reported(shards, tmp_path, capsys):
    # shard 1 given twice: identical records, kept once
    assert main(["merge", *(str(shards / f"shard{k}") for k in (1, 1, 2, 3)), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    n1 = len(case_ids(shards / "shard1"))
    assert f"{n1} duplicate records (identical, kept once)" in out and case_ids(tmp_path / "a") == case_ids(
        shards / "whole")

    # a re-run of one case that failed the first time: the ok record wins, and it is said
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    (rerun / "matrix.toml").write_text(MATRIX)
    record = json.loads((shards / "shard2" / "records.jsonl").read_text().splitlines()[0])
    failed = {**record, "status": "failed", "reason": "RuntimeError: flaky", "metrics": {}, "samples": {}}
    (rerun / "records.jsonl").write_text(json.dumps(failed) + "\n")
    assert main(["merge", str(rerun), *(str(shards / f"shard{k}") for k in (1, 2, 3)),
                 "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"conflict: {record['case_id']}: kept ok from {shards / 'shard2'} over failed from {rerun}" in out
    merged = {r.case_id: r for r in read_records(tmp_path / "b")}
    assert merged[record["case_id"]].status == "ok" and len(merged) == 10


def test_a_missing_shard_is_reported(shards, tmp_path, capsys):
    assert main(["merge", str(shards / "shard1"), str(shards / "shard3"), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    n = len(case_ids(shards / "shard1")) + len(case_ids(shards / "shard3"))
    assert f"warning: {n} of the matrix's 10 cases are recorded; no records from shard 2/3" in out


def test_runs_of_different_matrix_files_need_force(shards, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    other_text = MATRIX.replace("max_time_s = 0.2", "max_time_s = 0.3")
    (other / "matrix.toml").write_text(other_text)
    (other / "records.jsonl").write_text(restamped(shards / "shard2", matrix_sha256(other_text)))
    args = ["merge", str(shards / "shard1"), str(other), "--out", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot merge: {other} ran a different matrix file than {shards / 'shard1'} (matrix.toml sha256" in err
    assert "pass --force to merge them anyway" in err
    assert not (tmp_path / "m").exists()

    assert main([*args, "--force"]) == 0
    assert "warning: forced:" in capsys.readouterr().out
    assert (tmp_path / "m" / "matrix.toml").read_text() == MATRIX  # the first run's matrix


def restamped(run, sha):
    """A run's records as if made from the matrix file whose hash is `sha`."""
    lines = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    return "".join(json.dumps({**r, "env": {**r["env"], "matrix_sha256": sha}}) + "\n" for r in lines)


def test_a_run_holding_records_of_two_matrix_versions_needs_force(shards, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "matrix.toml").write_text(MATRIX)
    (mixed / "records.jsonl").write_text((shards / "shard2" / "records.jsonl").read_text()
                                         + restamped(shards / "shard3", "0" * 64))
    assert main(["merge", str(shards / "shard1"), str(mixed), "--out", str(tmp_path / "m")]) == 2
    assert "records from several versions of the file" in capsys.readouterr().err


def test_a_records_file_without_a_matrix_needs_force(shards, tmp_path, capsys):
    bare = tmp_path / "old.jsonl"  # records written before runs stamped their matrix
    lines = [json.loads(line) for line in (shards / "shard2" / "records.jsonl").read_text().splitlines()]
    bare.write_text("".join(json.dumps({**r, "env": {}}) + "\n" for r in lines))
    assert main(["merge", str(shards / "shard1"), str(bare), "--out", str(tmp_path / "m")]) == 2
    assert "does not say which one matrix it ran" in capsys.readouterr().err
    # its own records' matrix_sha256 is enough, without the folder's matrix.toml
    stamped = tmp_path / "stamped.jsonl"
    stamped.write_text((shards / "shard2" / "records.jsonl").read_text())
    assert main(["merge", str(shards / "shard1"), str(stamped), "--out", str(tmp_path / "n")]) == 0


def test_merge_does_not_overwrite_a_run(shards, capsys):
    assert main(["merge", str(shards / "shard1"), "--out", str(shards / "shard1")]) == 2
    assert "is one of the runs to merge" in capsys.readouterr().err
    assert main(["merge", str(shards / "shard1"), "--out", str(shards / "shard2")]) == 2
    assert "already holds records.jsonl; choose a new folder" in capsys.readouterr().err


def test_shards_timed_under_different_settings_are_reported(shards, tmp_path, capsys):
    matrix = load_matrix(shards / "m.toml", {"max_time_s": 0.1})
    run_matrix(shard_matrix(matrix, 2, 3), tmp_path / "fast", log=quiet)
    assert main(["merge", str(shards / "shard1"), str(tmp_path / "fast"), "--out", str(tmp_path / "m")]) == 0
    assert (f"warning: {tmp_path / 'fast'} ran with different [run] settings than {shards / 'shard1'}: "
            "max_time_s 0.1 vs 0.2") in capsys.readouterr().out


def test_a_shard_with_no_cases_merges_but_is_not_reported_on_alone(shards, tmp_path, capsys):
    """An empty records.jsonl is a legitimate run of a shard with no cases: merge takes
    it; report, compare and gate refuse it (exit 2) rather than succeed on nothing."""
    empty = tmp_path / "empty"
    matrix = load_matrix(shards / "m.toml")
    assert run_matrix(shard_matrix(matrix, 12, 12), empty, log=quiet) == []  # 10 cases: shards 11, 12 get none
    merged = tmp_path / "merged"
    assert main(["merge", str(shards / "whole"), str(empty), "--out", str(merged)]) == 0
    assert case_ids(merged) == case_ids(shards / "whole")
    capsys.readouterr()
    assert main(["report", str(empty)]) == 2
    assert f"{empty} holds no records (its records.jsonl is empty); nothing to report" in capsys.readouterr().err
