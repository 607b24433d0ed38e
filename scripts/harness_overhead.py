"""How much does the timing harness itself add to a measurement?

Calibrates a CPU matmul to about 1 ms, then alternates two ways of timing it, the
order swapped every round (ABBA) so drift (clock boost, other load) cancels:

  raw      the harness's clock alone: a loop of infermatrix.bench.timing.time_once
           (`perf_counter_ns` around the op, nothing else)
  measure  infermatrix.bench.timing.measure with its bookkeeping running every sample

and prints both medians, the overhead in percent against the 2% target, and the
harness's bookkeeping cost per sample (outside the timed region, so it costs wall
time, not accuracy). `--matrix NAME` also times a whole `infermatrix run`.

    .venv/bin/python scripts/harness_overhead.py [--rounds 8] [--samples 300] [--matrix ci]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from infermatrix.bench.timing import TimerConfig, measure, time_once

TARGET_MS = 1.0
TARGET_OVERHEAD_PCT = 2.0
CPU = torch.device("cpu")


def raw_loop(fn: Callable[[], object], n: int) -> list[float]:
    """n samples of the harness's bare clock: no stopping rule, no sorted copy, no checks."""
    return [time_once(fn, CPU) for _ in range(n)]


def calibrated_matmul(target_ms: float) -> tuple[Callable[[], object], int]:
    """A square fp32 matmul sized so one call takes about target_ms (time ~ size**3)."""
    size = 64
    for _ in range(8):
        a, b = torch.randn(size, size), torch.randn(size, size)
        op = lambda a=a, b=b: torch.mm(a, b)  # noqa: E731
        raw_loop(op, 5)  # warm
        ms = statistics.median(raw_loop(op, 21))
        if abs(ms - target_ms) < 0.1 * target_ms:
            break
        size = max(16, round(size * (target_ms / ms) ** (1 / 3)))
    return op, size


def run_matrix(matrix: str) -> None:
    exe = Path(sys.executable).with_name("infermatrix")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "infermatrix.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "run", matrix, "--out", str(out)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
    print(f"infermatrix run {matrix}: exit {proc.returncode}, wall {wall:.1f} s")
    if proc.returncode:
        print(proc.stderr[-2000:], file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds (each times both methods)")
    parser.add_argument("--samples", type=int, default=300, help="timed calls per method per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise)")
    parser.add_argument("--matrix", help="also run `infermatrix run MATRIX` and print its wall time")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    op, size = calibrated_matmul(TARGET_MS)
    # No CI stop, fixed count: both methods get the same number of samples, and the
    # stopping checks run all the way (the bookkeeping we want to measure).
    config = TimerConfig(warmup_runs=5, min_runs=args.samples, max_runs=args.samples, target_ci_rel=0.0,
                         max_time_s=float("inf"))

    raw_all: list[float] = []
    harness_all: list[float] = []
    bookkeeping_us: list[float] = []
    per_round_pct: list[float] = []  # paired within a round: a noise gauge for the pooled figure
    for r in range(args.rounds):
        medians = {}
        for method in (("raw", "measure") if r % 2 == 0 else ("measure", "raw")):
            if method == "raw":
                raw_loop(op, 5)  # the same warm-up as measure's
                samples = raw_loop(op, args.samples)
                raw_all += samples
                medians[method] = statistics.median(samples)
            else:
                t0 = time.perf_counter()  # how long measure() itself took: its bookkeeping is the figure
                m = measure(op, device="cpu", config=config)
                wall_ms = (time.perf_counter() - t0) * 1e3
                harness_all += m.samples_ms
                medians[method] = m.summary.median
                timed_ms = sum(m.samples_ms) + m.warmup_runs * m.summary.median  # warm-up estimated
                bookkeeping_us.append((wall_ms - timed_ms) / len(m.samples_ms) * 1e3)
        per_round_pct.append((medians["measure"] - medians["raw"]) / medians["raw"] * 100)

    raw_med, harness_med = statistics.median(raw_all), statistics.median(harness_all)
    overhead = (harness_med - raw_med) / raw_med * 100
    print(f"op: {size}x{size} fp32 matmul, {torch.get_num_threads()} thread(s); "
          f"{args.rounds} ABBA rounds x {args.samples} samples per method")
    print(f"raw time_once loop median:       {raw_med:.4f} ms")
    print(f"measure() median:                {harness_med:.4f} ms")
    print(f"overhead: {overhead:+.2f}% (pooled medians; per-round pairs range "
          f"{min(per_round_pct):+.2f}% .. {max(per_round_pct):+.2f}%, machine noise)")
    print(f"harness bookkeeping outside the timed region: {statistics.median(bookkeeping_us):.1f} us/sample")
    verdict = "UNDER" if abs(overhead) < TARGET_OVERHEAD_PCT else "NOT under"
    print(f"{verdict} the {TARGET_OVERHEAD_PCT:.0f}% target")
    if args.matrix:
        run_matrix(args.matrix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
