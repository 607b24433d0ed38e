"""The sdpa variant against the reference math, with GQA and queries shorter than keys."""

import pytest
import torch
import torch.nn.functional as F

from infermatrix.model import math_attention
from infermatrix.tolerances import ATTENTION, close
from infermatrix.variants import apply_variants, parse_spec
from infermatrix.variants.sdpa import sdpa_attention
from infermatrix.weights import load_model

FP32 = close(ATTENTION, torch.float32)  # same math, different reduction order (infermatrix.tolerances)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("q_len, k_len", [(9, 9), (1, 9), (4, 9), (1, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_matches_math_attention(heads, kv_heads, q_len, k_len, causal):
    q = torch.randn(2, heads, q_len, 16)
    k, v = torch.randn(2, kv_heads, k_len, 16), torch.randn(2, kv_heads, k_len, 16)
    torch.testing.assert_close(sdpa_attention(q, k, v, causal=causal), math_attention(q, k, v, causal=causal), **FP32)


def test_query_shorter_than_keys_sees_its_prefix_only():
    """Independent oracle: the last query row of a full causal pass."""
    q, k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(sdpa_attention(q[:, :, 4:], k, v, causal=True), full[:, :, 4:], **FP32)
    torch.testing.assert_close(math_attention(q[:, :, 4:], k, v, causal=True), full[:, :, 4:], **FP32)


def test_model_with_sdpa_gives_reference_logits():
    model = load_model("tiny").model
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        ref = apply_variants(model, parse_spec("reference"))(tokens)
        fast = apply_variants(model, parse_spec("sdpa"))(tokens)
    torch.testing.assert_close(fast, ref, **FP32)
