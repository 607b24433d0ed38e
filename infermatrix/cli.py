"""The `infermatrix` command: thin, it parses and calls bench/ and reports/."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from infermatrix.errors import UserError

EPILOG = "Bad input exits with status 2 and one line saying what was wrong."


def _cmd_run(args: argparse.Namespace) -> int:
    from infermatrix.bench.matrix import load_matrix
    from infermatrix.bench.runner import run_matrix
    from infermatrix.reports.table import render_table

    overrides = {key: value for key, value in (("isolate", args.isolate), ("timeout_s", args.timeout),
                                                ("max_time_s", args.max_time)) if value is not None}
    matrix = load_matrix(args.matrix, overrides)
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the run folder to continue")
    out = Path(args.out) if args.out else Path("results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    print(f"infermatrix: {len(matrix.cases)} cases from {matrix.source} -> {out}", flush=True)
    records = run_matrix(matrix, out, resume=args.resume, eval_text=args.eval_text,
                         log=lambda line: print(line, flush=True), progress=sys.stderr.isatty() and not args.quiet)
    print()
    print(render_table(records))
    print(f"\nwrote {out / 'records.jsonl'} and {out / 'results.csv'}")
    failed = sum(r.status == "failed" for r in records)
    return 1 if failed else 0


def _cmd_env(args: argparse.Namespace) -> int:
    import json

    import torch

    from infermatrix.bench.env import capture_env
    from infermatrix.bench.roofline import load_or_measure_peaks

    from infermatrix.weights import parse_dtype

    dtypes = tuple(d.strip() for d in args.dtypes.split(","))
    for name in dtypes:
        parse_dtype(name)  # a UserError naming the valid dtypes
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r} is not valid; valid: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device on this machine")
    env = capture_env()
    peaks = load_or_measure_peaks(device, dtypes)
    print(json.dumps({"env": env, "peaks": peaks.to_dict()}, indent=2, default=str))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    import torch

    from infermatrix.model import SHAPE_PRESETS
    from infermatrix.variants import AXES, missing_requirements, registered_variants
    from infermatrix.weights import REAL_PRESETS, smollm2_path

    if args.axis and args.axis not in AXES:
        raise UserError(f"unknown axis {args.axis!r}; valid: {', '.join(AXES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"variants (availability on this machine's {device}):")
    for name, cls in registered_variants().items():
        if args.axis and cls.axis != args.axis:
            continue
        reasons = missing_requirements(cls.requires, device)
        status = f"unavailable: {'; '.join(reasons)}" if reasons else "available"
        print(f"  {name:<20} axis={cls.axis:<10} {status:<28} {cls.description}")
    if args.axis:
        return 0
    print("\nmodels:")
    for name, about in REAL_PRESETS.items():
        try:
            smollm2_path()
            status = "available"
        except UserError as exc:
            status = f"unavailable: {exc}"
        print(f"  {name:<20} real weights       {status}; {about}")
    for name, cfg in SHAPE_PRESETS.items():
        params = cfg.num_params()
        print(f"  {name:<20} random weights     available; {params:,} params, "
              f"{params * 2 / 2**30:.2f} GiB in bfloat16")
    print("  PATH.gguf / DIR      a Llama GGUF file or a Hugging Face Llama checkpoint folder")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infermatrix",
        description="Benchmark Transformer inference optimizations: latency, throughput, memory and "
                    "accuracy drift against a reference, in one record per case.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run", help="run a benchmark matrix and write a run folder",
        description="Expand a matrix TOML file into cases, run each (a failing case becomes a failed "
                    "record; the run goes on) and write records.jsonl and results.csv.",
        epilog="Examples: infermatrix run; infermatrix run ci --out results/smoke; "
               "infermatrix run my_matrix.toml",
    )
    run.add_argument("matrix", nargs="?",
                     help="matrix TOML file, or a built-in matrix name: default (the default), ci")
    run.add_argument("--out", metavar="DIR", help="run folder to create (default: results/<timestamp>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out DIR: cases that already have a record are not run again")
    run.add_argument("--eval-text", metavar="FILE",
                     help="UTF-8 text for the drift workload (default: the standard library's pydoc topics)")
    run.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                     help="run each case in its own process (default: the matrix's [run] isolate, true)")
    run.add_argument("--timeout", type=float, metavar="S", help="seconds a case may take when isolated")
    run.add_argument("--max-time", type=float, metavar="S", help="time cap per measurement (adaptive repetition)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    run.set_defaults(func=_cmd_run)

    env = sub.add_parser(
        "env", help="print this machine's environment and measured peaks",
        description="Print versions, CPU/GPU, threads and pinning, and the memory bandwidth and GEMM "
                    "FLOP/s peaks the roofline figures use (measured once per machine, then cached).",
    )
    env.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    env.add_argument("--dtypes", default="float32,bfloat16", help="GEMM dtypes to measure (comma-separated)")
    env.set_defaults(func=_cmd_env)

    lst = sub.add_parser(
        "list", help="list variants and models, with availability on this machine",
        description="List registered variants (built-in and plugins) and model presets, and say why "
                    "any is unavailable here.",
    )
    lst.add_argument("--axis", help="only variants on this axis (linear, attention, cache, graph)")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"infermatrix: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("infermatrix: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
