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
    assert "tokens_per_s" in out.stdout and "reference" in out.stdout


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
