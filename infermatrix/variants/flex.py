"""`flex`: PyTorch FlexAttention (torch.compile'd) on the same block layouts as
`block_sparse`, the peer it is measured against.

Takes the same pattern and parameters, e.g. ``flex(pattern=sliding,window=256)``.
The layout becomes the equivalent BlockMask: its diagonal blocks (causal inside)
and a short last block are FlexAttention's partial blocks, with a mask_mod;
every other active block is a full block, computed without one. The first call
per shape compiles (tens of seconds on a CPU). Decode steps and a KV cache's
masked prefill take the same masked path as `block_sparse`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from infermatrix.kernels.block_sparse_layout import BlockLayout, compress_blocks
from infermatrix.model import Transformer
from infermatrix.variants.base import register_variant, with_attention
from infermatrix.variants.block_sparse import LayoutAttention, LayoutConfig

_compiled = None


def compiled_flex_attention():
    """flex_attention compiled once per process (static shapes)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
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
    def __init__(self, config: LayoutConfig):
        super().__init__(config)
        self._block_masks: dict[tuple, object] = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None or q.shape[2] != k.shape[2]:
            return self.masked(q, k, v, causal, mask)
        key = (q.shape[2], causal, q.device)
        if key not in self._block_masks:
            layout = self.layout(q.shape[2], causal, q.device)
            layout.check_heads(q.shape[1])
            self._block_masks[key] = to_flex_block_mask(layout, q.device)
        return compiled_flex_attention()(q, k, v, block_mask=self._block_masks[key],
                                         enable_gqa=q.shape[1] != k.shape[1])


@register_variant("flex")
@dataclass(frozen=True)
class Flex(LayoutConfig):
    axis = "attention"
    description = "PyTorch FlexAttention (torch.compile) with the block_sparse layout as its BlockMask (the peer)"

    def apply(self, model: Transformer) -> Transformer:
        return with_attention(model, FlexAttention(self))
