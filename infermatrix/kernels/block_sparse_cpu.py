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

Pure functions on tensors; nothing here knows about models or variants.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from infermatrix.kernels.block_sparse_layout import BlockLayout

# scores per task (floats): 1 MiB of fp32. Measured on a 2-core EPYC: 4x smaller tasks are
# ~25% slower (per-call overhead), 4x bigger ones no faster.
CHUNK_SCORES = 1 << 18


@dataclass(frozen=True)
class _Group:
    rows: torch.Tensor  # (G,) query blocks, ascending
    indices: torch.Tensor  # (G * count,) their active key blocks, row after row
    count: int
    diag_last: bool  # every row's last block is its diagonal (causal mask inside it)
    ragged_last: bool  # some row holds the short last block (keys past seq_len masked)
    row_start: int | None  # rows are start, start+1, ...: sliced, not gathered
    run_step: int | None  # each row's blocks are one run a_r .. a_r+count-1 with a_r = a_0 + r*step:
    # K/V of a chunk of rows are one strided view of the keys, never gathered
    merge: int = 1  # consecutive query blocks per SDPA row tile (a band: their keys' union, masked)


# Merging G query blocks of a sliding band into one tile computes G-1 extra key blocks per
# count+G-1; SDPA's CPU kernel runs ~25% faster per score with >= 256-row query tiles than with
# 64, so merge while the waste stays under this share.
MERGE_WASTE = 0.1
MERGES = (12, 8, 4)  # 128-row tiles run no faster than 64-row ones


