"""`infermatrix history add/show/check/report` on run folders: one real run (its env
carries the git SHA and host), and written run folders of a known trend across
commits; bad input is exit 2 with one line naming the file or option and the fix."""

import sqlite3

import pytest

from infermatrix.bench.matrix import load_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.cli import main
from infermatrix.reports.record import Record, append_record

CASE = "tiny/reference/prefill/float32/cpu/b1-p16"


def write_run(folder, sha, day, latency, host="ci", cases=(CASE,)):
    """A run folder of one commit: each case at `latency` ms."""
    folder.mkdir(parents=True)
    for case_id in cases:
        append_record(folder / "records.jsonl", Record(
            case_id=case_id, case={"model": "tiny", "variant": "reference", "workload": "prefill"}, status="ok",
            metrics={"latency_ms_p50": latency, "tokens_per_s": 16000 / latency, "flops": 1e6},
            env={"git_sha": sha, "host": host}, started_at=f"2026-01-{day:02d}T03:00:00+00:00"))
    return str(folder)


@pytest.fixture
def trend(tmp_path):
    """Twelve nightly runs, one commit each; from the 9th on the case is 20% slower."""
    return [write_run(tmp_path / f"n{i}", f"{i:02d}" + "f" * 38, i + 1, 10.0 * (1.2 if i >= 8 else 1) + 0.01 * (i % 3))
            for i in range(12)]


def count_rows(db):
    with sqlite3.connect(db) as conn:
        n = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    conn.close()
    return n


def test_add_show_check_report(trend, tmp_path, capsys):
    db = str(tmp_path / "h.sqlite")
    assert main(["history", "add", *trend, "--db", db]) == 0
    assert count_rows(db) == 12

    assert main(["history", "show", "--db", db]) == 0
    out = capsys.readouterr().out
    assert CASE in out and "08fffff" in out and "+20.1%" in out and "<- new level" in out

    assert main(["history", "check", "--db", db]) == 1
    out = capsys.readouterr().out
    assert f"REGRESSION  {CASE} @ ci: latency_ms_p50" in out and "after 07fffff" in out
    assert "at 08fffff:" in out and "history check: FAIL: 1 of 1 series" in out
    assert main(["history", "check", "--db", db, "--threshold", "25%"]) == 0
    assert "history check: PASS" in capsys.readouterr().out
    assert main(["history", "check", "--db", db, "--metric", "tokens_per_s"]) == 1  # fewer tokens/s: worse

    page = tmp_path / "history.html"
    assert main(["history", "report", "--db", db, "--html", str(page)]) == 0
    text = page.read_text()
    assert text.count('<svg class="chart"') == 1 and 'data-kind="regression"' in text and ">08fffff<" in text


def test_adding_the_same_runs_again_adds_nothing(trend, tmp_path, capsys):
    db = str(tmp_path / "h.sqlite")
    assert main(["history", "add", *trend[:3], "--db", db]) == 0
    assert main(["history", "add", *trend[:3], trend[3], "--db", db]) == 0
    out = capsys.readouterr().out
    assert f"{trend[0]}: 0 records added, 1 already stored" in out and f"{trend[3]}: 1 records added" in out
    assert count_rows(db) == 4


def test_a_run_without_a_git_sha_is_stored_with_a_warning(tmp_path, capsys):
    db = str(tmp_path / "h.sqlite")
    run = write_run(tmp_path / "nosha", None, 5, 10.0)
    assert main(["history", "add", run, "--db", db]) == 0
    assert "warning: " in (out := capsys.readouterr().out) and "1 records have no git SHA; stored by their date" in out
    assert main(["history", "show", "--db", db]) == 0
    assert "2026-01-05 03:00" in capsys.readouterr().out


def test_the_default_database_is_project_local(trend, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["history", "add", trend[0]]) == 0
    assert (tmp_path / ".infermatrix" / "history.sqlite").is_file()
    assert main(["history", "show"]) == 0


def test_bad_input_is_exit_2_naming_the_fix(trend, tmp_path, capsys):
    db = tmp_path / "h.sqlite"
    assert main(["history", "show", "--db", str(db)]) == 2
    assert f"{db} does not exist; start the history with `infermatrix history add RUN" in capsys.readouterr().err
    assert main(["history", "add", *trend, "--db", str(db)]) == 0
    for args, message in ((["check", "--threshold", "lots"], "--threshold 'lots' is not a positive percentage"),
                          (["show", "--metric", "nope"], "--metric nope: no stored ok record has a number for it"),
                          (["check", "--metric", "flops"], "--metric flops has no better direction"),
                          (["show", "--case", "gpu*"], "--case 'gpu*' matches none of the 1 stored cases"),
                          (["add", str(tmp_path / "missing")], "does not exist")):
        assert main(["history", *args, "--db", str(db)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    conn.close()
    assert main(["history", "add", trend[0], "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert f"{db} is a history database of schema version 0" in err and "pass --db with a new file" in err


def test_a_real_run_is_keyed_by_its_commit_and_host(tmp_path, capsys):
    (tmp_path / "m.toml").write_text('[run]\nisolate = false\nmin_runs = 3\nmax_runs = 5\nmax_time_s = 0.5\n\n'
                                     '[[cases]]\nmodel = "tiny"\nvariant = "reference"\nworkload = "prefill"\n'
                                     'prompt_len = 16\n')
    records = run_matrix(load_matrix(tmp_path / "m.toml"), tmp_path / "run", log=lambda line: None)
    db = str(tmp_path / "h.sqlite")
    for _ in range(2):
        assert main(["history", "add", str(tmp_path / "run"), "--db", db]) == 0
    assert count_rows(db) == 1
    with sqlite3.connect(db) as conn:
        sha, host = conn.execute("SELECT git_sha, host FROM records").fetchone()
    conn.close()
    assert (sha, host) == (records[0].env["git_sha"] or "", records[0].env["host"])
    assert len(sha) == 40  # the tests run from a git checkout


def test_host_names_one_machine_whose_runs_report_other_hosts(tmp_path, capsys):
    runs = [write_run(tmp_path / f"r{i}", f"{i:02d}" + "e" * 38, i + 1, 10.0, host=f"runner-{i}") for i in range(4)]
    db = str(tmp_path / "h.sqlite")
    assert main(["history", "add", *runs[:2], "--db", db]) == 0
    assert main(["history", "add", *runs[2:], "--db", db, "--host", "gha"]) == 0
    assert main(["history", "show", "--db", db]) == 0
    out = capsys.readouterr().out
    assert f"{CASE} @ gha  (latency_ms_p50, 2 commits)" in out
    assert f"{CASE} @ runner-0  (latency_ms_p50, 1 commit)" in out


def test_an_undated_record_in_any_run_refuses_the_whole_add(tmp_path, capsys):
    good = write_run(tmp_path / "good", "a" * 40, 1, 10.0)
    bad = tmp_path / "bad"
    bad.mkdir()
    append_record(bad / "records.jsonl", Record(case_id=CASE, case={"workload": "prefill"}, status="ok",
                                                metrics={"latency_ms_p50": 10.0}, env={"git_sha": "b" * 40}))
    db = tmp_path / "h.sqlite"
    assert main(["history", "add", good, str(bad), "--db", str(db)]) == 2
    assert "has no started_at" in capsys.readouterr().err
    assert not db.exists() or count_rows(str(db)) == 0  # the good run was not stored alone
