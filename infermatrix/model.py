"""The reference decoder-only Transformer (Llama-shaped), written for reading.

Attention is the textbook `softmax(Q Kᵀ / √d_k) V`, multi-head with grouped-query
KV heads. The model has exactly two seams for optimized variants:

* ``Transformer.attention``: an ``AttentionFn``, ``(q, k, v, *, causal, mask=None) -> out``
  with q (B, H, Tq, D) and k, v (B, Hkv, Tk, D). Without a mask the last Tq keys are
  the queries' own positions (a query shorter than the keys sits at the end). A
  boolean mask (B or 1, 1, Tq, Tk), True = attend, replaces the causal rule: a
  static KV cache passes one that hides unfilled slots and left padding, and a model
  with its own sliding window passes its window that way too (so any variant that
  honours the mask runs the model as it is).
* the ``nn.Linear`` layers, which a quantizing variant swaps for its own module.

Decoding uses ``input_pos`` and an optional cache object with
``update(layer, input_pos, k, v) -> (k, v)`` and ``mask(input_pos) -> mask | None``
(called once per forward, before any layer's update);
without a cache the model recomputes the whole prefix every step (the honest
naive baseline).
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from infermatrix.memory import storage_bytes


class AttentionFn(Protocol):
    """The attention seam: what ``Transformer.attention`` and ``Encoder.attention`` hold
    and an attention variant replaces (``variants.with_attention``).

    q (B, H, Tq, D); k, v (B, Hkv, Tk, D), H a multiple of Hkv (grouped-query: KV head j
    serves query heads j*H/Hkv .. (j+1)*H/Hkv - 1) -> (B, H, Tq, D): softmax(q kᵀ / √D) v.

    Without a mask the queries are the last Tq of the Tk key positions (a decode step's
    one query is the newest position); ``causal`` lets each see the keys up to its own
    position, else every key. A boolean ``mask`` (B or 1, 1, Tq, Tk), True = attend,
    replaces the causal rule when given: a KV cache's unfilled slots and left padding, a
    model's own sliding window, an encoder's padding. The decoder passes ``mask=``
    always (None when it has none), so an implementation must take the keyword.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                 mask: torch.Tensor | None = None) -> torch.Tensor: ...


# A block's modules under Hugging Face's names (Llama, Qwen2/3, Gemma and Phi-3 share
# them): the checkpoint loader reads by this table, the transformers peer writes by it
HF_BLOCK_NAMES = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
}
ROPE_TYPES = ("default", "linear", "llama3")
MLP_ACTS = ("silu", "gelu_tanh")


def require_positive(cfg, names: tuple[str, ...]) -> None:
    """A ValueError naming the first of a config's `names` fields that is not > 0."""
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be positive, got {getattr(cfg, name)}")


