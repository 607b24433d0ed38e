"""Decoder families as config fields of the one reference model: Qwen2 (q/k/v
biases), Qwen3 (q/k RMSNorm, head_dim of its own), Gemma ((1 + w) norms, GeGLU,
embedding scale), Phi-3 (fused checkpoint projections, partial rotary), Mistral (a
sliding window of its own) and Llama 3 (rope scaling) load from HF safetensors
folders and match Hugging Face transformers' logits at fp32, and cached greedy
decoding equals HF's generate."""

import dataclasses
import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from infermatrix.errors import UserError  # noqa: E402
from infermatrix.generate import generate_greedy  # noqa: E402
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
        assert type(peer.hf).__name__.lower().startswith(name[:4].replace("llam", "llama"))  # phi3_partial: Phi3
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


WINDOWED = ["kv_cache", "kv_cache(prefix=true)+sdpa(decode=grouped)", "kv_cache+sdpa(decode=grouped)",
            "block_sparse(pattern=sliding,window=8,block=8)", "kv_cache+block_sparse(pattern=sliding,window=8,block=8)",
            "fused+kv_cache(prefix=true)+sdpa"]
if importlib.util.find_spec("triton"):  # the window reaches its kernels as per-row key ranges (interpreted on CPUs)
    WINDOWED += ["triton", "kv_cache+triton"]


def test_a_models_own_sliding_window_matches_mistral_past_the_window(tmp_path):
    """Mistral's window of 8 over 40 tokens: our logits match HF's (and would not
    without the window), and greedy decoding equals HF's generate for 28 tokens past
    the window through every cache mask (static, prefix) and block_sparse's exact
    window layout (its kernel, then its cached decode over the window's keys)."""
    from infermatrix.model import Transformer
    from infermatrix.variants import take_paths

    hf, loaded = build("mistral", tmp_path)
    assert loaded.model.config.sliding_window == 8
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        theirs = hf(tokens).logits
        assert (loaded.model(tokens) - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        unwindowed = Transformer(dataclasses.replace(loaded.model.config, sliding_window=None))
        unwindowed.load_state_dict(loaded.model.state_dict())
        assert (unwindowed(tokens) - theirs).abs().max() > 1e-2 * theirs.abs().max()
        prompt = tokens[:1, :12]
        want = hf.generate(prompt, max_new_tokens=28, do_sample=False, min_new_tokens=28, pad_token_id=0)[:, 12:]
        assert torch.equal(generate_greedy(loaded.model, prompt, 28), want)  # no cache: the window as a mask
        for spec in WINDOWED:
            take_paths()
            model = apply_variants(loaded.model, parse_spec(spec))
            assert torch.equal(generate_greedy(model, prompt, 28), want), spec
            if "block_sparse" in spec:  # its own kernel ran, not a dense fallback
                assert "dense_masked" not in take_paths()["attention_path"], spec


def test_a_windowed_model_refuses_what_would_change_it(tmp_path):
    """block_sparse with another window or layout, and flex (block-granular), would
    compute another model: refused before running, naming the window and the fix,
    both when variants are applied and when a matrix is read."""
    from infermatrix.bench.matrix import parse_matrix
    from infermatrix.bench.runner import run_matrix
    from infermatrix.reports.derived import ran

    _, loaded = build("mistral", tmp_path)
    for spec in ("block_sparse(pattern=sliding,window=16,block=8)", "block_sparse(block=8)",
                 "flex(pattern=sliding,window=8,block=8)"):
        with pytest.raises(ValueError, match="its own sliding window of 8 tokens.*window=8"):
            apply_variants(loaded.model, parse_spec(spec))
    cases = {"model": str(tmp_path), "variant": "flex(pattern=sliding,window=8,block=8)", "workload": "prefill",
             "prompt_len": 16}
    with pytest.raises(UserError, match="flex.*its own sliding window of 8 tokens"):
        parse_matrix({"cases": [cases]})
    parse_matrix({"cases": [{**cases, "workload": "attention"}]})  # an op workload runs no model: no window
    exact = parse_matrix({"run": {"isolate": False, "min_runs": 1, "max_runs": 1, "warmup": 0},
                          "cases": [{**cases, "variant": "block_sparse(pattern=sliding,window=8,block=8)"}]})
    record = run_matrix(exact, tmp_path / "run", log=lambda line: None)[0]
    assert record.status == "ok", record.reason
    assert record.metrics["model_window"] == 8  # the record says the model's own window was in force
    assert ran(record) == "attention block_sparse_cpu, model window 8"


def test_qwen2s_window_maps_when_it_covers_every_layer(tmp_path):
    """Qwen2 windows only layers from max_window_layers on: 0 is every layer, our one
    field (and HF's logits past the window match); a window on some layers is refused."""
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=0, **COMMON)).eval()
    hf.save_pretrained(tmp_path / "all", safe_serialization=True)
    loaded = load_model(str(tmp_path / "all"))
    assert loaded.model.config.sliding_window == 8
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        theirs = hf(tokens).logits
        assert (loaded.model(tokens) - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        peer = apply_variants(loaded.model, parse_spec("hf_transformers"))  # Qwen2 windowed on every layer
        assert (peer(tokens) - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
        max_window_layers=1, **COMMON))
    hf.save_pretrained(tmp_path / "some", safe_serialization=True)
    with pytest.raises(UserError, match="use_sliding_window=true with max_window_layers=1: a window on 1 of 2 "
                                        "layers"):
        load_model(str(tmp_path / "some"))


def test_unsupported_configs_are_refused_naming_the_field(tmp_path):
    from infermatrix.weights import hf_config

    phi3 = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 256, "hidden_size": 96, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 6}
    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(UserError, match="rope type 'longrope' is not supported; valid: default, linear, llama3"):
        hf_config({**phi3, "rope_scaling": longrope}, "phi3-128k")
    with pytest.raises(UserError, match="partial_rotary_factor=0.5 is taken for Phi3ForCausalLM only"):
        hf_config({**phi3, "architectures": ["LlamaForCausalLM"], "partial_rotary_factor": 0.5}, "llama")
    assert hf_config({**phi3, "partial_rotary_factor": 0.5}, "phi3").rotary_dim == 8
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
