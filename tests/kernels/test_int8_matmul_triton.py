"""The weight-only int8 Triton kernel against the fp32 dequantize-then-matmul oracle.
Without a GPU it runs under the interpreter (TRITON_INTERPRET=1, set before the kernel
module is imported; tests/conftest.py does the same), which has no bf16: fp32 and fp16
at small shapes there, bf16 too on a CUDA machine, where the compiled kernel runs."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton's JIT

import pytest  # noqa: E402

from infermatrix.kernels.int8_matmul_triton import (  # noqa: E402
    int8_weight_only_matmul,
    reference_int8_matmul,
)
from infermatrix.tolerances import INT8_MATMUL, close  # noqa: E402  (tolerances: why each value, there)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])


def operands(m, k, n, dtype, bias=False):
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    scale = (torch.rand(n, generator=gen) * 0.02 + 0.001).to(DEVICE)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, q, scale, b




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (5, 100, 70), (33, 96, 130)])  # ragged: every mask in play
def test_kernel_matches_the_dequantize_then_matmul_oracle(m, k, n, dtype):
    x, q, scale, _ = operands(m, k, n, dtype)
    got = int8_weight_only_matmul(x, q, scale)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got.float(), reference_int8_matmul(x.float(), q, scale).to(dtype).float(),
                               **close(INT8_MATMUL, dtype))


def test_bias_and_leading_dimensions():
    x, q, scale, b = operands(6, 64, 32, torch.float32, bias=True)
    got = int8_weight_only_matmul(x.view(2, 3, 64), q, scale, b)
    assert got.shape == (2, 3, 32)
    torch.testing.assert_close(got.view(6, 32), reference_int8_matmul(x, q, scale, b), **close(INT8_MATMUL, torch.float32))


def test_bad_operands_are_refused_with_the_field_and_fix():
    x, q, scale, _ = operands(2, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="x has 48 features but the weight has K = 64"):
        int8_weight_only_matmul(x[:, :48], q, scale)
    with pytest.raises(ValueError, match="x has dtype torch.float64.*cast the model"):
        int8_weight_only_matmul(x.double(), q, scale)
    with pytest.raises(ValueError, match="q must be a 2-D int8 weight"):
        int8_weight_only_matmul(x, q.float(), scale)
    with pytest.raises(ValueError, match="scale has shape \\(31,\\); expected \\(32,\\)"):
        int8_weight_only_matmul(x, q, scale[:31])
