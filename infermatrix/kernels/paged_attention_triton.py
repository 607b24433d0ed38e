"""Decode attention over a paged KV cache in Triton: one query token per sequence,
its keys and values read through a block table.

A paged cache (vLLM's PagedAttention layout) keeps each layer's keys and values in
one pool of fixed-size blocks, k_pool and v_pool (num_blocks, Hkv, block_size, D).
Sequence n's position p lives in block block_tables[n, p // block_size], slot
p % block_size. A sequence takes one more block from a shared free list when it
outgrows its last one, so none reserves memory for its longest possible length and
its blocks may lie anywhere in the pool, in any order.

One program serves all query heads of one KV head of one sequence (GQA). The
group's queries are the rows of one tile, so each K/V tile is loaded once per group
and the scores are a real matrix product. The program walks its keys BLOCK_N at a
time. A key's address is its block's offset in the pool (read from the table) plus
its slot. When one block holds a whole tile (block_size >= BLOCK_N), the tile reads
one table entry and contiguous keys. Only the tile holding the last key is masked,
so the slots and table entries past a sequence's end (-1, say) are never read.

Split-KV, as in decode_attention_triton.py and for the same reason: sequences x KV
heads programs are too few to fill a GPU at decode batch sizes. So each sequence's
keys are split into chunks, one program each, and the chunks' partial results are
merged with the decode kernel's merge (fused into the launch by default,
`DecodeConfig`). The split count is chosen on the host from the table's capacity
(max_blocks * block_size), or from `max_seq_len` when the caller knows it. It never
comes from seq_lens: they live on the device, and reading them would cost a sync on
every step and break CUDA-graph capture. A chunk past a sequence's end sees no key
and drops out of the merge. The last chunk runs to the sequence's end, so a
`max_seq_len` that is too small costs balance, not keys.

`paged_decode_attention_reference` is the oracle in plain torch (the paged cache's own
CPU path gathers the blocks and calls the attention seam).

Pure functions on tensors; nothing here knows about models or variants.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from infermatrix.kernels.attention_triton import (
    DTYPES,
    HEAD_DIMS,
    LOG2E,
    dot_precision,
    empty_state,
    interpreting,
    load_kv_tile,
    load_query_tile,
    refuse_interpreted_bfloat16,
    store_rows,
)
from infermatrix.kernels.decode_attention_triton import (
    DEFAULT_CONFIG,
    DecodeConfig,
    choose_splits,
    combine_kernel,
    done_counters,
    store_partial,
)

MIN_BLOCK_SIZE = 16  # the smallest block a K/V tile may span (tl.dot takes tiles of at least 16)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k_head, v_head, table_row, stride_tb, stride_kb, stride_kn, stride_vb,
                 stride_vn, start_n, seq_hi, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Fold the sequence's keys [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i).

    k_head, v_head point at this KV head in block 0 of the pools; table_row at the
    sequence's block table. MASKED: some keys of the tile are at or past seq_hi, so
    their table entries, keys and values are not loaded and their scores are -inf.
    Scores are in log2 units (qk_scale = scale * log2 e).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)  # (N,) positions in the sequence
    offs_d = tl.arange(0, BLOCK_D)
    in_seq = offs_n < seq_hi
    if BLOCK_SIZE >= BLOCK_N:  # one block holds the tile: one table entry, contiguous slots
        block = tl.load(table_row + (start_n // BLOCK_SIZE) * stride_tb).to(tl.int64)  # the first key is in range
        slots = start_n % BLOCK_SIZE + tl.arange(0, BLOCK_N)  # (N,)
        k_rows = k_head + block * stride_kb + slots * stride_kn  # (N,) pointers to each key's head dim 0
        v_rows = v_head + block * stride_vb + slots * stride_vn
    else:  # the tile spans BLOCK_N // BLOCK_SIZE blocks: one table entry per key
        entries = table_row + (offs_n // BLOCK_SIZE) * stride_tb  # (N,)
        if MASKED:
            blocks = tl.load(entries, mask=in_seq, other=0).to(tl.int64)  # entries past the end are not read
        else:
            blocks = tl.load(entries).to(tl.int64)
        slots = offs_n % BLOCK_SIZE
        k_rows = k_head + blocks * stride_kb + slots * stride_kn  # (N,)
        v_rows = v_head + blocks * stride_vb + slots * stride_vn
    k_ptrs = k_rows[None, :] + offs_d[:, None]  # (D, N): K transposed
    v_ptrs = v_rows[:, None] + offs_d[None, :]  # (N, D)
    k, v = load_kv_tile(k_ptrs, v_ptrs, in_seq, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (H, N) scores, log2 units
    if MASKED:
        s = tl.where(in_seq[None, :], s, float("-inf"))  # the tile's first key is in: every row stays finite
    m_new = tl.maximum(m_i, tl.max(s, 1))  # (H,)
    alpha = tl.math.exp2(m_i - m_new)  # (H,) rescales what was summed under the old max
    p = tl.math.exp2(s - m_new[:, None])  # (H, N), <= 1
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)  # (H, D), fp32
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["stride_tn", "max_blocks", "split_len", "n_splits"])  # one compile per table size
def _paged_decode_kernel(Q, KPool, VPool, BlockTables, SeqLens, Out, PartOut, PartLse, Counters, qk_scale,
                         stride_qn, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                         stride_tn, stride_tb, stride_ln, stride_on, stride_oh, max_blocks, split_len, n_splits,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, SPLIT: tl.constexpr, FUSE_COMBINE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = tl.num_programs(1) * GROUP
    offs_h = tl.arange(0, BLOCK_H)
    head_ok = offs_h < GROUP  # the tile is padded to >= 16 rows for tl.dot
    heads = kv_head * GROUP + tl.minimum(offs_h, GROUP - 1)  # (H,)
    # keys the table can hold at most: a length past them (or below 0) is clamped, never read past
    seq_len = tl.minimum(tl.maximum(tl.load(SeqLens + seq * stride_ln), 0), max_blocks * BLOCK_SIZE)
    lo = split * split_len  # a multiple of BLOCK_N: tiles never straddle two chunks
    hi = tl.where(split == n_splits - 1, seq_len, tl.minimum(seq_len, lo + split_len))  # the last takes the rest
    full_end = lo + tl.maximum(hi - lo, 0) // BLOCK_N * BLOCK_N  # the tiles every key of which is in
    q = load_query_tile(Q + seq * stride_qn, stride_qh, heads, head_ok, HEAD_DIM, BLOCK_D)  # (H, D)
    table_row = BlockTables + seq * stride_tn
    k_head = KPool + kv_head * stride_kh
    v_head = VPool + kv_head * stride_vh
    acc, l_i, m_i = empty_state(BLOCK_H, BLOCK_D)
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_head, v_head, table_row, stride_tb, stride_kb, stride_kn,
                                     stride_vb, stride_vn, start_n, hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                                     BLOCK_SIZE, False, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):  # at most one tile: the one holding the last key
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_head, v_head, table_row, stride_tb, stride_kb, stride_kn,
                                     stride_vb, stride_vn, start_n, hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                                     BLOCK_SIZE, True, DOT_PRECISION)
    if SPLIT:
        store_partial(acc, l_i, m_i, PartOut, PartLse, Counters, Out + seq * stride_on, stride_oh, seq, kv_head,
                      heads, head_ok, split, n_splits, n_heads, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_S,
                      FUSE_COMBINE)
    else:  # one chunk: the output directly, zeros for a sequence with no keys
        store_rows(Out + seq * stride_on, stride_oh, heads, head_ok, acc, l_i, HEAD_DIM, BLOCK_D)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def check_paged_inputs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                       seq_lens: torch.Tensor) -> None:
    """Refuse, with the shapes in the message, inputs that are not one paged decode step
    (what both the kernel and the reference need)."""
    if q.dim() != 3:
        raise ValueError(f"q has shape {tuple(q.shape)}; expected 3 dims (sequences, heads, head_dim): "
                         f"one query token per sequence")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims "
                             f"(num_blocks, kv_heads, block_size, head_dim)")
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} and v_pool {tuple(v_pool.shape)} must have the same shape")
    n_seqs, heads, head_dim = q.shape
    kv_heads = k_pool.shape[1]
    if k_pool.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k_pool {tuple(k_pool.shape)} disagree on head_dim")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads, k_pool has {kv_heads} KV heads: query heads must be a multiple "
                         f"of KV heads")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q has dtype {q.dtype}; expected a floating-point dtype")
    if not (q.dtype == k_pool.dtype == v_pool.dtype):
        raise ValueError(f"q, k_pool, v_pool dtypes differ ({q.dtype}, {k_pool.dtype}, {v_pool.dtype}); "
                         f"cast them to one dtype")
    if block_tables.dim() != 2 or block_tables.shape[0] != n_seqs:
        raise ValueError(f"block_tables has shape {tuple(block_tables.shape)}; expected ({n_seqs}, max_blocks): "
                         f"one row per sequence of q {tuple(q.shape)}")
    if seq_lens.shape != (n_seqs,):
        raise ValueError(f"seq_lens has shape {tuple(seq_lens.shape)}; expected ({n_seqs},): one length per "
                         f"sequence of q {tuple(q.shape)}")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} has dtype {t.dtype}; expected torch.int32 (convert with .to(torch.int32))")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}; put every input on one device")


def _check_kernel_inputs(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
    """What the Triton kernel needs beyond a well-formed step: its dtypes, head dims,
    block sizes, a contiguous head dim, and CUDA (or the interpreter)."""
    if q.dtype not in DTYPES:
        raise ValueError(f"q has dtype {q.dtype}; the Triton kernel takes float16, bfloat16 or float32")
    refuse_interpreted_bfloat16(q.dtype, "q")
    head_dim = q.shape[2]
    if not HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1]:
        raise ValueError(f"head_dim {head_dim} (q {tuple(q.shape)}) is outside the {HEAD_DIMS[0]}..{HEAD_DIMS[1]} "
                         f"the Triton kernel takes; use paged_decode_attention_reference for this model")
    block_size = k_pool.shape[2]
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} (k_pool {tuple(k_pool.shape)}) is not a power of two >= "
                         f"{MIN_BLOCK_SIZE}; allocate the KV pool with block_size 16, 32, 64, ...")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} of shape {tuple(t.shape)} has head-dim stride {t.stride(-1)}; the kernel "
                             f"needs the head dim contiguous (call .contiguous() first)")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernel runs on CUDA; q is on {q.device}. Set TRITON_INTERPRET=1 before "
                         f"importing it to run on the CPU (correctness only), or use "
                         f"paged_decode_attention_reference")


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, *, scale: float | None = None, max_seq_len: int | None = None,
                           num_splits: int | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """One query per sequence over a paged KV cache: q (N, H, D), k_pool and v_pool
    (num_blocks, Hkv, block_size, D), block_tables (N, max_blocks) int32, seq_lens (N,)
    int32 -> (N, H, D) in q's dtype.

    Sequence n attends to its positions 0..seq_lens[n]-1, position p in block
    block_tables[n, p // block_size] at slot p % block_size; table entries past its
    last block are never read. Query head h reads KV head h // (H // Hkv). A length
    of 0 gives zeros; lengths outside [0, max_blocks * block_size] are clamped to it
    (checking them would cost a device sync). Block ids are not checked: an id
    outside the pool reads outside it (the reference refuses one).

    scale: default 1/sqrt(D). max_seq_len: a bound on seq_lens known on the host;
    the keys are split by it instead of by the table's capacity (a longer sequence
    is still attended in full). num_splits: how many chunks the keys are split into
    (default: by occupancy, as the split-KV decode kernel). config: tiles, warps and
    merge, as for decode_attention. No host work depends on tensor values, so a call
    can be captured in a CUDA graph.
    """
    config = config or DEFAULT_CONFIG
    check_paged_inputs(q, k_pool, v_pool, block_tables, seq_lens)
    _check_kernel_inputs(q, k_pool, v_pool)
    n_seqs, heads, head_dim = q.shape
    kv_heads, block_size = k_pool.shape[1], k_pool.shape[2]
    max_blocks = block_tables.shape[1]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)  # (N, H, D), contiguous
    if n_seqs == 0 or max_blocks == 0:  # nothing to attend to: zeros, as for a length of 0
        return out.zero_()
    if max_seq_len is not None and (not isinstance(max_seq_len, int) or max_seq_len < 0):
        raise ValueError(f"max_seq_len={max_seq_len!r}; give a length >= 0, or None for the table's capacity")
    n_keys = max_blocks * block_size  # the most any sequence can have
    if max_seq_len is not None:
        n_keys = min(n_keys, max_seq_len)
    n_keys = max(n_keys, 1)
    if num_splits is None:
        num_splits = choose_splits(n_seqs, kv_heads, n_keys, q.device, config)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits}; give at least 1")
    interpreted = interpreting()
    block_n = 32 if interpreted else max(16, config.block_n)
    split_len = _cdiv(_cdiv(n_keys, num_splits), block_n) * block_n
    num_splits = _cdiv(n_keys, split_len)  # no chunk left empty by the rounding
    split = num_splits > 1
    fuse = split and config.fuse_combine
    group = heads // kv_heads
    block_d = _pow2_at_least(head_dim, 16)
    block_g = _pow2_at_least(group, 1)
    block_s = max(1, min(_pow2_at_least(num_splits, 1), config.merge_rows // block_g))
    if split:
        part_out = torch.empty(n_seqs, heads, num_splits, block_d, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(n_seqs, heads, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out  # unused pointer arguments
    counters = done_counters(n_seqs * kv_heads, q.device) if fuse else out
    qk_scale = ((1.0 / math.sqrt(head_dim)) if scale is None else scale) * LOG2E
    _paged_decode_kernel[(n_seqs, kv_heads, num_splits)](
        q, k_pool, v_pool, block_tables, seq_lens, out, part_out, part_lse, counters, qk_scale,
        q.stride(0), q.stride(1), *k_pool.stride()[:3], *v_pool.stride()[:3], *block_tables.stride(),
        seq_lens.stride(0), out.stride(0), out.stride(1), max_blocks, split_len, num_splits,
        GROUP=group, BLOCK_H=_pow2_at_least(group, 16), HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, DOT_PRECISION=dot_precision(q.dtype), SPLIT=split, FUSE_COMBINE=fuse,
        BLOCK_G=block_g, BLOCK_S=block_s,
        num_warps=config.num_warps, num_stages=1 if interpreted else config.num_stages,
    )
    if split and not fuse:
        combine_kernel[(n_seqs, kv_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4,
        )
    return out


def paged_decode_attention_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor, *,
                                     scale: float | None = None) -> torch.Tensor:
    """paged_decode_attention in plain torch, on any device and dtype: each sequence's
    blocks gathered into (Hkv, len, D), then scaled_dot_product_attention in fp32.
    Returns (N, H, D) in q's dtype; a length of 0 gives zeros.

    Unlike the kernel it checks the values (one device sync): every length must be in
    [0, max_blocks * block_size] and every block id a sequence uses in the pool.
    """
    check_paged_inputs(q, k_pool, v_pool, block_tables, seq_lens)
    n_seqs, heads, head_dim = q.shape
    num_blocks, kv_heads, block_size, _ = k_pool.shape
    max_blocks = block_tables.shape[1]
    lens = seq_lens.tolist()
    for n, length in enumerate(lens):
        if not 0 <= length <= max_blocks * block_size:
            raise ValueError(f"seq_lens[{n}] = {length}, outside 0..{max_blocks * block_size} (block_tables holds "
                             f"{max_blocks} blocks of {block_size} per sequence)")
    first_slot = torch.arange(max_blocks, device=q.device) * block_size  # (max_blocks,)
    in_use = first_slot[None, :] < seq_lens[:, None]  # (N, max_blocks): the entries the sequences use
    used = block_tables[in_use]  # (blocks in use,)
    if used.numel():
        low, high = used.min().item(), used.max().item()
        if low < 0 or high >= num_blocks:
            raise ValueError(f"block_tables uses block id {low if low < 0 else high}; the pool has blocks "
                             f"0..{num_blocks - 1}")
    out = torch.zeros(q.shape, device=q.device, dtype=q.dtype)  # (N, H, D)
    for n, length in enumerate(lens):
        if length == 0:
            continue
        blocks = block_tables[n, :_cdiv(length, block_size)].long()  # (nb,)
        # (nb, Hkv, block, D) -> (Hkv, nb * block, D) -> the first `length` positions
        k = k_pool[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, :length]
        v = v_pool[blocks].transpose(0, 1).reshape(kv_heads, -1, head_dim)[:, :length]
        o = F.scaled_dot_product_attention(q[n, :, None, :].float(), k.float(), v.float(), scale=scale,
                                           enable_gqa=heads != kv_heads)  # (H, 1, D)
        out[n] = o[:, 0].to(q.dtype)
    return out
