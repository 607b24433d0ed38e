"""The timer: warm-up excluded, then adaptive repetition until the 95% confidence
interval of the median is tight, a run count is reached, or a time budget is spent.

Clocks: on the CPU `perf_counter_ns` around the call; on CUDA a pair of
`torch.cuda.Event(enable_timing=True)` recorded around the call on the current stream,
read after synchronizing on the end event (so the kernels' time is counted, not only
their launch). The host is synchronized before each sample, so every sample starts
with an idle device and includes launch overhead, as a batch-1 latency should.

Lean loop: the harness keeps a sorted copy of the samples (a binary insertion per
sample) and the CI ranks of the median are cached per n (`stats.median_ci_rank`), so
one check of the stopping rule is a few list look-ups. It runs after every sample up
to 64 samples and then every n // 32 samples (at most ~3% extra samples past the
point where the rule first holds). Nothing of this runs inside the timed region.

Interleaved A/B (`infermatrix ab`): a case process of one side installs a `Turns`
controller with `interleave_with`; measure() then warms up as configured and, instead
of its own stopping rule, samples in turns the controller grants (the A/B driver
alternates the two sides' turns) until it is told to stop. The samples of all turns
form the TimerResult, as usual, and the controller is told each turn's samples.

A timed region around the sampling (`around_timed`, say an energy meter's window):
entered after warm-up, around the whole sampling loop, or around each turn's sampling
when taking turns; never around warm-up, graph capture or the wait for a turn.
"""

from __future__ import annotations

import bisect
import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from infermatrix.bench.stats import Summary, median_ci_rank, min_samples_for_ci, percentile, relative, summarize

CI_CONFIDENCE = 0.95  # the confidence of the median's CI that target_ci_rel refers to
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB, B200: 126 MB)
_CAPTURE_WARMUP = 3  # eager calls on a side stream before CUDA-graph capture, as torch's docs do
_CHECK_EVERY_SAMPLE_UP_TO = 64


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """One call of fn, in milliseconds (wall clock, synchronized on CUDA)."""
    _sync(device)
    start = time.perf_counter_ns()
    fn()
    _sync(device)
    return (time.perf_counter_ns() - start) / 1e6


