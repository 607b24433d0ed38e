"""Variants on the reference encoder: the attention seam with a key-padding mask
(sdpa, triton's per-row key bounds, block_sparse on non-causal layouts, one sequence
length at a time), the linear swaps (int8 weight-only and dynamic) and compile, each
against the reference encoder at its real (non-pad) positions."""

import pytest
import torch

from infermatrix.kernels.block_sparse_layout import make_layout
from infermatrix.model import math_attention
from infermatrix.tolerances import ATTENTION, close
from infermatrix.variants import apply_variants, parse_spec, unmet_requirements, with_attention
from infermatrix.weights import load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = close(ATTENTION, torch.float32)  # the same math in another summation order


@pytest.fixture(scope="module")
def encoder():
    return load_model("tiny-encoder", device=DEVICE).model


def _batch(lengths=(40, 23, 7), vocab=512):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]  # (B, T), right padding
    return tokens.to(DEVICE), mask.to(DEVICE)


def _run(model, spec, tokens, mask):
    with torch.no_grad():
        return apply_variants(model, parse_spec(spec))(tokens, mask)


def test_sdpa_with_padding_equals_reference(encoder):
    tokens, mask = _batch()
    expected = _run(encoder, "reference", tokens, mask)
    torch.testing.assert_close(_run(encoder, "sdpa", tokens, mask)[mask], expected[mask], **FP32)


@pytest.mark.skipif(unmet_requirements(parse_spec("triton"), DEVICE) is not None,
                    reason="the triton variant needs the triton package and CUDA or TRITON_INTERPRET=1")
def test_triton_prefill_kernel_takes_padding_as_per_row_key_bounds(encoder):
    """Not causal, each row of a sequence sees keys [0, its length): the prefill
    kernel's bounds; fp32 under the interpreter on a CPU."""
    tokens, mask = _batch((19, 12, 5))
    expected = _run(encoder, "reference", tokens, mask)
    torch.testing.assert_close(_run(encoder, "triton", tokens, mask)[mask], expected[mask], **FP32)


def test_int8_weight_only_and_dynamic_stay_close_to_reference(encoder):
    tokens, mask = _batch()
    expected = _run(encoder, "reference", tokens, mask)[mask]
    for spec in ("int8_weight_only", "int8_dynamic"):
        got = _run(encoder, spec, tokens, mask)[mask]
        cosine = torch.nn.functional.cosine_similarity(got.double(), expected.double(), dim=-1)
        assert cosine.min() > 0.999, spec  # int8 rounding, not a wrong layer (that gives ~0)
        assert not torch.equal(got, expected), spec  # the layers really were swapped
    assert type(apply_variants(encoder, parse_spec("int8_weight_only")).output).__name__ == "Int8WeightOnlyLinear"


@pytest.mark.slow
def test_compile_equals_reference(encoder):
    tokens, mask = _batch()
    expected = _run(encoder, "reference", tokens, mask)
    torch.testing.assert_close(_run(encoder, "compile", tokens, mask)[mask], expected[mask], **FP32)


@pytest.mark.parametrize("spec, pattern, params", [
    ("block_sparse(pattern=sliding,window=16,block=16)", "sliding", {"window": 16}),
    ("block_sparse(pattern=bigbird,window=16,n_random=1,block=16)", "bigbird", {"window": 16, "n_random": 1}),
    pytest.param("block_sparse(pattern=sliding,window=16,block=16,backend=triton)", "sliding", {"window": 16},
                 marks=pytest.mark.skipif(unmet_requirements(parse_spec("block_sparse(backend=triton)"), DEVICE)
                                          is not None, reason="needs triton and CUDA or TRITON_INTERPRET=1")),
])
def test_block_sparse_runs_non_causal_layouts_per_sequence_length(encoder, spec, pattern, params):
    """The reference with the padded length's non-causal layout as a dense mask, and the
    padding: block_sparse computes the same from only the layout's blocks."""
    tokens, mask = _batch()
    layout = make_layout(pattern, tokens.shape[1], 16, causal=False, **params)
    allowed = layout.dense_mask()[0].to(DEVICE)  # (T, T)
    assert not allowed.all()  # a layout that really leaves pairs out

    pad_rows = ~mask[:, None, :, None]  # (B, 1, T, 1): a pad query keeps every real key, so no row is empty

    def layout_reference(q, k, v, *, causal, mask=None):
        assert not causal
        return math_attention(q, k, v, causal=False, mask=mask & (allowed | pad_rows))

    with torch.no_grad():
        expected = with_attention(encoder, layout_reference)(tokens, mask)
        dense = encoder(tokens, mask)
    got = _run(encoder, spec, tokens, mask)
    torch.testing.assert_close(got[mask], expected[mask], **FP32)
    assert not torch.allclose(got[mask], dense[mask], **FP32)  # the layout changed what was computed


def test_block_sparse_refuses_masks_that_are_not_right_padding(encoder):
    tokens, mask = _batch()
    holes = mask.clone()
    holes[0, 3] = False  # a gap inside a sequence
    with pytest.raises(ValueError, match="only as right padding"):
        _run(encoder, "block_sparse(pattern=sliding,window=16,block=16)", tokens, holes)
