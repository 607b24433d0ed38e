"""What a record says beyond its numbers, read the same way by every renderer,
`compare` and `gate`: which implementation really ran, whether its timings mean
anything, what the CPU it ran on can do, its shape label, its speedup over its
baseline, the Pareto front of speed against drift, and the summary tables' columns."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from infermatrix.reports.record import SHAPE_TAGS, Record, shape_parts

if TYPE_CHECKING:
    from infermatrix.reports.paired import PairedRatio

REFERENCE = "reference"  # the variant every other is measured against when no baseline is named
DRIFT = "drift"  # the accuracy workload: no timings

# metrics naming the implementations a seam really ran in a case, joined by '+' (variants
# note them; see infermatrix.variants.note_path). attention: block_sparse_cpu,
# block_sparse_triton, block_sparse_gather, dense_masked, flex, triton_flash, triton_decode;
# linear: int8pack, dequant, triton, int_mm, torchao, and for int8_llm int8 or fp32_fallback
PATH_METRICS = ("attention_path", "linear_path", "peer_path")  # peer: which deployed stack ran
# metrics that are a timing (or derived from one, energy included): meaningless for an
# interpreted record
_SPEED_PREFIXES = ("latency_ms", "ttft_ms", "tpot_ms", "first_call_ms", "achieved_", "pct_of_", "energy_j",
                   "avg_power_w", "itl_ms", "e2e_ms")
# ...and the serve workload's figures that come from its clock: throughput, goodput,
# whether requests met the SLO, and the KV blocks and preemptions a stream's overlap took
_SPEED_NAMES = ("tokens_per_s", "sequences_per_s", "request_throughput", "goodput_rps", "slo_attainment", "meets_slo",
                "stream_s", "preemptions", "peak_kv_blocks")


# the fields naming what ran rather than its shape
_CASE_IDENTITY = ("model", "variant", "workload", "dtype", "device")


# a serve case's load and SLO fields: the load shows in its shape label after the other
# fields (`2req/s`, `8clients`, `static-batching`), the SLO does not (the Serving section
# and serve_slo_text state it); case ids, which must tell every case apart, tag them all
_SERVE_LOAD = ("rate", "concurrency", "batching")
_SERVE_SLO = ("slo_ttft_ms", "slo_itl_ms", "slo_pct")


def shape_label(case: Mapping, *, without: Iterable[str] = ()) -> str:
    """A case's shape for a table cell or a chart: `b1 p128 n6`, `w2 p128 n6`,
    `b1 p512 h9 kv3 d64 causal`, `b2 p16 k64 n256`, a serve case's `b8 p256 n64 q64 tb256
    2req/s` (its load last, its SLO left out). Every nonzero integer field shows, a
    field this module has no tag for under its own name after the known ones; causal or
    full only for the attention workload. `without`: fields to leave out."""
    skip = set(without) | (set() if case.get("workload") == "attention" else {"causal"})
    skip |= {*_SERVE_LOAD, *_SERVE_SLO}
    extra = sorted(k for k, v in case.items() if k not in SHAPE_TAGS and k not in _CASE_IDENTITY
                   and isinstance(v, int) and not isinstance(v, bool))
    parts = shape_parts(case, [name for name in [*SHAPE_TAGS, *extra] if name not in skip])
    return " ".join(parts + _load_parts(case, set(without)))


def _load_parts(case: Mapping, without: set[str]) -> list[str]:
    """A serve case's load, for its shape label: the offered rate of an open loop, the
    clients of a closed one, a batching other than continuous."""
    shown = [name for name in _SERVE_LOAD if name not in without]
    rate, clients, batching = case.get("rate"), case.get("concurrency"), case.get("batching")
    parts = []
    if "rate" in shown and finite_positive(rate) is not None:
        parts.append(f"{rate:g}req/s")
    if "concurrency" in shown and finite_positive(clients) is not None:
        parts.append(f"{clients:g}clients")
    if "batching" in shown and batching and batching != CONTINUOUS:
        parts.append(f"{batching}-batching")
    return parts


def is_speed_metric(metric: str) -> bool:
    return metric in _SPEED_NAMES or metric.startswith(_SPEED_PREFIXES)


def is_peer(record: Record) -> bool:
    """A row measuring what users deploy (Hugging Face transformers, llama.cpp), not ours."""
    return bool((record.metrics or {}).get("peer_path"))


def timings_meaningful(record: Record) -> bool:
    """False for a record whose Triton kernels ran in the CPU interpreter: its accuracy
    metrics hold, its timings measure the interpreter."""
    return not (record.metrics or {}).get("triton_interpreted")


def is_speed_record(record: Record) -> bool:
    """A record whose timings belong in speed charts and speedups: not drift, and not
    run through the Triton interpreter."""
    return record.case.get("workload") != DRIFT and timings_meaningful(record)


def finite_positive(value: object) -> float | None:
    """A finite positive number as a float, else None (missing, zero, NaN, inf, bool, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def positive_metric(record: Record, metric: str) -> float | None:
    """An ok record's metric when it is a finite positive number, else None."""
    return finite_positive((record.metrics or {}).get(metric)) if record.status == "ok" else None


def latency_p50(record: Record) -> float | None:
    """An ok record's latency_ms_p50 when it is a finite positive number, else None."""
    return positive_metric(record, "latency_ms_p50")


def case_key(case: Mapping, **override) -> str:
    """Identity of a case (all its fields), optionally with some replaced."""
    return json.dumps({**case, **override}, sort_keys=True, default=str)


@dataclass(frozen=True)
class Speedup:
    """How much faster a record ran than its baseline: the baseline's latency over its own
    (> 1: faster). From paired rounds when both ran interleaved in as many rounds, with the
    interval of that ratio; else the ratio of their latency_ms_p50, without one."""

    ratio: float
    baseline_id: str  # the case_id of the record it is a ratio to (its own for a baseline row)
    ci_low: float | None = None  # 95% interval of the paired ratio; None without paired rounds
    ci_high: float | None = None  # (or with fewer than 6 of them)
    rounds: int = 0  # the paired rounds behind the ratio; 0: a ratio of medians
    named: bool = False  # the record named its baseline (Record.baseline_id), not the same case's reference row
    baseline: str = ""  # what sets the baseline apart from the record: its differing case fields

    def summary(self) -> str:
        """`1.873× over <baseline_id>`, and its paired rounds and interval when it has them."""
        text = f"{self.ratio:.3f}× over {self.baseline_id}"
        if self.rounds:
            text += f", paired over {self.rounds} rounds"
        if self.ci_low is not None and self.ci_high is not None:
            text += f", 95% CI {self.ci_low:.3f}–{self.ci_high:.3f}×"
        return text


def _paired(record: Record, baseline: Record) -> PairedRatio | None:
    """The paired ratio baseline/record of their per-round latency medians, when both
    took the same rounds of one interleaved group (env["interleave"], bench/interleave.py)
    and so carry round_sizes with the same number (>= 2) of them. An A/B side's records
    have rounds too, taken with the other side's: they are never paired here."""
    # imported here: ab reads this module at import, and scipy (paired) stays out of the
    # import of every module that only needs a label or a column
    from infermatrix.reports.ab import round_values
    from infermatrix.reports.paired import paired_ratio

    group = (record.env or {}).get("interleave")
    if not group or group != (baseline.env or {}).get("interleave"):
        return None
    own, base = round_values(record, "latency_ms_p50"), round_values(baseline, "latency_ms_p50")
    if own is None or base is None or own.size != base.size or own.size < 2:
        return None
    try:
        return paired_ratio(base, own).inverse()  # paired_ratio is NEW/BASE of times: a slowdown
    except ValueError:  # a round without a positive, finite median: no pairing
        return None


def _differs(case: Mapping, baseline: Mapping) -> str:
    """The baseline's case fields that differ from the case's, as a short label."""
    parts = [str(baseline.get(k)) for k in _CASE_IDENTITY if baseline.get(k) != case.get(k)]
    if shape_label(baseline) != shape_label(case):
        parts.append(shape_label(baseline))
    return " · ".join(parts)


def speedup_details(records: Sequence[Record]) -> dict[str, Speedup]:
    """case_id -> its Speedup over its baseline: the record whose case_id is its
    `baseline_id`, or when that is None the same case under the `reference` variant (a
    reference row is its own baseline, 1.0). Only speed records with a latency count
    (is_speed_record, latency_p50), on both sides; a record without such a baseline has none."""
    timed = [r for r in records if is_speed_record(r) and latency_p50(r) is not None]
    by_id = {r.case_id: r for r in timed}
    reference = {case_key(r.case): r for r in timed if r.case.get("variant") == REFERENCE}
    out = {}
    for r in timed:
        named = r.baseline_id is not None
        base = by_id.get(r.baseline_id) if named else reference.get(case_key(r.case, variant=REFERENCE))
        if base is None:
            continue
        paired = _paired(r, base) if base is not r else None
        ratio, low, high, rounds = ((latency_p50(base) / latency_p50(r), None, None, 0) if paired is None
                                    else (paired.ratio, paired.ci_low, paired.ci_high, paired.n))
        out[r.case_id] = Speedup(ratio, base.case_id, low, high, rounds, named, _differs(r.case, base.case))
    return out


def speedups(records: Sequence[Record]) -> dict[str, float]:
    """case_id -> the ratio of its Speedup (speedup_details)."""
    return {case_id: s.ratio for case_id, s in speedup_details(records).items()}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (speedup, drift) that no other point dominates: none is at
    least as fast with at most as much drift and strictly better in one of them.
    The fastest for a given drift. Points with a non-finite coordinate are ignored;
    equal points are all kept. Sorted by drift, then speedup (the front's line order)."""
    valid = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]

    def dominates(a: int, b: int) -> bool:
        (xa, ya), (xb, yb) = points[a], points[b]
        return xa >= xb and ya <= yb and (xa > xb or ya < yb)

    front = [i for i in valid if not any(dominates(j, i) for j in valid if j != i)]
    return sorted(front, key=lambda i: (points[i][1], points[i][0], i))


def ran(record: Record) -> str:
    """The paths a record ran, for a table cell: `attention block_sparse_gather,
    linear fp32_fallback, model window 4096, Triton interpreted`; empty when none were noted."""
    m = record.metrics or {}
    parts = [f"{name.removesuffix('_path')} {m[name]}" for name in PATH_METRICS if m.get(name)]
    if m.get("model_window"):  # the model's own sliding window (Mistral, Phi-3) was in force
        parts.append(f"model window {m['model_window']}")
    if not timings_meaningful(record):
        parts.append("Triton interpreted")
    return ", ".join(parts)


def cpu_features_text(env: dict) -> str:
    """What the CPU can do, from env's `cpu_capability` (the ISA torch's CPU kernels
    dispatch to) and `cpu_flags` (flag -> present): bf16 and int8 figures differ by
    whole factors between an AVX2-only CPU and one with AVX-512 BF16/VNNI or AMX."""
    capability, flags = env.get("cpu_capability"), env.get("cpu_flags")
    parts = [f"torch dispatch {capability}"] if capability else []
    if isinstance(flags, dict) and flags:
        has = [name for name, present in flags.items() if present]
        lacks = [name for name, present in flags.items() if not present]
        parts += [f"has {', '.join(has)}" if has else "", f"lacks {', '.join(lacks)}" if lacks else ""]
    return " · ".join(p for p in parts if p) or "not recorded"


def energy_text(env: dict) -> str:
    """Which energy counters a run read, per device type, or why none (env["energy"],
    bench/energy.py): `cpu rapl (intel-rapl:0 (package-0)) · cuda none: <why>`. Without
    a counter the energy columns are absent, and this says why."""
    found = env.get("energy")
    if not isinstance(found, dict) or not found:
        return "not recorded"
    parts = []
    for kind, counters in found.items():
        if not isinstance(counters, dict):
            continue
        if counters.get("source"):
            parts.append(f"{kind} {counters['source']} ({', '.join(counters.get('counters') or [])})")
        else:
            parts.append(f"{kind} none: {counters.get('why') or 'unknown'}")
    return " · ".join(parts) or "not recorded"


@dataclass(frozen=True)
class Column:
    """A column of the summary tables (terminal, Markdown, HTML): a record metric, or one
    derived from two records (SPEEDUP, BASELINE; column_value reads either)."""

    metric: str  # the results.csv column
    header: str  # Markdown and HTML header
    short: str  # terminal header
    fmt: str  # format of a value
    always: bool = True  # shown even when no record has the metric (the columns every run compares)
    numeric: bool = True  # False: text (sorts as text in the HTML table)

    def text(self, value: object) -> str:
        """A cell: blank when not measured (None, NaN), text as is, `n<6` for a CI of the
        median with too few samples (95% needs 6), `inf` for an SQNR of identical outputs."""
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return ("n<6" if self.metric == "latency_ms_ci_rel" else "inf") if value > 0 else "-inf"
        return self.fmt.format(value)


SPEEDUP = "speedup"  # Speedup.ratio
BASELINE = "baseline"  # what sets a named baseline apart (Speedup.baseline)

# The summary tables' metric columns, in order. The optional ones (always=False) show
# only when some record has them: encoders' sequences/s and hidden-state drift, speculative
# decoding's acceptance and tokens per forward, serving's tail latencies and goodput, energy
# per token (only where a counter was readable); the baseline when some record names
# one (Record.baseline_id).
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("latency_ms_p50", "ms p50", "ms_p50", "{:,.2f}"),
    Column("latency_ms_ci_rel", "CI ±", "ci±", "{:.1%}"),
    Column("tokens_per_s", "tok/s", "tok/s", "{:,.1f}"),
    Column("sequences_per_s", "seq/s", "seq/s", "{:,.1f}", always=False),
    Column("acceptance_rate", "accepted", "accept", "{:.0%}", always=False),  # speculative decoding
    Column("tokens_per_forward", "tok/forward", "tok/fwd", "{:.2f}", always=False),
    Column("ttft_ms_p99", "TTFT p99", "ttft_p99", "{:,.1f}", always=False),  # serving: ms, per request
    Column("itl_ms_p99", "ITL p99", "itl_p99", "{:,.1f}", always=False),  # ms, over every inter-token gap
    Column("goodput_rps", "goodput/s", "goodput/s", "{:,.2f}", always=False),  # requests/s meeting the SLO
    Column("slo_attainment", "SLO met", "slo_met", "{:.0%}", always=False),  # share of requests meeting it
    Column("energy_j_per_token", "J/token", "J/tok", "{:.3g}", always=False),
    Column("pct_of_limit", "% limit", "%limit", "{:.0f}%"),
    Column(SPEEDUP, "× base", "×base", "{:.2f}×"),
    Column(BASELINE, "baseline", "baseline", "{}", always=False, numeric=False),
    Column("kl_mean", "KL mean", "kl_mean", "{:.2e}"),
    Column("top1_agree_pct", "top-1 %", "top1%", "{:.1f}"),
    Column("ppl_delta_pct", "Δppl %", "Δppl%", "{:+.2f}"),
    Column("hidden_cosine_mean", "hidden cos", "cos", "{:.8f}", always=False),  # int8 differs in the 8th digit
    Column("hidden_sqnr_db", "hidden SQNR dB", "sqnr_db", "{:.1f}", always=False),
    Column("mlm_top1_agree_pct", "MLM top-1 %", "mlm_top1%", "{:.1f}", always=False),
)


def shown_columns(records: list[Record], speedup: Mapping[str, Speedup] | None = None) -> list[Column]:
    """The metric columns a table of `records` shows: every always-column, the optional
    ones some record has, and the baseline when some speedup is over a named one."""
    present = {key for r in records for key, value in (r.metrics or {}).items() if value is not None}
    if any(s.named for s in (speedup or {}).values()):
        present.add(BASELINE)
    return [c for c in METRIC_COLUMNS if c.always or c.metric in present]


def column_value(record: Record, column: Column, speedup: Mapping[str, Speedup]) -> object:
    """A record's value in a column: its metric, or its speedup (speedup_details) and the
    baseline it is over when the record named one (`itself` on the baseline's own row)."""
    s = speedup.get(record.case_id)
    if column.metric == SPEEDUP:
        return None if s is None else s.ratio
    if column.metric == BASELINE:
        return (s.baseline or "itself") if s is not None and s.named else None
    return (record.metrics or {}).get(column.metric)


# -------------------------------------------------------------------- units of the charts

_LATENCY_UNIT = {"decode": "ms per output token", "generate": "ms per generation"}


def latency_unit(workload: str) -> str:
    """What a workload's latency_ms_* is per: a decode's is per output token."""
    return _LATENCY_UNIT.get(workload, "ms per call")


def metric_label(metric: str, workload: str) -> str:
    """A chart axis's label for a metric: its name (its unit)."""
    if metric == "latency_ms_p50":
        return f"latency p50 ({latency_unit(workload)})"
    return {"tokens_per_s": "throughput (tokens/s)", "achieved_tflops": "achieved (TFLOP/s)",
            "ttft_ms_p99": "p99 TTFT (ms)", "itl_ms_p99": "p99 inter-token latency (ms)",
            "goodput_rps": "goodput (requests/s)"}.get(metric, metric)


# -------------------------------------------------------------------- roofline


def device_kind(device: object) -> str:
    """The device type a case ran on (`cuda:1` -> `cuda`): the key of its env["peaks"]."""
    return str(device or "").split(":", 1)[0]


@dataclass(frozen=True)
class RooflinePoint:
    """A case on the roofline: its arithmetic intensity (flops / bytes_moved, FLOP per
    byte) and the FLOP/s it achieved (achieved_tflops)."""

    case_id: str
    variant: str
    dtype: str
    intensity: float  # FLOP per byte
    flops_per_s: float  # FLOP/s
    pct_of_limit: float | None  # the record's share of its roofline limit, %


@dataclass(frozen=True)
class Roofline:
    """One device's measured ceilings (its env["peaks"]) and the cases that ran on it."""

    device: str  # device type: cpu, cuda
    bandwidth: float | None  # bytes/s, the measured copy bandwidth; None: no peaks recorded
    compute: dict[str, float]  # dtype -> FLOP/s, the measured GEMM peak
    measured_at: str
    points: tuple[RooflinePoint, ...]

    def ridge(self, dtype: str) -> float | None:
        """The intensity (FLOP/byte) where the bandwidth roof meets the dtype's compute roof."""
        peak = self.compute.get(dtype)
        return peak / self.bandwidth if peak is not None and self.bandwidth else None


def _peaks_of(record: Record, kind: str) -> dict:
    peaks = ((record.env or {}).get("peaks") or {}).get(kind)
    return peaks if isinstance(peaks, dict) else {}


def rooflines(records: Sequence[Record]) -> list[Roofline]:
    """A roofline per device type and measured peaks (records merged from machines with
    other peaks get their own): the speed records (is_speed_record) that ran ok with
    flops, bytes_moved and achieved_tflops, in record order."""
    groups: dict[tuple[str, str], list[RooflinePoint]] = {}
    peaks_of: dict[tuple[str, str], dict] = {}
    for r in records:
        flops, moved, tflops = (positive_metric(r, m) for m in ("flops", "bytes_moved", "achieved_tflops"))
        if not is_speed_record(r) or flops is None or moved is None or tflops is None:
            continue
        kind = device_kind(r.case.get("device"))
        peaks = _peaks_of(r, kind)
        key = (kind, json.dumps(peaks, sort_keys=True, default=str))
        peaks_of.setdefault(key, peaks)
        groups.setdefault(key, []).append(RooflinePoint(
            r.case_id, str(r.case.get("variant", "")), str(r.case.get("dtype", "")), flops / moved, tflops * 1e12,
            positive_metric(r, "pct_of_limit")))
    out = []
    for key, points in groups.items():
        peaks = peaks_of[key]
        bandwidth = finite_positive(peaks.get("bandwidth_gbs"))
        compute = {str(d): v * 1e12 for d, v in ((d, finite_positive(v)) for d, v in
                                                 (peaks.get("gemm_tflops") or {}).items()) if v is not None}
        out.append(Roofline(key[0], None if bandwidth is None else bandwidth * 1e9, compute,
                            str(peaks.get("measured_at") or ""), tuple(points)))
    return out


# -------------------------------------------------------------------- sweeps

SWEEP_FIELDS = ("prompt_len", "kv_len", "batch")  # the case fields a sweep chart runs along
DENSITY = "attention_density"  # ...and the metric a density sweep runs along
_SWEEP_AXIS = {"prompt_len": "prompt length (tokens)", "kv_len": "keys attended, kv_len (tokens)",
               "batch": "batch (sequences)", DENSITY: "attention density (share of block pairs computed)",
               "rate": "offered load (requests/s)"}


def sweep_axis_label(along: str, workload: str) -> str:
    """A sweep chart's x axis label: its name (its unit)."""
    if along == "prompt_len" and workload == "attention":
        return "sequence length (queries, tokens)"
    return _SWEEP_AXIS.get(along, along)


@dataclass(frozen=True)
class SweepPoint:
    x: float
    y: float
    case_id: str


@dataclass(frozen=True)
class SweepSeries:
    """A line of a sweep: a variant's cases along the swept field; in a density sweep, the
    variants that differ in one parameter only, named with `*` for it
    (`block_sparse(pattern=sliding,density=*)`), or a variant alone."""

    name: str
    variant: str  # the variant whose colour the line takes (a density family's first)
    points: tuple[SweepPoint, ...]  # by x


@dataclass(frozen=True)
class SweepLevel:
    """A variant of a density sweep's cases that has no density (dense attention): its
    value, a level across the chart."""

    variant: str
    y: float
    case_id: str


@dataclass(frozen=True)
class Sweep:
    """Cases that agree on everything but the variant and one swept field (or, for
    DENSITY, the variant's one differing parameter and so its density)."""

    along: str  # a SWEEP_FIELDS field or DENSITY
    metric: str  # the y axis
    case: dict  # what the cases share: the first one's case without its variant and the swept field
    series: tuple[SweepSeries, ...]
    levels: tuple[SweepLevel, ...] = ()

    @property
    def log_x(self) -> bool:
        """The swept values span more than 8×: a log x axis."""
        xs = [p.x for s in self.series for p in s.points]
        return max(xs) > 8 * min(xs)


def _swept_value(case: Mapping, along: str) -> float | None:
    value = case.get(along)
    if along == "kv_len":
        value = value or case.get("prompt_len")  # 0: as many keys as queries
    return finite_positive(value) if isinstance(value, int) else None


def _series_order(name: str) -> tuple:
    return name != REFERENCE, name


def _make_sweep(along: str, metric: str, first: Record, lines: Mapping[tuple[str, str], list[SweepPoint]],
                levels: Sequence[SweepLevel] = ()) -> Sweep | None:
    """A Sweep of the lines ((name, colour variant) -> points) when some line has two
    points at different x; else None."""
    series = tuple(SweepSeries(name, variant, tuple(sorted(points, key=lambda p: (p.x, p.y))))
                   for (name, variant), points in sorted(lines.items(), key=lambda kv: _series_order(kv[0][0])))
    if not any(len({p.x for p in s.points}) > 1 for s in series):
        return None
    case = {k: v for k, v in first.case.items() if k not in ("variant", along)}
    return Sweep(along, metric, case, series, tuple(sorted(levels, key=lambda v: _series_order(v.variant))))


def _field_sweeps(speed: Sequence[Record]) -> list[tuple[int, Sweep]]:
    """Per swept field, the groups of cases equal in every other field but the variant."""
    out = []
    for along in SWEEP_FIELDS:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(speed):
            if _swept_value(r.case, along) is not None:
                groups.setdefault(case_key(r.case, variant=None, **{along: None}), []).append(i)
        for members in groups.values():
            rs = [speed[i] for i in members]
            if len({_swept_value(r.case, along) for r in rs}) < 2:
                continue
            # throughput against batch; latency against lengths (the time to a first token)
            batch_rate = along == "batch" and all(positive_metric(r, "tokens_per_s") for r in rs)
            metric = "tokens_per_s" if batch_rate else "latency_ms_p50"
            lines: dict[tuple[str, str], list[SweepPoint]] = {}
            for r in rs:
                y = positive_metric(r, metric)
                if y is not None:
                    variant = str(r.case.get("variant", ""))
                    lines.setdefault((variant, variant), []).append(
                        SweepPoint(_swept_value(r.case, along), y, r.case_id))
            sweep = _make_sweep(along, metric, rs[0], lines)
            if sweep is not None:
                out.append((members[0], sweep))
    return out


_SPEC_PART = re.compile(r"([^+()]+)(?:\(([^()]*)\))?")


def _spec_parts(variant: str) -> list[tuple[str, dict[str, str]]]:
    """A variant spec's parts, `a(k=v)+b` -> [(a, {k: v}), (b, {})] (reports cannot import
    the variants' parser; canonical specs list parameters in a fixed order)."""
    parts = []
    for match in _SPEC_PART.finditer(variant):
        params = (item.partition("=") for item in (match.group(2) or "").split(",") if item.strip())
        parts.append((match.group(1).strip(), {k.strip(): v.strip() for k, _, v in params}))
    return parts


def _spec_text(parts: Sequence[tuple[str, Mapping[str, str]]]) -> str:
    return "+".join(name + (f"({','.join(f'{k}={v}' for k, v in params.items())})" if params else "")
                    for name, params in parts)


def density_families(variants: Iterable[str]) -> dict[str, str]:
    """variant -> the line it belongs to in a density sweep: its spec with `*` for the one
    parameter in which it differs from its siblings (variants with the same parts and every
    other parameter equal), the largest families formed first but a differing pattern
    last; a variant with no sibling is a line of its own."""
    variants = list(dict.fromkeys(variants))
    candidates: dict[str, list[str]] = {}
    starred_key: dict[str, str] = {}
    for v in variants:
        parts = _spec_parts(v)
        for i, (name, params) in enumerate(parts):
            for key in params:
                starred = _spec_text([*parts[:i], (name, {**params, key: "*"}), *parts[i + 1:]])
                candidates.setdefault(starred, []).append(v)
                starred_key[starred] = key
    family: dict[str, str] = {}
    # a line runs along a size (density, window, ...), never across patterns: pattern
    # families are formed last, from what is left
    order = sorted(candidates.items(), key=lambda kv: (starred_key[kv[0]] == "pattern", -len(kv[1]), kv[0]))
    for name, members in order:
        free = [v for v in members if v not in family]
        if len(free) > 1:
            family.update((v, name) for v in free)
    return {v: family.get(v, v) for v in variants}


def _density_sweeps(speed: Sequence[Record]) -> list[tuple[int, Sweep]]:
    """Per group of cases equal in every field but the variant: latency against the
    attention density of the variants that report one, the others as levels."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(speed):
        groups.setdefault(case_key(r.case, variant=None), []).append(i)
    out = []
    for members in groups.values():
        rs = [speed[i] for i in members if latency_p50(speed[i]) is not None]
        sparse = [r for r in rs if positive_metric(r, DENSITY) is not None]
        if len({positive_metric(r, DENSITY) for r in sparse}) < 2:
            continue
        family = density_families(str(r.case.get("variant", "")) for r in sparse)
        first_of: dict[str, str] = {}
        lines: dict[tuple[str, str], list[SweepPoint]] = {}
        for r in sparse:
            variant = str(r.case.get("variant", ""))
            name = family[variant]
            lines.setdefault((name, first_of.setdefault(name, variant)), []).append(
                SweepPoint(positive_metric(r, DENSITY), latency_p50(r), r.case_id))
        levels = [SweepLevel(str(r.case.get("variant", "")), latency_p50(r), r.case_id)
                  for r in rs if positive_metric(r, DENSITY) is None]
        sweep = _make_sweep(DENSITY, "latency_ms_p50", rs[0], lines, levels)
        if sweep is not None:
            out.append((members[0], sweep))
    return out


def sweeps(records: Sequence[Record]) -> list[Sweep]:
    """The sweep charts of a run: wherever cases that agree on everything else (model,
    workload, dtype, device, the other shape fields) differ in exactly one of prompt_len,
    kv_len and batch, one line per variant along it (tokens/s against batch where every
    case has it, else latency_ms_p50); and latency against attention density where
    variants differ in one parameter. Cases where two fields vary together share no
    group, so make none. Speed records only (is_speed_record), in record order. Serve
    cases make none: their curves run along the offered rate (serving_curves)."""
    speed = [r for r in records if is_speed_record(r) and r.status == "ok" and not is_serve_record(r)]
    found = _field_sweeps(speed) + _density_sweeps(speed)
    return [sweep for _, sweep in sorted(found, key=lambda item: item[0])]


# -------------------------------------------------------------------- serving

SERVE = "serve"  # the workload: a scheduler under a stream of requests
CONTINUOUS = "continuous"  # the batching a serve line's name leaves unsaid
_SERVE_APART = ("variant", "batching", "rate")  # what sets the points of a serving group apart


def is_serve_record(record: Record) -> bool:
    return record.case.get("workload") == SERVE


def serve_line_name(case: Mapping) -> str:
    """A serving curve's name: its variant, and its batching when not continuous
    (`sdpa+paged_kv_cache (static batching)`, the baseline on the same scheduler)."""
    variant, batching = str(case.get("variant", "")), str(case.get("batching") or CONTINUOUS)
    return variant if batching == CONTINUOUS else f"{variant} ({batching} batching)"


def serve_slo_text(case: Mapping) -> str:
    """A serve case's SLO in words: `TTFT ≤ 2,000 ms and mean inter-token latency ≤ 200 ms
    for at least 90% of requests`; `none given` without a bound."""
    ttft, itl, pct = (finite_positive(case.get(k)) for k in _SERVE_SLO)
    bounds = ([f"TTFT ≤ {ttft:,.6g} ms"] if ttft is not None else []) + (
        [f"mean inter-token latency ≤ {itl:,.6g} ms"] if itl is not None else [])
    if not bounds:
        return "none given"
    return " and ".join(bounds) + (f" for at least {pct:g}% of requests" if pct is not None else "")


def _number(value: object) -> float | None:
    """A finite number as a float (zero included: a goodput of 0 is a figure), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _verdict(value: object) -> bool | None:
    """meets_slo as a bool (1.0 or True: met); None when the record has no verdict."""
    if isinstance(value, bool):
        return value
    number = _number(value)
    return None if number is None else number != 0


@dataclass(frozen=True)
class ServePoint:
    """A serve case at one offered rate: its tail latencies, goodput and SLO verdict
    (None: no SLO given, or a metric the record lacks)."""

    rate: float  # offered load, requests/s (the case's rate)
    ttft_ms_p99: float | None
    itl_ms_p99: float | None
    goodput_rps: float | None  # requests/s that met both bounds of the SLO
    tokens_per_s: float | None
    meets_slo: bool | None  # None: the record has no verdict (no SLO was given)
    case_id: str


@dataclass(frozen=True)
class ServeLine:
    """A curve of a serving group: one variant under one batching, its points by rate."""

    name: str  # serve_line_name: the variant, `(static batching)` for the static baseline
    variant: str  # the variant whose colour the line takes
    batching: str
    points: tuple[ServePoint, ...]  # by rate
    best: ServePoint | None  # the highest-rate point that meets the SLO; None when none does

    @property
    def max_rate(self) -> float | None:
        """The highest offered rate (requests/s) at which the line met the SLO."""
        return None if self.best is None else self.best.rate

    @property
    def goodput_at_max_rate(self) -> float | None:
        return None if self.best is None else self.best.goodput_rps

    @property
    def judged(self) -> bool:
        """Some point has an SLO verdict (meets_slo)."""
        return any(p.meets_slo is not None for p in self.points)

    @property
    def missed(self) -> frozenset[str]:
        """The case ids of the points that miss the SLO."""
        return frozenset(p.case_id for p in self.points if p.meets_slo is False)


@dataclass(frozen=True)
class ServeCurves:
    """Serve cases that agree on everything but the variant, the batching and the offered
    rate: latency, goodput and the SLO against the rate, a line per (variant, batching)."""

    case: dict  # what the cases share: the first one's case without variant, batching and rate
    lines: tuple[ServeLine, ...]  # the reference first, then by name

    @property
    def rates(self) -> tuple[float, ...]:
        return tuple(sorted({p.rate for line in self.lines for p in line.points}))

    @property
    def slo_ttft_ms(self) -> float | None:
        return finite_positive(self.case.get("slo_ttft_ms"))

    @property
    def slo_itl_ms(self) -> float | None:
        return finite_positive(self.case.get("slo_itl_ms"))

    @property
    def slo_pct(self) -> float | None:
        return finite_positive(self.case.get("slo_pct"))

    @property
    def label(self) -> str:
        """What the group's cases share, for a heading: model · dtype · device · shape."""
        return " · ".join(str(x) for x in (self.case.get("model"), self.case.get("dtype"), self.case.get("device"),
                                           shape_label(self.case)) if x)

    def sweep(self, metric: str) -> Sweep:
        """One of the point's metrics (ttft_ms_p99, itl_ms_p99, goodput_rps, tokens_per_s)
        against the rate, as a sweep chart's lines (a point without it left out)."""
        series = tuple(SweepSeries(line.name, line.variant, tuple(
            SweepPoint(p.rate, getattr(p, metric), p.case_id) for p in line.points if getattr(p, metric) is not None))
            for line in self.lines)
        return Sweep("rate", metric, self.case, tuple(s for s in series if s.points))


def _serve_line(name: str, variant: str, batching: str, by_rate: Mapping[float, Record]) -> ServeLine:
    points = []
    for rate in sorted(by_rate):
        m = by_rate[rate].metrics or {}
        points.append(ServePoint(rate, finite_positive(m.get("ttft_ms_p99")), finite_positive(m.get("itl_ms_p99")),
                                 _number(m.get("goodput_rps")), finite_positive(m.get("tokens_per_s")),
                                 _verdict(m.get("meets_slo")), by_rate[rate].case_id))
    best = next((p for p in reversed(points) if p.meets_slo), None)
    return ServeLine(name, variant, batching, tuple(points), best)


def serving_curves(records: Sequence[Record]) -> list[ServeCurves]:
    """The rate sweeps of the serve workload: groups of ok serve records (is_serve_record;
    timed outside the Triton interpreter) with an open-loop rate > 0 that agree on every case
    field but variant, batching and rate, taking at least two rates; a line per (variant,
    batching), its points by rate (a case run twice: the later record), and per line the
    highest rate whose point meets the SLO (only points with meets_slo count). Closed-loop
    cases (rate 0) make none. In record order of each group's first case."""
    groups: dict[str, dict[tuple[str, str], dict[float, Record]]] = {}
    first: dict[str, Record] = {}
    for r in records:
        rate = finite_positive(r.case.get("rate"))
        if r.status != "ok" or not is_serve_record(r) or not is_speed_record(r) or rate is None:
            continue
        key = case_key(r.case, **{name: None for name in _SERVE_APART})
        first.setdefault(key, r)
        line = (str(r.case.get("variant", "")), str(r.case.get("batching") or CONTINUOUS))
        groups.setdefault(key, {}).setdefault(line, {})[rate] = r
    out = []
    for key, lines in groups.items():
        if len({rate for by_rate in lines.values() for rate in by_rate}) < 2:
            continue
        made = [_serve_line(serve_line_name({"variant": v, "batching": b}), v, b, by_rate)
                for (v, b), by_rate in lines.items()]
        case = {k: v for k, v in first[key].case.items() if k not in _SERVE_APART}
        out.append(ServeCurves(case, tuple(sorted(made, key=lambda line: _series_order(line.name)))))
    return out


# the serving table (summary.md, report.html): a row per line, at its highest rate meeting the SLO
SERVE_TABLE_HEADERS = ("line", "highest rate meeting the SLO (req/s)", "goodput there (req/s)",
                       "p99 TTFT there (ms)", "p99 ITL there (ms)")


def serve_table_row(line: ServeLine) -> list[str]:
    """A line's cells under SERVE_TABLE_HEADERS: the highest rate meeting the SLO (`4
    (highest run)` when that is the line's last rate, so it might take more; `none` when
    no rate did; `no SLO verdict` without meets_slo), and its figures there."""
    best = line.best
    if best is None:
        return [line.name, "none" if line.judged else "no SLO verdict", "", "", ""]
    rate = f"{best.rate:g}" + (" (highest run)" if best is line.points[-1] else "")
    return [line.name, rate, *("" if v is None else f"{v:,.{d}f}" for v, d in
                               ((best.goodput_rps, 2), (best.ttft_ms_p99, 1), (best.itl_ms_p99, 1)))]
