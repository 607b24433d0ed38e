"""The verdict of an interleaved A/B run (`infermatrix ab`): BASE and NEW measured case by
case in alternating turns, and every speed rule judged on the paired rounds.

Each record of an A/B run carries `samples["round_sizes"]`: how many timer samples each
turn took. A speed metric's samples (compare.metric_samples, in the metric's unit) are
split into those turns and each turn gives its median; round i pairs BASE's i-th turn
with NEW's. A metric whose samples are k per timer sample (TPOT: one per decode step)
is split k-fold. Throughput metrics are judged on the latency rounds, inverted.

A relative speed rule `METRIC:±T%` on a case gives one of:

* regression:  the change is significant (Benjamini–Hochberg q < alpha over the run's
               paired tests, one per case and sample source) on the worse side, the estimate is at
               least T/2%, and the interval reaches past T%: a change that large cannot be ruled
               out. Fails the gate.
* improvement: the same on the better side.
* unchanged:   the interval lies within ±T%.
* inconclusive: none of these (the interval straddles 1 and reaches past ±T%): the run
               was too short or too noisy to tell. A warning, with the effect it could
               have detected.

Every other rule (accuracy bounds, memory, absolute bounds) and the status checks (a
case failed on one side fails) are those of `infermatrix gate` on the two sides' records.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np

from infermatrix.reports.compare import (
    _CSS, DIRECTION, LOWER, SAMPLE_METRICS, _html_table, _md_cell, _text_table, index_records, metric_samples,
)
from infermatrix.reports.derived import timings_meaningful
from infermatrix.reports.gate import DEFAULT_RULES, GateResult, Rule, evaluate, parse_rules
from infermatrix.reports.paired import bh_adjust, detectable_change, paired_ratio
from infermatrix.reports.record import Record

DEFAULT_THRESHOLD = "5%"
# Speed at 5%: the interleaved rounds see that on shared 2-core runners (README, "A/B gate").
# Accuracy bounds: the gate's (reports/gate.py explains them).
AB_DEFAULT_RULES: tuple[str, ...] = (
    f"latency_ms_p50:+{DEFAULT_THRESHOLD}",
    f"tokens_per_s:-{DEFAULT_THRESHOLD}",
    *(rule for rule in DEFAULT_RULES if not rule.startswith(("latency_ms_p50:", "tokens_per_s:"))),
)
VERDICTS = ("regression", "improvement", "unchanged", "inconclusive")


def round_values(record: Record, metric: str) -> np.ndarray | None:
    """The median of each turn of a speed metric's samples, or None when the record
    has no turns (not from an A/B run) or the samples do not divide into them."""
    sizes = (record.samples or {}).get("round_sizes")
    xs = metric_samples(record, metric)
    if not sizes or xs is None:
        return None
    total = int(sum(sizes))
    if total <= 0 or xs.size % total:
        return None
    per = xs.size // total  # samples of this metric per timer sample
    bounds = np.cumsum([0, *(int(s) * per for s in sizes)])
    return np.array([float(np.median(xs[lo:hi])) for lo, hi in zip(bounds[:-1], bounds[1:])])


@dataclass(frozen=True)
class PairedCheck:
    case_id: str
    rule: str
    metric: str
    verdict: str  # regression | improvement | unchanged | inconclusive
    ratio: float  # NEW/BASE of the metric (a throughput is the inverse of its latency)
    ci_low: float | None
    ci_high: float | None
    p_value: float
    q_value: float  # Benjamini–Hochberg over the run's paired tests (one per case and sample source)
    rounds: int
    threshold: float  # the rule's allowed fraction
    detectable: float  # the change this case's precision detects with 80% power (fraction)

    @property
    def interval(self) -> str:
        if self.ci_low is None or self.ci_high is None:
            return "[n/a]"
        return f"[{self.ci_low:.3f}, {self.ci_high:.3f}]"


@dataclass
class AbResult:
    alpha: float
    paired: list[PairedCheck]
    gate: GateResult  # status checks and the rules not judged on rounds
    rules: list[Rule]
    warnings: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[PairedCheck]:
        return [c for c in self.paired if c.verdict == "regression"]

    @property
    def failures(self) -> list[str]:
        return [f"{c.case_id}: {c.rule}: {c.metric} {c.ratio:.3f}x {c.interval} q={c.q_value:.2g}: regression"
                for c in self.regressions] + self.gate.failures

    @property
    def passed(self) -> bool:
        return not self.failures

    def counts(self) -> dict[str, int]:
        return {v: sum(c.verdict == v for c in self.paired) for v in VERDICTS}


def _classify(rule: Rule, ratio: float, low: float | None, high: float | None, q: float, alpha: float) -> str:
    if low is None or high is None:
        return "inconclusive"
    lower = DIRECTION[rule.metric] == LOWER
    t = rule.relative
    worse_limit, better_limit = (1 + t, 1 - t) if lower else (1 - t, 1 + t)
    band_low, band_high = min(worse_limit, better_limit), max(worse_limit, better_limit)
    significant = q < alpha and (low > 1 or high < 1)
    if significant:
        worse = (low > 1) == lower
        reaches = (high > worse_limit if lower else low < worse_limit) if worse else \
            (low < better_limit if lower else high > better_limit)
        # the estimate itself at least half the threshold: a sure but small shift (2% against
        # a 5% rule) with a wide interval is not called a regression
        half = abs(math.log(ratio)) >= abs(math.log(worse_limit if worse else better_limit)) / 2
        if reaches and half:
            return "regression" if worse else "improvement"
    if band_low <= low and high <= band_high:
        return "unchanged"
    return "inconclusive"


def evaluate_ab(base: list[Record], new: list[Record], rules=AB_DEFAULT_RULES, *, alpha: float = 0.05) -> AbResult:
    """Judge an A/B run's two sides; see the module docstring."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    parsed = parse_rules(rules)
    on_rounds = [r for r in parsed if r.is_relative and r.metric in SAMPLE_METRICS]
    others = [r for r in parsed if r not in on_rounds]
    b_idx, n_idx = index_records(base), index_records(new)
    warnings: list[str] = []
    tests = []  # (rule, case_id, PairedRatio in the metric's direction)
    for rule in on_rounds:
        applied = 0
        for cid, n_rec in n_idx.items():
            b_rec = b_idx.get(cid)
            if n_rec.status != "ok" or b_rec is None or b_rec.status != "ok" or not rule.matches(cid, n_rec.case):
                continue
            b_rounds, n_rounds = round_values(b_rec, rule.metric), round_values(n_rec, rule.metric)
            if b_rounds is None or n_rounds is None:
                continue  # no timed turns (drift), or the metric is absent
            if not (timings_meaningful(b_rec) and timings_meaningful(n_rec)):
                warnings.append(f"{cid}: {rule.text}: Triton ran in the interpreter; its timings are not judged")
                continue
            if b_rounds.size != n_rounds.size:
                warnings.append(f"{cid}: {rule.text}: {b_rounds.size} BASE turns against {n_rounds.size} NEW "
                                "turns; not paired")
                continue
            result = paired_ratio(b_rounds, n_rounds, alpha)
            applied += 1
            tests.append((rule, cid, result))
        if not applied:
            warnings.append(f"rule {rule.text!r} applied to no case with paired rounds")
    # One test per case and sample source: tokens_per_s and latency_ms_p50 judge the same
    # rounds, and counting them twice would only make the FDR step stricter.
    keys = list(dict.fromkeys((cid, SAMPLE_METRICS[rule.metric][0]) for rule, cid, _ in tests))
    p_of = {(cid, SAMPLE_METRICS[rule.metric][0]): result.p_value for rule, cid, result in tests}
    q_of = dict(zip(keys, bh_adjust([p_of[key] for key in keys])))
    paired = []
    for rule, cid, result in tests:
        q = q_of[(cid, SAMPLE_METRICS[rule.metric][0])]
        if SAMPLE_METRICS[rule.metric][1]:  # throughput: the inverse of the latency rounds
            result = result.inverse()
        ratio, low, high = result.ratio, result.ci_low, result.ci_high
        paired.append(PairedCheck(
            cid, rule.text, rule.metric, _classify(rule, ratio, low, high, q, alpha), ratio, low, high,
            result.p_value, q, result.n, rule.relative, detectable_change(result.half_width, alpha)))
    gate = evaluate(base, new, others, alpha=alpha)
    warnings += gate.warnings
    warnings += [f"{c.case_id}: {c.rule}: inconclusive, {c.ratio:.3f}x {c.interval} after {c.rounds} rounds "
                 f"(could detect {_pct(c.detectable)})" for c in paired if c.verdict == "inconclusive"]
    return AbResult(alpha, paired, gate, parsed, warnings)


