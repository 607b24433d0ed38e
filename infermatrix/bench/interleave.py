"""`[run] interleave = true`: the cases of a group take turns at the machine.

A group is the cases that differ only in their variant (same model, workload, dtype,
device and shape): the rows a speedup compares. Each timed case of a group gets its
own process, which loads and warms up once, then samples only in the turns this
driver grants: `rounds` rounds, each giving every case one turn of `turn_s` seconds
(at least one sample), in forward order on even rounds and reversed on odd ones, so
no case always follows the same neighbour. A noisy neighbour or a clock change then
slows every case of the round alike, and the reports pair the rounds: a speedup is
computed from per-round medians (reports.paired), not from two medians taken minutes
apart. Each record keeps every sample, `samples["round_sizes"]` (the samples per
round, as an A/B run's records do) and `env["interleave"]`, the group's token: only
records with the same token took their rounds together.

The processes speak the A/B case protocol (bench/ab_side.run_taking_turns): `ready`
when warmed up, `turn` -> `samples`, `stop` -> `record`. A case that ends without
asking for a turn (it failed, or has no timed samples) simply sends its record; one
that dies or hangs becomes a failed record, and the others go on with their rounds.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import astuple, replace
from typing import Callable

from infermatrix.bench.matrix import Case
from infermatrix.bench.runner import (RunContext, _now, _process_context, _record, execute_case, exit_reason,
                                      skip_reason)
from infermatrix.reports.record import Record

UNTIMED_WORKLOADS = frozenset({"drift"})  # no samples: nothing to interleave


def interleave_groups(cases: list[Case]) -> list[list[Case]]:
    """Cases grouped by everything but their variant, groups and members in order."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(astuple(replace(case, variant="")), []).append(case)
    return list(groups.values())


def _turn_taker(case: Case, ctx: RunContext, conn, token: dict) -> None:
    """A case's process: run it with its timer sampling only in granted turns."""
    from infermatrix.bench.ab_side import run_taking_turns

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a case process: the run reports Ctrl-C once
    run_taking_turns(case, ctx, conn, env={"interleave": token})


class _Member:
    """One case of a group, in its own process."""

    def __init__(self, case: Case, ctx: RunContext, token: dict) -> None:
        self.case, self.ctx = case, ctx
        self.started, self.t0 = _now(), time.perf_counter()
        self.record: Record | None = None
        mp = _process_context()
        self.conn, child = mp.Pipe()
        self.proc = mp.Process(target=_turn_taker, args=(case, ctx, child, token),
                               name=f"infermatrix case {case.case_id}")
        self.proc.start()
        child.close()

    @property
    def waiting(self) -> bool:
        """Warmed up and waiting for a turn (not yet ended)."""
        return self.record is None

    def _exchange(self, message: dict | None) -> tuple[dict | None, bool]:
        """Send `message` (None: only listen). Returns (the answer, hung): the answer is
        None when the process ended (hung False) or did not answer within the case
        timeout (hung True)."""
        try:
            if message is not None:
                self.conn.send(message)
            if self.conn.poll(self.ctx.settings.timeout_s):
                return self.conn.recv(), False
            return None, True
        except (EOFError, OSError):  # it died, perhaps while idle between its turns
            return None, False

    def _end(self, answer: tuple[dict | None, bool], when: str) -> None:
        """Its record: the one it sent, or a failed one saying why there is none."""
        message, hung = answer
        if message is not None and message.get("op") == "record":
            self.record = Record.from_dict(message["record"])
        else:
            if hung or message is not None:
                self.proc.kill()
            self.proc.join(timeout=30)  # a dead process's exit code, once it is reaped
            if message is not None:
                why = f"case process sent {message.get('op')!r} {when}, not what the turns expect"
            elif hung:
                why = f"timed out after {self.ctx.settings.timeout_s:g} s {when} (killed)"
            else:
                why = f"{exit_reason(self.proc.exitcode)} ({when})"
            self.record = _record(self.case, self.ctx, "failed", why, self.started, time.perf_counter() - self.t0)
        self.proc.join(timeout=30)
        self.conn.close()

    def wait_ready(self) -> None:
        """Until it has loaded and warmed up, or ended without a turn."""
        answer = self._exchange(None)
        if answer[0] is None or answer[0].get("op") != "ready":  # else its record: it timed nothing
            self._end(answer, "before its first turn")

    def turn(self, seconds: float) -> None:
        answer = self._exchange({"op": "turn", "seconds": seconds})
        if answer[0] is None or answer[0].get("op") != "samples":
            self._end(answer, "during a turn")

    def stop(self) -> Record:
        if self.record is None:
            self._end(self._exchange({"op": "stop"}), "after its last turn")
        return self.record


def run_group(cases: list[Case], ctx: RunContext, on_start: Callable[[Case], None]) -> list[Record]:
    """The timed cases of one group, interleaved round by round; records in case order."""
    token = {"group": uuid.uuid4().hex[:12], "rounds": ctx.settings.rounds, "turn_s": ctx.settings.turn_s}
    members = []
    try:
        for case in cases:  # one at a time: no process warms up while another is timed
            on_start(case)
            member = _Member(case, ctx, token)
            members.append(member)
            member.wait_ready()
        for round_index in range(ctx.settings.rounds):
            order = members if round_index % 2 == 0 else members[::-1]
            for member in order:
                if member.waiting:
                    member.turn(ctx.settings.turn_s)
        return [member.stop() for member in members]
    finally:  # Ctrl-C or an error here: no case process outlives the run
        for member in members:
            if member.record is None and member.proc.is_alive():
                member.proc.kill()


def execute_interleaved(cases: list[Case], ctx: RunContext, on_start: Callable[[Case], None]) -> Iterator[Record]:
    """An executor (bench.runner.Executor): each group's timed cases interleaved, the
    rest (skipped here, untimed, alone in their group) as execute_local runs them."""
    for group in interleave_groups(cases):
        timed = [c for c in group if c.workload not in UNTIMED_WORKLOADS and skip_reason(c) is None]
        if len(timed) < 2:
            timed = []
        for case in group:
            if case not in timed:
                on_start(case)
                yield execute_case(case, ctx)
        if timed:
            yield from run_group(timed, ctx, on_start)
