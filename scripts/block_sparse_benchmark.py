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
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from infermatrix.kernels.block_sparse_cpu import block_sparse_attention
from infermatrix.kernels.block_sparse_layout import sliding_window
from infermatrix.variants.flex import compiled_flex_attention, to_flex_block_mask


def window_for(seq: int, block: int, density: float) -> int:
    """The window (tokens) of the causal sliding layout whose density is nearest `density`."""
    n = seq // block
    best = min(range(1, n + 1), key=lambda w: abs(sum(min(i + 1, w) for i in range(n)) / n ** 2 - density))
    return best * block


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls of each, after one warm-up")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes a while)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch 1, {args.heads} heads, head dim "
          f"{args.head_dim}, fp32, block {args.block}, sliding-window layouts; medians of {args.rounds} calls")
    print(f"{'seq':>5} {'density':>7} {'window':>6} {'ours ms':>9} {'sdpa ms':>9} {'flex ms':>9} "
          f"{'sdpa/ours':>9} {'flex/ours':>9}")
    for seq in args.seq:
        shape = (1, args.heads, seq, args.head_dim)
        q, k, v = (torch.randn(shape) for _ in range(3))
        rows = []
        for density in args.densities:
            window = window_for(seq, args.block, density)
            layout = sliding_window(seq, args.block, window)
            ours = lambda: block_sparse_attention(q, k, v, layout)  # noqa: E731
            dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            fns = {"ours": ours, "sdpa": dense}
            if not args.no_flex:
                block_mask = to_flex_block_mask(layout, "cpu")
                fns["flex"] = lambda bm=block_mask: compiled_flex_attention()(q, k, v, block_mask=bm)
                torch.testing.assert_close(fns["flex"](), ours(), rtol=1e-4, atol=1e-4)  # same layout, same answer
            samples = {name: [] for name in fns}
            for name, fn in fns.items():  # warm-up (and Flex's compile)
                fn()
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    samples[name].append(timed(fn))
            med = {name: statistics.median(s) for name, s in samples.items()}
            rows.append((layout.density, med))
            flex_ms = med.get("flex", float("nan"))
            print(f"{seq:>5} {layout.density:>7.1%} {window:>6} "
                  f"{med['ours']:>9.1f} {med['sdpa']:>9.1f} {flex_ms:>9.1f} {med['sdpa'] / med['ours']:>8.2f}x "
                  f"{flex_ms / med['ours']:>8.2f}x", flush=True)
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