def _pct(x: float) -> str:
    return "inf" if not math.isfinite(x) else f"{100 * x:.1f}%"


_HEAD = ["case", "rule", "verdict", "NEW/BASE", "95% CI", "q", "rounds", "detects"]


def _rows(result: AbResult) -> list[list[str]]:
    return [[c.case_id, c.rule, c.verdict, f"{c.ratio:.3f}x", c.interval, f"{c.q_value:.2g}", str(c.rounds),
             _pct(c.detectable)] for c in result.paired]


def _summary_line(result: AbResult) -> str:
    counts = ", ".join(f"{n} {v}" for v, n in result.counts().items() if n)
    finite = sorted(c.detectable for c in result.paired if math.isfinite(c.detectable))
    detect = f"; median detectable change {_pct(finite[len(finite) // 2])}" if finite else ""
    return (f"{len(result.paired)} paired checks ({counts or 'none'}){detect}; "
            f"{result.gate.checked} other checks; alpha = {result.alpha:g}, Benjamini–Hochberg across "
            f"{len({(c.case_id, SAMPLE_METRICS[c.metric][0]) for c in result.paired})} tests")


def _legend(result: AbResult) -> str:
    return ("NEW/BASE: Hodges–Lehmann estimate of the paired per-round ratios, 95% CI from the signed-rank "
            "test; q: Benjamini–Hochberg adjusted p; detects: the change this precision finds with 80% power. "
            "regression = significant, the estimate at least half the threshold and the interval reaching past "
            "it; unchanged = the interval lies within it; inconclusive = too noisy or too short to tell")


