"""Peers: what users deploy today, as rows of the same matrix (axis `peer`).

* `hf_transformers(attn=sdpa)`: Hugging Face's model class of the case's family
  (Llama, Mistral for a model's own window, Qwen2, Qwen3, Gemma, Phi-3 for partial
  rotary) built on the case's own weights (shared, not copied; Phi-3's fused
  projections are concatenated copies), with HF's `StaticCache` for decoding. The harness steps it with the same
  greedy loop and timers as our variants, so a row measures HF's forward and cache,
  not its `generate()` bookkeeping (which would only make it slower). Prefill,
  decode, generate and drift.
* `llama_cpp(threads=0)`: llama-cpp-python on the case's GGUF file itself, in the
  file's own quantization; batch 1 for timed rows.

A peer replaces the whole model: it takes no other variant.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from infermatrix.memory import storage_bytes
from infermatrix.model import HF_BLOCK_NAMES, Transformer
from infermatrix.variants.base import Variant, note_path, register_variant

HF_ATTENTION = ("sdpa", "eager")


def hf_state_dict(model: Transformer, fused: bool = False) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's names (the same tensors); `fused`: Phi-3's
    qkv_proj and gate_up_proj, concatenated (copies)."""
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight,
           "lm_head.weight": model.output.weight}
    for i, block in enumerate(model.layers):
        for name, tensor in block.named_parameters():
            module, kind = name.rsplit(".", 1)  # kind: weight | bias
            out[f"model.layers.{i}.{HF_BLOCK_NAMES[module]}.{kind}"] = tensor
        if fused:
            prefix = f"model.layers.{i}."
            parts = [out.pop(prefix + f"self_attn.{n}_proj.weight") for n in "qkv"]
            out[prefix + "self_attn.qkv_proj.weight"] = torch.cat(parts)
            parts = [out.pop(prefix + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
            out[prefix + "mlp.gate_up_proj.weight"] = torch.cat(parts)
    return out


def hf_config(cfg, dtype: torch.dtype, attn: str):
    """The transformers class and config of our model's family: Qwen3 (q/k norms),
    Qwen2 (q/k/v biases), Phi-3 (partial rotary), Mistral (a window of its own), else
    Llama (with its rope scaling). Qwen2/3 take the window on every layer."""
    import transformers

    window = cfg.sliding_window
    # Qwen2/3 apply use_sliding_window from max_window_layers on: 0 is every layer, as ours
    qwen_window = dict(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0)

    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attn_implementation=attn, dtype=dtype,
    )
    if cfg.embed_scale or cfg.norm_offset or cfg.mlp_act != "silu":
        if not (cfg.embed_scale and cfg.norm_offset == 1.0 and cfg.mlp_act == "gelu_tanh"):
            raise ValueError("hf_transformers: this mix of Gemma's fields has no transformers class")
        if window is not None or cfg.rotary_dim is not None:
            raise ValueError("hf_transformers: GemmaForCausalLM has no sliding window or partial rotary")
        common["hidden_act"] = "gelu_pytorch_tanh"
        return transformers.GemmaForCausalLM, transformers.GemmaConfig(
            head_dim=cfg.head_dim, hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.o_bias, **common)
    if cfg.qk_norm:
        return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
            head_dim=cfg.head_dim, attention_bias=cfg.o_bias, **qwen_window, **common)
    if cfg.qkv_bias and not cfg.o_bias:
        return transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**qwen_window, **common)
    scaling = None
    if cfg.rope_type == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max}
    if cfg.rotary_dim is not None:
        factor = cfg.rotary_dim / cfg.head_dim
        if scaling is not None or int(cfg.head_dim * factor) != cfg.rotary_dim or cfg.dim != cfg.n_heads * cfg.head_dim:
            raise ValueError("hf_transformers: partial rotary runs as Phi3ForCausalLM, which takes neither rope "
                             "scaling nor a head_dim other than dim / n_heads")
        return transformers.Phi3ForCausalLM, transformers.Phi3Config(
            partial_rotary_factor=factor, sliding_window=window, pad_token_id=0, **common)
    if window is not None:
        return transformers.MistralForCausalLM, transformers.MistralConfig(
            head_dim=cfg.head_dim, sliding_window=window, rope_scaling=scaling, **common)
    return transformers.LlamaForCausalLM, transformers.LlamaConfig(
        head_dim=cfg.head_dim, attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias, rope_scaling=scaling, **common)


