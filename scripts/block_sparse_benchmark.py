"""Block-sparse attention on this CPU: our kernel against dense causal SDPA and
against FlexAttention (torch.compile'd) on the same layout.

Batch 1, 8 heads, head dim 64, fp32; sliding-window layouts (causal) whose
window is chosen for each target density; density counts active (query block,
key block) pairs over all of them, so dense causal attention is ~50%.
Calls are interleaved round-robin (ours, SDPA, Flex, ...) so a noisy neighbour
slows all of them alike; medians and ratios are printed, and the break-even
density (where ours is as fast as dense SDPA) is interpolated.

    python scripts/block_sparse_benchmark.py                 # seq 4096 and 8192
    python scripts/block_sparse_benchmark.py --seq 4096 --densities 0.1 --no-flex
    python scripts/block_sparse_benchmark.py --device cuda   # the Triton kernel, bf16, block 128

On CUDA each layout is first checked against SDPA with the layout's dense mask
(fp32), then timed with triton.testing.do_bench (medians; L2 cleared between
calls) against dense causal SDPA (flash) and FlexAttention on the same layout.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from infermatrix.kernels.block_sparse_cpu import block_sparse_attention
from infermatrix.kernels.block_sparse_layout import default_block_size, sliding_window
from infermatrix.variants.flex import compiled_flex_attention, to_flex_block_mask


def window_for(seq: int, block: int, density: float) -> int:
    """The window (tokens) of the causal sliding layout whose density is nearest `density`."""
    n = seq // block
    best = min(range(1, n + 1), key=lambda w: abs(sum(min(i + 1, w) for i in range(n)) / n ** 2 - density))
    return best * block


def check_cuda(q, k, v, layout, out) -> float:
    """Max abs error of our output against SDPA in fp32 under the layout's dense mask."""
    mask = layout.dense_mask().to(q.device)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    err = (out.float() - ref).abs().max().item()
    if not err <= 1.6e-2 * (1 + ref.abs().max().item()):  # bf16 tolerance, as in the kernel tests
        raise SystemExit(f"block-sparse Triton kernel disagrees with masked SDPA: max abs err {err:.3e}")
    return err


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def report(seq: int, density: float, window: int, med: dict) -> None:
    flex_ms = med.get("flex", float("nan"))
    print(f"{seq:>5} {density:>7.1%} {window:>6} {med['ours']:>9.3f} {med['sdpa']:>9.3f} {flex_ms:>9.3f} "
          f"{med['sdpa'] / med['ours']:>8.2f}x {flex_ms / med['ours']:>8.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--block", type=int, help="block size (default: 64 on the CPU, 128 on CUDA)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each, after one warm-up")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: our Triton kernel in bf16 (default block 128) timed with do_bench")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    if cuda:
        from triton.testing import do_bench

        from infermatrix.kernels.block_sparse_triton import block_sparse_attention_triton
    args.block = args.block or default_block_size(args.device)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; batch 1, {args.heads} "
          f"heads, head dim {args.head_dim}, {dtype}, block {args.block}, sliding-window layouts; medians")
    print(f"{'seq':>5} {'density':>7} {'window':>6} {'ours ms':>9} {'sdpa ms':>9} {'flex ms':>9} "
          f"{'sdpa/ours':>9} {'flex/ours':>9}")
    for seq in args.seq:
        shape = (1, args.heads, seq, args.head_dim)
        q, k, v = (torch.randn(shape, device=args.device, dtype=dtype) for _ in range(3))
        rows = []
        for density in args.densities:
            window = window_for(seq, args.block, density)
            layout = sliding_window(seq, args.block, window)
            kernel = block_sparse_attention_triton if cuda else block_sparse_attention
            ours = lambda: kernel(q, k, v, layout)  # noqa: E731
            dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            fns = {"ours": ours, "sdpa": dense}
            if cuda:
                print(f"  seq {seq} density {layout.density:.1%}: max abs err vs masked SDPA "
                      f"{check_cuda(q, k, v, layout, ours()):.2e}")
            if not args.no_flex:
                block_mask = to_flex_block_mask(layout, args.device)
                fns["flex"] = lambda bm=block_mask: compiled_flex_attention()(q, k, v, block_mask=bm)
                tol = 2e-2 if cuda else 1e-4  # bf16 on CUDA
                torch.testing.assert_close(fns["flex"](), ours(), rtol=tol, atol=tol)  # same layout, same answer
            if cuda:
                med = {name: do_bench(fn, warmup=10, rep=50, return_mode="median") for name, fn in fns.items()}
                rows.append((layout.density, med))
                report(seq, layout.density, window, med)
                continue
            samples = {name: [] for name in fns}
            for name, fn in fns.items():  # warm-up (and Flex's compile)
                fn()
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    samples[name].append(timed(fn))
            med = {name: statistics.median(s) for name, s in samples.items()}
            rows.append((layout.density, med))
            report(seq, layout.density, window, med)
        # break-even: where sdpa/ours crosses 1, interpolated between measured densities
        ratios = [(d, m["sdpa"] / m["ours"]) for d, m in rows]
        even = next((d0 + (d1 - d0) * (r0 - 1) / (r0 - r1) for (d0, r0), (d1, r1) in zip(ratios, ratios[1:])
                     if r0 >= 1 > r1), None)
        if even is not None:
            print(f"{seq:>5} break-even density vs dense causal SDPA: ~{even:.0%}")
        elif ratios and ratios[-1][1] >= 1:
            print(f"{seq:>5} faster than dense causal SDPA at every density measured (up to {ratios[-1][0]:.0%})")
        else:
            print(f"{seq:>5} slower than dense causal SDPA at every density measured")


if __name__ == "__main__":
    main()
