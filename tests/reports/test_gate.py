"""The regression gate: rule parsing, evaluation and A/A calibration on synthetic records."""

import math
import re

import numpy as np
import pytest

from infermatrix.errors import UserError
from infermatrix.reports.gate import (
    DEFAULT_RULES, Rule, RuleError, calibrate, evaluate, parse_rule, render_calibration, select_rules,
)
from infermatrix.reports.record import Record

DRIFT = {"kl_mean": 0.0015, "kl_max": 0.03, "top1_agree_pct": 97.0, "ppl_delta_pct": -0.2, "dp_rms": 0.8,
         "logits_rel_l2": 0.013, "sqnr_db": 37.0, "greedy_match_len": 6.0, "logits_max_abs": 1.4}


def rec(variant="sdpa", workload="prefill", *, median=10.0, spread=0.01, n=30, seed=0, status="ok",
        metrics=None, dtype="float32", device="cpu", reason=None):
    case = {"model": "tiny", "variant": variant, "workload": workload, "dtype": dtype, "device": device,
            "batch": 1, "prompt_len": 128, "new_tokens": 9 if workload == "decode" else 0, "causal": True}
    cid = f"tiny/{variant}/{workload}/{dtype}/{device}/b1-p128"
    if status != "ok":
        return Record(case_id=cid, case=case, status=status, reason=reason or "boom")
    xs = median * np.exp(np.random.default_rng(seed).normal(0.0, spread, n))
    p50 = float(np.median(xs))
    m, samples = {"latency_ms_p50": p50, "peak_rss_bytes": 1e9}, {}
    if workload == "prefill":
        samples["latency_ms"] = xs.tolist()
        m["tokens_per_s"] = 128e3 / p50
    elif workload == "attention":
        samples["latency_ms"] = xs.tolist()
        m["achieved_tflops"] = 1 / p50
    elif workload == "decode":
        samples["generation_ms"] = (xs * 8).tolist()
        m["tokens_per_s"] = 1e3 / p50
    elif workload == "drift":
        m, samples = dict(DRIFT), {}
    m.update(metrics or {})
    return Record(case_id=cid, case=case, status="ok", metrics=m, samples=samples)


def run(seed=0, **kw):
    return [rec("sdpa", "prefill", seed=seed, **kw), rec("int8_weight_only", "decode", seed=seed + 1, **kw),
            rec("reference", "attention", seed=seed + 2, **kw), rec("int8_weight_only", "drift"),
            rec("sdpa", "prefill", dtype="bfloat16", seed=seed + 3, **kw)]


# --------------------------------------------------------------------------- parse


@pytest.mark.parametrize("text, metric, filters, relative, op, bound", [
    ("latency_ms_p50:+5%", "latency_ms_p50", (), 0.05, None, None),
    ("latency_ms_p50:5%", "latency_ms_p50", (), 0.05, None, None),
    ("tokens_per_s:-10%", "tokens_per_s", (), 0.10, None, None),
    ("achieved_tflops:-2.5%", "achieved_tflops", (), 0.025, None, None),
    ("top1_agree:>=99%", "top1_agree_pct", (), None, ">=", 99.0),
    ("top1_agree_pct:>=99", "top1_agree_pct", (), None, ">=", 99.0),
    ("kl_mean:<=1", "kl_mean", (), None, "<=", 1.0),
    ("kl_max:<0.01", "kl_max", (), None, "<", 0.01),
    ("sqnr_db:>0", "sqnr_db", (), None, ">", 0.0),
    ("logits_rel_l2:<1e-3", "logits_rel_l2", (), None, "<", 1e-3),
    ("ppl_delta_pct:<=-0.5%", "ppl_delta_pct", (), None, "<=", -0.5),
    ("variant=int8_*:latency_ms_p50:+5%", "latency_ms_p50", (("variant", "int8_*"),), 0.05, None, None),
    (" workload=decode, dtype=bfloat16 : tpot_ms_p50 : +3% ", "tpot_ms_p50",
     (("workload", "decode"), ("dtype", "bfloat16")), 0.03, None, None),
    ("device=cuda:1:peak_rss_bytes:+10%", "peak_rss_bytes", (("device", "cuda:1"),), 0.10, None, None),
    ("variant=blk(a=1,b=2),dtype=*16:kl_mean:<=0.1", "kl_mean",
     (("variant", "blk(a=1,b=2)"), ("dtype", "*16")), None, "<=", 0.1),
])
def test_parse_valid_forms(text, metric, filters, relative, op, bound):
    rule = parse_rule(text)
    assert (rule.metric, rule.filters, rule.op, rule.bound) == (metric, filters, op, bound)
    assert rule.relative == (pytest.approx(relative) if relative is not None else None)
    assert str(rule) == text.strip()


