"""int8 variants on this machine: runs benchmarks/int8.toml (or --matrix) through the
harness and prints, per workload and dtype, each variant's median speed against the
dense model in the same dtype, its weight bytes before/after and its drift.

    python scripts/int8_benchmark.py                    # the int8 matrix -> results/int8-<time>/
    python scripts/int8_benchmark.py --from results/x   # print the table of a finished run
    python scripts/int8_benchmark.py --paths            # the CPU matmul paths one layer can take
    python scripts/int8_benchmark.py --interleaved      # decode A/B in one process, variants taking turns

`--paths` times one SmolLM2 layer shape per candidate path (dense fp32/bf16,
aten._weight_int8pack_mm with bf16/fp32 activations, dequantize-then-F.linear,
torch._int_mm): how `int8_weight_only`'s CPU backend was chosen.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from infermatrix.bench.matrix import load_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.reports.record import read_records

LINEAR_AXIS = ("int8_weight_only", "torchao_int8_weight_only", "int8_llm", "int8_dynamic")


def dense_spec(spec: str) -> str:
    """The spec with its linear-axis variant removed: the dense baseline."""
    parts = [p for p in spec.split("+") if p.split("(")[0] not in LINEAR_AXIS]
    return "+".join(parts)


def print_table(records) -> None:
    ok = {r.case_id: r for r in records if r.status == "ok"}
    for r in records:
        if r.status != "ok":
            print(f"{r.status}: {r.case_id}: {r.reason}")
    by_key = {}
    for r in ok.values():
        c = r.case
        by_key[(c["workload"], c["dtype"], c["variant"], c["batch"] * c["prompt_len"])] = r
    for workload in ("decode", "prefill", "linear", "drift"):
        rows = sorted(k for k in by_key if k[0] == workload)
        if not rows:
            continue
        print(f"\n== {workload} ==")
        if workload == "drift":
            print(f"{'dtype':9} {'variant':40} {'ppl':>7} {'dppl%':>7} {'kl_mean':>9} {'top1%':>6} {'greedy':>6} "
                  f"{'MB':>7} {'dense MB':>8}")
        else:
            print(f"{'dtype':9} {'variant':40} {'tok/s':>8} {'ms p50':>9} {'ci_rel':>6} {'n':>3} {'x dense':>7} "
                  f"{'MB':>7} {'dense MB':>8}")
        for key in rows:
            m = by_key[key].metrics
            mb, dense_mb = m.get("weight_bytes", 0) / 1e6, m.get("weight_bytes_dense", 0) / 1e6
            if workload == "drift":
                print(f"{key[1]:9} {key[2]:40} {m['ppl']:7.3f} {m['ppl_delta_pct']:7.2f} {m['kl_mean']:9.5f} "
                      f"{m['top1_agree_pct']:6.1f} {int(m['greedy_match_len']):>3}/{m['greedy_tokens']:<2} "
                      f"{mb:7.1f} {dense_mb:8.1f}")
                continue
            base = by_key.get((key[0], key[1], dense_spec(key[2]) or "reference", key[3]))
            ratio = base.metrics["latency_ms_p50"] / m["latency_ms_p50"] if base else float("nan")
            if workload == "linear":  # an op: no tokens; shape in the name, GB/s in the tok/s column
                key = (*key[:2], f"{key[2]} M{m['m']} K{m['k']} N{m['n']}")
                m = {**m, "tokens_per_s": m.get("achieved_gbs") or 0.0}
            print(f"{key[1]:9} {key[2]:40} {m['tokens_per_s']:8.2f} {m['latency_ms_p50']:9.3f} "
                  f"{m['latency_ms_ci_rel']:6.3f} {m['latency_ms_n']:3d} {ratio:7.2f} {mb:7.1f} {dense_mb:8.1f}")


def _median_us(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


@torch.inference_mode()
def time_paths() -> None:
    """Median µs of each CPU path for SmolLM2's MLP up/down projections and its LM head."""
    from infermatrix.variants.int8 import quantize_per_channel, quantize_per_token

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'M':>4} {'K':>5} {'N':>6}  path: median µs")
    for m, k, n in [(1, 576, 1536), (1, 1536, 576), (1, 576, 49152), (64, 576, 1536), (64, 1536, 576)]:
        w = torch.randn(n, k) / k**0.5
        q, scale = quantize_per_channel(w)
        x32 = torch.randn(m, k)
        x16 = x32.to(torch.bfloat16)
        w16, s16 = w.to(torch.bfloat16), scale.to(torch.bfloat16)
        xq, _ = quantize_per_token(x32)
        paths = {
            "dense fp32": lambda: F.linear(x32, w),
            "dense bf16": lambda: F.linear(x16, w16),
            "int8pack bf16": lambda: torch.ops.aten._weight_int8pack_mm(x16, q, s16),
            "int8pack fp32": lambda: torch.ops.aten._weight_int8pack_mm(x32, q, scale),
            "dequant fp32": lambda: F.linear(x32, q.float() * scale[:, None]),
            "dequant bf16": lambda: F.linear(x16, q.to(torch.bfloat16) * s16[:, None]),
            "_int_mm (W8A8)": lambda: torch._int_mm(xq, q.t()),
        }
        repeats = 5 if n > 10000 or m > 1 else 20
        times = {name: _median_us(fn, repeats) for name, fn in paths.items()}
        print(f"{m:4d} {k:5d} {n:6d}  " + "  ".join(f"{name}: {t:.0f}" for name, t in times.items()), flush=True)


