"""Decode config sweep: tune the split-KV decode kernel on one NVIDIA GPU and pick its
DecodeConfig (< 4 minutes). A developer tool: the decode kernel's figures users read
come from `infermatrix run gpu`.

1. Sweep: for 32 query / 8 KV heads, head dim 128, fp16, batch 1 and 8, caches of
   4k, 16k and 64k keys, time kernel tilings (keys per step, warps, stages) at two
   split targets, then the best three tilings over six split targets and both merges.
2. Pick the one config with the best geometric-mean speedup over SDPA on the caches
   of >= 16k keys and check it: the decode tests' 20-call merge check
   (tests/kernels/test_decode_attention_triton.py, which reads the config from
   INFERMATRIX_DECODE_CONFIG). Then print its table: medians with L2 flushed before
   each call, CUDA-graph replays (GPU time alone) and host time per call (Python and
   launch overhead alone, measured while the GPU is kept busy).

    python scripts/gpu_decode_sweep.py [--out sweep.json] [--best best.json]
    python scripts/gpu_decode_sweep.py --candidates   # no sweep: the candidate configs
        against SDPA and against the read roofline, each timed in 3 interleaved rounds

Every time comes from the harness's timer, infermatrix.bench.timing.measure (CUDA
events around each call on an idle GPU, so a sample includes the launch), with its
L2 flush and CUDA-graph options; host time is the same timer on the CPU clock.

The read roofline is a Triton kernel that only streams K and V once (a sum per
program) at its best of a few grid sizes: no decode kernel can beat it, so it
shows how much any kernel, ours or SDPA's, has left.

`--best` writes the chosen config (only when its check passed): the values to make
DecodeConfig's defaults in infermatrix/kernels/decode_attention_triton.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from infermatrix.bench.timing import TimerConfig, measure
from infermatrix.kernels.decode_attention_triton import DecodeConfig, decode_attention

ROOT = Path(__file__).resolve().parent.parent
# L2 flushed before each call, the median of 10-100 calls (a fifth of a second at most per timing)
TIMER = TimerConfig(warmup_runs=3, min_runs=10, max_runs=100, target_ci_rel=0.02, max_time_s=0.2, l2_flush=True)
GRAPH_TIMER = dataclasses.replace(TIMER, cuda_graph=True)  # the same, replaying one CUDA graph of the call
HOST_TIMER = TimerConfig(warmup_runs=0, min_runs=200, max_runs=200, target_ci_rel=0.0, max_time_s=math.inf)

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SHAPES = [(batch, n) for batch in (1, 8) for n in (4096, 16384, 65536)]  # swept
TABLE_SHAPES = [(batch, n) for batch in (1, 8) for n in (1024, 4096, 16384, 65536)]  # reported
TILINGS = [(64, 4, 3), (64, 4, 4), (64, 4, 2), (32, 4, 3), (32, 4, 4), (128, 4, 3), (128, 4, 2),
           (64, 8, 3), (128, 8, 3), (128, 8, 4), (64, 2, 3), (32, 2, 4)]  # (block_n, num_warps, num_stages)
PROGRAMS_PER_SM = (1, 2, 3, 4, 6, 8)
CANDIDATES = [DecodeConfig(64, 4, 3, 2, fuse_combine=False), DecodeConfig(64, 4, 2, 3, fuse_combine=False),
              DecodeConfig(64, 4, 3, 2, fuse_combine=True, merge_rows=64),
              DecodeConfig(64, 4, 2, 3, fuse_combine=True, merge_rows=64),
              DecodeConfig(64, 4, 3, 2, fuse_combine=True), DecodeConfig(64, 4, 2, 3, fuse_combine=True)]


@triton.jit
def _read_kernel(K, V, Sums, chunk, n, BLOCK: tl.constexpr):
    """Sum one chunk of K and of V: the bytes a decode step must read, and nothing else."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid * chunk, tl.minimum(pid * chunk + chunk, n), BLOCK):
        ok = start + offs < n
        acc += tl.load(K + start + offs, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(V + start + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Sums + pid, tl.sum(acc, 0))


def roofline_ms(k: torch.Tensor, v: torch.Tensor) -> float:
    """Best median of the read-only kernel over a few grid sizes and warps."""
    n = k.numel()
    sms = torch.cuda.get_device_properties(k.device).multi_processor_count
    best = float("inf")
    for programs, warps in itertools.product((sms, 2 * sms, 4 * sms, 8 * sms), (4, 8)):
        chunk = triton.cdiv(triton.cdiv(n, programs), 4096) * 4096
        sums = torch.empty(triton.cdiv(n, chunk), device=k.device)
        best = min(best, gpu_ms(lambda: _read_kernel[(sums.numel(),)](k, v, sums, chunk, n, BLOCK=4096,
                                                                       num_warps=warps)))
    return best


def check(config: DecodeConfig) -> bool:
    """The decode tests' 20-call merge check, fp16 and bf16, run on this config."""
    env = {**os.environ, "INFERMATRIX_DECODE_CONFIG": json.dumps(dataclasses.asdict(config))}
    test = "tests/kernels/test_decode_attention_triton.py::test_merge_is_stable_over_fresh_caches"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test, "-k", "swept"],
                          cwd=ROOT, env=env).returncode == 0


