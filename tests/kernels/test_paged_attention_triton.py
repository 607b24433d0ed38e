"""The paged decode-attention kernel against its torch reference and against
PyTorch's scaled_dot_product_attention over the same keys laid out contiguously.

Each test builds dense keys and values first and scatters them block by block
into a pool (block ids shuffled, spare blocks, unused table entries), so the dense
oracle shares no gather code with the kernel or the reference. Pool slots that
hold no key are NaN: a kernel that reads one shows it. Model-sized shapes and
bfloat16 need CUDA (they skip elsewhere, saying so); the rest runs in Triton's
interpreter without one. Tolerances: infermatrix.tolerances.ATTENTION, as for the
other attention kernels.
"""

import pytest
import torch
import torch.nn.functional as F

from infermatrix.kernels import interpreting
from infermatrix.kernels.decode_attention_triton import DecodeConfig
from infermatrix.kernels.paged_attention_triton import paged_decode_attention, paged_decode_attention_reference
from infermatrix.tolerances import ATTENTION, close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF_DTYPES = [torch.float16] + ([] if interpreting() else [torch.bfloat16])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: model-sized paged caches need the compiled kernel")
FP32 = close(ATTENTION, torch.float32)


def paged_cache(lengths, heads, kv_heads, head_dim, block_size, dtype=torch.float32, *, shuffled=True, unused=-1,
                spare=2, seed=0):
    """q (N, H, D), k_pool and v_pool (num_blocks, Hkv, block_size, D), block_tables (N, max_blocks)
    and seq_lens (N,) for sequences of the given lengths, plus the dense k, v (N, Hkv, T, D) the pool
    holds. Block ids are handed out in shuffled (or pool) order; every table row has at least one
    unused trailing entry, set to `unused`; `spare` pool blocks belong to no sequence."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-length // block_size) for length in lengths]
    max_blocks = max(needed) + 1
    num_blocks = sum(needed) + spare
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(len(lengths), kv_heads, max_blocks * block_size, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(lengths), kv_heads, max_blocks * block_size, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed + 1)) if shuffled \
        else torch.arange(num_blocks)
    k_pool = torch.full((num_blocks, kv_heads, block_size, head_dim), float("nan"), dtype=dtype)
    v_pool = k_pool.clone()
    tables = torch.full((len(lengths), max_blocks), unused, dtype=torch.int32)
    ids = iter(order.tolist())
    for n, length in enumerate(lengths):
        for b in range(needed[n]):
            block = next(ids)
            tables[n, b] = block
            filled = min(block_size, length - b * block_size)  # the last block's later slots stay NaN
            k_pool[block, :, :filled] = k[n, :, b * block_size:b * block_size + filled]
            v_pool[block, :, :filled] = v[n, :, b * block_size:b * block_size + filled]
    lens = torch.tensor(lengths, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_pool, v_pool, tables, lens, k, v)]


def dense_oracle(q, k, v, lens):
    """SDPA in fp32 of q (N, H, D) over the contiguous k, v (N, Hkv, T, D), sequence n seeing its first
    lens[n] keys -> (N, H, D)."""
    seen = torch.arange(k.shape[2], device=k.device) < lens[:, None].to(k.device)  # (N, T)
    out = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(), attn_mask=seen[:, None, None],
                                         enable_gqa=q.shape[1] != k.shape[1])  # (N, H, 1, D)
    return out[:, :, 0]


def reference_fp32(q, k_pool, v_pool, tables, lens):
    """The reference on the same (rounded) inputs in fp32, as the tolerance table assumes."""
    return paged_decode_attention_reference(q.float(), k_pool.float(), v_pool.float(), tables, lens)


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 1), (2, 2)], ids=["gqa-4/2", "gqa-4/1", "mha-2"])
def test_matches_reference_and_dense_sdpa(heads, kv_heads, block_size):
    """Lengths 1, an exact multiple of the block size, one that is not, and one more; 16-key
    blocks make a 32-key tile span two blocks, 64-key blocks hold two tiles each."""
    lengths = [1, 2 * block_size, block_size + 13, 45]
    q, k_pool, v_pool, tables, lens, k, v = paged_cache(lengths, heads, kv_heads, 32, block_size)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = dense_oracle(q, k, v, lens)
    torch.testing.assert_close(out, paged_decode_attention_reference(q, k_pool, v_pool, tables, lens), **FP32)
    torch.testing.assert_close(out, expected, **FP32)
    torch.testing.assert_close(paged_decode_attention_reference(q, k_pool, v_pool, tables, lens), expected, **FP32)


@pytest.mark.parametrize("num_splits, fuse", [(1, True), (2, True), (4, True), (4, False)],
                         ids=["one-chunk", "2-fused", "4-fused", "4-merge-kernel"])
def test_split_keys_merge_to_the_same_output(num_splits, fuse):
    """Chunks of 32 keys over a 112-key table: the short sequences leave chunks with no key,
    which drop out of the merge."""
    q, k_pool, v_pool, tables, lens, k, v = paged_cache([1, 70, 33, 96], 4, 2, 32, 16)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, num_splits=num_splits,
                                 config=DecodeConfig(fuse_combine=fuse))
    torch.testing.assert_close(out, dense_oracle(q, k, v, lens), **FP32)


@pytest.mark.parametrize("max_seq_len", [100, 40, 0])
def test_max_seq_len_sets_the_split_but_never_drops_keys(max_seq_len):
    """Chunks sized for the hint; a sequence longer than it is attended in full by the last chunk."""
    q, k_pool, v_pool, tables, lens, k, v = paged_cache([100, 7, 64], 4, 2, 32, 16)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, max_seq_len=max_seq_len, num_splits=2)
    torch.testing.assert_close(out, dense_oracle(q, k, v, lens), **FP32)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision(dtype):
    q, k_pool, v_pool, tables, lens, k, v = paged_cache([1, 48, 50, 100], 8, 2, 64, 16, dtype)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, num_splits=3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference_fp32(q, k_pool, v_pool, tables, lens), **close(ATTENTION, dtype))
    torch.testing.assert_close(out.float(), dense_oracle(q, k, v, lens), **close(ATTENTION, dtype))
    torch.testing.assert_close(paged_decode_attention_reference(q, k_pool, v_pool, tables, lens),
                               reference_fp32(q, k_pool, v_pool, tables, lens).to(dtype), **close(ATTENTION, dtype))


def test_head_dim_that_is_not_a_power_of_two_and_a_custom_scale():
    q, k_pool, v_pool, tables, lens, k, v = paged_cache([20, 37], 2, 1, 48, 16)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, scale=0.3)
    expected = paged_decode_attention_reference(q, k_pool, v_pool, tables, lens, scale=0.3)
    torch.testing.assert_close(out, expected, **FP32)
    seen = torch.arange(k.shape[2], device=DEVICE) < lens[:, None]
    dense = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=seen[:, None, None], scale=0.3,
                                           enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out, dense, **FP32)


def test_block_order_and_unused_entries_do_not_change_the_output():
    """The same keys in blocks handed out in pool order (unused entries 0) and shuffled
    (unused entries -1): the kernel does the same arithmetic, so the outputs are equal."""
    lengths = [1, 32, 29, 45]
    in_order = paged_cache(lengths, 4, 2, 32, 16, shuffled=False, unused=0)
    shuffled = paged_cache(lengths, 4, 2, 32, 16, shuffled=True, unused=-1)
    assert not torch.equal(in_order[3], shuffled[3])
    outs = [paged_decode_attention(*case[:5], num_splits=2) for case in (in_order, shuffled)]
    assert torch.equal(outs[0], outs[1])


def test_a_sequence_with_no_keys_gives_zeros():
    q, k_pool, v_pool, tables, lens, k, v = paged_cache([20, 1], 2, 2, 32, 16)
    lens[1] = 0
    for split in (1, 2):
        out = paged_decode_attention(q, k_pool, v_pool, tables, lens, num_splits=split)
        assert (out[1] == 0).all()
        torch.testing.assert_close(out[:1], dense_oracle(q[:1], k[:1], v[:1], lens[:1]), **FP32)
    assert (paged_decode_attention_reference(q, k_pool, v_pool, tables, lens)[1] == 0).all()


def test_reference_refuses_block_ids_outside_the_pool_and_lengths_past_the_table():
    q, k_pool, v_pool, tables, lens, _, _ = paged_cache([20, 5], 2, 2, 32, 16)
    bad = tables.clone()
    bad[1, 0] = k_pool.shape[0]
    with pytest.raises(ValueError, match=f"block id {k_pool.shape[0]}; the pool has blocks"):
        paged_decode_attention_reference(q, k_pool, v_pool, bad, lens)
    bad[1, 0] = -1
    with pytest.raises(ValueError, match="block id -1"):
        paged_decode_attention_reference(q, k_pool, v_pool, bad, lens)
    too_long = lens.clone()
    too_long[0] = tables.shape[1] * 16 + 1
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 49, outside 0..48"):
        paged_decode_attention_reference(q, k_pool, v_pool, tables, too_long)


def _mismatched_heads(q, k_pool, v_pool, tables, lens):
    return q[:, :3], k_pool, v_pool, tables, lens


def _int64_tables(q, k_pool, v_pool, tables, lens):
    return q, k_pool, v_pool, tables.long(), lens


def _int64_lens(q, k_pool, v_pool, tables, lens):
    return q, k_pool, v_pool, tables, lens.long()


def _block_size(size):
    def cut(q, k_pool, v_pool, tables, lens):
        return q, k_pool[:, :, :size].contiguous(), v_pool[:, :, :size].contiguous(), tables, lens
    return cut


def _four_dim_q(q, k_pool, v_pool, tables, lens):
    return q[:, :, None], k_pool, v_pool, tables, lens


def _mixed_dtypes(q, k_pool, v_pool, tables, lens):
    return q.half(), k_pool, v_pool, tables, lens


def _pools_differ(q, k_pool, v_pool, tables, lens):
    return q, k_pool, v_pool[:-1], tables, lens


def _short_table(q, k_pool, v_pool, tables, lens):
    return q, k_pool, v_pool, tables[:1], lens


@pytest.mark.parametrize("change, message", [
    (_mismatched_heads, "q has 3 heads, k_pool has 2 KV heads: query heads must be a multiple of KV heads"),
    (_int64_tables, r"block_tables has dtype torch.int64; expected torch.int32 \(convert with .to\(torch.int32\)\)"),
    (_int64_lens, "seq_lens has dtype torch.int64; expected torch.int32"),
    (_block_size(24), r"block_size 24 \(k_pool \(5, 2, 24, 32\)\) is not a power of two >= 16; allocate the KV "
                      r"pool with block_size 16, 32, 64"),
    (_block_size(8), "block_size 8 .* is not a power of two >= 16"),
    (_four_dim_q, r"q has shape \(2, 4, 1, 32\); expected 3 dims \(sequences, heads, head_dim\)"),
    (_mixed_dtypes, "q, k_pool, v_pool dtypes differ"),
    (_pools_differ, r"k_pool \(5, 2, 32, 32\) and v_pool \(4, 2, 32, 32\) must have the same shape"),
    (_short_table, r"block_tables has shape \(1, 2\); expected \(2, max_blocks\)"),
], ids=["heads", "tables-int64", "lens-int64", "block-24", "block-8", "q-4d", "dtypes", "pools", "table-rows"])
def test_bad_inputs_are_refused(change, message):
    case = paged_cache([20, 32], 4, 2, 32, 32, spare=3)[:5]
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(*change(*case))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_seq_len", [None, 4096], ids=["capacity-split", "max-seq-len-split"])
def test_model_sized_batch(dtype, max_seq_len):
    """8 sequences of 32 query heads over 8 KV heads, head dim 128, 16-key blocks shuffled
    through the pool, lengths up to 4096 (full, 1, a block multiple and not), the kernel's own
    split count; three calls, so a racy fused merge would show."""
    lengths = [4096, 1, 17, 1000, 3333, 2048, 4095, 256]
    q, k_pool, v_pool, tables, lens, k, v = paged_cache(lengths, 32, 8, 128, 16, dtype, spare=64)
    expected = reference_fp32(q, k_pool, v_pool, tables, lens)
    torch.testing.assert_close(expected, dense_oracle(q, k, v, lens), **FP32)
    for _ in range(3):
        out = paged_decode_attention(q, k_pool, v_pool, tables, lens, max_seq_len=max_seq_len)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, **close(ATTENTION, dtype))
