"""The Record: one benchmark case, the source of truth of every report.

A run folder holds `records.jsonl`, one Record per line, appended as each case ends
(so a crash later in the run loses nothing already measured).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
RECORDS_FILE = "records.jsonl"
STATUSES = ("ok", "skipped", "failed")


@dataclass
class Record:
    case_id: str  # stable key for matching cases across runs
    case: dict  # the case's fields: model, variant, workload, dtype, device, shapes
    status: str  # ok | skipped | failed
    reason: str | None = None  # why skipped or failed
    metrics: dict[str, float | int | None] = field(default_factory=dict)  # units in the names
    samples: dict[str, list[float]] = field(default_factory=dict)  # raw timings, ms
    env: dict = field(default_factory=dict)  # versions, device, git SHA, threads
    started_at: str = ""  # ISO 8601, UTC
    duration_s: float = 0.0  # wall time of the whole case, loading included
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Record.status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        return cls(**data)


def append_record(path: Path, record: Record) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(record.to_json() + "\n")
        f.flush()


def read_records(path: Path) -> list[Record]:
    """Records from a records.jsonl file or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                records.append(Record.from_dict(json.loads(line)))
    return records
