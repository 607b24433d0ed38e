"""`sdpa`: PyTorch's fused torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infermatrix.model import Transformer, causal_mask
from infermatrix.variants.base import Variant, register_variant, with_attention


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, H, Tq, D); k, v (B, Hkv, Tk, D) -> (B, H, Tq, D), GQA without repeating K/V.
    mask (B or 1, 1, Tq, Tk), True = attend, replaces the causal rule when given."""
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    q_len, k_len = q.shape[2], k.shape[2]
    # SDPA's is_causal aligns the mask top-left; our queries are the *last* q_len
    # positions, so it only fits when Tq == Tk. One query sees every key: no mask.
    is_causal = causal and q_len == k_len
    if causal and 1 < q_len < k_len:
        mask = causal_mask(q_len, k_len, q.device)  # (Tq, Tk), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


@register_variant("sdpa")
@dataclass(frozen=True)
class Sdpa(Variant):
    axis = "attention"
    description = "torch.nn.functional.scaled_dot_product_attention (PyTorch's fused kernels)"

    def apply(self, model: Transformer) -> Transformer:
        return with_attention(model, sdpa_attention)
