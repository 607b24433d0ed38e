"""`paged_kv_cache(block=16)`: the KV cache of a served stream (vLLM's design).

Each layer keeps one pool of fixed-size blocks, keys and values of shape (num_blocks,
KV heads, block, head dim); each sequence owns a block table, the pool blocks that
hold its positions in order (position p lives in block table[p // block], slot
p % block). Blocks are taken from one free list when a sequence grows and returned
when it ends or is preempted, so a stream of requests of different lengths shares
the pool without reserving each one's longest length.

A forward runs a served step: the tokens of several sequences (a prefill chunk, or
one decode token each) flattened into one row, (1, T), so every linear layer runs
once over all of them. `plan()` says which sequence each token belongs to; the
model then calls `attend()` in place of update + attention: the step's keys and
values are written to their slots, and each sequence's queries attend over its own
blocks through the attention seam (queries last, causal): the blocks are gathered, a
step's decode tokens attend in one call (padded to the longest, under a key mask) and
each prefill chunk in its own. With the `triton` attention (CUDA, or its
CPU interpreter) the decode tokens of a step, one query per sequence, go to one Triton
kernel that reads keys and values through the block tables
(kernels/paged_attention_triton.py); prefill chunks take the gather path. Records name
the paths (`attention_path`: paged_gather, paged_triton_decode).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch

from infermatrix.kernels import interpreting
from infermatrix.model import AttentionFn, Transformer
from infermatrix.variants.base import Variant, note_path, register_variant, shared_copy
from infermatrix.variants.kv_cache import KVCache


class Segment(NamedTuple):
    """One sequence's tokens in a served step: positions [start, start + length)."""

    seq: int
    start: int
    length: int


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, block: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, decode_kernel: bool = False):
        self.num_blocks, self.block, self.decode_kernel = num_blocks, block, decode_kernel
        shape = (num_blocks, n_kv_heads, block, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]  # per layer
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.device = torch.device(device)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: the lowest ids are taken first
        self.tables: dict[int, list[int]] = {}  # sequence -> its blocks, in position order
        self.peak_used = 0
        self._segments: list[Segment] = []

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block)

    def grow(self, seq: int, positions: int) -> bool:
        """Give `seq` blocks for `positions` positions; False, taking none, when the pool
        has too few free blocks."""
        table = self.tables.setdefault(seq, [])
        wanted = self.blocks_for(positions) - len(table)
        if wanted > len(self._free):
            return False
        table.extend(self._free.pop() for _ in range(max(wanted, 0)))
        self.peak_used = max(self.peak_used, self.used)
        return True

    def release(self, seq: int) -> None:
        """Return `seq`'s blocks to the pool (it ended, or was preempted)."""
        self._free.extend(reversed(self.tables.pop(seq, [])))

    def plan(self, segments: list[tuple[int, int, int]]) -> None:
        """The sequences of the next forward, in the order of its tokens, as Segments or
        (seq, start, length) tuples; each must hold blocks for its positions (grow).
        Every index a forward needs is built here once, on the host, and moved in one go."""
        self._segments = segments = [Segment(*s) for s in segments]
        first = list(itertools.accumulate((s.length for s in segments), initial=0))  # each one's first token
        tables = [torch.tensor(self.tables[s.seq]) for s in segments]
        write, self._chunks = [], []  # the slots each token goes to; prefill chunks, attended one by one
        for s, table, row in zip(segments, tables, first):
            if s.length == 1:
                write.append(_slots(table, torch.tensor([s.start]), self.block))
            else:
                read = _slots(table, torch.arange(s.start + s.length), self.block)  # every position it attends to
                write.append(tuple(part[s.start:] for part in read))
                self._chunks.append((slice(row, row + s.length), [part.to(self.device) for part in read]))
        self._write = [torch.cat(part).to(self.device) for part in zip(*write)]  # blocks (T,), slots (T,)
        # one-token segments (decode steps) attend together, over their blocks padded to the longest
        decode = [i for i, s in enumerate(segments) if s.length == 1]
        self._decode = None
        if decode:
            lens = torch.tensor([segments[i].start + 1 for i in decode])  # (N,) keys each
            width = max(len(tables[i]) for i in decode)
            padded = torch.stack([torch.cat([tables[i], tables[i].new_zeros(width - len(tables[i]))])
                                  for i in decode])  # (N, width): block 0 stands in past a table's end
            pos = torch.arange(int(lens.max()))  # (L,)
            index = {
                "rows": torch.tensor([first[i] for i in decode]), "lens": lens.to(torch.int32),
                "tables": padded.to(torch.int32), "blocks": padded[:, pos // self.block], "slots": pos % self.block,
                "valid": (pos[None] < lens[:, None])[:, None, None],  # (N, 1, 1, L): the attention mask
            }
            self._decode = {key: value.to(self.device) for key, value in index.items()}

    def mask(self, input_pos: torch.Tensor) -> None:
        return None  # attend() keeps each sequence to its own blocks, causally

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attention: AttentionFn) -> torch.Tensor:
        """q (1, H, T, D), k, v (1, Hkv, T, D) of the planned tokens -> (1, H, T, D)."""
        blocks, slots = self._write
        keys, values = self.k[layer], self.v[layer]  # (num_blocks, Hkv, block, D) each
        keys[blocks, :, slots] = k[0].transpose(0, 1)  # (T, Hkv, D) into their slots
        values[blocks, :, slots] = v[0].transpose(0, 1)
        out = torch.empty_like(q)
        if self._decode is not None:
            d = self._decode
            rows = q[0].index_select(1, d["rows"]).transpose(0, 1)  # (N, H, D): one query per sequence
            if self.decode_kernel:
                # imported on use: kernels are reached through the variant that needs them
                from infermatrix.kernels.paged_attention_triton import paged_decode_attention

                found = paged_decode_attention(rows, keys, values, d["tables"], d["lens"])  # (N, H, D)
            else:
                k_rows = keys[d["blocks"], :, d["slots"]].transpose(1, 2)  # (N, Hkv, L, D)
                v_rows = values[d["blocks"], :, d["slots"]].transpose(1, 2)
                found = attention(rows[:, :, None], k_rows, v_rows, causal=True, mask=d["valid"])[:, :, 0]
            out[0].index_copy_(1, d["rows"], found.transpose(0, 1))  # into (H, T, D)
        for rows, (chunk_blocks, chunk_slots) in self._chunks:
            k_seq = keys[chunk_blocks, :, chunk_slots].transpose(0, 1)[None]  # (1, Hkv, L, D)
            v_seq = values[chunk_blocks, :, chunk_slots].transpose(0, 1)[None]
            out[:, :, rows] = attention(q[:, :, rows], k_seq, v_seq, causal=True)  # (1, H, length, D)
        if layer == 0:
            if self._decode is not None:
                note_path("attention", "paged_triton_decode" if self.decode_kernel else "paged_gather")
            if self._chunks:
                note_path("attention", "paged_gather")
        return out


