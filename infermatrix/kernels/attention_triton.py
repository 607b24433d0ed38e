"""Fused attention forward in Triton, FlashAttention-2 style.

One program owns a tile of BLOCK_M query rows of one (batch, head), keeps it
resident, and streams the key/value tiles its rows may see through an online
softmax (exp2, running max and sum, output normalized once at the end).

Which keys a query row sees is a half-open range [lo, hi) per row. Causal
attention (queries are the last Tq of Tk positions), a KV cache's filled slots,
left padding and chunked prefill are all such ranges, so one kernel serves them.
A tile's key loop runs in three phases: leading blocks that need the per-row
mask, the blocks every row sees in full (no mask work), trailing masked blocks.
Blocks no row sees (above the causal diagonal) are never loaded.

`attend_block` and `attend_range` are the online-softmax core, shared with the
split-KV decode kernel and the block-sparse kernel.

Pure functions on tensors; nothing here knows about models or variants.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from infermatrix.kernels import interpreting

# A row's running max may lag its true max by up to 2**RESCALE_LOG2 before the
# accumulator is rescaled (lazy rescaling): p = exp2(s - m) stays <= 256, far
# from overflow even in fp16, and most key blocks skip the rescale entirely.
RESCALE_LOG2 = tl.constexpr(8.0)
# A finite start for the running max: a row that has seen only masked keys then
# gets p = exp2(-inf - NEG_BIG) = 0 instead of exp2(-inf + inf) = NaN.
NEG_BIG = tl.constexpr(-1.0e30)
LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 256)  # smallest and largest head dim the kernels take
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def load_kv_tile(k_ptrs, v_ptrs, in_keys, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASKED: tl.constexpr):
    """A key tile's K, transposed (D, N), and V (N, D) from k_ptrs, v_ptrs; MASKED: the keys
    where in_keys (N,) is False are not read (zeros); columns past HEAD_DIM never are."""
    if MASKED:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs, mask=in_keys[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_keys[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=in_keys[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=in_keys[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return k, v


@triton.jit
def attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_keys, row_lo, row_hi,
                 qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i).

    q (M, BLOCK_D) is the resident query tile; k_base, v_base point at key 0 of
    this (batch, kv head), head dim contiguous. MASKED: apply the per-row key
    ranges [row_lo, row_hi) (M,) and guard loads past n_keys; otherwise every row
    sees every key of the block. Scores are in log2 units (qk_scale = scale*log2 e).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None]  # (D, N): K transposed
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]  # (N, D)
    k, v = load_kv_tile(k_ptrs, v_ptrs, offs_n < n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 units
    if MASKED:
        seen = (offs_n[None, :] >= row_lo[:, None]) & (offs_n[None, :] < row_hi[:, None])
        s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if tl.max(m_new - m_i, 0) > RESCALE_LOG2:  # some row's max grew past the slack: rescale all
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    p = tl.math.exp2(s - m_i[:, None])  # (M, N), <= 2**RESCALE_LOG2
    l_i += tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)  # (M, D), fp32 accumulate
    return acc, l_i, m_i


@triton.jit
def attend_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, n_keys, row_lo, row_hi, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Fold in every key each row may see, row r seeing [row_lo[r], row_hi[r]).
    Only blocks some row sees are visited; those every row sees skip the mask."""
    tile_lo = tl.min(row_lo, 0)
    tile_hi = tl.max(row_hi, 0)
    full_lo = tl.max(row_lo, 0)
    full_hi = tl.min(row_hi, 0)
    lead_start = (tile_lo // BLOCK_N) * BLOCK_N
    full_start = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_end = tl.maximum(full_start, (full_hi // BLOCK_N) * BLOCK_N)
    for start_n in range(lead_start, full_start, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_keys,
                                     row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)
    for start_n in range(full_start, full_end, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_keys,
                                     row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    for start_n in range(full_end, tile_hi, BLOCK_N):
        acc, l_i, m_i = attend_block(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start_n, n_keys,
                                     row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def load_query_tile(q_base, stride_qm, rows, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """(M, BLOCK_D) query rows, zero where a row is out of range or past the head dim."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :],
                   mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def empty_state(M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, l_i, m_i) of an online softmax that has seen no key yet."""
    return (tl.zeros([M, BLOCK_D], dtype=tl.float32), tl.zeros([M], dtype=tl.float32),
            tl.zeros([M], dtype=tl.float32) + NEG_BIG)


@triton.jit
def store_rows(o_base, stride_om, offs_m, row_ok, acc, l_i, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Normalize once and store the in-range rows; a row that saw no key gives zeros, not NaN."""
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :], out.to(o_base.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# INFERMATRIX_TRITON_AUTOTUNE=0: the first config that fits, no timing (fast first calls, untuned tiles)
AUTOTUNE = os.environ.get("INFERMATRIX_TRITON_AUTOTUNE") != "0"

# Bounds modes: every row sees all keys; causal with the queries at the end of
# the keys; explicit per-row [lo, hi) tensors.
BOUNDS_NONE, BOUNDS_CAUSAL, BOUNDS_TENSOR = 0, 1, 2


SHARED_SLACK = 4096  # bytes the compiler may add to _shared_bytes' estimate (1 KiB seen on sm_90)

# when no listed config fits: the first of these that does (the last takes 64 KiB at head dim 256 in fp32)
_FALLBACK_CONFIGS = (triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2),
                     triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1))


def _prefill_configs() -> list[triton.Config]:
    if interpreting():  # one small tile: the interpreter is for correctness, not tuning
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    default = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    if not AUTOTUNE:  # the default, and fallbacks: with one config Triton would not prune it to fit
        return [default, *_FALLBACK_CONFIGS]
    return [default] + [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in ((128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 2), (64, 64, 4, 3),
                                      (64, 32, 4, 2))
    ]


@functools.lru_cache(maxsize=None)
def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one program may take on `device` (the opt-in maximum)."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no such limit
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 101376)  # sm_86's, the smallest of recent GPUs


def _shared_bytes(config: triton.Config, block_d: int, elem_size: int) -> int:
    """Shared memory of a prefill config: the Q tile plus num_stages K and V tiles
    (within 1 KiB of the compiler's figure on sm_90, see scripts/compile_kernels.py)."""
    return elem_size * block_d * (config.kwargs["BLOCK_M"] + 2 * config.num_stages * config.kwargs["BLOCK_N"])


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs that need more shared memory than the GPU has (big tiles at head
    dim 256), and big M tiles for short queries, which would waste most rows."""
    args = {**named_args, **kwargs}
    q = args["Q"]
    limit = _shared_memory_limit(q.device) - SHARED_SLACK
    fitting = [c for c in configs if _shared_bytes(c, args["BLOCK_D"], q.element_size()) <= limit]
    kept = [c for c in fitting if not (args["n_q"] <= 64 and c.kwargs["BLOCK_M"] > 64)]
    if kept or fitting:
        return (kept or fitting[-1:])[:None if AUTOTUNE else 1]
    return [next((c for c in _FALLBACK_CONFIGS if _shared_bytes(c, args["BLOCK_D"], q.element_size()) <= limit),
                 _FALLBACK_CONFIGS[-1])]


@triton.autotune(configs=_prefill_configs(), key=["n_q_bucket", "n_k_bucket", "HEAD_DIM", "BOUNDS", "GROUP"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _prefill_kernel(Q, K, V, Out, Lo, Hi, qk_scale,
                    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    n_heads, n_q, n_keys, n_q_bucket, n_k_bucket,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDS: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if BOUNDS == 1:  # causal: the last query tiles see the most keys, so start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    kv_head = head // GROUP  # grouped-query attention: K/V are never repeated
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    rows = tl.minimum(offs_m, n_q - 1)  # rows past the end mirror the last one, so tile bounds stay tight
    if BOUNDS == 2:
        row_lo = tl.load(Lo + batch * n_q + rows)  # bounds are (B, Tq) contiguous
        row_hi = tl.load(Hi + batch * n_q + rows)
    elif BOUNDS == 1:
        row_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        row_hi = tl.minimum(rows + (n_keys - n_q) + 1, n_keys)
    else:
        row_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        row_hi = tl.zeros([BLOCK_M], dtype=tl.int32) + n_keys
    q = load_query_tile(Q + batch * stride_qb + head * stride_qh, stride_qm, rows, row_ok, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = empty_state(BLOCK_M, BLOCK_D)
    acc, l_i, m_i = attend_range(acc, l_i, m_i, q, K + batch * stride_kb + kv_head * stride_kh,
                                 V + batch * stride_vb + kv_head * stride_vh, stride_kn, stride_vn, n_keys,
                                 row_lo, row_hi, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    store_rows(Out + batch * stride_ob + head * stride_oh, stride_om, offs_m, row_ok, acc, l_i, HEAD_DIM, BLOCK_D)


def _bucket(n: int) -> int:
    """Autotuning key for a length: its power of two, so nearby lengths share a tuning."""
    return 1 << max(n - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use IEEE products unless torch allows TF32 matmuls, as torch itself
    does. 16-bit inputs get Triton's default ("tf32", which only affects fp32 operands)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def refuse_interpreted_bfloat16(dtype: torch.dtype, name: str) -> None:
    """Triton's interpreter has no bfloat16: it would return garbage, so refuse it."""
    if dtype == torch.bfloat16 and interpreting():
        raise ValueError(f"{name} is bfloat16, which Triton's CPU interpreter (TRITON_INTERPRET=1) cannot compute; "
                         f"use float16 or float32 there, or run on CUDA")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_len_name: str = "Tq") -> None:
    """Refuse, with the shapes in the message, what the kernels cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            length = q_len_name if name == "q" else "Tk"
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dims (batch, heads, {length}, head_dim)")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 or float32")
        refuse_interpreted_bfloat16(t.dtype, name)
        if t.stride(-1) != 1:
            raise ValueError(f"{name} of shape {tuple(t.shape)} has head-dim stride {t.stride(-1)}; the kernels "
                             f"need the head dim contiguous (call .contiguous() first)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    batch, heads, _, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if heads % k.shape[1]:
        raise ValueError(f"q has {heads} heads, k has {k.shape[1]}: query heads must be a multiple of KV heads")
    if not HEAD_DIMS[0] <= head_dim <= HEAD_DIMS[1]:
        raise ValueError(f"head_dim {head_dim} (q {tuple(q.shape)}) is outside the {HEAD_DIMS[0]}..{HEAD_DIMS[1]} "
                         f"the Triton kernels take; use the sdpa variant for this model")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels run on CUDA; q is on {q.device}. Set TRITON_INTERPRET=1 "
                         f"before importing them to run on the CPU (correctness only)")


def check_bounds_shapes(bounds, batch: int, rows: int, *, int32_or_int64: bool = False):
    """Refuse (lo, hi) that are not each (batch or 1, rows) integer tensors; int32_or_int64:
    only those two (for a kernel that reads the bounds as given)."""
    lo, hi = bounds
    for name, t in (("lo", lo), ("hi", hi)):
        if t.dim() != 2 or t.shape[0] not in (1, batch) or t.shape[1] != rows:
            raise ValueError(f"kv_bounds {name} has shape {tuple(t.shape)}; expected ({batch} or 1, {rows})")
        if int32_or_int64 and t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"kv_bounds {name} has dtype {t.dtype}; key positions must be int32 or int64")
        if t.dtype.is_floating_point:
            raise ValueError(f"kv_bounds {name} has dtype {t.dtype}; key positions must be integers")
    return lo, hi


def check_bounds(bounds, batch: int, rows: int, n_keys: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (batch or 1, rows) integers, to contiguous (batch, rows) int32 on
    `device`, clamped to the keys that exist, [0, n_keys]: never a read outside k, v."""
    lo, hi = check_bounds_shapes(bounds, batch, rows)
    # one row per sequence, so the kernels index them without broadcasting strides
    return tuple(t.to(device).clamp(0, n_keys).to(torch.int32).expand(batch, rows).contiguous() for t in (lo, hi))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    kv_bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                    sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for q (B, H, Tq, D), k and v (B, Hkv, Tk, D) -> (B, H, Tq, D).

    causal: query i sits at key position Tk - Tq + i and sees keys up to it (a
    query shorter than the keys is chunked prefill against a cache). kv_bounds:
    (lo, hi), each (B or 1, Tq): query row i of batch b sees keys [lo, hi)
    instead; a row with lo >= hi gives zeros. Accumulates in fp32.
    """
    check_attention_inputs(q, k, v)
    batch, heads, n_q, head_dim = q.shape
    n_keys = k.shape[2]
    if causal and kv_bounds is None and n_q > n_keys:
        raise ValueError(f"causal attention with {n_q} queries but {n_keys} keys: the queries must be the "
                         f"last Tq of the Tk positions (Tq <= Tk)")
    out = torch.empty_like(q)
    if n_q == 0:
        return out
    if kv_bounds is not None:
        lo, hi = check_bounds(kv_bounds, batch, n_q, n_keys, q.device)
        mode = BOUNDS_TENSOR
    else:
        lo = hi = out  # unused pointer arguments
        mode = BOUNDS_CAUSAL if causal else BOUNDS_NONE
    scale = (1.0 / math.sqrt(head_dim)) if sm_scale is None else sm_scale

    def grid(meta):
        return triton.cdiv(n_q, meta["BLOCK_M"]), batch * heads

    _prefill_kernel[grid](
        q, k, v, out, lo, hi, scale * LOG2E,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        heads, n_q, n_keys, _bucket(n_q), _bucket(n_keys),
        GROUP=heads // k.shape[1], HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BOUNDS=mode, DOT_PRECISION=dot_precision(q.dtype),
    )
    return out
