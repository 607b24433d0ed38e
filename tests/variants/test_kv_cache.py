"""kv_cache: cached decoding gives the logits of full recomputation at every step,
for batch 1 and for a batch of prompts of different lengths (left padding)."""

import pytest
import torch

from infermatrix.generate import GreedyDecoder, generate_greedy
from infermatrix.variants import apply_variants, parse_spec
from infermatrix.variants.kv_cache import StaticKVCache, left_pad
from infermatrix.weights import load_model

# fp32: the cached step computes the same dot products over a longer, masked key
# buffer (exact zeros for the hidden slots), so only reduction order differs: ~1e-6.
FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny").model


def step_logits(model, tokens, cache, pos):
    with torch.no_grad():
        return model(tokens, torch.tensor(pos), cache)[:, -1]


PREFIX = ["kv_cache(prefix=true)", "kv_cache(prefix=true)+sdpa"]


@pytest.mark.parametrize("spec", ["kv_cache", "kv_cache+sdpa", *PREFIX])
def test_every_cached_step_matches_full_recompute(tiny, spec):
    cached = apply_variants(tiny, parse_spec(spec))
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 20))
    cache = cached.new_cache(1, 20)
    with torch.no_grad():
        logits = cached(tokens[:, :8], torch.arange(8), cache)  # prefill
        torch.testing.assert_close(logits, tiny(tokens[:, :8]), **FP32)
        for t in range(8, 20):
            step = cached(tokens[:, t:t + 1], torch.tensor([t]), cache)[:, -1]
            torch.testing.assert_close(step, tiny(tokens[:, : t + 1])[:, -1], **FP32)


@pytest.mark.parametrize("spec", ["kv_cache", "kv_cache+sdpa", *PREFIX])
def test_a_batch_of_different_lengths_decodes_like_each_prompt_alone(tiny, spec):
    cached = apply_variants(tiny, parse_spec(spec))
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,)) for n in (5, 11, 8)]
    tokens, pad = left_pad(prompts)
    assert pad.tolist() == [6, 0, 3] and torch.equal(tokens[0, 6:], prompts[0])
    decoder = GreedyDecoder(cached, tokens, 6, pad)
    with torch.no_grad():
        batched = torch.cat([decoder.step() for _ in range(6)], dim=1)  # (3, 6)
    for row, prompt in enumerate(prompts):
        alone = generate_greedy(tiny, prompt[None], 6)  # recompute, no padding
        assert torch.equal(batched[row], alone[0]), row


@pytest.mark.parametrize("spec", ["kv_cache", "kv_cache+sdpa(decode=grouped)", *PREFIX])
def test_a_models_own_window_holds_in_every_cache_mask_with_padding(spec):
    """tiny with a window of 4 tokens: a left-padded batch decodes past the window like
    each prompt alone without a cache (the reference's window mask), and differently
    from the same weights without a window."""
    import dataclasses

    from infermatrix.model import SHAPE_PRESETS
    from infermatrix.weights import random_model

    windowed = random_model(dataclasses.replace(SHAPE_PRESETS["tiny"], sliding_window=4), torch.float32, "cpu")
    cached = apply_variants(windowed, parse_spec(spec))
    prompts = [torch.randint(0, windowed.config.vocab_size, (n,)) for n in (5, 11, 8)]
    tokens, pad = left_pad(prompts)
    decoder = GreedyDecoder(cached, tokens, 8, pad)
    with torch.no_grad():
        batched = torch.cat([decoder.step() for _ in range(8)], dim=1)  # (3, 8)
        for row, prompt in enumerate(prompts):
            assert torch.equal(batched[row], generate_greedy(windowed, prompt[None], 8)[0]), row
            assert torch.equal(generate_greedy(cached, prompt[None], 8), batched[row:row + 1]), row
        unwindowed = random_model(SHAPE_PRESETS["tiny"], torch.float32, "cpu")
        long = torch.randint(0, windowed.config.vocab_size, (1, 12))
        assert not torch.allclose(windowed(long)[:, -1], unwindowed(long)[:, -1], atol=1e-4)


def test_cached_and_recomputed_greedy_tokens_agree(tiny):
    prompt = torch.randint(0, tiny.config.vocab_size, (2, 10))
    cached = apply_variants(tiny, parse_spec("kv_cache"))
    assert torch.equal(generate_greedy(cached, prompt, 24), generate_greedy(tiny, prompt, 24))


def test_cache_holds_kv_heads_in_the_model_dtype_and_counts_its_bytes(tiny):
    cfg = tiny.config
    cache = apply_variants(tiny.to(torch.bfloat16), parse_spec("kv_cache")).new_cache(3, 40)
    assert len(cache.k) == cfg.n_layers and all(
        k.shape == (3, cfg.n_kv_heads, 40, cfg.head_dim) and k.dtype == torch.bfloat16 for k in (*cache.k, *cache.v))
    assert cache.nbytes == 2 * cfg.n_layers * 3 * cfg.n_kv_heads * 40 * cfg.head_dim * 2
    tiny.to(torch.float32)


def test_the_base_model_keeps_decoding_without_a_cache(tiny):
    apply_variants(tiny, parse_spec("kv_cache"))
    assert tiny.new_cache(1, 8) is None and tiny.cache_factory is None


def test_bad_input_is_refused_before_decoding(tiny):
    cached = apply_variants(tiny, parse_spec("kv_cache"))
    prompt = torch.zeros(1, 500, dtype=torch.long)
    with torch.no_grad():
        with pytest.raises(ValueError, match="prompt \\+ new tokens = 520 positions exceed the model's context"):
            generate_greedy(cached, prompt, 20)
        cache = cached.new_cache(2, 16)
        with pytest.raises(ValueError, match="batch of 3 sequences, but this KV cache was built for 2"):
            cached(torch.zeros(3, 4, dtype=torch.long), torch.arange(4), cache)
        with pytest.raises(ValueError, match="left-padded prompts need a KV cache"):
            GreedyDecoder(tiny, torch.zeros(2, 4, dtype=torch.long), 2, pad=torch.tensor([1, 0]))


