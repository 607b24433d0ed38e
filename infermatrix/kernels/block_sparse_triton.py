"""Block-sparse attention forward in Triton.

One program owns one query block (the layout's block size is the tile) of one
(batch, head) and walks only the key blocks its row of the compressed layout
lists (`kv_num_blocks`, `kv_indices`), folding each into the running online
softmax with `attend_block`, the core shared with the fused attention kernel in
attention_triton.py. A block is masked only where it must be: the diagonal
block of a causal layout (row_hi = query position + 1), the short last
block of a sequence that is not a whole number of blocks, and with a token
window (row_lo = query position - window + 1) a row's oldest blocks; every other
active block takes the mask-free path.

Pure functions on tensors; nothing here knows about models or variants.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from infermatrix.kernels.attention_triton import (
    LOG2E,
    attend_block,
    check_attention_inputs,
    dot_precision,
    empty_state,
    interpreting,
    load_query_tile,
    store_rows,
)
from infermatrix.kernels.block_sparse_layout import BlockLayout

BLOCK_SIZES = (16, 256)  # tile sizes the kernel takes (powers of two)


@triton.jit
def _block_sparse_kernel(Q, K, V, Out, KvNum, KvIdx, qk_scale,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                         n_heads, n_q, n_keys, n_q_blocks, idx_width, layout_heads, window,
                         GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    kv_head = head // GROUP  # grouped-query attention: K/V are never repeated
    layout_row = (head % layout_heads) * n_q_blocks + pid_m  # layout_heads is 1 (shared) or n_heads
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs_m < n_q
    rows = tl.minimum(offs_m, n_q - 1)  # rows past the end mirror the last one
    row_lo = tl.zeros([BLOCK], dtype=tl.int32)
    if window > 0:  # a token window (causal layouts only): query q sees keys > q - window
        row_lo = tl.maximum(rows - window + 1, 0)
    if CAUSAL:
        row_hi = tl.minimum(rows + 1, n_keys)  # queries are the keys' own positions
    else:
        row_hi = tl.zeros([BLOCK], dtype=tl.int32) + n_keys
    q = load_query_tile(Q + batch * stride_qb + head * stride_qh, stride_qm, rows, row_ok, HEAD_DIM, BLOCK_D)
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh
    acc, l_i, m_i = empty_state(BLOCK, BLOCK_D)
    count = tl.load(KvNum + layout_row)
    for t in range(0, count):
        start_n = tl.load(KvIdx + layout_row * idx_width + t) * BLOCK
        edge = start_n + BLOCK > n_keys  # the short last block: loads past the keys are guarded
        if CAUSAL:
            edge = edge | (start_n == pid_m * BLOCK)  # the diagonal block: causal inside it
        if window > 0:
            edge = edge | (start_n < pid_m * BLOCK + BLOCK - window)  # below the tile's last row_lo
        if edge:
            acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_keys,
                                         row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK, True, DOT_PRECISION)
        else:
            acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_keys,
                                         row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK, False, DOT_PRECISION)
    store_rows(Out + batch * stride_ob + head * stride_oh, stride_om, offs_m, row_ok, acc, l_i, HEAD_DIM, BLOCK_D)


def _device_layout(layout: BlockLayout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout's int32 tables on `device`, copied once per device."""
    key = ("triton", str(device))
    if key not in layout.plans:
        layout.plans[key] = (layout.kv_num_blocks.to(device).contiguous(),
                             layout.kv_indices.to(device).contiguous())
    return layout.plans[key]


def check_block_size(block_size: int) -> None:
    if block_size & (block_size - 1) or not BLOCK_SIZES[0] <= block_size <= BLOCK_SIZES[1]:
        raise ValueError(f"block layout block_size={block_size}: the Triton kernel takes a power of two in "
                         f"{BLOCK_SIZES[0]}..{BLOCK_SIZES[1]}")


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                                  sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, Hkv, T, D) restricted to `layout`
    (built for seq_len T) -> (B, H, T, D). Only active key blocks are loaded;
    accumulates in fp32."""
    check_attention_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    n_keys = k.shape[2]
    if n_q != n_keys:
        raise ValueError(f"block-sparse attention takes as many queries as keys (got {n_q} queries, {n_keys} "
                         f"keys); decode steps go through the layout's rows_mask")
    layout.check_seq_len(n_q)
    layout.check_heads(heads)
    check_block_size(layout.block_size)
    kv_num, kv_idx = _device_layout(layout, q.device)
    out = torch.empty_like(q)
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else sm_scale
    block = layout.block_size
    block_d = max(16, triton.next_power_of_2(head_dim))
    big = block * block_d > 128 * 64
    _block_sparse_kernel[(layout.n_blocks, batch * heads)](
        q, k, v, out, kv_num, kv_idx, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, n_q, n_keys, layout.n_blocks, kv_idx.shape[-1], layout.heads, layout.window or 0,
        GROUP=heads // k.shape[1], CAUSAL=layout.causal, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK=block,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=1 if interpreting() else (8 if big else 4), num_stages=1 if interpreting() else 2,
    )
    return out
