"""Statistics of paired rounds: an interleaved A/B run measures both sides of a case in
alternating turns, and each round gives one ratio NEW/BASE of the two turns' medians.
Drift that moves a whole stretch of time (thermal state, a neighbour's load) moves
both halves of a round alike and cancels in its ratio.

* The typical ratio is the Hodges–Lehmann estimate of the paired log ratios d_i: the
  median of the Walsh averages (d_i + d_j) / 2, i <= j. Its confidence interval is
  the pair of Walsh averages at ranks k and M + 1 - k (M = n(n+1)/2), k from the exact
  null distribution of the Wilcoxon signed-rank statistic (normal approximation with
  continuity correction beyond 60 rounds): the inversion of the signed-rank test, so
  "the interval excludes 1" and "p < alpha" agree (up to ties and discreteness).
  It assumes only that the log ratios are symmetric about their centre; it needs no
  random numbers and holds at the 6-20 rounds a CPU case gets.
* p-values are the two-sided Wilcoxon signed-rank test of d_i about 0 (scipy).
* Across the cases and metrics of a run, p-values are adjusted by Benjamini–Hochberg
  (scipy's `false_discovery_control`), so a matrix of 50 cases does not fail by chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import stats

_EXACT_MAX_N = 60  # exact signed-rank distribution up to this many rounds (a few ms, cached)


@lru_cache(maxsize=128)
def signed_rank_cdf(n: int) -> tuple[float, ...]:
    """P(T+ <= t), t = 0..n(n+1)/2, for the signed-rank statistic of n untied, nonzero
    differences under the null: counts of subsets of {1..n} by their sum, in integers."""
    top = n * (n + 1) // 2
    counts = [1] + [0] * top
    for rank in range(1, n + 1):
        for total in range(top, rank - 1, -1):
            counts[total] += counts[total - rank]
    out, cum, whole = [], 0, 2**n
    for c in counts:
        cum += c
        out.append(cum / whole)
    return tuple(out)


def ci_rank(n: int, alpha: float) -> int:
    """Largest k with P(T+ <= k - 1) <= alpha / 2: the interval is the k-th smallest and
    k-th largest Walsh average. 0 when no interval reaches 1 - alpha (n < 6 at 0.05)."""
    if n <= _EXACT_MAX_N:
        return sum(1 for p in signed_rank_cdf(n) if p <= alpha / 2 + 1e-12)
    z = stats.norm.ppf(1 - alpha / 2)
    mean, sd = n * (n + 1) / 4, math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    return max(0, math.floor(mean + 0.5 - z * sd))


def walsh_averages(d: np.ndarray) -> np.ndarray:
    """(d_i + d_j) / 2 for i <= j, sorted."""
    i, j = np.triu_indices(d.size)
    return np.sort((d[i] + d[j]) / 2)


@dataclass(frozen=True)
class PairedRatio:
    """The typical ratio NEW/BASE of n paired rounds and its interval (level 1 - alpha)."""

    n: int
    ratio: float  # exp(Hodges–Lehmann estimate of the log ratios)
    ci_low: float | None  # None: too few rounds for an interval at this level
    ci_high: float | None
    p_value: float  # two-sided signed-rank test of "no change"

    @property
    def half_width(self) -> float:
        """Half the interval's width in log units (about the relative precision); inf without one."""
        if self.ci_low is None or self.ci_high is None:
            return math.inf
        return (math.log(self.ci_high) - math.log(self.ci_low)) / 2

    def inverse(self) -> PairedRatio:
        """The same rounds read as BASE/NEW: the ratio and its interval inverted (a
        throughput judged on latency rounds; a speedup over the base)."""
        if self.ci_low is None or self.ci_high is None:
            return PairedRatio(self.n, 1 / self.ratio, None, None, self.p_value)
        return PairedRatio(self.n, 1 / self.ratio, 1 / self.ci_high, 1 / self.ci_low, self.p_value)


def paired_ratio(base: np.ndarray | list[float], new: np.ndarray | list[float], alpha: float = 0.05) -> PairedRatio:
    """The paired ratio of per-round values (both positive, same length >= 1)."""
    base, new = np.asarray(base, dtype=float), np.asarray(new, dtype=float)
    if base.shape != new.shape or base.ndim != 1 or base.size == 0:
        raise ValueError(f"paired rounds need two equal-length, non-empty lists, got {base.shape} and {new.shape}")
    if base.min() <= 0 or new.min() <= 0 or not (np.isfinite(base).all() and np.isfinite(new).all()):
        raise ValueError("paired rounds must be finite and positive")
    d = np.log(new) - np.log(base)
    walsh = walsh_averages(d)
    k = ci_rank(d.size, alpha)
    low, high = (math.exp(walsh[k - 1]), math.exp(walsh[walsh.size - k])) if k >= 1 else (None, None)
    return PairedRatio(d.size, math.exp(float(np.median(walsh))), low, high, signed_rank_p(d))


def signed_rank_p(d: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of differences d about 0 (1.0 when all are 0)."""
    if not np.any(d):
        return 1.0
    p = float(stats.wilcoxon(d, alternative="two-sided").pvalue)
    return 1.0 if math.isnan(p) else min(p, 1.0)


def bh_adjust(p_values: list[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (q-values), in the order given."""
    if not p_values:
        return []
    return [float(q) for q in stats.false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


def detectable_change(half_width: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The relative change this precision detects with the given power: an interval of
    half-width h (log units) at level 1 - alpha stands for a standard error of about
    h / z(1 - alpha/2); a true change of (z(1 - alpha/2) + z(power)) standard errors is
    significant with that power."""
    if not math.isfinite(half_width):
        return math.inf
    z_alpha, z_power = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return math.expm1(half_width * (z_alpha + z_power) / z_alpha)
