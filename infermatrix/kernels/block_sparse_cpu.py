"""Block-sparse attention on the CPU: work proportional to the layout's density.

Query blocks are grouped by their count of active key blocks (and by whether the
last of them is the diagonal, which needs the causal mask inside it). A chunk of
query blocks of one group, for some (batch, KV head) rows, is one call of
PyTorch's fused CPU attention (flash) kernel over exactly their keys: a query
block sees all its keys in that call, so nothing outside the layout is computed.
Where each row's blocks are one run that shifts by a fixed step from row to row
(sliding windows, the causal band) the keys are an overlapping strided view of
K/V, read in place; other layouts gather their blocks (a copy of the active
blocks only). Grouped-query heads share their KV head's blocks: the group's
query rows are stacked into one tile, so K/V are read once per KV head.

Chunks (tasks) are sized to keep their scores in cache and shared out to a pool
of single-threaded workers that meet once per call: many small ops, each its own
OpenMP parallel region, would stall at every barrier on a busy machine.

Two halves: the planner (`plan_groups`, `plan_chunks`) describes the work as plain
data, which query blocks share which way of reading their key blocks and how the
groups are cut into chunks; the `TileRunner` holds the inputs cut into tiles and
runs one fused attention call per chunk.

Pure functions on tensors; nothing here knows about models or variants.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infermatrix.kernels.block_sparse_layout import BlockLayout

# scores per task (floats): 1 MiB of fp32. Measured on a 2-core EPYC: 4x smaller tasks are
# ~25% slower (per-call overhead), 4x bigger ones no faster.
CHUNK_SCORES = 1 << 18


@dataclass(frozen=True)
class QueryBlockGroup:
    """Query blocks of one head that read the same number of key blocks, the same way:
    one fused attention call serves a chunk of them."""

    query_blocks: torch.Tensor  # (G,) ascending
    key_blocks: torch.Tensor  # (G * blocks_per_row,) each query block's active key blocks, one row after another
    blocks_per_row: int
    ends_on_diagonal: bool  # every row's last key block is its diagonal block (causal mask inside it)
    reads_short_block: bool  # some row reads the short last block (keys past seq_len masked)
    first_query_block: int | None  # the query blocks are first, first+1, ...: sliced, not gathered
    # each row's key blocks are one run s_r .. s_r+blocks_per_row-1 with s_r = s_0 + r*band_step:
    # the keys of consecutive rows are one overlapping strided view of K/V, never gathered
    band_step: int | None
    blocks_per_tile: int = 1  # consecutive query blocks per SDPA tile (a band: their keys' union, masked)

    @property
    def tiles(self) -> int:
        return len(self.query_blocks) // self.blocks_per_tile

    @property
    def keys_per_tile(self) -> int:
        """Key blocks a tile reads: its rows' own, or for a band their union."""
        return self.blocks_per_row + self.blocks_per_tile - 1


# Merging G query blocks of a sliding band into one tile computes G-1 extra key blocks per
# count+G-1; SDPA's CPU kernel runs ~25% faster per score with >= 256-row query tiles than with
# 64, so merge while the waste stays under this share.
MERGE_WASTE = 0.1
MERGES = (12, 8, 4)  # 128-row tiles run no faster than 64-row ones


