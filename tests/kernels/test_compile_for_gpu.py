"""Every Triton kernel compiles for an H100/H200 (sm_90) here, without a GPU.

The interpreter tests check what the kernels compute; this checks what only the
compiler sees: code it refuses, and tiles needing more shared memory than the
GPU has (a D=256 prefill tile once failed on an H200 with "out of resource:
shared memory"). One representative launch configuration of each kernel; the
script compiles them all (python scripts/compile_kernels.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPRESENTATIVES = "|".join([
    r"prefill fp16 D128 bounds=1 M128 N64 w4 s3",  # the untuned default tile
    r"prefill fp16 D256 bounds=2 M128 N64",  # the biggest tile the pruner keeps at head dim 256
    r"decode split bf16 N64 w4 s2 fused=True",  # the default decode config
    r"decode combine fp16",
    r"block-sparse bf16 block 256",  # the biggest block-sparse tile
    r"int8 matmul bf16 M=1$",
    r"paged decode bf16 D128 block 16 G4 split=True fused=True",  # the default split and merge, 4 blocks a tile
])


@pytest.mark.slow
def test_representative_kernels_compile_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "scripts/compile_kernels.py", "--only", REPRESENTATIVES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = [line for line in done.stdout.splitlines()[2:] if line.strip()]
    assert len(compiled) == 7, done.stdout  # one line per representative
