"""One side of an interleaved A/B run (`infermatrix ab`), in that side's own code.

Two entry points, both run with the side's folder first on the import path:

* `main`, the side's server, started by the A/B driver (bench/ab.py): it reads the
  matrix with this side's code and answers, as plain dicts over a connection whose
  file descriptor the driver passes in:

      hello   the cases the matrix expands to (with this side's skip records), the
              environment and settings
      job     a case's (case, run context), pickled for its case process
      failed  a failed record of a case (its process crashed or hung), this side's way

* `case_main`, in a case process: the driver's template process (bench/ab.py) forks
  it, puts this side's folder first on its path and calls it. It connects to the
  driver, receives its job, runs the case with the timer taking the turns the driver
  grants (`ready`, then `turn` -> `samples`, ..., `stop` -> `record`), and exits. Both
  sides fork from one template, so whatever a forked process inherits from its parent
  (measured here: the same attention op 1.8x apart between children of two template
  processes, within 5% among children of one) is common to both sides.
"""

from __future__ import annotations

import json
import pickle
import resource
import socket
import sys
import traceback
from dataclasses import asdict
from multiprocessing.connection import Connection

PROTOCOL = 2  # the driver refuses a side that speaks another version

# Workloads whose first call is cold and untimed (compilation, lazy init): in a process
# that serves one turn it is the warm-up, and the [run] warm-up runs are not repeated.
WARMED_BY_FIRST_CALL = frozenset({"prefill", "decode", "generate", "encode"})


class PipeTurns:
    """The case process's end of the turns: asks the driver (an A/B run's, or an
    interleaved run's, bench/interleave.py)."""

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


def case_main(socket_path: str) -> None:
    """A case process: connect to the driver, run the job it sends, send the record."""
    import dataclasses

    sock = socket.socket(socket.AF_UNIX)
    sock.connect(socket_path)
    conn = Connection(sock.detach())
    case, ctx = pickle.loads(conn.recv_bytes())
    if case.workload in WARMED_BY_FIRST_CALL:
        ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, warmup=0, warmup_s=0.0))
    run_taking_turns(case, ctx, conn)


def run_taking_turns(case, ctx, conn: Connection, env: dict | None = None) -> None:
    """Run `case` in this process with its timer sampling only in the turns the driver
    at the other end of `conn` grants, then send the record (with `env` added to its
    environment, and the samples each turn took)."""
    from infermatrix.bench import timing
    from infermatrix.bench.runner import ModelCache, run_case

    turns = PipeTurns(conn)
    timing.interleave_with(turns)
    record = run_case(case, ctx, ModelCache(ctx.settings.seed))
    record.metrics["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if turns.sizes:
        record.samples["round_sizes"] = list(turns.sizes)  # timer samples per turn, in order
    record.env = {**record.env, **(env or {})}
    try:
        conn.send({"op": "record", "record": asdict(record)})
    except BrokenPipeError:  # the driver is gone (the run was interrupted): nobody to tell
        pass


class _SideServer:
    def __init__(self, conn: Connection, spec: dict) -> None:
        from infermatrix.bench.matrix import load_matrix
        from infermatrix.bench.runner import check_eval_text, run_context

        self.conn = conn
        self.matrix = load_matrix(spec["matrix"], spec.get("overrides") or {})
        self.cases = {case.case_id: case for case in self.matrix.cases}
        self.ctx = run_context(self.matrix, list(self.matrix.cases), spec.get("eval_text"),
                               log=lambda line: print(f"[{spec['name']}] {line}", file=sys.stderr, flush=True))
        check_eval_text(self.matrix, self.ctx.eval_text_path)

    def hello(self) -> dict:
        from infermatrix.bench.runner import _record, skip_reason

        skipped = {}
        for case_id, case in self.cases.items():
            reason = skip_reason(case)
            if reason:
                skipped[case_id] = asdict(_record(case, self.ctx, "skipped", reason))
        return {"op": "hello", "protocol": PROTOCOL, "cases": {cid: c.to_dict() for cid, c in self.cases.items()},
                "skipped": skipped, "env": self.ctx.env, "matrix_text": self.matrix.text,
                "settings": asdict(self.matrix.settings)}

    def serve(self) -> None:
        from infermatrix.bench.runner import _record

        while True:
            try:
                message = self.conn.recv()
            except EOFError:  # the driver is gone
                return
            op = message["op"]
            if op == "job":
                reply = {"op": "job", "payload": pickle.dumps((self.cases[message["case_id"]], self.ctx))}
            elif op == "failed":
                record = _record(self.cases[message["case_id"]], self.ctx, "failed", message["reason"],
                                 duration_s=message["duration_s"])
                reply = {"op": "record", "record": asdict(record)}
            elif op == "quit":
                return
            else:
                reply = {"op": "error", "error": f"unknown request {op!r}"}
            self.conn.send(reply)


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
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle: it closes the sides
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