def plan_groups(layout: BlockLayout, head: int) -> list[QueryBlockGroup]:
    """Which query blocks of one head of the layout share a way of reading their key
    blocks (cached on the layout): grouped by their count of key blocks and whether the
    last is the diagonal; a wide enough sliding band is cut into tiles of several blocks."""
    key = ("cpu", head)
    if key in layout.plans:
        return layout.plans[key]
    counts = layout.kv_num_blocks[head].long()
    indices = layout.kv_indices[head].long()
    n = layout.n_blocks
    every_block = torch.arange(n)
    last = indices.gather(1, (counts - 1)[:, None])[:, 0]  # each row's last (largest) active block
    on_diagonal = (last == every_block) & layout.causal
    ragged = layout.seq_len % layout.block_size != 0
    groups = []
    for count in counts.unique().tolist():
        for ends_on_diagonal in (True, False):
            rows = every_block[(counts == count) & (on_diagonal == ends_on_diagonal)]
            if not len(rows):
                continue
            blocks = indices[rows, :count]  # (G, count)
            consecutive = bool((rows[1:] - rows[:-1] == 1).all())
            starts = blocks[:, 0]
            one_run_each = bool((blocks == starts[:, None] + torch.arange(count)).all())
            steps = (starts[1:] - starts[:-1]).unique()
            step = int(steps[0]) if len(steps) == 1 else (0 if len(rows) == 1 else None)
            group = QueryBlockGroup(
                rows, blocks.reshape(-1).contiguous(), count, ends_on_diagonal,
                ragged and bool((blocks == n - 1).any()), int(rows[0]) if consecutive else None,
                step if one_run_each and consecutive and step is not None and step >= 0 else None)
            merge = next((m for m in MERGES if len(rows) >= m and (m - 1) / (count + m - 1) <= MERGE_WASTE
                          and m * layout.block_size <= 1024), 1)
            if layout.window is not None:  # a token window masks per row: one tile per query block
                merge = 1
            if group.band_step == 1 and not group.reads_short_block and merge > 1:
                cut = len(rows) // merge * merge  # whole tiles of `merge` blocks, then the rest alone
                groups.append(dataclasses.replace(group, query_blocks=rows[:cut],
                                                  key_blocks=blocks[:cut].reshape(-1).contiguous(),
                                                  blocks_per_tile=merge))
                if cut < len(rows):
                    groups.append(dataclasses.replace(group, query_blocks=rows[cut:], first_query_block=int(rows[cut]),
                                                      key_blocks=blocks[cut:].reshape(-1).contiguous()))
            else:
                groups.append(group)
    layout.plans[key] = groups
    return groups


@dataclass(frozen=True)
class Chunk:
    """One task: tiles first_tile .. first_tile+tiles-1 of a group, for the (batch x KV
    head) rows pair_start .. pair_stop-1."""

    group: QueryBlockGroup
    first_tile: int
    tiles: int
    pair_start: int
    pair_stop: int
    scores: int  # scores it computes: its cost

    @property
    def first_query_row(self) -> int:
        """The position in group.query_blocks of the chunk's first query block."""
        return self.first_tile * self.group.blocks_per_tile


