"""Random-weight Hugging Face checkpoints of each decoder family, built with
transformers' own classes; shared by the safetensors (test_families) and GGUF
(test_gguf_families) loader tests."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="test extra: pip install -e '.[test]'")

COMMON = dict(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=50000.0)

# name -> (transformers class prefix, config fields besides COMMON)
FAMILIES = {
    # plain Llama: GQA 6 over 2, untied head; no EOS token (generate's min_new_tokens
    # would mask Llama's default id 2, which greedy decoding of random weights may pick)
    "llama": ("Llama", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                            eos_token_id=None)),
    # Llama with attention_bias (q, k, v and o) and mlp_bias (gate, up, down)
    "llama_bias": ("Llama", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                                 eos_token_id=None, attention_bias=True, mlp_bias=True)),
    # GQA ratio 3 (6 query heads over 2 KV heads), q/k/v biases
    "qwen2": ("Qwen2", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)),
    # an odd head count (3), head_dim 48 != 96 / 3 ... and 2 KV heads would not divide: 3 over 1
    "qwen3": ("Qwen3", dict(num_attention_heads=3, num_key_value_heads=1, head_dim=48, tie_word_embeddings=False)),
    # Gemma: (1 + w) RMSNorm, GeGLU, embeddings scaled by sqrt(dim), head_dim 32 != 96 / 6
    "gemma": ("Gemma", dict(num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                            hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0)),
    # Phi-3: q/k/v and gate/up stored fused in the checkpoint, split on load
    "phi3": ("Phi3", dict(num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False, pad_token_id=0)),
    # Phi-3 with RoPE on half of each head (the first 8 of 16 dims), the rest unrotated
    "phi3_partial": ("Phi3", dict(num_attention_heads=6, num_key_value_heads=3, partial_rotary_factor=0.5,
                                  tie_word_embeddings=False, pad_token_id=0)),
    # Mistral: a sliding window of 8 tokens, shorter than the 28 generated and the 80 scored
    "mistral": ("Mistral", dict(num_attention_heads=6, num_key_value_heads=2, sliding_window=8,
                                tie_word_embeddings=False)),
    # Llama 3 rope scaling, with a pre-training context (32) shorter than the test's sequence
    "llama3": ("Llama", dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
}


def hf_twin(name: str, folder, **overrides):
    """A seeded random-weight model of family `name`, saved to `folder` as safetensors."""
    prefix, fields = FAMILIES[name]
    config = getattr(transformers, f"{prefix}Config")(**{**COMMON, **fields, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
    with torch.no_grad():  # non-trivial values everywhere, norms and biases included
        for pname, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in pname else p.normal_(0.0, 0.08)
    hf.save_pretrained(folder, safe_serialization=True)
    return hf
