from __future__ import annotations

import itertools
import math
import random
import time

import pytest
import torch

from infermatrix.bench.timing import TimerResult, TimerConfig, measure, time_once

CPU = "cpu"


def busy_wait(ms: float) -> None:
    """Spin (not sleep) so the duration does not depend on the scheduler's wake-up."""
    end = time.perf_counter_ns() + int(ms * 1e6)
    while time.perf_counter_ns() < end:
        pass


class Counter:
    def __init__(self, fn=lambda: None):
        self.calls, self.fn = 0, fn

    def __call__(self):
        self.calls += 1
        return self.fn()


def test_a_steady_1ms_op_stops_on_the_ci_quickly():
    m = measure(lambda: busy_wait(1.0), device=CPU, config=TimerConfig(max_time_s=5.0))
    assert isinstance(m, TimerResult)
    assert m.stopped_by == "ci"
    assert 6 <= len(m.samples_ms) <= 200  # the CI is tight long before max_runs, even on a busy machine
    assert m.summary.median == pytest.approx(1.0, rel=0.2)
    assert m.summary.ci_rel <= 0.02
    assert m.summary.n == len(m.samples_ms)


def test_a_fn_returning_a_constant_ms_stops_at_the_first_n_with_a_95_percent_ci():
    m = measure(lambda: 1.0, device=CPU, config=TimerConfig(min_runs=2), fn_returns_ms=True)
    assert (m.stopped_by, len(m.samples_ms)) == ("ci", 6)  # n <= 5 has no 95% interval
    m = measure(lambda: 1.0, device=CPU, config=TimerConfig(min_runs=9), fn_returns_ms=True)
    assert (m.stopped_by, len(m.samples_ms)) == ("ci", 9)


def test_a_noisy_fn_hits_max_runs():
    rng = random.Random(0)
    m = measure(lambda: busy_wait(rng.uniform(0.05, 1.0)), device=CPU,
                config=TimerConfig(max_runs=30, max_time_s=5.0))
    assert (m.stopped_by, len(m.samples_ms)) == ("max_runs", 30)
    assert m.summary.noisy


def test_a_noisy_fn_hits_max_time():
    rng = random.Random(1)
    t0 = time.perf_counter()
    m = measure(lambda: busy_wait(rng.uniform(0.05, 2.0)), device=CPU,
                config=TimerConfig(max_runs=100_000, max_time_s=0.1))
    assert m.stopped_by == "max_time"
    assert time.perf_counter() - t0 < 1.0
    assert sum(m.samples_ms) / 1e3 < 0.1 + 0.05  # the cap overshoots by at most one call


def test_the_time_cap_beats_min_runs_but_one_sample_is_always_taken():
    m = measure(lambda: busy_wait(20.0), device=CPU, config=TimerConfig(warmup_runs=0, max_time_s=0.01))
    assert (m.stopped_by, len(m.samples_ms)) == ("max_time", 1)


def test_warmup_runs_are_called_but_not_timed():
    fn = Counter()
    m = measure(fn, device=CPU, config=TimerConfig(warmup_runs=3, min_runs=4, max_runs=4))
    assert m.warmup_runs == 3
    assert fn.calls == 3 + len(m.samples_ms) == 7


def test_warmup_s_keeps_warming_up_past_the_count():
    fn = Counter(lambda: busy_wait(1.0))
    m = measure(fn, device=CPU, config=TimerConfig(warmup_runs=1, warmup_s=0.03, max_runs=6))
    assert m.warmup_runs >= 10  # ~30 calls of 1 ms; loose for a loaded machine
    assert fn.calls == m.warmup_runs + len(m.samples_ms)


def test_fn_returns_ms_collects_the_returned_values_exactly():
    values = iter([100.0, 1.0, 2.0, 3.0, 4.0, 99.0])  # first one is the warm-up's, last is never asked for
    m = measure(lambda: next(values), device=CPU, config=TimerConfig(warmup_runs=1, min_runs=4, max_runs=4),
                fn_returns_ms=True)
    assert m.samples_ms == [1.0, 2.0, 3.0, 4.0]
    assert m.stopped_by == "max_runs" and m.warmup_runs == 1
    assert m.summary.median == 2.5