def hf_llama(model: Transformer, attn: str = "sdpa"):
    """Hugging Face's model of our model's family, computing what `model` computes,
    sharing its weights."""
    cfg = model.config
    weight = model.tok_embeddings.weight
    cls, config = hf_config(cfg, weight.dtype, attn)
    # built on the weights' device, so buffers made at init (RoPE frequencies, Gemma's
    # normalizer) are real; its random parameters are then replaced by ours, shared
    with torch.device(weight.device):
        hf = cls(config)
    hf.load_state_dict(hf_state_dict(model, fused=cls.__name__ == "Phi3ForCausalLM"), assign=True, strict=True)
    if cfg.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.eval()


class HfStaticCache:
    """HF's StaticCache behind our cache's face: one per (batch, length), reused
    across generations (reset by each prefill from position 0)."""

    def __init__(self, hf, batch: int, max_len: int):
        import transformers

        self.batch, self.max_len = batch, max_len
        self.filled = 0  # positions written since the last reset: HF's cache appends at its own count
        self.hf = transformers.StaticCache(config=hf.config, max_cache_len=max_len)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.hf.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


class HfTransformersModel(nn.Module):
    """Hugging Face's model behind our model's face: forward(tokens, input_pos, cache)
    -> logits, new_cache(batch, max_len), config and weight_bytes."""

    def __init__(self, model: Transformer, attn: str):
        super().__init__()
        self.config = model.config
        self.hf = hf_llama(model, attn)
        # transformers 5.x names the cache argument `cache`; earlier, `past_key_values`
        params = inspect.signature(self.hf.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: HfStaticCache | None = None) -> torch.Tensor:
        if cache is None:
            return self.hf(input_ids=tokens, use_cache=False).logits  # (B, T, vocab)
        start = int(input_pos[0])  # on CUDA a sync per step: part of this peer's cost
        if start == 0:  # a new generation: HF's cache counts the positions it holds
            cache.hf.reset()
        elif start != cache.filled:
            raise ValueError(f"hf_transformers' StaticCache continues at position {cache.filled}, not {start}")
        cache.filled = start + tokens.shape[1]
        positions = input_pos[None].expand(tokens.shape[0], -1)  # (B, T)
        return self.hf(input_ids=tokens, position_ids=positions, cache_position=input_pos, use_cache=True,
                       **{self._cache_arg: cache.hf}).logits  # (B, T, vocab)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> HfStaticCache:
        if pad is not None and bool(pad.any()):
            raise ValueError("hf_transformers decodes batches of equal-length prompts; left padding needs HF's "
                             "attention_mask, which this peer does not pass")
        if max_len > self.config.max_seq_len:
            raise ValueError(f"prompt + new tokens = {max_len} positions exceed the model's context "
                             f"max_seq_len={self.config.max_seq_len}")
        return HfStaticCache(self.hf, batch, max_len)

    @property
    def weight_bytes(self) -> int:
        return storage_bytes(self.hf)


@register_variant("hf_transformers")
@dataclass(frozen=True)
class HfTransformers(Variant):
    kind_refusal = "it builds a decoder of the model's family (a causal LM), not an encoder"
    axis = "peer"
    requires = frozenset({"transformers"})
    description = "peer: Hugging Face transformers' model of the family on the same weights, its StaticCache"
    attn: str = "sdpa"  # HF's attn_implementation: sdpa | eager

    def __post_init__(self) -> None:
        if self.attn not in HF_ATTENTION:
            raise ValueError(f"attn must be one of {', '.join(HF_ATTENTION)}, got {self.attn!r}")

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        check_whole_model_peer(self, workload, spec, ("prefill", "decode", "generate", "drift"))

    def apply(self, model: Transformer) -> nn.Module:
        import transformers

        note_path("peer", f"transformers {transformers.__version__} ({self.attn}, StaticCache)")
        return HfTransformersModel(model, self.attn)


def check_whole_model_peer(peer: Variant, workload: str, spec: tuple, workloads: tuple[str, ...]) -> None:
    """A peer runs its own model: alone in a spec, on model workloads only."""
    others = [v.name for v in spec if v is not peer]
    if others:
        raise ValueError(f"{peer.name} is a whole model with its own cache and kernels; it takes no other variant "
                         f"(got {'+'.join(others)}): list it as a spec of its own")
    if workload not in workloads:
        raise ValueError(f"{peer.name} runs the {', '.join(workloads)} workloads, not {workload}")


# ---------------------------------------------------------------------------- llama.cpp

