"""Loader correctness against Hugging Face transformers (the peer), and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from infermatrix.errors import UserError
from infermatrix.weights import load_model, model_config, unpermute_gguf_qk

transformers = pytest.importorskip("transformers", reason="test extra: pip install -e '.[test]'")

HF_CONFIGS = {
    "mha-untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-2-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "mqa-untied": dict(num_attention_heads=8, num_key_value_heads=1, tie_word_embeddings=False),
}


def hf_llama(overrides: dict, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_theta=50000.0, **overrides,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial values everywhere, norms included, so any mis-mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# fp32 tolerance: both sides compute in fp32 with different op orders (SDPA vs the
# explicit softmax, RoPE tables built differently). Each op adds ~sqrt(K)*eps
# relative error (eps = 1.2e-7, K <= 96); over 2 layers that is ~1e-5 of the logit
# scale. We allow 1e-4 of the logit scale: 10x headroom, still far below any
# mapping mistake (a swapped or permuted weight moves logits by O(1)).
def assert_logits_match(ours, theirs):
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-4 * max(scale, 1.0)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_checkpoint_logits_match_transformers(tmp_path, name):
    hf = hf_llama(HF_CONFIGS[name])
    hf.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_model(str(tmp_path))
    assert loaded.model.config.n_kv_heads == HF_CONFIGS[name]["num_key_value_heads"]
    assert loaded.model.config.rope_theta == 50000.0
    tokens = torch.randint(0, 256, (2, 33))
    with torch.no_grad():
        assert_logits_match(loaded.model(tokens), hf_logits(hf, tokens))


def _permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter layout: rows of each head reordered to adjacent RoPE pairs."""
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def write_llama_gguf(path, hf, arch="llama", extra=None):
    import gguf

    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(50000.0)
    writer.add_vocab_size(cfg.vocab_size)
    if extra:
        extra(writer)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = _permute_for_gguf(w, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                w = _permute_for_gguf(w, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["gqa-2-tied", "mqa-untied"])
def test_gguf_loader_unpermutes_qk_and_matches_transformers(tmp_path, name):
    hf = hf_llama(HF_CONFIGS[name], seed=3)
    path = tmp_path / "model.gguf"
    write_llama_gguf(path, hf)
    loaded = load_model(str(path))
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert_logits_match(loaded.model(tokens), hf_logits(hf, tokens))


def test_unpermute_inverts_the_gguf_permutation():
    w = np.arange(8 * 8 * 3, dtype=np.float32).reshape(64, 3)  # 8 heads x head dim 8
    back = unpermute_gguf_qk(torch.from_numpy(_permute_for_gguf(w, 8)), 8)
    assert torch.equal(back, torch.from_numpy(w))


def test_hf_folder_tokenizer_is_loaded(tmp_path, smollm2):
    hf_llama(HF_CONFIGS["mha-untied"]).save_pretrained(tmp_path, safe_serialization=True)
    smollm2.tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer.encode("The capital of France").ids == smollm2.tokenizer.encode("The capital of France").ids


# ------------------------------------------------------------------ bad input


def test_gguf_of_another_architecture_is_refused(tmp_path):
    hf = hf_llama(HF_CONFIGS["mha-untied"])
    path = tmp_path / "gpt2.gguf"
    write_llama_gguf(path, hf, arch="gpt2")
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported; valid: 'llama'"):
        load_model(str(path))


def test_gguf_with_scaled_rope_is_refused(tmp_path):
    path = tmp_path / "llama31.gguf"
    hf = hf_llama(HF_CONFIGS["mha-untied"])
    write_llama_gguf(path, hf, extra=lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, dtype=np.float32)))
    with pytest.raises(UserError, match="scaled RoPE .*not supported"):
        model_config(str(path))


def test_checkpoint_folder_problems_are_named(tmp_path):
    with pytest.raises(UserError, match="lacks config.json"):
        model_config(str(tmp_path))
    hf = hf_llama(HF_CONFIGS["mha-untied"])
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_model(str(tmp_path))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="'GPT2LMHeadModel' is not supported; valid: LlamaForCausalLM"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**raw, "num_hidden_layers": 3}))
    with pytest.raises(UserError, match="checkpoint lacks 9 weights"):
        load_model(str(tmp_path))


def test_unknown_model_lists_presets():
    with pytest.raises(UserError, match="unknown model 'llama-70x'.*presets: smollm2-135m, gemma-2b, llama-1b"):
        load_model("llama-70x")


# ------------------------------------------------------------------ shape presets


def test_shape_preset_allocates_only_its_weights():
    """llama-1b in bfloat16: the process grows by the weight bytes, not by an fp32 copy."""
    script = (
        "import resource, torch\n"
        "from infermatrix.weights import load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "m = load_model('llama-1b', torch.bfloat16).model\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "print(m.weight_bytes, m.config.num_params(), after - before, m.tok_embeddings.weight.dtype)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    weight_bytes, params, grown, dtype = int(out[0]), int(out[1]), int(out[2]), out[3]
    assert dtype == "torch.bfloat16"
    assert weight_bytes == 2 * params
    assert grown < weight_bytes * 1.1 + 200 * 2**20, (grown, weight_bytes)


def test_shape_presets_are_seeded():
    a = load_model("tiny", torch.float32, seed=5).model
    b = load_model("tiny", torch.float32, seed=5).model
    c = load_model("tiny", torch.float32, seed=6).model
    assert torch.equal(a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight)
    assert not torch.equal(a.layers[0].attention.wq.weight, c.layers[0].attention.wq.weight)