def write_json(path: str, data) -> None:
    Path(path).write_text(json.dumps(data, indent=1), encoding="utf-8")


def inputs(batch: int, n: int):
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, KV_HEADS, n, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(2))
    return q, k, v


def gpu_ms(fn, timer: TimerConfig = TIMER) -> float:
    """Median milliseconds per call, through the harness's timer."""
    return measure(fn, device="cuda", config=timer).summary.median


def host_us(fn) -> float:
    """Median host microseconds per call while the GPU is busy (so launches never wait
    on it): the harness's timer on the CPU clock, which does not synchronize the GPU."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU spin: the launch queue absorbs every call
    us = measure(fn, device="cpu", config=HOST_TIMER).summary.median * 1e3
    torch.cuda.synchronize()
    return us


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sweep() -> tuple[dict, list[dict]]:
    """Stage 1: every tiling at 2 and 4 programs per SM, fused merge, on every shape.
    Stage 2: the three tilings with the best geometric-mean speedup at >= 16k keys,
    over every split target and both merges."""
    rows = []
    cases = {shape: inputs(*shape) for shape in SHAPES}
    baseline = {shape: gpu_ms(lambda: sdpa(*qkv)) for shape, qkv in cases.items()}

    def measure_config(config):  # its time and speedup over SDPA on every shape, into rows
        for (batch, n), (q, k, v) in cases.items():
            ms = gpu_ms(lambda: decode_attention(q, k, v, config=config))
            rows.append({"batch": batch, "cache_len": n, **dataclasses.asdict(config), "ms": ms,
                         "speedup": baseline[batch, n] / ms})

    for (block_n, warps, stages), pps in itertools.product(TILINGS, (2, 4)):
        measure_config(DecodeConfig(block_n, warps, stages, pps))
    tiling_score = geomean_speedups(rows, lambda r: (r["block_n"], r["num_warps"], r["num_stages"]))
    best_tilings = sorted(tiling_score, key=tiling_score.get, reverse=True)[:3]
    print(f"  best tilings (block_n, warps, stages): {best_tilings}")
    for (block_n, warps, stages), pps, fuse in itertools.product(best_tilings, PROGRAMS_PER_SM, (True, False)):
        if not (fuse and pps in (2, 4)):  # those were timed in stage 1
            measure_config(DecodeConfig(block_n, warps, stages, pps, fuse_combine=fuse))
    for batch, n in SHAPES:
        best = min((r for r in rows if (r["batch"], r["cache_len"]) == (batch, n)), key=lambda r: r["ms"])
        print(f"  batch {batch} cache {n:6}: SDPA {baseline[batch, n] * 1e3:7.1f} us, best {best['ms'] * 1e3:7.1f} us "
              f"(x{best['speedup']:.2f}) with block_n={best['block_n']} warps={best['num_warps']} "
              f"stages={best['num_stages']} programs/SM={best['programs_per_sm']} fused={best['fuse_combine']}")
    return baseline, rows


def geomean_speedups(rows: list[dict], key) -> dict:
    """Geometric mean of each key's best speedup per shape, over the caches of >= 16k keys."""
    best: dict = {}
    for r in rows:
        if r["cache_len"] >= 16384:
            shape = (r["batch"], r["cache_len"])
            best.setdefault(key(r), {})[shape] = max(best.get(key(r), {}).get(shape, 0.0), r["speedup"])
    return {k: math.exp(sum(math.log(s) for s in v.values()) / len(v)) for k, v in best.items()}


