"""A compact terminal table of a run: speed columns and drift columns side by side,
blank where a metric does not apply to a case's workload."""

from __future__ import annotations

import pandas as pd

from infermatrix.reports.derived import column_value, ran, shape_label, shown_columns, speedup_details
from infermatrix.reports.record import Record

_CASE_COLUMNS = ("model", "variant", "workload", "dtype")


def render_table(records: list[Record]) -> str:
    if not records:
        return "(no cases)"
    speedup = speedup_details(records)
    frame = pd.DataFrame({
        **{key: [str(r.case.get(key) or "") for r in records] for key in _CASE_COLUMNS},
        "shape": [shape_label(r.case) for r in records],
        **{c.short: [c.text(column_value(r, c, speedup)) for r in records] for c in shown_columns(records, speedup)},
        "status": [r.status for r in records],
        "ran": [ran(r) for r in records],
    })
    frame = frame[[col for col in frame.columns if frame[col].any()]]  # blank for all: left out
    lines = [frame.to_string(index=False)]
    for r in records:
        if r.status != "ok":
            lines.append(f"{r.status}: {r.case_id}: {r.reason}")
    return "\n".join(lines)
