"""The grouped decode-step attention against PyTorch's SDPA (the trusted peer):
fp32 to rounding, bf16 within bf16's step, with and without a mask, GQA and MHA."""

import pytest
import torch
import torch.nn.functional as F

from infermatrix.kernels.decode_attention_grouped import grouped_decode_attention
from infermatrix.tolerances import ATTENTION, ROUNDED_ONCE, close


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, close(ATTENTION, "float32")),
                                        (torch.bfloat16, close(ROUNDED_ONCE, "bfloat16"))])
def test_matches_sdpa(heads, kv_heads, dtype, tol):
    """fp32: the same sums in another order. bf16: computed in fp32 from bf16 inputs,
    then rounded to bf16 once (infermatrix.tolerances)."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, 1, 64).to(dtype)
    k, v = torch.randn(2, kv_heads, 77, 64).to(dtype), torch.randn(2, kv_heads, 77, 64).to(dtype)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(grouped_decode_attention(q, k, v).float(), want, **tol)
    mask = torch.rand(2, 1, 1, 77) > 0.3
    mask[..., 0] = True  # every row sees a key
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_decode_attention(q, k, v, mask).float(), want, **tol)


def test_refuses_more_than_one_query():
    with pytest.raises(ValueError, match="one query per head"):
        grouped_decode_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
