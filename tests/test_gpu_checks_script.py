"""scripts/gpu_checks.sh without a GPU: its Python and nvidia-smi are replaced by fakes
(the script takes its interpreter from $PYTHON), so its step runner is exercised for real:
a failing step is named and fails the script, and the later steps still run."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A stand-in for python: fails (exit 3) when its arguments contain $FAIL_ON, else succeeds.
FAKE_PYTHON = """#!/bin/sh
echo "fake python $*"
case "$*" in *"$FAIL_ON"*) echo "mismatch: max abs error 0.5"; exit 3;; esac
exit 0
"""


def gpu_checks(tmp_path, *args, fail_on="no step matches this"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("python", FAKE_PYTHON), ("nvidia-smi", "#!/bin/sh\necho 'name, FAKE GPU'\n")):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": str(bin_dir / "python"),
           "OUT": str(tmp_path / "out"), "FAIL_ON": fail_on}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_checks.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_all_steps_passing_exit_0(tmp_path):
    result = gpu_checks(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout and "all 4 steps passed" in result.stdout
    log = (tmp_path / "out" / "log.txt").read_text()
    # the four things a GPU machine checks: the kernels' CUDA tests, the serving and speculative
    # decoding CUDA tests, the sweep tool, the GPU matrix
    assert "fake python -m pytest -q -p no:cacheprovider -m not slow tests/kernels" in log
    assert "fake python -m pytest -q -p no:cacheprovider -m not slow -k cuda tests/test_serving.py" in log
    assert "fake python scripts/gpu_decode_sweep.py --out" in log
    assert f"fake python -m infermatrix.cli run gpu --out {tmp_path / 'out' / 'gpu'}" in log


def test_a_failed_test_step_fails_the_script_by_name_and_the_rest_still_run(tmp_path):
    result = gpu_checks(tmp_path, fail_on="tests/kernels")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "FAILED: kernel CUDA tests (untuned tiles) (exit 3)" in lines
    assert any(line.startswith("=== harness: gpu matrix (limit") for line in lines)  # the rest still ran
    assert lines[-1] == "gpu_checks: 1 of 4 steps FAILED: kernel CUDA tests (untuned tiles)"
    assert "=== kernel CUDA tests (untuned tiles) exit 3" in (tmp_path / "out" / "log.txt").read_text()


def test_a_stale_run_folder_of_the_script_is_replaced(tmp_path):
    """`infermatrix run` refuses a folder holding records: the script clears its own."""
    stale = tmp_path / "out" / "gpu"
    stale.mkdir(parents=True)
    (stale / "records.jsonl").write_text("{}\n")
    assert gpu_checks(tmp_path).returncode == 0
    assert not stale.exists()  # the fake python writes nothing there


@pytest.mark.parametrize("fail_on, step", [("test_decode_attention_triton.py", "decode kernel CUDA tests"),
                                           ("--candidates", "decode candidates"),
                                           ("run gpu-quick", "harness: gpu-quick matrix")])
def test_candidates_mode_fails_on_a_failed_step(tmp_path, fail_on, step):
    result = gpu_checks(tmp_path, "candidates", fail_on=fail_on)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"FAILED: {step} (exit 3)" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == f"gpu_checks: 1 of 3 steps FAILED: {step}"
