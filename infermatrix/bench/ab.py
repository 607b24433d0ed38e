"""Interleaved A/B runs: two versions of the code under test measured case by case on
this machine, in alternating turns, seconds apart (`infermatrix ab BASE NEW [MATRIX]`).

A side is a git ref (checked out into a temporary worktree, removed afterwards) or a
source folder. It holds either infermatrix itself (an `infermatrix/` package) or a
user's plugin package whose variants register through the `infermatrix.variants`
entry-point group (declared in its pyproject.toml). Each side gets a server process
(bench/ab_side.py) started with that side's folder first on the import path, and that
side's plugin entry points: it expands the matrix and prepares each case with that
side's code.

Every turn is a fresh case process, forked from one template process shared by both
sides (it imports torch, nothing of either side); the child puts its side's folder
first on its path, loads the model, applies the variants, makes its workload's cold
first call and then waits inside the timer. The driver grants it a turn of a few
hundred milliseconds, takes its samples and its record. Turns go in ABBA order (the
side that starts is drawn at random and recorded): BASE, NEW, NEW, BASE, ... Each pair
of adjacent turns is a round, and each round gives a ratio NEW/BASE of the turns'
medians. Rounds go on until the interval of the typical paired ratio
(reports/paired.py) is narrow enough, or a side's turns have taken the time cap (the
matrix's max_time_s). Both sides' records, every sample kept and the turns marked, go
to two ordinary run folders (`report`, `compare` and `gate` read them), and the verdict
(reports/ab.py) to ab.json, ab.md and ab.html beside them.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

from infermatrix.bench.ab_sides import SIDES, Side, SideServer, Template, hello, remove_side, resolve_side
from infermatrix.errors import UserError
from infermatrix.reports.record import RECORDS_FILE, Record, _finite, append_record
from infermatrix.reports.run import MATRIX_COPY


@dataclass(frozen=True)
class AbSettings:
    """How long each case is interleaved. The time cap counts each side's whole turns
    (process start, loading, warm-up and samples), past the minimum of rounds."""

    turn_s: float = 0.3  # sampling per turn (at least one sample), each turn a fresh case process
    # 8: a 95% interval needs 6; 8 lets a change that shows in many cases at once survive
    # Benjamini-Hochberg (p >= 2/256); a lone change takes more rounds (see _measure_case)
    min_rounds: int = 8
    max_rounds: int = 20
    target_ci: float = 0.02  # stop when the paired ratio's 95% interval is within ±2% (log units)
    max_time_s: float | None = None  # per side and case, after min_rounds; None: the matrix's max_time_s
    seed: int | None = None  # of the start sides; None: drawn, and recorded
    alpha: float = 0.05  # the verdict's false-discovery rate, which the stopping rule serves

    def __post_init__(self) -> None:
        if not self.turn_s > 0:
            raise UserError(f"--turn must be > 0 seconds, got {self.turn_s}")
        if self.min_rounds < 1 or self.max_rounds < self.min_rounds:
            raise UserError(f"rounds: need 1 <= --min-rounds ({self.min_rounds}) <= --max-rounds ({self.max_rounds})")
        if not self.target_ci >= 0:
            raise UserError(f"--target-ci must be >= 0, got {self.target_ci}")
        if not 0 < self.alpha < 1:
            raise UserError(f"--alpha must be in (0, 1), got {self.alpha}")
        if self.max_time_s is not None and not self.max_time_s > 0:
            raise UserError(f"--max-time must be > 0 seconds, got {self.max_time_s}")


def parse_only(filters: list[str] | None) -> list[tuple[tuple[str, str], ...]]:
    """--only FILTER (repeatable): a case runs when it matches any of them."""
    from infermatrix.reports.gate import parse_filter

    parsed = []
    for text in filters or []:
        try:
            parsed.append(parse_filter(text))
        except ValueError as exc:
            raise UserError(f"--only {text!r}: {exc}") from None
    return parsed


def _selected(hello: dict, only: list[tuple[tuple[str, str], ...]]) -> list[str]:
    from infermatrix.reports.gate import filter_matches

    return [cid for cid, case in hello["cases"].items()
            if not only or any(filter_matches(f, cid, case) for f in only)]


def _check_same_cases(base: list[str], new: list[str]) -> None:
    only_base = [c for c in base if c not in set(new)]
    only_new = [c for c in new if c not in set(base)]
    if only_base or only_new:
        parts = [f"only in {name}: {', '.join(ids[:5])}{' and more' if len(ids) > 5 else ''}"
                 for name, ids in (("BASE", only_base), ("NEW", only_new)) if ids]
        raise UserError(f"the matrix expands to different cases on the two sides ({'; '.join(parts)}); "
                        "A/B compares the same cases: pass a matrix file both sides read alike")


# --------------------------------------------------------------------------- the run


@dataclass
class AbRun:
    out: Path
    sides: dict[str, Side]
    records: dict[str, list[Record]] = field(default_factory=lambda: {"base": [], "new": []})
    seed: int = 0
    wall_s: float = 0.0


def _open_spec(matrix: str | None, eval_text: str | None, overrides: dict) -> dict:
    """What each side server reads: a matrix file by absolute path (both read the same
    file), or a built-in name (each side's own)."""
    path = matrix
    if matrix is not None and Path(matrix).is_file():
        path = str(Path(matrix).resolve())
    return {"matrix": path, "eval_text": str(Path(eval_text).resolve()) if eval_text else None,
            "overrides": {**overrides, "isolate": True}}  # turns need each case in a process of its own


def run_ab(base: str, new: str, matrix: str | None, out: Path, *, settings: AbSettings = AbSettings(),
           repo: str | None = None, eval_text: str | None = None, overrides: dict | None = None,
           only: list[str] | None = None, log: Callable[[str], None] = print) -> AbRun:
    """Measure every case of the matrix for BASE and NEW, interleaved; write out/base and
    out/new. Bad input (refs, folders, sides that do not import, case lists that differ)
    is a UserError before anything is written, and leaves no worktree behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a new folder for the A/B run")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new folder for the A/B run")
    if eval_text is not None and not Path(eval_text).is_file():
        raise UserError(f"--eval-text {eval_text} does not exist")
    only_text, only = only or [], parse_only(only)
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="infermatrix-ab-"))
    sides: dict[str, Side] = {}
    servers: dict[str, SideServer] = {}
    template = None
    try:
        for name, given in (("base", base), ("new", new)):
            sides[name] = resolve_side(name, given, repo, scratch)
        spec = _open_spec(matrix, eval_text, overrides or {})
        hellos = {}
        for name in SIDES:  # one after the other: a side may measure the machine's peaks first
            log(f"{name.upper()}: {sides[name].label} ({sides[name].kind}, from {sides[name].root})")
            servers[name] = SideServer(sides[name], spec, log)
            hellos[name] = hello(servers[name], timeout=1800)
        template = Template(scratch)
        case_ids = {name: _selected(hellos[name], only) for name in SIDES}
        _check_same_cases(case_ids["base"], case_ids["new"])
        if not case_ids["new"]:
            raise UserError("no case of the matrix matches --only " + " / ".join(only_text))
        seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
        run = AbRun(out, sides, seed=seed)
        cases = _CaseRunner(servers, template, sides, hellos)
        _measure_all(run, cases, hellos, case_ids["base"], settings, log)
        run.wall_s = time.perf_counter() - started
        return run
    finally:
        if template is not None:
            template.close()
        for server in servers.values():
            server.close()
        for side in sides.values():
            remove_side(side)
        shutil.rmtree(scratch, ignore_errors=True)


def _measure_all(run: AbRun, cases: "_CaseRunner", hellos: dict[str, dict], case_ids: list[str],
                 settings: AbSettings, log: Callable[[str], None]) -> None:
    cap = settings.max_time_s or hellos["new"]["settings"]["max_time_s"]
    rng = random.Random(run.seed)
    folders = {}
    for name in SIDES:  # only now, with both sides up and agreeing, is anything written
        folders[name] = run.out / name
        folders[name].mkdir(parents=True, exist_ok=True)
        (folders[name] / RECORDS_FILE).touch()
        if hellos[name].get("matrix_text") is not None:
            (folders[name] / MATRIX_COPY).write_text(hellos[name]["matrix_text"], encoding="utf-8")
    log(f"infermatrix ab: {len(case_ids)} cases, turns of {settings.turn_s:g} s, {settings.min_rounds}-"
        f"{settings.max_rounds} rounds, cap {cap:g} s per side, start sides drawn with seed {run.seed}")
    for i, case_id in enumerate(case_ids, 1):
        first = rng.choice(SIDES)
        records, line = _measure_case(case_id, first, cases, settings, cap, len(case_ids))
        for name in SIDES:
            rec = records[name]
            rec.env = {**rec.env, "ab": {"side": name, "source": run.sides[name].label, "first": first,
                                         "seed": run.seed}}
            append_record(folders[name] / RECORDS_FILE, rec)
            run.records[name].append(rec)
        log(f"[{i}/{len(case_ids)}] {case_id}: {line}")


def _measure_case(case_id: str, first: str, cases: "_CaseRunner", settings: AbSettings, cap: float,
                  n_cases: int) -> tuple[dict[str, Record], str]:
    """Both sides' records of one case, and a line saying how its rounds went.

    Every turn is a fresh case process (forked, loaded, warmed up, one turn, its record):
    a process carries effects of its own (memory placement, thread layout: up to 1.7x
    for the same code here), and only processes drawn anew for each turn let the rounds'
    spread include them. Each side's turn records are merged into one at the end."""
    from infermatrix.reports.paired import paired_ratio

    second = "new" if first == "base" else "base"
    turns: dict[str, list[Record]] = {"base": [], "new": []}
    medians: dict[str, list[float]] = {"base": [], "new": []}
    spent = {"base": 0.0, "new": 0.0}
    stopped = "not timed"
    while True:
        order = (first, second) if len(medians[second]) % 2 == 0 else (second, first)  # ABBA
        for name in order:
            t0 = time.perf_counter()
            record, samples = cases.turn(name, case_id, settings.turn_s)
            spent[name] += time.perf_counter() - t0  # the whole turn: process, load, warm-up, samples
            turns[name].append(record)
            if samples is None:  # not timed (drift), skipped, or failed: nothing to pair
                break
            medians[name].append(statistics.median(samples))
        if any(r.status != "ok" or not r.samples.get("round_sizes") for r in turns[first] + turns[second]):
            stopped = "not timed" if all(r.status == "ok" for r in turns[first] + turns[second]) else "failed"
            break
        n = len(medians["new"])
        if n >= settings.min_rounds:
            paired = paired_ratio(medians["base"], medians["new"])
            # A change the interval shows must also survive the verdict's Benjamini-Hochberg
            # step when it is the run's only one (p <= alpha / cases): 8 rounds cannot (p >= 2/256),
            # so such a case takes more rounds, up to max_rounds, past the interval and time rules.
            changed = paired.ci_low is not None and (paired.ci_low > 1 or paired.ci_high < 1)
            if not changed or paired.p_value <= settings.alpha / n_cases:
                if paired.half_width <= settings.target_ci:
                    stopped = "ci"
                    break
                if max(spent.values()) >= cap:
                    stopped = "max_time"
                    break
        if n >= settings.max_rounds:
            stopped = "max_rounds"
            break
    records = {}
    for name in SIDES:
        if not turns[name]:  # the other side ended the case before this one's first turn
            turns[name].append(cases.turn(name, case_id, settings.turn_s)[0])
        records[name] = merge_turns(turns[name])
    return records, _case_line(records, medians, stopped)


class _CaseRunner:
    """Runs one turn of a case on a side: a case process forked from the template,
    given its job by the side's server; its crash or hang becomes the side's failed record."""

    def __init__(self, servers: dict[str, SideServer], template: Template, sides: dict[str, Side],
                 hellos: dict[str, dict]) -> None:
        self.servers, self.template, self.sides, self.hellos = servers, template, sides, hellos
        self.timeout = {name: hellos[name]["settings"]["timeout_s"] for name in SIDES}
        self.jobs: dict[tuple[str, str], bytes] = {}

    def _job(self, side: str, case_id: str) -> bytes:
        if (side, case_id) not in self.jobs:
            self.jobs = {k: v for k, v in self.jobs.items() if k[1] == case_id}  # one case at a time
            reply = self.servers[side].request({"op": "job", "case_id": case_id}, timeout=600)
            self.jobs[(side, case_id)] = reply["payload"]
        return self.jobs[(side, case_id)]

    def turn(self, side: str, case_id: str, seconds: float) -> tuple[Record, list[float] | None]:
        """One case process: load, warm up, one turn of `seconds`, stop. Returns its record
        and the turn's samples (None when the case ended without a turn)."""
        skipped = self.hellos[side]["skipped"].get(case_id)
        if skipped is not None:
            return Record.from_dict(skipped), None
        payload, timeout, t0 = self._job(side, case_id), self.timeout[side], time.perf_counter()
        pid, conn = self.template.fork(self.sides[side], timeout)
        samples, reply, why, hung = None, None, None, False
        try:
            if conn is not None:
                reply = self._exchange(conn, payload, timeout - (time.perf_counter() - t0))
                if reply is not None and reply["op"] == "ready":
                    reply = self._exchange(conn, {"op": "turn", "seconds": seconds},
                                           timeout - (time.perf_counter() - t0))
                    if reply is not None and reply["op"] == "samples":
                        samples = reply["samples"]
                        reply = self._exchange(conn, {"op": "stop"}, timeout - (time.perf_counter() - t0))
            hung = reply is None and time.perf_counter() - t0 >= timeout
            why = self.template.reap(pid, kill=reply is None or reply["op"] != "record")
        except BaseException:  # Ctrl-C, or the template gone: the child must not outlive the run
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise
        finally:
            if conn is not None:
                conn.close()
        if reply is not None and reply["op"] == "record":
            return Record.from_dict(reply["record"]), samples
        reason = f"timed out after {timeout:g} s (killed)" if hung else (why or "case process ended without a record")
        if conn is None and not hung:  # it never started: say why
            reason += f": {self.template.last_line()}"
        failed = self.servers[side].request({"op": "failed", "case_id": case_id, "reason": reason,
                                             "duration_s": round(time.perf_counter() - t0, 3)}, timeout=600)
        return Record.from_dict(failed["record"]), None

    @staticmethod
    def _exchange(conn: Connection, message: dict | bytes, timeout: float) -> dict | None:
        """Send the case process a message, return its answer; None when it ended or hung."""
        try:
            conn.send_bytes(message) if isinstance(message, bytes) else conn.send(message)
            return conn.recv() if conn.poll(max(timeout, 0.0)) else None
        except (EOFError, OSError):
            return None


def merge_turns(records: list[Record]) -> Record:
    """One record of a side's turns at a case: every sample kept, in order, with the turn
    sizes; the latency statistics recomputed over all of them, the throughputs derived
    from the latency scaled to the merged median, the energy from all turns' joules; a
    failed or skipped turn is the record. Figures that do not depend on the samples
    (FLOPs, bytes, drift) are the first turn's."""
    from infermatrix.bench.energy import ENERGY_DROPPED, ENERGY_METRICS, merge_energy
    from infermatrix.bench.stats import summarize
    from infermatrix.reports.compare import SAMPLE_METRICS, latency_samples

    bad = next((r for r in records if r.status != "ok"), None)
    if bad is not None or len(records) == 1:
        return bad or records[0]
    merged = Record.from_dict(records[0].__dict__ | {"metrics": dict(records[0].metrics), "samples": {}})
    for key in records[0].samples:
        merged.samples[key] = [x for r in records for x in r.samples.get(key, [])]
    latency = latency_samples(merged)
    old_p50 = records[0].metrics.get("latency_ms_p50")
    m = merged.metrics
    if latency is not None and latency.size:
        m.update(summarize(latency.tolist()).as_metrics("latency_ms"))
        for metric, (_, inverse) in SAMPLE_METRICS.items():  # throughputs: a constant over the latency
            if inverse and isinstance(m.get(metric), (int, float)) and old_p50:
                m[metric] = m[metric] * old_p50 / m["latency_ms_p50"]
    for key, metric in (("ttft_ms", "ttft_ms_p50"), ("tpot_ms", "tpot_ms_p50")):
        if merged.samples.get(key) and metric in m:
            stats = summarize(merged.samples[key])
            m[metric] = stats.median
            if key == "tpot_ms":
                m.update(tpot_ms_p90=stats.p90, tpot_ms_p99=stats.p99)
    if records[0].case.get("workload") == "prefill" and "ttft_ms_p50" in m:
        m["ttft_ms_p50"] = m["latency_ms_p50"]  # a prefill's TTFT is its latency
    for key in (*ENERGY_METRICS, ENERGY_DROPPED):  # the joules of all turns, over all their calls
        m.pop(key, None)
    m.update(merge_energy([r.metrics for r in records]))
    m["runs"] = sum(int(r.metrics.get("runs", 0)) for r in records)
    m["warmup_runs"] = sum(int(r.metrics.get("warmup_runs", 0)) for r in records)
    m["turns"] = len(records)
    for key in ("peak_rss_bytes", "cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes"):
        if key in m:
            m[key] = max(r.metrics.get(key, 0) for r in records)
    merged.duration_s = round(sum(r.duration_s for r in records), 3)
    return merged


def _case_line(records: dict[str, Record], medians: dict[str, list[float]], stopped: str) -> str:
    from infermatrix.reports.paired import paired_ratio

    if records["base"].status != "ok" or records["new"].status != "ok":
        return "; ".join(f"{n.upper()} {records[n].status}" + (f" ({records[n].reason})" if records[n].reason else "")
                         for n in SIDES)
    n = min(len(medians["base"]), len(medians["new"]))
    if not n:
        return "ok (not timed)"
    pr = paired_ratio(medians["base"][:n], medians["new"][:n])
    ci = f" [{pr.ci_low:.3f}, {pr.ci_high:.3f}]" if pr.ci_low is not None else ""
    return f"{n} rounds ({stopped}), NEW/BASE {pr.ratio:.3f}x{ci}"


def ab_header(run: AbRun) -> str:
    return (f"BASE {run.sides['base'].label} · NEW {run.sides['new'].label} · {len(run.records['new'])} cases · "
            f"start sides seeded {run.seed} · {run.wall_s:.0f} s")


def write_ab_reports(run: AbRun, result) -> list[Path]:
    """Both run folders' reports, then ab.json, ab.md and ab.html."""
    from infermatrix.reports.ab import ab_json, render_ab_html, render_ab_markdown
    from infermatrix.reports.run import load_run, write_reports

    paths = []
    for name in SIDES:
        paths += write_reports(load_run(run.out / name), run.out / name)
    header = ab_header(run)
    data = {"base": run.sides["base"].label, "new": run.sides["new"].label, "seed": run.seed,
            "wall_s": run.wall_s, **ab_json(result)}
    files = {"ab.json": json.dumps(_finite(data), indent=2, allow_nan=False),
             "ab.md": render_ab_markdown(result, header), "ab.html": render_ab_html(result, header)}
    for file, text in files.items():
        (run.out / file).write_text(text, encoding="utf-8")
        paths.append(run.out / file)
    return paths
