"""The fused prefill kernel against PyTorch's scaled_dot_product_attention.

Without a GPU these run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay small; on a CUDA machine the same tests run
the compiled kernel, bfloat16 included, and model-sized shapes too (skipped
elsewhere, saying they need CUDA).

Tolerances: infermatrix.tolerances.ATTENTION (the oracle is SDPA in fp32 on the same
rounded inputs; each dtype's bound is justified there).
"""

import pytest
import torch
import torch.nn.functional as F

from infermatrix.kernels.attention_triton import flash_attention, interpreting
from infermatrix.tolerances import ATTENTION, close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter has no bfloat16.
HALF_DTYPES = [torch.float16] + ([] if interpreting() else [torch.bfloat16])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: model-sized shapes take minutes in the interpreter")


def qkv(batch, heads, kv_heads, q_len, k_len, head_dim, dtype=torch.float32):
    q = torch.randn(batch, heads, q_len, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, head_dim, device=DEVICE).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, head_dim, device=DEVICE).to(dtype)
    return q, k, v


def oracle(q, k, v, *, causal, mask=None):
    """SDPA in fp32; causal means the queries are the last Tq of the Tk positions."""
    q_len, k_len = q.shape[2], k.shape[2]
    if causal and mask is None:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 7, 64, 130, 257])
def test_every_length_matches_sdpa(n, causal):
    """N = 1, N below one tile, a multiple of the tile, and ragged edges; GQA 3:1."""
    q, k, v = qkv(1, 3, 1, n, n, 64)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal), oracle(q, k, v, causal=causal),
                               **close(ATTENTION, torch.float32))


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims_and_gqa_ratios_match_sdpa(head_dim, group):
    q, k, v = qkv(2, group * 2, 2, 40, 40, head_dim)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), oracle(q, k, v, causal=True),
                               **close(ATTENTION, torch.float32))


@pytest.mark.parametrize("head_dim", [16, 80, 256])
def test_edge_and_non_power_of_two_head_dims(head_dim):
    q, k, v = qkv(1, 2, 2, 33, 33, head_dim)
    torch.testing.assert_close(flash_attention(q, k, v, causal=False), oracle(q, k, v, causal=False),
                               **close(ATTENTION, torch.float32))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_half_precision_accumulates_in_fp32(dtype, causal):
    q, k, v = qkv(2, 4, 2, 130, 130, 64, dtype)
    out = flash_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), oracle(q, k, v, causal=causal), **close(ATTENTION, dtype))


# (heads, kv_heads, Tq, Tk, head_dim): MHA past one tile, GQA 4:1, a short query against
# a long cache (chunked prefill) with GQA 3:1, the largest head dim; then one small enough
# for the interpreter that joins GQA and a short query in half precision.
@pytest.mark.parametrize("shape", [
    *(pytest.param(s, marks=needs_cuda, id="model-" + "-".join(map(str, s)))
      for s in ((8, 8, 1000, 1000, 64), (32, 8, 513, 513, 128), (12, 4, 77, 1024, 128), (4, 4, 300, 300, 256))),
    pytest.param((4, 2, 37, 130, 32), id="small-gqa-short-query"),
])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_half_precision_gqa_and_short_queries(shape, dtype, causal):
    heads, kv_heads, q_len, k_len, head_dim = shape
    q, k, v = qkv(2, heads, kv_heads, q_len, k_len, head_dim, dtype)
    out = flash_attention(q, k, v, causal=causal)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), oracle(q, k, v, causal=causal), **close(ATTENTION, dtype))


@pytest.mark.parametrize("q_len", [1, 37, 64])
def test_query_shorter_than_keys_is_chunked_prefill(q_len):
    """The queries are the last q_len positions: a chunk of prefill against a cache."""
    q, k, v = qkv(1, 4, 1, q_len, 130, 32)
    full_q = torch.randn(1, 4, 130, 32, device=DEVICE)
    full_q[:, :, 130 - q_len:] = q
    expected = oracle(full_q, k, v, causal=True)[:, :, 130 - q_len:]
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), expected, **close(ATTENTION, torch.float32))


def test_large_logits_stay_exact_through_lazy_rescaling():
    """Scores spanning hundreds of units force rescales in the middle of a row; the
    stale-max shortcut must not change the result."""
    q, k, v = qkv(1, 2, 2, 70, 200, 32)
    k = k * torch.linspace(0.1, 30.0, 200, device=DEVICE)[None, None, :, None]  # growing key norms
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), oracle(q, k, v, causal=True),
                               **close(ATTENTION, torch.float32))


def test_per_row_key_ranges_cover_padding_and_cache_fill():
    """kv_bounds as a KV cache with left padding gives them: row b, query i sees
    keys [pad_b, i + 1) of a 64-slot buffer. Rows that see no key give zeros."""
    q_len, slots, pads = 20, 64, torch.tensor([0, 3])
    q, k, v = qkv(2, 4, 2, q_len, slots, 32)
    lo = pads[:, None].expand(2, q_len)
    hi = torch.arange(1, q_len + 1)[None].expand(2, q_len)
    out = flash_attention(q, k, v, kv_bounds=(lo, hi))
    slot = torch.arange(slots)
    mask = (slot >= lo[..., None]) & (slot < hi[..., None])  # (2, Tq, slots)
    seen = mask.any(-1)
    expected = oracle(q, k, v, causal=False, mask=mask[:, None].to(DEVICE))
    torch.testing.assert_close(out[seen[:, None].expand(-1, 4, -1)], expected[seen[:, None].expand(-1, 4, -1)],
                               **close(ATTENTION, torch.float32))
    assert (out[1, :, :3] == 0).all()  # rows 0..2 of sequence 1 are padding: they see nothing


