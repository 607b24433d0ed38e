"""One side of an interleaved A/B run (`infermatrix ab`): a server that imported this
side's code, started by the A/B driver (bench/ab.py) with the side's folder first on
the import path, and the case processes it forks.

The driver talks to the server over a connection whose file descriptor it passes in;
every message is a plain dict. The server reads the matrix with this side's code,
says which cases it expands to, then serves, per case:

    open    fork the case's process; it loads the model, applies the variants, warms up
            and then waits in measure() for its first turn -> {"op": "ready"}, or it
            finished without a timed measurement (drift, a skip, a failure) -> record
    turn    the case process samples for the seconds given -> {"op": "samples", ...}
    stop    measure() returns, the workload computes its metrics -> {"op": "record", ...}

A case process that crashes or hangs past the case timeout becomes a failed record of
this side, as in `infermatrix run`. The case process is forked from this side's
forkserver, so it runs this side's code only.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from dataclasses import asdict
from multiprocessing.connection import Connection

PROTOCOL = 1  # the driver refuses a side that speaks another version


class _PipeTurns:
    """The case process's end of the turns: asks the side server (and so the driver)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.sizes: list[int] = []

    def wait_turn(self) -> float | None:
        if not self.sizes:
            self.conn.send({"op": "ready"})  # warmed up: the driver may grant the first turn
        message = self.conn.recv()
        return message["seconds"] if message["op"] == "turn" else None

    def end_turn(self, samples_ms: list[float]) -> None:
        self.sizes.append(len(samples_ms))
        self.conn.send({"op": "samples", "samples": samples_ms})


# Workloads whose first call is cold and untimed (compilation, lazy init): in a process
# that serves one turn it is the warm-up, and the [run] warm-up runs are not repeated.
WARMED_BY_FIRST_CALL = frozenset({"prefill", "decode", "generate"})


