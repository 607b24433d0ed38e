"""The environment, said in words every report shows the same way."""

from __future__ import annotations


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
