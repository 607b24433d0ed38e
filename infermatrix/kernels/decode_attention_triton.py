"""Flash-decoding in Triton: one query token per sequence against its KV cache.

At decode time a (batch, head) has a single query row, far too little work to
fill a GPU if one program walked the whole cache. So the keys are split into
chunks across programs (split-KV): each writes its chunk's normalized partial
output and log-sum-exp, and the partials are then merged by their weights.

Each program serves all query heads of one KV head (GQA): the group's queries
form the rows of one tile, so each K/V block is loaded once per group and the
scores are a real matrix product. Per-sequence key ranges [lo, hi) let one
batch hold sequences of different lengths (and left padding).

The merge runs in the same launch by default: each program counts itself done
on a per-(sequence, KV head) counter, and the last one merges the group's
partials and resets the counter. That saves a second launch and the gap before
it: on an H200, about 10 us of host time per call, and at batch 1 with a 16k
cache the fused kernel ran 31.5-32 us against 33-41 us for the two kernels.
`DecodeConfig(fuse_combine=False)` merges in a second small kernel instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from infermatrix.kernels.attention_triton import (
    LOG2E,
    attend_range,
    check_attention_inputs,
    check_bounds_shapes,
    dot_precision,
    empty_state,
    interpreting,
    load_query_tile,
)


@triton.jit
def combine_group(PartOut, PartLse, out_base, stride_oh, first_row, first_head, n_splits,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    """Merge the n_splits partials of GROUP consecutive heads (partial rows first_row...,
    output heads first_head...), each partial weighted by exp2 of its log-sum-exp.

    All heads' partials of BLOCK_S splits are loaded as one (G, S, D) tile, so the
    loads are in flight together instead of one head after another. They are read
    through L2 (.cg): other programs of the same launch may have just written them.
    """
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    head_ok = offs_g < GROUP
    top = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, n_splits, BLOCK_S):
        part = (first_row + offs_g[:, None]) * n_splits + start + offs_s[None, :]  # (G, S)
        ok = head_ok[:, None] & (start + offs_s[None, :] < n_splits)
        lse = tl.load(PartLse + part, mask=ok, other=float("-inf"), cache_modifier=".cg")
        parts = tl.load(PartOut + part[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=ok[:, :, None],
                        other=0.0, cache_modifier=".cg")  # (G, S, D)
        new_top = tl.maximum(top, tl.max(lse, 1))
        safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)  # no keys yet: all weights 0
        rescale = tl.math.exp2(top - safe_top)
        weight = tl.math.exp2(lse - safe_top[:, None])  # (G, S)
        total = total * rescale + tl.sum(weight, 1)
        acc = acc * rescale[:, None] + tl.sum(parts * weight[:, :, None], 1)
        top = new_top
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # a sequence with no keys: zeros
    tl.store(out_base + (first_head + offs_g[:, None]) * stride_oh + offs_d[None, :],
             out.to(out_base.dtype.element_ty), mask=head_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def store_partial(acc, l_i, m_i, PartOut, PartLse, Counters, out_base, stride_oh, seq, kv_head, heads, head_ok,
                  split, n_splits, n_heads, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, FUSE_COMBINE: tl.constexpr):
    """Write one chunk's normalized output and log-sum-exp (rows `heads` of sequence `seq`)
    to the partials; with FUSE_COMBINE the last chunk of (seq, kv_head) to count itself
    done merges the group's partials into out_base (the sequence's output rows)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # (H, D)
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # (H,), log2 units
    row = (seq * n_heads + heads) * n_splits + split  # PartLse is (sequences, H, splits)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(PartOut + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=head_ok[:, None])
    tl.store(PartLse + row, lse, mask=head_ok)
    if FUSE_COMBINE:
        tl.debug_barrier()  # all of this program's partial stores are issued before it counts itself done
        counter = Counters + seq * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == n_splits - 1:  # the last chunk merges
            tl.atomic_xchg(counter, 0)  # ready for the next call
            combine_group(PartOut, PartLse, out_base, stride_oh, seq * n_heads + kv_head * GROUP, kv_head * GROUP,
                          n_splits, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_S)