def _plan(layout: BlockLayout, head: int) -> list[_Group]:
    """The schedule for one head of the layout (cached on the layout)."""
    key = ("cpu", head)
    if key in layout.plans:
        return layout.plans[key]
    counts = layout.kv_num_blocks[head].long()
    indices = layout.kv_indices[head].long()
    n = layout.n_blocks
    rows_all = torch.arange(n)
    last = indices.gather(1, (counts - 1)[:, None])[:, 0]  # each row's last (largest) active block
    diag = (last == rows_all) & layout.causal
    ragged = layout.seq_len % layout.block_size != 0
    groups = []
    for count in counts.unique().tolist():
        for is_diag in (True, False):
            rows = rows_all[(counts == count) & (diag == is_diag)]
            if not len(rows):
                continue
            idx = indices[rows, :count]
            contiguous = bool((rows[1:] - rows[:-1] == 1).all())
            starts = idx[:, 0]
            runs = bool((idx == starts[:, None] + torch.arange(count)).all())
            steps = (starts[1:] - starts[:-1]).unique()
            step = int(steps[0]) if len(steps) == 1 else (0 if len(rows) == 1 else None)
            group = _Group(rows, idx.reshape(-1).contiguous(), count, is_diag,
                           ragged and bool((idx == n - 1).any()), int(rows[0]) if contiguous else None,
                           step if runs and contiguous and step is not None and step >= 0 else None)
            merge = next((m for m in MERGES if len(rows) >= m and (m - 1) / (count + m - 1) <= MERGE_WASTE
                          and m * layout.block_size <= 1024), 1)
            if layout.window is not None:  # a token window masks per row: one tile per query block
                merge = 1
            if group.run_step == 1 and not group.ragged_last and merge > 1:
                cut = len(rows) // merge * merge  # whole tiles of `merge` blocks, then the rest alone
                groups.append(dataclasses.replace(group, rows=rows[:cut], indices=idx[:cut].reshape(-1).contiguous(),
                                                  merge=merge))
                if cut < len(rows):
                    groups.append(dataclasses.replace(group, rows=rows[cut:], row_start=int(rows[cut]),
                                                      indices=idx[cut:].reshape(-1).contiguous()))
            else:
                groups.append(group)
    layout.plans[key] = groups
    return groups


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
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    bs, n = layout.block_size, layout.n_blocks
    padded = n * bs
    if padded != seq:  # a short last block: pad with zeros, the padded keys are masked below
        pad = (0, 0, 0, padded - seq)
        q, k, v = (torch.nn.functional.pad(t, pad) for t in (q, k, v))
    bh = batch * kv_heads
    # the group's query heads stacked as rows of one tile per (KV head, query block)
    qr = q.reshape(bh, group, n, bs, dim).transpose(1, 2)  # (BH, n, group, bs, D)
    qr = qr.reshape(bh, n, group * bs, dim)  # (BH, n, R, D), R = group * bs
    kb = k.reshape(bh, n, bs, dim).contiguous()  # (BH, n, bs, D)
    vb = v.reshape(bh, n, bs, dim).contiguous()
    out = torch.empty(bh, n, group * bs, dim, dtype=q.dtype, device=q.device)  # (BH, n, R, D)
    rows_per_tile = group * bs
    # within the diagonal block, tile row r (query offset r % bs) sees key offsets <= r % bs
    above = (torch.arange(bs)[None, :] > (torch.arange(rows_per_tile) % bs)[:, None]).to(q.device)  # (R, bs)
    # one additive mask, 0 or -inf above the diagonal inside the last key block; a group
    # with c*bs keys takes a view of its last c*bs columns
    diag = torch.zeros(rows_per_tile, n * bs, dtype=q.dtype, device=q.device)
    diag[:, -bs:].masked_fill_(above, float("-inf"))

    bands: dict[tuple, torch.Tensor] = {}

    def band(g: _Group) -> torch.Tensor:
        """(G*R, (count+G-1)*bs) additive mask of a merged tile: query block i of the tile
        sees key blocks i .. i+count-1 of the union (causal inside the last one)."""
        key = (g.merge, g.count, g.diag_last)
        if key not in bands:
            t = torch.arange(g.merge * rows_per_tile, device=q.device)
            col = torch.arange((g.count + g.merge - 1) * bs, device=q.device)
            qb, kb_ = (t // rows_per_tile)[:, None], (col // bs)[None, :]
            seen = (kb_ >= qb) & (kb_ <= qb + g.count - 1)
            if g.diag_last:
                seen &= (kb_ < qb + g.count - 1) | ((col % bs)[None, :] <= ((t % rows_per_tile) % bs)[:, None])
            bands[key] = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
        return bands[key]

    def run_merged(g: _Group, c0: int, m: int, h0: int, h1: int) -> None:
        """Tiles c0 .. c0+m-1 of g.merge query blocks each, of rows h0:h1."""
        G, keys = g.merge, (g.count + g.merge - 1) * bs
        r0 = g.row_start + c0 * G
        qg = qr[h0:h1, r0:r0 + m * G].reshape(h1 - h0, m, G * rows_per_tile, dim)  # a view
        view = dict(size=(h1 - h0, m, keys, dim), stride=(n * bs * dim, G * bs * dim, dim, 1),
                    storage_offset=kb.storage_offset() + (h0 * n + int(g.indices[c0 * G * g.count])) * bs * dim)
        o = F.scaled_dot_product_attention(qg, kb.as_strided(**view), vb.as_strided(**view), attn_mask=band(g),
                                           scale=scale)  # (h, m, G*R, D)
        out[h0:h1, r0:r0 + m * G].view(h1 - h0, m, G * rows_per_tile, dim).copy_(o)

    def run(g: _Group, c0: int, m: int, h0: int, h1: int) -> None:
        """Query blocks g.rows[c0:c0+m] of (batch x KV head) rows h0:h1.

        The softmax-weighted sum over the gathered keys is PyTorch's fused CPU SDPA
        (flash) kernel, which takes strided views: a run group's K/V are one
        overlapping view of the key blocks, never copied."""
        if g.merge > 1:
            return run_merged(g, c0, m, h0, h1)
        keys = g.count * bs
        rows = g.rows[c0:c0 + m].to(q.device)
        if g.row_start is not None:
            r0 = g.row_start + c0
            qg = qr[h0:h1, r0:r0 + m]  # (h, m, R, D), a view
        else:
            qg = qr[h0:h1].index_select(1, rows)
        if g.run_step is not None:  # row i's blocks start run_step blocks after row i-1's
            first = int(g.indices[c0 * g.count])
            view = dict(size=(h1 - h0, m, keys, dim), stride=(n * bs * dim, g.run_step * bs * dim, dim, 1),
                        storage_offset=kb.storage_offset() + (h0 * n + first) * bs * dim)
            kg, vg = kb.as_strided(**view), vb.as_strided(**view)  # (h, m, c*bs, D)
        else:
            flat = g.indices[c0 * g.count:(c0 + m) * g.count].to(q.device)
            kg = kb[h0:h1].index_select(1, flat).view(h1 - h0, m, keys, dim)  # (h, m, c*bs, D)
            vg = vb[h0:h1].index_select(1, flat).view(h1 - h0, m, keys, dim)
        mask = diag[:, n * bs - keys:] if g.diag_last else None  # (R, keys)
        if g.ragged_last or layout.window is not None:
            flat = g.indices[c0 * g.count:(c0 + m) * g.count].to(q.device)
            kpos = (flat.view(m, g.count, 1) * bs + torch.arange(bs, device=q.device)).view(m, 1, keys)
            hidden = kpos >= seq  # (m, 1, keys): keys past seq_len in the short last block
            if layout.window is not None:  # keys older than each query's token window
                qpos = rows.view(m, 1, 1) * bs + (torch.arange(rows_per_tile, device=q.device) % bs).view(1, -1, 1)
                hidden = hidden | (kpos <= qpos - layout.window)  # (m, R, keys)
            past = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
            mask = past if mask is None else mask + past  # (m, R, keys)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)  # (h, m, R, D)
        if g.row_start is not None:
            out[h0:h1, r0:r0 + m] = o
        else:
            out[h0:h1].index_copy_(1, rows, o)

    # tasks of about CHUNK_SCORES scores each, or one (head, query block) when that alone is more
    # (SDPA streams long key ranges itself): (cost, group, first row, rows, first head, end head)
    tasks = []
    for g in _plan(layout, head):
        units = len(g.rows) // g.merge  # row tiles
        tile = g.merge * rows_per_tile * (g.count + g.merge - 1) * bs  # scores of one (head, row tile)
        heads_per = max(1, min(bh, CHUNK_SCORES // tile))
        rows_per = max(1, min(units, CHUNK_SCORES // (tile * heads_per)))
        for c0 in range(0, units, rows_per):
            m = min(rows_per, units - c0)
            for h0 in range(0, bh, heads_per):
                h1 = min(bh, h0 + heads_per)
                tasks.append((tile * m * (h1 - h0), g, c0, m, h0, h1))
    pool = _workers() if q.device.type == "cpu" and len(tasks) > 1 else None
    if pool is None:
        for task in tasks:
            run(*task[1:])
    else:  # workers pull tasks, biggest first, from one queue: a worker the OS sets aside
        # for a while leaves its share to the others instead of holding up the call
        queue = iter(sorted(tasks, key=lambda t: -t[0]))
        lock = threading.Lock()
        modes = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # per thread: take the caller's

        def work() -> None:
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                while True:
                    with lock:
                        task = next(queue, None)
                    if task is None:
                        return
                    run(*task[1:])

        for done in [pool.submit(work) for _ in range(pool._max_workers)]:
            done.result()
    out = out.view(batch, kv_heads, n, group, bs, dim).transpose(2, 3)  # (B, Hkv, group, n, bs, D)
    return out.reshape(batch, heads, padded, dim)[:, :, :seq]  # (B, H, T, D)