class LlamaCppCache:
    """llama.cpp keeps its KV cache inside its context; this records the length asked
    for and its size (f16 K and V per layer, llama.cpp's default)."""

    def __init__(self, config, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.nbytes = 2 * config.n_layers * max_len * config.n_kv_heads * config.head_dim * 2
        # batch > 1 (drift's greedy check only): each row's tokens so far, recomputed per
        # step from a reset context, since one llama.cpp context holds one sequence here
        self.rows: list[torch.Tensor] | None = None


class LlamaCppModel(nn.Module):
    """llama.cpp (llama-cpp-python) on the GGUF file itself, in the file's own
    quantization, behind our model's face. One sequence per context: a cached
    forward of one row continues from the context's last position; several rows
    (drift's greedy check; timed workloads are batch 1) and uncached forwards are
    evaluated row by row from a reset context. Logits of every position are kept
    (drift needs them, and our model computes them too)."""

    def __init__(self, model: Transformer, gguf_path, threads: int):
        super().__init__()
        self.config = model.config
        self.path, self.threads = str(gguf_path), threads
        self.dtype = model.tok_embeddings.weight.dtype
        self._llm = None

    def _context(self, n_ctx: int):
        """A llama.cpp context of at least n_ctx positions (made again only to grow)."""
        if self._llm is None or self._llm.n_ctx() < n_ctx:
            from llama_cpp import Llama

            self._llm = None  # free the old context first
            self._llm = Llama(model_path=self.path, n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=self.threads,
                              n_threads_batch=self.threads, logits_all=True, verbose=False)
        return self._llm

    def _eval(self, llm, tokens: torch.Tensor, start: int) -> torch.Tensor:
        llm.eval(tokens.tolist())
        scores = llm.scores[start:start + len(tokens)]  # (T, vocab) float32, a view of llama.cpp's buffer
        return torch.from_numpy(scores.copy()).to(self.dtype)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: LlamaCppCache | None = None) -> torch.Tensor:
        if cache is None:
            llm = self._context(tokens.shape[1])
            rows = []
            for row in tokens:  # (T,) each, from an empty context
                llm.reset()
                rows.append(self._eval(llm, row, 0))
            return torch.stack(rows)  # (B, T, vocab)
        llm = self._context(cache.max_len)
        if tokens.shape[0] != 1:  # rows one after another, each from an empty context
            start = int(input_pos[0])
            cache.rows = list(tokens) if start == 0 else [torch.cat([r, t]) for r, t in zip(cache.rows, tokens)]
            out = []
            for row in cache.rows:
                llm.reset()
                out.append(self._eval(llm, row, 0)[start:])
            return torch.stack(out)  # (B, T, vocab)
        start = int(input_pos[0])
        if start == 0:
            llm.reset()
        elif start != llm.n_tokens:
            raise ValueError(f"llama_cpp continues from position {llm.n_tokens}, not {start}")
        return self._eval(llm, tokens[0], start)[None]  # (1, T, vocab)

    def new_cache(self, batch: int, max_len: int, pad: torch.Tensor | None = None) -> LlamaCppCache:
        if pad is not None and bool(pad.any()):
            raise ValueError("llama_cpp decodes unpadded sequences only")
        self._context(max_len)
        return LlamaCppCache(self.config, batch, max_len)

    @property
    def weight_bytes(self) -> int:
        import os

        return os.path.getsize(self.path)  # the file's own quantized tensors (and its small metadata)


@register_variant("llama_cpp")
@dataclass(frozen=True)
class LlamaCpp(Variant):
    kind_refusal = "it builds a decoder of the model's family (a causal LM), not an encoder"
    axis = "peer"
    requires = frozenset({"llama_cpp"})
    description = "peer: llama.cpp (llama-cpp-python) on the same GGUF file, in its own quantization, batch 1"
    threads: int = 0  # 0: as many as torch uses

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        check_whole_model_peer(self, workload, spec, ("prefill", "decode", "generate", "drift"))
        if device.type != "cpu":
            raise ValueError("llama_cpp runs on the CPU here (llama-cpp-python built without CUDA)")

    needs_gguf = True  # the runner skips it on models not loaded from a GGUF file

    def skip_reason(self, case) -> str | None:
        if case.dtype != "float32":
            return ("llama_cpp runs the GGUF's own quantization with fp32 activations: its row is dtype float32, "
                    f"not {case.dtype}")
        if case.batch != 1 and case.workload != "drift":
            return "llama_cpp decodes one sequence at a time: batch 1"
        return None

    def apply(self, model: Transformer) -> nn.Module:
        import llama_cpp

        path = getattr(model, "gguf_path", None)
        if path is None:
            raise ValueError("llama_cpp needs a model loaded from a GGUF file")
        threads = self.threads or torch.get_num_threads()
        note_path("peer", f"llama.cpp {llama_cpp.__version__} ({path.name}, {threads} threads)")
        return LlamaCppModel(model, path, threads)
