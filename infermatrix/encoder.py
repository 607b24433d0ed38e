"""The reference bidirectional encoder (BERT, torch.nn.TransformerEncoder), written for
reading, the decoder's sibling in model.py.

Every token attends to every real token of its sequence (no causal rule): attention
goes through the same seam as the decoder's, ``Encoder.attention(q, k, v, *,
causal=False, mask)``, so attention variants apply unchanged. A batch of sequences of
different lengths is right-padded; ``attention_mask`` (B, T), True = a real token,
becomes the seam's boolean mask (B, 1, T, T) (an expanded view: every query row of a
sequence sees the same keys, its real tokens). Positions past a sequence's length
hold values nobody reads: compare and pool only real positions.

The ``nn.Linear`` layers are the second seam, as in the decoder; module names follow
the decoder's where the role is the same (``tok_embeddings``, ``layers``,
``attention.wq``.., ``feed_forward.w1``/``w2``, ``output`` for the masked-LM
decoder), so variants that swap them find them.

One block, post-norm (BERT, the 2017 Transformer) or pre-norm (``norm_first``):

    post:  x = LN(x + Attn(x));      x = LN(x + FFN(x))
    pre:   x = x + Attn(LN(x));      x = x + FFN(LN(x))

FFN(x) = w2(act(w1 x + b1)) + b2, act GELU (exact, erf) or ReLU. Every projection has
a bias.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from infermatrix.memory import storage_bytes
from infermatrix.model import AttentionFn, math_attention, require_positive

POSITIONS = ("learned", "sinusoidal")
ACTIVATION_FNS = {"gelu": F.gelu, "relu": F.relu}  # gelu: exact (erf), BERT's and torch's default
ACTIVATIONS = tuple(ACTIVATION_FNS)


@dataclass(frozen=True)
class EncoderConfig:
    kind: ClassVar[str] = "encoder"  # ModelConfig.kind is "decoder": which workloads and variants apply

    vocab_size: int = 30522
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    hidden_dim: int = 3072  # the feed-forward's inner size
    max_seq_len: int = 512  # positions the model has (a learned table's rows)
    norm_eps: float = 1e-12  # BERT's; nn.TransformerEncoderLayer's default is 1e-5
    norm_first: bool = False  # pre-norm; False: post-norm (BERT)
    positions: str = "learned"  # learned (a table, BERT) | sinusoidal (computed, no weights)
    activation: str = "gelu"  # gelu (exact, erf) | relu
    type_vocab_size: int = 2  # BERT's token-type (segment) embeddings; 0: none
    embed_norm: bool = True  # LayerNorm over the summed embeddings (BERT)
    final_norm: bool = False  # LayerNorm after the last block (pre-norm stacks)
    embed_scale: bool = False  # token embeddings times sqrt(dim) (the 2017 Transformer)
    mlm_head: bool = False  # masked-LM head: dense, act, LayerNorm, then the vocab projection
    tie_embeddings: bool = True  # the MLM head's vocab projection is the token embedding table
    pooler: bool = False  # BERT's pooler: tanh(dense(hidden of the first token))

    def __post_init__(self) -> None:
        require_positive(self, ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"))
        if self.dim % self.n_heads:
            raise ValueError(f"EncoderConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.positions not in POSITIONS:
            raise ValueError(f"EncoderConfig.positions {self.positions!r} is not supported; valid: "
                             f"{', '.join(POSITIONS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"EncoderConfig.activation {self.activation!r} is not supported; valid: "
                             f"{', '.join(ACTIVATIONS)}")
        if self.type_vocab_size < 0:
            raise ValueError(f"EncoderConfig.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.positions == "sinusoidal" and self.dim % 2:
            raise ValueError(f"EncoderConfig.dim ({self.dim}) must be even for sinusoidal positions")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:  # plain multi-head attention; read by shape code shared with the decoder
        return self.n_heads

    def num_params(self) -> int:
        """Exact parameter count, computed without building the model (tied tables once)."""
        c, f, v = self.dim, self.hidden_dim, self.vocab_size
        embed = v * c + (self.max_seq_len * c if self.positions == "learned" else 0) + self.type_vocab_size * c
        embed += 2 * c * self.embed_norm
        per_layer = 4 * (c * c + c) + (c * f + f) + (f * c + c) + 2 * 2 * c
        head = 0
        if self.mlm_head:
            head = c * c + c + 2 * c + v + (0 if self.tie_embeddings else v * c)
        pooler = (c * c + c) if self.pooler else 0
        return embed + self.n_layers * per_layer + 2 * c * self.final_norm + head + pooler

    def to_dict(self) -> dict:
        return asdict(self)


# Shape-only presets: seeded random weights.
ENCODER_PRESETS: dict[str, EncoderConfig] = {
    "tiny-encoder": EncoderConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=512,
                                  mlm_head=True),
    "bert-base": EncoderConfig(mlm_head=True),  # BERT-base (uncased) shape: 110M + the MLM head
}


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim, in fp32 whatever the dtype."""
    out = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return out.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