def test_fn_returns_ms_needs_milliseconds_returned():
    with pytest.raises(ValueError, match="with fn_returns_ms, fn must return its elapsed milliseconds"):
        measure(lambda: None, device=CPU, fn_returns_ms=True)


def test_the_stopping_check_is_cheap_for_many_samples():
    rng = random.Random(2)  # continuous values: the CI never reaches width 0, so it runs to max_runs
    t0 = time.perf_counter()
    m = measure(rng.random, device=CPU, config=TimerConfig(max_runs=20_000, target_ci_rel=0.0,
                                                          max_time_s=math.inf), fn_returns_ms=True)
    assert (m.stopped_by, len(m.samples_ms)) == ("max_runs", 20_000)
    assert time.perf_counter() - t0 < 3.0  # ~0.1 s when lean; minutes if the summary ran per sample


def test_time_once_times_one_call():
    assert time_once(lambda: busy_wait(0.5), torch.device(CPU)) >= 0.5


@pytest.mark.parametrize("kwargs, field", [
    ({"warmup_runs": -1}, "warmup_runs"),
    ({"warmup_runs": 1.5}, "warmup_runs"),
    ({"warmup_s": -0.1}, "warmup_s"),
    ({"warmup_s": math.inf}, "warmup_s"),
    ({"min_runs": 0}, "min_runs"),
    ({"min_runs": True}, "min_runs"),
    ({"min_runs": 10, "max_runs": 5}, "max_runs"),
    ({"target_ci_rel": -0.01}, "target_ci_rel"),
    ({"target_ci_rel": float("nan")}, "target_ci_rel"),
    ({"max_time_s": 0}, "max_time_s"),
    ({"l2_flush": 1}, "l2_flush"),
    ({"cuda_graph": "yes"}, "cuda_graph"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"TimerConfig.{field}"):
        TimerConfig(**kwargs)


@pytest.mark.parametrize("option", ["l2_flush", "cuda_graph"])
def test_cuda_only_options_on_cpu_raise(option):
    fn = Counter()
    with pytest.raises(ValueError, match=f"{option} needs a CUDA device"):
        measure(fn, device=CPU, config=TimerConfig(**{option: True}))
    assert fn.calls == 0


def test_cuda_graph_with_fn_returns_ms_is_refused():
    config = TimerConfig(cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph cannot time a fn that returns its own milliseconds"):
        measure(lambda: 1.0, device=CPU, config=config, fn_returns_ms=True)


def test_samples_are_kept_in_order_taken():
    values = itertools.count(1.0)
    m = measure(lambda: next(values), device=CPU, config=TimerConfig(warmup_runs=0, min_runs=8, max_runs=8),
                fn_returns_ms=True)
    assert m.samples_ms == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


class _ScriptedTurns:
    """A Turns controller granting the given turns, then stop."""

    def __init__(self, grants):
        self.grants, self.taken = list(grants), []

    def wait_turn(self):
        return self.grants.pop(0) if self.grants else None

    def end_turn(self, samples_ms):
        self.taken.append(list(samples_ms))


def test_interleaved_measurement_samples_in_the_granted_turns():
    from infermatrix.bench import timing

    calls = []
    turns = _ScriptedTurns([0.0, 0.0, 0.02])
    timing.interleave_with(turns)
    m = measure(lambda: calls.append(1), device="cpu", config=TimerConfig(warmup_runs=2, min_runs=5))
    assert m.stopped_by == "turns" and m.warmup_runs == 2
    assert [len(t) for t in turns.taken[:2]] == [1, 1]  # a turn of 0 s still takes one sample
    assert len(turns.taken[2]) > 1  # 20 ms of a no-op call: many samples
    assert m.samples_ms == [x for t in turns.taken for x in t] and len(calls) == 2 + len(m.samples_ms)
    # the controller served one measurement: the next one runs by the CI rule again
    assert measure(lambda: None, device="cpu", config=TimerConfig(min_runs=6, max_runs=6)).stopped_by != "turns"


def test_an_interleaved_measurement_stopped_before_any_turn_fails():
    from infermatrix.bench import timing

    timing.interleave_with(_ScriptedTurns([]))
    with pytest.raises(RuntimeError, match="before its first turn"):
        measure(lambda: None, device="cpu")
