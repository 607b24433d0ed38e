"""The CI regression gate: rules checked on two runs, BASE (e.g. main) and NEW (the change).

Rule grammar, one string per rule::

    [FILTER:]METRIC:BOUND

    FILTER  field=glob[,field=glob...]  over the case's fields (model, variant, workload,
            dtype, device, batch, prompt_len, new_tokens, windows, kv_len, heads, kv_heads,
            head_dim, causal, in_features, out_features, task, and the serve workload's
            requests, rate, concurrency, batching, slo_*, ...) or case_id; fnmatch globs,
            case-sensitive, every pair must match (booleans read as true/false).
            Examples: variant=int8_*   workload=decode,dtype=bfloat16   device=cuda:*
    METRIC  a results.csv metric (README, "results.csv columns"); `top1_agree` is an
            alias of top1_agree_pct.
    BOUND   relative, against BASE: the change allowed in the metric's worse direction.
              lower-is-better metrics (latency, time, memory, KL, error):  +5%
              higher-is-better metrics (tokens_per_s, TFLOP/s, top-1, SQNR): -5%
              `5%` without a sign means the same (the worse direction); the opposite
              sign (`tokens_per_s:+5%`, `latency_ms_p50:-5%`) is rejected: it would be
              a demand to improve, not a tolerance.
            absolute, on NEW's value only: >=99  <=1  <0.01  >0; a `%` suffix is allowed
              for *_pct metrics and means the same number (top1_agree_pct:>=99% is >= 99).

Semantics of `evaluate`:

* A relative rule on a speed metric with raw samples (latency_ms_p50, ttft_ms_p50,
  tpot_ms_p50, and the throughputs derived from latency: tokens_per_s, achieved_tflops,
  achieved_gbs, pct_of_*) fails only when the ratio new/base of medians is beyond the
  bound AND the change is significant (Mann–Whitney p < alpha); a change beyond the
  bound that is not significant is reported as a warning. Other metrics under a
  relative rule (memory, drift) are single numbers and are compared directly.
* An absolute rule is checked on NEW's value (BASE is shown for context only): drift
  bounds hold every variant to the fp32 reference, whatever BASE did.
* A case ok in BASE that is failed, skipped (`fail_on_skip`) or missing in NEW fails the
  gate, whatever the rules; so does a case failed in NEW that was not failed in BASE
  (including a new case). A case failed in both is only noted.
* A rule whose metric a case lacks (tokens_per_s of an attention op, KL of a prefill)
  does not apply to it; a rule that applies to no case at all is warned about.

DEFAULT_RULES, and why:

* `latency_ms_p50:+25%`, `tokens_per_s:-20%`: set by the noise of shared 2-vCPU runners
  (the CI machines this project targets), where A/A pairs of the default matrix were
  measured 11-28% apart on fp32 cases, with rarer bursts beyond that. Significance
  does not protect against such shifts: they move a whole run, and the Mann-Whitney
  test sees only the spread within each run. On quiet or dedicated hardware run
  `infermatrix calibrate` and tighten the bounds to what it suggests. tokens_per_s is
  derived from the same samples as the latency, so for model workloads the two rules
  move together (-20% tokens/s is +25% latency); the throughput rule reads the way
  throughput is talked about.
* `kl_mean:<=0.05`: mean KL(reference || variant) per token in nats. bf16 on
  SmolLM2-135M gives ~0.0015 and int8 weight-only a few thousandths; a broken kernel
  (wrong scale, wrong mask) gives 0.5 and more. 0.05 separates the two by an order of
  magnitude each way.
* `top1_agree_pct:>=90%`: bf16 agrees with fp32 on 95-99% of next-token argmaxes over
  the default 128-256 eval tokens (one token is ~0.4-0.8 points); below 90 something
  changed the model, not its rounding.
* `ppl_delta_pct:<=2%`: perplexity at most 2% above the reference's (bf16: within
  ±0.4%). Negative (better than the reference) always passes.
Drift bounds are absolute and apply to NEW only; the fp32 reference itself has zero drift.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from infermatrix.errors import UserError
from infermatrix.reports.compare import (
    ALIASES, CSV_METRICS, DEFAULT_SPEED_METRICS, DIRECTION, HIGHER, LOWER, NON_NUMERIC_METRICS, SAMPLE_METRICS,
    MetricChange, compare_metric, compare_runs, fmt_p, fmt_ratio, fmt_value, index_records, metric_value,
)
from infermatrix.reports.derived import is_speed_metric, timings_meaningful
from infermatrix.reports.record import Record

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RULES: tuple[str, ...] = (
    "latency_ms_p50:+25%",
    "tokens_per_s:-20%",
    "kl_mean:<=0.05",
    "top1_agree_pct:>=90%",
    "ppl_delta_pct:<=2%",
)

CASE_FIELDS: tuple[str, ...] = (
    "case_id", "model", "variant", "workload", "dtype", "device", "batch", "prompt_len", "new_tokens", "windows",
    "heads", "kv_heads", "head_dim", "causal", "in_features", "out_features",
)
# signed, already relative to the reference: a ratio of two of them means nothing
_NO_RELATIVE = frozenset({"ppl_delta_pct"})

VALID_FORMS = ("valid forms: METRIC:+5% (at most 5% worse, lower-is-better metrics), METRIC:-5% "
               "(higher-is-better metrics), METRIC:>=99 | <=1 | <0.01 | >0 (absolute, on NEW; '%' allowed "
               "for *_pct metrics), each optionally prefixed by FILTER: as field=glob[,field=glob...], "
               "e.g. variant=int8_*:latency_ms_p50:+5%")

_REL_RE = re.compile(r"^([+-]?)\s*(\d+(?:\.\d*)?|\.\d+)\s*%$")
_ABS_RE = re.compile(r"^(>=|<=|>|<)\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(%?)$")
_OPS = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, ">": lambda v, b: v > b, "<": lambda v, b: v < b}


class RuleError(ValueError):
    """A rule string that does not parse; the message names the problem and the valid forms."""


@dataclass(frozen=True)
class Rule:
    text: str  # as written
    metric: str  # canonical name (aliases resolved)
    filters: tuple[tuple[str, str], ...] = ()  # (field, glob)
    relative: float | None = None  # allowed fraction worse (0.05 for 5%); None for an absolute rule
    op: str | None = None  # absolute: >=, <=, >, <
    bound: float | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def is_relative(self) -> bool:
        return self.relative is not None

    def matches(self, case_id: str, case: dict) -> bool:
        return filter_matches(self.filters, case_id, case)

    def limit(self) -> float:
        """Relative rule: the ratio new/base beyond which NEW is worse than allowed."""
        assert self.relative is not None
        return 1 + self.relative if DIRECTION[self.metric] == LOWER else 1 - self.relative


def filter_matches(filters: tuple[tuple[str, str], ...], case_id: str, case: dict) -> bool:
    """Whether a case matches every (field, glob) pair of a filter."""
    for name, glob in filters:
        value = case_id if name == "case_id" else case.get(name)
        if value is None:
            return False
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        if not fnmatchcase(text, glob):
            return False
    return True


def parse_filter(text: str) -> tuple[tuple[str, str], ...]:
    """`field=glob[,field=glob...]` as (field, glob) pairs; raises ValueError naming the problem."""
    filters = []
    for item in _split_filters(text):
        key, sep, glob = item.partition("=")
        key, glob = key.strip(), glob.strip()
        if not sep or not key:
            raise ValueError(f"filter {item.strip()!r} is not field=glob")
        if key not in CASE_FIELDS:
            close = difflib.get_close_matches(key, CASE_FIELDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown case field {key!r} in the filter{hint}; fields: {', '.join(CASE_FIELDS)}")
        if not glob:
            raise ValueError(f"empty glob for {key!r} in the filter")
        filters.append((key, glob))
    return tuple(filters)


def _error(text: str, problem: str) -> RuleError:
    return RuleError(f"rule {text!r}: {problem}; {VALID_FORMS}")


def _split_filters(text: str) -> list[str]:
    """Split on commas outside parentheses (variant specs carry `name(k=v,k2=v2)`)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth <= 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _metric_names_hint(name: str) -> str:
    close = difflib.get_close_matches(name, CSV_METRICS + tuple(ALIASES), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    some = ", ".join(("latency_ms_p50", "tokens_per_s", "ttft_ms_p50", "tpot_ms_p50", "achieved_tflops",
                      "peak_rss_bytes", "kl_mean", "kl_max", "top1_agree_pct", "ppl_delta_pct", "sqnr_db"))
    return f"{hint}valid metrics include {some} (all results.csv metric columns)"


def parse_rule(text: str) -> Rule:
    """Parse `[FILTER:]METRIC:BOUND`; raises RuleError naming the problem."""
    if not isinstance(text, str) or not text.strip():
        raise _error(str(text), "empty rule")
    raw = text.strip()
    parts = raw.rsplit(":", 2)  # a filter may itself hold colons (device=cuda:1)
    if len(parts) < 2:
        raise _error(raw, "expected METRIC:BOUND or FILTER:METRIC:BOUND")
    filter_text, name, bound_text = (parts if len(parts) == 3 else ["", *parts])
    name, bound_text = name.strip(), bound_text.strip()
    if len(parts) == 3 and "=" not in filter_text:
        raise _error(raw, f"filter {filter_text!r} is not field=glob")

    filters: tuple[tuple[str, str], ...] = ()
    if len(parts) == 3:
        try:
            filters = parse_filter(filter_text)
        except ValueError as exc:
            raise _error(raw, str(exc)) from None

    if not name:
        raise _error(raw, "missing metric")
    metric = ALIASES.get(name, name)
    if metric not in CSV_METRICS:
        raise _error(raw, f"unknown metric {name!r}; {_metric_names_hint(name)}")
    if metric in NON_NUMERIC_METRICS:
        raise _error(raw, f"{metric} is not a number and cannot be bounded")
    if not bound_text:
        raise _error(raw, "missing bound")

    if m := _REL_RE.match(bound_text):
        sign, amount = m.group(1), float(m.group(2))
        direction = DIRECTION.get(metric)
        if metric in _NO_RELATIVE:
            raise _error(raw, f"{metric} is signed and already relative to the reference; bound it absolutely, "
                              f"e.g. {metric}:<=1%")
        if direction is None:
            raise _error(raw, f"{metric} has no better direction, so a relative change cannot be worse; "
                              f"use an absolute bound such as {metric}:<=X")
        worse = "+" if direction == LOWER else "-"
        if sign and sign != worse:
            better, change = ("lower", "rise") if direction == LOWER else ("higher", "drop")
            raise _error(raw, f"{metric} is {better}-is-better, so getting worse is a {change}: write "
                              f"{metric}:{worse}{m.group(2)}% (at most {m.group(2)}% worse); "
                              f"{sign}{m.group(2)}% would demand an improvement")
        if direction == HIGHER and amount >= 100:
            raise _error(raw, f"a higher-is-better metric cannot drop by {amount:g}% or more")
        return Rule(raw, metric, filters, relative=amount / 100)

    if m := _ABS_RE.match(bound_text):
        op, value, pct = m.group(1), float(m.group(2)), m.group(3)
        if pct and not metric.endswith("_pct"):
            raise _error(raw, f"'%' is only allowed on *_pct metrics; {metric} is not one, "
                              f"write {metric}:{op}{m.group(2)}")
        if not math.isfinite(value):
            raise _error(raw, "the bound must be a finite number")
        return Rule(raw, metric, filters, op=op, bound=value)

    if re.match(r"^(==?|!=|=>|=<)", bound_text):
        raise _error(raw, f"comparison {bound_text!r} is not supported (use >=, <=, > or <)")
    raise _error(raw, f"bound {bound_text!r} is neither a relative change (+5%, -5%) "
                      "nor an absolute bound (>=99, <0.01)")


def parse_rules(rules: Iterable[str | Rule]) -> list[Rule]:
    return [r if isinstance(r, Rule) else parse_rule(r) for r in rules]



# --------------------------------------------------------------------------- where rules come from


def parse_gate_table(table, source: str) -> tuple[str, ...]:
    """A TOML [gate] table, rules = ["tokens_per_s:-5%", ...]: every rule checked now
    (a bad one is a UserError naming `source`), applied when a gate runs."""
    if not isinstance(table, dict) or set(table) - {"rules"}:
        raise UserError(f"{source}: [gate] takes one key, rules = [\"metric:bound\", ...]")
    rules = table.get("rules", [])
    if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
        raise UserError(f"{source}: [gate] rules must be a list of strings such as \"latency_ms_p50:+5%\"")
    for rule in rules:
        try:
            parse_rule(rule)
        except RuleError as exc:
            raise UserError(f"{source}: [gate] rule {rule!r}: {exc}") from None
    return tuple(rules)


def matrix_gate_rules(matrix_text: str | None) -> list[str]:
    """The [gate] rules of a run's matrix copy (none without one)."""
    if not matrix_text:
        return []
    return list(parse_gate_table(tomllib.loads(matrix_text).get("gate", {}), "the run's matrix"))


def read_rules_file(path: Path) -> list[str]:
    """A TOML file with [gate] rules = [...], or a text file with one rule per line (# comments)."""
    if not path.is_file():
        raise UserError(f"--rules {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            return list(parse_gate_table(tomllib.loads(text).get("gate", {}), str(path)))
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"--rules {path}: invalid TOML: {exc}") from None
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def select_rules(given: list[str], matrix_text: str | None, defaults: Iterable[str] = DEFAULT_RULES, *,
                 matrix_origin: str = "the run's matrix [gate]",
                 defaults_origin: str = "defaults") -> tuple[list[str], str]:
    """The rules a gate applies and where they came from: those `given` (on the command
    line), else the NEW run's matrix [gate] table (`matrix_text`, its matrix copy), else
    `defaults`."""
    if given:
        return list(given), "command line"
    from_matrix = matrix_gate_rules(matrix_text)
    if from_matrix:
        return from_matrix, matrix_origin
    return list(defaults), defaults_origin


def write_step_summary(markdown: str) -> None:
    """Append a verdict to the GitHub Actions job summary ($GITHUB_STEP_SUMMARY) when
    that is set: successive gate steps of one job each add theirs."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(markdown + "\n")


# --------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class Check:
    case_id: str
    rule: str  # the rule's text, or "status"
    outcome: str  # pass | fail | warn
    observed: str
    why: str = ""


@dataclass
class GateResult:
    passed: bool
    failures: list[str]  # one line each: case_id, rule, observed, why
    checked: int  # (case, rule) pairs that applied, plus status checks that failed
    markdown: str  # verdict for $GITHUB_STEP_SUMMARY
    checks: list[Check] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # beyond the bound but not significant; rules matching nothing

    def __bool__(self) -> bool:
        return self.passed


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _relative_check(rule: Rule, change: MetricChange, alpha: float) -> Check | None:
    ratio = change.ratio
    if change.kind == "value" and ratio is None and change.base == 0 and change.new is not None:
        ratio = 1.0 if change.new == 0 else (math.inf if change.new > 0 else -math.inf)
    if ratio is None or math.isnan(ratio):
        return None
    lower = DIRECTION[rule.metric] == LOWER
    worse_by = (ratio - 1) if lower else (1 - ratio)  # > 0: worse
    beyond = ratio > rule.limit() if lower else ratio < rule.limit()
    allowed = f"{'+' if lower else '-'}{100 * rule.relative:g}%"
    how = f"{_pct(abs(worse_by))} {'worse' if worse_by > 0 else 'better'}"
    context = f"(BASE {fmt_value(change.base)}, NEW {fmt_value(change.new)})"
    if change.kind == "value":
        observed = f"{rule.metric} {ratio:.3f}x {context}"
        if beyond:
            return Check(change.case_id, rule.text, "fail", observed,
                         f"{how}, beyond the {allowed} allowed (single values, no samples: compared directly)")
        return Check(change.case_id, rule.text, "pass", observed, how)
    observed = f"{rule.metric} {fmt_ratio(change)} p={fmt_p(change.p_value)} {context}"
    if not beyond:
        return Check(change.case_id, rule.text, "pass", observed, how)
    if change.significant:
        return Check(change.case_id, rule.text, "fail", observed,
                     f"{how}, beyond the {allowed} allowed, and significant (p < {alpha:g})")
    p = "no samples to test" if change.p_value is None else f"p = {fmt_p(change.p_value)} >= {alpha:g}"
    return Check(change.case_id, rule.text, "warn", observed,
                 f"{how}, beyond the {allowed} allowed but not significant ({p}, n = {change.n_base}/{change.n_new})")


def _absolute_check(rule: Rule, case_id: str, new: Record, base: Record | None) -> Check | None:
    value = metric_value(new, rule.metric)
    if value is None:
        return None
    b = metric_value(base, rule.metric) if base is not None and base.status == "ok" else None
    observed = f"{rule.metric} = {fmt_value(value)}" + (f" (BASE {fmt_value(b)})" if b is not None else "")
    ok = _OPS[rule.op](value, rule.bound)
    return Check(case_id, rule.text, "pass" if ok else "fail", observed,
                 f"{'within' if ok else 'violates'} {rule.op} {rule.bound:g} (NEW's value)")


def _status_checks(b_idx: dict[str, Record], n_idx: dict[str, Record], fail_on_skip: bool) -> list[Check]:
    checks = []
    for cid in dict.fromkeys([*b_idx, *n_idx]):
        b, n = b_idx.get(cid), n_idx.get(cid)
        b_status = b.status if b else "missing"
        n_status = n.status if n else "missing"
        observed = f"{b_status} in BASE, {n_status} in NEW" + (f": {n.reason}" if n is not None and n.reason else "")
        if b_status == "ok" and (n_status in ("failed", "missing") or (n_status == "skipped" and fail_on_skip)):
            why = "vanished from NEW" if n_status == "missing" else f"was ok, now {n_status}"
            checks.append(Check(cid, "status", "fail", observed, why))
        elif n_status == "failed" and b_status != "failed":
            checks.append(Check(cid, "status", "fail", observed, "fails in NEW" if b else "new case fails"))
        elif n_status == "failed":
            checks.append(Check(cid, "status", "warn", observed, "failed in BASE too"))
    return checks


def evaluate(base: list[Record], new: list[Record], rules: Iterable[str | Rule] = DEFAULT_RULES, *,
             alpha: float = 0.05, fail_on_skip: bool = True) -> GateResult:
    """Check `rules` (strings or Rules) on BASE and NEW; see the module docstring."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    parsed = parse_rules(rules)
    b_idx, n_idx = index_records(base), index_records(new)
    checks = _status_checks(b_idx, n_idx, fail_on_skip)
    warnings: list[str] = []
    interpreted: set[str] = set()
    for rule in parsed:
        applied = 0
        for cid, n_rec in n_idx.items():
            if n_rec.status != "ok" or not rule.matches(cid, n_rec.case):
                continue
            b_rec = b_idx.get(cid)
            if is_speed_metric(rule.metric) and not all(timings_meaningful(r) for r in (n_rec, b_rec) if r):
                if metric_value(n_rec, rule.metric) is not None:
                    interpreted.add(cid)  # the interpreter's timings measure the interpreter
                continue
            if rule.is_relative:
                if b_rec is None or b_rec.status != "ok":
                    continue
                change = compare_metric(b_rec, n_rec, rule.metric, alpha=alpha)
                check = _relative_check(rule, change, alpha) if change is not None else None
            else:
                check = _absolute_check(rule, cid, n_rec, b_rec)
            if check is not None:
                applied += 1
                checks.append(check)
        if not applied:
            warnings.append(f"rule {rule.text!r} applied to no case")
    if interpreted:
        warnings.append(f"{len(interpreted)} case(s) ran Triton in the interpreter; speed rules skip them "
                        f"(accuracy rules still apply): {', '.join(sorted(interpreted))}")
    failures = [f"{c.case_id}: {c.rule}: {c.observed}: {c.why}" for c in checks if c.outcome == "fail"]
    warnings = [f"{c.case_id}: {c.rule}: {c.observed}: {c.why}" for c in checks if c.outcome == "warn"] + warnings
    checked = sum(1 for c in checks if c.rule != "status")
    result = GateResult(passed=not failures, failures=failures, checked=checked, markdown="", checks=checks,
                        warnings=warnings)
    result.markdown = render_gate_markdown(result, parsed, alpha=alpha, n_base=len(b_idx), n_new=len(n_idx))
    return result


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return "`" + _md(text.replace("`", "'")) + "`"


def render_gate_markdown(result: GateResult, rules: list[Rule], *, alpha: float, n_base: int, n_new: int) -> str:
    fails = [c for c in result.checks if c.outcome == "fail"]
    warns = [c for c in result.checks if c.outcome == "warn"]
    head = ("## ✅ infermatrix gate: passed" if result.passed
            else f"## ❌ infermatrix gate: failed ({len(fails)} failure{'s' if len(fails) != 1 else ''})")
    lines = [head, "",
             (f"BASE {n_base} cases · NEW {n_new} cases · {len(rules)} rules · {result.checked} checks · "
              f"α = {alpha:g} · relative speed rules fail only when beyond the bound and significant "
              "(Mann–Whitney); absolute bounds apply to NEW")]

    def table(rows: list[Check], title: str) -> None:
        if not rows:
            return
        lines.extend(["", f"### {title}", "", "| case | rule | observed | why |", "|---|---|---|---|"])
        lines.extend(f"| {_code(c.case_id)} | {_code(c.rule)} | {_md(c.observed)} | {_md(c.why)} |" for c in rows)

    table(fails, "Failures")
    table(warns, "Warnings (not failing)")
    other = [w for w in result.warnings if w.startswith("rule ")]
    if other:
        lines += ["", *[f"- ⚠️ {_md(w)}" for w in other]]
    passed = [c for c in result.checks if c.outcome == "pass"]
    if passed:
        lines += ["", f"<details><summary>{len(passed)} passing checks</summary>", "",
                  "| case | rule | observed |", "|---|---|---|"]
        lines += [f"| {_code(c.case_id)} | {_code(c.rule)} | {_md(c.observed)} |" for c in passed]
        lines += ["", "</details>"]
    lines += ["", "Rules: " + (", ".join(_code(r.text) for r in rules) or "(none)")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- calibrate


def calibrate(a: list[Record], b: list[Record], *, alpha: float = 0.05,
              metrics: Iterable[str] | None = None) -> dict:
    """A/A comparison: two runs of the same matrix on one machine, which differ only by
    noise. Per speed metric: pairs compared, the worst and median |ratio - 1|, how many
    came out significant (the false-positive rate, which should be near alpha), and a
    suggested relative threshold: twice the worst A/A change, rounded up to a whole
    percent, at least 2%."""
    names = [m for m in (metrics or DEFAULT_SPEED_METRICS) if m in SAMPLE_METRICS]
    comparison = compare_runs(a, b, alpha=alpha, metrics=names)
    out: dict = {"alpha": alpha, "cases": comparison.matched, "only_a": comparison.only_base,
                 "only_b": comparison.only_new,
                 "status_changes": [f"{s.case_id}: {s.base} -> {s.new}" for s in comparison.status_changes],
                 "metrics": {}}
    for metric in names:
        changes = [c for c in comparison.speed()
                   if c.metric == metric and c.ratio is not None and c.p_value is not None]
        if not changes:
            continue
        deltas = sorted(abs(c.ratio - 1) for c in changes)
        worst = max(changes, key=lambda c: abs(c.ratio - 1))
        significant = sum(c.significant for c in changes)
        threshold = max(2, math.ceil(round(200 * deltas[-1], 9))) / 100
        sign = "+" if DIRECTION[metric] == LOWER else "-"
        out["metrics"][metric] = {
            "pairs": len(changes),
            "max_abs_change": deltas[-1],
            "median_abs_change": deltas[len(deltas) // 2] if len(deltas) % 2 else
            (deltas[len(deltas) // 2 - 1] + deltas[len(deltas) // 2]) / 2,
            "significant": significant,
            "false_positive_rate": significant / len(changes),
            "worst_case": worst.case_id,
            "suggested_threshold": threshold,
            "suggested_rule": f"{metric}:{sign}{round(100 * threshold)}%",
        }
    return out


def render_calibration(result: dict) -> str:
    alpha = result["alpha"]
    lines = [f"A/A calibration: {result['cases']} cases in both runs, alpha = {alpha:g}"]
    rows = [["metric", "pairs", "worst |Δ|", "median |Δ|", "significant", "false-pos rate", "suggested"]]
    for metric, m in result["metrics"].items():
        rows.append([metric, str(m["pairs"]), _pct(m["max_abs_change"]), _pct(m["median_abs_change"]),
                     str(m["significant"]), _pct(m["false_positive_rate"]), m["suggested_rule"]])
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("")
        for row in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        lines.append("")
        for metric, m in result["metrics"].items():
            lines.append(f"worst {metric}: {m['worst_case']}")
        lines += ["", "suggested rules: " + " ".join(m["suggested_rule"] for m in result["metrics"].values()),
                  "(twice the worst A/A change, rounded up to a whole percent, at least 2%)"]
        high = [k for k, m in result["metrics"].items() if m["pairs"] >= 10 and m["false_positive_rate"] > 2 * alpha]
        if high:
            lines.append(f"warning: {', '.join(high)}: far more significant A/A differences than alpha = {alpha:g} "
                         "predicts; the runs differ systematically (thermal state, frequency scaling, background "
                         "load), so significance alone does not protect the gate here: the threshold must.")
    else:
        lines.append("no speed metric with samples in both runs")
    for key, label in (("only_a", "only in A"), ("only_b", "only in B")):
        lines += [f"{label}: {cid}" for cid in result[key]]
    lines += [f"status: {s}" for s in result["status_changes"]]
    return "\n".join(lines)