@pytest.mark.parametrize("text, problem", [
    ("", "empty rule"),
    ("latency_ms_p50", "expected METRIC:BOUND"),
    ("tokens_per_s:+5%", "higher-is-better, so getting worse is a drop: write tokens_per_s:-5%"),
    ("top1_agree_pct:+1%", "write top1_agree_pct:-1%"),
    ("latency_ms_p50:-5%", "lower-is-better, so getting worse is a rise: write latency_ms_p50:+5%"),
    ("latncy_ms_p50:+5%", "unknown metric 'latncy_ms_p50'; did you mean latency_ms_p50"),
    ("frobnicate:<1", "valid metrics include latency_ms_p50, tokens_per_s"),
    ("kl_mean:<=0.05%", "'%' is only allowed on *_pct metrics"),
    ("dp_mean:+5%", "no better direction"),
    ("ppl_delta_pct:+5%", "signed and already relative"),
    ("bound:<1", "not a number"),
    ("kl_mean:", "missing bound"),
    (":+5%", "missing metric"),
    ("kl_mean:==0", "not supported (use >=, <=, > or <)"),
    ("kl_mean:=<0.1", "not supported"),
    ("kl_mean:small", "neither a relative change"),
    ("tokens_per_s:-100%", "cannot drop by 100%"),
    ("vairant=int8_*:kl_mean:<1", "unknown case field 'vairant' in the filter (did you mean variant?)"),
    ("variant:kl_mean:<1", "is not field=glob"),
    ("variant=,dtype=x:kl_mean:<1", "empty glob for 'variant'"),
    ("variant=a,=b:kl_mean:<1", "is not field=glob"),
])
def test_parse_errors_name_the_problem_and_the_valid_forms(text, problem):
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    assert isinstance(info.value, ValueError)
    assert problem in str(info.value) and "valid forms" in str(info.value)


def test_default_rules_parse():
    rules = [parse_rule(r) for r in DEFAULT_RULES]
    metrics = {r.metric for r in rules}
    assert {"latency_ms_p50", "tokens_per_s", "kl_mean", "top1_agree_pct"} <= metrics
    assert all(not r.is_relative for r in rules if r.metric in ("kl_mean", "top1_agree_pct", "ppl_delta_pct"))


def test_filters_with_globs():
    case = {"variant": "int8_weight_only", "workload": "decode", "dtype": "bfloat16", "device": "cuda:0",
            "batch": 8, "causal": True}
    assert parse_rule("variant=int8_*:kl_mean:<1").matches("x", case)
    assert not parse_rule("variant=int4_*:kl_mean:<1").matches("x", case)
    assert parse_rule("workload=decode,dtype=bfloat16:kl_mean:<1").matches("x", case)
    assert not parse_rule("workload=decode,dtype=float32:kl_mean:<1").matches("x", case)
    assert parse_rule("device=cuda:*,batch=[48]:kl_mean:<1").matches("x", case)
    assert parse_rule("causal=true:kl_mean:<1").matches("x", case)
    assert parse_rule("case_id=*/decode/*:kl_mean:<1").matches("m/v/decode/bf16", case)
    assert not parse_rule("heads=4:kl_mean:<1").matches("x", case)  # the case lacks the field


# --------------------------------------------------------------------------- evaluate


def test_identical_runs_pass():
    a = run()
    result = evaluate(a, a, DEFAULT_RULES)
    assert result.passed and bool(result) and result.failures == []
    # latency x 4 speed cases, tokens_per_s x 3, kl/top1/ppl on the drift case
    assert result.checked == 4 + 3 + 3
    assert result.markdown.startswith("## ✅ infermatrix gate: passed")


