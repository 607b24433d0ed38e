"""`infermatrix run` twice, then `infermatrix gate`: a real A/A pair passes, an
artificially slowed variant fails, bad rules are exit 2, and the verdict reaches
$GITHUB_STEP_SUMMARY."""

import time

import pytest

from infermatrix.bench.matrix import load_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.cli import main
from infermatrix.variants import sdpa

MATRIX = """
[run]
isolate = false
min_runs = 8
max_runs = 30
max_time_s = 1.0

[[cases]]
model = "tiny"
variant = ["reference", "sdpa"]
workload = "prefill"
prompt_len = 32

[gate]
rules = ["latency_ms_p50:+300%"]
"""
# This 2-core VM shifts by tens of percent between runs of a 1 ms op (see
# `infermatrix calibrate`); the A/A bound is generous, the planted slowdown is 20x.
LOOSE = ["--fail", "latency_ms_p50:+300%"]


def run(path, monkeypatch=None, slow=False):
    """The matrix run into path/run; its matrix.toml (with [gate]) is kept there."""
    if slow:  # sdpa's attention sleeps 20 ms per call: far beyond any noise
        fast = sdpa.sdpa_attention
        monkeypatch.setattr(sdpa, "sdpa_attention", lambda *a, **k: (time.sleep(0.02), fast(*a, **k))[1])
    path.mkdir(parents=True, exist_ok=True)
    (path / "m.toml").write_text(MATRIX)
    run_matrix(load_matrix(path / "m.toml"), path / "run", log=lambda line: None)
    return str(path / "run")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return run(tmp_path_factory.mktemp("base"))


def test_an_aa_pair_passes_and_a_slowed_variant_fails(base, tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    same = run(tmp_path / "same")
    assert main(["gate", base, same, *LOOSE]) == 0
    assert "gate: PASS" in capsys.readouterr().out

    slowed = run(tmp_path / "slow", monkeypatch, slow=True)
    assert main(["gate", base, slowed, *LOOSE]) == 1
    out = capsys.readouterr().out
    assert "FAIL tiny/sdpa/prefill" in out and "FAIL tiny/reference" not in out
    verdicts = summary.read_text()  # both verdicts appended, as successive CI steps would
    assert "infermatrix gate: passed" in verdicts and "infermatrix gate: failed" in verdicts
    assert "tiny/sdpa/prefill" in verdicts


def test_the_runs_matrix_gate_rules_apply_when_none_are_given(base, tmp_path, capsys):
    assert main(["gate", base, run(tmp_path / "same")]) == 0
    assert "1 rules from the run's matrix [gate]" in capsys.readouterr().out


def test_a_vanished_case_fails_the_gate(base, tmp_path):
    import shutil

    new = tmp_path / "new"
    shutil.copytree(base, new)
    lines = (new / "records.jsonl").read_text().splitlines(keepends=True)
    (new / "records.jsonl").write_text("".join(lines[1:]))
    assert main(["gate", base, str(new), *LOOSE]) == 1


@pytest.mark.parametrize("rule, message", [
    ("tokens_per_s:+5%", "tokens_per_s:-5%"),
    ("latency_ms_p5O:+5%", "latency_ms_p5O"),
    ("nonsense", "rule"),
])
def test_bad_rules_are_exit_2(base, rule, message, capsys):
    assert main(["gate", base, base, "--fail", rule]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infermatrix: error:") and message in err and err.count("\n") == 1


def test_rules_file_and_calibrate(base, tmp_path, capsys):
    rules = tmp_path / "rules.txt"
    rules.write_text("# speed\nlatency_ms_p50:+300%\nkl_mean:<=0.05  # accuracy\n")
    assert main(["gate", base, base, "--rules", str(rules)]) == 0
    assert "2 rules from command line" in capsys.readouterr().out
    assert main(["gate", base, base, "--calibrate"]) == 0
    assert "suggested" in capsys.readouterr().out


def test_compare_and_report_commands(base, tmp_path, capsys):
    assert main(["compare", base, base, "--md", str(tmp_path / "c.md"), "--html", str(tmp_path / "c.html")]) == 0
    assert "~" in capsys.readouterr().out and "<table" in (tmp_path / "c.html").read_text()
    assert main(["report", base, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file() and (tmp_path / "rep" / "summary.md").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 2
