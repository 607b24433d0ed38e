"""Peers as rows: Hugging Face transformers and llama.cpp on the case's own weights,
checked against our fp32 reference, refused where they cannot run, and marked as
peers in the records and reports."""

import pytest
import torch

from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.errors import UserError
from infermatrix.generate import generate_greedy
from infermatrix.reports.html_report import render_html
from infermatrix.variants import apply_variants, parse_spec, take_paths
from infermatrix.weights import load_model

RUN = {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny").model


def test_hf_transformers_computes_our_reference_logits_and_greedy_tokens(tiny):
    """Same weights, same math: fp32 logits agree to rounding (both use fp32 with
    different op orders; 1e-5 of the logit scale), and cached greedy decoding
    through HF's StaticCache picks the same tokens as our kv_cache."""
    hf = apply_variants(tiny, parse_spec("hf_transformers"))
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 40))
    with torch.no_grad():
        ours, theirs = tiny(tokens), hf(tokens)
        assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()
        cached = apply_variants(tiny, parse_spec("kv_cache"))
        assert torch.equal(generate_greedy(hf, tokens, 12), generate_greedy(cached, tokens, 12))
    assert hf.weight_bytes >= tiny.weight_bytes  # the same tensors (plus HF's RoPE buffer)
    assert sum(p.data_ptr() == q.data_ptr() for p in hf.parameters() for q in tiny.parameters()) > 0


@pytest.mark.parametrize("spec, workload, message", [
    ("hf_transformers+kv_cache", "decode", "hf_transformers is a whole model with its own cache and kernels"),
    ("hf_transformers+int8_weight_only", "prefill", "takes no other variant \\(got int8_weight_only\\)"),
    ("hf_transformers", "attention", "hf_transformers runs the prefill, decode, generate, drift workloads, not"),
    ("llama_cpp+sdpa", "decode", "llama_cpp is a whole model"),
    ("hf_transformers(attn=flash)", "decode", "attn must be one of sdpa, eager"),
])
def test_peers_refuse_what_they_cannot_run_when_the_matrix_is_read(spec, workload, message):
    with pytest.raises(UserError, match=message):
        parse_matrix({"cases": [{"model": "tiny", "variant": spec, "workload": workload}]})


def test_peer_rows_run_in_the_harness_and_say_they_are_peers(tmp_path):
    matrix = parse_matrix({"run": RUN, "cases": [
        {"model": "tiny", "variant": ["hf_transformers", "kv_cache+sdpa"], "workload": ["decode", "drift"],
         "prompt_len": 32, "new_tokens": 4, "windows": 2},
        {"model": "tiny", "variant": "llama_cpp", "workload": "decode", "prompt_len": 32, "new_tokens": 4}]})
    records = {(r.case["variant"], r.case["workload"]): r for r in run_matrix(matrix, tmp_path, log=lambda _: None)}
    decode, drift = records[("hf_transformers", "decode")], records[("hf_transformers", "drift")]
    assert decode.status == drift.status == "ok", (decode.reason, drift.reason)
    assert decode.metrics["peer_path"].startswith("transformers ") and decode.metrics["kv_cache_bytes"] > 0
    assert drift.metrics["kl_mean"] < 1e-9 and drift.metrics["top1_agree_pct"] == 100.0
    assert "peer_path" not in records[("sdpa+kv_cache", "decode")].metrics
    skipped = records[("llama_cpp", "decode")]
    assert skipped.status == "skipped"
    assert skipped.reason in ("llama_cpp runs GGUF files; tiny is not one", "llama_cpp needs the llama-cpp-python package")
    page = render_html(list(records.values()))
    assert page.count('class="badge peer"') == 2  # the two ok hf rows are marked apart


def test_llama_cpp_skips_dtypes_and_batches_it_does_not_have():
    from infermatrix.variants.peers import LlamaCpp

    def case(**fields):
        return parse_matrix({"cases": [{"model": "tiny", "variant": "llama_cpp", **fields}]}).cases[0]

    peer = LlamaCpp()
    assert "its row is dtype float32, not bfloat16" in peer.skip_reason(case(workload="decode", dtype="bfloat16"))
    assert peer.skip_reason(case(workload="decode", batch=2)) == "llama_cpp decodes one sequence at a time: batch 1"
    assert peer.skip_reason(case(workload="drift", batch=2)) is None
    assert peer.skip_reason(case(workload="decode")) is None


def test_hf_transformers_on_a_tied_model_with_its_own_rope_theta():
    """The tied head and a non-default RoPE base reach HF's config."""
    import dataclasses

    from infermatrix.weights import random_model

    cfg = dataclasses.replace(load_model("tiny").model.config, tie_embeddings=True, rope_theta=1e5)
    model = random_model(cfg, torch.float32, "cpu")
    hf = apply_variants(model, parse_spec("hf_transformers"))
    assert hf.hf.lm_head.weight is hf.hf.model.embed_tokens.weight
    tokens = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        assert (hf(tokens) - model(tokens)).abs().max() <= 1e-5 * model(tokens).abs().max()


@pytest.mark.slow
def test_llama_cpp_on_the_smollm2_gguf_matches_the_reference_within_its_quantization(tmp_path):
    """Where llama-cpp-python is installed: the same GGUF, the same prompt tokens; its
    own Q4_1 kernels (activations quantized to 8 bits) agree with our fp32 reference
    on most next-token argmaxes, and its cached decode is its own recompute."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (built from source, see README)")
    loaded = load_model("smollm2-135m")
    model = loaded.model
    peer = apply_variants(model, parse_spec("llama_cpp"))
    assert take_paths()["peer_path"].startswith("llama.cpp ")
    text = "The quick brown fox jumps over the lazy dog. Python is a programming language that lets you work quickly."
    tokens = torch.tensor([loaded.tokenizer.encode(text).ids])  # (1, T)
    with torch.no_grad():
        full = peer(tokens)  # (1, T, vocab), no cache
        ours = model(tokens)
        cache = peer.new_cache(1, 16)
        prefill = peer(tokens[:, :8], torch.arange(8), cache)
        step = peer(tokens[:, 8:9], torch.tensor([8]), cache)
    # measured: every argmax agrees and KL 0.005 on this text; Q4_1 with 8-bit activations
    assert (full.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.9
    p, q = ours.log_softmax(-1), full.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 0.05
    torch.testing.assert_close(prefill[0, -1], full[0, 7], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(step[0, -1], full[0, 8], atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_llama_cpp_drift_and_decode_records_through_the_harness(tmp_path):
    """Where llama-cpp-python is installed: its drift row (several windows, so its
    greedy check decodes several rows) and a decode row run and say which stack ran."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (built from source, see README)")
    matrix = parse_matrix({"run": RUN, "cases": [{"model": "smollm2-135m", "variant": "llama_cpp",
                                                  "workload": ["drift", "decode"], "windows": 2, "prompt_len": 64,
                                                  "new_tokens": 4}]})
    drift, decode = run_matrix(matrix, tmp_path, log=lambda _: None)
    assert drift.status == decode.status == "ok", (drift.reason, decode.reason)
    assert drift.metrics["top1_agree_pct"] >= 80 and drift.metrics["kl_mean"] < 0.1
    assert decode.metrics["peer_path"].startswith("llama.cpp ") and decode.metrics["tokens_per_s"] > 0
