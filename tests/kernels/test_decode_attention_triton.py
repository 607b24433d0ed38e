"""The split-KV decode kernel against PyTorch's scaled_dot_product_attention.

One query per sequence against a cache; sequences in a batch see different key
ranges. Model-sized shapes and the repeated-call merge check need CUDA (they skip
elsewhere, saying so); the rest runs in Triton's interpreter without one. Tolerances: infermatrix.tolerances.ATTENTION, as for the prefill kernel (the
combine of partial results is fp32, exact up to rounding).
"""

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from infermatrix.kernels.attention_triton import interpreting
from infermatrix.kernels.decode_attention_triton import DecodeConfig, decode_attention
from infermatrix.tolerances import ATTENTION, close, within

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF_DTYPES = [torch.float16] + ([] if interpreting() else [torch.bfloat16])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: model-sized caches and a merge race need the compiled kernel")


def cache(batch, heads, kv_heads, slots, head_dim, dtype=torch.float32):
    q = torch.randn(batch, heads, 1, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(batch, kv_heads, slots, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim, device=DEVICE).to(dtype)
    return q, k, v


def oracle(q, k, v, lo=None, hi=None):
    mask = None
    if lo is not None:
        slot = torch.arange(k.shape[2], device=DEVICE)
        mask = ((slot >= lo.to(DEVICE)) & (slot < hi.to(DEVICE)))[:, None, None, :]  # (B, 1, 1, slots)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


FUSED, SEPARATE = DecodeConfig(fuse_combine=True), DecodeConfig(fuse_combine=False)
both_merges = pytest.mark.parametrize("config", [FUSED, SEPARATE], ids=["fused-merge", "merge-kernel"])
# scripts/gpu_decode_sweep.py checks the config it chose with test_merge_is_stable_over_fresh_caches:
# a JSON DecodeConfig in INFERMATRIX_DECODE_CONFIG joins that test's configs, as "swept".
_SWEPT = os.environ.get("INFERMATRIX_DECODE_CONFIG")
MERGE_CONFIGS = [pytest.param(FUSED, id="fused-merge"), pytest.param(SEPARATE, id="merge-kernel")] + (
    [pytest.param(DecodeConfig(**json.loads(_SWEPT)), id="swept")] if _SWEPT else [])


@both_merges
@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_batch_of_different_lengths_matches_sdpa(group, num_splits, config):
    """Three sequences in one 300-slot cache: full, a left-padded middle, a single key."""
    q, k, v = cache(3, 2 * group, 2, 300, 64)
    lo, hi = torch.tensor([[0], [5], [40]]), torch.tensor([[300], [77], [41]])
    out = decode_attention(q, k, v, kv_bounds=(lo, hi), num_splits=num_splits, config=config)
    torch.testing.assert_close(out, oracle(q, k, v, lo, hi), **close(ATTENTION, torch.float32))


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims_match_sdpa(head_dim):
    q, k, v = cache(2, 4, 1, 130, head_dim)
    torch.testing.assert_close(decode_attention(q, k, v, num_splits=2), oracle(q, k, v),
                               **close(ATTENTION, torch.float32))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision(dtype):
    q, k, v = cache(2, 8, 2, 257, 64, dtype)
    out = decode_attention(q, k, v, num_splits=4)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), oracle(q, k, v), **close(ATTENTION, dtype))


@both_merges
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("heads, kv_heads, slots, head_dim, lengths, num_splits", [
    pytest.param(32, 8, 4096, 128, [4096, 17, 1000, 3333], None, marks=needs_cuda, id="model-32/8-heads"),
    pytest.param(8, 2, 300, 64, [300, 17, 100, 233], 3, id="small"),
])
def test_half_precision_with_per_sequence_lengths(heads, kv_heads, slots, head_dim, lengths, num_splits, dtype,
                                                  config):
    """A batch of a full cache, a short sequence and two in between, in fp16/bf16: the
    kernel's own split count at model size (32 query heads over 8 KV heads), three
    splits at the interpreter's size."""
    q, k, v = cache(len(lengths), heads, kv_heads, slots, head_dim, dtype)
    hi = torch.tensor(lengths, device=DEVICE)[:, None]
    lo = torch.zeros_like(hi)
    out = decode_attention(q, k, v, kv_bounds=(lo, hi), num_splits=num_splits, config=config)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), oracle(q, k, v, lo, hi), **close(ATTENTION, dtype))


