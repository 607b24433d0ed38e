"""The Record: one benchmark case, the source of truth of every report.

A run folder holds `records.jsonl`, one Record per line, appended as each case ends
(so a crash later in the run loses nothing already measured).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
RECORDS_FILE = "records.jsonl"
STATUSES = ("ok", "skipped", "failed")

# how each shape field shows in a case id and a shape label, in the label's order: a case
# id's shape part is its workload's fields (bench.matrix.WORKLOADS) joined by '-', a label
# the case's nonzero fields joined by ' ' (a workload's unused fields are zero, so the two
# read the same: b1-p512-h9-kv3-d64-causal and b1 p512 h9 kv3 d64 causal)
SHAPE_TAGS = {"windows": "w", "batch": "b", "prompt_len": "p", "kv_len": "kvlen", "new_tokens": "n", "heads": "h",
              "kv_heads": "kv", "head_dim": "d", "causal": "", "in_features": "k", "out_features": "n", "task": "",
              "requests": "q", "rate": "rate", "concurrency": "c", "duration_s": "dur", "lengths": "",
              "slo_ttft_ms": "ttft", "slo_itl_ms": "itl", "slo_pct": "slo", "batching": "",
              "token_budget": "tb", "kv_blocks": "blocks"}
# text fields, shown by value only when not their default (so ids made before they existed hold)
SHAPE_TEXT_DEFAULTS = {"task": "continue", "lengths": "uniform", "batching": "continuous"}


def shape_parts(case: Mapping, fields: Iterable[str]) -> list[str]:
    """The tags of `fields` of a case, in that order: `causal` as causal or full, each other
    field with a nonzero value as its tag (SHAPE_TAGS; a field without one, its name) and value,
    a text field's value unless it is the default (SHAPE_TEXT_DEFAULTS)."""
    parts = []
    for name in fields:
        value = case.get(name)
        if name == "causal":
            parts.append("causal" if value else "full")
        elif name in SHAPE_TEXT_DEFAULTS:
            if value and value != SHAPE_TEXT_DEFAULTS[name]:
                parts.append(f"{SHAPE_TAGS.get(name, name)}{value}")
        elif value:
            parts.append(f"{SHAPE_TAGS.get(name, name)}{value:g}" if isinstance(value, float)
                         else f"{SHAPE_TAGS.get(name, name)}{value}")
    return parts


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
    # the case_id its speedup is a ratio to (the matrix's `baseline`); None: the same case's
    # `reference` row
    baseline_id: str | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"Record.status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> str:
        """Strict JSON (jq, browsers): non-finite numbers, such as the SQNR of identical
        logits or the CI of too few samples, are written as null."""
        return json.dumps(_finite(asdict(self)), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Record":
        return cls(**data)


def matrix_sha256(text: str) -> str:
    """A record's env["matrix_sha256"]: the identity of the matrix file it ran, the
    SHA-256 of its text with line endings normalized (a Windows checkout of the same
    file is the same matrix). The runner writes it; merge and --resume compare it."""
    return hashlib.sha256(text.replace("\r\n", "\n").encode("utf-8")).hexdigest()


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def append_record(path: Path, record: Record) -> None:
    path = Path(path)
    with open(path, "a+b") as f:
        f.seek(0, 2)
        if f.tell():  # a run killed mid-write leaves a partial line: never glue onto it
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((record.to_json() + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[Record]:
    """Records from a records.jsonl file or a run folder holding one. A line that
    does not parse (a run killed mid-write) is skipped with a warning."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    records, unreadable = parse_records(path)
    for number, why in unreadable:
        warnings.warn(unreadable_line_message(path, number, why), stacklevel=2)
    return records


def parse_records(path: Path) -> tuple[list[Record], list[tuple[int, str]]]:
    """The records of a records .jsonl file, and (line number, why) of each non-blank
    line that is not a record, for the caller to warn about or refuse."""
    records, unreadable = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(Record.from_dict(json.loads(line)))
            except (ValueError, TypeError) as exc:
                unreadable.append((number, str(exc)))
    return records, unreadable


def unreadable_line_message(path: Path, number: int, why: str) -> str:
    return f"{path}:{number}: skipping a record that does not parse ({why})"
