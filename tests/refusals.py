"""A matrix refused when it is read: `infermatrix run` exits 2 with one line, no traceback."""

import subprocess
import sys


def refusal(tmp_path, matrix_text: str) -> str:
    """Run a matrix file of `matrix_text`; assert the one-line refusal; return its text."""
    path = tmp_path / "m.toml"
    path.write_text(matrix_text)
    out = subprocess.run([sys.executable, "-m", "infermatrix.cli", "run", str(path), "--out", str(tmp_path / "run")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    return out.stderr