@pytest.mark.parametrize("make, message", [
    (lambda: qkv(1, 2, 2, 8, 8, 8), "head_dim 8"),
    (lambda: qkv(1, 2, 2, 8, 8, 512), "head_dim 512"),
    (lambda: qkv(1, 3, 2, 8, 8, 32), "multiple of KV heads"),
    (lambda: (*qkv(1, 2, 2, 8, 8, 32)[:2], torch.randn(1, 2, 9, 32, device=DEVICE)), "same shape"),
    (lambda: (qkv(1, 2, 2, 8, 8, 32)[0].half(), *qkv(1, 2, 2, 8, 8, 32)[1:]), "dtypes differ"),
    (lambda: (qkv(1, 2, 2, 8, 8, 32)[0].transpose(-1, -2), *qkv(1, 2, 2, 32, 8, 8)[1:]), "head-dim stride"),
    (lambda: (qkv(1, 2, 2, 8, 8, 32)[0][0], *qkv(1, 2, 2, 8, 8, 32)[1:]), "expected 4 dims"),
    (lambda: qkv(1, 2, 2, 8, 8, 32, torch.float64), "dtype torch.float64"),
])
def test_bad_input_is_refused_naming_the_shape(make, message):
    q, k, v = make()
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, causal=False)


def test_causal_query_longer_than_keys_is_refused():
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash_attention(*qkv(1, 2, 2, 9, 8, 32), causal=True)


def test_bad_bounds_are_refused():
    q, k, v = qkv(2, 2, 2, 8, 8, 32)
    with pytest.raises(ValueError, match=r"kv_bounds lo has shape \(2, 7\)"):
        flash_attention(q, k, v, kv_bounds=(torch.zeros(2, 7, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)))
    with pytest.raises(ValueError, match="must be integers"):
        flash_attention(q, k, v, kv_bounds=(torch.zeros(2, 8), torch.ones(2, 8)))


def test_bounds_past_the_keys_are_clamped_to_them():
    """A range reaching past Tk (or below 0) means the keys that exist: never a read outside k, v."""
    q, k, v = qkv(1, 2, 2, 4, 40, 32)
    wide = flash_attention(q, k, v, kv_bounds=(torch.full((1, 4), -9), torch.full((1, 4), 100)))
    torch.testing.assert_close(wide, oracle(q, k, v, causal=False), **close(ATTENTION, torch.float32))


@pytest.mark.skipif(not interpreting(), reason="the refusal concerns Triton's CPU interpreter only")
def test_bfloat16_is_refused_by_the_interpreter():
    """The interpreter has no bfloat16 and would return garbage; it must say so instead."""
    with pytest.raises(ValueError, match="q is bfloat16, which Triton's CPU interpreter"):
        flash_attention(*qkv(1, 2, 2, 8, 8, 32, torch.bfloat16), causal=True)


@pytest.mark.parametrize("head_dim, dtype", [(256, torch.float16), (256, torch.float32), (128, torch.float16)])
def test_autotune_keeps_only_tiles_that_fit_shared_memory(monkeypatch, head_dim, dtype):
    """An H200 gives a program 227 KiB of shared memory. The default tile at head dim 256
    needs 257 KiB (what the GPU refused, out of resources, before this pruning); pruning
    must leave only configs that fit, also untuned (INFERMATRIX_TRITON_AUTOTUNE=0), where
    it leaves exactly one: Triton prunes nothing from a list of one. The estimate matches the compiler's figures, which
    scripts/compile_kernels.py prints."""
    import triton

    from infermatrix.kernels import attention_triton as at

    monkeypatch.setattr(at, "_shared_memory_limit", lambda device: 232448)
    q = torch.empty(1, 1, 4096, head_dim, dtype=dtype)
    default = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    listed = [default, *(triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=8, num_stages=s)
                         for m, n, s in ((128, 128, 2), (128, 64, 2), (64, 64, 3), (64, 32, 2)))]
    assert at._shared_bytes(default, 256, 2) == 262144  # the compiler said 263168
    for configs in (listed, [default]):
        kept = at._prune_configs(configs, {"Q": q, "BLOCK_D": head_dim, "n_q": 4096})
        assert kept
        assert all(at._shared_bytes(c, head_dim, q.element_size()) <= 232448 for c in kept)
    if head_dim == 128 and dtype == torch.float16:  # everything listed fits at head dim 128
        assert at._prune_configs(listed, {"Q": q, "BLOCK_D": 128, "n_q": 4096}) == listed
    short = at._prune_configs(listed, {"Q": q, "BLOCK_D": head_dim, "n_q": 32})
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in short)  # no 128-row tile for 32 queries
    monkeypatch.setattr(at, "AUTOTUNE", False)  # untuned: exactly one config, the first that fits
    (only,) = at._prune_configs([default, *at._FALLBACK_CONFIGS], {"Q": q, "BLOCK_D": head_dim, "n_q": 4096})
    assert at._shared_bytes(only, head_dim, q.element_size()) <= 232448
    assert (only is default) == (head_dim == 128)