def _slots(table: torch.Tensor, positions: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool block, slot in it) of each of a sequence's positions, through its block table."""
    return table[positions // block], positions % block


def new_paged_cache(model: Transformer, num_blocks: int, block: int, decode_kernel: bool) -> PagedKVCache:
    """A pool of `num_blocks` blocks per layer, in the model's dtype and device."""
    cfg = model.config
    weight = model.tok_embeddings.weight
    return PagedKVCache(cfg.n_layers, num_blocks, block, cfg.n_kv_heads, cfg.head_dim, weight.dtype, weight.device,
                        decode_kernel)


@register_variant("paged_kv_cache")
@dataclass(frozen=True)
class PagedKV(Variant):
    axis = "cache"
    kind_refusal = KVCache.kind_refusal
    description = ("paged KV cache: one pool of fixed-size blocks, a block table per sequence (the serve "
                   "workload's continuous batching)")
    block: int = 16  # positions per block

    def __post_init__(self) -> None:
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block={self.block}: give a power of two of at least 16 (the decode kernel's tile)")

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        if workload not in ("serve", "drift"):
            raise ValueError(f"paged_kv_cache serves a stream of requests (the serve workload; drift's greedy "
                             f"tokens are served too); for {workload} use kv_cache")
        clash = next((v.name for v in spec if v.axis in ("graph", "decoding", "peer")), None)
        if clash:
            raise ValueError(f"paged_kv_cache with {clash}: a served step's shape changes every step and the "
                             f"scheduler runs its own loop; drop {clash}")
        layout = next((v.name for v in spec if v.name in ("block_sparse", "flex")), None)
        if layout:
            raise ValueError(f"paged_kv_cache with {layout}: the blocks are gathered per sequence and the decode "
                             f"tokens attend under a key mask, which {layout} would run as dense masked attention "
                             "under its label; use sdpa, reference or triton")

    def check_model(self, config) -> None:
        super().check_model(config)
        if config.sliding_window is not None:
            raise ValueError("paged_kv_cache attends over every position of a sequence; a model with a sliding "
                             f"window ({config.sliding_window}) would attend further than it was trained to")

    def apply(self, model: Transformer) -> Transformer:
        from infermatrix.variants.triton_attention import TritonAttention

        paged = shared_copy(model)  # the base model keeps its own cache seams
        paged.cache_factory = None  # a static cache has no place in a served stream
        # on CUDA, or on the CPU through Triton's interpreter (correctness only, as everywhere)
        kernel = isinstance(model.attention, TritonAttention) and (model.tok_embeddings.weight.is_cuda
                                                                   or interpreting())
        paged.paged_cache_factory = partial(new_paged_cache, block=self.block, decode_kernel=kernel)
        return paged
