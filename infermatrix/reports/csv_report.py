"""results.csv: one tidy row per case, readable by pandas and spreadsheets.

Columns: the case fields (model, variant, workload, dtype, device, batch,
prompt_len, new_tokens), then status and reason, then the metrics, whose names
carry their units (latency_ms_p50, tokens_per_s, weight_bytes, ...).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from infermatrix.reports.record import Record

CSV_FILE = "results.csv"


def records_frame(records: list[Record]) -> pd.DataFrame:
    rows = [{"case_id": r.case_id, **r.case, "status": r.status, "reason": r.reason, **r.metrics} for r in records]
    return pd.DataFrame(rows)


def write_csv(records: list[Record], out_dir: Path) -> Path:
    path = Path(out_dir) / CSV_FILE
    records_frame(records).to_csv(path, index=False)
    return path