@triton.jit(do_not_specialize=["stride_bounds", "n_keys", "split_len", "n_splits"])  # one compile for all lengths
def _split_kernel(Q, K, V, PartOut, PartLse, Lo, Hi, Out, Counters, qk_scale,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                  stride_ob, stride_oh, stride_bounds, n_keys, split_len, n_splits,
                  GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_BOUNDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  FUSE_COMBINE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr):
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = tl.num_programs(1) * GROUP
    offs_h = tl.arange(0, BLOCK_H)
    head_ok = offs_h < GROUP  # the tile is padded to >= 16 rows for tl.dot
    heads = kv_head * GROUP + tl.minimum(offs_h, GROUP - 1)
    if HAS_BOUNDS:
        # clamp to the keys that exist at the bounds' own width (int64 bounds past 2**31 too), then narrow
        seq_lo = tl.minimum(tl.maximum(tl.load(Lo + batch * stride_bounds), 0), n_keys).to(tl.int32)
        seq_hi = tl.minimum(tl.maximum(tl.load(Hi + batch * stride_bounds), 0), n_keys).to(tl.int32)
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
    store_partial(acc, l_i, m_i, PartOut, PartLse, Counters, Out + batch * stride_ob, stride_oh, batch, kv_head,
                  heads, head_ok, split, n_splits, n_heads, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_S, FUSE_COMBINE)


