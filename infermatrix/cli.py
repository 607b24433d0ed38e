"""The `infermatrix` command: thin, it parses and calls bench/ and reports/.

Each subcommand is a pair that sits together: `_add_<name>(sub)` declares its
arguments and `_cmd_<name>(args)` runs it; `build_parser` lists the pairs in the
order `--help` shows them. Heavy imports (torch, scipy) happen inside the handlers,
so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from infermatrix.errors import UserError

EPILOG = "Bad input exits with status 2 and one line saying what was wrong."


def _log(line: str) -> None:
    print(line, flush=True)


def _timestamped(prefix: str = "") -> Path:
    """The default folder of a new run: results/<prefix><date-time>."""
    return Path("results") / (prefix + datetime.now().strftime("%Y%m%d-%H%M%S"))


def _given_rules(args: argparse.Namespace) -> list[str]:
    """The rules given on the command line: each --fail, then those of --rules FILE."""
    from infermatrix.reports.gate import read_rules_file

    rules = list(args.fail or [])
    if args.rules:
        rules += read_rules_file(Path(args.rules))
    return rules


def _subcommand(sub, name: str, handler, **parser_options) -> argparse.ArgumentParser:
    """A subcommand's parser, bound to the handler that runs it."""
    parser = sub.add_parser(name, **parser_options)
    parser.set_defaults(func=handler)
    return parser


# run ------------------------------------------------------------------------------


def _add_run(sub) -> None:
    run = _subcommand(
        sub, "run", _cmd_run, help="run a benchmark matrix and write a run folder",
        description="Expand a matrix TOML file into cases, run each (a failing case becomes a failed "
                    "record; the run goes on) and write records.jsonl and results.csv.",
        epilog="Examples: infermatrix run; infermatrix run ci --out results/smoke; "
               "infermatrix run my_matrix.toml",
    )
    from infermatrix.bench.shipped import builtin_matrices  # torch-free: the help stays fast

    run.add_argument("matrix", nargs="?",
                     help="matrix TOML file, or a built-in matrix name: "
                          f"{', '.join(sorted(builtin_matrices()))} (default: default)")
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
    run.add_argument("--shard", metavar="K/N",
                     help="run only the K-th of N shares of the cases (K from 1): the split depends on the set "
                          "of cases alone and balances their estimated cost; join the runs with `merge`")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: one case after another on this machine (default); ray: each case a Ray task "
                          "(pip install 'infermatrix[ray]')")
    run.add_argument("--address", metavar="ADDR",
                     help="Ray cluster to use, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, else a "
                          "local cluster, else start one)")
    run.add_argument("--cpus-per-case", type=float, metavar="N",
                     help="Ray: CPUs each CPU case asks for (default: a whole node, so timings do not share cores)")


def _cmd_run(args: argparse.Namespace) -> int:
    from infermatrix.bench.matrix import load_matrix
    from infermatrix.bench.runner import run_matrix
    from infermatrix.reports.table import render_table

    overrides = {key: value for key, value in (("isolate", args.isolate), ("timeout_s", args.timeout),
                                                ("max_time_s", args.max_time)) if value is not None}
    shard = None
    if args.shard is not None:
        from infermatrix.bench.shard import parse_shard

        shard = parse_shard(args.shard)  # bad K/N is refused before the matrix is read
    if args.executor != "ray" and (args.address or args.cpus_per_case):
        raise UserError("--address and --cpus-per-case need --executor ray")
    executor = None
    if args.executor == "ray":
        from infermatrix.bench.ray_executor import RayExecutor

        executor = RayExecutor(args.address, args.cpus_per_case, log=_log)
    matrix = load_matrix(args.matrix, overrides)
    if args.resume and not args.out:
        raise UserError("--resume needs --out DIR: the run folder to continue")
    out = Path(args.out) if args.out else _timestamped()
    if executor is not None:
        executor.connect()  # a cluster that cannot be reached is refused before the run folder is made
    share = ""
    if shard is not None:
        from infermatrix.bench.shard import shard_matrix, share_note

        share = f" ({share_note(matrix, *shard)})"
        matrix = shard_matrix(matrix, *shard)
    print(f"infermatrix: {len(matrix.cases)} cases{share} from {matrix.source} -> {out}", flush=True)
    try:
        records = run_matrix(matrix, out, resume=args.resume, eval_text=args.eval_text, log=_log,
                             progress=sys.stderr.isatty() and not args.quiet, executor=executor)
    except KeyboardInterrupt:  # Ctrl-C: what is recorded stays, and the run can go on from there
        print(f"infermatrix: interrupted: {_recorded_cases(out)} of {len(matrix.cases)} cases recorded in {out}; "
              f"continue with: {_resume_command(args, out)}", file=sys.stderr)
        return 130
    print()
    print(render_table(records))
    print(f"\nwrote {out / 'records.jsonl'} and {out / 'results.csv'}")
    failed = sum(r.status == "failed" for r in records)
    return 1 if failed else 0


