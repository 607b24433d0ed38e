import pytest
import torch

from infermatrix.weights import load_model


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M in fp32, loaded once for the whole session (real weights)."""
    return load_model("smollm2-135m", torch.float32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