def plan_chunks(groups: list[QueryBlockGroup], pairs: int, tile_rows: int, block_size: int) -> list[Chunk]:
    """The groups cut into tasks of about CHUNK_SCORES scores each, or one (pair, tile)
    when that alone is more (SDPA streams long key ranges itself). `pairs`: batch x KV
    heads; `tile_rows`: query rows per query block (its grouped query heads stacked)."""
    chunks = []
    for g in groups:
        tile = g.blocks_per_tile * tile_rows * g.keys_per_tile * block_size  # scores of one (pair, tile)
        pairs_per = max(1, min(pairs, CHUNK_SCORES // tile))
        tiles_per = max(1, min(g.tiles, CHUNK_SCORES // (tile * pairs_per)))
        for first in range(0, g.tiles, tiles_per):
            tiles = min(tiles_per, g.tiles - first)
            for start in range(0, pairs, pairs_per):
                stop = min(pairs, start + pairs_per)
                chunks.append(Chunk(g, first, tiles, start, stop, tile * tiles * (stop - start)))
    return chunks


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout, *,
                           sm_scale: float | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, Hkv, T, D) restricted to `layout`
    (built for seq_len T; H a multiple of Hkv) -> (B, H, T, D).

    Exactly softmax over the keys the layout's element mask allows, computed only
    on its active blocks (half-precision inputs accumulate in fp32, as SDPA does).
    """
    _check_inputs(q, k, v, layout)
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    scale = 1.0 / math.sqrt(dim) if sm_scale is None else sm_scale
    if layout.heads > 1:  # per-head layouts: each head its own problem
        group = heads // kv_heads
        return torch.cat([_attend(q[:, h:h + 1], k[:, h // group:h // group + 1], v[:, h // group:h // group + 1],
                                  layout, h, scale) for h in range(heads)], dim=1)
    return _attend(q, k, v, layout, 0, scale)


def _check_inputs(q, k, v, layout: BlockLayout) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected 4 dims "
                         f"(batch, heads, seq, head_dim)")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on batch, "
                         f"head_dim or K/V shape")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} heads, k has {k.shape[1]}: query heads must be a multiple of KV heads")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"block-sparse attention takes as many queries as keys (got {q.shape[2]} queries, "
                         f"{k.shape[2]} keys); decode steps go through the layout's rows_mask")
    layout.check_seq_len(q.shape[2])
    layout.check_heads(q.shape[1])


def _workers() -> ThreadPoolExecutor | None:
    """A pool of single-threaded workers, one per intra-op thread (None with one).

    Many small ops each open an OpenMP parallel region, and on a shared machine
    one descheduled thread stalls every region's barrier. Workers that run the
    ops single-threaded, each on its own share of the chunks, meet once per call."""
    global _pool
    wanted = torch.get_num_threads()
    if wanted <= 1:
        return None
    if _pool is None or _pool[:2] != (wanted, os.getpid()):  # a forked child has none of its threads
        if _pool is not None and _pool[1] == os.getpid():
            _pool[2].shutdown()
        started = threading.Barrier(wanted)
        pool = ThreadPoolExecutor(wanted, thread_name_prefix="block-sparse",
                                  initializer=torch.set_num_threads, initargs=(1,))
        list(pool.map(lambda _: started.wait(), range(wanted)))  # every worker set itself to 1 thread
        torch.set_num_threads(wanted)  # ... which also set the process default: restore it
        _pool = (wanted, os.getpid(), pool)
    return _pool[2]


_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _attend(q, k, v, layout: BlockLayout, head: int, scale: float) -> torch.Tensor:
    """Attention restricted to the layout's row `head`: plan the work, then run it."""
    runner = TileRunner(q, k, v, layout, scale)
    chunks = plan_chunks(plan_groups(layout, head), runner.pairs, runner.tile_rows, layout.block_size)
    _run_all(chunks, runner.run, parallel=q.device.type == "cpu")
    return runner.output()


class TileRunner:
    """The inputs cut into tiles, and one fused attention call (PyTorch's CPU SDPA,
    flash) per planned chunk, written into one output.

    A tile is one query block with the group's query heads stacked as its rows
    (tile_rows = group * block rows), against the key blocks its row reads."""

    def __init__(self, q, k, v, layout: BlockLayout, scale: float):
        batch, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        self.group = heads // kv_heads
        self.layout, self.scale, self.seq, self.dim = layout, scale, seq, dim
        self.batch, self.heads, self.kv_heads = batch, heads, kv_heads
        bs, n = layout.block_size, layout.n_blocks
        self.block, self.n_blocks = bs, n
        padded = n * bs
        if padded != seq:  # a short last block: pad with zeros, the padded keys are masked below
            pad = (0, 0, 0, padded - seq)
            q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
        self.pairs = batch * kv_heads
        self.tile_rows = self.group * bs
        # the group's query heads stacked as rows of one tile per (KV head, query block)
        tiles = q.reshape(self.pairs, self.group, n, bs, dim).transpose(1, 2)  # (BH, n, group, bs, D)
        self.query_tiles = tiles.reshape(self.pairs, n, self.tile_rows, dim)  # (BH, n, R, D), R = group * bs
        self.key_blocks = k.reshape(self.pairs, n, bs, dim).contiguous()  # (BH, n, bs, D)
        self.value_blocks = v.reshape(self.pairs, n, bs, dim).contiguous()
        self.out = torch.empty(self.pairs, n, self.tile_rows, dim, dtype=q.dtype, device=q.device)  # (BH, n, R, D)
        self.device, self.dtype = q.device, q.dtype
        # within the diagonal block, tile row r (query offset r % bs) sees key offsets <= r % bs
        above = (torch.arange(bs)[None, :] > (torch.arange(self.tile_rows) % bs)[:, None]).to(q.device)  # (R, bs)
        # one additive mask, 0 or -inf above the diagonal inside the last key block; a group
        # with c*bs keys takes a view of its last c*bs columns
        self.diagonal_mask = torch.zeros(self.tile_rows, n * bs, dtype=q.dtype, device=q.device)
        self.diagonal_mask[:, -bs:].masked_fill_(above, float("-inf"))
        self._band_masks: dict[tuple, torch.Tensor] = {}

    def output(self) -> torch.Tensor:
        out = self.out.view(self.batch, self.kv_heads, self.n_blocks, self.group, self.block, self.dim)
        out = out.transpose(2, 3)  # (B, Hkv, group, n, bs, D)
        return out.reshape(self.batch, self.heads, self.n_blocks * self.block, self.dim)[:, :, :self.seq]  # (B, H, T, D)

    def run(self, chunk: Chunk) -> None:
        if chunk.group.blocks_per_tile > 1:
            self._run_band_tiles(chunk)
        else:
            self._run_block_tiles(chunk)

    def _band_views(self, chunk: Chunk, keys: int, tile_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the chunk's tiles as one overlapping strided view each, never
        copied: tile i reads `keys` keys from `tile_step` blocks after tile i-1's start.
        (pairs, tiles, keys, D)."""
        g, bs, dim = chunk.group, self.block, self.dim
        first_block = int(g.key_blocks[chunk.first_query_row * g.blocks_per_row])
        size = (chunk.pair_stop - chunk.pair_start, chunk.tiles, keys, dim)
        stride = (self.n_blocks * bs * dim, tile_step * bs * dim, dim, 1)
        start = (chunk.pair_start * self.n_blocks + first_block) * bs * dim
        # each from its own storage offset: K and V may be views into one buffer
        return tuple(blocks.as_strided(size, stride, blocks.storage_offset() + start)
                     for blocks in (self.key_blocks, self.value_blocks))

    def _run_band_tiles(self, chunk: Chunk) -> None:
        """Tiles of several consecutive query blocks each, over their keys' union."""
        g, h0, h1, m = chunk.group, chunk.pair_start, chunk.pair_stop, chunk.tiles
        G, rows = g.blocks_per_tile, g.blocks_per_tile * self.tile_rows
        r0 = g.first_query_block + chunk.first_query_row
        queries = self.query_tiles[h0:h1, r0:r0 + m * G].reshape(h1 - h0, m, rows, self.dim)  # a view
        keys, values = self._band_views(chunk, g.keys_per_tile * self.block, tile_step=G)
        o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self._band_mask(g),
                                           scale=self.scale)  # (h, m, G*R, D)
        self.out[h0:h1, r0:r0 + m * G].view(h1 - h0, m, rows, self.dim).copy_(o)

    def _band_mask(self, g: QueryBlockGroup) -> torch.Tensor:
        """(G*R, (count+G-1)*bs) additive mask of a band tile: query block i of the tile
        sees key blocks i .. i+count-1 of the union (causal inside the last one)."""
        key = (g.blocks_per_tile, g.blocks_per_row, g.ends_on_diagonal)
        if key not in self._band_masks:
            bs, rows_per_block = self.block, self.tile_rows
            row = torch.arange(g.blocks_per_tile * rows_per_block, device=self.device)
            col = torch.arange(g.keys_per_tile * bs, device=self.device)
            query_block, key_block = (row // rows_per_block)[:, None], (col // bs)[None, :]
            seen = (key_block >= query_block) & (key_block <= query_block + g.blocks_per_row - 1)
            if g.ends_on_diagonal:
                seen &= (key_block < query_block + g.blocks_per_row - 1) | (
                    (col % bs)[None, :] <= ((row % rows_per_block) % bs)[:, None])
            self._band_masks[key] = torch.zeros(seen.shape, dtype=self.dtype,
                                                device=self.device).masked_fill_(~seen, float("-inf"))
        return self._band_masks[key]

    def _run_block_tiles(self, chunk: Chunk) -> None:
        """Tiles of one query block each, over exactly the key blocks its row reads: a
        band group's through strided views, others' gathered."""
        g, h0, h1, m, c0 = chunk.group, chunk.pair_start, chunk.pair_stop, chunk.tiles, chunk.first_tile
        keys = g.blocks_per_row * self.block
        blocks = g.query_blocks[c0:c0 + m].to(self.device)
        if g.first_query_block is not None:
            r0 = g.first_query_block + c0
            queries = self.query_tiles[h0:h1, r0:r0 + m]  # (h, m, R, D), a view
        else:
            queries = self.query_tiles[h0:h1].index_select(1, blocks)
        if g.band_step is not None:  # row i's blocks start band_step blocks after row i-1's
            k, v = self._band_views(chunk, keys, tile_step=g.band_step)  # (h, m, c*bs, D)
        else:
            read = g.key_blocks[c0 * g.blocks_per_row:(c0 + m) * g.blocks_per_row].to(self.device)
            k = self.key_blocks[h0:h1].index_select(1, read).view(h1 - h0, m, keys, self.dim)  # (h, m, c*bs, D)
            v = self.value_blocks[h0:h1].index_select(1, read).view(h1 - h0, m, keys, self.dim)
        mask = self._element_mask(chunk, blocks, keys)
        o = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=self.scale)  # (h, m, R, D)
        if g.first_query_block is not None:
            self.out[h0:h1, r0:r0 + m] = o
        else:
            self.out[h0:h1].index_copy_(1, blocks, o)

    def _element_mask(self, chunk: Chunk, blocks: torch.Tensor, keys: int) -> torch.Tensor | None:
        """The additive mask of one-block tiles: causal inside the diagonal block, keys
        past seq_len in the short last block, keys older than a token window; None
        when every key read is seen."""
        g, m, c0, bs = chunk.group, chunk.tiles, chunk.first_tile, self.block
        mask = self.diagonal_mask[:, self.n_blocks * bs - keys:] if g.ends_on_diagonal else None  # (R, keys)
        window = self.layout.window
        if g.reads_short_block or window is not None:
            read = g.key_blocks[c0 * g.blocks_per_row:(c0 + m) * g.blocks_per_row].to(self.device)
            key_pos = (read.view(m, g.blocks_per_row, 1) * bs + torch.arange(bs, device=self.device)).view(m, 1, keys)
            hidden = key_pos >= self.seq  # (m, 1, keys): keys past seq_len in the short last block
            if window is not None:  # keys older than each query's token window
                query_pos = blocks.view(m, 1, 1) * bs + (torch.arange(self.tile_rows, device=self.device)
                                                         % bs).view(1, -1, 1)
                hidden = hidden | (key_pos <= query_pos - window)  # (m, R, keys)
            hide = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device)
            hide.masked_fill_(hidden, float("-inf"))
            mask = hide if mask is None else mask + hide  # (m, R, keys)
        return mask


def _run_all(chunks: list[Chunk], run, *, parallel: bool) -> None:
    """run(chunk) for every chunk: here, or on the worker pool when there is more than
    one chunk. Workers pull chunks, biggest first, from one queue: a worker the OS sets
    aside for a while leaves its share to the others instead of holding up the call."""
    pool = _workers() if parallel and len(chunks) > 1 else None
    if pool is None:
        for chunk in chunks:
            run(chunk)
        return
    queue = iter(sorted(chunks, key=lambda c: -c.scores))
    lock = threading.Lock()
    modes = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # per thread: take the caller's

    def work() -> None:
        with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
            while True:
                with lock:
                    chunk = next(queue, None)
                if chunk is None:
                    return
                run(chunk)

    for done in [pool.submit(work) for _ in range(pool._max_workers)]:
        done.result()