def _recorded_cases(out: Path) -> int:
    """The records in a run folder's records.jsonl: what `--resume` will not run again."""
    from infermatrix.reports.record import RECORDS_FILE, parse_records

    path = out / RECORDS_FILE
    return len(parse_records(path)[0]) if path.is_file() else 0


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The `infermatrix run` command that continues this run: its matrix, folder and
    every option given that decides which cases run and how."""
    import shlex

    words = ["infermatrix", "run", *([args.matrix] if args.matrix else []), "--out", str(out)]
    for option, value in (("--eval-text", args.eval_text), ("--timeout", args.timeout),
                          ("--max-time", args.max_time), ("--shard", args.shard), ("--address", args.address),
                          ("--cpus-per-case", args.cpus_per_case)):
        if value is not None:
            words += [option, f"{value:g}" if isinstance(value, float) else value]
    if args.isolate is not None:
        words.append("--isolate" if args.isolate else "--no-isolate")
    if args.executor != "local":
        words += ["--executor", args.executor]
    if args.quiet:
        words.append("-q")
    return shlex.join([*words, "--resume"])


# merge ----------------------------------------------------------------------------


def _add_merge(sub) -> None:
    merge = _subcommand(
        sub, "merge", _cmd_merge, help="combine the runs of one matrix's shards into one run folder",
        description="Join the records of runs made from the same matrix file (e.g. `run --shard K/N`) into one "
                    "run folder and write its reports; each record keeps the environment it was measured in. "
                    "Duplicate and conflicting records, missing cases and different [run] settings are reported.",
        epilog="Example: infermatrix merge shards/* --out results/full && infermatrix gate results/base results/full",
    )
    merge.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or records .jsonl / results .json files)")
    merge.add_argument("--out", metavar="DIR", required=True, help="the merged run folder to create")
    merge.add_argument("--force", action="store_true",
                       help="merge even runs made from different (or unknown) matrix files")


def _cmd_merge(args: argparse.Namespace) -> int:
    from infermatrix.reports.merge import merge_runs, write_merged
    from infermatrix.reports.run import load_run

    out = Path(args.out)
    for source in args.runs:
        if Path(source).resolve() == out.resolve():
            raise UserError(f"--out {out} is one of the runs to merge; choose a new folder for the merged run")
    merged = merge_runs([load_run(source) for source in args.runs], force=args.force)
    for line in merged.warnings:
        print(f"warning: {line}")
    if merged.duplicates:
        more = f" and {len(merged.duplicates) - 10} more" if len(merged.duplicates) > 10 else ""
        print(f"{len(merged.duplicates)} duplicate records (identical, kept once): "
              f"{', '.join(merged.duplicates[:10])}{more}")
    for line in merged.conflicts:
        print(f"conflict: {line}")
    paths = write_merged(merged, out)
    print(f"merged {len(merged.records)} cases from {len(args.runs)} runs -> {out}")
    for path in paths:
        print(f"wrote {path}")
    return 0


# report ---------------------------------------------------------------------------


def _add_report(sub) -> None:
    report = _subcommand(
        sub, "report", _cmd_report, help="write results.csv, results.json, summary.md and report.html of a run",
        description="Render a run's records (a run folder, a records .jsonl, a results.json or pytest-benchmark "
                    "JSON) as CSV, JSON, Markdown and one self-contained HTML file. `run` does this at its end.",
    )
    report.add_argument("run", help="run folder or records file")
    report.add_argument("--out", metavar="DIR", help="where to write (default: the run folder)")


def _cmd_report(args: argparse.Namespace) -> int:
    from infermatrix.reports.run import load_nonempty_run, write_reports
    from infermatrix.reports.table import render_table

    run = load_nonempty_run(args.run, "report")
    out = Path(args.out) if args.out else run.folder
    if out is None:
        raise UserError(f"{args.run} is a file, not a run folder; pass --out DIR for the reports")
    print(render_table(run.records))
    for path in write_reports(run, out):
        print(f"wrote {path}")
    return 0


# compare --------------------------------------------------------------------------


def _add_compare(sub) -> None:
    compare = _subcommand(
        sub, "compare", _cmd_compare, help="compare two runs case by case, with significance tests",
        description="Match cases by id; speed metrics as ratios NEW/BASE with confidence intervals from the raw "
                    "samples, marked significant only when a Mann-Whitney U test says so (else ~); accuracy "
                    "metrics as differences; cases in one run only are listed.",
    )
    compare.add_argument("base", help="BASE run folder or records file")
    compare.add_argument("new", help="NEW run folder or records file")
    compare.add_argument("--md", metavar="OUT", help="also write the comparison as Markdown")
    compare.add_argument("--html", metavar="OUT", help="also write the comparison as HTML")
    compare.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")


def _cmd_compare(args: argparse.Namespace) -> int:
    from infermatrix.reports.compare import (compare_runs, render_compare_html, render_compare_markdown,
                                             render_compare_text)
    from infermatrix.reports.run import load_nonempty_run

    base, new = load_nonempty_run(args.base, "compare"), load_nonempty_run(args.new, "compare")
    comparison = compare_runs(base.records, new.records, alpha=args.alpha)
    print(render_compare_text(comparison))
    for option, render in ((args.md, render_compare_markdown), (args.html, render_compare_html)):
        if option:
            Path(option).write_text(render(comparison), encoding="utf-8")
            print(f"wrote {option}")
    return 0


# gate -----------------------------------------------------------------------------


def _add_gate(sub) -> None:
    gate = _subcommand(
        sub, "gate", _cmd_gate, help="fail (exit 1) on a significant regression of speed or a breach of accuracy bounds",
        description="Apply rules METRIC:BOUND with an optional case filter, e.g. tokens_per_s:-5%%, "
                    "latency_ms_p50:+5%%, top1_agree:>=99%%, ppl_delta_pct:<=1, variant=int8_*:kl_mean:<=0.01. "
                    "Rules come from --fail/--rules, else the NEW run's matrix [gate] table, else the defaults. "
                    "A speed change fails only when beyond the threshold AND significant; accuracy bounds are "
                    "absolute; a case ok in BASE and failed or missing in NEW fails. Exit 0 pass, 1 regression, "
                    "2 bad input; the verdict goes to $GITHUB_STEP_SUMMARY when set. For stored runs (a nightly "
                    "against today's); to gate a code change, `infermatrix ab` measures both versions interleaved "
                    "and sees far smaller regressions than two runs made minutes apart.",
    )
    gate.add_argument("base", help="BASE run folder or records file")
    gate.add_argument("new", help="NEW run folder or records file")
    gate.add_argument("--rules", metavar="FILE", help="rules file: TOML with [gate] rules = [...], or one rule per line")
    gate.add_argument("--fail", metavar="RULE", action="append", help="a rule (repeatable)")
    gate.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    gate.add_argument("--calibrate", action="store_true",
                      help="treat BASE and NEW as an A/A pair (same code, same machine): print the noise floor "
                           "and suggested thresholds instead of a verdict")


def _cmd_gate(args: argparse.Namespace) -> int:
    from infermatrix.reports.gate import (RuleError, calibrate, evaluate, parse_rule, render_calibration,
                                          select_rules, write_step_summary)
    from infermatrix.reports.run import load_nonempty_run

    base, new = load_nonempty_run(args.base, "gate"), load_nonempty_run(args.new, "gate")
    if args.calibrate:
        print(render_calibration(calibrate(base.records, new.records)))
        return 0
    rules, origin = select_rules(_given_rules(args), new.matrix_text)
    try:
        parsed = [parse_rule(rule) for rule in rules]
    except RuleError as exc:
        raise UserError(f"gate rule: {exc}") from None
    result = evaluate(base.records, new.records, parsed, alpha=args.alpha)
    print(f"gate: {len(parsed)} rules from {origin}, {result.checked} checks")
    for failure in result.failures:
        print(f"FAIL {failure}")
    print("gate: PASS" if result.passed else f"gate: FAIL ({len(result.failures)} regressions)")
    write_step_summary(result.markdown)
    return 0 if result.passed else 1


# ab -------------------------------------------------------------------------------


def _add_ab(sub) -> None:
    ab = _subcommand(
        sub, "ab", _cmd_ab, help="measure two versions of the code interleaved on this machine, and gate on paired ratios",
        description="Run every case of MATRIX for BASE and NEW alternately, in rounds of short turns (ABBA order, "
                    "the starting side drawn at random), each turn a fresh case process, forked from one template "
                    "shared by both sides, that imports its side's code. BASE and NEW are git refs (checked out into temporary "
                    "worktrees) or source folders, of infermatrix itself or of a variant plugin package. Speed "
                    "rules are judged on the paired per-round ratios (Hodges-Lehmann interval, Benjamini-Hochberg "
                    "across cases): regression, improvement, unchanged or inconclusive; other rules and case "
                    "statuses as in `gate`. Writes OUT/base and OUT/new (run folders) and OUT/ab.{json,md,html}. "
                    "Exit 0 pass, 1 regression or a case failing on one side, 2 bad input.",
        epilog="Examples: infermatrix ab HEAD~1 HEAD; infermatrix ab origin/main . ci --fail latency_ms_p50:+3%%; "
               "infermatrix ab ../plugin-main ../plugin-pr my.toml",
    )
    ab.add_argument("base", metavar="BASE", help="git ref (branch, tag, commit, HEAD~1) or source folder")
    ab.add_argument("new", metavar="NEW", help="git ref or source folder ('.' is the working tree)")
    ab.add_argument("matrix", nargs="?", help="matrix TOML file, or a built-in name each side reads its own of "
                                              "(default: default)")
    ab.add_argument("--out", metavar="DIR", help="new folder for the A/B run (default: results/ab-<time>)")
    ab.add_argument("--fail", metavar="RULE", action="append",
                    help="a gate rule (repeatable); default: the NEW matrix's [gate] rules, else latency_ms_p50:+5%%, "
                         "tokens_per_s:-5%% and the gate's accuracy bounds")
    ab.add_argument("--rules", metavar="FILE", help="rules file, as for gate")
    ab.add_argument("--alpha", type=float, default=0.05, help="false-discovery rate (default 0.05)")
    ab.add_argument("--repo", metavar="DIR", help="git repository the refs belong to (default: the current one)")
    ab.add_argument("--eval-text", metavar="FILE", help="UTF-8 text for prompts and drift, as for run")
    ab.add_argument("--timeout", type=float, metavar="S", help="seconds a case may take on one side")
    ab.add_argument("--md", metavar="OUT", help="also write the verdict as Markdown here")
    ab.add_argument("--html", metavar="OUT", help="also write the verdict as HTML here")
    ab.add_argument("--shard", metavar="K/N", help=argparse.SUPPRESS)  # refused with a reason
    _add_interleave_options(ab)


def _add_interleave_options(parser: argparse.ArgumentParser) -> None:
    """How long `ab` (and `calibrate --interleaved`) interleave each case."""
    parser.add_argument("--turn", dest="turn_s", type=float, metavar="S",
                        help="seconds of sampling per turn, each in a fresh case process (default 0.3; at "
                             "least one sample)")
    parser.add_argument("--min-rounds", type=int, metavar="N", help="rounds before stopping (default 8)")
    parser.add_argument("--max-rounds", type=int, metavar="N", help="rounds at most (default 20)")
    parser.add_argument("--target-ci", type=float, metavar="F",
                        help="stop once the paired ratio's 95%% interval is within ±F (default 0.02)")
    parser.add_argument("--max-time", dest="max_time_s", type=float, metavar="S",
                        help="seconds of turns per side and case after --min-rounds (default: the matrix's "
                             "max_time_s)")
    parser.add_argument("--seed", type=int, help="seed of the starting sides (default: drawn and recorded)")
    parser.add_argument("--only", metavar="FILTER", action="append",
                        help="only the cases matching field=glob[,field=glob...] (repeatable: any of them), "
                             "e.g. --only workload=prefill --only workload=attention")


def _cmd_ab(args: argparse.Namespace) -> int:
    from infermatrix.bench.ab import ab_header
    from infermatrix.reports.ab import render_ab_html, render_ab_markdown, render_ab_text
    from infermatrix.reports.gate import write_step_summary

    if args.shard is not None:
        raise UserError("ab does not take --shard: both sides of a case must run on one machine, moments apart; "
                        "split the matrix into smaller files and run ab on each instead")
    rules = _given_rules(args)
    out = Path(args.out) if args.out else _timestamped("ab-")
    run, result, origin = _run_ab(args.base, args.new, args, out, rules)
    print()
    print(render_ab_text(result, f"{ab_header(run)} · {len(result.rules)} rules from {origin}"))
    for option, render in ((args.md, render_ab_markdown), (args.html, render_ab_html)):
        if option:
            Path(option).write_text(render(result, ab_header(run)), encoding="utf-8")
            print(f"wrote {option}")
    print(f"wrote {out / 'base'}, {out / 'new'} (run folders) and {out / 'ab.md'}, {out / 'ab.html'}, "
          f"{out / 'ab.json'}")
    write_step_summary(render_ab_markdown(result, ab_header(run)))
    return 0 if result.passed else 1


def _ab_settings(args: argparse.Namespace):
    from infermatrix.bench.ab import AbSettings

    given = {key: getattr(args, key) for key in ("turn_s", "min_rounds", "max_rounds", "target_ci", "max_time_s",
                                                 "seed", "alpha") if getattr(args, key, None) is not None}
    return AbSettings(**given)


def _run_ab(base: str, new: str, args: argparse.Namespace, out: Path, rules: list[str]):
    """Run an interleaved A/B and judge it by `rules`, or when there are none by the
    NEW side's matrix [gate] rules, else the A/B defaults; returns (the run, its
    result, where the rules came from)."""
    from infermatrix.bench.ab import run_ab, write_ab_reports
    from infermatrix.reports.ab import AB_DEFAULT_RULES, evaluate_ab
    from infermatrix.reports.gate import RuleError, parse_rule, select_rules
    from infermatrix.reports.run import MATRIX_COPY

    try:
        parsed = [parse_rule(rule) for rule in rules]  # bad rules are refused before anything runs
    except RuleError as exc:
        raise UserError(f"rule: {exc}") from None
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {args.alpha}")
    overrides = {"timeout_s": args.timeout} if args.timeout is not None else {}
    run = run_ab(base, new, args.matrix, out, settings=_ab_settings(args), repo=args.repo,
                 eval_text=args.eval_text, overrides=overrides, only=args.only, log=_log)
    if not rules:  # the NEW side's matrix copy exists only now
        copy = out / "new" / MATRIX_COPY
        rules, origin = select_rules([], copy.read_text(encoding="utf-8") if copy.exists() else None,
                                     AB_DEFAULT_RULES, matrix_origin="the matrix [gate]",
                                     defaults_origin="A/B defaults")
        parsed = [parse_rule(rule) for rule in rules]
    else:
        origin = "command line"
    result = evaluate_ab(run.records["base"], run.records["new"], parsed, alpha=args.alpha)
    write_ab_reports(run, result)
    return run, result, origin


# calibrate ------------------------------------------------------------------------


def _add_calibrate(sub) -> None:
    cal = _subcommand(
        sub, "calibrate", _cmd_calibrate, help="run a matrix twice (A/A) and suggest gate thresholds from this machine's noise",
        description="Run the same matrix twice and compare the runs: every difference is noise. Prints each "
                    "metric's noise floor and a threshold that would not have fired.",
    )
    cal.add_argument("matrix", nargs="?", help="matrix TOML file or built-in name (default: default)")
    cal.add_argument("--out", metavar="DIR", help="folder for the two runs (default: results/calibrate-<time>)")
    cal.add_argument("--interleaved", action="store_true",
                     help="A/A the way `ab` measures: this code on both sides, interleaved in rounds; prints the "
                          "change each case could detect")
    _add_interleave_options(cal)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from infermatrix.bench.matrix import load_matrix
    from infermatrix.bench.runner import run_matrix
    from infermatrix.reports.gate import calibrate, render_calibration

    out = Path(args.out) if args.out else _timestamped("calibrate-")
    if args.interleaved:  # the same code on both sides, interleaved: the paired noise floor
        import infermatrix
        from infermatrix.reports.ab import render_ab_calibration

        source = str(Path(infermatrix.__file__).resolve().parent.parent)
        args.repo, args.eval_text, args.timeout, args.alpha = None, None, None, 0.05
        _, result, _ = _run_ab(source, source, args, out, ["latency_ms_p50:+5%"])
        print(render_ab_calibration(result))
        return 0
    matrix = load_matrix(args.matrix)
    runs = []
    for name in ("a", "b"):  # the same matrix twice: every difference is noise
        print(f"infermatrix: A/A run {name} of {len(matrix.cases)} cases -> {out / name}", flush=True)
        runs.append(run_matrix(matrix, out / name, log=_log))
    print(render_calibration(calibrate(*runs)))
    return 0


# history --------------------------------------------------------------------------


def _add_history(sub) -> None:
    history = _subcommand(
        sub, "history", _cmd_history, help="keep runs across commits in SQLite; show trends, find change points",
        description="A history of runs across commits: `add` stores runs' records in a SQLite file (keyed by case "
                    "id, git SHA, date and host; adding a run again adds nothing), `show` prints each case's "
                    "trend, `check` fits change points per case and exits 1 when the latest level is worse than "
                    "an earlier one by more than the threshold (a step, or a creep of small steps), and `report` "
                    "writes an offline HTML page with a chart per case.",
        epilog="Example: infermatrix history add results/nightly && infermatrix history check --threshold 5%",
    )
    actions = history.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="store the records of runs")
    add.add_argument("runs", nargs="+", metavar="RUN", help="run folders (or records .jsonl / results .json files)")
    add.add_argument("--host", metavar="NAME",
                     help="file the records under this machine name instead of the host they record (a series "
                          "is one case on one host; hosted CI runners get a new host name every run, so name "
                          "the runner type, e.g. --host gha-ubuntu-latest)")
    show = actions.add_parser("show", help="print each case's metric by commit, with the change against the previous")
    check = actions.add_parser("check", help="exit 1 when a case's latest level regressed beyond the threshold")
    report = actions.add_parser("report", help="write an offline HTML page, a chart per case")
    report.add_argument("--html", metavar="OUT", required=True, help="the HTML file to write")
    for parser in (add, show, check, report):
        parser.add_argument("--db", metavar="FILE", default=None,
                            help="the history database (default: .infermatrix/history.sqlite in this folder)")
    for parser in (show, check, report):
        parser.add_argument("--case", metavar="GLOB", help="only case ids matching this glob, e.g. '*prefill*'")
        parser.add_argument("--metric", metavar="M", default=None,
                            help="the metric to follow (default: latency_ms_p50)")
    for parser in (check, report):
        parser.add_argument("--threshold", metavar="PCT", default="5%",
                            help="a regression is a level worse than an earlier one by more than this (default 5%%)")


def _cmd_history(args: argparse.Namespace) -> int:
    from infermatrix.reports import history

    db = Path(args.db) if args.db else history.DEFAULT_DB
    threshold = history.parse_threshold(args.threshold) if args.action in ("check", "report") else None
    conn = history.open_db(db, create=args.action == "add")
    try:
        if args.action == "add":
            return _history_add(conn, args.runs, db, args.host)
        series = history.load_series(history.stored_records(conn), history.resolve_metric(
            args.metric or history.DEFAULT_METRIC), args.case)
    finally:
        conn.close()
    if args.action == "show":
        print(history.render_show(series))
        return 0
    verdicts = [history.judge(s, threshold) for s in series]
    if args.action == "report":
        from infermatrix.reports.history_html import write_history_html

        path = write_history_html(verdicts, args.html, metric=series[0].metric, threshold=threshold,
                                  source=str(db))
        print(f"wrote {path}")
        return 0
    print(history.render_check(verdicts, threshold))
    return 1 if any(v.regression for v in verdicts) else 0


def _history_add(conn, runs: list[str], db: Path, host: str | None) -> int:
    from infermatrix.reports.history import add_records, check_dated
    from infermatrix.reports.run import load_run

    loaded = [load_run(source) for source in runs]
    for run in loaded:  # every run readable and dated before any is stored
        check_dated(run.records, run.source)
    for run in loaded:
        added = add_records(conn, run.records, run.source, host)
        if added.without_sha:
            print(f"infermatrix: warning: {run.source}: {added.without_sha} records have no git SHA; stored by "
                  "their date (run from a git checkout to place them by commit)")
        print(f"{run.source}: {added.new} records added, {added.known} already stored")
    print(f"history: {db}")
    return 0


# env ------------------------------------------------------------------------------


def _add_env(sub) -> None:
    env = _subcommand(
        sub, "env", _cmd_env, help="print this machine's environment and measured peaks",
        description="Print versions, CPU/GPU, threads and pinning, and the memory bandwidth and GEMM "
                    "FLOP/s peaks the roofline figures use (measured once per machine, then cached).",
    )
    env.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    env.add_argument("--dtypes", default="float32,bfloat16", help="GEMM dtypes to measure (comma-separated)")


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


# list -----------------------------------------------------------------------------


def _add_list(sub) -> None:
    lst = _subcommand(
        sub, "list", _cmd_list, help="list variants and models, with availability on this machine",
        description="List registered variants (built-in and plugins) and model presets, and say why "
                    "any is unavailable here.",
    )
    lst.add_argument("--axis", help="only variants on this axis (linear, attention, cache, graph)")


def _cmd_list(args: argparse.Namespace) -> int:
    import torch

    from infermatrix.variants import AXES, missing_requirements, registered_variants
    from infermatrix.weights import RANDOM_PRESETS, REAL_PRESETS, smollm2_path

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
    for name, cfg in RANDOM_PRESETS.items():
        params = cfg.num_params()
        window = f", its own attention window of {cfg.sliding_window}" if getattr(cfg, "sliding_window", None) else ""
        print(f"  {name:<20} random weights     available; {cfg.kind}, {params:,} params, "
              f"{params * 2 / 2**30:.2f} GiB in bfloat16{window}")
    print("  PATH.gguf / DIR      a GGUF file (llama, qwen2, qwen3, gemma, phi3), or a Hugging Face checkpoint "
          "folder (decoders; BertModel, BertForMaskedLM)")
    return 0


# the command ----------------------------------------------------------------------

SUBCOMMANDS = (_add_run, _add_merge, _add_report, _add_compare, _add_gate, _add_ab, _add_calibrate, _add_history,
               _add_env, _add_list)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infermatrix",
        description="Benchmark Transformer inference optimizations: latency, throughput, memory and "
                    "accuracy drift against a reference, in one record per case.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
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
