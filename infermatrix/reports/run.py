"""A run as report, compare and gate read it, from any of its forms:

* a run folder (records.jsonl, plus matrix.toml when `infermatrix run` wrote it),
* a records .jsonl file,
* a results.json written by `infermatrix report`,
* a pytest-benchmark JSON file (`pytest --benchmark-json=FILE` or its saved runs).

Every form becomes the same Records; reports are then written next to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from infermatrix.errors import UserError
from infermatrix.reports.csv_report import write_csv
from infermatrix.reports.json_report import SCHEMA_NAME, write_json
from infermatrix.reports.markdown_report import write_markdown
from infermatrix.reports.pytest_benchmark import is_pytest_benchmark, records_from_pytest_benchmark
from infermatrix.reports.record import (RECORDS_FILE, SCHEMA_VERSION, Record, parse_records,
                                        unreadable_line_message)

MATRIX_COPY = "matrix.toml"  # the matrix a run was made from, kept in its folder


@dataclass
class Run:
    records: list[Record]
    source: str
    env: dict = field(default_factory=dict)
    matrix_text: str | None = None  # for the [gate] rules of the run's matrix
    folder: Path | None = None  # where reports go, when the run is a folder


def load_nonempty_run(path: str | Path, command: str) -> Run:
    """load_run, refusing a run without a single record: `command` (report, compare,
    gate) would otherwise succeed on nothing. A shard with no cases is a legitimate
    empty run, which `merge` reads with load_run."""
    run = load_run(path)
    if not run.records:
        where = f" (its {RECORDS_FILE} is empty)" if run.folder is not None else ""
        raise UserError(f"{run.source} holds no records{where}; nothing to {command}: "
                        "pass a run that recorded at least one case")
    return run


def load_run(path: str | Path) -> Run:
    """A run from any of its forms; bad input is a UserError naming the path and the fix.
    Records that do not parse are reported with their line numbers and skipped; a
    records file none of whose lines parses is refused."""
    path = Path(path)
    if path.is_dir():
        records_file = path / RECORDS_FILE
        if not records_file.is_file():
            raise UserError(f"{path} is not a run folder: it has no {RECORDS_FILE}; "
                            "pass a folder written by `infermatrix run`, a .jsonl or a results .json file")
        matrix = path / MATRIX_COPY
        records = _read_jsonl(records_file)
        return Run(records, str(path), _env_of(records), matrix.read_text("utf-8") if matrix.is_file() else None,
                   path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a run folder, a records .jsonl or a results .json file")
    if path.suffix == ".jsonl":
        records = _read_jsonl(path)
        return Run(records, str(path), _env_of(records))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and data.get("schema") == SCHEMA_NAME:
        _check_version(data.get("schema_version"), path)
        try:
            records = [Record.from_dict(r) for r in data["records"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: a record does not match the schema ({exc})") from None
        return Run(records, str(path), data.get("env") or _env_of(records), data.get("matrix"))
    if is_pytest_benchmark(data):
        return Run(records_from_pytest_benchmark(data), str(path), {"pytest_benchmark": data.get("machine_info")})
    raise UserError(f"{path} is neither infermatrix results nor pytest-benchmark JSON")


def _read_jsonl(path: Path) -> list[Record]:
    records, unreadable = parse_records(path)
    if unreadable and not records:  # not a records file, or a ruined one: never an empty success
        number, why = unreadable[0]
        lines = "its only line is not" if len(unreadable) == 1 else f"none of its {len(unreadable)} lines is"
        raise UserError(f"{path}: {lines} a readable record (line {number}: {why}); pass a records file "
                        "written by `infermatrix run`")
    for number, why in unreadable:  # a torn or corrupt line: say where, go on with the rest
        print(f"infermatrix: warning: {unreadable_line_message(path, number, why)}")
    for record in records:
        _check_version(record.schema_version, path)
    return records


def _check_version(version, path: Path) -> None:
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has records of schema version {version}; this infermatrix reads version "
                        f"{SCHEMA_VERSION}; re-run, or use the infermatrix release that wrote it")


def _env_of(records: list[Record]) -> dict:
    return records[0].env if records else {}


def write_reports(run: Run, out_dir: Path) -> list[Path]:
    """results.csv, results.json, summary.md and report.html of a run, in out_dir."""
    from infermatrix.reports.html_report import write_html

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"infermatrix run {out_dir.name}"
    return [
        write_csv(run.records, out_dir),
        write_json(run.records, out_dir, run.env, run.matrix_text),
        write_markdown(run.records, out_dir, title),
        write_html(run.records, out_dir, env=run.env),
    ]
