"""A compact terminal table of a run: speed columns and drift columns side by side,
blank where a metric does not apply to a case's workload."""

from __future__ import annotations

from infermatrix.reports.csv_report import records_frame
from infermatrix.reports.derived import ran
from infermatrix.reports.record import Record

# column -> format of its values
_COLUMNS = {
    "model": None, "variant": None, "workload": None, "dtype": None, "batch": None, "prompt_len": None,
    "new_tokens": None, "latency_ms_p50": "{:,.2f}", "latency_ms_ci_rel": "{:.1%}", "tokens_per_s": "{:,.1f}",
    "pct_of_limit": "{:.0f}%", "kl_mean": "{:.2e}", "top1_agree_pct": "{:.1f}", "ppl_delta_pct": "{:+.2f}",
    "status": None, "ran": None,
}
_HEADERS = {"latency_ms_p50": "ms_p50", "latency_ms_ci_rel": "ci±", "tokens_per_s": "tok/s",
            "pct_of_limit": "%limit", "top1_agree_pct": "top1%", "ppl_delta_pct": "Δppl%"}


def _cell(value, fmt: str | None) -> str:
    if value is None or value != value:  # None or NaN: not measured for this workload
        return ""
    if value == float("inf"):
        return "n<6"  # a CI of the median needs 6 samples at 95%
    return fmt.format(value) if fmt else str(value)


def render_table(records: list[Record]) -> str:
    if not records:
        return "(no cases)"
    frame = records_frame(records)
    if any(ran(r) for r in records):
        frame["ran"] = [ran(r) for r in records]
    columns = [c for c in _COLUMNS if c in frame.columns]
    frame = frame[columns].astype(object)
    for col in columns:
        frame[col] = [_cell(v, _COLUMNS[col]) for v in frame[col]]
    lines = [frame.rename(columns=_HEADERS).to_string(index=False)]
    for r in records:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.case_id}: {r.reason}")
    return "\n".join(lines)
