"""Compare two runs of a matrix: what got faster or slower, and by how much we can tell.

`compare_runs(base, new)` matches cases by `case_id` (when a run holds a case twice,
as a resumed run may, the last record wins) and, for each case ok in both runs:

* speed metrics with raw samples (`SAMPLE_METRICS`) get the ratio new/base of the
  medians, a confidence interval of that ratio and a Mann–Whitney U two-sided p-value
  on the raw samples; the change is significant iff p < alpha. Samples are taken in
  the unit of the metric: prefill/attention/linear `samples["latency_ms"]` (per call);
  generate `samples["generation_ms"]` (per generation); decode
  `samples["generation_ms"] / (new_tokens - 1)`, per output token, as latency_ms_p50 is;
  `ttft_ms` and `tpot_ms` samples when present (a prefill's TTFT is its latency).
  Throughput metrics (tokens_per_s, achieved_tflops, achieved_gbs, pct_of_*) are a
  constant over the same latency samples, so their ratio is 1 / the latency ratio, with
  the inverted interval and the same p-value.
* every other metric (drift/accuracy, memory) is a single number per case: base, new
  and their difference, without a ratio or a test.

The confidence interval (level 1 - alpha) is the Hodges–Lehmann interval of the shift
of log samples, i.e. of the ratio: order statistics k and mn+1-k of the m*n pairwise
differences log(new_j) - log(base_i), with k from the exact Mann–Whitney null
distribution (normal approximation with continuity correction when m*n > 2500). We
chose it over a bootstrap because it is the inversion of the very test that decides
significance (so "excludes 1.0" and "p < alpha" agree, up to ties and the discreteness
of the exact distribution), it needs no random numbers, and it stays honest at the
4-8 samples a slow CPU case gets, where a bootstrap of medians is badly discrete and
too narrow. The interval belongs to the Hodges–Lehmann estimate of the ratio; the
point shown is the ratio of medians (what latency_ms_p50 compares), which under a
scale change estimates the same quantity. Below a minimal sample count (3 vs 3 at
alpha = 0.05) no interval reaches the level and none is shown; 1 vs 1 can never be
significant.

`DIRECTION` says which way each metric is better; the gate uses the same table.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import stats

from infermatrix.reports.derived import PATH_METRICS, is_speed_metric, timings_meaningful
from infermatrix.reports.record import Record

LOWER, HIGHER = "lower", "higher"

# The metric columns of results.csv (README, "results.csv columns").
CSV_METRICS: tuple[str, ...] = (
    *(f"latency_ms_{s}" for s in ("p50", "mean", "stdev", "min", "max", "p90", "p99", "iqr", "ci_low", "ci_high",
                                  "ci_rel", "noisy", "n")),
    "runs", "warmup_runs", "stopped_by", "ttft_ms_p50", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "tokens_per_s",
    "flops", "bytes_moved", "achieved_tflops", "achieved_gbs", "pct_of_compute_peak", "pct_of_bandwidth_peak",
    "pct_of_limit", "bound", "weight_bytes", "kv_cache_bytes", "peak_rss_bytes", "cuda_peak_allocated_bytes",
    "cuda_peak_reserved_bytes", "ppl_ref", "ppl", "ppl_delta_pct", "kl_mean", "kl_median", "kl_p99", "kl_max",
    "top1_agree_pct", *(f"dp_{s}" for s in ("mean", "rms", "p01", "p05", "median", "p95", "p99", "min", "max")),
    "logits_max_abs", "logits_rel_l2", "sqnr_db", "greedy_match_len", "greedy_tokens", "eval_tokens",
    # encoders: the encode workload and hidden-state drift
    "sequences_per_s", "real_tokens", "padded_tokens", "hidden_cosine_mean", "hidden_cosine_min", "hidden_sqnr_db",
    "hidden_rel_l2", "mlm_top1_agree_pct", "mlm_kl_mean",
    # energy of the timed loop (bench/energy.py), when the device has a readable counter
    "energy_j", "energy_j_per_token", "avg_power_w", "energy_window_s", "energy_dropped",
    # speculative decoding (the decoding axis), per timed generation
    "acceptance_rate", "tokens_per_forward", "draft_time_share", "drafted_tokens", "target_forwards",
    # serving (the serve workload): per-request TTFT and end-to-end latency, every inter-token
    # gap, completed requests/s, goodput under the SLO and the share of requests meeting it,
    # the scheduler's preemptions and KV blocks, the stream's wall time and offered rate
    "ttft_ms_p90", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p90", "e2e_ms_p99",
    "request_throughput", "goodput_rps", "slo_attainment", "meets_slo", "preemptions", "peak_kv_blocks", "kv_blocks",
    "requests_completed", "requests_sent", "stream_s", "offered_rate", "mean_step_tokens",
)
NON_NUMERIC_METRICS = frozenset({"stopped_by", "bound", "energy_dropped"})
ALIASES = {"top1_agree": "top1_agree_pct"}

# Which way is better. Metrics absent here (counts, the case's FLOPs and bytes, the
# reference perplexity, signed Δp statistics) have no better direction.
DIRECTION: dict[str, str] = {
    **{f"latency_ms_{s}": LOWER for s in ("p50", "mean", "stdev", "min", "max", "p90", "p99", "iqr", "ci_low",
                                          "ci_high", "ci_rel")},
    "ttft_ms_p50": LOWER, "tpot_ms_p50": LOWER, "tpot_ms_p90": LOWER, "tpot_ms_p99": LOWER,
    "tokens_per_s": HIGHER, "achieved_tflops": HIGHER, "achieved_gbs": HIGHER, "pct_of_compute_peak": HIGHER,
    "pct_of_bandwidth_peak": HIGHER, "pct_of_limit": HIGHER,
    "weight_bytes": LOWER, "kv_cache_bytes": LOWER, "peak_rss_bytes": LOWER, "cuda_peak_allocated_bytes": LOWER,
    "cuda_peak_reserved_bytes": LOWER,
    "ppl": LOWER, "ppl_delta_pct": LOWER, "kl_mean": LOWER, "kl_median": LOWER, "kl_p99": LOWER, "kl_max": LOWER,
    "dp_rms": LOWER, "logits_max_abs": LOWER, "logits_rel_l2": LOWER,
    "top1_agree_pct": HIGHER, "sqnr_db": HIGHER, "greedy_match_len": HIGHER,
    "sequences_per_s": HIGHER, "hidden_cosine_mean": HIGHER, "hidden_cosine_min": HIGHER, "hidden_sqnr_db": HIGHER,
    "hidden_rel_l2": LOWER, "mlm_top1_agree_pct": HIGHER, "mlm_kl_mean": LOWER,
    "energy_j": LOWER, "energy_j_per_token": LOWER,
    "acceptance_rate": HIGHER, "tokens_per_forward": HIGHER, "draft_time_share": LOWER,
    "ttft_ms_p90": LOWER, "ttft_ms_p99": LOWER, "itl_ms_p50": LOWER, "itl_ms_p90": LOWER, "itl_ms_p99": LOWER,
    "e2e_ms_p50": LOWER, "e2e_ms_p90": LOWER, "e2e_ms_p99": LOWER,
    "request_throughput": HIGHER, "goodput_rps": HIGHER, "slo_attainment": HIGHER, "meets_slo": HIGHER,
    "preemptions": LOWER, "peak_kv_blocks": LOWER,
}

# speed metric -> (which raw samples, whether the metric is inversely proportional to them)
SAMPLE_METRICS: dict[str, tuple[str, bool]] = {
    "latency_ms_p50": ("latency", False), "ttft_ms_p50": ("ttft", False), "tpot_ms_p50": ("tpot", False),
    "tokens_per_s": ("latency", True), "sequences_per_s": ("latency", True), "achieved_tflops": ("latency", True),
    "achieved_gbs": ("latency", True),
    "pct_of_limit": ("latency", True), "pct_of_compute_peak": ("latency", True),
    "pct_of_bandwidth_peak": ("latency", True),
}
DEFAULT_SPEED_METRICS = ("latency_ms_p50", "tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "sequences_per_s")
DEFAULT_ACCURACY_METRICS = ("kl_mean", "kl_max", "top1_agree_pct", "ppl_delta_pct", "dp_rms", "logits_rel_l2",
                            "sqnr_db", "greedy_match_len", "hidden_cosine_mean", "hidden_sqnr_db", "mlm_top1_agree_pct")

_EXACT_MAX_MN = 2500  # exact Mann–Whitney null distribution up to m*n of this (a few ms, cached)
_MAX_PAIRS = 1_000_000  # pairwise differences kept in memory; beyond, samples are thinned (seeded)


@dataclass(frozen=True)
class MetricChange:
    """One metric of one case, BASE against NEW. kind "speed": ratio, CI and p-value from
    raw samples (base/new are the medians in the metric's unit). kind "value": base, new
    and diff only (ratio is new/base where defined, for the gate; renderers do not show it)."""

    case_id: str
    metric: str
    kind: str  # "speed" | "value"
    base: float | None
    new: float | None
    ratio: float | None = None
    ci_low: float | None = None  # of the ratio, level 1 - alpha; None when too few samples
    ci_high: float | None = None
    p_value: float | None = None  # Mann–Whitney U, two-sided; None without samples
    significant: bool = False
    n_base: int = 0
    n_new: int = 0

    @property
    def direction(self) -> str | None:
        return DIRECTION.get(self.metric)

    @property
    def diff(self) -> float | None:
        if self.base is None or self.new is None:
            return None
        d = self.new - self.base
        return 0.0 if math.isnan(d) and self.new == self.base else d  # inf - inf: unchanged

    @property
    def verdict(self) -> str:
        """better | worse | same | changed (a change of a metric without a better direction)."""
        if self.kind == "speed":
            if not self.significant or self.ratio is None or self.ratio == 1:
                return "same"
            up = self.ratio > 1
        else:
            if self.base is None or self.new is None or _negligible(self.base, self.new):
                return "same"
            up = self.new > self.base
        if self.direction is None:
            return "changed"
        return "better" if up == (self.direction == HIGHER) else "worse"


def _negligible(a: float, b: float) -> bool:
    """Equal up to float round-off: a drift of 1e-11 in an fp32 KL is not a change."""
    if a == b:
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return abs(b - a) <= max(1e-9, 1e-6 * max(abs(a), abs(b)))


@dataclass(frozen=True)
class StatusChange:
    case_id: str
    base: str  # ok | skipped | failed
    new: str
    reason: str | None  # NEW's reason (BASE's when NEW has none)


@dataclass
class Comparison:
    alpha: float
    changes: list[MetricChange] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)  # case ids
    only_new: list[str] = field(default_factory=list)
    status_changes: list[StatusChange] = field(default_factory=list)
    matched: int = 0  # case ids in both runs
    n_base: int = 0  # cases in each run
    n_new: int = 0
    interpreted: list[str] = field(default_factory=list)  # case ids whose timings were not compared
    path_changes: list[str] = field(default_factory=list)  # "case_id: attention_path a -> b"

    def speed(self) -> list[MetricChange]:
        return [c for c in self.changes if c.kind == "speed"]

    def values(self) -> list[MetricChange]:
        return [c for c in self.changes if c.kind == "value"]


# --------------------------------------------------------------------------- samples


def index_records(records: list[Record]) -> dict[str, Record]:
    """case_id -> Record, in run order; a later record of the same case wins."""
    out: dict[str, Record] = {}
    for r in records:
        out.pop(r.case_id, None)
        out[r.case_id] = r
    return out


def _array(values) -> np.ndarray | None:
    if not values:
        return None
    xs = np.asarray(values, dtype=float)
    xs = xs[np.isfinite(xs)]
    return xs if xs.size else None


def latency_samples(record: Record) -> np.ndarray | None:
    """Raw samples in latency_ms_p50's unit: per call, per output token (decode) or per
    generation (generate)."""
    s = record.samples or {}
    if s.get("latency_ms"):
        return _array(s["latency_ms"])
    gen = _array(s.get("generation_ms"))
    if gen is None:
        return None
    if record.case.get("workload") == "decode":
        steps = int(record.case.get("new_tokens") or 0) - 1  # step 1 is the prefill (TTFT)
        return gen / steps if steps >= 1 else None
    return gen


def metric_samples(record: Record, metric: str) -> np.ndarray | None:
    """The raw samples behind a speed metric of SAMPLE_METRICS (in time units; for
    throughput metrics, the latency samples they are inversely proportional to)."""
    source, _ = SAMPLE_METRICS[metric]
    s = record.samples or {}
    if source == "ttft":
        if s.get("ttft_ms"):
            return _array(s["ttft_ms"])
        return latency_samples(record) if record.case.get("workload") == "prefill" else None
    if source == "tpot":
        return _array(s.get("tpot_ms"))
    return latency_samples(record)


def metric_value(record: Record, metric: str) -> float | None:
    """A numeric metric of a record, or None (absent, non-numeric, NaN). sqnr_db of
    identical logits is +inf, written to JSON as null: it reads back as inf when
    logits_max_abs is 0."""
    m = record.metrics or {}
    v = m.get(metric)
    if v is None and metric == "sqnr_db" and m.get("logits_max_abs") == 0:
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return float(v)


# --------------------------------------------------------------------------- statistics


@lru_cache(maxsize=256)
def _exact_u_cdf(m: int, n: int) -> tuple[float, ...]:
    """P(U <= u), u = 0..m*n, for the Mann–Whitney U of samples of sizes m and n without
    ties: the coefficients of the Gaussian binomial [m+n choose m]_q, in exact integers
    (multiply by 1 - q^(n+i), divide by 1 - q^i, i = 1..m, as power series mod q^(mn+1))."""
    m, n = min(m, n), max(m, n)
    size = m * n + 1
    c = [1] + [0] * (size - 1)
    for i in range(1, m + 1):
        s = n + i
        for u in range(size - 1, s - 1, -1):
            c[u] -= c[u - s]
        for u in range(i, size):
            c[u] += c[u - i]
    total = math.comb(m + n, m)
    out, cum = [], 0
    for count in c:
        cum += count
        out.append(cum / total)
    return tuple(out)


def _ci_rank(m: int, n: int, alpha: float) -> int:
    """Largest k with P(U <= k - 1) <= alpha / 2 (0: no interval reaches 1 - alpha)."""
    if m * n <= _EXACT_MAX_MN:
        return sum(1 for p in _exact_u_cdf(m, n) if p <= alpha / 2 + 1e-12)
    z = stats.norm.ppf(1 - alpha / 2)
    sigma = math.sqrt(m * n * (m + n + 1) / 12)
    return max(0, math.floor(m * n / 2 + 0.5 - z * sigma))


def _thin(xs: np.ndarray, limit: int) -> np.ndarray:
    if xs.size <= limit:
        return xs
    return np.random.default_rng(0).choice(xs, size=limit, replace=False)


def ratio_ci(base: np.ndarray, new: np.ndarray, alpha: float) -> tuple[float, float] | None:
    """Hodges–Lehmann interval (level 1 - alpha) of the ratio new/base: order statistics
    of the pairwise log differences. None when too few samples or any sample <= 0."""
    if base.min() <= 0 or new.min() <= 0:
        return None
    if base.size * new.size > _MAX_PAIRS:
        limit = int(math.sqrt(_MAX_PAIRS))
        base, new = _thin(base, limit), _thin(new, limit)
    m, n = base.size, new.size
    k = _ci_rank(m, n, alpha)
    if k < 1:
        return None
    d = (np.log(new)[None, :] - np.log(base)[:, None]).ravel()
    lo_hi = np.partition(d, (k - 1, d.size - k))
    return float(math.exp(lo_hi[k - 1])), float(math.exp(lo_hi[d.size - k]))


def mann_whitney_p(base: np.ndarray, new: np.ndarray) -> float:
    """Two-sided Mann–Whitney U p-value: exact without ties up to m*n = 2500, else the
    tie-corrected normal approximation with continuity correction."""
    ties = np.unique(np.concatenate([base, new])).size < base.size + new.size
    method = "exact" if base.size * new.size <= _EXACT_MAX_MN and not ties else "asymptotic"
    p = float(stats.mannwhitneyu(base, new, alternative="two-sided", method=method).pvalue)
    return 1.0 if math.isnan(p) else min(p, 1.0)  # all values tied: no evidence of a change


def compare_metric(base: Record, new: Record, metric: str, *, alpha: float = 0.05) -> MetricChange | None:
    """One metric of a case, BASE against NEW (both ok); None when either lacks it."""
    metric = ALIASES.get(metric, metric)
    b_val, n_val = metric_value(base, metric), metric_value(new, metric)
    if b_val is None or n_val is None:
        return None
    if metric not in SAMPLE_METRICS:
        ratio = n_val / b_val if b_val != 0 and math.isfinite(b_val) and math.isfinite(n_val) else None
        return MetricChange(new.case_id, metric, "value", b_val, n_val, ratio=ratio)
    xs, ys = metric_samples(base, metric), metric_samples(new, metric)
    if xs is None or ys is None:  # a speed metric without samples cannot be tested
        return MetricChange(new.case_id, metric, "speed", b_val, n_val,
                            ratio=n_val / b_val if b_val else None)
    inverse = SAMPLE_METRICS[metric][1]
    b_med, n_med = float(np.median(xs)), float(np.median(ys))
    ratio = n_med / b_med if b_med > 0 else None
    ci = ratio_ci(xs, ys, alpha)
    p = mann_whitney_p(xs, ys)
    if inverse:  # throughput = constant / latency: invert the ratio and its interval
        ratio = 1 / ratio if ratio else None
        ci = (1 / ci[1], 1 / ci[0]) if ci else None
    else:
        b_val, n_val = b_med, n_med
    return MetricChange(
        new.case_id, metric, "speed", b_val, n_val, ratio=ratio, ci_low=ci[0] if ci else None,
        ci_high=ci[1] if ci else None, p_value=p, significant=p < alpha, n_base=int(xs.size), n_new=int(ys.size),
    )


def compare_runs(base: list[Record], new: list[Record], *, alpha: float = 0.05,
                 metrics: list[str] | tuple[str, ...] | None = None) -> Comparison:
    """Match cases by case_id; compare each metric of each case ok in both runs.
    `metrics` defaults to DEFAULT_SPEED_METRICS + DEFAULT_ACCURACY_METRICS."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    names = [ALIASES.get(m, m) for m in (metrics or DEFAULT_SPEED_METRICS + DEFAULT_ACCURACY_METRICS)]
    b_idx, n_idx = index_records(base), index_records(new)
    out = Comparison(alpha=alpha, n_base=len(b_idx), n_new=len(n_idx))
    out.only_base = [cid for cid in b_idx if cid not in n_idx]
    out.only_new = [cid for cid in n_idx if cid not in b_idx]
    for cid, n_rec in n_idx.items():
        b_rec = b_idx.get(cid)
        if b_rec is None:
            continue
        out.matched += 1
        if b_rec.status != n_rec.status:
            out.status_changes.append(StatusChange(cid, b_rec.status, n_rec.status, n_rec.reason or b_rec.reason))
        if b_rec.status == n_rec.status == "ok":
            both_timings_meaningful = timings_meaningful(b_rec) and timings_meaningful(n_rec)
            if not both_timings_meaningful:
                out.interpreted.append(cid)
            for path in PATH_METRICS:  # the same label, another implementation: say so
                was, now = b_rec.metrics.get(path), n_rec.metrics.get(path)
                if was != now:
                    out.path_changes.append(f"{cid}: {path} {was or '(none)'} -> {now or '(none)'}")
            for metric in names:
                if not both_timings_meaningful and is_speed_metric(metric):
                    continue  # the interpreter's timings measure the interpreter
                change = compare_metric(b_rec, n_rec, metric, alpha=alpha)
                if change is not None:
                    out.changes.append(change)
    return out


# --------------------------------------------------------------------------- formatting


def fmt_value(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "–"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == int(v) and abs(v) < 1e15:
        return f"{int(v):,}"
    if abs(v) >= 1000:
        return f"{v:,.1f}"
    return f"{v:.4g}"


def fmt_diff(d: float | None) -> str:
    if d is None or math.isnan(d):
        return "–"
    if math.isinf(d):
        return "+inf" if d > 0 else "-inf"
    return "0" if d == 0 else f"{d:+.3g}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def fmt_ratio(c: MetricChange) -> str:
    """`1.12x [1.08, 1.15] *`; `~` instead of `*` when not significant."""
    if c.ratio is None:
        return "–"
    ci = f"[{c.ci_low:.2f}, {c.ci_high:.2f}]" if c.ci_low is not None and c.ci_high is not None else "[n/a]"
    return f"{c.ratio:.2f}x {ci} {'*' if c.significant else '~'}"


def _legend(comparison: Comparison) -> str:
    level = round(100 * (1 - comparison.alpha), 1)
    return (f"ratio = new/base of medians, [{level:g}% CI] (Hodges–Lehmann on log samples); "
            f"* significant (Mann–Whitney p < {comparison.alpha:g}), ~ not significant")


def _header(comparison: Comparison) -> str:
    return (f"BASE {comparison.n_base} cases, NEW {comparison.n_new} cases, {comparison.matched} matched; "
            f"{len(comparison.only_base)} only in BASE, {len(comparison.only_new)} only in NEW, "
            f"{len(comparison.status_changes)} status changes")


def _speed_rows(comparison: Comparison) -> list[list[str]]:
    return [[c.case_id, c.metric, fmt_value(c.base), fmt_value(c.new), fmt_ratio(c), fmt_p(c.p_value),
             f"{c.n_base}/{c.n_new}", c.verdict if c.verdict != "same" else ""] for c in comparison.speed()]


def _value_rows(comparison: Comparison) -> list[list[str]]:
    return [[c.case_id, c.metric, fmt_value(c.base), fmt_value(c.new), fmt_diff(c.diff),
             c.verdict if c.verdict != "same" else ""] for c in comparison.values()]


_SPEED_HEAD = ["case", "metric", "base", "new", "new/base", "p", "n", ""]
_VALUE_HEAD = ["case", "metric", "base", "new", "Δ", ""]


def _status_lines(comparison: Comparison) -> list[str]:
    lines = [f"only in BASE: {cid}" for cid in comparison.only_base]
    lines += [f"only in NEW: {cid}" for cid in comparison.only_new]
    lines += [f"status: {s.case_id}: {s.base} -> {s.new}" + (f" ({s.reason})" if s.reason else "")
              for s in comparison.status_changes]
    lines += [f"path: {change}" for change in comparison.path_changes]
    lines += [f"timings not compared (Triton interpreted): {cid}" for cid in comparison.interpreted]
    return lines


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    numeric = {2, 3, 4, 5, 6}
    out = []
    for row in [head, *rows]:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(out)


def render_compare_text(comparison: Comparison) -> str:
    parts = [_header(comparison)]
    if comparison.speed():
        parts += ["", "speed", _text_table(_SPEED_HEAD, _speed_rows(comparison)), _legend(comparison)]
    if comparison.values():
        parts += ["", "accuracy and other values (NEW - BASE, no test)",
                  _text_table(_VALUE_HEAD, _value_rows(comparison))]
    status = _status_lines(comparison)
    if status:
        parts += ["", *status]
    if not comparison.changes and not status:
        parts += ["", "(nothing to compare)"]
    return "\n".join(parts)


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[str]], code_cols: tuple[int, ...] = (0, 1)) -> list[str]:
    def cell(i: int, text: str) -> str:
        if i in code_cols and text:
            return "`" + _md_cell(text.replace("`", "'")) + "`"
        return _md_cell(text)

    lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(cell(i, c) for i, c in enumerate(row)) + " |" for row in rows]
    return lines


