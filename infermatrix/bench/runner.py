"""Run a matrix: for each case load (or reuse) the model, apply the variants, run
the workload, and append a Record to records.jsonl at once.

By default each case runs in its own process (forked from a server that has
already imported torch, so a case starts in milliseconds): a crash, an
out-of-memory kill or a hang past `timeout_s` becomes a failed Record and the run
goes on, and the process's peak resident set is the case's own. `--resume`
continues a run folder, skipping cases that already have a record.
"""

from __future__ import annotations

import multiprocessing
import resource
import signal
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import torch

from infermatrix.bench.env import capture_env
from infermatrix.bench.matrix import Case, Matrix, RunSettings, device_dtypes
from infermatrix.bench.roofline import Peaks, load_or_measure_peaks
from infermatrix.bench.text import load_text, text_sha256
from infermatrix.errors import UserError
from infermatrix.reports.record import RECORDS_FILE, Record, append_record, matrix_sha256, read_records
from infermatrix.reports.run import MATRIX_COPY, Run, write_reports
from infermatrix.variants import parse_spec, runs_in_triton_interpreter, take_paths, unmet_requirements
from infermatrix.weights import DTYPES, LoadedModel, is_gguf_model, load_model, model_config


@dataclass(frozen=True)
class RunContext:
    """What every case of a run shares; picklable, sent to each case's process."""

    settings: RunSettings
    env: dict
    eval_text_path: str | None = None  # None: the standard library's pydoc topics
    peaks: dict[str, Peaks] | None = None  # device type -> measured peaks, for % of the limit
    # device type -> the dtypes of the whole matrix's cases on it (a shard's too): the peaks'
    # cache key, so every shard and Ray worker on one machine reads the same peaks
    peak_dtypes: dict[str, tuple[str, ...]] = field(default_factory=dict)


