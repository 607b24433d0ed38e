"""`kv_cache`: decoding with a static, preallocated KV cache (the gpt-fast design).

The cache is a small buffer module: per layer, keys and values of shape
(batch, kv heads, max_len, head dim) in the model's dtype, each layer's its own
tensor: a compiled step writes each in place (a slice of one stacked buffer was
copied out and back by the graph every step). Prefill writes the prompt's
positions; each decode step writes one position and attends over the whole buffer
through a mask that hides unfilled slots (and left padding, for a batch of prompts
of different lengths). Shapes never change between steps, which
is what a compiled or CUDA-graph decode step needs.

`kv_cache(prefix=true)` is the eager partner: each forward attends over slots
[0, last position] only, with no mask at all when there is no padding (one query
sees every key; a prefill from slot 0 is plain causal), so SDPA takes its fused
path over the keys that exist instead of a masked pass over the whole buffer.

A model with its own sliding window W (ModelConfig.sliding_window) has it in both
masks; with prefix, an unpadded decode step attends over only the window's slots
[p-W+1, p], again without a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from infermatrix.model import Transformer
from infermatrix.variants.base import Variant, register_variant, shared_copy


class StaticKVCache(nn.Module):
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device, pad: torch.Tensor | None = None, prefix: bool = False,
                 window: int | None = None):
        super().__init__()
        self.batch, self.max_len, self.prefix, self.window = batch, max_len, prefix, window
        # prefix: the slots a forward attends over, [start, filled), set by mask(), which the
        # model calls once per forward before any layer's update() (KVCacheProtocol)
        self._start, self._filled = 0, max_len
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]  # per layer
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        for t in (*self.k, *self.v):  # fixed addresses: CUDA graphs keep writing to the same cache
            torch._dynamo.mark_static_address(t)
        # left padding per row: row b's real tokens start at slot pad[b]
        pad = torch.zeros(batch, dtype=torch.long) if pad is None else pad.to(torch.long)
        if pad.shape != (batch,):
            raise ValueError(f"pad has shape {tuple(pad.shape)}; expected ({batch},), one count per row")
        self.padded = bool(pad.any())  # known on the host: no device read per step
        self.register_buffer("pad", pad.to(device), persistent=False)
        self.register_buffer("slots", torch.arange(max_len, device=device), persistent=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, D) at input_pos (T,); return the layer's keys and values
        over the slots this forward attends to (the whole buffer, or with prefix [start, filled))."""
        if k.shape[0] != self.batch:
            raise ValueError(f"batch of {k.shape[0]} sequences, but this KV cache was built for "
                             f"{self.batch}; build one per batch size")
        keys, values = self.k[layer], self.v[layer]
        keys.index_copy_(2, input_pos, k)
        values.index_copy_(2, input_pos, v)
        lo, n = self._start, self._filled  # [0, max_len), or with prefix the slots this forward attends over
        return keys[:, :, lo:n], values[:, :, lo:n]  # (B, Hkv, n - lo, D) each

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, T, max_len), True = attend: causal over filled slots (within the
        model's window, if it has one), padding hidden. A padded query slot sees only
        itself, so its (unused) output stays finite.

        With prefix, the keys end at the last query's slot and the mask is cut there;
        without padding it is None where the rule needs no mask: one query sees every
        key (with a window: the keys from the window's first slot on), and a prefill
        from slot 0 no longer than the window is plainly causal."""
        if self.prefix:
            self._filled = int(input_pos[-1]) + 1  # one device read per forward
            one = len(input_pos) == 1 and not self.padded
            self._start = max(0, self._filled - self.window) if one and self.window else 0
            if one or (not self.padded and len(input_pos) == self._filled
                       and (self.window is None or self._filled <= self.window)):
                return None
        q = input_pos[None, :, None]  # (1, T, 1)
        k = self.slots[None, None, : self._filled]  # (1, 1, L)
        real = k >= self.pad[:, None, None]  # (B, 1, L)
        seen = (k <= q) & real  # (B, T, L)
        if self.window is not None:
            seen &= q - k < self.window
        return (seen | (k == q))[:, None]  # (B, 1, T, L)


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (tokens (B, T_max) left-padded, pad counts (B,))."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts])
    for row, (p, n) in enumerate(zip(prompts, pad.tolist())):
        tokens[row, n:] = p
    return tokens, pad


def new_cache(model: Transformer, batch: int, max_len: int, pad: torch.Tensor | None = None,
              prefix: bool = False) -> StaticKVCache:
    """A cache for `batch` sequences of up to `max_len` positions, in the model's dtype
    and device. Refuses, before any decoding, a length beyond the model's context."""
    cfg = model.config
    if max_len > cfg.max_seq_len:
        raise ValueError(f"prompt + new tokens = {max_len} positions exceed the model's context "
                         f"max_seq_len={cfg.max_seq_len}; use a shorter prompt or fewer new tokens")
    weight = model.tok_embeddings.weight
    return StaticKVCache(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, weight.dtype, weight.device,
                         pad, prefix, cfg.sliding_window)


@register_variant("kv_cache")
@dataclass(frozen=True)
class KVCache(Variant):
    axis = "cache"
    kind_refusal = "an encoder reads its whole input in one pass; there is no decoding to cache"
    description = ("static preallocated KV cache: prefill once, then one position per decode step "
                   "(prefix=true: attend over the filled slots only)")
    prefix: bool = False  # attend over slots [0, position] only, not the whole buffer under a mask

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        if not self.prefix:
            return
        clash = next((v.name for v in spec if v.name in ("compile", "block_sparse", "flex")), None)
        if clash == "compile":
            raise ValueError("kv_cache(prefix=true) gives every decode step a different key count; compile "
                             "would recompile each step: use kv_cache (static shapes) with compile")
        if clash:
            raise ValueError(f"kv_cache(prefix=true) with {clash}: the layout attends over its own rows of the "
                             "static buffer; use kv_cache")

    def apply(self, model: Transformer) -> Transformer:
        cached = shared_copy(model)  # the base model keeps decoding without a cache
        prefix = self.prefix
        cached.cache_factory = partial(new_cache, prefix=prefix)
        return cached