def choose(rows: list[dict]) -> DecodeConfig:
    """The config with the best geometric-mean speedup over SDPA at >= 16k keys."""
    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    score = geomean_speedups(rows, lambda r: tuple(r[f] for f in fields))
    return DecodeConfig(**dict(zip(fields, max(score, key=score.get))))


def final_table(config: DecodeConfig) -> list[dict]:
    table = []
    for batch, n in TABLE_SHAPES:
        q, k, v = inputs(batch, n)
        ours = lambda: decode_attention(q, k, v, config=config)  # noqa: E731
        theirs = lambda: sdpa(q, k, v)  # noqa: E731
        row = {"batch": batch, "cache_len": n, "ours_us": gpu_ms(ours) * 1e3, "sdpa_us": gpu_ms(theirs) * 1e3,
               "ours_graph_us": gpu_ms(ours, GRAPH_TIMER) * 1e3, "sdpa_graph_us": gpu_ms(theirs, GRAPH_TIMER) * 1e3,
               "ours_host_us": host_us(ours), "sdpa_host_us": host_us(theirs)}
        row["speedup"] = row["sdpa_us"] / row["ours_us"]
        row["ours_tbs"] = 2 * k.numel() * 2 / (row["ours_us"] * 1e-6) / 1e12
        table.append(row)
        print("  B{batch} {cache_len:6}: ours {ours_us:7.1f} us ({ours_tbs:.2f} TB/s) SDPA {sdpa_us:7.1f} "
              "x{speedup:.2f} | graph {ours_graph_us:7.1f} vs {sdpa_graph_us:7.1f} | host {ours_host_us:5.1f} vs "
              "{sdpa_host_us:5.1f} us".format(**row))
    return table


def compare_candidates(rounds: int = 3) -> list[dict]:
    """Each candidate against SDPA and the read roofline on every shape, timed in
    interleaved rounds (medians), with host time per call."""
    rows = []
    for batch, n in TABLE_SHAPES:
        q, k, v = inputs(batch, n)
        fns = {"sdpa": lambda: sdpa(q, k, v)}
        for i, config in enumerate(CANDIDATES):
            fns[f"c{i}"] = lambda config=config: decode_attention(q, k, v, config=config)
        samples = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(gpu_ms(fn) * 1e3)
        med = {name: sorted(t)[len(t) // 2] for name, t in samples.items()}
        roof = roofline_ms(k, v) * 1e3
        host = {name: host_us(fn) for name, fn in fns.items()}
        rows.append({"batch": batch, "cache_len": n, "roofline_us": roof, "us": med, "host_us": host,
                     "spread_us": {name: max(t) - min(t) for name, t in samples.items()}})
        print(f"  B{batch} {n:6}: roofline {roof:6.1f} us | SDPA {med['sdpa']:6.1f} (host {host['sdpa']:4.0f}) | "
              + " ".join(f"c{i} {med[f'c{i}']:6.1f} x{med['sdpa'] / med[f'c{i}']:.2f} (host {host[f'c{i}']:3.0f})"
                         for i in range(len(CANDIDATES))))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write every timing to this JSON file")
    parser.add_argument("--best", help="write the chosen DecodeConfig to this JSON file")
    parser.add_argument("--candidates", action="store_true", help="skip the sweep; compare CANDIDATES")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {__import__('triton').__version__}")
    if args.candidates:
        for i, config in enumerate(CANDIDATES):
            print(f"  c{i}: {config}")
        rows = compare_candidates()
        if args.out:
            write_json(args.out, {"candidates": [dataclasses.asdict(c) for c in CANDIDATES], "rows": rows})
        return 0
    print("sweep (fp16, 32/8 heads, head dim 128):")
    started = time.perf_counter()
    baseline, rows = sweep()
    print(f"  {len(rows)} timings in {time.perf_counter() - started:.0f} s")
    config = choose(rows)
    print(f"chosen: {config}; its merge check (pytest):")
    failures = [] if check(config) else [f"{config} failed the merge check"]  # timed; does it compute right?
    table = final_table(config)
    result = {"failures": failures, "chosen": dataclasses.asdict(config), "table": table, "sweep": rows,
              "sdpa_ms": {f"{b}x{n}": ms for (b, n), ms in baseline.items()}}
    if args.out:
        write_json(args.out, result)
    if args.best and not failures:  # never hand on a config that computed a wrong result
        write_json(args.best, dataclasses.asdict(config))
    if failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
