"""`reference`: the model's own textbook attention, softmax(Q Kᵀ / √d_k) V."""

from __future__ import annotations

from dataclasses import dataclass

from infermatrix.model import Transformer, math_attention
from infermatrix.variants.base import ANY_MODEL, Variant, register_variant, with_attention


@register_variant("reference")
@dataclass(frozen=True)
class Reference(Variant):
    axis = "attention"
    model_kinds = ANY_MODEL
    description = "explicit softmax(QK^T/sqrt(d))V in PyTorch ops (the baseline)"

    def apply(self, model: Transformer) -> Transformer:
        return with_attention(model, math_attention)