def test_padded_rows_never_produce_nans(tiny):
    cache = StaticKVCache(2, 2, 2, 8, 16, torch.float32, "cpu", pad=torch.tensor([5, 0]))
    mask = cache.mask(torch.arange(8))  # (2, 1, 8, 8)
    assert mask.shape == (2, 1, 8, 8) and mask.any(-1).all()  # every query sees at least itself
    assert not mask[0, 0, 6, :5].any() and mask[0, 0, 6, 5:7].all()  # padding hidden, real prefix seen


@pytest.mark.slow
def test_smollm2_64_greedy_tokens_match_recompute(smollm2):
    prompt = torch.tensor([smollm2.tokenizer.encode("The Python language reference says that").ids])
    cached = apply_variants(smollm2.model, parse_spec("kv_cache+sdpa"))
    with torch.inference_mode():
        assert torch.equal(generate_greedy(cached, prompt, 64), generate_greedy(smollm2.model, prompt, 64))


@pytest.mark.slow
@pytest.mark.parametrize("eager_spec,compiled_spec", [
    ("kv_cache+sdpa", "kv_cache+sdpa+compile"),
    # freezing: weights as graph constants, linears prepacked by inductor; grouped decode traced
    ("fused+kv_cache+sdpa(decode=grouped)", "fused+kv_cache+sdpa(decode=grouped)+compile(freeze=true)"),
])
def test_compiled_cached_decode_matches_eager(tiny, eager_spec, compiled_spec):
    """torch.compile (inductor on the CPU; the first call compiles, ~1 min here).
    The compiled step writes the cache's own per-layer tensors in place."""
    eager = apply_variants(tiny, parse_spec(eager_spec))
    compiled = apply_variants(tiny, parse_spec(compiled_spec))
    assert not hasattr(eager, "_orig_mod") and compiled.forward is not eager.forward
    prompt = torch.randint(0, tiny.config.vocab_size, (2, 12))
    with torch.inference_mode():
        cache = compiled.new_cache(2, 20)
        layer0_keys = cache.k[0].data_ptr()
        for t in range(2):  # the second generation reuses the compiled graphs and the cache
            decoder = GreedyDecoder(compiled, prompt, 8, cache=cache)
            tokens = torch.cat([decoder.step() for _ in range(8)], dim=1)
            assert torch.equal(tokens, generate_greedy(eager, prompt, 8)), t
        step = compiled(prompt[:, :1], torch.tensor([12]), cache)
        ref_cache = eager.new_cache(2, 20)
        eager(decoder.tokens[:, :12], torch.arange(12), ref_cache)
        torch.testing.assert_close(step, eager(prompt[:, :1], torch.tensor([12]), ref_cache), **FP32)
        assert cache.k[0].data_ptr() == layer0_keys  # the same storage, written in place by the graph
        torch.testing.assert_close(cache.k[0][:, :, :13], ref_cache.k[0][:, :, :13], **FP32)


def test_compile_mode_is_checked():
    from infermatrix.errors import UserError

    with pytest.raises(UserError, match="mode 'turbo' is not valid; valid: auto, default, reduce-overhead"):
        parse_spec("compile(mode=turbo)")


def test_prefix_attends_over_the_filled_slots_only_and_without_a_mask(tiny, monkeypatch):
    """kv_cache(prefix=true): each step's attention gets keys [0, position] and no
    mask (no padding), so SDPA runs its fused path instead of a masked pass over the
    whole buffer; the static cache gets the whole buffer and a mask."""
    import infermatrix.variants.sdpa as sdpa_module

    seen = []
    real = sdpa_module.sdpa_attention

    def spy(q, k, v, *, causal, mask=None):
        seen.append((q.shape[2], k.shape[2], mask is None))
        return real(q, k, v, causal=causal, mask=mask)

    monkeypatch.setattr(sdpa_module, "sdpa_attention", spy)
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 12))
    for spec, want in (("kv_cache(prefix=true)+sdpa", [(8, 8, True), (1, 9, True), (1, 10, True)]),
                       ("kv_cache+sdpa", [(8, 11, False), (1, 11, False), (1, 11, False)])):
        seen.clear()
        generate_greedy(apply_variants(tiny, parse_spec(spec)), tokens[:, :8], 3)
        layers = tiny.config.n_layers
        assert seen == [shape for shape in want for _ in range(layers)], (spec, seen[::layers])


def test_prefix_is_refused_where_shapes_must_stay_static():
    from infermatrix.bench.matrix import parse_matrix
    from infermatrix.errors import UserError

    with pytest.raises(UserError, match="compile would recompile each step"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "kv_cache(prefix=true)+sdpa+compile"}]})
    with pytest.raises(UserError, match="with block_sparse: the layout attends over its own rows"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "kv_cache(prefix=true)+block_sparse"}]})


@pytest.mark.parametrize("spec", ["kv_cache+sdpa(decode=grouped)", "kv_cache(prefix=true)+sdpa(decode=grouped)"])
def test_grouped_decode_steps_match_recompute_and_say_so(tiny, spec):
    from infermatrix.variants import take_paths

    take_paths()
    test_every_cached_step_matches_full_recompute(tiny, spec)
    assert take_paths() == {"attention_path": "grouped_decode+sdpa"}
    test_a_batch_of_different_lengths_decodes_like_each_prompt_alone(tiny, spec)  # a mask per row
