"""`block_sparse`: attention restricted to a block layout (Sparse Transformer,
BigBird, Longformer, sliding window, ...), computed only on its active blocks.

Configured by pattern and parameters, e.g. ``block_sparse(pattern=sliding,window=256)``
or ``block_sparse(pattern=bigbird,window=128,n_global=1,n_random=2,seed=0)``.
Layouts are built per sequence length on first use (block 64 on the CPU, 128 on
CUDA unless `block` is given) and cached. Prefill (as many queries as keys) goes
through the CPU kernel on the CPU and the Triton kernel on CUDA (`backend=triton`
forces Triton, e.g. under TRITON_INTERPRET=1 on the CPU). With a KV cache, the
prefill runs the same kernel on the cache's filled prefix, and a decode step
attends only over the keys its row of the layout allows (`LayoutAttention`);
what the cache path cannot do sparsely runs dense and says so in the record's
`attention_path`.

It changes what the model computes; the drift workload measures by how much.
On a model with its own sliding window (Mistral, Phi-3) it is the one layout that
does not: ``block_sparse(pattern=sliding,window=W)`` with the model's W computes
exactly the model's token window (the oldest block of each row masked element by
element); any other layout there is refused, since it would change the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infermatrix.kernels.block_sparse_layout import (
    PATTERNS,
    BlockLayout,
    default_block_size,
    make_layout,
    pattern_params,
    token_window,
    window_for_density,
)
from infermatrix.model import Transformer, causal_mask, last_visible_key
from infermatrix.variants.base import ANY_MODEL, TRITON_KERNELS, Variant, note_path, register_variant, with_attention
from infermatrix.variants.sdpa import sdpa_attention

# variant fields that are layout parameters (None: not given)
LAYOUT_FIELDS = ("window", "stride", "summary", "n_global", "n_random", "seed", "global_tokens")
BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class LayoutConfig(Variant):
    """Fields shared by `block_sparse` and `flex`: the pattern and its parameters."""

    pattern: str = "causal"
    block: int = 0  # block size in tokens; 0: 64 on the CPU, 128 on CUDA
    window: int | None = None  # tokens, a multiple of block (sliding, bigbird, longformer)
    stride: int | None = None  # tokens, a multiple of block (strided, fixed)
    summary: int | None = None  # fixed: summary tokens at the end of each stride
    n_global: int | None = None  # bigbird: leading global blocks
    n_random: int | None = None  # bigbird: random key blocks per query block
    seed: int | None = None  # bigbird: seed of the random blocks
    global_tokens: str | None = None  # longformer: global token positions, ';'-separated, e.g. 0;512
    # sliding: instead of a window, the share of block pairs to compute; the window is
    # chosen per sequence length (a density sweep across lengths)
    density: float | None = None

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {self.pattern!r}; valid: {', '.join(PATTERNS)}")
        if self.density is not None:
            if self.pattern != "sliding" or self.window is not None:
                raise ValueError("density picks a sliding window per sequence length: give it with "
                                 "pattern=sliding and no window")
            if not 0 < self.density <= 1:
                raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.block < 0:
            raise ValueError(f"block must be positive (or 0 for the device's default), got {self.block}")
        valid = [p for p in pattern_params(self.pattern) if p != "causal"]
        for name in LAYOUT_FIELDS:
            if getattr(self, name) is not None and name not in valid:
                raise ValueError(f"pattern {self.pattern!r} has no parameter {name!r}; its parameters: "
                                 f"{', '.join(valid) or 'none'}")
        # build a small layout now, so bad sizes fail when the spec is parsed, not mid-run
        self.check_device(torch.device("cpu"))

    def check_device(self, device: torch.device) -> None:
        """Build a small layout with the block size used on `device`: sizes that do not
        divide it (a window of 64 with CUDA's default block of 128) fail here."""
        block = self.block_for(device)
        probe = 4 * max([block] + [v for v in (self.window, self.stride, self.summary) if isinstance(v, int)])
        last_global = max(self.layout_params().get("global_tokens", [0]), default=0)
        probe = max(probe, (last_global // block + 1) * block)  # long enough to hold every global token
        try:
            self.build(probe, causal=True, block=block)
        except ValueError as exc:
            if self.block or device.type == "cpu":
                raise
            raise ValueError(f"{exc} (block_size is {block}, the default on {device.type}; give block=... "
                             f"to choose another)") from None

    def layout_params(self) -> dict:
        params = {name: getattr(self, name) for name in LAYOUT_FIELDS if getattr(self, name) is not None}
        if "global_tokens" in params:
            text = params["global_tokens"]
            try:
                params["global_tokens"] = [int(t) for t in str(text).replace(":", ";").split(";") if t.strip()]
            except ValueError:
                raise ValueError(f"global_tokens={text!r} must be token positions separated by ';', "
                                 f"e.g. 0;512") from None
        return params

    def build(self, seq_len: int, *, causal: bool, block: int, model_window: int | None = None) -> BlockLayout:
        """The layout for `seq_len` positions; on a model with its own sliding window
        (check_model: this config is `sliding` with that window) exactly the model's
        token window, its oldest block masked element by element."""
        if model_window is not None:
            return token_window(seq_len, block, model_window)
        params = self.layout_params()
        if self.density is not None:
            params["window"] = window_for_density(seq_len, block, self.density)
        if "causal" in pattern_params(self.pattern):  # the `causal` pattern is causal by definition
            params["causal"] = causal
        return make_layout(self.pattern, seq_len, block, **params)

    def block_for(self, device: torch.device) -> int:
        return self.block or default_block_size(device)

    def check_model(self, config) -> None:
        super().check_model(config)
        window = getattr(config, "sliding_window", None)  # encoders have none
        if window is not None and (self.pattern != "sliding" or self.window != window):
            raise ValueError(f"the model has its own sliding window of {window} tokens; {self.spec()} would "
                             f"attend over other keys and change the model: use {self.name}(pattern=sliding,"
                             f"window={window}), exactly the model's window (its block size must divide the window; "
                             "where none does, sdpa runs the model's window exactly through its mask)")

    def report_metrics(self, case) -> dict:
        """The layout's density, the keys its queries read, and a small picture of it, at
        the case's shape."""
        keys = case.kv_len or case.prompt_len
        layout = self.build(keys, causal=case.causal, block=self.block_for(torch.device(case.device)))
        rows = torch.arange(keys - case.prompt_len, keys) // layout.block_size  # the queries are the last rows
        active = layout.block_mask()[:, rows]  # (Hl, Tq, nk): the key blocks each query row reads
        # the share of the queries' block pairs computed, and the keys any of them reads (a
        # decode step streams only its row's blocks: the roofline's bytes)
        density = layout.density if keys == case.prompt_len else float(active.float().mean())
        keys_read = min(keys, int(active.any(1).sum(-1).max()) * layout.block_size)
        metrics = {"attention_density": density, "attention_keys_read": keys_read, "attention_layout": layout.grid()}
        if self.density is not None:  # the window the density chose at this length
            metrics["layout_window"] = window_for_density(keys, layout.block_size, self.density)
        return metrics


def padding_lengths(mask: torch.Tensor) -> list[int]:
    """A right-padding mask (B, 1, Tq, Tk), True = attend, every query row seeing the
    same first keys of its sequence -> each sequence's length. Other masks are refused."""
    keys = mask[:, 0, 0]  # (B, Tk): what the first query row sees
    lengths = keys.sum(-1)  # (B,)
    prefix = torch.arange(keys.shape[-1], device=mask.device) < lengths[:, None]  # (B, Tk)
    if not (bool((keys == prefix).all()) and bool((mask[:, 0] == keys[:, None, :]).all())):
        raise ValueError("block_sparse takes a non-causal mask only as right padding (each row the first keys of "
                         "its sequence); use sdpa or reference for other masks")
    return lengths.tolist()


class LayoutAttention:
    """An attention callable over a config's layouts, built per (length, causal,
    device) and cached. Subclasses give `kernel` (as many queries as keys) and
    `kernel_path` (its name in records); the KV-cache paths are shared:

    * a prefill from position 0 into a longer cache buffer: the kernel on the filled
      prefix, with the buffer-length layout's prefix;
    * a decode step (one query at position p): SDPA over only the keys p's row of the
      layout allows, a slice of the cache when they are one run (sliding windows),
      else gathered (`block_sparse_gather`);
    * anything else (left padding, a prefill not from 0, per-head layouts): the
      layout's rows as a boolean mask over the whole buffer, through SDPA, recorded as
      `dense_masked`, since it computes every key.

    An encoder's call (not causal, as many queries as keys, a right-padding mask) runs
    each sequence through the kernel on its own length, with that prefix of the
    padded length's non-causal layout: the layout's pairs among real tokens, no pad
    key, nothing dense; pad query rows are left zero (nobody reads them).
    """

    sparse_decode = True  # a decode step attends over its row's keys only (gathered)

    def __init__(self, config: LayoutConfig, model_window: int | None = None):
        self.config = config
        self.model_window = model_window  # the model's own sliding window: the layout is exactly it
        self._layouts: dict[tuple, BlockLayout] = {}
        # the model passes one mask to every layer of a forward: its plan is made once
        self._plan_src: tuple | None = None
        self._plan: tuple | None = None
        self._lengths_src: torch.Tensor | None = None  # the last padding mask, and its sequences' lengths
        self._lengths: list[int] = []

    def layout(self, seq_len: int, causal: bool, device: torch.device) -> BlockLayout:
        key = (seq_len, causal, device.type)
        if key not in self._layouts:
            self._layouts[key] = self.config.build(seq_len, causal=causal, block=self.config.block_for(device),
                                                   model_window=self.model_window)
        return self._layouts[key]

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        raise NotImplementedError

    def kernel_path(self, device: torch.device) -> str:
        raise NotImplementedError

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and q.shape[2] == k.shape[2]:
            note_path("attention", self.kernel_path(q.device))
            return self.kernel(q, k, v, self.layout(q.shape[2], causal, q.device))
        if not causal and mask is not None and q.shape[2] == k.shape[2]:
            return self.padded(q, k, v, mask)
        return self.cached(q, k, v, causal, mask)

    def padded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Non-causal attention over right-padded sequences (an encoder's batch): each
        sequence through the kernel on its real length."""
        layout = self.layout(q.shape[2], False, q.device)
        if layout.causal:
            raise ValueError(f"block_sparse(pattern={self.config.pattern}) is causal by definition; an encoder "
                             "attends both ways: choose sliding, strided, fixed, bigbird or longformer")
        if self._lengths_src is not mask:  # one read of the device per forward: every layer gets this mask
            self._lengths_src, self._lengths = mask, padding_lengths(mask)
        out = torch.zeros_like(q)  # (B, H, T, D): pad rows stay zero
        note_path("attention", self.kernel_path(q.device))
        for b, n in enumerate(self._lengths):
            rows = (slice(b, b + 1), slice(None), slice(0, n))
            out[rows] = self.kernel(q[rows], k[rows], v[rows], layout.prefix(n))  # (1, H, n, D)
        return out

    def cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Queries against a KV cache's buffer (a mask, or fewer queries than keys)."""
        shape = (q.shape[2], k.shape[2], causal, q.device)
        # hold the mask itself, not its id, which the next forward's mask could reuse
        if self._plan_src is None or self._plan_src[0] != shape or self._plan_src[1] is not mask:
            self._plan_src, self._plan = (shape, mask), self._make_plan(q, k, causal, mask)
        kind, arg = self._plan
        if kind == "prefill":
            n = q.shape[2]
            note_path("attention", self.kernel_path(q.device))
            return self.kernel(q, k[:, :, :n], v[:, :, :n], arg)
        if kind == "decode":
            note_path("attention", "block_sparse_gather")
            k, v = (t[:, :, arg] for t in (k, v))  # (B, Hkv, n, D): a slice, or a gather of the active keys
            return sdpa_attention(q, k, v, causal=False)
        note_path("attention", "dense_masked")
        return sdpa_attention(q, k, v, causal=False, mask=arg)

    def _make_plan(self, q: torch.Tensor, k: torch.Tensor, causal: bool, mask: torch.Tensor | None) -> tuple:
        n_q, n_keys = q.shape[2], k.shape[2]
        layout = self.layout(n_keys, causal, q.device)
        window = self.model_window
        if mask is None:  # the last n_q positions, causal
            q_pos = torch.arange(n_keys - n_q, n_keys, device=q.device)[None]  # (1, Tq)
            base = causal_mask(n_q, n_keys, q.device, window) if causal else torch.ones(
                n_q, n_keys, dtype=torch.bool, device=q.device)
            plain = causal
        else:
            q_pos = last_visible_key(mask)  # (B|1, Tq)
            base = mask  # (B|1, 1, Tq, Tk)
            # every row sees exactly keys 0..its position (within the model's window; no
            # padding), all rows in step
            seen = q_pos + 1 if window is None else (q_pos + 1).clamp(max=window)
            plain = causal and ((mask[:, 0].sum(-1) == seen).all() & (q_pos == q_pos[:1]).all())
        if layout.heads == 1:
            # one read of the device per forward: whether the mask is plain, and the positions
            plain, *pos = torch.cat([torch.as_tensor(plain, device=q.device).view(1).long(), q_pos[0]]).tolist()
            if plain and n_q == 1 and self.sparse_decode:
                keys = layout.row_keys(pos[0])  # on the CPU, where the layout lives
                first, last = int(keys[0]), int(keys[-1])
                run = last - first + 1 == len(keys)  # one run of keys (a sliding window): a slice, no copy
                return "decode", slice(first, last + 1) if run else keys.to(q.device)
            if plain and pos == list(range(n_q)):
                return "prefill", layout.prefix(n_q)
        allowed = layout.rows_mask(q_pos).permute(1, 0, 2, 3)  # (B|1, Hl, Tq, Tk)
        return "dense", allowed & base


class BlockSparseAttention(LayoutAttention):
    def __init__(self, config: "BlockSparse", model_window: int | None = None):
        super().__init__(config, model_window)
        self.backend = config.backend

    def _triton(self, device: torch.device) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and device.type == "cuda")

    def kernel_path(self, device: torch.device) -> str:
        return "block_sparse_triton" if self._triton(device) else "block_sparse_cpu"

    def kernel(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        if self._triton(q.device):
            # imported on first use: TRITON_INTERPRET is read when the kernels are defined
            from infermatrix.kernels.block_sparse_triton import block_sparse_attention_triton

            return block_sparse_attention_triton(q, k, v, layout)
        from infermatrix.kernels.block_sparse_cpu import block_sparse_attention

        return block_sparse_attention(q, k, v, layout)


@register_variant("block_sparse")
@dataclass(frozen=True)
class BlockSparse(LayoutConfig):
    axis = "attention"
    model_kinds = ANY_MODEL  # non-causal layouts; a padded batch runs each sequence on its own length
    description = ("block-sparse attention on a layout (pattern=causal|sliding|strided|fixed|bigbird|longformer): "
                   "only active blocks computed; CPU kernel, Triton on CUDA")
    backend: str = "auto"  # auto: the CPU kernel on the CPU, Triton on CUDA; torch | triton to force one

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        super().__post_init__()

    def requirements(self) -> frozenset[str]:
        return self.requires | (TRITON_KERNELS if self.backend == "triton" else frozenset())

    def check_model(self, config) -> None:
        super().check_model(config)
        if config.kind == "encoder" and self.pattern == "causal":
            raise ValueError("block_sparse(pattern=causal) is causal attention; an encoder attends both ways: "
                             "choose pattern=sliding, strided, fixed, bigbird or longformer")

    def apply(self, model: Transformer) -> Transformer:
        # apply_variants has run check_model; the bare seam of the attention workload has no config
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        return with_attention(model, BlockSparseAttention(self, window))