def test_planted_slowdown_with_tight_samples_fails():
    base, new = run(seed=0), run(seed=10, median=12.0)
    result = evaluate(base, new, ["latency_ms_p50:+10%", "tokens_per_s:-10%"])
    assert not result.passed
    assert len(result.failures) == 4 + 3
    msg = next(f for f in result.failures
               if f.startswith("tiny/sdpa/prefill/float32/cpu/b1-p128: latency_ms_p50:+10%: "))
    assert re.search(r"latency_ms_p50 1\.20x \[1\.1\d, 1\.2\d\] \* p=\d", msg)
    assert re.search(r" (19\.[5-9]|20\.[0-4])% worse, beyond the \+10% allowed, and significant \(p < 0\.05\)$", msg)
    tps = next(f for f in result.failures if "tokens_per_s:-10%" in f and "/decode/" in f)
    assert "beyond the -10% allowed" in tps
    # a looser bound lets the same change through
    assert evaluate(base, new, ["latency_ms_p50:+25%"]).passed


def test_twenty_percent_inside_wide_noise_passes_with_a_warning():
    base = [rec(spread=0.5, n=6, seed=3)]
    new = [rec(spread=0.5, n=6, seed=4, median=12.0)]
    result = evaluate(base, new, ["latency_ms_p50:+10%"])
    assert result.passed and result.checked == 1
    assert len(result.warnings) == 1 and "not significant (p = " in result.warnings[0]
    assert "### Warnings (not failing)" in result.markdown


def test_accuracy_bound_breach_fails_on_new_only():
    base = [rec("int8_weight_only", "drift")]
    bad = [rec("int8_weight_only", "drift", metrics={"top1_agree_pct": 85.0, "kl_mean": 0.2})]
    result = evaluate(base, bad, DEFAULT_RULES)
    assert not result.passed and len(result.failures) == 2
    top1 = next(f for f in result.failures if "top1_agree_pct:>=90%" in f)
    assert top1.startswith("tiny/int8_weight_only/drift/") and "top1_agree_pct = 85 (BASE 97)" in top1
    assert "violates >= 90" in top1
    assert any("kl_mean = 0.2" in f and "violates <= 0.05" in f for f in result.failures)
    # BASE breaching the bound does not matter: absolute bounds judge NEW
    assert evaluate(bad, base, DEFAULT_RULES).passed


def test_vanished_case_fails():
    base, new = run(), run()[:-1]
    result = evaluate(base, new, [])
    assert not result.passed
    [msg] = result.failures
    assert msg.startswith("tiny/sdpa/prefill/bfloat16/cpu/b1-p128: status: ok in BASE, missing in NEW")
    assert "vanished" in msg


def test_ok_to_failed_fails_with_the_reason():
    base = [rec("sdpa", "prefill")]
    new = [rec("sdpa", "prefill", status="failed", reason="killed: out of memory")]
    result = evaluate(base, new, DEFAULT_RULES)
    assert not result.passed
    assert result.failures == [("tiny/sdpa/prefill/float32/cpu/b1-p128: status: ok in BASE, failed in NEW: "
                                "killed: out of memory: was ok, now failed")]
    assert "killed: out of memory" in result.markdown


def test_other_status_transitions():
    ok, failed, skipped = rec(), rec(status="failed"), rec(status="skipped", reason="needs CUDA")
    assert not evaluate([ok], [skipped], []).passed
    assert evaluate([ok], [skipped], [], fail_on_skip=False).passed
    assert evaluate([failed], [ok], []).passed  # fixed
    both = evaluate([failed], [failed], [])
    assert both.passed and "failed in BASE too" in both.warnings[0]
    assert not evaluate([], [failed], []).passed  # a new case that fails
    assert not evaluate([skipped], [failed], []).passed
    assert evaluate([], [ok], []).passed and evaluate([skipped], [skipped], []).passed


def test_filters_select_the_cases_a_rule_judges():
    base, new = run(seed=0), run(seed=10, median=12.0)
    result = evaluate(base, new, ["variant=int8_*:latency_ms_p50:+10%"])
    assert result.checked == 1 and len(result.failures) == 1 and "/int8_weight_only/decode/" in result.failures[0]
    result = evaluate(base, new, ["workload=prefill,dtype=bfloat16:latency_ms_p50:+10%"])
    assert result.checked == 1 and "/bfloat16/" in result.failures[0]
    assert evaluate(base, new, ["variant=int8_*:latency_ms_p50:+25%", "variant=sdpa:kl_mean:<=0"]).passed


def test_rules_that_do_not_apply():
    a = run()
    result = evaluate(a, a, ["workload=attention:tokens_per_s:-5%"])  # an op has no tokens/s
    assert result.passed and result.checked == 0
    assert result.warnings == ["rule 'workload=attention:tokens_per_s:-5%' applied to no case"]
    assert "applied to no case" in result.markdown