def _case_process(case, ctx, conn: Connection) -> None:
    """Entry point of a case's process: run it with its timer taking turns, send the record."""
    import dataclasses

    from infermatrix.bench import timing
    from infermatrix.bench.runner import ModelCache, run_case

    if case.workload in WARMED_BY_FIRST_CALL:
        ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, warmup=0, warmup_s=0.0))
    turns = _PipeTurns(conn)
    timing.interleave_with(turns)
    record = run_case(case, ctx, ModelCache(ctx.settings.seed))
    record.metrics["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if turns.sizes:
        record.samples["round_sizes"] = list(turns.sizes)  # timer samples per turn, in order
    conn.send({"op": "record", "record": asdict(record)})


class _SideServer:
    def __init__(self, conn: Connection, spec: dict) -> None:
        from infermatrix.bench.matrix import load_matrix
        from infermatrix.bench.runner import run_context

        self.conn = conn
        self.matrix = load_matrix(spec["matrix"], spec.get("overrides") or {})
        self.cases = {case.case_id: case for case in self.matrix.cases}
        self.ctx = run_context(self.matrix, list(self.matrix.cases), spec.get("eval_text"),
                               log=lambda line: print(f"[{spec['name']}] {line}", file=sys.stderr, flush=True))
        _start_forkserver(spec["root"])
        self.proc = None  # the open case's process
        self.child: Connection | None = None
        self.case = None
        self.started = 0.0

    def hello(self) -> dict:
        from infermatrix.bench.runner import check_eval_text

        check_eval_text(self.matrix, self.ctx.eval_text_path)
        return {"op": "hello", "protocol": PROTOCOL, "cases": {cid: c.to_dict() for cid, c in self.cases.items()},
                "env": self.ctx.env,
                "matrix_text": self.matrix.text, "settings": asdict(self.matrix.settings)}

    def serve(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except EOFError:  # the driver is gone
                self._close_case()
                return
            op = message["op"]
            if op == "open":
                reply = self._open(self.cases[message["case_id"]])
            elif op == "turn":
                reply = self._relay({"op": "turn", "seconds": message["seconds"]}, expect="samples")
            elif op == "stop":
                reply = self._relay({"op": "stop"}, expect="record")
            elif op == "quit":
                self._close_case()
                return
            else:
                reply = {"op": "error", "error": f"unknown request {op!r}"}
            self.conn.send(reply)

    def _open(self, case) -> dict:
        from infermatrix.bench.runner import _process_context, _record, skip_reason

        self._close_case()
        self.case, self.started = case, time.perf_counter()
        reason = skip_reason(case)
        if reason:
            return self._record_reply(_record(case, self.ctx, "skipped", reason))
        mp = _process_context()
        self.child, child_end = mp.Pipe(duplex=True)
        self.proc = mp.Process(target=_case_process, args=(case, self.ctx, child_end),
                               name=f"infermatrix ab case {case.case_id}")
        self.proc.start()
        child_end.close()
        return self._wait(expect="ready")

    def _relay(self, message: dict, expect: str) -> dict:
        if self.child is None:
            return {"op": "error", "error": "no case is open"}
        try:
            self.child.send(message)
        except OSError:
            pass  # the process died: _wait reports how
        return self._wait(expect)

    def _wait(self, expect: str) -> dict:
        """The case process's next message (`expect`, or its record when it ended early),
        or a failed record when it crashed or timed out."""
        from infermatrix.bench.runner import _record
        from infermatrix.reports.record import Record

        timeout = self.ctx.settings.timeout_s
        left = timeout - (time.perf_counter() - self.started)
        try:
            ready = self.child.poll(max(left, 0.0))
            message = self.child.recv() if ready else None
        except (EOFError, OSError):
            message, ready = None, True
        if message is not None and message["op"] in (expect, "record"):
            if message["op"] == "record":
                self._close_case()
                return self._record_reply(Record.from_dict(message["record"]))
            return message
        if not ready:
            reason = f"timed out after {timeout:g} s (killed)"
        else:
            self.proc.join(timeout=30)
            code = self.proc.exitcode
            reason = (f"case process crashed with signal {-code}" if code is not None and code < 0 else
                      f"case process exited with status {code} without a record")
        self._close_case()
        return self._record_reply(_record(self.case, self.ctx, "failed", reason,
                                          duration_s=time.perf_counter() - self.started))

    def _record_reply(self, record) -> dict:
        return {"op": "record", "record": asdict(record)}

    def _close_case(self) -> None:
        if self.proc is not None:
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
        if self.child is not None:
            self.child.close()
        self.proc, self.child = None, None


def _start_forkserver(root: str) -> None:
    """Start the case processes' forkserver from the side's folder: Python 3.11's
    forkserver imports its preloaded modules with the current directory first on its
    path (it ignores the sys.path it is given), so started from a folder holding another
    infermatrix it would import that one. Case processes still start in the user's
    current directory, where relative paths in the matrix point."""
    import os
    from multiprocessing import forkserver

    from infermatrix.bench.runner import _process_context

    _process_context()  # the preload list
    here = os.getcwd()
    os.chdir(root)
    try:
        forkserver.ensure_running()
    finally:
        os.chdir(here)


def _load_plugins() -> None:
    """Import the `infermatrix.variants` entry points now (the driver put the side's
    own plugin metadata first on the path), and fail on a plugin that does not import:
    gating code that cannot load would gate nothing."""
    import warnings

    from infermatrix.errors import UserError
    from infermatrix.variants.base import load_entry_points

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_entry_points()
    broken = [str(w.message) for w in caught if "failed to load" in str(w.message)]
    if broken:
        raise UserError("; ".join(broken))


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    spec = json.loads(argv[1])
    try:
        _load_plugins()
        server = _SideServer(conn, spec)
        conn.send(server.hello())
    except Exception as exc:  # a UserError, or a side whose code does not import or run
        from infermatrix.errors import UserError

        if isinstance(exc, UserError):
            error = str(exc)
        else:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            error = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
        conn.send({"op": "error", "error": error})
        return 1
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
