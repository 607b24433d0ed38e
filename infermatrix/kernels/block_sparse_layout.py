"""Block-sparse attention layouts: which key blocks each query block attends to.

A layout cuts a sequence of `seq_len` positions into blocks of `block_size`
(the last one may be short) and stores, per query block, the count of active
key blocks and their indices in ascending order: the compressed row form of
FlexAttention's BlockMask (`kv_num_blocks`, `kv_indices`), int32. It may differ
per head (a leading head dim of 1 means one layout for all heads).

With `causal` set, attention inside a block is causal too: in the diagonal
block query i sees keys <= i, and blocks above the diagonal are never active.
Every other active block is attended in full, except with a token `window` W
(`token_window`, a model's own sliding window): then query q sees only keys
k > q - W, which masks the oldest active block of a row element by element.

Builders: `causal`, `sliding_window`, `token_window`, `strided` (Sparse Transformer "strided"),
`fixed` (Sparse Transformer "fixed"), `bigbird` (window + global + seeded
random), `longformer` (window + global tokens), `from_block_fn` (any predicate
evaluated per block), and `make_layout(pattern, seq_len, block_size, **params)`
by name. A query block with no key block is an error here, never a NaN later.

Pure torch; nothing here knows about models or variants.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

DEFAULT_BLOCK_CPU = 64
DEFAULT_BLOCK_GPU = 128


def default_block_size(device: torch.device | str) -> int:
    return DEFAULT_BLOCK_GPU if torch.device(device).type == "cuda" else DEFAULT_BLOCK_CPU


@dataclass(frozen=True, eq=False)
class BlockLayout:
    seq_len: int
    block_size: int
    kv_num_blocks: torch.Tensor  # (Hl, n_q_blocks) int32, Hl = 1 or heads
    kv_indices: torch.Tensor  # (Hl, n_q_blocks, max_count) int32, ascending; past the count: padding
    causal: bool  # element-level causal masking inside diagonal blocks
    pattern: str = "custom"  # how it was built, for reports
    window: int | None = None  # causal only: query q sees keys k > q - window (element-level), else no limit
    plans: dict = field(default_factory=dict, repr=False)  # built once per layout: schedules, prefixes

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    @property
    def heads(self) -> int:
        return self.kv_num_blocks.shape[0]

    @property
    def density(self) -> float:
        """Active (query block, key block) pairs over all of them, averaged over heads."""
        return float(self.kv_num_blocks.sum()) / (self.heads * self.n_blocks ** 2)

    def block_mask(self) -> torch.Tensor:
        """(Hl, nq, nk) bool: True where the key block is active for the query block."""
        hl, nq, width = self.kv_indices.shape
        valid = torch.arange(width) < self.kv_num_blocks[..., None].long()  # (Hl, nq, width)
        dense = torch.zeros(hl, nq, self.n_blocks + 1, dtype=torch.bool)
        idx = torch.where(valid, self.kv_indices.long(), self.n_blocks)  # padding lands in a spare column
        dense.scatter_(2, idx, True)
        return dense[..., : self.n_blocks]

    def dense_mask(self) -> torch.Tensor:
        """(Hl, seq_len, seq_len) bool, True = attend: the exact element-level mask."""
        blocks = self.block_mask()
        dense = blocks.repeat_interleave(self.block_size, 1).repeat_interleave(self.block_size, 2)
        dense = dense[:, : self.seq_len, : self.seq_len]
        if self.causal:
            dense = dense & torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).tril()
        if self.window is not None:
            dense = dense & torch.ones(self.seq_len, self.seq_len, dtype=torch.bool).triu(1 - self.window)
        return dense

    def rows_mask(self, q_pos: torch.Tensor) -> torch.Tensor:
        """The element mask's rows at query positions q_pos (any shape S, integers in
        0..seq_len-1) -> (Hl, *S, seq_len) bool. For decoding: a query at position p
        sees exactly the keys its row of the layout allows."""
        blocks = self.block_mask().to(q_pos.device)  # (Hl, nq, nk)
        q_pos = q_pos.long()
        rows = blocks[:, q_pos // self.block_size]  # (Hl, *S, nk)
        rows = rows.repeat_interleave(self.block_size, -1)[..., : self.seq_len]  # (Hl, *S, seq_len)
        if self.causal:
            rows = rows & (torch.arange(self.seq_len, device=q_pos.device) <= q_pos[..., None])
        if self.window is not None:
            rows = rows & (torch.arange(self.seq_len, device=q_pos.device) > q_pos[..., None] - self.window)
        return rows

    def prefix(self, seq_len: int) -> "BlockLayout":
        """This layout restricted to its first `seq_len` positions (a KV cache's prefill
        into a longer buffer): the same rows and columns there, whatever the pattern."""
        if seq_len == self.seq_len:
            return self
        if not 0 < seq_len < self.seq_len:
            raise ValueError(f"prefix of {seq_len} positions of a layout of {self.seq_len}")
        key = ("prefix", seq_len)
        if key not in self.plans:
            m = math.ceil(seq_len / self.block_size)
            blocks = self.block_mask()[:, :m, :m]  # (Hl, m, m)
            self.plans[key] = from_block_mask(blocks if self.heads > 1 else blocks[0], seq_len, self.block_size,
                                              causal=self.causal, pattern=self.pattern, window=self.window)
        return self.plans[key]

    def row_keys(self, pos: int) -> torch.Tensor:
        """The key positions a query at `pos` may see, ascending (n,) int64: its row's
        active blocks, and with causal only keys <= pos. One layout row for all heads."""
        if self.heads != 1:
            raise ValueError(f"row_keys takes a layout shared by all heads; this one has {self.heads} per-head rows")
        row = pos // self.block_size
        blocks = self.kv_indices[0, row, : int(self.kv_num_blocks[0, row])].long()  # (c,)
        keys = (blocks[:, None] * self.block_size + torch.arange(self.block_size)).flatten()  # (c * bs,)
        end = pos + 1 if self.causal else self.seq_len
        keys = keys[keys < end]
        return keys if self.window is None else keys[keys > pos - self.window]

    def check_seq_len(self, seq_len: int, what: str = "input") -> None:
        if seq_len != self.seq_len:
            raise ValueError(f"block layout seq_len={self.seq_len} does not match the {what}'s sequence length "
                             f"{seq_len}; build the layout for {seq_len} positions")

    def check_heads(self, heads: int) -> None:
        if self.heads not in (1, heads):
            raise ValueError(f"block layout has {self.heads} per-head rows but the input has {heads} heads; "
                             f"build it with heads=1 or heads={heads}")

    def grid(self, cells: int = 32) -> str:
        """A small picture: up to cells x cells, each a hex digit 0..f of the share of
        active blocks it covers (head 0), rows joined by '/'. For reports."""
        blocks = self.block_mask()[0].float()  # (nq, nk)
        n = blocks.shape[0]
        side = min(cells, n)
        edges = [round(i * n / side) for i in range(side + 1)]
        rows = []
        for i in range(side):
            row = blocks[edges[i]:edges[i + 1]]
            rows.append("".join("%x" % round(15 * float(row[:, edges[j]:edges[j + 1]].mean()))
                                for j in range(side)))
        return "/".join(rows)

    def describe(self) -> str:
        return (f"{self.pattern}: seq {self.seq_len}, block {self.block_size}, {self.n_blocks}x{self.n_blocks} "
                f"blocks, density {self.density:.1%}{', causal' if self.causal else ''}"
                f"{f', window {self.window} tokens' if self.window is not None else ''}")


def from_block_mask(blocks: torch.Tensor, seq_len: int, block_size: int, *, causal: bool,
                    pattern: str = "custom", window: int | None = None) -> BlockLayout:
    """A (nq, nk) or (H, nq, nk) boolean block mask to the compressed layout.
    With causal, blocks above the diagonal are dropped (no key in them is visible);
    `window` (causal only): the element-level token window on top of the blocks."""
    _check_sizes(seq_len, block_size)
    if window is not None and (not causal or isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"block layout window={window!r}: a token window is a positive integer on a causal layout")
    n = math.ceil(seq_len / block_size)
    if blocks.dim() == 2:
        blocks = blocks[None]
    if blocks.dim() != 3 or blocks.shape[1:] != (n, n) or blocks.dtype != torch.bool:
        raise ValueError(f"block mask has shape {tuple(blocks.shape)} and dtype {blocks.dtype}; expected bool "
                         f"({n}, {n}) or (heads, {n}, {n}) for seq_len={seq_len}, block_size={block_size}")
    blocks = blocks.cpu()
    if causal:
        blocks = blocks & torch.ones(n, n, dtype=torch.bool).tril()
    counts = blocks.sum(-1)  # (H, nq)
    empty = (counts == 0).nonzero()
    if len(empty):
        h, qb = empty[0].tolist()
        raise ValueError(f"block layout {pattern!r}: query block {qb} (positions {qb * block_size}.."
                         f"{min((qb + 1) * block_size, seq_len) - 1}, head {h}) attends to no key block; "
                         f"{len(empty)} such row(s). Every query must see at least one key")
    counts, order = compress_blocks(blocks)
    return BlockLayout(seq_len, block_size, counts, order[..., :int(counts.max())].contiguous(), causal, pattern,
                       window)


def compress_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., nq, nk) bool -> per query block its count of active key blocks and their
    indices, ascending, then the inactive ones (a stable sort of (inactive, index)); int32."""
    counts = blocks.sum(-1).to(torch.int32)
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return counts.contiguous(), order.contiguous()


