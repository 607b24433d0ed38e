"""fused: one QKV GEMM and one gate/up GEMM per layer compute what the separate
projections compute, compose with the cache and the int8 variants, and leave the
base model as it was."""

import pytest
import torch

from infermatrix.generate import generate_greedy
from infermatrix.variants import apply_variants, parse_spec
from infermatrix.weights import load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny").model


def test_fused_logits_equal_the_separate_projections_at_fp32(tiny):
    """The same dot products, grouped into one GEMM: only the GEMM's blocking can
    differ, well inside 1e-5 of the logit scale at fp32."""
    fused = apply_variants(tiny, parse_spec("fused"))
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 33))
    with torch.no_grad():
        ours, theirs = fused(tokens), tiny(tokens)
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
    layer = fused.layers[0]
    assert layer.attention.wq is None and layer.attention.wqkv.weight.shape == (64 + 2 * 32, 64)
    assert layer.feed_forward.w13.weight.shape == (2 * tiny.config.hidden_dim, 64)
    assert tiny.layers[0].attention.wqkv is None and tiny.layers[0].attention.wq is not None  # base untouched
    assert fused.weight_bytes == tiny.weight_bytes


def test_fused_looks_rope_up_in_tables_computed_once(tiny, monkeypatch):
    """The cos/sin tables cover every position once; a forward only indexes them,
    at any position (here the last one the context allows)."""
    import infermatrix.model as model_module

    fused = apply_variants(tiny, parse_spec("fused"))
    cos, sin = fused.rope_table
    assert cos.shape == sin.shape == (tiny.config.max_seq_len, tiny.config.head_dim) and tiny.rope_table is None
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 3))
    positions = torch.tensor([0, 7, tiny.config.max_seq_len - 1])
    with torch.no_grad():
        expected = tiny(tokens, positions)
        monkeypatch.setattr(model_module, "rope_tables", lambda *a: pytest.fail("RoPE recomputed per forward"))
        got = fused(tokens, positions)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("spec", ["fused+kv_cache+sdpa", "fused+kv_cache(prefix=true)+sdpa"])
def test_fused_cached_decode_equals_recompute(tiny, spec):
    prompt = torch.randint(0, tiny.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(generate_greedy(apply_variants(tiny, parse_spec(spec)), prompt, 16),
                           generate_greedy(tiny, prompt, 16))


def test_int8_quantizes_the_fused_layers(tiny):
    model = apply_variants(tiny, parse_spec("fused+int8_weight_only"))
    assert type(model.layers[0].attention.wqkv).__name__ == "Int8WeightOnlyLinear"
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 16))
    with torch.no_grad():
        separate = apply_variants(tiny, parse_spec("int8_weight_only"))(tokens)
        torch.testing.assert_close(model(tokens), separate, rtol=1e-4, atol=1e-4)  # per-row scales: the same


def test_fusing_a_quantized_model_is_refused(tiny):
    from infermatrix.variants.fused import fuse_projections

    quantized = apply_variants(tiny, parse_spec("int8_weight_only"))
    with pytest.raises(ValueError, match="fused takes the dense model's nn.Linear projections"):
        fuse_projections(quantized)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_weights_compute_the_dense_model(dtype, scale):
    """oneDNN's packed layout holds the same values: fp32 agrees to rounding; bf16
    to bf16's (8 bits of mantissa, different accumulation blocking)."""
    from infermatrix.variants import take_paths

    model = load_model("tiny", dtype).model
    take_paths()  # what earlier tests noted
    packed = apply_variants(model, parse_spec("fused+packed+kv_cache(prefix=true)+sdpa"))
    assert take_paths().get("linear_path") == "onednn_packed"
    tokens = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        ours, theirs = packed(tokens).float(), model(tokens).float()
        assert (ours - theirs).abs().max() <= scale * theirs.abs().max()
        if dtype == torch.float32:
            assert torch.equal(generate_greedy(packed, tokens, 8), generate_greedy(model, tokens, 8))
    assert packed.weight_bytes == model.weight_bytes


def test_packed_is_refused_off_the_cpu_and_twice():
    from infermatrix.bench.matrix import parse_matrix
    from infermatrix.errors import UserError

    with pytest.raises(UserError, match="packed prepacks for oneDNN's CPU kernels"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "packed", "device": "cuda"}]})
    with pytest.raises(UserError, match="packed with compile: inductor cannot lower"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "packed+kv_cache+compile"}]})
    with pytest.raises(UserError, match="same axis 'linear'"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "packed+int8_weight_only"}]})


def test_the_roofline_streams_what_a_forward_reads():
    """A tied table left beside a variant's own head copy is not read per token: packed
    weights stream exactly the dense model's bytes, int8 ones the int8 head instead."""
    import dataclasses

    from infermatrix.bench.roofline import streamed_weight_bytes as roofline_streamed
    from infermatrix.bench.workloads import table_is_head
    from infermatrix.weights import random_model

    def streamed_weight_bytes(m):  # as the workloads count a forward's weight reads
        return roofline_streamed(m.config, dtype_bytes=2, weight_bytes=m.weight_bytes, table_is_head=table_is_head(m))

    tiny = load_model("tiny").model.config
    model = random_model(dataclasses.replace(tiny, tie_embeddings=True), torch.bfloat16, "cpu")
    assert model.config.tie_embeddings and streamed_weight_bytes(model) == model.weight_bytes
    packed = apply_variants(model, parse_spec("packed"))
    assert packed.weight_bytes > model.weight_bytes == streamed_weight_bytes(packed)
    int8 = apply_variants(model, parse_spec("int8_weight_only"))
    table = model.tok_embeddings.weight.numel() * 2
    assert streamed_weight_bytes(int8) == int8.weight_bytes - table < model.weight_bytes