class ModelCache:
    """Keeps the last loaded base model (the runner groups cases by model, so each
    is read once and only one is held in memory), and remembers load failures so
    a broken model fails its cases without being reloaded for each."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed  # of random-weight presets
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
                self._loaded = load_model(name, DTYPES[dtype], device, seed=self.seed)
            except Exception as exc:
                self._failures[key] = exc
                raise
            self._key = key
        return self._loaded


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _record(case: Case, ctx: RunContext, status: str, reason: str | None = None, started: str = "",
            duration_s: float = 0.0, **fields) -> Record:
    return Record(case_id=case.case_id, case=case.to_dict(), status=status, reason=reason, env=ctx.env,
                  started_at=started or _now(), duration_s=round(duration_s, 3), **fields)


def skip_reason(case: Case) -> str | None:
    """Why this machine cannot run the case, or None: missing hardware or package,
    a dtype the device does not support, or too little memory for the weights."""
    variants = parse_spec(case.variant)
    reason = unmet_requirements(variants, case.device) or next(
        (r for r in (v.skip_reason(case) for v in variants) if r), None)
    if reason:
        return reason
    gguf_only = next((v.name for v in variants if v.needs_gguf), None)
    if gguf_only and not is_gguf_model(case.model):
        return f"{gguf_only} runs GGUF files; {case.model} is not one"
    device = torch.device(case.device)
    if device.type == "cuda" and case.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        return "bfloat16 is not supported by this GPU"
    if case.workload in ("attention", "linear"):
        return None
    params = model_config(case.model).num_params()
    need = params * DTYPES[case.dtype].itemsize
    if case.workload == "drift":
        need += params * 4  # the fp32 reference, when its logits are not cached yet
    free = _free_memory(device)
    if free is not None and need > 0.9 * free:
        return f"needs {need / 2**30:.1f} GiB for weights alone, {free / 2**30:.1f} GiB available"
    return None


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_case(case: Case, ctx: RunContext, models: ModelCache) -> Record:
    """Run one case in this process. Every error becomes a failed Record."""
    from infermatrix.bench.workloads import WORKLOAD_FNS  # heavy; imported in the case's process

    started, t0 = _now(), time.perf_counter()
    device = torch.device(case.device)
    try:
        take_paths()  # forget what an earlier case of this process ran
        with torch.inference_mode():  # no autograd graphs in any timed call
            metrics, samples = WORKLOAD_FNS[case.workload](case, ctx, models)
        paths = take_paths()  # which attention / linear implementations really ran
        metrics.update(paths)
        window = getattr(model_config(case.model), "sliding_window", None)  # encoders have none
        if window is not None and case.workload in ("prefill", "decode", "generate", "drift"):
            metrics["model_window"] = window  # the model's own attention window was in force
        if runs_in_triton_interpreter(parse_spec(case.variant), paths):
            metrics["triton_interpreted"] = True  # CPU interpreter: correct numbers, meaningless timings
        if device.type == "cuda":
            metrics["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            metrics["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        return _record(case, ctx, "ok", started=started, duration_s=time.perf_counter() - t0,
                       metrics=metrics, samples=samples)
    except UserError as exc:
        return _record(case, ctx, "failed", str(exc), started, time.perf_counter() - t0)
    except Exception as exc:  # any crash of one case is that case's failure, not the run's
        where = traceback.extract_tb(exc.__traceback__)[-1]
        reason = f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
        return _record(case, ctx, "failed", reason, started, time.perf_counter() - t0)


def _case_process(case: Case, ctx: RunContext, conn) -> None:
    """Entry point of a case's own process: run it, add the peak RSS, send the record."""
    # Ctrl-C reaches the whole process group: end at once, without a KeyboardInterrupt
    # traceback; the run's process reports the interruption once, for all
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    record = run_case(case, ctx, ModelCache(ctx.settings.seed))
    record.metrics["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        conn.send(asdict(record))
    except BrokenPipeError:  # the run was interrupted while the forkserver started this case: nobody to tell
        return
    conn.close()


_mp_context = None


def _process_context():
    """A forkserver that has imported torch and the workloads once: each case is a
    fresh, cheap fork of it, never of the (possibly multithreaded) parent."""
    global _mp_context
    if _mp_context is None:
        _mp_context = multiprocessing.get_context("forkserver")
        # torch._dynamo: imported lazily by the first model construction, 1.7 s per process otherwise
        _mp_context.set_forkserver_preload(["torch", "torch._dynamo", "infermatrix.bench.workloads"])
        _start_forkserver_ignoring_ctrl_c()
    return _mp_context


def _start_forkserver_ignoring_ctrl_c() -> None:
    """Ctrl-C reaches the whole process group: started with SIGINT ignored (inherited
    through exec), the forkserver is not killed mid-import of torch with a traceback.
    Its case processes take SIGINT again (_case_process)."""
    import multiprocessing.forkserver
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers; the server starts on first use
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        multiprocessing.forkserver.ensure_running()  # returns once started, before its imports
    finally:
        signal.signal(signal.SIGINT, previous)


def run_case_isolated(case: Case, ctx: RunContext) -> Record:
    mp = _process_context()
    started, t0 = _now(), time.perf_counter()
    receive, send = mp.Pipe(duplex=False)
    proc = mp.Process(target=_case_process, args=(case, ctx, send), name=f"infermatrix case {case.case_id}")
    proc.start()
    send.close()
    try:
        if receive.poll(ctx.settings.timeout_s):
            try:
                return Record.from_dict(receive.recv())
            except EOFError:
                pass  # the process died without a record: reported below
        else:
            proc.kill()
            proc.join()
            return _record(case, ctx, "failed", f"timed out after {ctx.settings.timeout_s:g} s (killed)",
                           started, time.perf_counter() - t0)
    except KeyboardInterrupt:  # also when only this process was signalled: the case ends with the run
        proc.kill()
        raise
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        receive.close()
    return _record(case, ctx, "failed", exit_reason(proc.exitcode), started, time.perf_counter() - t0)


def exit_reason(code: int | None) -> str:
    """Why a case process ended without a record, from its exit code."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"case process crashed with {name}{hint}"
    return f"case process exited with status {code} without a record"


def check_eval_text(matrix: Matrix, eval_text_path: str | None) -> None:
    """Before any case runs: each drift case's model must find enough tokens in the
    eval text for its windows."""
    drift = [c for c in matrix.cases if c.workload == "drift"]
    if not drift:
        return
    from infermatrix.weights import model_tokenizer

    text = load_text(eval_text_path)
    counts: dict[str, int] = {}
    for case in drift:
        if model_config(case.model).kind == "encoder":
            continue  # its passages are sentences, wrapping around a short text
        tokenizer = model_tokenizer(case.model)
        if tokenizer is None:
            continue  # random-weight presets evaluate on seeded random tokens
        if case.model not in counts:
            counts[case.model] = len(tokenizer.encode(text).ids)
        need = case.windows * (case.prompt_len + 1)
        if counts[case.model] < need:
            raise UserError(
                f"eval text has {counts[case.model]} tokens for {case.model}; {case.case_id} needs {need} "
                f"({case.windows} windows of {case.prompt_len}+1); pass a longer --eval-text or fewer/smaller windows"
            )


def execute_case(case: Case, ctx: RunContext, models: ModelCache | None = None) -> Record:
    """One case on this machine, as every executor runs it: skipped when this machine
    cannot run it, else in its own process or in this one, per [run] isolate."""
    reason = skip_reason(case)
    if reason:
        return _record(case, ctx, "skipped", reason)
    if ctx.settings.isolate:
        return run_case_isolated(case, ctx)
    return run_case(case, ctx, models if models is not None else ModelCache(ctx.settings.seed))


# An executor takes the cases to run, the run's context and a callback for the case it
# starts next, and yields each case's Record as it finishes, in any order; the driver
# (run_matrix) appends it to records.jsonl at once.
Executor = Callable[[list[Case], RunContext, Callable[[Case], None]], Iterator[Record]]


def execute_local(cases: list[Case], ctx: RunContext, on_start: Callable[[Case], None]) -> Iterator[Record]:
    """One case after another on this machine; in-process runs share loaded models."""
    models = ModelCache(ctx.settings.seed)
    for case in cases:
        on_start(case)
        yield execute_case(case, ctx, models)


def peak_dtypes(matrix: Matrix) -> dict[str, tuple[str, ...]]:
    """Device type -> the dtypes of the whole matrix's cases on it, a shard's included."""
    pairs = (matrix.shard.device_dtypes if matrix.shard else ()) or device_dtypes(matrix.cases)
    return {kind: tuple(sorted(d for k, d in pairs if k == kind)) for kind in sorted({k for k, _ in pairs})}


def measure_peaks(todo, dtypes: dict[str, tuple[str, ...]], log: Callable[[str], None] = print) -> dict[str, Peaks]:
    """This machine's peaks for each device type the cases to do use, over `dtypes`, the
    dtypes of all the matrix's cases of that type (one cache key, whatever share runs here)."""
    peaks = {}
    for kind in sorted({torch.device(c.device).type for c in todo}):
        if kind == "cpu" or torch.cuda.is_available():
            log(f"machine peaks ({kind}, {', '.join(dtypes[kind])}): measured once per machine, then cached")
            peaks[kind] = load_or_measure_peaks(kind, dtypes[kind])
    return peaks


def run_context(matrix: Matrix, todo: list[Case], eval_text: str | None, log: Callable[[str], None] = print,
                *, local_peaks: bool = True) -> RunContext:
    """What the cases to do share: the environment (with the eval text, the [run]
    settings, the matrix's hash and shard) and, when they run here, this machine's peaks."""
    env = capture_env()
    env["eval_text"] = {"path": eval_text or "pydoc_data.topics", "sha256": text_sha256(load_text(eval_text))}
    env["settings"] = asdict(matrix.settings)  # timing rules, isolation and the seed of every case
    if matrix.text is not None:  # `infermatrix merge` checks that shards ran the same matrix
        env["matrix_sha256"] = matrix_sha256(matrix.text)
    if matrix.shard is not None:
        env["shard"] = asdict(matrix.shard)
    dtypes = peak_dtypes(matrix)
    peaks = measure_peaks(todo, dtypes, log) if local_peaks else {}
    env["peaks"] = {kind: p.to_dict() for kind, p in peaks.items()}
    return RunContext(matrix.settings, env, eval_text, peaks, dtypes)


def run_matrix(matrix: Matrix, out_dir: Path, *, resume: bool = False, eval_text: str | None = None,
               log: Callable[[str], None] = print, progress: bool = False,
               executor: Executor | None = None) -> list[Record]:
    """Run the matrix's cases not yet recorded in out_dir; `executor` (default: this
    machine, one case at a time) decides where each runs."""
    out_dir = Path(out_dir)
    records_path = out_dir / RECORDS_FILE
    done: list[Record] = []
    if records_path.exists() and records_path.stat().st_size:
        if not resume:
            raise UserError(f"--out {out_dir} already holds {RECORDS_FILE}; choose a new folder or pass --resume")
        done = read_records(records_path)
        _check_resumable(done, matrix, out_dir)
    if matrix.settings.interleave and (executor is not None or matrix.shard is not None):
        raise UserError("[run] interleave = true takes turns among a group's cases on one machine; it cannot "
                        f"run {'on another executor' if executor is not None else 'a shard'}: set interleave = "
                        "false, or run the whole matrix locally")
    check_eval_text(matrix, eval_text)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path.touch()  # a shard with no cases is still a run folder that merge can read
    if matrix.text is not None and not (out_dir / MATRIX_COPY).exists():
        (out_dir / MATRIX_COPY).write_text(matrix.text, encoding="utf-8")
    todo = todo_cases(matrix, done)
    # a remote executor's workers measure their own machines' peaks
    ctx = run_context(matrix, todo, eval_text, log, local_peaks=executor is None)
    env = ctx.env
    if done:
        log(f"resuming: {len(done)} cases already recorded, {len(todo)} to run")
    records = list(done)
    bar = _progress_bar(len(todo)) if progress else None

    def on_start(case: Case) -> None:
        if bar is not None:
            bar.set_postfix_str(case.case_id, refresh=True)

    if matrix.settings.interleave and executor is None:
        from infermatrix.bench.interleave import execute_interleaved

        executor = execute_interleaved
    results = (executor or execute_local)(todo, ctx, on_start)
    try:
        for i, rec in enumerate(results, 1):
            rec.baseline_id = matrix.baselines.get(rec.case_id)
            append_record(records_path, rec)
            records.append(rec)
            figure = _headline(rec)
            line = f"[{i}/{len(todo)}] {rec.case_id}: {rec.status} ({figure})"
            if bar is not None:
                bar.write(line)
                bar.update(1)
            else:
                log(line)
    finally:  # an interrupted run still gets the reports of what it measured
        getattr(results, "close", lambda: None)()  # an executor stops (and cancels what still runs)
        if bar is not None:
            bar.close()
        try:  # results.csv first, then JSON, Markdown and HTML
            write_reports(Run(records, str(out_dir), env, matrix.text, out_dir), out_dir)
        except Exception as exc:  # the records are safe on disk; `infermatrix report` can retry
            log(f"warning: reports not written ({type(exc).__name__}: {exc}); run `infermatrix report {out_dir}`")
    return records


def _check_resumable(done: list[Record], matrix: Matrix, out_dir: Path) -> None:
    """--resume must continue the same share of the matrix (a whole matrix counts as its
    own share) that the folder began with, and a shard the same matrix file: an edited
    file splits differently. A whole run may resume from an edited file (to add cases)."""
    first = next((r.env for r in done if r.env), None)
    if first is None:
        return
    sha = matrix_sha256(matrix.text) if matrix.text is not None else None
    sharded = first.get("shard") or matrix.shard
    if sharded and first.get("matrix_sha256") and sha and first["matrix_sha256"] != sha:
        raise UserError(f"{out_dir} holds a shard run from another version of the matrix file (sha256 "
                        f"{first['matrix_sha256'][:12]}, now {sha[:12]}), which splits differently; resume with "
                        "the file it began with, or choose a new --out folder")
    before = first.get("shard")
    was = f"{before['index']}/{before['count']}" if before else None
    now = f"{matrix.shard.index}/{matrix.shard.count}" if matrix.shard else None
    if was != now:
        asked = f"--shard {now}" if now else "no --shard"
        held, fix = (f"shard {was}", f"with --shard {was}") if was else ("the whole matrix", "without --shard")
        raise UserError(f"--resume with {asked}: {out_dir} holds {held}; resume it {fix}, "
                        "or choose a new --out folder")


def todo_cases(matrix: Matrix, done: list[Record]) -> list[Case]:
    finished = {r.case_id for r in done}
    return [c for c in _grouped(matrix.cases) if c.case_id not in finished]


def _headline(rec: Record) -> str:
    if rec.status != "ok":
        return rec.reason or ""
    m = rec.metrics
    if "latency_ms_p50" in m:
        return f"{m['latency_ms_p50']:.3f} ms"
    if "kl_mean" in m:
        return f"KL {m['kl_mean']:.2e}, top-1 {m['top1_agree_pct']:.1f}%"
    if "hidden_cosine_mean" in m:
        return f"hidden cos {m['hidden_cosine_mean']:.8f}, SQNR {m['hidden_sqnr_db']:.1f} dB"
    return "done"


def _grouped(cases: tuple[Case, ...]) -> list[Case]:
    """Cases grouped by (model, device, dtype), groups in the file's order, so an
    in-process run loads each model once."""
    first_seen: dict[tuple, int] = {}
    for c in cases:
        first_seen.setdefault((c.model, c.device, c.dtype), len(first_seen))
    return sorted(cases, key=lambda c: first_seen[(c.model, c.device, c.dtype)])


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="case", dynamic_ncols=True, bar_format=(
        "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}"))