def test_relative_rule_without_samples_compares_values_directly():
    base = [rec(metrics={"peak_rss_bytes": 1.0e9})]
    assert not evaluate(base, [rec(metrics={"peak_rss_bytes": 1.2e9})], ["peak_rss_bytes:+10%"]).passed
    assert evaluate(base, [rec(metrics={"peak_rss_bytes": 1.05e9})], ["peak_rss_bytes:+10%"]).passed


def test_markdown_verdict():
    base, new = run(seed=0), run(seed=10, median=12.0)
    new[3] = rec("int8_weight_only", "drift", metrics={"top1_agree_pct": 80.0})
    result = evaluate(base, new[:-1] + [rec("sdpa", "prefill", dtype="bfloat16", status="failed", reason="a|b")],
                      DEFAULT_RULES)
    md = result.markdown
    assert md.startswith(f"## ❌ infermatrix gate: failed ({len(result.failures)} failures)")
    assert "### Failures" in md and "| case | rule | observed | why |" in md
    assert "| `tiny/int8_weight_only/drift/float32/cpu/b1-p128` | `top1_agree_pct:>=90%` |" in md
    assert "| `status` |" in md and "a\\|b" in md  # pipes in reasons do not break the table
    assert "passing checks</summary>" in md
    assert "Rules: `latency_ms_p50:+25%`" in md


def test_rule_objects_and_bad_alpha():
    rule = parse_rule("kl_mean:<=0.05")
    assert isinstance(rule, Rule) and evaluate(run(), run(), [rule]).checked == 1
    with pytest.raises(RuleError):
        evaluate(run(), run(), ["tokens_per_s:+5%"])
    with pytest.raises(ValueError, match="alpha"):
        evaluate(run(), run(), [], alpha=0)


# --------------------------------------------------------------------------- calibrate


def test_calibrate_on_two_aa_runs_suggests_a_threshold_of_at_least_two_percent():
    def aa_run(seed):
        return [rec(f"v{i}", "prefill", seed=seed * 100 + i, spread=0.03, n=12) for i in range(20)]

    result = calibrate(aa_run(1), aa_run(2))
    assert result["cases"] == 20
    lat = result["metrics"]["latency_ms_p50"]
    assert lat["pairs"] == 20 and 0 < lat["max_abs_change"] < 0.1
    assert lat["suggested_threshold"] >= 0.02
    assert lat["suggested_threshold"] == max(2, math.ceil(200 * lat["max_abs_change"])) / 100
    assert lat["suggested_rule"] == f"latency_ms_p50:+{round(100 * lat['suggested_threshold'])}%"
    assert 0 <= lat["false_positive_rate"] <= 0.25 and lat["significant"] == round(lat["false_positive_rate"] * 20)
    assert result["metrics"]["tokens_per_s"]["suggested_rule"].startswith("tokens_per_s:-")
    parse_rule(lat["suggested_rule"])
    text = render_calibration(result)
    assert "latency_ms_p50" in text and "suggested rules: latency_ms_p50:+" in text and "false-pos rate" in text


def test_calibrate_identical_runs_floor_at_two_percent():
    a = run()
    result = calibrate(a, a)
    assert all(m["suggested_threshold"] == 0.02 and m["significant"] == 0 for m in result["metrics"].values())


def test_rules_come_from_the_command_line_else_the_matrix_gate_table_else_the_defaults():
    matrix = '[[cases]]\nmodel = "tiny"\nvariant = "sdpa"\n\n[gate]\nrules = ["kl_mean:<=0.1"]\n'
    assert select_rules(["tokens_per_s:-5%"], matrix) == (["tokens_per_s:-5%"], "command line")
    assert select_rules([], matrix) == (["kl_mean:<=0.1"], "the run's matrix [gate]")
    assert select_rules([], None) == (list(DEFAULT_RULES), "defaults")
    assert select_rules([], '[[cases]]\nmodel = "tiny"\n', ["x:<=1"], defaults_origin="A/B defaults") == (
        ["x:<=1"], "A/B defaults")
    with pytest.raises(UserError, match="the run's matrix: \\[gate\\] rule 'speed:fast'"):
        select_rules([], '[gate]\nrules = ["speed:fast"]\n')
