"""`sdpa`: PyTorch's fused torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infermatrix.model import Transformer, causal_mask
from infermatrix.variants.base import ANY_MODEL, Variant, note_path, register_variant, with_attention


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


def sdpa_grouped_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA, except a decode step (one query) goes through two grouped GEMMs."""
    if q.shape[2] == 1 and (mask is None or mask.shape[1] == 1):
        # imported on use: kernels are reached through the variant that needs them
        from infermatrix.kernels.decode_attention_grouped import grouped_decode_attention

        note_path("attention", "grouped_decode")
        return grouped_decode_attention(q, k, v, mask)
    note_path("attention", "sdpa")
    return sdpa_attention(q, k, v, causal=causal, mask=mask)


DECODE_PATHS = ("sdpa", "grouped")


@register_variant("sdpa")
@dataclass(frozen=True)
class Sdpa(Variant):
    axis = "attention"
    model_kinds = ANY_MODEL
    description = ("torch.nn.functional.scaled_dot_product_attention (PyTorch's fused kernels); "
                   "decode=grouped: decode steps as two grouped GEMMs")
    decode: str = "sdpa"  # grouped: a one-query step as two GEMMs per KV head (faster in bf16 on CPUs)

    def __post_init__(self) -> None:
        if self.decode not in DECODE_PATHS:
            raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {self.decode!r}")

    def apply(self, model: Transformer) -> Transformer:
        return with_attention(model, sdpa_grouped_decode if self.decode == "grouped" else sdpa_attention)
