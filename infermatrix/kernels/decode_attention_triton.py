"""Flash-decoding in Triton: one query token per sequence against its KV cache.

At decode time a (batch, head) has a single query row, far too little work to
fill a GPU if one program walked the whole cache. So the keys are split into
chunks across programs (split-KV): each writes its chunk's normalized partial
output and log-sum-exp, and a second small kernel combines the partials.

Each program serves all query heads of one KV head (GQA): the group's queries
form the rows of one tile, so each K/V block is loaded once per group and the
scores are a real matrix product. Per-sequence key ranges [lo, hi) let one
batch hold sequences of different lengths (and left padding).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from infermatrix.kernels.attention_triton import (
    LOG2E,
    attend_range,
    check_attention_inputs,
    check_bounds,
    dot_precision,
    empty_state,
    interpreting,
    load_query_tile,
)


@triton.jit
def _split_kernel(Q, K, V, PartOut, PartLse, Lo, Hi, qk_scale,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  n_keys, split_len, n_splits,
                  GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_BOUNDS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    head_ok = offs_h < GROUP  # the tile is padded to >= 16 rows for tl.dot
    heads = kv_head * GROUP + tl.minimum(offs_h, GROUP - 1)
    if HAS_BOUNDS:
        seq_lo = tl.load(Lo + batch)
        seq_hi = tl.load(Hi + batch)
    else:
        seq_lo = 0
        seq_hi = n_keys
    chunk_lo = tl.maximum(seq_lo, split * split_len)
    chunk_hi = tl.minimum(seq_hi, split * split_len + split_len)
    row_lo = tl.zeros([BLOCK_H], dtype=tl.int32) + chunk_lo
    row_hi = tl.zeros([BLOCK_H], dtype=tl.int32) + chunk_hi
    q = load_query_tile(Q + batch * stride_qb, stride_qh, heads, head_ok, HEAD_DIM, BLOCK_D)  # (H, D)
    acc, l_i, m_i = empty_state(BLOCK_H, BLOCK_D)
    acc, l_i, m_i = attend_range(acc, l_i, m_i, q, K + batch * stride_kb + kv_head * stride_kh,
                                 V + batch * stride_vb + kv_head * stride_vh, stride_kn, stride_vn, n_keys,
                                 row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # log2 units
    row = (batch * tl.num_programs(1) * GROUP + heads) * n_splits + split  # PartLse is (B, H, splits)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(PartOut + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=head_ok[:, None])
    tl.store(PartLse + row, lse, mask=head_ok)


@triton.jit
def _combine_kernel(PartOut, PartLse, Out, stride_ob, stride_oh, n_heads, n_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)  # one (batch, head)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = offs_s < n_splits
    lse = tl.load(PartLse + pid * n_splits + offs_s, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # a sequence with no keys: all weights 0
    weight = tl.math.exp2(lse - top)  # (S,)
    parts = tl.load(PartOut + (pid * n_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                    mask=split_ok[:, None], other=0.0)  # (S, D)
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    batch, head = pid // n_heads, pid % n_heads
    tl.store(Out + batch * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


BLOCK_N = 64
MIN_SPLIT_KEYS = 256  # a split shorter than this costs more in the combine than it saves


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere): read once, not every decode step."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_splits(batch: int, kv_heads: int, n_keys: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice over, no split under MIN_SPLIT_KEYS."""
    programs = 2 * _processors(device)
    wanted = triton.cdiv(programs, batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(n_keys, MIN_SPLIT_KEYS)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     kv_bounds: tuple[torch.Tensor, torch.Tensor] | None = None, num_splits: int | None = None,
                     sm_scale: float | None = None) -> torch.Tensor:
    """One query per sequence: q (B, H, 1, D), k and v (B, Hkv, Tk, D) -> (B, H, 1, D).

    kv_bounds: (lo, hi), each (B, 1) or (1, 1): sequence b sees keys [lo, hi)
    (its length in a shared cache, after its left padding); default all Tk.
    num_splits: how many chunks the keys are split into (default: by occupancy).
    """
    check_attention_inputs(q, k, v, q_len_name="1")
    batch, heads, n_q, head_dim = q.shape
    if n_q != 1:
        raise ValueError(f"decode_attention takes one query per sequence; q has shape {tuple(q.shape)} "
                         f"(use flash_attention for {n_q} queries)")
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if num_splits is None:
        num_splits = choose_splits(batch, kv_heads, n_keys, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits}; give at least 1")
    split_len = triton.cdiv(triton.cdiv(max(n_keys, 1), num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max(n_keys, 1), split_len)  # no split left empty by the rounding
    if kv_bounds is not None:
        lo, hi = check_bounds(kv_bounds, batch, 1, n_keys, q.device)
    else:
        lo = hi = q  # unused pointer arguments
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_out = torch.empty(batch, heads, num_splits, block_d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else sm_scale
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k, v, part_out, part_lse, lo, hi, scale * LOG2E,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], n_keys, split_len, num_splits,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=BLOCK_N if not interpreting() else 32, HAS_BOUNDS=kv_bounds is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=1 if interpreting() else 3,
    )
    out = torch.empty_like(q)
    _combine_kernel[(batch * heads,)](
        part_out, part_lse, out, out.stride(0), out.stride(1), heads, num_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), num_warps=4,
    )
    return out
