"""What a record says beyond its numbers, read the same way by every renderer,
`compare` and `gate`: which implementation really ran, whether its timings mean
anything, and what the CPU it ran on can do."""

from __future__ import annotations

from infermatrix.reports.record import Record

# metrics naming the implementations a seam really ran in a case, joined by '+' (variants
# note them; see infermatrix.variants.note_path). attention: block_sparse_cpu,
# block_sparse_triton, block_sparse_gather, dense_masked, flex, triton_flash, triton_decode;
# linear: int8pack, dequant, triton, int_mm, torchao, and for int8_llm int8 or fp32_fallback
PATH_METRICS = ("attention_path", "linear_path", "peer_path")  # peer: which deployed stack ran
# metrics that are a timing (or derived from one): meaningless for an interpreted record
_SPEED_PREFIXES = ("latency_ms", "ttft_ms", "tpot_ms", "first_call_ms", "achieved_", "pct_of_")


def is_speed_metric(metric: str) -> bool:
    return metric == "tokens_per_s" or metric.startswith(_SPEED_PREFIXES)


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
