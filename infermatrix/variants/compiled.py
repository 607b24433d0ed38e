"""`compile`: the model's forward through torch.compile with static shapes.

Prefill and the one-token decode step each compile once per shape (the KV cache
is static, so a decode step's shapes never change). On CUDA the default mode is
"reduce-overhead" (CUDA graphs: the per-token CPU launch overhead disappears); on
the CPU it is inductor's "default". Compilation happens on the first call, which
the workloads time separately (`first_call_ms`), never inside the samples.
`compile(freeze=true)` turns on inductor's freezing: the weights become constants
of the graph, and on the CPU inductor prepacks each linear's weight for oneDNN and
calls its linear kernel, the rest of a layer fused into a few C++ loops: the fastest
CPU decode here (bf16 SmolLM2: about 19 against 28 ms per token for the best eager
row). The packed copies are made once, at compile time, beside the model's weights.

Variants note the path they ran only outside a compiled graph (`note_path`), so a
compiled case's record names the paths noted when its layers were built (int8),
not the attention path inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infermatrix.model import Transformer
from infermatrix.variants.base import ANY_MODEL, Variant, register_variant, shared_copy

MODES = ("auto", "default", "reduce-overhead", "max-autotune")


@register_variant("compile")
@dataclass(frozen=True)
class Compile(Variant):
    axis = "graph"
    model_kinds = ANY_MODEL
    description = "torch.compile of the forward, static shapes (CUDA graphs on GPU)"
    mode: str = "auto"
    freeze: bool = False  # weights as graph constants (inductor freezing): prepacked linears on the CPU

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not valid; valid: {', '.join(MODES)}")

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        sparse = next((v for v in spec if v.name == "block_sparse"), None)
        if sparse is not None and device.type == "cpu" and sparse.backend != "triton":
            raise ValueError("compile+block_sparse on the CPU: the block-sparse CPU kernel shares its work out "
                             "to a thread pool, which torch.compile cannot trace into one graph; drop compile, "
                             "or time block_sparse eager")

    def apply(self, model: Transformer) -> Transformer:
        mode = self.mode
        if mode == "auto":
            mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else "default"
        compiled = shared_copy(model)  # the base model stays eager
        step = torch.compile(compiled.forward, mode=mode, dynamic=False, fullgraph=True)
        if self.freeze:
            # inductor's global config, set around every call (a graph compiles on its first call):
            # torch.compile(options={"freezing": True}) froze less (24 against 18.4 ms per bf16
            # SmolLM2 decode step, measured with torch 2.13)
            def frozen_step(*args, **kwargs):
                with torch._inductor.config.patch(freezing=True):
                    return step(*args, **kwargs)

            compiled.forward = frozen_step
        else:
            compiled.forward = step
        return compiled
