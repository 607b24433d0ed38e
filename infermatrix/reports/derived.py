"""What a record says beyond its numbers, read the same way by every renderer,
`compare` and `gate`: which implementation really ran, and whether its timings
mean anything."""

from __future__ import annotations

from infermatrix.reports.record import Record

# metrics naming the implementation a seam really ran (variants note them; see
# infermatrix.variants.note_path): block_sparse_cpu, block_sparse_gather, dense_masked,
# flex, triton_flash, triton_decode; int8pack, dequant, triton, int_mm, int8, fp32_fallback
PATH_METRICS = ("attention_path", "linear_path")

# metrics that are a timing (or derived from one): meaningless for an interpreted record
_SPEED_PREFIXES = ("latency_ms", "ttft_ms", "tpot_ms", "first_call_ms", "achieved_", "pct_of_")


def is_speed_metric(metric: str) -> bool:
    return metric == "tokens_per_s" or metric.startswith(_SPEED_PREFIXES)


def timings_meaningful(record: Record) -> bool:
    """False for a record whose Triton kernels ran in the CPU interpreter: its accuracy
    metrics hold, its timings measure the interpreter."""
    return not (record.metrics or {}).get("triton_interpreted")


def ran(record: Record) -> str:
    """The paths a record ran, for a table cell: `attention block_sparse_gather,
    linear fp32_fallback, Triton interpreted`; empty when none were noted."""
    m = record.metrics or {}
    parts = [f"{name.removesuffix('_path')} {m[name]}" for name in PATH_METRICS if m.get(name)]
    if not timings_meaningful(record):
        parts.append("Triton interpreted")
    return ", ".join(parts)
