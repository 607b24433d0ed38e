"""Pure kernel functions on tensors (Triton and torch); nothing here knows about
models or variants."""

import os


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1):
    correct results in fp32/fp16, meaningless timings, and no bfloat16."""
    return os.environ.get("TRITON_INTERPRET") == "1"
