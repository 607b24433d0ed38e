"""The Triton block-sparse kernel against masked dense attention.

Without a GPU it runs through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported), so shapes stay small:
seq 256, blocks of 32 or 64, 2 heads. The interpreter has no bfloat16.
Tolerances: infermatrix.tolerances.ATTENTION, as for the dense kernels.
"""

import pytest
import torch

from infermatrix.kernels import block_sparse_layout as L
from infermatrix.kernels.attention_triton import interpreting
from infermatrix.kernels.block_sparse_triton import block_sparse_attention_triton
from infermatrix.model import math_attention
from infermatrix.tolerances import ATTENTION, close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([] if interpreting() else [torch.bfloat16])

LAYOUTS = {
    "causal": lambda t, b: L.causal(t, b),
    "sliding-bidirectional": lambda t, b: L.sliding_window(t, b, 2 * b, causal=False),
    "strided": lambda t, b: L.strided(t, b, 2 * b),
    "bigbird": lambda t, b: L.bigbird(t, b, b, n_global=1, n_random=1, seed=2),
    "longformer": lambda t, b: L.longformer(t, b, b, global_tokens=[t - 1]),
    "token-window": lambda t, b: L.token_window(t, b, b + 5),  # a model's own window, not whole blocks
}


def masked_dense(q, k, v, layout):
    mask = layout.dense_mask().to(q.device)[None]
    return math_attention(q.float(), k.float(), v.float(), causal=False, mask=mask)


def qkv(heads, kv_heads, seq, dim, dtype):
    return tuple(torch.randn(1, h, seq, dim, device=DEVICE).to(dtype) for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_masked_dense_attention(name, dtype):
    layout = LAYOUTS[name](256, 64)
    q, k, v = qkv(2, 2, 256, 64, dtype)
    out = block_sparse_attention_triton(q, k, v, layout)
    torch.testing.assert_close(out.float(), masked_dense(q, k, v, layout), **close(ATTENTION, dtype))


def test_grouped_heads_short_last_block_and_per_head_layouts():
    q, k, v = qkv(4, 2, 200, 32, torch.float32)  # 200 = 6 blocks of 32 and one of 8
    shared = L.sliding_window(200, 32, 64)
    torch.testing.assert_close(block_sparse_attention_triton(q, k, v, shared), masked_dense(q, k, v, shared),
                               **close(ATTENTION, torch.float32))
    per_head = L.from_block_fn(200, 32, lambda h, i, j: (i - j <= h) & (j <= i), causal=True, heads=4)
    torch.testing.assert_close(block_sparse_attention_triton(q, k, v, per_head), masked_dense(q, k, v, per_head),
                               **close(ATTENTION, torch.float32))


def test_refuses_bad_block_sizes_and_lengths():
    q, k, v = qkv(2, 2, 240, 32, torch.float32)
    with pytest.raises(ValueError, match="block_size=48: the Triton kernel takes a power of two"):
        block_sparse_attention_triton(q, k, v, L.causal(240, 48))
    with pytest.raises(ValueError, match="seq_len=256 does not match"):
        block_sparse_attention_triton(q, k, v, L.causal(256, 32))
