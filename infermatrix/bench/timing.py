"""A basic timer: warm-up runs excluded, then `repeat` timed runs.

On CUDA the device is synchronized before each clock read so the kernels' time is
counted, not only their launch; on the CPU `perf_counter_ns` is read directly.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """One call of fn, in milliseconds."""
    _sync(device)
    start = time.perf_counter_ns()
    fn()
    _sync(device)
    return (time.perf_counter_ns() - start) / 1e6


def time_calls(fn: Callable[[], object], *, warmup: int, repeat: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    return [time_once(fn, device) for _ in range(repeat)]


def summarize(samples_ms: list[float], prefix: str) -> dict[str, float]:
    """Median, mean, min, max and stdev of samples, named `{prefix}_{stat}`."""
    return {
        f"{prefix}_p50": statistics.median(samples_ms),
        f"{prefix}_mean": statistics.fmean(samples_ms),
        f"{prefix}_min": min(samples_ms),
        f"{prefix}_max": max(samples_ms),
        f"{prefix}_stdev": statistics.stdev(samples_ms) if len(samples_ms) > 1 else 0.0,
    }
