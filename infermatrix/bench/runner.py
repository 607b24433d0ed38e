"""Run a matrix: for each case load (or reuse) the model, apply the variants, run
the workload, and append a Record to records.jsonl at once, so a case that fails
becomes a failed Record and the run goes on."""

from __future__ import annotations

import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from infermatrix.bench.env import capture_env
from infermatrix.bench.matrix import Case, Matrix, RunSettings
from infermatrix.bench.workloads import WORKLOAD_FNS
from infermatrix.errors import UserError
from infermatrix.reports.csv_report import write_csv
from infermatrix.reports.record import RECORDS_FILE, Record, append_record
from infermatrix.variants import apply_variants, parse_spec, unmet_requirements
from infermatrix.weights import DTYPES, LoadedModel, load_model


class ModelCache:
    """Keeps the last loaded base model (the runner groups cases by model, so each
    is read once and only one is held in memory), and remembers load failures so
    a broken model fails its cases without being reloaded for each."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._loaded: LoadedModel | None = None
        self._failures: dict[tuple, Exception] = {}

    def get(self, name: str, dtype: str, device: str) -> LoadedModel:
        key = (name, dtype, device)
        if key in self._failures:
            raise self._failures[key]
        if key != self._key:
            self._key, self._loaded = None, None  # drop the old model before loading the next
            try:
                self._loaded = load_model(name, DTYPES[dtype], device)
            except Exception as exc:
                self._failures[key] = exc
                raise
            self._key = key
        return self._loaded


def run_case(case: Case, settings: RunSettings, models: ModelCache, env: dict) -> Record:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def record(status: str, reason: str | None = None, **fields) -> Record:
        return Record(case_id=case.case_id, case=case.to_dict(), status=status, reason=reason, env=env,
                      started_at=started, duration_s=round(time.perf_counter() - t0, 3), **fields)

    variants = parse_spec(case.variant)
    skip = unmet_requirements(variants, case.device)
    if skip:
        return record("skipped", skip)
    try:
        loaded = models.get(case.model, case.dtype, case.device)
        model = apply_variants(loaded.model, variants)
        with torch.inference_mode():
            metrics, samples = WORKLOAD_FNS[case.workload](model, loaded, case, settings)
        metrics["weight_bytes"] = model.weight_bytes
        return record("ok", metrics=metrics, samples=samples)
    except UserError as exc:
        return record("failed", str(exc))
    except Exception as exc:  # any crash of one case is that case's failure, not the run's
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return record("failed", f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})")


def run_matrix(matrix: Matrix, out_dir: Path, log: Callable[[str], None] = print) -> list[Record]:
    out_dir = Path(out_dir)
    records_path = out_dir / RECORDS_FILE
    if records_path.exists() and records_path.stat().st_size:
        raise UserError(f"--out {out_dir} already holds {RECORDS_FILE}; choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    env = capture_env()
    models = ModelCache()
    # Run grouped by (model, device, dtype), groups in the file's order, so each
    # model is loaded once; records keep the order they ran in.
    group_of = lambda c: (c.model, c.device, c.dtype)  # noqa: E731
    first_seen: dict[tuple, int] = {}
    for c in matrix.cases:
        first_seen.setdefault(group_of(c), len(first_seen))
    cases = sorted(matrix.cases, key=lambda c: first_seen[group_of(c)])
    records = []
    try:
        for i, case in enumerate(cases, 1):
            rec = run_case(case, matrix.settings, models, env)
            append_record(records_path, rec)
            records.append(rec)
            figure = f"{rec.metrics['latency_ms_p50']:.2f} ms" if rec.status == "ok" else rec.reason
            log(f"[{i}/{len(cases)}] {case.case_id}: {rec.status} ({figure})")
    finally:  # an interrupted run still gets the CSV of what it measured
        write_csv(records, out_dir)
    return records
