"""`packed` (axis `linear`): dense weights prepacked once into oneDNN's blocked
layout, multiplied by its linear kernel (`mkldnn._linear_pointwise`, the op
inductor's CPU freezing uses), CPU only, float32 or bfloat16.

A decode step is a row times every weight: the packed layout lets oneDNN stream a
weight at a higher share of the memory bandwidth than the plain row-major GEMM
call does (measured on the README's CPU). The values are the model's own; only
the layout changes, so logits agree with `reference` to the GEMM's rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from infermatrix.model import Transformer
from infermatrix.variants.base import Variant, note_path, register_variant
from infermatrix.variants.int8 import QuantizedLinear, swap_linears

PACKED_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(QuantizedLinear):
    """A dense layer whose weight lives in oneDNN's packed layout (no plain copy kept)."""

    variant = "packed"

    def __init__(self, linear: nn.Linear, batch_hint: int | None):
        super().__init__(linear)
        weight = linear.weight.detach()
        # not persistent: a packed oneDNN tensor cannot be saved; the dense weight is the checkpoint
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
                             persistent=False)
        note_path("linear", "onednn_packed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight_packed, self.bias,
                                               "none", [], "")  # (M, N)
        return y.view(*lead, self.out_features)


@register_variant("packed")
@dataclass(frozen=True)
class Packed(Variant):
    axis = "linear"
    description = "CPU: dense weights prepacked for oneDNN's linear kernel (float32, bfloat16)"
    batch: int = 1  # rows the packing is tuned for: 1 suits decode; 0 for no hint

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        if device.type != "cpu":
            raise ValueError("packed prepacks for oneDNN's CPU kernels; on CUDA use the plain or int8 variants")
        if not torch.backends.mkldnn.is_available():
            raise ValueError("packed needs PyTorch built with oneDNN (mkldnn)")
        if any(v.name == "compile" for v in spec):
            raise ValueError("packed with compile: inductor cannot lower an already-packed oneDNN linear (measured "
                             "with torch 2.13); use compile(freeze=true) on the plain weights, which packs them itself")

    def apply(self, model: Transformer) -> Transformer:
        def make(name: str, linear: nn.Linear) -> nn.Module:
            if linear.weight.dtype not in PACKED_DTYPES or linear.weight.device.type != "cpu":
                raise ValueError(f"packed: layer {name!r} holds {linear.weight.dtype} on {linear.weight.device}; "
                                 "it packs float32 or bfloat16 weights on the CPU")
            return PackedLinear(linear, self.batch or None)

        return swap_linears(model, make, self.name)