def sinusoidal_positions(n_positions: int, dim: int, device, dtype=torch.float32) -> torch.Tensor:
    """(T, C): PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(p / 10000^(2i/C))
    (Vaswani et al. 2017; PyTorch's tutorial table)."""
    pos = torch.arange(n_positions, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = pos * inv_freq[None, :]  # (T, C/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(n_positions, dim)  # sin, cos interleaved
    return table.to(dtype)


def padding_to_attention_mask(attention_mask: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(B, T) bool, True = a real token -> (B, 1, Tq, T): the seam's mask, every query
    row seeing its sequence's real keys (an expanded view, no copy)."""
    B, T = attention_mask.shape
    return attention_mask.bool()[:, None, None, :].expand(B, 1, n_queries, T)


class EncoderAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim)
        self.wk = nn.Linear(cfg.dim, cfg.dim)
        self.wv = nn.Linear(cfg.dim, cfg.dim)
        self.wo = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, attention: AttentionFn, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        H, D = self.n_heads, self.head_dim
        q = self.wq(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.wv(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        out = attention(q, k, v, causal=False, mask=mask)  # (B, H, T, D): softmax(QKᵀ/√D) V over real keys
        return self.wo(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class EncoderFeedForward(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim)  # down
        self.act = ACTIVATION_FNS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))  # (B, T, C)


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attention = EncoderAttention(cfg)
        self.attention_norm = LayerNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = EncoderFeedForward(cfg)
        self.ffn_norm = LayerNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, attention: AttentionFn, mask: torch.Tensor | None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attention(self.attention_norm(x), attention, mask)  # (B, T, C)
            return x + self.feed_forward(self.ffn_norm(x))  # (B, T, C)
        x = self.attention_norm(x + self.attention(x, attention, mask))  # (B, T, C)
        return self.ffn_norm(x + self.feed_forward(x))  # (B, T, C)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.attention: AttentionFn = math_attention  # seam 1: swapped by attention variants
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.positions == "learned" else None
        self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim) if cfg.type_vocab_size else None
        self.embed_norm = LayerNorm(cfg.dim, cfg.norm_eps) if cfg.embed_norm else None
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.dim, cfg.norm_eps) if cfg.final_norm else None
        if cfg.mlm_head:  # BERT's "transform" then the vocab projection (with its own bias)
            self.mlm_dense = nn.Linear(cfg.dim, cfg.dim)
            self.mlm_norm = LayerNorm(cfg.dim, cfg.norm_eps)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size)
            self.tie_weights()
        self.pooler = nn.Linear(cfg.dim, cfg.dim) if cfg.pooler else None

    def tie_weights(self) -> None:
        if self.config.mlm_head and self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def embed(self, tokens: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> (B, T, C): token + position (+ token-type) embeddings, then the norm."""
        cfg = self.config
        B, T = tokens.shape
        x = self.tok_embeddings(tokens)  # (B, T, C)
        if cfg.embed_scale:
            x = x * math.sqrt(cfg.dim)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings.weight[:T]  # (B, T, C) + (T, C)
        else:
            x = x + sinusoidal_positions(T, cfg.dim, tokens.device, x.dtype)  # (B, T, C) + (T, C)
        if self.type_embeddings is not None:
            if token_types is None:  # one segment: BERT's default token type 0
                x = x + self.type_embeddings.weight[0]  # (B, T, C) + (C,)
            else:
                x = x + self.type_embeddings(token_types)  # (B, T, C)
        return self.embed_norm(x) if self.embed_norm is not None else x

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T), attention_mask (B, T) bool (True = a real token; None: no
        padding) -> final hidden states (B, T, C)."""
        B, T = tokens.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens exceed the encoder's max_seq_len={self.config.max_seq_len}; "
                             "use shorter sequences")
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, T)}, "
                             "one flag per token (True = real)")
        mask = padding_to_attention_mask(attention_mask, T) if attention_mask is not None else None
        x = self.embed(tokens, token_types)  # (B, T, C)
        for block in self.layers:
            x = block(x, self.attention, mask)  # (B, T, C)
        return self.final_norm(x) if self.final_norm is not None else x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, T, C) -> masked-LM logits (B, T, vocab)."""
        if not self.config.mlm_head:
            raise ValueError("this encoder has no masked-LM head (EncoderConfig.mlm_head=False)")
        act = ACTIVATION_FNS[self.config.activation]
        return self.output(self.mlm_norm(act(self.mlm_dense(hidden))))  # (B, T, vocab)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: (B, T, C) -> tanh(dense(hidden of the first token)) (B, C)."""
        if self.pooler is None:
            raise ValueError("this encoder has no pooler (EncoderConfig.pooler=False)")
        return torch.tanh(self.pooler(hidden[:, 0]))  # (B, C)

    @property
    def weight_bytes(self) -> int:
        """Bytes of distinct parameter and buffer storage (tied weights counted once)."""
        return storage_bytes(self)