@dataclass(frozen=True)
class TimerConfig:
    """How long to measure. The time cap counts warm-up and the timed calls (host wall
    time), not the L2 flush, graph capture or the harness's own bookkeeping; it is hard:
    it may stop before min_runs (at least one timed sample is always taken)."""

    warmup_runs: int = 1  # untimed calls before timing
    warmup_s: float = 0.0  # keep warming up until this much time passed, after warmup_runs calls
    min_runs: int = 5  # timed calls before the CI rule may stop (and never fewer than 6 at 95%)
    max_runs: int = 200
    target_ci_rel: float = 0.02  # stop when the CI half-width of the median <= this * median; 0: never
    max_time_s: float = 10.0  # math.inf: no cap
    l2_flush: bool = False  # CUDA only: overwrite a buffer bigger than L2 before each timed call
    cuda_graph: bool = False  # CUDA only: capture fn once into a CUDA graph and time its replays

    def __post_init__(self) -> None:
        for name in ("warmup_runs", "min_runs", "max_runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TimerConfig.{name} must be an int, got {value!r}")
        for name in ("warmup_s", "target_ci_rel", "max_time_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
                raise ValueError(f"TimerConfig.{name} must be a number, got {value!r}")
        for name in ("l2_flush", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TimerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.warmup_runs < 0:
            raise ValueError(f"TimerConfig.warmup_runs must be >= 0, got {self.warmup_runs}")
        if not 0 <= self.warmup_s < math.inf:
            raise ValueError(f"TimerConfig.warmup_s must be finite and >= 0, got {self.warmup_s}")
        if self.min_runs < 1:
            raise ValueError(f"TimerConfig.min_runs must be >= 1, got {self.min_runs}")
        if self.max_runs < self.min_runs:
            raise ValueError(f"TimerConfig.max_runs ({self.max_runs}) must be >= min_runs ({self.min_runs})")
        if self.target_ci_rel < 0:
            raise ValueError(f"TimerConfig.target_ci_rel must be >= 0, got {self.target_ci_rel}")
        if self.max_time_s <= 0:
            raise ValueError(f"TimerConfig.max_time_s must be > 0, got {self.max_time_s}")


@dataclass(frozen=True)
class TimerResult:
    """What measure() returns: the samples it took and how it stopped."""

    samples_ms: list[float]  # every timed sample, in the order taken
    warmup_runs: int  # untimed calls actually made (warmup_s may add to the configured count)
    stopped_by: str  # "ci" | "max_runs" | "max_time" | "turns" (interleaved A/B)
    summary: Summary


class Turns(Protocol):
    """Who decides when an interleaved measurement samples (bench/ab_side.py)."""

    def wait_turn(self) -> float | None:
        """Block until this side may sample; the seconds of sampling granted, or None: stop."""

    def end_turn(self, samples_ms: list[float]) -> None:
        """The samples of the turn just taken."""


_turns: Turns | None = None


def interleave_with(turns: Turns | None) -> None:
    """Install (or, with None, remove) the controller of this process's next measurement.
    It serves one measurement: measure() removes it when it starts using it."""
    global _turns
    _turns = turns


def _ci_is_tight(ordered: list[float], target: float) -> bool:
    n = len(ordered)
    j = median_ci_rank(n, CI_CONFIDENCE)
    half_width = (ordered[n - j] - ordered[j - 1]) / 2
    return relative(half_width, percentile(ordered, 0.5)) <= target


def _as_ms(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"with fn_returns_ms, fn must return its elapsed milliseconds as a finite number >= 0, "
                         f"got {value!r}")
    return float(value)


def _capture_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured into a CUDA graph; returns the graph's replay. Eager calls on a side
    stream first, so lazy initialisation (cuBLAS workspaces, allocator pools) happens
    outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(_CAPTURE_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _sampler(fn: Callable[[], object], device: torch.device, config: TimerConfig,
             fn_returns_ms: bool) -> Callable[[], tuple[float, float]]:
    """A function taking one sample: returns (sample in ms, host seconds it cost)."""
    perf_ns = time.perf_counter_ns
    if device.type != "cuda":
        if fn_returns_ms:
            def sample_cpu_returned() -> tuple[float, float]:
                t0 = perf_ns()
                ms = _as_ms(fn())
                return ms, (perf_ns() - t0) / 1e9
            return sample_cpu_returned

        def sample_cpu() -> tuple[float, float]:
            t0 = perf_ns()
            fn()
            t1 = perf_ns()
            return (t1 - t0) / 1e6, (t1 - t0) / 1e9
        return sample_cpu

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if config.l2_flush else None

    def flush_l2() -> None:
        if flush is not None:
            flush.zero_()
            torch.cuda.synchronize(device)  # flushed and idle, like a sample without flush

    if fn_returns_ms:
        def sample_cuda_returned() -> tuple[float, float]:
            flush_l2()
            t0 = perf_ns()
            ms = _as_ms(fn())
            torch.cuda.synchronize(device)
            return ms, (perf_ns() - t0) / 1e9
        return sample_cuda_returned

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample_cuda() -> tuple[float, float]:
        flush_l2()
        t0 = perf_ns()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), (perf_ns() - t0) / 1e9
    return sample_cuda


def measure(fn: Callable[[], object], *, device: torch.device | str, config: TimerConfig | None = None,
            fn_returns_ms: bool = False,
            around_timed: Callable[[], AbstractContextManager[object]] | None = None) -> TimerResult:
    """Time fn() until the stopping rule holds.

    With fn_returns_ms=True, fn() times itself and returns its elapsed milliseconds (say a
    decode loop that times only its steps); those values are the samples. Warm-up, the
    time cap and the CI rule apply the same way. CUDA-only options on another device,
    and cuda_graph with fn_returns_ms, raise ValueError.

    Stops with "ci" once n >= max(min_runs, 6) and the 95% CI half-width of the median is
    within target_ci_rel of the median, else with "max_runs" or "max_time". Checking
    after each sample is optional stopping, which costs a little coverage; the CI is
    a stopping guide, not a promise.

    around_timed: a context manager factory entered around the sampling loop (each turn's,
    when taking turns), after warm-up: whatever it reads covers exactly the timed calls
    and the loop's own work between them (an L2 flush, the synchronizes).
    """
    config = config or TimerConfig()
    device = torch.device(device)
    cuda = device.type == "cuda"
    if config.cuda_graph and fn_returns_ms:
        raise ValueError("cuda_graph cannot time a fn that returns its own milliseconds (fn_returns_ms): "
                         "a graph replay returns no value")
    for option in ("l2_flush", "cuda_graph"):
        if getattr(config, option) and not cuda:
            raise ValueError(f"{option} needs a CUDA device, got device {str(device)!r}")

    with torch.cuda.device(device) if cuda else nullcontext():
        call = _capture_graph(fn) if config.cuda_graph else fn
        if fn_returns_ms:
            call = lambda: _as_ms(fn())  # noqa: E731  (a bad return value fails during warm-up already)

        # Warm-up: the configured count, then on until warmup_s passed (capped by max_time_s).
        t_start = time.perf_counter()
        warmed = 0
        warm_until = min(config.warmup_s, config.max_time_s)
        while warmed < config.warmup_runs or time.perf_counter() - t_start < warm_until:
            call()
            _sync(device)  # count device time, not queued launches
            warmed += 1
        spent_s = time.perf_counter() - t_start

        sample = _sampler(fn if fn_returns_ms else call, device, config, fn_returns_ms)
        region = around_timed or nullcontext
        if _turns is not None:
            turns, samples = _take_turns(sample, region), []
            for turn in turns:
                samples += turn
            return TimerResult(samples_ms=samples, warmup_runs=warmed, stopped_by="turns",
                               summary=summarize(samples))
        first_check = max(config.min_runs, min_samples_for_ci(CI_CONFIDENCE))
        next_check = first_check
        samples: list[float] = []
        ordered: list[float] = []  # sorted copy for O(1) median and CI look-ups
        with region():
            while True:
                ms, cost_s = sample()
                samples.append(ms)
                bisect.insort(ordered, ms)
                spent_s += cost_s
                n = len(samples)
                out_of_time = spent_s >= config.max_time_s
                if n >= next_check or (n >= first_check and (n >= config.max_runs or out_of_time)):
                    if _ci_is_tight(ordered, config.target_ci_rel):
                        stopped_by = "ci"
                        break
                    next_check = n + (1 if n < _CHECK_EVERY_SAMPLE_UP_TO else n // 32)
                if n >= config.max_runs:
                    stopped_by = "max_runs"
                    break
                if out_of_time:
                    stopped_by = "max_time"
                    break
    return TimerResult(samples_ms=samples, warmup_runs=warmed, stopped_by=stopped_by, summary=summarize(samples))


def _take_turns(sample: Callable[[], tuple[float, float]],
                region: Callable[[], AbstractContextManager[object]]) -> list[list[float]]:
    """Sample in the turns the installed controller grants: each turn at least one
    sample, then on until its seconds are spent, inside `region`. Returns the samples
    of each turn."""
    global _turns
    turns, _turns = _turns, None  # one measurement per controller
    taken: list[list[float]] = []
    while (budget_s := turns.wait_turn()) is not None:
        spent_s, turn = 0.0, []
        with region():
            while not turn or spent_s < budget_s:
                ms, cost_s = sample()
                turn.append(ms)
                spent_s += cost_s
        turns.end_turn(turn)
        taken.append(turn)
    if not taken:
        raise RuntimeError("the interleaved measurement was stopped before its first turn")
    return taken
