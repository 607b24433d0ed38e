"""`compile`: the model's forward through torch.compile with static shapes.

Prefill and the one-token decode step each compile once per shape (the KV cache
is static, so a decode step's shapes never change). On CUDA the default mode is
"reduce-overhead" (CUDA graphs: the per-token CPU launch overhead disappears); on
the CPU it is inductor's "default". Compilation happens on the first call, which
the workloads time separately (`first_call_ms`), never inside the samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infermatrix.model import Transformer
from infermatrix.variants.base import Variant, register_variant, shared_copy

MODES = ("auto", "default", "reduce-overhead", "max-autotune")


@register_variant("compile")
@dataclass(frozen=True)
class Compile(Variant):
    axis = "graph"
    description = "torch.compile of the forward, static shapes (CUDA graphs on GPU)"
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not valid; valid: {', '.join(MODES)}")

    def apply(self, model: Transformer) -> Transformer:
        mode = self.mode
        if mode == "auto":
            mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else "default"
        compiled = shared_copy(model)  # the base model stays eager
        compiled.forward = torch.compile(compiled.forward, mode=mode, dynamic=False, fullgraph=True)
        return compiled
