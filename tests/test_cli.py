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
    assert out.returncode == 2 and "unknown axis 'sideways'; valid: linear, attention, cache, graph" in out.stderr


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