@needs_cuda
@pytest.mark.parametrize("config", MERGE_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_is_stable_over_fresh_caches(dtype, config):
    """20 calls, each on a fresh random cache of 4 sequences of mixed lengths (one full,
    some left padding) in 3000 slots, 32 query heads over 8 KV heads, head dim 128: a
    racy merge shows as an error that comes and goes between calls, so every call's
    error is reported."""
    gen = torch.Generator().manual_seed(0)
    errors, bad = [], []
    for call in range(20):
        hi = torch.randint(1, 3000, (4, 1), generator=gen)
        hi[call % 4] = 3000  # one full sequence
        lo = (torch.rand(4, 1, generator=gen) * hi * 0.2).long()  # some left padding
        lo, hi = lo.to(DEVICE), hi.to(DEVICE)
        q, k, v = cache(4, 32, 8, 3000, 128, dtype)
        ok, err = within(decode_attention(q, k, v, kv_bounds=(lo, hi), config=config), oracle(q, k, v, lo, hi),
                         dtype)
        errors.append(f"{err:.1e}")
        if not ok:
            bad.append(call)
    assert not bad, f"calls {bad} out of tolerance; max abs error per call: {', '.join(errors)}"


@both_merges
def test_splits_that_see_no_key_drop_out_of_the_combine(config):
    """With 5 splits over 320 slots, a sequence of 10 keys leaves 4 splits empty; a
    sequence with no keys at all gives zeros, not NaN."""
    q, k, v = cache(2, 2, 2, 320, 32)
    lo, hi = torch.tensor([[100], [7]]), torch.tensor([[110], [7]])
    out = decode_attention(q, k, v, kv_bounds=(lo, hi), num_splits=5, config=config)
    torch.testing.assert_close(out[:1], oracle(q[:1], k[:1], v[:1], lo[:1], hi[:1]),
                               **close(ATTENTION, torch.float32))
    assert (out[1] == 0).all()


@both_merges
def test_more_splits_than_one_merge_step(config):
    """With 32 merge rows and a group of 2 heads, a merge step takes 16 splits: 70
    splits take five steps, the last one partial."""
    q, k, v = cache(1, 4, 2, 70 * 32, 32)
    config = dataclasses.replace(config, merge_rows=32)
    out = decode_attention(q, k, v, num_splits=70, config=config)
    torch.testing.assert_close(out, oracle(q, k, v), **close(ATTENTION, torch.float32))


def test_fused_merge_leaves_its_counters_ready_for_the_next_call():
    """The last split resets the per-(sequence, KV head) counter, so repeated calls,
    with other split counts, still merge at the right moment."""
    for splits in (3, 5, 2):
        q, k, v = cache(2, 4, 2, 200, 32)
        out = decode_attention(q, k, v, num_splits=splits, config=FUSED)
        torch.testing.assert_close(out, oracle(q, k, v), **close(ATTENTION, torch.float32))


def test_bounds_are_clamped_at_full_width_and_may_differ_in_dtype_and_shape():
    """int64 bounds beyond the keys (past 2**32 too) mean "to the end", negative ones
    "from the start"; lo and hi may differ in dtype and in (1, 1) against (B, 1)."""
    q, k, v = cache(2, 4, 2, 100, 32)
    lo, hi = torch.tensor([[-5]]), torch.tensor([[2**32 + 5], [2**40]])  # int64
    out = decode_attention(q, k, v, kv_bounds=(lo, hi), config=FUSED)
    torch.testing.assert_close(out, oracle(q, k, v), **close(ATTENTION, torch.float32))
    lo32, hi64 = torch.tensor([[0], [30]], dtype=torch.int32), torch.tensor([[60]])
    out = decode_attention(q, k, v, kv_bounds=(lo32, hi64), config=FUSED)
    expected = oracle(q, k, v, torch.tensor([[0], [30]]), torch.tensor([[60], [60]]))
    torch.testing.assert_close(out, expected, **close(ATTENTION, torch.float32))


@pytest.mark.parametrize("field, value", [("merge_rows", 48), ("block_n", 0), ("num_stages", 0)])
def test_bad_decode_configs_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"DecodeConfig {field}={value}"):
        DecodeConfig(**{field: value})


def test_more_than_one_query_is_refused():
    q, k, v = cache(1, 2, 2, 16, 32)
    with pytest.raises(ValueError, match=r"one query per sequence; q has shape \(1, 2, 2, 32\)"):
        decode_attention(torch.cat([q, q], 2), k, v)
    with pytest.raises(ValueError, match="num_splits=0"):
        decode_attention(q, k, v, num_splits=0)
