"""What a record says beyond its numbers, read the same way by every renderer,
`compare` and `gate`: which implementation really ran, whether its timings mean
anything, and what the CPU it ran on can do."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from infermatrix.reports.record import Record

# metrics naming the implementations a seam really ran in a case, joined by '+' (variants
# note them; see infermatrix.variants.note_path). attention: block_sparse_cpu,
# block_sparse_triton, block_sparse_gather, dense_masked, flex, triton_flash, triton_decode;
# linear: int8pack, dequant, triton, int_mm, torchao, and for int8_llm int8 or fp32_fallback
PATH_METRICS = ("attention_path", "linear_path", "peer_path")  # peer: which deployed stack ran
# metrics that are a timing (or derived from one): meaningless for an interpreted record
_SPEED_PREFIXES = ("latency_ms", "ttft_ms", "tpot_ms", "first_call_ms", "achieved_", "pct_of_")


# how each shape field shows in a case id and a shape label, in the label's order: a case
# id's shape part is its workload's fields (bench.matrix.WORKLOADS) joined by '-', a label
# the case's nonzero fields joined by ' ' (a workload's unused fields are zero, so the two
# read the same: b1-p512-h9-kv3-d64-causal and b1 p512 h9 kv3 d64 causal)
SHAPE_TAGS = {"windows": "w", "batch": "b", "prompt_len": "p", "kv_len": "kvlen", "new_tokens": "n", "heads": "h",
              "kv_heads": "kv", "head_dim": "d", "causal": "", "in_features": "k", "out_features": "n"}
# the fields naming what ran rather than its shape
_CASE_IDENTITY = ("model", "variant", "workload", "dtype", "device")


def shape_parts(case: Mapping, fields: Iterable[str]) -> list[str]:
    """The tags of `fields` of a case, in that order: `causal` as causal or full, each other
    field with a nonzero value as its tag (SHAPE_TAGS; a field without one, its name) and value."""
    parts = []
    for name in fields:
        value = case.get(name)
        if name == "causal":
            parts.append("causal" if value else "full")
        elif value:
            parts.append(f"{SHAPE_TAGS.get(name, name)}{value}")
    return parts


def shape_label(case: Mapping, *, without: Iterable[str] = ()) -> str:
    """A case's shape for a table cell or a chart: `b1 p128 n6`, `w2 p128 n6`,
    `b1 p512 h9 kv3 d64 causal`, `b2 p16 k64 n256`. Every nonzero integer field shows, a
    field this module has no tag for under its own name after the known ones; causal or
    full only for the attention workload. `without`: fields to leave out."""
    extra = sorted(k for k, v in case.items() if k not in SHAPE_TAGS and k not in _CASE_IDENTITY
                   and isinstance(v, int) and not isinstance(v, bool))
    skip = set(without) | (set() if case.get("workload") == "attention" else {"causal"})
    return " ".join(shape_parts(case, [name for name in [*SHAPE_TAGS, *extra] if name not in skip]))


def is_speed_metric(metric: str) -> bool:
    return metric in ("tokens_per_s", "sequences_per_s") or metric.startswith(_SPEED_PREFIXES)


def is_peer(record: Record) -> bool:
    """A row measuring what users deploy (Hugging Face transformers, llama.cpp), not ours."""
    return bool((record.metrics or {}).get("peer_path"))


def timings_meaningful(record: Record) -> bool:
    """False for a record whose Triton kernels ran in the CPU interpreter: its accuracy
    metrics hold, its timings measure the interpreter."""
    return not (record.metrics or {}).get("triton_interpreted")


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


@dataclass(frozen=True)
class Column:
    """A metric column of the summary tables (terminal, Markdown, HTML)."""

    metric: str  # the results.csv metric
    header: str  # Markdown and HTML header
    short: str  # terminal header
    fmt: str  # format of a value
    always: bool = True  # shown even when no record has the metric (the columns every run compares)


# The summary tables' metric columns, in order. The optional ones (always=False) show
# only when some record has them: encoders' sequences/s and hidden-state drift.
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("latency_ms_p50", "ms p50", "ms_p50", "{:,.2f}"),
    Column("latency_ms_ci_rel", "CI ±", "ci±", "{:.1%}"),
    Column("tokens_per_s", "tok/s", "tok/s", "{:,.1f}"),
    Column("sequences_per_s", "seq/s", "seq/s", "{:,.1f}", always=False),
    Column("pct_of_limit", "% limit", "%limit", "{:.0f}%"),
    Column("kl_mean", "KL mean", "kl_mean", "{:.2e}"),
    Column("top1_agree_pct", "top-1 %", "top1%", "{:.1f}"),
    Column("ppl_delta_pct", "Δppl %", "Δppl%", "{:+.2f}"),
    Column("hidden_cosine_mean", "hidden cos", "cos", "{:.8f}", always=False),  # int8 differs in the 8th digit
    Column("hidden_sqnr_db", "hidden SQNR dB", "sqnr_db", "{:.1f}", always=False),
    Column("mlm_top1_agree_pct", "MLM top-1 %", "mlm_top1%", "{:.1f}", always=False),
)


def shown_columns(records: list[Record]) -> list[Column]:
    """The metric columns a table of `records` shows: every always-column, and the
    optional ones some record has."""
    present = {key for r in records for key, value in (r.metrics or {}).items() if value is not None}
    return [c for c in METRIC_COLUMNS if c.always or c.metric in present]