@torch.inference_mode()
def interleaved_decode(dtypes: list[str], specs: list[str], rounds: int, prompt_len: int, new_tokens: int) -> None:
    """Batch-1 cached decode of SmolLM2, the variants taking turns within each round, so a
    noisy neighbour on a shared machine slows every variant alike: medians and ratios to
    the dense model in the same dtype."""
    from infermatrix.bench.workloads import token_ids
    from infermatrix.generate import GreedyDecoder
    from infermatrix.variants import apply_variants, parse_spec
    from infermatrix.weights import DTYPES, load_model

    for dtype in dtypes:
        loaded = load_model("smollm2-135m", DTYPES[dtype])
        prompt = token_ids(loaded, prompt_len, None, 0)[None]  # (1, T) real text
        models = {spec: apply_variants(loaded.model, parse_spec(f"kv_cache+sdpa+{spec}" if spec else "kv_cache+sdpa"))
                  for spec in specs}
        caches = {spec: m.new_cache(1, prompt_len + new_tokens) for spec, m in models.items()}

        def decode_s(spec: str) -> float:
            decoder = GreedyDecoder(models[spec], prompt, new_tokens, cache=caches[spec])
            decoder.step()  # prefill, not timed
            t0 = time.perf_counter()
            for _ in range(new_tokens - 1):
                decoder.step()
            return (time.perf_counter() - t0) / (new_tokens - 1)

        for spec in specs:  # warm-up: two generations each
            decode_s(spec), decode_s(spec)
        samples: dict[str, list[float]] = {spec: [] for spec in specs}
        for r in range(rounds):
            for spec in specs[r % len(specs):] + specs[:r % len(specs)]:  # rotate who goes first
                samples[spec].append(decode_s(spec))
        dense = statistics.median(samples[specs[0]])
        print(f"\n== interleaved decode, {dtype}, prompt {prompt_len}, {new_tokens - 1} timed steps x {rounds} rounds, "
              f"{torch.get_num_threads()} threads ==")
        print(f"{'variant':28} {'tok/s':>8} {'ms/token p50':>12} {'min':>8} {'max':>8} {'x dense':>8} {'MB':>7}")
        for spec in specs:
            med = statistics.median(samples[spec])
            print(f"{spec or 'dense':28} {1 / med:8.2f} {med * 1e3:12.1f} {min(samples[spec]) * 1e3:8.1f} "
                  f"{max(samples[spec]) * 1e3:8.1f} {dense / med:8.2f} {models[spec].weight_bytes / 1e6:7.1f}",
                  flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrix", default="int8", help="matrix file or built-in name (default: int8)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: results/int8-<time>)")
    parser.add_argument("--from", dest="source", type=Path, help="print the table of an existing run folder")
    parser.add_argument("--paths", action="store_true", help="time the CPU matmul paths of one layer instead")
    parser.add_argument("--interleaved", action="store_true",
                        help="cached decode of each variant taking turns in one process (robust to noisy neighbours)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="--interleaved: dtypes (default: %(default)s)")
    parser.add_argument("--variants", default=",int8_weight_only,torchao_int8_weight_only,int8_llm,int8_dynamic",
                        help="--interleaved: linear variants, the first (empty: dense) is the baseline")
    parser.add_argument("--rounds", type=int, default=5, help="--interleaved: rounds (default: %(default)s)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's). 1 avoids OpenMP barrier stalls when the cores are "
                             "shared with other jobs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.paths:
        time_paths()
        return 0
    if args.interleaved:
        interleaved_decode(args.dtypes.split(","), args.variants.split(","), args.rounds, args.prompt_len,
                           args.new_tokens)
        return 0
    if args.source:
        print_table(read_records(args.source))
        return 0
    out = args.out or Path("results") / time.strftime("int8-%Y%m%d-%H%M%S")
    records = run_matrix(load_matrix(args.matrix), out, log=lambda line: print(line, file=sys.stderr))
    print(f"records: {out}")
    print_table(records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
