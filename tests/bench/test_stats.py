from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from infermatrix.bench.stats import (Summary, _rank_exact, _rank_logspace, median_ci_rank, percentile,
                                     summarize)

N_DRAWS = 20_000


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name, draw, median, iqr, p90", [
    # Analytic quantiles: normal(10, 2): z_0.75 = 0.674490, z_0.9 = 1.281552.
    ("normal", lambda g, n: g.normal(10.0, 2.0, n), 10.0, 2 * 2 * 0.6744898, 10.0 + 2 * 1.2815516),
    # exponential(1): quantile(q) = -ln(1 - q).
    ("exponential", lambda g, n: g.exponential(1.0, n), math.log(2), math.log(3), math.log(10)),
    ("uniform", lambda g, n: g.uniform(0.0, 1.0, n), 0.5, 0.5, 0.9),
])
def test_large_samples_match_the_analytic_quantiles(name, draw, median, iqr, p90):
    s = summarize(draw(_rng(1), N_DRAWS).tolist())
    scale = iqr  # tolerances relative to the spread: quantile error ~ 1/sqrt(n)
    assert s.n == N_DRAWS
    assert s.median == pytest.approx(median, abs=0.03 * scale)
    assert s.iqr == pytest.approx(iqr, abs=0.04 * scale)
    assert s.p90 == pytest.approx(p90, abs=0.05 * scale)
    assert s.ci_low < median < s.ci_high
    assert s.min <= s.ci_low <= s.median <= s.ci_high <= s.max


def test_percentiles_follow_numpys_linear_definition():
    xs = _rng(2).exponential(1.0, 101).tolist()
    s = summarize(xs)
    for value, q in [(s.median, 50), (s.p90, 90), (s.p99, 99)]:
        assert value == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert s.iqr == pytest.approx(float(np.percentile(xs, 75) - np.percentile(xs, 25)), rel=1e-12)
    assert s.mean == pytest.approx(float(np.mean(xs)), rel=1e-12)
    assert s.stdev == pytest.approx(float(np.std(xs, ddof=1)), rel=1e-12)


@pytest.mark.parametrize("draw, true_median", [
    (lambda g, n: g.normal(5.0, 1.0, n), 5.0),
    (lambda g, n: g.exponential(1.0, n), math.log(2)),  # skewed: distribution-free must still hold
])
def test_median_ci_covers_the_true_median_about_95_percent_of_the_time(draw, true_median):
    trials, g = 400, _rng(3)
    covered = sum(s.ci_low <= true_median <= s.ci_high for s in (summarize(draw(g, 30).tolist()) for _ in range(trials)))
    assert 0.92 <= covered / trials <= 0.99  # exact coverage at n = 30 is 0.9572


def _brute_rank(n: int, confidence: float) -> int:
    """Largest j with 2 * P(B <= j - 1) <= 1 - confidence in exact fractions, else 1."""
    best = 1
    for j in range(1, n // 2 + 1):
        tail = Fraction(sum(math.comb(n, i) for i in range(j)), 2**n)
        if 2 * tail <= Fraction(1 - confidence):
            best = j
    return best


def test_ci_ranks_match_exact_binomial_and_published_tables():
    for n in range(1, 80):
        assert median_ci_rank(n, 0.95) == _brute_rank(n, 0.95), n
        assert median_ci_rank(n, 0.99) == _brute_rank(n, 0.99), n
    # Classic 95% table values: n=10 -> (x2, x9), n=20 -> (x6, x15), n=30 -> (x10, x21), n=100 -> (x40, x61).
    assert [median_ci_rank(n, 0.95) for n in (10, 20, 30, 100)] == [2, 6, 10, 40]


def test_log_space_ranks_agree_with_the_exact_integer_ones():
    tail = (1 - 0.95) / 2
    for n in (50, 333, 999, 1000, 1001, 2500):
        assert _rank_logspace(n, tail) == _rank_exact(n, tail), n
    big = median_ci_rank(1_000_000, 0.95)  # normal approximation: n/2 - 1.96 * sqrt(n) / 2
    assert abs(big - (500_000 - 1.959964 * 500)) < 3


def test_single_sample():
    s = summarize([2.5])
    assert s == Summary(n=1, median=2.5, mean=2.5, stdev=0.0, min=2.5, max=2.5, p90=2.5, p99=2.5, iqr=0.0,
                        ci_low=2.5, ci_high=2.5, ci_rel=math.inf, noisy=False)


def test_two_samples():
    s = summarize([3.0, 1.0])
    assert (s.median, s.mean, s.min, s.max) == (2.0, 2.0, 1.0, 3.0)
    assert s.p90 == pytest.approx(2.8) and s.p99 == pytest.approx(2.98)
    assert s.iqr == pytest.approx(1.0)  # p75 2.5 - p25 1.5
    assert s.stdev == pytest.approx(math.sqrt(2))
    assert (s.ci_low, s.ci_high) == (1.0, 3.0)  # tiny n: (min, max)
    assert s.ci_rel == math.inf  # ... which covers the median only 50% of the time: no 95% interval


def test_odd_and_even_n():
    odd = summarize([5, 1, 4, 2, 3])
    assert (odd.median, odd.iqr, odd.p90) == (3.0, 2.0, pytest.approx(4.6))
    assert (odd.ci_low, odd.ci_high) == (1.0, 5.0)  # n = 5: no interval reaches 95%, so (min, max)
    even = summarize(range(1, 7))
    assert even.median == 3.5 and even.iqr == pytest.approx(2.5)
    assert (even.ci_low, even.ci_high) == (1.0, 6.0)  # n = 6: (x1, x6) covers 96.9%
    ten = summarize(range(1, 11))
    assert (ten.ci_low, ten.ci_high) == (2.0, 9.0)
    assert ten.ci_rel == pytest.approx(3.5 / 5.5)


def test_noisy_flag_flips_on_a_wide_distribution():
    assert not summarize(_rng(4).normal(1.0, 0.01, 200).tolist()).noisy
    assert summarize(_rng(4).exponential(1.0, 200).tolist()).noisy  # iqr / median = ln 3 / ln 2
    narrow_ish = _rng(5).normal(1.0, 0.05, 200).tolist()  # iqr / median ~ 0.067
    assert not summarize(narrow_ish).noisy
    assert summarize(narrow_ish, noisy_iqr_ratio=0.03).noisy


def test_zero_median_does_not_divide_by_zero():
    s = summarize([0.0] * 7)
    assert s.ci_rel == 0.0 and not s.noisy
    assert summarize([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]).ci_rel == math.inf


def test_as_metrics_names_and_types():
    m = summarize([1.0, 2.0, 3.0, 4.0]).as_metrics("latency_ms")
    assert list(m) == [f"latency_ms_{k}" for k in ("p50", "mean", "stdev", "min", "max", "p90", "p99", "iqr",
                                                   "ci_low", "ci_high", "ci_rel", "noisy", "n")]
    assert m["latency_ms_p50"] == 2.5
    assert m["latency_ms_n"] == 4 and type(m["latency_ms_n"]) is int
    assert type(m["latency_ms_noisy"]) is bool


def test_bad_input_raises():
    with pytest.raises(ValueError, match="at least one sample"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, float("nan"), 2.0])
    with pytest.raises(ValueError, match="confidence"):
        summarize([1.0], confidence=1.0)


def test_percentile_endpoints():
    assert percentile([1.0, 2.0, 4.0], 0.0) == 1.0
    assert percentile([1.0, 2.0, 4.0], 1.0) == 4.0
    assert percentile([1.0, 2.0, 4.0], 0.75) == 3.0
