"""`triton`: our fused Triton attention kernels behind the model's attention seam.

Prefill goes through the FlashAttention-2 style kernel; a single query per
sequence (a KV-cache decode step) through the split-KV decode kernel. The KV
cache's boolean mask becomes, once per forward, a key range [lo, hi) per query
row, which is what the kernels take.

It needs CUDA. With TRITON_INTERPRET=1 set before the first call it also runs
on the CPU through Triton's interpreter, for correctness only: the runner marks
such records `triton_interpreted` so nobody reads their timings as speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infermatrix.model import Transformer, last_visible_key
from infermatrix.variants.base import ANY_MODEL, TRITON_KERNELS, Variant, note_path, register_variant, with_attention


def mask_bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A boolean mask (B|1, 1, Tq, Tk), True = attend, whose rows are each one
    contiguous run of keys -> (lo, hi), each (B|1, Tq): row i sees keys [lo, hi).
    A row that sees nothing gets lo = hi = 0. Other masks are refused."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.dtype != torch.bool:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} and dtype {mask.dtype}: the triton "
                         f"variant takes a boolean (B or 1, 1, Tq, Tk) mask")
    rows = mask[:, 0].to(torch.uint8)  # (B, Tq, Tk)
    seen = rows.sum(-1, dtype=torch.int32)  # (B, Tq)
    lo = rows.argmax(-1).to(torch.int32)  # first True (argmax returns the first maximum)
    hi = (last_visible_key(mask) + 1).to(torch.int32)  # one past the last True
    lo, hi = torch.where(seen > 0, lo, 0), torch.where(seen > 0, hi, 0)
    contiguous = (hi - lo == seen).all()
    if rows.device.type == "cuda":
        torch._assert_async(contiguous, "triton attention: a mask row is not one contiguous key range")
    elif not contiguous:
        raise ValueError("the triton variant takes masks whose rows are each one contiguous range of keys "
                         "(causal, KV-cache fill, padding); use the sdpa or reference variant for other masks")
    return lo, hi


class TritonAttention:
    """The attention callable. Remembers the last mask's bounds: the model passes the
    same mask to every layer of a forward, so they are derived once per forward."""

    def __init__(self):
        self._mask: torch.Tensor | None = None
        self._bounds: tuple[torch.Tensor, torch.Tensor] | None = None

    def bounds(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # inside a compiled (CUDA-graph) step no Python state may change: derive them
            # in the graph, where the compiler shares the work across layers
            return mask_bounds(mask)
        if mask is not self._mask:
            self._mask, self._bounds = mask, mask_bounds(mask)
        return self._bounds

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        # imported on first use: TRITON_INTERPRET is read when the kernels are defined
        from infermatrix.kernels.attention_triton import flash_attention
        from infermatrix.kernels.decode_attention_triton import decode_attention

        bounds = self.bounds(mask) if mask is not None else None
        if q.shape[2] == 1:  # a decode step: the last position sees every key unless bounded
            note_path("attention", "triton_decode")
            return decode_attention(q, k, v, kv_bounds=bounds)
        note_path("attention", "triton_flash")
        return flash_attention(q, k, v, causal=causal, kv_bounds=bounds)


@register_variant("triton")
@dataclass(frozen=True)
class Triton(Variant):
    axis = "attention"
    model_kinds = ANY_MODEL  # a padding mask becomes per-row key bounds (mask_bounds)
    requires = TRITON_KERNELS
    description = "our fused Triton kernels: FlashAttention-2 style prefill, split-KV flash-decoding"

    def apply(self, model: Transformer) -> Transformer:
        return with_attention(model, TritonAttention())
