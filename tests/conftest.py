import os
import sys
from pathlib import Path

import pytest
import torch

from infermatrix.weights import load_model

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(Path(__file__).parent))  # shared test helpers (hf_twins), with --import-mode=importlib

# Without a GPU, Triton kernels run through Triton's CPU interpreter (numpy), which
# must be chosen before any kernel module is imported. On a CUDA machine the same
# tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Install tests/plugins as a package with `infermatrix.variants` entry points,
    for this process and (through PYTHONPATH) for every case process it starts."""
    dist = PLUGINS / "infermatrix_test_plugins-0.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: infermatrix-test-plugins\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[infermatrix.variants]\nfault = fault_variants:Fault\n")
    sys.path.insert(0, str(PLUGINS))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M in fp32, loaded once for the whole session (real weights)."""
    return load_model("smollm2-135m", torch.float32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
