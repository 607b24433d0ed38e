"""A compact terminal table of a run."""

from __future__ import annotations

from infermatrix.reports.csv_report import records_frame
from infermatrix.reports.record import Record

_COLUMNS = ["model", "variant", "workload", "dtype", "batch", "prompt_len", "new_tokens",
            "latency_ms_p50", "tokens_per_s", "status"]


def render_table(records: list[Record]) -> str:
    if not records:
        return "(no cases)"
    frame = records_frame(records)
    frame = frame[[c for c in _COLUMNS if c in frame.columns]].copy()
    for col in ("latency_ms_p50", "tokens_per_s"):
        if col in frame:
            frame[col] = frame[col].map(lambda x: "" if x != x or x is None else f"{x:,.2f}")
    lines = [frame.to_string(index=False)]
    for r in records:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.case_id}: {r.reason}")
    return "\n".join(lines)