def render_ab_text(result: AbResult, header: str = "") -> str:
    parts = [header] if header else []
    if result.paired:
        parts += [_text_table(_HEAD, _rows(result)), _legend(result)]
    parts.append(_summary_line(result))
    parts += [f"FAIL {line}" for line in result.failures]
    parts += [f"warning: {line}" for line in result.warnings]
    parts.append("ab: PASS" if result.passed else f"ab: FAIL ({len(result.failures)} failures)")
    return "\n".join(parts)


def render_ab_markdown(result: AbResult, header: str = "") -> str:
    n = len(result.failures)
    lines = ["## ✅ infermatrix ab: passed" if result.passed else
             f"## ❌ infermatrix ab: failed ({n} failure{'s' if n != 1 else ''})", ""]
    if header:
        lines += [_md_cell(header), ""]
    lines += [_md_cell(_summary_line(result))]
    if result.failures:
        lines += ["", "### Failures", ""] + [f"- {_md_cell(f)}" for f in result.failures]
    if result.paired:
        lines += ["", "### Paired speed checks", "", "| " + " | ".join(_HEAD) + " |",
                  "|---|---|---|" + "---:|" * (len(_HEAD) - 3)]
        lines += ["| " + " | ".join(f"`{_md_cell(c)}`" if i < 2 else _md_cell(c) for i, c in enumerate(row)) + " |"
                  for row in _rows(result)]
        lines += ["", f"_{_md_cell(_legend(result))}_"]
    if result.warnings:
        lines += ["", "### Warnings", ""] + [f"- {_md_cell(w)}" for w in result.warnings]
    lines += ["", "Rules: " + ", ".join(f"`{_md_cell(r.text)}`" for r in result.rules)]
    return "\n".join(lines) + "\n"


_VERDICT_CLASS = {"regression": "worse", "improvement": "better", "unchanged": "same", "inconclusive": ""}


def render_ab_html(result: AbResult, header: str = "") -> str:
    """A self-contained page (inline CSS, no scripts); every string is escaped."""
    verdict = "passed" if result.passed else f"failed ({len(result.failures)} failures)"
    parts = [f"<h1>infermatrix ab: {html.escape(verdict)}</h1>"]
    if header:
        parts.append(f'<p class="head">{html.escape(header)}</p>')
    parts.append(f'<p class="head">{html.escape(_summary_line(result))}</p>')
    if result.failures:
        parts += ["<h2>Failures</h2>", "<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in result.failures)
                  + "</ul>"]
    if result.paired:
        parts += ["<h2>Paired speed checks</h2>",
                  _html_table(_HEAD, _rows(result), [_VERDICT_CLASS[c.verdict] for c in result.paired]),
                  f'<p class="legend">{html.escape(_legend(result))}</p>']
    if result.warnings:
        parts += ["<h2>Warnings</h2>", "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in result.warnings)
                  + "</ul>"]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>infermatrix ab</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def ab_json(result: AbResult) -> dict:
    return {
        "passed": result.passed, "alpha": result.alpha, "rules": [r.text for r in result.rules],
        "counts": result.counts(), "failures": result.failures, "warnings": result.warnings,
        "paired": [{**c.__dict__, "ci_low": c.ci_low, "ci_high": c.ci_high,
                    "detectable": c.detectable if math.isfinite(c.detectable) else None} for c in result.paired],
    }


def render_ab_calibration(result: AbResult) -> str:
    """An interleaved A/A: the same code on both sides. Per case the paired ratio (1 up to
    noise) and the change the case's precision detects; any verdict but unchanged or
    inconclusive is a false alarm."""
    head = ["case", "rounds", "NEW/BASE", "95% CI", "detects", "verdict"]
    rows = [[c.case_id, str(c.rounds), f"{c.ratio:.3f}x", c.interval, _pct(c.detectable), c.verdict]
            for c in result.paired]
    lines = ["interleaved A/A calibration: the same code on both sides", ""]
    if rows:
        lines.append(_text_table(head, rows))
        finite = sorted(c.detectable for c in result.paired if math.isfinite(c.detectable))
        if finite:
            lines += ["", f"detectable change (80% power, alpha = {result.alpha:g}): median {_pct(finite[len(finite) // 2])}, "
                          f"worst {_pct(finite[-1])} ({len(finite)} of {len(result.paired)} cases with an interval)"]
        alarms = [c for c in result.paired if c.verdict in ("regression", "improvement")]
        lines.append(f"false alarms: {len(alarms)}" + (f" ({', '.join(c.case_id for c in alarms)})" if alarms else ""))
    else:
        lines.append("no timed case with paired rounds")
    lines += [f"status: {line}" for line in result.gate.failures]
    return "\n".join(lines)