@triton.jit(do_not_specialize=["n_splits"])
def combine_kernel(PartOut, PartLse, Out, stride_ob, stride_oh, n_splits,
                    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    batch = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_head = kv_head * GROUP
    combine_group(PartOut, PartLse, Out + batch * stride_ob, stride_oh, batch * tl.num_programs(1) * GROUP
                  + first_head, first_head, n_splits, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_S)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How the decode kernel tiles, splits and merges. The defaults won a sweep of
    324 configs on an H200 (scripts/gpu_decode_sweep.py; 32/8 heads, head dim 128,
    batch 1 and 8, caches of 4k-64k keys) and a head-to-head of the best six."""

    block_n: int = 64  # keys per loop step
    num_warps: int = 4
    num_stages: int = 2  # software-pipelined K/V loads in flight
    programs_per_sm: int = 3  # split the keys until the grid has about this many programs per SM
    min_split_keys: int = 256  # a split shorter than this costs more in the merge than it saves
    fuse_combine: bool = True  # merge the partials in the same launch (see the module docstring)
    merge_rows: int = 128  # (head, split) partials merged per step: all in flight at once, in registers

    def __post_init__(self) -> None:
        for name in ("block_n", "merge_rows", "num_warps"):  # tile sizes: Triton takes powers of two
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"DecodeConfig {name}={value!r}; give a power of two")
        for name in ("num_stages", "programs_per_sm", "min_split_keys"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeConfig {name}={value!r}; give a positive integer")


DEFAULT_CONFIG = DecodeConfig()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # plain Python: triton.cdiv is a JIT function, slow to call on every decode step


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _processors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere): read once, not every decode step."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def choose_splits(batch: int, kv_heads: int, n_keys: int, device: torch.device,
                  config: DecodeConfig = DEFAULT_CONFIG) -> int:
    """Enough programs to fill the GPU config.programs_per_sm times over, no split
    shorter than config.min_split_keys."""
    programs = config.programs_per_sm * _processors(device)
    wanted = _cdiv(programs, batch * kv_heads)
    return max(1, min(wanted, _cdiv(n_keys, config.min_split_keys)))


_counters: dict[tuple, torch.Tensor] = {}


def done_counters(n: int, device: torch.device) -> torch.Tensor:
    """n zeroed int32 counters for the fused merge, kept per (device, stream): every call
    leaves them at zero again, so they are allocated once, not cleared on every step.
    Under CUDA-graph capture each call gets its own, zeroed by the graph itself: a cached
    tensor from one graph's memory pool would never be zeroed for another graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device, stream)
    counters = _counters.get(key)
    if counters is None or counters.numel() < n:
        counters = _counters[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return counters


def _sequence_bounds(kv_bounds, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(lo, hi, stride): each (B or 1, 1) integer tensor on `device` as given; the kernel
    reads sequence b's bound at b * stride and clamps it to the keys that exist."""
    lo, hi = check_bounds_shapes(kv_bounds, batch, 1, int32_or_int64=True)
    if lo.shape != hi.shape or lo.dtype != hi.dtype or lo.stride() != hi.stride():
        lo, hi = (t.to(torch.int64).expand(batch, 1).contiguous() for t in (lo, hi))
    lo, hi = (t if t.device == device else t.to(device) for t in (lo, hi))
    return lo, hi, lo.stride(0) if lo.shape[0] > 1 else 0


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     kv_bounds: tuple[torch.Tensor, torch.Tensor] | None = None, num_splits: int | None = None,
                     sm_scale: float | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """One query per sequence: q (B, H, 1, D), k and v (B, Hkv, Tk, D) -> (B, H, 1, D).

    kv_bounds: (lo, hi), integer tensors each (B, 1) or (1, 1): sequence b sees
    keys [lo, hi) (its length in a shared cache, after its left padding), clamped
    to [0, Tk]; default all Tk. num_splits: how many chunks the keys are split
    into (default: by occupancy). Python work is kept small: at batch 1 it is a
    visible part of each decode step.
    """
    config = config or DEFAULT_CONFIG
    check_attention_inputs(q, k, v, q_len_name="1")
    batch, heads, n_q, head_dim = q.shape
    if n_q != 1:
        raise ValueError(f"decode_attention takes one query per sequence; q has shape {tuple(q.shape)} "
                         f"(use flash_attention for {n_q} queries)")
    kv_heads, n_keys = k.shape[1], k.shape[2]
    if num_splits is None:
        num_splits = choose_splits(batch, kv_heads, n_keys, q.device, config)
    if num_splits < 1:
        raise ValueError(f"num_splits={num_splits}; give at least 1")
    interpreted = interpreting()
    block_n = 32 if interpreted else config.block_n
    split_len = _cdiv(_cdiv(max(n_keys, 1), num_splits), block_n) * block_n
    num_splits = _cdiv(max(n_keys, 1), split_len)  # no split left empty by the rounding
    if kv_bounds is not None:
        lo, hi, bounds_stride = _sequence_bounds(kv_bounds, batch, q.device)
    else:
        lo = hi = q  # unused pointer arguments
        bounds_stride = 0
    group = heads // kv_heads
    block_d = _pow2_at_least(head_dim, 16)
    block_g = _pow2_at_least(group, 1)
    block_s = max(1, min(_pow2_at_least(num_splits, 1), config.merge_rows // block_g))
    part_out = torch.empty(batch, heads, num_splits, block_d, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    counters = done_counters(batch * kv_heads, q.device) if config.fuse_combine else out
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else sm_scale
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k, v, part_out, part_lse, lo, hi, out, counters, scale * LOG2E,
        q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3], out.stride(0), out.stride(1),
        bounds_stride, n_keys, split_len, num_splits,
        GROUP=group, BLOCK_H=_pow2_at_least(group, 16), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_N=block_n, HAS_BOUNDS=kv_bounds is not None, DOT_PRECISION=dot_precision(q.dtype),
        FUSE_COMBINE=config.fuse_combine, BLOCK_G=block_g, BLOCK_S=block_s,
        num_warps=config.num_warps, num_stages=1 if interpreted else config.num_stages,
    )
    if not config.fuse_combine:
        combine_kernel[(batch, kv_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=4,
        )
    return out
