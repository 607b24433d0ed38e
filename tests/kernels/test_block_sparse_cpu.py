"""The CPU block-sparse kernel against masked dense attention (the reference's
math with the layout's element mask) in fp32: every pattern, grouped-query heads,
a short last block, per-head layouts, half precision; and its refusals.

Tolerances: infermatrix.tolerances (fp32: the same dot products, softmax over the same
keys, summed in a different order; half precision: computed in fp32, rounded once)."""

import pytest
import torch

from infermatrix.kernels import block_sparse_cpu
from infermatrix.kernels import block_sparse_layout as L
from infermatrix.kernels.block_sparse_cpu import block_sparse_attention
from infermatrix.model import math_attention
from infermatrix.tolerances import ATTENTION, ROUNDED_ONCE, close

FP32 = close(ATTENTION, torch.float32)

LAYOUTS = {
    "causal": lambda t, b: L.causal(t, b),
    "sliding": lambda t, b: L.sliding_window(t, b, 2 * b),
    "sliding-bidirectional": lambda t, b: L.sliding_window(t, b, 2 * b, causal=False),
    "strided": lambda t, b: L.strided(t, b, 2 * b),
    "fixed": lambda t, b: L.fixed(t, b, 4 * b),
    "bigbird": lambda t, b: L.bigbird(t, b, 2 * b, n_global=1, n_random=2, seed=1),
    "bigbird-bidirectional": lambda t, b: L.bigbird(t, b, b, n_global=1, n_random=1, causal=False),
    "longformer": lambda t, b: L.longformer(t, b, 2 * b, global_tokens=[3, t - 1]),
    "custom": lambda t, b: L.from_block_fn(t, b, lambda i, j: ((i + j) % 3 == 0) | (i == j)),
    # a model's own window: the oldest block of each row masked element by element
    "token-window": lambda t, b: L.token_window(t, b, 2 * b),
    "token-window-ragged": lambda t, b: L.token_window(t, b, b + 5),
}


def masked_dense(q, k, v, layout):
    return math_attention(q.float(), k.float(), v.float(), causal=False, mask=layout.dense_mask()[None])


def qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float32):
    return (torch.randn(batch, heads, seq, dim).to(dtype), torch.randn(batch, kv_heads, seq, dim).to(dtype),
            torch.randn(batch, kv_heads, seq, dim).to(dtype))


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("seq, block, heads, kv_heads", [(256, 32, 2, 2), (250, 32, 4, 2), (192, 64, 4, 1)])
def test_matches_masked_dense_attention(name, seq, block, heads, kv_heads):
    layout = LAYOUTS[name](seq, block)
    q, k, v = qkv(2, heads, kv_heads, seq, 16)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), masked_dense(q, k, v, layout), **FP32)


@pytest.mark.parametrize("causal", [True, False])
def test_wide_bands_merge_query_blocks_into_bigger_tiles(causal):
    """A wide window computes several query blocks per tile (their keys' union, masked
    back to each block's own window): the answer stays exact."""
    # 32 (causal) or 31 (both sides) key blocks per row: tiles of 4 query blocks
    layout = L.sliding_window(1024, 16, 512 if causal else 256, causal=causal)
    assert any(g.blocks_per_tile > 1 for g in block_sparse_cpu.plan_groups(layout, 0))
    q, k, v = qkv(1, 4, 2, 1024, 16)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), masked_dense(q, k, v, layout), **FP32)


def test_per_head_layouts():
    layout = L.from_block_fn(256, 32, lambda h, i, j: (i - j <= 2 * h + 1) & (j <= i), causal=True, heads=4)
    q, k, v = qkv(1, 4, 2, 256, 16)
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), masked_dense(q, k, v, layout), **FP32)


def test_single_threaded_and_tiny_chunks_give_the_same_answer(monkeypatch):
    layout = L.bigbird(512, 32, 64, n_global=1, n_random=2)
    q, k, v = qkv(1, 4, 4, 512, 32)
    want = masked_dense(q, k, v, layout)
    monkeypatch.setattr(block_sparse_cpu, "CHUNK_SCORES", 1)  # one (head, query block) per task
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), want, **FP32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.testing.assert_close(block_sparse_attention(q, k, v, layout), want, **FP32)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    layout = L.sliding_window(256, 32, 64)
    q, k, v = qkv(1, 2, 2, 256, 32, dtype)
    out = block_sparse_attention(q, k, v, layout)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), masked_dense(q, k, v, layout), **close(ROUNDED_ONCE, dtype))


def test_work_follows_density():
    """Each active block is computed once: the scores computed equal the active blocks."""
    layout = L.sliding_window(1024, 64, 192)
    plan = block_sparse_cpu.plan_groups(layout, 0)
    assert sum(len(g.query_blocks) * g.blocks_per_row for g in plan) == int(layout.kv_num_blocks.sum())
    assert all(g.blocks_per_tile == 1 for g in plan)  # a narrow band: merging would waste more than it gains
    assert any(g.band_step == 1 for g in plan)  # the band is read through strided views, not gathered



@pytest.mark.parametrize("layout", [L.sliding_window(256, 32, 64), L.sliding_window(512, 16, 256)])
def test_k_and_v_may_be_views_into_one_buffer(layout):
    """A band's keys and values are strided views of K and V; each must start from its
    own tensor's storage offset (V here starts half-way into the buffer K starts at)."""
    q = torch.randn(1, 2, layout.seq_len, 16)
    k, v = torch.randn(2, 1, 2, layout.seq_len, 16).unbind(0)
    assert v.storage_offset() != k.storage_offset()
    torch.testing.assert_close(block_sparse_attention(q, k, v, layout), masked_dense(q, k, v, layout), **FP32)

def test_refuses_a_layout_for_another_length_or_head_count():
    q, k, v = qkv(1, 2, 2, 256, 16)
    with pytest.raises(ValueError, match="seq_len=512 does not match the input's sequence length 256"):
        block_sparse_attention(q, k, v, L.causal(512, 32))
    per_head = L.from_block_fn(256, 32, lambda h, i, j: j <= i, causal=True, heads=3)
    with pytest.raises(ValueError, match="3 per-head rows but the input has 2 heads"):
        block_sparse_attention(q, k, v, per_head)
    with pytest.raises(ValueError, match="as many queries as keys"):
        block_sparse_attention(q[:, :, :1], k, v, L.causal(256, 32))


def _child(q, k, v, layout, want):
    got = block_sparse_attention(q, k, v, layout)
    raise SystemExit(0 if torch.allclose(got, want, **FP32) else 1)


def test_a_forked_child_gets_its_own_workers():
    """The runner forks each case from a server process: a pool made before the
    fork has no threads in the child, which must not wait on them."""
    import multiprocessing

    layout = L.sliding_window(512, 64, 128)
    q, k, v = qkv(1, 4, 4, 512, 16)
    want = block_sparse_attention(q, k, v, layout)  # the parent's pool exists now (with 2+ threads)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(q, k, v, layout, want))
    child.start()
    child.join(60)
    assert child.exitcode == 0