def render_compare_markdown(comparison: Comparison) -> str:
    lines = ["## infermatrix compare", "", _md_cell(_header(comparison))]
    if comparison.speed():
        lines += ["", "### Speed", "", *_md_table(_SPEED_HEAD, _speed_rows(comparison)), "",
                  f"_{_md_cell(_legend(comparison))}_"]
    if comparison.values():
        lines += ["", "### Accuracy and other values", "", "NEW − BASE; no test.", "",
                  *_md_table(_VALUE_HEAD, _value_rows(comparison))]
    status = _status_lines(comparison)
    if status:
        lines += ["", "### Cases", ""] + [f"- {_md_cell(s)}" for s in status]
    return "\n".join(lines) + "\n"


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td.l, th.l { text-align: left; font-family: ui-monospace, monospace; }
tr.worse td { background: #fde8e8; }
tr.better td { background: #e6f6e6; }
tr.same td { color: #555; }
p.legend, p.head { color: #555; }
"""


_LEFT = ' class="l"'


def _html_table(head: list[str], rows: list[list[str]], classes: list[str]) -> str:
    def tr(cells: list[str], tag: str, cls: str = "") -> str:
        inner = "".join(f"<{tag}{_LEFT if i < 2 else ''}>{html.escape(c)}</{tag}>" for i, c in enumerate(cells))
        return f'<tr class="{html.escape(cls)}">{inner}</tr>' if cls else f"<tr>{inner}</tr>"

    body = "".join(tr(r, "td", c) for r, c in zip(rows, classes))
    return f"<table><thead>{tr(head, 'th')}</thead><tbody>{body}</tbody></table>"


def render_compare_html(comparison: Comparison) -> str:
    """A self-contained page (inline CSS, no scripts); every string is escaped."""
    parts = [f'<p class="head">{html.escape(_header(comparison))}</p>']
    if comparison.speed():
        parts += ["<h2>Speed</h2>",
                  _html_table(_SPEED_HEAD, _speed_rows(comparison), [c.verdict for c in comparison.speed()]),
                  f'<p class="legend">{html.escape(_legend(comparison))}</p>']
    if comparison.values():
        parts += ["<h2>Accuracy and other values</h2>", "<p>NEW − BASE; no test.</p>",
                  _html_table(_VALUE_HEAD, _value_rows(comparison), [c.verdict for c in comparison.values()])]
    status = _status_lines(comparison)
    if status:
        parts += ["<h2>Cases</h2>", "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in status) + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>infermatrix compare</title><style>{_CSS}</style></head>"
            f"<body><h1>infermatrix compare</h1>{''.join(parts)}</body></html>\n")