@dataclass(frozen=True)
class ModelConfig:
    kind: ClassVar[str] = "decoder"  # EncoderConfig.kind is "encoder": which workloads and variants apply

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head)
    hidden_dim: int = 11008  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # Decoder families as fields, not forks (defaults: Llama 2)
    attn_head_dim: int | None = None  # None: dim / n_heads; Qwen3 sets its own
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    o_bias: bool = False  # a bias on the attention's output projection (Llama's attention_bias, with qkv_bias)
    mlp_bias: bool = False  # biases on the MLP's gate, up and down projections (Llama's mlp_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and of k, before RoPE (Qwen3)
    rope_type: str = "default"  # default | linear | llama3 (Llama 3.1+ context extension)
    rope_factor: float = 1.0  # linear, llama3: how much longer the context is made
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max: int = 8192  # llama3: the context pre-training used
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma's (1 + w)
    mlp_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) | gelu_tanh (Gemma's GeGLU)
    embed_scale: bool = False  # token embeddings times sqrt(dim) (Gemma)
    # a model's own attention window (Mistral, Phi-3): a query at position t sees keys
    # t-W+1 .. t, W of them itself included (HF's `kv_idx > q_idx - W`); None: all earlier keys
    sliding_window: int | None = None
    rotary_dim: int | None = None  # RoPE on each head's first rotary_dim dims only (HF's partial_rotary_factor)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        require_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim",
                                "max_seq_len"))
        if self.attn_head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                             "or attn_head_dim given")
        if self.attn_head_dim is not None and self.attn_head_dim <= 0:
            raise ValueError(f"ModelConfig.attn_head_dim must be positive, got {self.attn_head_dim}")
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"ModelConfig.mlp_act {self.mlp_act!r} is not supported; valid: {', '.join(MLP_ACTS)}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig.rope_type {self.rope_type!r} is not supported; valid: {', '.join(ROPE_TYPES)}")
        if self.rope_factor <= 0 or (self.rope_type == "llama3" and
                                     self.rope_high_freq_factor <= self.rope_low_freq_factor):
            raise ValueError("ModelConfig rope scaling needs factor > 0 and, for llama3, "
                             "high_freq_factor > low_freq_factor")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive (or None: no window), "
                             f"got {self.sliding_window}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"ModelConfig.rotary_dim must be even and in 2..head_dim ({self.head_dim}), "
                             f"got {self.rotary_dim}")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """How many leading dims of each head RoPE rotates."""
        return self.rotary_dim or self.head_dim

    def num_params(self) -> int:
        """Exact parameter count, computed without building the model."""
        d, h, kv = self.dim, self.head_dim, self.n_kv_heads
        attn = d * (self.n_heads * h) + 2 * d * (kv * h) + (self.n_heads * h) * d
        attn += (self.n_heads * h + 2 * kv * h) * self.qkv_bias + d * self.o_bias + 2 * h * self.qk_norm
        mlp = 3 * d * self.hidden_dim + (2 * self.hidden_dim + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.n_layers * per_layer + embed + head + d

    def to_dict(self) -> dict:
        return asdict(self)


# Shape-only presets: real architectures' sizes, seeded random weights.
SHAPE_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172, max_seq_len=512
    ),
    "llama-1b": ModelConfig(  # Llama 3.2 1B shape
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
        rope_theta=500000.0, max_seq_len=8192, tie_embeddings=True,
    ),
    "llama-7b": ModelConfig(  # Llama 2 7B shape
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
        max_seq_len=4096,
    ),
    # One preset per decoder family, with each real model's shape and family fields
    "llama-3.2-1b": ModelConfig(  # llama-1b with Llama 3.2's rope scaling
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
        rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True, rope_type="llama3", rope_factor=32.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max=8192,
    ),
    "qwen2.5-0.5b": ModelConfig(  # Qwen2.5-0.5B: q/k/v biases, 14 heads over 2 KV heads
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, qkv_bias=True,
    ),
    "qwen3-0.6b": ModelConfig(  # Qwen3-0.6B: q/k norms, head_dim 128 (16 heads over dim 1024)
        vocab_size=151936, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, hidden_dim=3072,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960, tie_embeddings=True, attn_head_dim=128,
        qk_norm=True,
    ),
    "gemma-2b": ModelConfig(  # Gemma 2B: one KV head, head_dim 256, GeGLU, (1 + w) norms, scaled embeddings
        vocab_size=256000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, hidden_dim=16384, norm_eps=1e-6,
        max_seq_len=8192, tie_embeddings=True, attn_head_dim=256, norm_offset=1.0, mlp_act="gelu_tanh",
        embed_scale=True,
    ),
    "phi-3-mini": ModelConfig(  # Phi-3-mini-4k-instruct: 32 heads of 96, and HF applies its window of 2047
        vocab_size=32064, dim=3072, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=8192, norm_eps=1e-5,
        max_seq_len=4096, sliding_window=2047,
    ),
}


class KVCacheProtocol(Protocol):
    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mask(self, input_pos: torch.Tensor) -> torch.Tensor | None: ...


