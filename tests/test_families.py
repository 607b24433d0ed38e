"""Decoder families as config fields of the one reference model: Qwen2 (q/k/v
biases), Qwen3 (q/k RMSNorm, head_dim of its own), Gemma ((1 + w) norms, GeGLU,
embedding scale), Phi-3 (fused checkpoint projections) and Llama 3 (rope scaling) load
from HF safetensors folders and match Hugging Face transformers' logits at fp32,
and cached greedy decoding equals HF's generate."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from infermatrix.errors import UserError  # noqa: E402
from infermatrix.model import generate_greedy  # noqa: E402
from infermatrix.variants import apply_variants, parse_spec  # noqa: E402
from infermatrix.weights import load_model  # noqa: E402

from hf_twins import COMMON, FAMILIES, hf_twin  # noqa: E402


def build(name: str, tmp_path):
    return hf_twin(name, tmp_path), load_model(str(tmp_path))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(name, tmp_path):
    """fp32, both sides in fp32 with different op orders: within 1e-4 of the logit scale
    (a mis-mapped weight or a wrong frequency moves logits by O(1)); 80 tokens reach
    past the llama3 pre-training context of 32."""
    hf, loaded = build(name, tmp_path)
    tokens = torch.randint(0, 256, (2, 80))
    with torch.no_grad():
        ours, theirs = loaded.model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    prompt = tokens[:1, :12]
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16,
                           pad_token_id=0)[:, 12:]
        cached = apply_variants(loaded.model, parse_spec("kv_cache+sdpa"))
        assert torch.equal(generate_greedy(cached, prompt, 16), want)
        fused = apply_variants(loaded.model, parse_spec("fused+kv_cache(prefix=true)+sdpa(decode=grouped)"))
        assert torch.equal(generate_greedy(fused, prompt, 16), want)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_hf_peer_builds_the_same_family(name, tmp_path):
    _, loaded = build(name, tmp_path)
    peer = apply_variants(loaded.model, parse_spec("hf_transformers"))
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        ours, theirs = loaded.model(tokens), peer(tokens)
    if name != "phi3":  # Phi-3 is a Llama with fused checkpoints: the peer builds LlamaForCausalLM
        assert type(peer.hf).__name__.lower().startswith(name[:4].replace("llam", "llama"))
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_unsupported_configs_are_refused_naming_the_field(tmp_path):
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, **COMMON))
    hf.save_pretrained(tmp_path / "sliding", safe_serialization=True)
    with pytest.raises(UserError, match="use_sliding_window=true"):
        load_model(str(tmp_path / "sliding"))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_attention_heads=6, num_key_value_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32},
        **COMMON))
    hf.save_pretrained(tmp_path / "yarn", safe_serialization=True)
    with pytest.raises(UserError, match="rope type 'yarn' is not supported; valid: default, linear, llama3"):
        load_model(str(tmp_path / "yarn"))


def test_a_checkpoint_with_tensors_its_config_has_no_place_for_is_refused(tmp_path):
    """A Qwen2 checkpoint (q/k/v biases) relabelled as Llama: the biases would be
    dropped silently and the logits be wrong; the loader names them instead."""
    import json

    hf, _ = build("qwen2", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="6 tensors its config.json has no place for, e.g. .*attention.wk.bias"):
        load_model(str(tmp_path))
