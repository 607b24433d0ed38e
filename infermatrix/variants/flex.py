"""`flex`: PyTorch FlexAttention (torch.compile'd) on the same block layouts as
`block_sparse`, the peer it is measured against.

Takes the same pattern and parameters, e.g. ``flex(pattern=sliding,window=256)``.
The layout becomes the equivalent BlockMask: its diagonal blocks (causal inside)
and a short last block are FlexAttention's partial blocks, with a mask_mod;
every other active block is a full block, computed without one. The first call
per shape compiles (tens of seconds on a CPU), with fullgraph=True: FlexAttention
that cannot compile fails its case rather than run unfused. A KV cache's prefill
runs the same kernel on the cache's filled prefix; decode steps have no sparse
FlexAttention path here (they would run dense, recorded `dense_masked`), so the
matrix refuses `kv_cache+flex` for the decode and generate workloads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from infermatrix.errors import UserError
from infermatrix.kernels.block_sparse_layout import BlockLayout, compress_blocks
from infermatrix.model import Transformer
from infermatrix.variants.base import Variant, register_variant, with_attention
from infermatrix.variants.block_sparse import LayoutAttention, LayoutConfig

_compiled = None


def compiled_flex_attention():
    """flex_attention compiled once per process (static shapes)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # fullgraph: a graph break would run FlexAttention as unfused eager code under
        # this label; it fails the case instead, with the reason
        _compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    return _compiled


@functools.lru_cache(maxsize=None)
def _mask_mod(seq_len: int, causal: bool):
    """One function object per (length, causal): a new closure per BlockMask would
    make the compiled flex_attention recompile."""

    def mask_mod(b, h, q_idx, kv_idx):
        inside = kv_idx < seq_len
        return inside & (q_idx >= kv_idx) if causal else inside

    return mask_mod


def to_flex_block_mask(layout: BlockLayout, device: torch.device | str):
    """The BlockMask FlexAttention needs to compute exactly `layout`'s element mask."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = layout.block_mask()  # (Hl, n, n)
    n, seq_len = layout.n_blocks, layout.seq_len
    partial = torch.zeros(n, n, dtype=torch.bool)
    if layout.causal:
        partial |= torch.eye(n, dtype=torch.bool)
    if seq_len % layout.block_size:  # the short last key block
        partial[:, -1] = True
    partial = blocks & partial
    full = blocks & ~partial
    mask_mod = _mask_mod(seq_len, layout.causal)
    counts, indices = compress_blocks(partial[None])  # (1, H, nq), (1, H, nq, nk): batch 1
    full_counts, full_indices = compress_blocks(full[None])
    return BlockMask.from_kv_blocks(counts.to(device), indices.to(device), full_counts.to(device),
                                    full_indices.to(device), BLOCK_SIZE=layout.block_size, mask_mod=mask_mod,
                                    seq_lengths=(seq_len, seq_len))


class FlexAttention(LayoutAttention):
    # One query per decode step would need a BlockMask per position: decode steps run the
    # layout as a dense mask (recorded `dense_masked`); the matrix refuses kv_cache+flex
    # for decode and generate.
    sparse_decode = False

    def __init__(self, config: LayoutConfig):
        super().__init__(config)
        self._block_masks: dict[BlockLayout, object] = {}

    def kernel_path(self, device: torch.device) -> str:
        return "flex"

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        if layout not in self._block_masks:  # layouts are cached, so each is converted once
            layout.check_heads(q.shape[1])
            self._block_masks[layout] = to_flex_block_mask(layout, q.device)
        try:
            return compiled_flex_attention()(q, k, v, block_mask=self._block_masks[layout],
                                             enable_gqa=q.shape[1] != k.shape[1])
        except torch._dynamo.exc.Unsupported as exc:  # fullgraph refused a graph break
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"flex: FlexAttention did not compile into one graph ({first}); it would have run "
                            "unfused eager code under the flex label") from None


@register_variant("flex")
@dataclass(frozen=True)
class Flex(LayoutConfig):
    axis = "attention"
    kind_refusal = ("a padded batch would need a BlockMask per sequence length, each a new compilation of "
                    "FlexAttention; use block_sparse, which runs each sequence on its own length")
    description = "PyTorch FlexAttention (torch.compile) with the block_sparse layout as its BlockMask (the peer)"

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        if workload in ("decode", "generate") and any(v.name == "kv_cache" for v in spec):
            raise ValueError(f"kv_cache+flex cannot be timed on {workload}: FlexAttention has no decode step here "
                             "(one query per step would need a BlockMask per position), so the steps would run "
                             "dense attention under a sparse label; time decode with kv_cache+block_sparse, or "
                             "flex without kv_cache")

    def check_shape(self, case) -> None:
        if case.workload == "attention" and case.kv_len and case.kv_len != case.prompt_len:
            raise ValueError(f"flex runs fewer queries ({case.prompt_len}) than keys ({case.kv_len}) as dense "
                             "masked SDPA here, not FlexAttention (it would need a BlockMask per query offset); "
                             "measure decode-shaped attention with block_sparse, which reads only the row's "
                             "active keys")

    def check_model(self, config) -> None:
        Variant.check_model(self, config)  # the model kind; not the layout's window advice, which flex cannot take
        if getattr(config, "sliding_window", None) is not None:
            raise ValueError(f"the model has its own sliding window of {config.sliding_window} tokens, and flex's "
                             "BlockMask here is block-granular without it: it would change the model; use "
                             f"block_sparse(pattern=sliding,window={config.sliding_window}), exact on such a model")

    def apply(self, model: Transformer) -> Transformer:  # apply_variants has run check_model
        return with_attention(model, FlexAttention(self))
