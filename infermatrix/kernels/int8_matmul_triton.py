"""Weight-only int8 matmul in Triton: y = x @ (q * scale)ᵀ (+ bias).

x (M, K) in float16, bfloat16 or float32; q (N, K) int8, one symmetric scale per
output channel (N,) in float32. Each program loads a (BLOCK_M, BLOCK_K) tile of x
and a (BLOCK_K, BLOCK_N) tile of q, converts q to x's dtype in registers (exact:
|q| <= 127 fits the 8-bit mantissa of bf16 too), and accumulates tl.dot in fp32.
The scale is constant along K, so it is applied once in the epilogue rather than
to every weight tile. Weights cross memory as int8: half the bytes of fp16.

Plain pointer arithmetic and tl.dot only, so the kernel runs under Triton 3.6 on
the GPU machines, 3.9 here, and the interpreter (TRITON_INTERPRET=1, which has no
bf16: test it in fp32/fp16). Pure functions; imports only torch and triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from infermatrix.kernels.attention_triton import refuse_interpreted_bfloat16

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _int8_weight_only_kernel(
    x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rk = tl.arange(0, BLOCK_K)  # (BK,)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x_mask = (rm[:, None] < M) & (kk[None, :] < K)
        q_mask = (kk[:, None] < K) & (rn[None, :] < N)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk, mask=x_mask, other=0.0)  # (BM, BK)
        # the weight tile read transposed, (BK, BN), straight from q's (N, K) layout
        q = tl.load(q_ptr + rn[None, :] * stride_qn + kk[:, None] * stride_qk, mask=q_mask, other=0)  # (BK, BN)
        w = q.to(x.dtype)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)  # (BN,) fp32
    acc = acc * scale[None, :]  # epilogue: one multiply per output, not per weight
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=out_mask)


def check_operands(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """ValueError naming the operand and the fix, before anything is launched."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; the int8 Triton matmul takes float16, bfloat16 or float32 "
                         "activations: cast the model to one of them")
    refuse_interpreted_bfloat16(x.dtype, "x")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 weight (N, K), got {q.dim()}-D {q.dtype}; quantize the weight first")
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but the weight has K = {q.shape[1]} input features; "
                         "the layer shapes do not match")
    if scale.shape != (q.shape[0],):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; expected ({q.shape[0]},), one per output channel")
    if bias is not None and bias.shape != (q.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({q.shape[0]},)")
    if q.shape[1] == 0 or q.shape[0] == 0:
        raise ValueError(f"weight shape {tuple(q.shape)} is empty; the kernel needs K >= 1 and N >= 1")


def _blocks(m: int) -> dict:
    """Tile sizes, from a sweep on an H200 (K=4096, N=11008, bf16). Decode: a 16-row tile
    (tl.dot's minimum) and narrow, deep weight tiles, so N/32 programs keep enough
    loads in flight to stream the int8 weight at ~2.1 TB/s (64-wide tiles: ~0.75).
    Prefill: 128x128x64, the best of the sweep, compute-bound."""
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)


def int8_weight_only_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                            bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """x (..., K) @ (q (N, K) * scale (N,)[:, None])ᵀ + bias -> (..., N) in x's dtype.
    `config` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) overrides the heuristic."""
    check_operands(x, q, scale, bias)
    lead, (n, k) = x.shape[:-1], q.shape
    x2 = x.reshape(-1, k)  # (M, K); a view when x is contiguous
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (M, N)
    if m == 0:
        return out.view(*lead, n)
    blocks = config or _blocks(m)
    grid = (triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
    scale32 = scale.to(torch.float32)
    _int8_weight_only_kernel[grid](
        x2, q, scale32, bias if bias is not None else scale32, out,
        m, n, k,
        x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **blocks,
    )
    return out.view(*lead, n)


def reference_int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: dequantize in fp32, matmul in fp32 (in float64 on request), cast back."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = q.to(acc) * scale.to(acc)[:, None]  # (N, K)
    y = x.to(acc) @ w.t()  # (..., N)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
