"""A history of runs across commits: stored in SQLite, read as one series per case,
and checked for change points.

Storage. `add_records(db, records)` keeps each record in one row keyed by
(case_id, git SHA, started_at, host): adding the same run twice adds nothing. A
record without a git SHA is kept under an empty SHA and ordered by its date. The
database holds its schema version (table `meta`); a database of another version is
refused, never migrated behind the user's back.

Series. `load_series` gives, per case and host (timings of two machines are not
one series), one point per commit: the median of the metric over that commit's ok
records, placed at the commit's first date. Commits are ordered by that date: the
order they were measured in, which on a CI branch is the order they landed.

Detection. `segment(values)` fits a piecewise-constant level to the log values by
penalized optimal partitioning (least squares, PELT pruning): a split is kept when
it lowers the squared error by more than PENALTY · σ² · ln n, where σ, the noise,
is estimated from the median absolute difference of successive values (robust to
the steps themselves), raised to the residual of that fit when larger. `judge` then
compares the latest level with the best level before it (one held for two commits
at least), in the metric's better direction (reports.compare.DIRECTION): worse by
more than the threshold is a regression. This is asv's way (a Potts fit, then
"latest against best"), and it is why a creep is caught: ten commits of 3% each are
fitted as one or a few steps, and the latest level is 20-30% worse than the first
though no commit's own change is. A step that was later undone is listed, but not
a regression.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sqlite3
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from infermatrix.errors import UserError
from infermatrix.reports.compare import ALIASES, DIRECTION, HIGHER, metric_value
from infermatrix.reports.record import Record

HISTORY_SCHEMA_VERSION = 1
DEFAULT_DB = Path(".infermatrix") / "history.sqlite"  # relative to where the command runs
DEFAULT_METRIC = "latency_ms_p50"
DEFAULT_THRESHOLD = 0.05
MIN_POINTS = 4  # fewer commits cannot tell a step from noise: the noise is estimated from them

# A split must pay PENALTY · σ² · ln n of squared error (in log units). 2 is Schwarz's
# criterion for a known σ; σ here is estimated from few points, and the measured rate of
# false change points on flat data (tests/reports/test_history.py, README "History";
# 4 and 5 gave 5 and 2 false regressions in 2000 flat series of 30 commits, 6 gave 1,
# and found a +15% newest commit 98%, 95%, 91% of the time) chose this value.
PENALTY = 6.0
SIGMA_FLOOR = 1e-3  # 0.1%: identical values still have a noise scale, so a split must gain something
_MAD_TO_SIGMA = 1 / (math.sqrt(2) * 0.6744897501960817)  # median |x_i+1 - x_i| of N(0, σ²) is 0.954 σ

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE records (
    case_id TEXT NOT NULL,
    git_sha TEXT NOT NULL,      -- '' when the run recorded none
    started_at TEXT NOT NULL,   -- ISO 8601, UTC: the record's date
    host TEXT NOT NULL,         -- '' when unknown
    status TEXT NOT NULL,
    record TEXT NOT NULL,       -- the whole record, as JSON
    source TEXT NOT NULL,       -- the run it was added from
    added_at TEXT NOT NULL,
    PRIMARY KEY (case_id, git_sha, started_at, host)
);
"""


# --------------------------------------------------------------------------- storage


def _refuse_version(path: Path, version: object) -> UserError:
    return UserError(f"{path} is a history database of schema version {version}; this infermatrix reads version "
                     f"{HISTORY_SCHEMA_VERSION}: pass --db with a new file and add the runs again with "
                     "`infermatrix history add`, or use the infermatrix release that wrote it")


def _check_schema(conn: sqlite3.Connection, path: Path) -> bool:
    """True when the database holds our tables at our version; False when it is empty.
    Anything else is refused."""
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path} is not a SQLite database ({exc}); pass --db with an infermatrix history "
                        "database, or a new file name to start one") from None
    if not tables:
        return False
    if "meta" not in tables:
        raise UserError(f"{path} is a SQLite database but not an infermatrix history (no meta table); pass --db "
                        "with another file")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None or row[0] != str(HISTORY_SCHEMA_VERSION) or "records" not in tables:
        raise _refuse_version(path, row[0] if row else "unknown")
    return True


