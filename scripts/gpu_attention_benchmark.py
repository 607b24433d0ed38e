"""Our Triton attention kernels against PyTorch SDPA on one NVIDIA GPU (< 5 minutes).

1. Correctness on CUDA in fp16 and bf16: the prefill kernel (causal, non-causal,
   GQA, a query shorter than the keys) and the decode kernel (per-sequence
   lengths) against SDPA in fp32.
2. Prefill forward TFLOP/s, ours against SDPA's flash backend: batch 4, 32 heads,
   head dim 64 and 128, N from 1k to 16k, causal and not. Target: >= 0.9x.
3. Decode latency against SDPA: one query per sequence, 32 query heads over 8 KV
   heads, head dim 128, caches of 1k to 64k keys, batch 1 and 8. Target: faster
   than SDPA at long caches.

    python scripts/gpu_attention_benchmark.py [--quick] [--json out.json] [--head-dims 64 128]
        [--decode-config best.json]   # a DecodeConfig from scripts/gpu_decode_sweep.py --best
        [--parts checks,prefill,decode]

Timings are medians of triton.testing.do_bench (CUDA events, L2 cleared between
runs); the ratio is ours over theirs in throughput (> 1 means we are faster).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from infermatrix.kernels.attention_triton import flash_attention
from infermatrix.kernels.decode_attention_triton import DecodeConfig, decode_attention

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # see tests/kernels/test_attention_triton.py


def rand(*shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def within_tolerance(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """torch.testing's rule, |out - ref| <= atol + rtol * |ref|, with atol = rtol = TOL;
    and the max abs error."""
    err = (out.float() - ref).abs()
    return bool((err <= TOL[dtype] * (1 + ref.abs())).all()), err.max().item()


def write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str) -> bool:
    ok, worst = within_tolerance(out, ref, dtype)
    print(f"  {name}: max abs err {worst:.2e} {'ok' if ok else 'FAIL'}")
    return ok


def check_correctness() -> list[str]:
    failures = []
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (True, False):
            for heads, kv_heads, q_len, k_len, head_dim in ((8, 8, 1000, 1000, 64), (32, 8, 513, 513, 128),
                                                           (12, 4, 77, 1024, 128), (4, 4, 300, 300, 256)):
                q = rand(2, heads, q_len, head_dim, dtype=dtype)
                k, v = (rand(2, kv_heads, k_len, head_dim, dtype=dtype) for _ in range(2))
                mask = torch.ones(q_len, k_len, dtype=torch.bool, device="cuda").tril(k_len - q_len) if causal else None
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
                name = f"prefill {dtype} causal={causal} H={heads}/{kv_heads} Tq={q_len} Tk={k_len} D={head_dim}"
                if not close(flash_attention(q, k, v, causal=causal), ref, dtype, name):
                    failures.append(name)
        lengths = torch.tensor([[4096], [17], [1000], [3333]], device="cuda")
        q = rand(4, 32, 1, 128, dtype=dtype)
        k, v = (rand(4, 8, 4096, 128, dtype=dtype) for _ in range(2))
        mask = (torch.arange(4096, device="cuda") < lengths)[:, None, None, :]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        name = f"decode {dtype} lengths {lengths.flatten().tolist()}"
        if not close(decode_attention(q, k, v, kv_bounds=(torch.zeros_like(lengths), lengths)), ref, dtype, name):
            failures.append(name)
    return failures


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def prefill_table(quick: bool, head_dims: list[int]) -> list[dict]:
    rows = []
    lengths = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    for head_dim in head_dims:
        for causal in (False, True):
            for n in lengths:
                q, k, v = (rand(4, 32, n, head_dim, dtype=torch.float16) for _ in range(3))
                flops = 4 * 4 * 32 * n * n * head_dim * (0.5 if causal else 1.0)
                ours = bench(lambda: flash_attention(q, k, v, causal=causal))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    theirs = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                rows.append({"head_dim": head_dim, "causal": causal, "n": n, "ours_tflops": flops / ours / 1e9,
                             "sdpa_flash_tflops": flops / theirs / 1e9, "ratio": theirs / ours})
                print("  prefill D={head_dim} causal={causal!s:5} N={n:5}: ours {ours_tflops:6.1f} TFLOP/s, "
                      "SDPA flash {sdpa_flash_tflops:6.1f}, ratio {ratio:.2f}".format(**rows[-1]))
    return rows


def decode_table(quick: bool, config: DecodeConfig) -> list[dict]:
    rows = []
    lengths = (1024, 16384) if quick else (1024, 4096, 16384, 65536)
    for batch in (1, 8):
        for n in lengths:
            q = rand(batch, 32, 1, 128, dtype=torch.float16)
            k, v = rand(batch, 8, n, 128, dtype=torch.float16), rand(batch, 8, n, 128, dtype=torch.float16)
            ours = bench(lambda: decode_attention(q, k, v, config=config))
            theirs = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
            gbytes = 2 * k.numel() * k.element_size() / 1e9  # K and V read once
            rows.append({"batch": batch, "cache_len": n, "ours_us": ours * 1e3, "sdpa_us": theirs * 1e3,
                         "ours_gbs": gbytes / (ours / 1e3), "ratio": theirs / ours})
            print("  decode batch={batch} cache={cache_len:6}: ours {ours_us:8.1f} us ({ours_gbs:6.0f} GB/s), "
                  "SDPA {sdpa_us:8.1f} us, speedup {ratio:.2f}".format(**rows[-1]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer lengths (about one minute)")
    parser.add_argument("--json", help="also write the tables to this file")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="prefill head dims")
    parser.add_argument("--decode-config", help="a JSON DecodeConfig for the decode kernel (default: its own)")
    parser.add_argument("--parts", default="checks,prefill,decode",
                        help="comma-separated: checks, prefill, decode (default all; split them to run the "
                             "checks with INFERMATRIX_TRITON_AUTOTUNE=0, which compiles far fewer kernels)")
    args = parser.parse_args()
    config = DecodeConfig()
    if args.decode_config:
        with open(args.decode_config, encoding="utf-8") as f:
            config = DecodeConfig(**json.load(f))
    if not torch.cuda.is_available():
        print("needs a CUDA GPU; the kernels' CPU checks are the interpreter tests (pytest tests/kernels)")
        return 2
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton "
          f"{__import__('triton').__version__}")
    parts = set(args.parts.split(","))
    failures, prefill, decode = [], [], []
    if "checks" in parts:
        print("correctness (fp16, bf16 against SDPA in fp32):")
        failures = check_correctness()
    if "prefill" in parts:
        print("prefill forward, batch 4, 32 heads, fp16:")
        prefill = prefill_table(args.quick, args.head_dims)
        print(f"prefill: worst ratio {min(r['ratio'] for r in prefill):.2f} (target >= 0.90)")
    if "decode" in parts:
        print(f"decode, 32 query heads over 8 KV heads, head dim 128, fp16, {config}:")
        decode = decode_table(args.quick, config)
        long_decode = [r["ratio"] for r in decode if r["cache_len"] >= 16384]
        print(f"decode at >= 16k keys: speedups {', '.join(f'{r:.2f}' for r in long_decode)} (target > 1)")
    if args.json:
        write_json(args.json, {"failures": failures, "prefill": prefill, "decode": decode})
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
