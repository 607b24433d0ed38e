"""Numerical tolerances, in one place: every test of a kernel or variant against its
reference reads them, and the developer tools check through those tests (the
decode-config sweep runs the decode kernel's tests on the config it picks).

Each table maps a dtype name to the bound both atol and rtol take in torch.testing's
rule, |out - ref| <= atol + rtol * |ref|, where ref is computed in fp32 from the same
(already rounded) inputs. Next to each value: how it was justified.

Torch-free, so reading a bound imports nothing heavy: a dtype is its name, "float16",
or a torch.dtype, whose str() is "torch.float16".
"""

from __future__ import annotations

# The same math summed in another order, fp32 throughout: errors ~ sqrt(K)·eps·|v| with
# eps = 1.2e-7 and K (keys, features) in the hundreds: ~1e-6; 1e-5 leaves 10x headroom.
FP32_REORDER = 1e-5

# A Triton attention kernel (prefill, split-KV decode, block-sparse) against SDPA in fp32.
ATTENTION = {
    # the same softmax(QK^T)V in another order (online softmax, split keys)
    "float32": FP32_REORDER,
    # P rounded to fp16 before P·V (2^-11 relative) and the output rounded to fp16
    # (half an ulp, |out| <= max|v| ~ 4): ~1e-3 worst case
    "float16": 2e-3,
    # the same two roundings with bf16's 2^-8 in place of 2^-11 (GPU only: the interpreter has no bf16)
    "bfloat16": 1.6e-2,
}

# A half-precision CPU kernel that computes in fp32 from the half inputs and rounds its
# unit-scale output once (grouped decode attention, the CPU block-sparse kernel).
ROUNDED_ONCE = {
    "float16": 2e-3,  # one rounding: 2^-11 relative of outputs up to ~4
    "bfloat16": 2e-2,  # one rounding: 2^-8 relative of outputs up to ~4 (2^-8 * 4 = 1.6e-2, rounded up)
}

# The weight-only int8 Triton matmul against dequantize-then-matmul on the same int8 weights:
# only the matmul differs.
INT8_MATMUL = {
    "float32": 1e-4,  # ieee tl.dot, another reduction order: ~K·eps·|x||w| with K ~ 100 -> 1e-4
    "float16": 2e-3,  # products accumulate in fp32 in both; one rounding of ~unit outputs, 2^-11, remains
    "bfloat16": 1e-2,  # the same rounding at bf16's 2^-8
}

# int8 linear layers against the unquantized ones: relative L2 of the output, KL in nats.
# Per weight the error is at most half a step (1/254 of its row's max), averaged down over
# K terms; int8_dynamic adds the same for the activations.
INT8_LINEAR_REL_L2 = 0.02  # one layer moves its output well under 1%: 2x headroom (bf16 at decode sizes)
# Through the tiny model's 2 layers of 7 linears and its head the logits move 0.9-1.3%
# (measured, KL ~2e-6 with the tests' seeds); a wrong scale (x2) or a dropped layer shows as > 50%.
INT8_LOGITS_REL_L2 = 0.04  # 3x the measured worst
INT8_LOGITS_KL_MEAN = 2e-5  # 10x the measured


def dtype_name(dtype: object) -> str:
    """ "float16" for torch.float16 or "float16"."""
    return str(dtype).removeprefix("torch.")


def close(table: dict[str, float], dtype: object) -> dict[str, float]:
    """atol and rtol for torch.testing.assert_close: `assert_close(out, ref, **close(ATTENTION, dtype))`."""
    bound = table[dtype_name(dtype)]
    return {"atol": bound, "rtol": bound}


def within(out, ref, dtype: object, table: dict[str, float] = ATTENTION) -> tuple[bool, float]:
    """Whether out (any dtype) is within the table's bound of the fp32 ref by torch.testing's
    rule, and the largest absolute error: for a tool that reports the error, not only a verdict."""
    bound = table[dtype_name(dtype)]
    err = (out.float() - ref).abs()
    return bool((err <= bound * (1 + ref.abs())).all()), float(err.max())