def open_db(path: str | Path, *, create: bool) -> sqlite3.Connection:
    """The history database at `path`. `create`: make it (and its folder) when missing,
    as `history add` does; otherwise a missing file is bad input."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise UserError(f"{path} does not exist; start the history with `infermatrix history add RUN --db {path}`")
        path.parent.mkdir(parents=True, exist_ok=True)
    elif path.is_dir():
        raise UserError(f"--db {path} is a folder; pass a file name, e.g. {path / 'history.sqlite'}")
    conn = sqlite3.connect(path) if create else sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if not _check_schema(conn, path):
            if not create:
                raise UserError(f"{path} holds no history yet; add runs with `infermatrix history add RUN --db {path}`")
            with conn:
                conn.executescript(_SCHEMA)
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(HISTORY_SCHEMA_VERSION),))
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass
class Added:
    new: int = 0  # rows added
    known: int = 0  # records already stored (the same run added before)
    without_sha: int = 0  # records stored under their date alone


def check_dated(records: list[Record], source: str) -> None:
    """Refuse records without a date: they have no place in a history."""
    for r in records:
        if not r.started_at:
            raise UserError(f"{source}: record {r.case_id} has no started_at, so it has no place in a history; "
                            "add runs written by `infermatrix run`, which dates every record")


def add_records(conn: sqlite3.Connection, records: list[Record], source: str, host: str | None = None) -> Added:
    """Store records; one already stored (same case, SHA, date and host) is not added again.
    `host` files them under that machine name instead of their env's host (hosted CI
    runners get a new host name every run). A record without a date cannot be placed in
    a history and is refused."""
    check_dated(records, source)
    added = Added()
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with conn:
        for r in records:
            sha = str(r.env.get("git_sha") or "")
            added.without_sha += not sha
            cursor = conn.execute("INSERT OR IGNORE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                  (r.case_id, sha, r.started_at, host or str(r.env.get("host") or ""), r.status,
                                   r.to_json(), source, now))
            added.new += cursor.rowcount
            added.known += 1 - cursor.rowcount
    return added


def stored_records(conn: sqlite3.Connection) -> list[Record]:
    """Every stored record, oldest first, its env's host the one it is filed under."""
    records = []
    for host, text in conn.execute("SELECT host, record FROM records ORDER BY started_at, case_id"):
        record = Record.from_dict(json.loads(text))
        record.env = {**record.env, "host": host}
        records.append(record)
    return records


# --------------------------------------------------------------------------- series


@dataclass(frozen=True)
class Point:
    sha: str  # '' when the runs recorded none
    date: str  # the first started_at of this commit's records
    value: float  # median over the commit's runs
    runs: int

    @property
    def label(self) -> str:
        """The short SHA, or the date (to the minute) of a run without one."""
        return self.sha[:7] if self.sha else self.date[:16].replace("T", " ")


@dataclass
class Series:
    case_id: str
    host: str
    metric: str
    points: list[Point]

    @property
    def name(self) -> str:
        return f"{self.case_id} @ {self.host}" if self.host else self.case_id


def resolve_metric(metric: str) -> str:
    return ALIASES.get(metric, metric)


