"""`[run] interleave = true`: the cases of a group take turns at the machine.

A group is the cases that differ only in their variant (same model, workload, dtype,
device and shape): the rows a speedup compares. Each timed case of a group gets its
own process, which loads and warms up once, then samples only in the turns this
driver grants: `rounds` rounds, each giving every case one turn of `turn_s` seconds
(at least one sample), in forward order on even rounds and reversed on odd ones, so
no case always follows the same neighbour. A noisy neighbour or a clock change then
slows every case of the round alike, and the reports pair the rounds: a speedup is
computed from per-round medians (reports.paired), not from two medians taken minutes
apart. Each record keeps every sample and `samples["round_sizes"]`, the samples per
round, as an A/B run's records do.

The processes speak the A/B case protocol (bench/ab_side.PipeTurns): `ready` when
warmed up, `turn` -> `samples`, `stop` -> `record`. A case that ends without asking
for a turn (it failed, or has no timed samples) simply sends its record.
"""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, astuple, replace
from typing import Callable

from infermatrix.bench.matrix import Case
from infermatrix.bench.runner import (ModelCache, RunContext, _now, _process_context, _record, execute_case, run_case,
                                      skip_reason)
from infermatrix.reports.record import Record

UNTIMED_WORKLOADS = frozenset({"drift"})  # no samples: nothing to interleave


def interleave_groups(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped by everything but their variant, groups and members in order."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(astuple(replace(case, variant="")), []).append(case)
    return list(groups.values())


def _turn_taker(case: Case, ctx: RunContext, conn) -> None:
    """A case's process: run it with its timer sampling only in granted turns."""
    from infermatrix.bench import timing
    from infermatrix.bench.ab_side import PipeTurns

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a case process: the run reports Ctrl-C once
    turns = PipeTurns(conn)
    timing.interleave_with(turns)
    record = run_case(case, ctx, ModelCache(ctx.settings.seed))
    record.metrics["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if turns.sizes:
        record.samples["round_sizes"] = list(turns.sizes)
    conn.send({"op": "record", "record": asdict(record)})
    conn.close()


class _Member:
    """One case of a group, in its own process."""

    def __init__(self, case: Case, ctx: RunContext) -> None:
        self.case, self.ctx = case, ctx
        self.started, self.t0 = _now(), time.perf_counter()
        self.record: Record | None = None
        mp = _process_context()
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_turn_taker, args=(case, ctx, child), name=f"infermatrix case {case.case_id}")
        self.proc.start()
        child.close()

    @property
    def waiting(self) -> bool:
        """Warmed up and waiting for a turn (not yet ended)."""
        return self.record is None

    def _answer(self, timeout: float) -> dict | None:
        try:
            if self.conn.poll(timeout):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def _end(self, message: dict | None, why: str) -> None:
        if message is not None and message.get("op") == "record":
            self.record = Record.from_dict(message["record"])
        else:
            self.proc.kill()
            self.record = _record(self.case, self.ctx, "failed", why, self.started, time.perf_counter() - self.t0)
        self.proc.join(timeout=30)
        self.conn.close()

    def wait_ready(self) -> None:
        """Until it has loaded and warmed up, or ended without a turn."""
        message = self._answer(self.ctx.settings.timeout_s)
        if message is None:
            self._end(None, f"timed out after {self.ctx.settings.timeout_s:g} s before its first turn (killed)")
        elif message.get("op") != "ready":  # its record: it ended without timing anything
            self._end(message, f"case process sent {message.get('op')!r} instead of its record")

    def turn(self, seconds: float) -> None:
        self.conn.send({"op": "turn", "seconds": seconds})
        message = self._answer(self.ctx.settings.timeout_s)
        if message is None or message.get("op") != "samples":
            self._end(message, "case process ended or hung during its turn (killed)")

    def stop(self) -> Record:
        if self.record is None:
            self.conn.send({"op": "stop"})
            self._end(self._answer(self.ctx.settings.timeout_s), "case process sent no record after its last turn")
        return self.record


def run_group(cases: list[Case], ctx: RunContext) -> list[Record]:
    """The timed cases of one group, interleaved round by round; records in case order."""
    members = []
    try:
        for case in cases:  # one at a time: no process warms up while another is timed
            member = _Member(case, ctx)
            members.append(member)
            member.wait_ready()
        for round_index in range(ctx.settings.rounds):
            order = members if round_index % 2 == 0 else members[::-1]
            for member in order:
                if member.waiting:
                    member.turn(ctx.settings.turn_s)
        return [member.stop() for member in members]
    finally:
        for member in members:
            if member.proc.is_alive() and member.record is None:
                member.proc.kill()


def execute_interleaved(cases: list[Case], ctx: RunContext, on_start: Callable[[Case], None]) -> Iterator[Record]:
    """An executor (bench.runner.Executor): each group's timed cases interleaved, the
    rest (skipped here, untimed, alone in their group) as execute_local runs them."""
    for group in interleave_groups(cases):
        timed = [c for c in group if c.workload not in UNTIMED_WORKLOADS and skip_reason(c) is None]
        for case in group:
            if case not in timed or len(timed) < 2:
                on_start(case)
                yield execute_case(case, ctx)
        if len(timed) >= 2:
            on_start(timed[0])
            yield from run_group(timed, ctx)

