"""Run a matrix's cases as Ray tasks: `infermatrix run MATRIX --executor ray [--address ADDR]`.

Each case is one task asking for what it needs: the GPUs up to its device index for a
CUDA case (cuda:1 needs two, since Ray shows a task only the GPUs it was given), and
the CPUs of a whole node for a CPU case by default, so that two timed cases never share
cores (`cpus_per_case` to allow it). A task runs the runner's own per-case logic
(`execute_case`) on its worker: the skip checks against the worker's machine, then the
case in its own process when [run] isolate is true, so a crash or a hang past timeout_s
becomes a failed record there as on one machine. Records come back to the driver as
tasks finish and are appended to the one records.jsonl; a task whose worker or node dies
(a segfault with isolate = false, an OOM kill, a lost node) becomes a failed record for
its case, and the run goes on. Tasks are not retried: a case that crashed its worker
would most likely crash the next one. With isolate = false nothing enforces timeout_s:
the driver cannot tell when a queued task started, so a hang holds its task.

Every node needs infermatrix installed (and the same --eval-text path, if given); each
record's env describes the worker's machine, and % of the limit uses its own peaks.
"""

from __future__ import annotations

import re
import socket
from dataclasses import replace
from typing import Callable, Iterator

from infermatrix.bench.matrix import Case
from infermatrix.bench.runner import RunContext, _record, execute_case, measure_peaks
from infermatrix.errors import UserError
from infermatrix.reports.record import Record

# env keys that describe the run, not the machine: a worker keeps them in its records
_RUN_KEYS = ("eval_text", "settings", "matrix_sha256", "shard")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'infermatrix[ray]'") from None
    return ray


def _gpus_needed(case: Case) -> int:
    if not case.device.startswith("cuda"):
        return 0
    return int(case.device.split(":")[1]) + 1 if ":" in case.device else 1


_worker_state: dict = {"peaks": {}}  # per worker process: its env, peaks and loaded model, kept across tasks


def _worker_context(ctx: RunContext, case: Case) -> RunContext:
    """The run's context with this worker's machine: its env and its measured peaks
    (for the dtypes of all the matrix's cases of this device type: one cache key)."""
    from infermatrix.bench.env import capture_env

    if "env" not in _worker_state:
        _worker_state["env"] = capture_env()
    peaks = _worker_state["peaks"]
    if case.device.split(":")[0] not in peaks:
        peaks.update(measure_peaks([case], ctx.peak_dtypes, log=lambda line: None))
    env = {**_worker_state["env"], **{k: ctx.env[k] for k in _RUN_KEYS if k in ctx.env},
           "peaks": {kind: p.to_dict() for kind, p in peaks.items()}, "executor": "ray"}
    return replace(ctx, env=env, peaks=dict(peaks))


def _run_on_worker(case: Case, ctx: RunContext) -> Record:
    from infermatrix.bench.runner import ModelCache

    models = _worker_state.setdefault("models", ModelCache(ctx.settings.seed))  # isolate = false reuses it
    return execute_case(case, _worker_context(ctx, case), models)


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT that nothing listens on is refused at once (Ray itself retries for
    minutes); ray:// and auto addresses are left to Ray."""
    match = re.fullmatch(r"([^:/]+):(\d+)", address or "")
    if not match:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=10).close()
    except OSError as exc:
        raise UserError(f"--address {address}: nothing answers there ({exc}); start the head node with "
                        f"`ray start --head --port={match[2]}` or give its address") from None


class RayExecutor:
    """An executor for runner.run_matrix (see runner.Executor)."""

    def __init__(self, address: str | None = None, cpus_per_case: float | None = None,
                 log: Callable[[str], None] = print) -> None:
        if cpus_per_case is not None and cpus_per_case <= 0:
            raise UserError(f"--cpus-per-case must be positive, got {cpus_per_case:g}")
        self.address = address
        self.cpus_per_case = cpus_per_case
        self.log = log
        self.ray = import_ray()
        self.started_here = False  # a cluster this executor started is shut down at the end of its run

    def _resources(self, case: Case, nodes: list[dict]) -> dict | str:
        """Ray task options for the case, or why no node of the cluster can run it."""
        gpus = _gpus_needed(case)
        if gpus:
            most = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
            if most < gpus:
                return (f"needs CUDA ({gpus} GPU{'s' if gpus > 1 else ''} on one node; "
                        f"no node of the Ray cluster has {'any' if not most else f'more than {most:g}'})")
            return {"num_gpus": gpus, "num_cpus": 1}
        cpus = [n["Resources"].get("CPU", 0) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
        if not cpus:
            return "no node of the Ray cluster has a CPU to give"
        # a whole node of the smallest kind: no two timed cases share cores
        return {"num_cpus": self.cpus_per_case or min(cpus)}

    def connect(self) -> None:
        """Attach to --address, else to $RAY_ADDRESS or this machine's cluster, else start
        a local one; the CLI calls this before the run folder is made."""
        ray = self.ray
        if ray.is_initialized():
            return
        _check_reachable(self.address)
        try:
            ray.init(address=self.address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            where = self.address or "a local Ray instance"
            raise UserError(f"--address: cannot connect to {where} ({exc}); start one with `ray start --head` "
                            "or give the head node's address, e.g. --address HEAD_IP:6379") from None
        self.started_here = True

    def __call__(self, cases: list[Case], ctx: RunContext, on_start: Callable[[Case], None]) -> Iterator[Record]:
        # on_start is not called: every case is submitted at once and Ray decides when each starts
        ray = self.ray
        self.connect()
        pending: dict = {}
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            total = ray.cluster_resources()
            self.log(f"ray: {len(nodes)} nodes, {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs")
            task = ray.remote(max_retries=0)(_run_on_worker)
            ctx_ref = ray.put(ctx)
            for case in cases:
                options = self._resources(case, nodes)
                if isinstance(options, str):
                    yield _record(case, ctx, "skipped", options)
                    continue
                pending[task.options(**options, name=f"infermatrix {case.case_id}").remote(case, ctx_ref)] = case
            while pending:  # as each task finishes, in whatever order
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    yield self._result(ref, pending.pop(ref), ctx)
        finally:  # interrupted: cancel what still runs; a cluster we started goes away with us
            for ref in pending:
                ray.cancel(ref, force=True)
            if self.started_here:
                ray.shutdown()
                self.started_here = False

    def _result(self, ref, case: Case, ctx: RunContext) -> Record:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            # the worker or its node died, or the task could not run: this case's failure only
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return _record(case, ctx, "failed", f"Ray task lost ({type(exc).__name__}): {detail}")