def load_series(records: list[Record], metric: str, case_glob: str | None = None) -> list[Series]:
    """One series per (case, host) of the ok records with a numeric `metric`, whose case
    id matches `case_glob`; bad names are refused naming what exists."""
    if not records:
        raise UserError("the history database holds no records; add runs with `infermatrix history add RUN`")
    cases = sorted({r.case_id for r in records})
    if case_glob is not None:
        records = [r for r in records if fnmatch.fnmatchcase(r.case_id, case_glob)]
        if not records:
            raise UserError(f"--case {case_glob!r} matches none of the {len(cases)} stored cases, e.g. {cases[0]}; "
                            "pass a glob of case ids (quote it: '*prefill*')")
    by_series: dict[tuple[str, str], dict[str, list[tuple[str, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        value = metric_value(r, metric) if r.status == "ok" else None
        if value is None or not math.isfinite(value):
            continue
        sha = str(r.env.get("git_sha") or "")
        by_series[(r.case_id, str(r.env.get("host") or ""))][sha or f"@{r.started_at}"].append((r.started_at, value))
    if not by_series:
        known = sorted({m for r in records if r.status == "ok" for m in r.metrics})
        raise UserError(f"--metric {metric}: no stored ok record has a number for it; stored metrics include "
                        f"{', '.join(known[:12]) or 'none'}")
    series = []
    for (case_id, host), commits in sorted(by_series.items()):
        points = [Point(key if not key.startswith("@") else "", min(d for d, _ in runs),
                        statistics.median(v for _, v in runs), len(runs)) for key, runs in commits.items()]
        series.append(Series(case_id, host, metric, sorted(points, key=lambda p: p.date)))
    return series


# --------------------------------------------------------------------------- detection


def noise_sigma(logs: list[float]) -> float:
    """The noise of log values: the median absolute successive difference, scaled to a
    Gaussian σ. A few steps barely move it; a creep raises it (each difference is a step)."""
    if len(logs) < 2:
        return SIGMA_FLOOR
    diffs = [abs(b - a) for a, b in zip(logs, logs[1:])]
    return max(statistics.median(diffs) * _MAD_TO_SIGMA, SIGMA_FLOOR)


def partition(xs: list[float], penalty: float) -> list[int]:
    """The ends (exclusive) of the segments minimizing total squared error + penalty per
    segment: optimal partitioning, O(n²) at worst, with PELT's pruning (Killick et al.
    2012; exact for this cost)."""
    n = len(xs)
    s1, s2 = [0.0], [0.0]
    for x in xs:
        s1.append(s1[-1] + x)
        s2.append(s2[-1] + x * x)

    def cost(a: int, b: int) -> float:  # squared error of xs[a:b] about its mean
        total = s1[b] - s1[a]
        return max(s2[b] - s2[a] - total * total / (b - a), 0.0)

    best = [-penalty] + [math.inf] * n  # best[t]: optimal cost of xs[:t]
    last = [0] * (n + 1)
    candidates = [0]
    for t in range(1, n + 1):
        costs = [(best[s] + cost(s, t) + penalty, s) for s in candidates]
        best[t], last[t] = min(costs)
        candidates = [s for s in candidates if best[s] + cost(s, t) <= best[t]] + [t]
    ends, t = [], n
    while t > 0:
        ends.append(t)
        t = last[t]
    return ends[::-1]


@dataclass(frozen=True)
class Segment:
    start: int  # index of its first point
    end: int  # exclusive
    level: float  # geometric mean of its values


def _bounds(ends: list[int]) -> list[tuple[int, int]]:
    return list(zip([0, *ends[:-1]], ends))


def segment(values: list[float], penalty: float = PENALTY) -> list[Segment]:
    """The piecewise-constant fit of positive values (see the module's docstring). The
    noise is the larger of two estimates: the successive differences' (robust to steps,
    but on flat series of 30 points it comes out 30% low one time in twelve, and half
    the truth one time in 200), and the residual of a first fit made with it; the fit is
    then made again with that noise."""
    logs = [math.log(v) for v in values]
    n = len(logs)
    if n < MIN_POINTS:
        return [Segment(0, n, math.exp(statistics.fmean(logs)))] if logs else []
    scale = penalty * math.log(n)
    sigma = noise_sigma(logs)
    ends = partition(logs, scale * sigma * sigma)
    if len(ends) < n:  # a residual with degrees of freedom left
        squares = sum((x - statistics.fmean(logs[a:b])) ** 2 for a, b in _bounds(ends) for x in logs[a:b])
        residual = math.sqrt(squares / (n - len(ends)))
        if residual > sigma:
            ends = partition(logs, scale * residual * residual)
    return [Segment(a, b, math.exp(statistics.fmean(logs[a:b]))) for a, b in _bounds(ends)]


@dataclass(frozen=True)
class Step:
    index: int  # the first point of the new level
    before: float
    after: float
    kind: str  # regression | improvement | small (within the threshold)

    @property
    def change(self) -> float:
        return self.after / self.before - 1


@dataclass
class Verdict:
    series: Series
    segments: list[Segment] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    regression: bool = False
    best: Segment | None = None  # the best level before the latest, when the latest is a regression from it
    latest: Segment | None = None
    skipped: str | None = None  # why the series was not checked

    @property
    def change(self) -> float | None:
        """The latest level against the best before it (when a regression)."""
        return self.latest.level / self.best.level - 1 if self.best and self.latest else None


def worse(direction: str, before: float, after: float, threshold: float) -> bool:
    """after is worse than before by more than threshold (a relative change)."""
    ratio = after / before
    return ratio < 1 / (1 + threshold) if direction == HIGHER else ratio > 1 + threshold


def judge(series: Series, threshold: float = DEFAULT_THRESHOLD) -> Verdict:
    """Change points of a series and whether its latest level is a regression."""
    direction = DIRECTION.get(series.metric)
    if direction is None:
        raise UserError(f"--metric {series.metric} has no better direction, so no change of it is a regression; "
                        f"check a metric such as latency_ms_p50 or tokens_per_s")
    values = [p.value for p in series.points]
    verdict = Verdict(series)
    if any(v <= 0 for v in values):
        verdict.skipped = "values <= 0: a relative change is not defined"
        return verdict
    if len(values) < MIN_POINTS:
        verdict.skipped = f"{len(values)} commit{'s' * (len(values) != 1)}; at least {MIN_POINTS} are needed " \
                          "to tell a step from noise"
        return verdict
    segments = verdict.segments = segment(values)
    for prev, seg in zip(segments, segments[1:]):
        kind = ("regression" if worse(direction, prev.level, seg.level, threshold) else
                "improvement" if worse(direction, seg.level, prev.level, threshold) else "small")
        verdict.steps.append(Step(seg.start, prev.level, seg.level, kind))
    latest = segments[-1]
    # the best level must hold for two commits: one lucky commit would otherwise stand as
    # the mark every later check fails against (a lone newest commit does count: the next
    # commit confirms or clears it)
    earlier = [s for s in segments[:-1] if s.end - s.start >= 2]
    if earlier:
        best = min(earlier, key=lambda s: -s.level if direction == HIGHER else s.level)
        if worse(direction, best.level, latest.level, threshold):
            verdict.regression, verdict.best, verdict.latest = True, best, latest
    return verdict


def render_threshold(threshold: float) -> str:
    return f"{threshold * 100:g}%"


def parse_threshold(text: str) -> float:
    """'5%' or '5' -> 0.05."""
    number = text.strip().removesuffix("%")
    try:
        value = float(number) / 100
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"--threshold {text!r} is not a positive percentage; write it like 5%")
    return value


# --------------------------------------------------------------------------- text


def _fmt(value: float) -> str:
    return f"{value:,.4g}"


def _pct(change: float) -> str:
    return f"{change * 100:+.1f}%"


def render_show(series: list[Series]) -> str:
    """The trend table: per series, its commits in order with the metric and the change
    against the previous commit; "<- new level" marks where a fitted level starts (a change point)."""
    blocks = []
    for s in series:
        starts = set()
        if len(s.points) >= MIN_POINTS and all(p.value > 0 for p in s.points):
            starts = {seg.start for seg in segment([p.value for p in s.points])[1:]}
        lines = [f"{s.name}  ({s.metric}, {len(s.points)} commit{'s' * (len(s.points) != 1)})",
                 f"  {'commit':<16} {'date':<20} {s.metric:>16} {'vs prev':>9}  runs"]
        for i, p in enumerate(s.points):
            prev = s.points[i - 1].value if i else None
            vs = _pct(p.value / prev - 1) if prev else ""
            mark = "<- new level" if i in starts else ""
            lines.append(f"  {p.label:<16} {p.date[:19]:<20} {_fmt(p.value):>16} {vs:>9}  {p.runs:>4}  {mark}".rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def render_check(verdicts: list[Verdict], threshold: float) -> str:
    lines = []
    for v in verdicts:
        pts = v.series.points
        if v.skipped:
            lines.append(f"skipped  {v.series.name}: {v.skipped}")
            continue
        if v.regression:
            since = pts[v.best.end - 1].label  # the last commit at the best level
            lines.append(f"REGRESSION  {v.series.name}: {v.series.metric} {_fmt(v.best.level)} -> "
                         f"{_fmt(v.latest.level)} ({_pct(v.change)}) after {since}, "
                         f"beyond {render_threshold(threshold)}")
        else:
            lines.append(f"ok  {v.series.name}: {len(pts)} commits, {len(v.steps)} change point"
                         f"{'s' * (len(v.steps) != 1)}")
        for step in v.steps:
            lines.append(f"    at {pts[step.index].label}: {_fmt(step.before)} -> {_fmt(step.after)} "
                         f"({_pct(step.change)}, {step.kind})")
    failed = sum(v.regression for v in verdicts)
    lines.append(f"history check: {'FAIL' if failed else 'PASS'}: {failed} of {len(verdicts)} series regressed "
                 f"beyond {render_threshold(threshold)}")
    return "\n".join(lines)