def _check_sizes(seq_len: int, block_size: int) -> None:
    for name, value in (("seq_len", seq_len), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"block layout {name} must be a positive integer, got {value!r}")


def _in_blocks(name: str, tokens: int, block_size: int, *, allow_zero: bool = False) -> int:
    """A length in tokens that must be a whole number of blocks -> blocks."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0 or (tokens == 0 and not allow_zero):
        raise ValueError(f"block layout {name} must be a positive integer number of tokens, got {tokens!r}")
    if tokens % block_size:
        raise ValueError(f"block layout {name}={tokens} is not a multiple of block_size={block_size}; "
                         f"use a multiple such as {max(1, round(tokens / block_size)) * block_size}")
    return tokens // block_size


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(n)[:, None]  # query block
    j = torch.arange(n)[None, :]  # key block
    return i, j


def _hash_uniform(i: torch.Tensor, j: torch.Tensor, seed: int) -> torch.Tensor:
    """Pseudo-random numbers in [0, 1) that depend only on (seed, i, j), not on the
    grid's size: a causal row's random blocks are the same whatever the sequence
    length, so a KV-cache decode sees the blocks a full recompute sees."""
    x = (i * 73856093 + j * 19349663 + seed * 83492791 + 12345) & 0xFFFFFFFF
    for _ in range(2):  # a 32-bit integer mixer (xor-shift-multiply), in int64 without overflow
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return x.double() / 2.0 ** 32


def causal(seq_len: int, block_size: int) -> BlockLayout:
    _check_sizes(seq_len, block_size)
    n = math.ceil(seq_len / block_size)
    return from_block_mask(torch.ones(n, n, dtype=torch.bool), seq_len, block_size, causal=True, pattern="causal")


def sliding_window(seq_len: int, block_size: int, window: int, causal: bool = True) -> BlockLayout:
    """Block-granular local attention: query block i sees the `window` tokens
    (window / block_size blocks) ending at its own block; without causal, that
    many blocks on each side as well."""
    _check_sizes(seq_len, block_size)
    w = _in_blocks("window", window, block_size)
    i, j = _grid(math.ceil(seq_len / block_size))
    near = (i - j < w) & (j - i < w)
    return from_block_mask(near, seq_len, block_size, causal=causal, pattern="sliding")


def window_for_density(seq_len: int, block_size: int, density: float) -> int:
    """The window (tokens, whole blocks) of the causal sliding layout of `seq_len`
    positions whose density is nearest `density`: a density sweep at any length."""
    n = math.ceil(seq_len / block_size)
    # w blocks: block i sees min(i + 1, w) blocks, so w(w+1)/2 + (n - w) w of n² pairs
    blocks = min(range(1, n + 1), key=lambda w: abs((w * (w + 1) / 2 + (n - w) * w) / n ** 2 - density))
    return blocks * block_size


def token_window(seq_len: int, block_size: int, window: int) -> BlockLayout:
    """Exactly a causal sliding window of `window` tokens (a model's own, Mistral's
    rule): query q sees keys q-window+1 .. q. Active: every key block holding such a
    key (one more than window / block_size when the window is a whole number of
    blocks); the oldest is masked element by element. Any window, any block size."""
    _check_sizes(seq_len, block_size)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise ValueError(f"block layout window must be a positive integer number of tokens, got {window!r}")
    reach = (window + block_size - 2) // block_size  # query block i sees key blocks i-reach .. i
    i, j = _grid(math.ceil(seq_len / block_size))
    return from_block_mask(i - j <= reach, seq_len, block_size, causal=True, pattern="sliding", window=window)


def strided(seq_len: int, block_size: int, stride: int, causal: bool = True) -> BlockLayout:
    """Sparse Transformer "strided" (Child et al. 2019), in blocks of l = stride tokens:
    the previous l positions, and every l-th position before that."""
    _check_sizes(seq_len, block_size)
    s = _in_blocks("stride", stride, block_size)
    i, j = _grid(math.ceil(seq_len / block_size))
    d = (i - j).abs()
    return from_block_mask((d < s) | (d % s == 0), seq_len, block_size, causal=causal, pattern="strided")


def fixed(seq_len: int, block_size: int, stride: int, summary: int = 0, causal: bool = True) -> BlockLayout:
    """Sparse Transformer "fixed": positions in the same chunk of `stride` tokens,
    and the last `summary` tokens (default one block) of every chunk."""
    _check_sizes(seq_len, block_size)
    s = _in_blocks("stride", stride, block_size)
    c = _in_blocks("summary", summary or block_size, block_size)
    if c > s:
        raise ValueError(f"block layout summary={summary} exceeds stride={stride}")
    i, j = _grid(math.ceil(seq_len / block_size))
    keep = (i // s == j // s) | (j % s >= s - c)
    return from_block_mask(keep, seq_len, block_size, causal=causal, pattern="fixed")


def bigbird(seq_len: int, block_size: int, window: int, n_global: int = 1, n_random: int = 1, seed: int = 0,
            causal: bool = True) -> BlockLayout:
    """BigBird: a sliding window of `window` tokens, the first `n_global` blocks
    global (they see and are seen by every block) and `n_random` random key blocks
    per query block, drawn by a hash of (seed, query block, key block)."""
    _check_sizes(seq_len, block_size)
    w = _in_blocks("window", window, block_size)
    for name, value in (("n_global", n_global), ("n_random", n_random), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"block layout {name} must be a non-negative integer, got {value!r}")
    n = math.ceil(seq_len / block_size)
    i, j = _grid(n)
    keep = ((i - j < w) & (j - i < w)) | (i < n_global) | (j < n_global)
    scores = _hash_uniform(i, j, seed)
    if causal:  # draw only among blocks a causal query can see
        scores = scores.masked_fill(j > i, -1.0)
    top = scores.topk(min(n_random, n), dim=-1)
    picked = torch.zeros(n, n, dtype=torch.bool).scatter_(1, top.indices, top.values >= 0)
    return from_block_mask(keep | picked, seq_len, block_size, causal=causal, pattern="bigbird")


def longformer(seq_len: int, block_size: int, window: int, global_tokens: tuple[int, ...] | list[int] = (0,),
               causal: bool = True) -> BlockLayout:
    """Longformer: a sliding window plus global tokens. A block holding a global
    token position sees every block and is seen by every block."""
    _check_sizes(seq_len, block_size)
    w = _in_blocks("window", window, block_size)
    glob = torch.tensor(sorted(set(int(t) for t in global_tokens)), dtype=torch.long)
    if len(glob) and (glob.min() < 0 or glob.max() >= seq_len):
        raise ValueError(f"block layout global_tokens {list(global_tokens)} must lie in 0..{seq_len - 1}")
    n = math.ceil(seq_len / block_size)
    i, j = _grid(n)
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[glob // block_size] = True
    keep = ((i - j < w) & (j - i < w)) | is_global[:, None] | is_global[None, :]
    return from_block_mask(keep, seq_len, block_size, causal=causal, pattern="longformer")


def from_block_fn(seq_len: int, block_size: int, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  causal: bool = False, heads: int = 1) -> BlockLayout:
    """Any predicate evaluated per block: fn(q_block, kv_block) -> bool tensor, called
    once on broadcast index tensors (nq, 1) and (1, nk); with heads > 1, as
    fn(head, q_block, kv_block) on (H, 1, 1), (1, nq, 1), (1, 1, nk)."""
    _check_sizes(seq_len, block_size)
    n = math.ceil(seq_len / block_size)
    i, j = _grid(n)
    out = fn(torch.arange(heads)[:, None, None], i[None], j[None]) if heads > 1 else fn(i, j)
    blocks = torch.as_tensor(out, dtype=torch.bool).expand(*((heads,) if heads > 1 else ()), n, n)
    return from_block_mask(blocks.contiguous(), seq_len, block_size, causal=causal, pattern="custom")


PATTERNS: dict[str, Callable[..., BlockLayout]] = {
    "causal": causal,
    "sliding": sliding_window,
    "strided": strided,
    "fixed": fixed,
    "bigbird": bigbird,
    "longformer": longformer,
}


def pattern_params(pattern: str) -> list[str]:
    """The parameters a named pattern takes (beyond seq_len and block_size)."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown block layout pattern {pattern!r}; valid: {', '.join(PATTERNS)}")
    return list(inspect.signature(PATTERNS[pattern]).parameters)[2:]


def make_layout(pattern: str, seq_len: int, block_size: int, **params) -> BlockLayout:
    """A named pattern; parameters it does not take are an error naming them."""
    valid = pattern_params(pattern)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"block layout pattern {pattern!r} has no parameter {unknown[0]!r}; "
                         f"its parameters: {', '.join(valid) or 'none'}")
    required = [p.name for p in inspect.signature(PATTERNS[pattern]).parameters.values()
                if p.default is inspect.Parameter.empty][2:]
    missing = [p for p in required if p not in params]
    if missing:
        raise ValueError(f"block layout pattern {pattern!r} needs {missing[0]!r}")
    return PATTERNS[pattern](seq_len, block_size, **params)
