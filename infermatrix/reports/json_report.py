"""results.json: every record plus the run's environment, under a versioned schema.

    {"schema": "infermatrix.results", "schema_version": 1, "env": {...},
     "matrix": "<the matrix TOML text, when known>", "records": [Record, ...]}
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from infermatrix.reports.record import SCHEMA_VERSION, Record, _finite

JSON_FILE = "results.json"
SCHEMA_NAME = "infermatrix.results"


def results_document(records: list[Record], env: dict, matrix_text: str | None = None) -> dict:
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "env": env, "matrix": matrix_text,
            "records": [asdict(r) for r in records]}


def write_json(records: list[Record], out_dir: Path, env: dict, matrix_text: str | None = None) -> Path:
    path = Path(out_dir) / JSON_FILE
    text = json.dumps(_finite(results_document(records, env, matrix_text)), indent=1, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path
