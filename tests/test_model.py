import pytest
import torch

from infermatrix.generate import generate_greedy
from infermatrix.model import SHAPE_PRESETS, ModelConfig, Transformer, causal_mask, math_attention
from infermatrix.weights import random_model

TINY = SHAPE_PRESETS["tiny"]


@pytest.fixture
def tiny():
    return random_model(TINY, torch.float32, "cpu", seed=1)


def test_logits_shape_and_finite(tiny):
    tokens = torch.randint(0, TINY.vocab_size, (2, 17))
    logits = tiny(tokens)
    assert logits.shape == (2, 17, TINY.vocab_size)
    assert torch.isfinite(logits).all()


def test_causal_future_tokens_do_not_change_past_logits(tiny):
    tokens = torch.randint(0, TINY.vocab_size, (1, 20))
    changed = tokens.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % TINY.vocab_size
    a, b = tiny(tokens), tiny(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_makes_logits_invariant_to_a_shift_of_all_positions(tiny):
    # Attention with RoPE depends only on relative positions.
    tokens = torch.randint(0, TINY.vocab_size, (1, 16))
    base = tiny(tokens)
    shifted = tiny(tokens, input_pos=torch.arange(16) + 37)
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)


def test_a_sliding_window_mask_keeps_the_last_w_keys_of_each_query():
    mask = causal_mask(3, 6, torch.device("cpu"), window=2)  # queries at positions 3, 4, 5
    assert mask.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False],
                             [False, False, False, False, True, True]]


def test_partial_rotary_rotates_the_leading_dims_and_leaves_the_rest():
    from infermatrix.model import apply_rope, rope_tables

    x = torch.randn(1, 2, 5, 16)
    cos, sin = rope_tables(8, torch.arange(5), 10000.0)  # (5, 8): half of each head rotates
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    # by hand: pairs (i, i + 4) of the first 8 dims turn by angle t * 10000^(-i/4)
    t = torch.arange(5.0)[:, None]  # (5, 1)
    angle = t * 10000.0 ** (-torch.arange(4.0) / 4)  # (5, 4)
    a, b = x[..., :4], x[..., 4:8]
    expected = torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1)
    torch.testing.assert_close(out[..., :8], expected)


def test_causal_mask_aligns_queries_with_the_last_keys():
    mask = causal_mask(2, 5, torch.device("cpu"))
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_gqa_equals_mha_with_repeated_kv_heads():
    q = torch.randn(2, 6, 5, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    # kv head j serves query heads j*3 .. j*3+2
    expected = math_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True)
    torch.testing.assert_close(math_attention(q, k, v, causal=True), expected)


def test_math_attention_matches_a_handwritten_loop():
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out = math_attention(q, k, v, causal=True)
    for i in range(3):
        scores = torch.stack([q[0, 0, i] @ k[0, 0, j] / 2.0 for j in range(i + 1)])
        expected = (scores.softmax(0)[:, None] * v[0, 0, : i + 1]).sum(0)
        torch.testing.assert_close(out[0, 0, i], expected)


def test_tied_embeddings_share_one_tensor():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48, tie_embeddings=True)
    model = random_model(cfg, torch.float32, "cpu")
    assert model.output.weight is model.tok_embeddings.weight
    assert model.weight_bytes == cfg.num_params() * 4


# the presets, and a config with every bias (Llama's attention_bias and mlp_bias)
@pytest.mark.parametrize("name", sorted(SHAPE_PRESETS) + ["all-biases"])
def test_num_params_matches_the_built_model(name):
    cfg = SHAPE_PRESETS.get(name) or ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                 hidden_dim=48, qkv_bias=True, o_bias=True, mlp_bias=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = {id(p): p.numel() for p in model.parameters()}  # tied weights once
    assert sum(counted.values()) == cfg.num_params()


def test_greedy_generation_is_argmax_of_full_recompute(tiny):
    prompt = torch.randint(0, TINY.vocab_size, (2, 5))
    new = generate_greedy(tiny, prompt, 4)
    tokens = prompt
    for i in range(4):
        nxt = tiny(tokens)[:, -1].argmax(-1)
        assert torch.equal(new[:, i], nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)


def test_context_overflow_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match="max_seq_len=512"):
        tiny(torch.zeros(1, 513, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=30, n_heads=4), "divisible by n_heads"),
        (dict(n_heads=4, n_kv_heads=3, dim=32), "multiple of n_kv_heads"),
        (dict(n_layers=0), "n_layers must be positive"),
        (dict(sliding_window=0), "sliding_window must be positive"),
        (dict(dim=64, n_heads=4, rotary_dim=7), "rotary_dim must be even and in 2..head_dim \\(16\\), got 7"),
        (dict(dim=64, n_heads=4, rotary_dim=18), "rotary_dim must be even"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


class ConcatCache:
    """The simplest cache honouring the model's protocol: append and return all."""

    def __init__(self):
        self.kv = {}

    def update(self, layer, input_pos, k, v):
        if layer in self.kv:
            k = torch.cat([self.kv[layer][0], k], dim=2)
            v = torch.cat([self.kv[layer][1], v], dim=2)
        self.kv[layer] = (k, v)
        return k, v

    def mask(self, input_pos):
        return None  # keys are exactly the filled prefix: the causal rule applies as is


def test_cache_seam_gives_the_logits_of_full_recompute(tiny):
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    full = tiny(tokens)
    cache = ConcatCache()
    head = tiny(tokens[:, :9], input_pos=torch.arange(9), cache=cache)
    tail = tiny(tokens[:, 9:], input_pos=torch.arange(9, 12), cache=cache)  # 3 queries, 12 keys
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-4, atol=1e-5)


def test_input_pos_must_give_one_position_per_token(tiny):
    with pytest.raises(ValueError, match="expected \\(4,\\), one position per token"):
        tiny(torch.zeros(1, 4, dtype=torch.long), input_pos=torch.tensor([3]))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_logits_stay_close_to_fp32(dtype, tol):
    """bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%), fp16 11 bits (0.05%);
    through 2 layers the error stays within a few steps of the logit scale."""
    ref = random_model(TINY, torch.float32, "cpu", seed=2)
    low = random_model(TINY, torch.float32, "cpu", seed=2).to(dtype)
    tokens = torch.randint(0, TINY.vocab_size, (1, 32))
    expected, got = ref(tokens), low(tokens).float()
    assert got.dtype == torch.float32 and low.layers[0].attention.wq.weight.dtype == dtype
    assert (got - expected).abs().max() <= tol * expected.abs().max()
