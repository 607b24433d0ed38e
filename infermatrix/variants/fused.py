"""`fused` (axis `fusion`): one GEMM for each layer's q, k and v projections and one
for its gate and up projections, RoPE on q and k in one pass with its cos/sin
tables computed once for every position (2 x max_seq_len x rope_dim fp32) and
looked up per step, and each RMSNorm as one op (torch's rms_norm), on a copy of
the model.

A decode step multiplies one row by each weight: three (or two) small GEMMs per
layer become one, with fewer calls and one pass over the activations. The
weights are concatenated once (a copy; the base model keeps its own), in the order
the model splits them. Quantizing variants (axis `linear`, applied after) quantize
the fused layers as they would the separate ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from infermatrix.model import RMSNorm, Transformer, rope_frequencies, rope_tables
from infermatrix.variants.base import Variant, register_variant, shared_copy


def _fused_linear(*layers: nn.Linear) -> nn.Linear:
    """One nn.Linear whose output is the layers' outputs concatenated (biases too)."""
    if any(layer is None or type(layer) is not nn.Linear for layer in layers):
        kinds = ", ".join(type(layer).__name__ for layer in layers)
        raise ValueError(f"fused takes the dense model's nn.Linear projections (got {kinds}); "
                         "list fused before any quantizing variant, once")
    if len({layer.bias is None for layer in layers}) > 1:
        raise ValueError("fused: some of the projections have biases and some not; they cannot be one GEMM")
    weight = torch.cat([layer.weight.detach() for layer in layers])  # (sum of N, K)
    has_bias = layers[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]), requires_grad=False)
    return fused


class FusedRMSNorm(nn.Module):
    """The reference RMSNorm as one op (torch's rms_norm, fp32 inside), sharing its weight."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.eps = norm.eps
        # Gemma's (offset + weight) folded once into the scale (a small copy)
        self.weight = norm.weight if not norm.offset else nn.Parameter(norm.weight.detach() + norm.offset,
                                                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def fuse_projections(model: Transformer) -> Transformer:
    fused = shared_copy(model)
    cfg, device = model.config, model.tok_embeddings.weight.device
    positions = torch.arange(cfg.max_seq_len, device=device)
    fused.rope_table = rope_tables(cfg.rope_dim, positions, cfg.rope_theta, rope_frequencies(cfg, device))
    fused.norm = FusedRMSNorm(model.norm)
    blocks = []
    for block in model.layers:
        block = shared_copy(block)  # own module tables: the base model keeps its layers
        block.attention_norm, block.ffn_norm = FusedRMSNorm(block.attention_norm), FusedRMSNorm(block.ffn_norm)
        attention, ffn = shared_copy(block.attention), shared_copy(block.feed_forward)
        attention.wqkv = _fused_linear(attention.wq, attention.wk, attention.wv)
        attention.wq = attention.wk = attention.wv = None
        ffn.w13 = _fused_linear(ffn.w1, ffn.w3)
        ffn.w1 = ffn.w3 = None
        block.attention, block.feed_forward = attention, ffn
        blocks.append(block)
    fused.layers = nn.ModuleList(blocks)
    return fused


@register_variant("fused")
@dataclass(frozen=True)
class Fused(Variant):
    kind_refusal = "it fuses the decoder's q/k/v and gate/up projections and RMSNorms, which an encoder has not"
    axis = "fusion"
    description = ("one QKV GEMM and one gate/up GEMM per layer (weights concatenated once), RoPE tables "
                   "computed once, one-op RMSNorm")

    def apply(self, model: Transformer) -> Transformer:
        return fuse_projections(model)
