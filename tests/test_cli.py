"""The command line as a user meets it: help, list, run, and bad input."""

import shutil
from pathlib import Path
import subprocess
import sys

import pandas as pd
import pytest


REPO = Path(__file__).resolve().parents[1]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "infermatrix.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_console_script_is_installed():
    assert shutil.which("infermatrix") or (sys.prefix and shutil.which("infermatrix", path=f"{sys.prefix}/bin"))


@pytest.mark.parametrize(
    "args, expected",
    [(["--help"], ["run", "list", "exits with status 2"]),
     (["run", "--help"], ["--out DIR", "built-in matrix name", "failed record"]),
     (["list", "--help"], ["--axis", "unavailable"])],
)
def test_help(args, expected):
    out = cli(*args)
    assert out.returncode == 0
    assert all(text in out.stdout for text in expected), out.stdout


def test_list_shows_variants_and_models_with_availability():
    out = cli("list")
    assert out.returncode == 0
    assert "sdpa" in out.stdout and "axis=attention" in out.stdout
    assert "smollm2-135m" in out.stdout and "llama-7b" in out.stdout


def test_run_writes_a_run_folder_and_prints_a_table(tmp_path):
    out = cli("run", str(REPO / "benchmarks" / "ci.toml"), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    frame = pd.read_csv(tmp_path / "run" / "results.csv")
    assert len(frame) == 16 and set(frame["status"]) == {"ok"}
    assert "tok/s" in out.stdout and "ms_p50" in out.stdout and "reference" in out.stdout


@pytest.mark.parametrize(
    "matrix, message",
    [
        ('[[cases]]\nmodel = "llama-9000"\nvariant = "sdpa"\n', "unknown model 'llama-9000'"),
        ('[[cases]]\nmodel = "tiny"\nvariant = "warp_drive"\n', "unknown variant 'warp_drive'"),
        ('[[cases]]\nmodel = "tiny"\nvariant = "sdpa+reference"\n', "same axis 'attention'"),
        ('[[cases]]\nmodel = "BADDIR"\nvariant = "sdpa"\n', "lacks config.json"),
        ('[[cases]]\nmodel = "tiny"\nvariant = "sdpa"\nworkload = "encode"\n', "tiny is a decoder: the encode"),
        ('[[cases]]\nmodel = "tiny-encoder"\nvariant = "kv_cache+sdpa"\nworkload = "encode"\n',
         "kv_cache does not run on an encoder model"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, matrix, message):
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "m.toml"
    path.write_text(matrix.replace("BADDIR", str(tmp_path / "ckpt")))
    out = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and message in out.stderr


def test_unknown_axis_is_refused():
    out = cli("list", "--axis", "sideways")
    assert out.returncode == 2 and "unknown axis 'sideways'; valid: fusion, linear, attention, cache, decoding, graph, peer" in out.stderr


def test_env_prints_environment_and_peaks():
    import json

    out = cli("env", "--dtypes", "float32")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["env"]["versions"]["torch"] and data["env"]["torch_threads"] >= 1
    assert data["peaks"]["bandwidth_gbs"] > 0 and data["peaks"]["gemm_tflops"]["float32"] > 0


def test_resume_continues_a_run_folder(tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text('[run]\nmin_runs = 2\nmax_time_s = 0.2\nisolate = false\n\n'
                      '[[cases]]\nmodel = "tiny"\nvariant = "sdpa"\nprompt_len = [8, 16]\n')
    first = cli("run", str(matrix), "--out", str(tmp_path / "run"))
    assert first.returncode == 0, first.stderr
    matrix.write_text(matrix.read_text().replace("[8, 16]", "[8, 16, 24]"))
    again = cli("run", str(matrix), "--out", str(tmp_path / "run"), "--resume")
    assert again.returncode == 0, again.stderr
    assert "resuming: 2 cases already recorded, 1 to run" in again.stdout
    assert len(pd.read_csv(tmp_path / "run" / "results.csv")) == 3
    refused = cli("run", str(matrix), "--out", str(tmp_path / "run"))
    assert refused.returncode == 2 and "pass --resume" in refused.stderr


def test_bad_eval_text_is_one_line_and_exit_code_2(tmp_path):
    out = cli("run", "ci", "--out", str(tmp_path / "run"), "--eval-text", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "eval text" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["--device", "tpu"], "--device 'tpu' is not valid"),
])
def test_env_bad_input_is_one_line_and_exit_code_2(args, message):
    out = cli("env", *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


# report, compare and gate on runs holding no readable record: exit 2 with the reason,
# never an empty success ("(no cases)", a gate that passes having checked nothing).
def _good_record_line():
    from infermatrix.reports.record import Record

    case = {"model": "tiny", "variant": "sdpa", "workload": "prefill", "dtype": "float32", "device": "cpu",
            "batch": 1, "prompt_len": 16, "new_tokens": 0}
    return Record("tiny/sdpa/prefill", case, "ok", metrics={"latency_ms_p50": 1.5},
                  samples={"latency_ms": [1.4, 1.5, 1.6]}).to_json() + "\n"


def _run_folder(path, text):
    path.mkdir()
    (path / "records.jsonl").write_text(text)
    return str(path)


@pytest.mark.parametrize("command", [["report"], ["compare", "GOOD"], ["gate", "GOOD"], ["gate", "GOOD", "--calibrate"],
                                     ["merge", "GOOD", "--force", "--out", "MERGED"]])
def test_a_run_whose_every_line_is_corrupt_is_exit_2_naming_the_file(tmp_path, capsys, command):
    from infermatrix.cli import main

    good = _run_folder(tmp_path / "good", _good_record_line())
    bad = _run_folder(tmp_path / "bad", '{"case_id": "x"\nnot json\n[1, 2]\n')
    args = [a.replace("GOOD", good).replace("MERGED", str(tmp_path / "merged")) for a in command]
    assert main([args[0], bad, *args[1:]]) == 2  # the empty run as BASE ...
    err = capsys.readouterr().err
    assert err.startswith(f"infermatrix: error: {tmp_path / 'bad' / 'records.jsonl'}: none of its 3 lines is a "
                          "readable record (line 1: ") and err.count("\n") == 1, err
    if len(args) > 1 and args[0] != "merge":
        assert main([args[0], good, bad, *args[2:]]) == 2  # ... and as NEW
        assert "none of its 3 lines is a readable record" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "results.csv").exists() and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("command", [["report"], ["compare", "GOOD"], ["gate", "GOOD"]])
def test_a_run_with_no_records_is_exit_2_for_report_compare_and_gate(tmp_path, capsys, command):
    from infermatrix.cli import main

    good = _run_folder(tmp_path / "good", _good_record_line())
    empty = _run_folder(tmp_path / "empty", "")
    args = [a.replace("GOOD", good) for a in command]
    assert main([args[0], empty, *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err == (f"infermatrix: error: {empty} holds no records (its records.jsonl is empty); nothing to "
                   f"{args[0]}: pass a run that recorded at least one case\n")
    assert not (tmp_path / "empty" / "results.csv").exists()


def test_one_corrupt_line_among_good_ones_stays_a_warning(tmp_path, capsys):
    from infermatrix.cli import main

    run = _run_folder(tmp_path / "run", _good_record_line() + "not json\n")
    assert main(["report", run]) == 0
    assert "records.jsonl:2: skipping a record that does not parse" in capsys.readouterr().out


def test_ctrl_c_keeps_the_records_says_how_to_resume_in_one_line_and_resume_finishes(tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, the case
    process forked from the forkserver included."""
    import os
    import signal
    import time

    from infermatrix.reports.record import read_records

    matrix, out = tmp_path / "m.toml", tmp_path / "run"
    matrix.write_text('[run]\nmin_runs = 3\nmax_time_s = 0.4\ntarget_ci = 0.0001\n\n'  # each case ~0.4 s
                      '[[cases]]\nmodel = "tiny"\nvariant = ["reference", "sdpa"]\nworkload = "prefill"\n'
                      'prompt_len = [8, 16]\n')
    run = [sys.executable, "-m", "infermatrix.cli", "run", str(matrix), "--out", str(out), "--timeout", "60"]
    proc = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    records = out / "records.jsonl"
    deadline = time.monotonic() + 60
    while not (records.is_file() and records.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = records.read_text()
    time.sleep(0.3)  # the next case's process is at work
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=60)[0]

    assert proc.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    recorded = len(read_records(out))
    assert 1 <= recorded < 4 and records.read_text().startswith(first)
    assert output.splitlines()[-1] == (f"infermatrix: interrupted: {recorded} of 4 cases recorded in {out}; "
                                       f"continue with: infermatrix run {matrix} --out {out} --timeout 60 --resume")
    again = cli(*run[3:], "--resume")
    assert again.returncode == 0, again.stderr
    assert f"resuming: {recorded} cases already recorded, {4 - recorded} to run" in again.stdout
    assert len(read_records(out)) == 4 and records.read_text().startswith(first)


def test_the_resume_command_keeps_every_option_that_decides_what_runs():
    from infermatrix.cli import _resume_command, build_parser

    args = build_parser().parse_args(["run", "ci", "--shard", "2/4", "--no-isolate", "--eval-text", "my text.txt",
                                      "--max-time", "2.5", "-q"])
    assert _resume_command(args, Path("results/20250101-000000")) == (
        "infermatrix run ci --out results/20250101-000000 --eval-text 'my text.txt' --max-time 2.5 --shard 2/4 "
        "--no-isolate -q --resume")
