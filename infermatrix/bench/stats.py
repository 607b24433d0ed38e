"""Summary statistics of timing samples, with a distribution-free CI of the median.

Timings are skewed and heavy-tailed (a context switch, a GC pause), so the median is
the headline figure and its confidence interval comes from order statistics rather
than from a normal approximation.

* Percentiles use linear interpolation between closest ranks (Hyndman & Fan type 7,
  numpy's default `method="linear"`): for sorted x[0..n-1] and q in [0, 1] the
  percentile is x[h] interpolated at h = (n - 1) * q. The median is the 50th percentile,
  equal to `statistics.median`.
* CI of the median: the number of samples below the true median of any continuous
  distribution is Binomial(n, 1/2), so [x_(j), x_(n+1-j)] (1-based order statistics)
  covers it with probability 1 - 2 * P(B <= j - 1). We take the largest j whose
  coverage is at least the confidence; the binomial tail is summed exactly in integers
  (no scipy, no normal approximation) up to n = 1000, and in log space beyond that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

_EXACT_MAX_N = 1000  # above this the integer sums get slow (ms); log space is accurate to ~1e-12


@dataclass(frozen=True)
class Summary:
    """Statistics of n samples. `ci_low`/`ci_high` bound the median with the requested
    confidence (95% by default). For tiny n (n <= 5 at 95%) no pair of order statistics
    reaches that confidence; the interval is then (min, max), whose true coverage is only
    1 - 2 / 2**n (0 for n = 1, 0.5 for n = 2, 0.9375 for n = 5)."""

    n: int
    median: float
    mean: float
    stdev: float  # sample standard deviation (n - 1 denominator); 0.0 when n == 1
    min: float
    max: float
    p90: float
    p99: float
    iqr: float  # p75 - p25
    ci_low: float
    ci_high: float
    ci_rel: float  # (ci_high - ci_low) / 2 / median; inf when n is too small for any interval
    noisy: bool  # iqr / median above the threshold given to summarize()

    def as_metrics(self, prefix: str) -> dict[str, float | bool | int]:
        """Flat metrics named `{prefix}_{stat}`; the median is `{prefix}_p50`."""
        values: dict[str, float | bool | int] = {
            "p50": self.median, "mean": self.mean, "stdev": self.stdev, "min": self.min, "max": self.max,
            "p90": self.p90, "p99": self.p99, "iqr": self.iqr, "ci_low": self.ci_low,
            "ci_high": self.ci_high, "ci_rel": self.ci_rel, "noisy": self.noisy, "n": self.n,
        }
        return {f"{prefix}_{k}": v for k, v in values.items()}


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """The q-quantile (q in [0, 1]) of already sorted, non-empty data, linear interpolation."""
    h = (len(sorted_xs) - 1) * q
    lo = math.floor(h)
    if lo + 1 >= len(sorted_xs):
        return float(sorted_xs[-1])
    return sorted_xs[lo] + (h - lo) * (sorted_xs[lo + 1] - sorted_xs[lo])


@lru_cache(maxsize=1024)
def median_ci_rank(n: int, confidence: float) -> int:
    """The 1-based rank j such that [x_(j), x_(n+1-j)] is the narrowest symmetric
    order-statistic interval covering the median with probability >= confidence;
    1 (that is, min and max) when even that one falls short. Cached: the timer asks
    for it repeatedly."""
    tail = (1.0 - confidence) / 2  # allowed probability in each tail
    j = _rank_exact(n, tail) if n <= _EXACT_MAX_N else _rank_logspace(n, tail)
    return max(j, 1)


def _rank_exact(n: int, tail: float) -> int:
    """Largest j with P(B <= j - 1) <= tail, B ~ Binomial(n, 1/2), in integers:
    P(B <= j) > tail  <=>  sum C(n, i) * den > num * 2**n, where num / den is the float
    `tail` exactly. C(n, j) = C(n, j-1) * (n-j+1) / j stays integral."""
    num, den = tail.as_integer_ratio()
    limit = num << n
    comb, cum, j = 1, 0, 0
    while j < n // 2:
        cum += comb  # cum = P(B <= j) * 2**n
        if cum * den > limit:
            break
        j += 1
        comb = comb * (n - j + 1) // j
    return j


def _rank_logspace(n: int, tail: float) -> int:
    """Same as _rank_exact for large n: the pmf summed in log space from 10 standard
    deviations below the mean (the mass further out is < 1e-22, far below any tail)."""
    j = max(0, int(n / 2 - 10 * math.sqrt(n) / 2))
    log_norm = math.lgamma(n + 1) - n * math.log(2)
    cum = 0.0
    while j < n // 2:
        cum += math.exp(log_norm - math.lgamma(j + 1) - math.lgamma(n - j + 1))  # P(B = j)
        if cum > tail:
            break
        j += 1
    return j


def median_ci(sorted_xs: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of sorted, non-empty data."""
    n = len(sorted_xs)
    j = median_ci_rank(n, confidence)
    return float(sorted_xs[j - 1]), float(sorted_xs[n - j])


def min_samples_for_ci(confidence: float = 0.95) -> int:
    """Smallest n whose widest interval, (min, max), covers the median with this
    confidence: 1 - 2 * 0.5**n >= confidence (6 at 95%)."""
    n = 1
    while 1 - 2 * 0.5**n < confidence:
        n += 1
    return n


def relative(num: float, den: float) -> float:
    """num / |den|, with 0/0 = 0 and x/0 = inf (a zero median with any spread is unbounded)."""
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / abs(den)


def summarize(samples: Iterable[float], *, confidence: float = 0.95, noisy_iqr_ratio: float = 0.10) -> Summary:
    """Summary of samples (any iterable of numbers). Raises ValueError on empty or
    non-finite input and on a confidence outside (0, 1)."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        raise ValueError("summarize() needs at least one sample")
    if not all(math.isfinite(x) for x in xs):  # NaN would also leave `sorted` unsorted
        raise ValueError("summarize() samples must be finite numbers (got NaN or inf)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if noisy_iqr_ratio < 0:
        raise ValueError(f"noisy_iqr_ratio must be >= 0, got {noisy_iqr_ratio}")
    n = len(xs)
    median = percentile(xs, 0.5)
    mean = math.fsum(xs) / n
    stdev = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    iqr = percentile(xs, 0.75) - percentile(xs, 0.25)
    ci_low, ci_high = median_ci(xs, confidence)
    # Below min_samples_for_ci no interval reaches the confidence: say so with inf.
    ci_rel = relative((ci_high - ci_low) / 2, median) if n >= min_samples_for_ci(confidence) else math.inf
    return Summary(
        n=n, median=median, mean=mean, stdev=stdev, min=xs[0], max=xs[-1],
        p90=percentile(xs, 0.90), p99=percentile(xs, 0.99), iqr=iqr,
        ci_low=ci_low, ci_high=ci_high, ci_rel=ci_rel,
        noisy=relative(iqr, median) > noisy_iqr_ratio,
    )
