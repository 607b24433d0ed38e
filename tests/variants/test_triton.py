"""The `triton` variant inside the model: same logits and tokens as `reference`."""

import pytest
import torch

from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.generate import generate_greedy
from infermatrix.tolerances import ATTENTION, close
from infermatrix.variants import apply_variants, parse_spec, unmet_requirements
from infermatrix.variants.kv_cache import left_pad
from infermatrix.variants.triton_attention import mask_bounds
from infermatrix.weights import load_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32 = close(ATTENTION, torch.float32)  # the same math in another summation order


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device=DEVICE).model


def test_prefill_logits_equal_reference(tiny):
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 24), device=DEVICE)
    with torch.no_grad():
        ref = apply_variants(tiny, parse_spec("reference"))(tokens)
        out = apply_variants(tiny, parse_spec("triton"))(tokens)
    torch.testing.assert_close(out, ref, **FP32)


def test_cached_decode_of_prompts_of_different_lengths_equals_reference(tiny):
    """Left-padded prompts of lengths 5, 11 and 8: prefill through the bounded
    prefill kernel, then every step through the split-KV decode kernel."""
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,)) for n in (5, 11, 8)]
    tokens, pad = left_pad(prompts)
    tokens, pad = tokens.to(DEVICE), pad.to(DEVICE)
    with torch.no_grad():
        expected = generate_greedy(apply_variants(tiny, parse_spec("kv_cache+reference")), tokens, 4, pad=pad)
        got = generate_greedy(apply_variants(tiny, parse_spec("kv_cache+triton")), tokens, 4, pad=pad)
    assert torch.equal(got, expected)


def test_mask_bounds_are_each_rows_key_range():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)[None, None]
    lo, hi = mask_bounds(mask)
    assert lo.tolist() == [[1, 0, 0]] and hi.tolist() == [[3, 0, 4]]


def test_a_mask_with_holes_is_refused():
    mask = torch.tensor([[1, 0, 1]], dtype=torch.bool)[None, None]
    with pytest.raises(ValueError, match="one contiguous range of keys"):
        mask_bounds(mask)


def test_without_cuda_or_interpreter_the_case_is_skipped_with_its_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert unmet_requirements(parse_spec("triton"), "cpu") == "triton needs CUDA (device is cpu)"


@pytest.mark.parametrize("spec", ["triton", "block_sparse(backend=triton)", "int8_weight_only(backend=triton)"])
def test_every_forced_triton_backend_needs_cuda_or_the_interpreter(spec, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    name = spec.split("(")[0]
    assert unmet_requirements(parse_spec(spec), "cpu") == f"{name} needs CUDA (device is cpu)"
    assert unmet_requirements(parse_spec(name), "cpu") == (None if name != "triton" else
                                                           "triton needs CUDA (device is cpu)")


def test_interpreted_records_are_marked(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA, where the interpreter runs the kernel")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False},
                           "cases": [{"model": "tiny", "variant": ["sdpa", "triton", "block_sparse(backend=triton,block=16)"],
                                      "workload": "attention", "prompt_len": 32}]})
    sdpa, triton, sparse = run_matrix(matrix, tmp_path, log=lambda line: None)
    assert triton.status == sparse.status == "ok", (triton.reason, sparse.reason)
    assert triton.metrics["triton_interpreted"] is True and sparse.metrics["triton_interpreted"] is True
    assert "triton_interpreted" not in sdpa.metrics
    assert triton.metrics["attention_path"] == "triton_flash"
    assert sparse.metrics["attention_path"] == "block_sparse_triton"


def test_interpretation_is_marked_whatever_the_device(monkeypatch):
    """Under TRITON_INTERPRET=1 a Triton kernel runs interpreted on CUDA tensors too;
    so does a path that took Triton without requiring it (int8_weight_only's auto on CUDA)."""
    from infermatrix.variants import runs_in_triton_interpreter

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert runs_in_triton_interpreter(parse_spec("triton"))
    assert runs_in_triton_interpreter(parse_spec("int8_weight_only"), {"linear_path": "triton"})
    assert not runs_in_triton_interpreter(parse_spec("int8_weight_only"), {"linear_path": "int8pack"})
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not runs_in_triton_interpreter(parse_spec("triton"), {"attention_path": "triton_flash"})
