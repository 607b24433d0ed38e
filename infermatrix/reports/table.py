"""A compact terminal table of a run: speed columns and drift columns side by side,
blank where a metric does not apply to a case's workload."""

from __future__ import annotations

from infermatrix.reports.csv_report import records_frame
from infermatrix.reports.derived import ran, shape_label, shown_columns
from infermatrix.reports.record import Record

_CASE_COLUMNS = ("model", "variant", "workload", "dtype", "shape")


def _cell(value, fmt: str | None, column: str = "") -> str:
    if value is None or value != value:  # None or NaN: not measured for this workload
        return ""
    if value == float("inf"):  # a CI of the median needs 6 samples at 95%; an SQNR of identical outputs
        return "n<6" if column == "latency_ms_ci_rel" else "inf"
    return fmt.format(value) if fmt else str(value)


def render_table(records: list[Record]) -> str:
    if not records:
        return "(no cases)"
    frame = records_frame(records)
    frame["shape"] = [shape_label(r.case) for r in records]
    if any(ran(r) for r in records):
        frame["ran"] = [ran(r) for r in records]
    metrics = shown_columns(records)
    formats = {**dict.fromkeys(_CASE_COLUMNS), **{c.metric: c.fmt for c in metrics}, "status": None, "ran": None}
    columns = [c for c in formats if c in frame.columns]  # blank for all: left out
    frame = frame[columns].astype(object)
    for col in columns:
        frame[col] = [_cell(v, formats[col], col) for v in frame[col]]
    lines = [frame.rename(columns={c.metric: c.short for c in metrics}).to_string(index=False)]
    for r in records:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.case_id}: {r.reason}")
    return "\n".join(lines)
