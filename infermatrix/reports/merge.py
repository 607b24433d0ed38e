"""Combine runs of one matrix (the shards of `infermatrix run --shard K/N`, or runs on
several machines) into one run folder that report, compare and gate read like any other.

Each record keeps its own environment (the machine that measured it, its shard). The
runs must come from the same matrix file: the SHA-256 of its text, from each folder's
matrix.toml or, for a bare records file, from its records' env. A case recorded twice is
kept once: identical copies are duplicates; differing copies are conflicts, resolved
toward the more informative status (ok, then failed, then skipped), else the first run
given, and every one is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infermatrix.errors import UserError
from infermatrix.reports.record import RECORDS_FILE, Record, matrix_sha256
from infermatrix.reports.run import MATRIX_COPY, Run, write_reports

_STATUS_RANK = {"ok": 2, "failed": 1, "skipped": 0}


@dataclass
class Merged:
    records: list[Record]
    matrix_text: str | None
    duplicates: list[str] = field(default_factory=list)  # case ids recorded identically more than once
    conflicts: list[str] = field(default_factory=list)  # one line per case recorded differently
    warnings: list[str] = field(default_factory=list)  # different settings, missing cases, forced merges


def _matrix_id(run: Run) -> str | None:
    """The matrix a run ran: its records' hash (all must agree) or its matrix.toml's."""
    ids = {r.env.get("matrix_sha256") for r in run.records} - {None}
    if run.matrix_text is not None:
        ids.add(matrix_sha256(run.matrix_text))
    return ids.pop() if len(ids) == 1 else None


def merge_runs(runs: list[Run], *, force: bool = False) -> Merged:
    """One set of records from several runs; a UserError when they come from different
    matrices (or cannot be told to come from one) unless `force`."""
    if not runs:
        raise UserError("merge needs at least one run folder")
    warnings: list[str] = []
    ids = [(run, _matrix_id(run)) for run in runs]
    first = next(((run, sha) for run, sha in ids if sha is not None), None)
    for run, sha in ids:
        if sha is None:
            problem = (f"{run.source} does not say which one matrix it ran (no {MATRIX_COPY} nor matrix_sha256 in "
                       "its records, or records from several versions of the file), so it cannot be checked to "
                       "come from the same matrix file as the others")
        elif first is not None and sha != first[1]:
            problem = (f"{run.source} ran a different matrix file than {first[0].source} ({MATRIX_COPY} sha256 "
                       f"{sha[:12]} vs {first[1][:12]}); merge only the shards of one matrix")
        else:
            continue
        if not force:
            raise UserError(f"cannot merge: {problem}, or pass --force to merge them anyway")
        warnings.append(f"forced: {problem}")

    kept: dict[str, tuple[Record, str]] = {}
    duplicates, conflicts = [], []
    for run in runs:
        for record in run.records:
            if record.case_id not in kept:
                kept[record.case_id] = (record, run.source)
                continue
            old, old_source = kept[record.case_id]
            if record.to_json() == old.to_json():
                duplicates.append(record.case_id)
                continue
            if _STATUS_RANK[record.status] > _STATUS_RANK[old.status]:
                kept[record.case_id] = (record, run.source)
                conflicts.append(f"{record.case_id}: kept {record.status} from {run.source} over "
                                 f"{old.status} from {old_source}")
            else:
                conflicts.append(f"{record.case_id}: kept {old.status} from {old_source} over "
                                 f"{record.status} from {run.source}")
    records = [record for record, _ in kept.values()]
    warnings += _settings_warnings(runs) + _completeness_warnings(runs, len(records))
    matrix_text = next((run.matrix_text for run in runs if run.matrix_text is not None), None)
    return Merged(records, matrix_text, duplicates, conflicts, warnings)


def _settings_warnings(runs: list[Run]) -> list[str]:
    """Shards timed under different [run] settings (e.g. --max-time on one job only)."""
    settings = [(run.source, next((r.env["settings"] for r in run.records if "settings" in r.env), None))
                for run in runs]
    settings = [(source, s) for source, s in settings if s is not None]
    if not settings:
        return []
    base_source, base = settings[0]
    out = []
    for source, s in settings[1:]:
        keys = sorted(k for k in set(base) | set(s) if base.get(k) != s.get(k))
        if keys:
            out.append(f"{source} ran with different [run] settings than {base_source}: "
                       + ", ".join(f"{k} {s.get(k)!r} vs {base.get(k)!r}" for k in keys))
    return out


def _completeness_warnings(runs: list[Run], merged_cases: int) -> list[str]:
    shards = [r.env["shard"] for run in runs for r in run.records if r.env.get("shard")]
    if not shards:
        return []
    counts = sorted({s["count"] for s in shards})
    if len(counts) > 1:
        return [f"the runs split the matrix into different numbers of shards ({', '.join(map(str, counts))}): "
                "cases may be missing; give every shard the same N"]
    total = max(s["matrix_cases"] for s in shards)
    if merged_cases >= total:
        return []
    seen = {s["index"] for s in shards}
    missing = [f"{k}/{counts[0]}" for k in range(1, counts[0] + 1) if k not in seen]
    hint = f"; no records from shard {', '.join(missing)}" if missing else ""
    return [f"{merged_cases} of the matrix's {total} cases are recorded{hint}; run the missing shards "
            "(or --resume the interrupted ones) and merge again"]


def write_merged(merged: Merged, out_dir: Path) -> list[Path]:
    """The merged run folder: records.jsonl, matrix.toml and the reports."""
    out_dir = Path(out_dir)
    records_path = out_dir / RECORDS_FILE
    if records_path.exists() and records_path.stat().st_size:
        raise UserError(f"--out {out_dir} already holds {RECORDS_FILE}; choose a new folder for the merged run")
    out_dir.mkdir(parents=True, exist_ok=True)
    if merged.matrix_text is not None:
        (out_dir / MATRIX_COPY).write_text(merged.matrix_text, encoding="utf-8")
    records_path.write_text("".join(r.to_json() + "\n" for r in merged.records), encoding="utf-8")
    env = merged.records[0].env if merged.records else {}
    return [records_path, *write_reports(Run(merged.records, str(out_dir), env, merged.matrix_text, out_dir),
                                         out_dir)]