def causal_mask(q_len: int, k_len: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True where attention is allowed.

    Queries are the last q_len positions of the k_len keys (bottom-right aligned),
    so query i may see keys 0 .. i + (k_len - q_len); with a window W only the last
    W of those (ModelConfig.sliding_window).
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    if window is not None:
        return (k_pos <= q_pos) & (q_pos - k_pos < window)  # (Tq, Tk)
    return k_pos <= q_pos  # (Tq, Tk)


def last_visible_key(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask (B|1, 1, Tq, Tk), True = attend -> (B|1, Tq): the last key each
    query row may see (a KV cache's mask: the query's own position); Tk - 1 for a row
    that sees none."""
    rows = mask[:, 0].to(torch.uint8)  # (B|1, Tq, Tk)
    return mask.shape[-1] - 1 - rows.flip(-1).argmax(-1)  # argmax returns the first maximum


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_k) V, the reference. q (B, H, Tq, D); k, v (B, Hkv, Tk, D);
    mask (B or 1, 1, Tq, Tk), True = attend, replaces the causal rule when given."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = H // Hkv
    k = k.repeat_interleave(group, dim=1)  # (B, H, Tk, D): kv head j serves q heads j*group ..
    v = v.repeat_interleave(group, dim=1)  # (B, H, Tk, D)
    scores = (q / math.sqrt(D)) @ k.transpose(-2, -1)  # (B, H, Tq, Tk); scale q, the smaller tensor
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        scores = scores.masked_fill(~causal_mask(Tq, Tk, q.device), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # (B, H, Tq, Tk), fp32 softmax
    return probs @ v  # (B, H, Tq, D)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset  # offset: Gemma scales by (1 + weight), in fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # normalize in fp32 whatever the model dtype
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return xf.to(x.dtype) * self.weight


def rope_frequencies(cfg: ModelConfig, device) -> torch.Tensor:
    """RoPE's inverse frequencies (D/2,), scaled as cfg.rope_type says: `linear` divides
    them all by the factor; `llama3` divides the low frequencies (wavelengths past
    original_max / low_freq_factor) by it, keeps the high ones (shorter than
    original_max / high_freq_factor) and blends in between."""
    D = cfg.rope_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)  # (D/2,)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        scaled = torch.where(wavelen > cfg.rope_original_max / low, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (cfg.rope_original_max / wavelen - low) / (high - low)  # 0 at the low cut, 1 at the high
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= cfg.rope_original_max / high) & (wavelen <= cfg.rope_original_max / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float,
                inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, head_dim) for the half-split RoPE layout (Hugging Face's);
    `inv_freq` (D/2,): scaled frequencies (rope_frequencies), else theta's plain ones."""
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + R/2]); x (B, H, T, D), cos/sin (T, R). With R < D
    (partial rotary) the first R dims rotate, half-split among themselves, and the
    rest of each head passes unchanged, as Hugging Face's Phi-3 does."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :R], cos, sin), x[..., R:]], dim=-1)  # (B, H, T, D)
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, D)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        # Qwen3: each head of q and of k RMS-normalized over its head_dim, before RoPE
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.wqkv: nn.Module | None = None  # the `fused` variant's one GEMM for q, k and v, in that order

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
        input_pos: torch.Tensor,
        cache: KVCacheProtocol | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is None or self.q_norm is not None:
            if self.wqkv is None:
                q, k, v = self.wq(x), self.wk(x), self.wv(x)  # (B, T, H*D), (B, T, Hkv*D) x2
            else:
                q, k, v = self.wqkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)  # the same, one GEMM
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)  # over each head's D
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        else:  # the same, one GEMM, and RoPE applied to q's and k's heads in one pass
            qkv = self.wqkv(x).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H+2Hkv, T, D)
            qk, v = qkv.split([H + Hkv, Hkv], dim=1)  # (B, H+Hkv, T, D), (B, Hkv, T, D)
            q, k = apply_rope(qk, cos, sin).split([H, Hkv], dim=1)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None and hasattr(cache, "attend"):  # a paged cache: each sequence over its own blocks
            out = cache.attend(self.layer, q, k, v, attention)  # (B, H, T, D)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, input_pos, k, v)  # (B, Hkv, Tk, D), Tk >= T
            out = attention(q, k, v, causal=True, mask=mask)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(out)  # (B, T, C)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); GeGLU (Gemma) with gelu_tanh."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)  # down
        self.w13: nn.Module | None = None  # the `fused` variant's one GEMM for gate and up
        self.act = F.silu if cfg.mlp_act == "silu" else partial(F.gelu, approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            gate, up = self.w1(x), self.w3(x)  # (B, T, hidden) each
        else:
            gate, up = self.w13(x).chunk(2, dim=-1)  # the same, one GEMM
        return self.w2(self.act(gate) * up)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, attention, input_pos, cache, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, attention, input_pos, cache, mask)  # (B, T, C)
        return x + self.feed_forward(self.ffn_norm(x))  # (B, T, C)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.attention: AttentionFn = math_attention  # seam 1: swapped by attention variants
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.norm_offset)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # RoPE's cos and sin (max_seq_len, rope_dim) for every position, set by a variant (`fused`);
        # None: computed for each forward's positions. Not a buffer: no weight bytes.
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        # seam 2: a cache variant (kv_cache) sets how this model builds its KV cache,
        # factory(model, batch, max_len, pad) -> cache; None: every step recomputes
        self.cache_factory: Callable[..., KVCacheProtocol] | None = None
        # a paged cache variant sets how a served stream's block pool is built,
        # factory(model, num_blocks) -> PagedKVCache (infermatrix.variants.paged_kv_cache)
        self.paged_cache_factory: Callable[..., object] | None = None
        # a decoding variant (speculative decoding) sets how generation drafts and verifies
        # tokens: an infermatrix.speculative.Speculation; None: one token per forward
        self.speculation = None

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> KVCacheProtocol | None:
        """A KV cache for `batch` sequences of up to `max_len` positions (`pad` (B,):
        each row's left padding), or None when no cache variant was applied."""
        return None if self.cache_factory is None else self.cache_factory(self, batch, max_len, pad)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: KVCacheProtocol | None = None,
        exit_layer: int | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab). input_pos (T,) are the tokens' positions.
        exit_layer: run only the first exit_layer blocks before the final norm and head
        (an early-exit draft; the cache's later layers are left as they were).
        logits_at (N,): only these positions' logits, (B, N, vocab) (a served batch needs
        each sequence's last; the head over every prompt token would cost a fifth of a
        small model's FLOPs)."""
        B, T = tokens.shape
        if input_pos is None:
            if T > self.config.max_seq_len:
                raise ValueError(
                    f"{T} tokens exceed the model's context max_seq_len={self.config.max_seq_len}; "
                    "use a shorter prompt or fewer new tokens"
                )
            input_pos = torch.arange(T, device=tokens.device)  # (T,)
        elif input_pos.shape != (T,):  # shape check only: reading values would sync a GPU
            raise ValueError(f"input_pos has shape {tuple(input_pos.shape)}; expected ({T},), one position per token")
        cfg = self.config
        if self.rope_table is not None:  # a variant's tables for every position, looked up
            cos, sin = self.rope_table[0][input_pos], self.rope_table[1][input_pos]  # (T, D) each
        else:
            cos, sin = rope_tables(cfg.rope_dim, input_pos, cfg.rope_theta, rope_frequencies(cfg, input_pos.device))
        x = self.tok_embeddings(tokens)  # (B, T, C)
        if cfg.embed_scale:  # Gemma: sqrt(dim), rounded to the model's dtype as HF does
            x = x * torch.tensor(cfg.dim ** 0.5, dtype=x.dtype)
        mask = cache.mask(input_pos) if cache is not None else None  # (B|1, 1, T, Tk) or None
        if cache is None and cfg.sliding_window is not None and T > cfg.sliding_window:
            mask = causal_mask(T, T, tokens.device, cfg.sliding_window)[None, None]  # (1, 1, T, T)
        for block in self.layers[:exit_layer]:
            x = block(x, cos, sin, self.attention, input_pos, cache, mask)  # (B, T, C)
        if logits_at is not None:
            x = x[:, logits_at]  # (B, N, C)
        return self.output(self.norm(x))  # (B, T|N, vocab)

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct parameter and buffer storage (tied weights counted once)."""
        return storage_bytes(self)

