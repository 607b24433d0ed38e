"""results.csv: one tidy row per case, readable by pandas and spreadsheets.

Columns: the case fields (model, variant, workload, dtype, device, batch,
prompt_len, new_tokens), then status and reason, then the metrics, whose names
carry their units (latency_ms_p50, tokens_per_s, weight_bytes, ...), then the
speedup over the baseline (reports.derived.speedup_details): speedup,
speedup_ci_low and speedup_ci_high (from paired rounds; blank otherwise) and
baseline_id, the case it is a ratio to.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from infermatrix.reports.derived import speedup_details
from infermatrix.reports.record import Record

CSV_FILE = "results.csv"


def records_frame(records: list[Record]) -> pd.DataFrame:
    rows = [{"case_id": r.case_id, **r.case, "status": r.status, "reason": r.reason, **r.metrics} for r in records]
    frame = pd.DataFrame(rows)
    speedup = speedup_details(records)
    found = [speedup.get(r.case_id) for r in records]
    for column, field in (("speedup", "ratio"), ("speedup_ci_low", "ci_low"), ("speedup_ci_high", "ci_high")):
        frame[column] = [None if s is None else getattr(s, field) for s in found]
    frame["baseline_id"] = [s.baseline_id if s else r.baseline_id for s, r in zip(found, records)]
    return frame


def write_csv(records: list[Record], out_dir: Path) -> Path:
    path = Path(out_dir) / CSV_FILE
    records_frame(records).to_csv(path, index=False)
    return path
