"""The A/B verdict on synthetic paired records: rounds, classification, FDR, renderers."""

import json

import numpy as np
import pytest

from infermatrix.reports.ab import (AB_DEFAULT_RULES, _classify, ab_json, evaluate_ab, render_ab_calibration,
                                    render_ab_html, render_ab_markdown, render_ab_text, round_values)
from infermatrix.reports.gate import parse_rule
from infermatrix.reports.record import Record

LATENCY = parse_rule("latency_ms_p50:+5%")
THROUGHPUT = parse_rule("tokens_per_s:-5%")


def _record(case_id, latency_rounds, workload="prefill", status="ok", **metrics):
    """A record whose turns each hold 3 samples around the given per-round latency."""
    samples = [x * f for x in latency_rounds for f in (0.99, 1.0, 1.02)]
    case = {"model": "tiny", "variant": case_id.split("/")[1], "workload": workload, "dtype": "float32",
            "device": "cpu", "new_tokens": 5}
    data = {"latency_ms": samples, "round_sizes": [3] * len(latency_rounds)}
    return Record(case_id=case_id, case=case, status=status,
                  metrics={"latency_ms_p50": float(np.median(samples)), "tokens_per_s": 1e3 / np.median(samples),
                           **metrics},
                  samples=data if status == "ok" else {})


def test_round_values_split_the_samples_into_turn_medians():
    rec = Record("c", {"workload": "prefill"}, "ok", samples={"latency_ms": [1, 2, 3, 10, 20], "round_sizes": [3, 2]})
    assert round_values(rec, "latency_ms_p50").tolist() == [2.0, 15.0]


def test_round_values_of_a_metric_with_several_samples_per_timer_sample():
    # decode: one generation per timer sample, 4 decode steps (TPOT samples) each
    rec = Record("c", {"workload": "decode", "new_tokens": 5}, "ok",
                 samples={"generation_ms": [8.0, 12.0, 40.0], "tpot_ms": [2, 2, 2, 2, 3, 3, 3, 3, 9, 9, 11, 11],
                          "round_sizes": [2, 1]})
    assert round_values(rec, "latency_ms_p50").tolist() == [2.5, 10.0]  # per token: generation / 4
    assert round_values(rec, "tpot_ms_p50").tolist() == [2.5, 10.0]


def test_round_values_need_turns():
    assert round_values(Record("c", {"workload": "prefill"}, "ok", samples={"latency_ms": [1, 2]}),
                        "latency_ms_p50") is None
    odd = Record("c", {"workload": "prefill"}, "ok", samples={"latency_ms": [1, 2, 3], "round_sizes": [2]})
    assert round_values(odd, "latency_ms_p50") is None


@pytest.mark.parametrize("rule,ratio,low,high,q,verdict", [
    (LATENCY, 1.06, 1.03, 1.08, 0.001, "regression"),
    (LATENCY, 1.03, 1.01, 1.051, 0.001, "regression"),  # slower for sure, 5% not ruled out
    (LATENCY, 1.02, 1.01, 1.03, 0.001, "unchanged"),  # a real 2% change, within the threshold
    (LATENCY, 1.022, 1.007, 1.054, 0.02, "inconclusive"),  # sure but small: under half the threshold
    (LATENCY, 1.00, 0.97, 1.07, 0.5, "inconclusive"),
    (LATENCY, 1.04, 1.01, 1.06, 0.08, "inconclusive"),  # not significant once FDR-adjusted
    (LATENCY, 0.90, 0.88, 0.93, 0.001, "improvement"),
    (LATENCY, 1.01, None, None, 1.0, "inconclusive"),
    (THROUGHPUT, 0.94, 0.92, 0.97, 0.001, "regression"),
    (THROUGHPUT, 1.08, 1.06, 1.10, 0.001, "improvement"),
    (THROUGHPUT, 0.99, 0.97, 1.02, 0.3, "unchanged"),
])
def test_classification(rule, ratio, low, high, q, verdict):
    assert _classify(rule, ratio, low, high, q, 0.05) == verdict


def _pair(n_cases, slow_case=None, factor=1.06, rounds=10, seed=0):
    rng = np.random.default_rng(seed)
    base, new = [], []
    for i in range(n_cases):
        drift = 1 + 0.3 * rng.random(rounds)  # the machine's state moves both sides of a round alike
        b = 10 * drift * (1 + 0.003 * rng.standard_normal(rounds))
        n = 10 * drift * (1 + 0.003 * rng.standard_normal(rounds)) * (factor if i == slow_case else 1)
        cid = f"tiny/v{i}/prefill/float32/cpu/b1-p32"
        base.append(_record(cid, b))
        new.append(_record(cid, n))
    return base, new


def test_a_planted_slowdown_is_the_only_regression_despite_drift():
    base, new = _pair(20, slow_case=7)
    result = evaluate_ab(base, new, ["latency_ms_p50:+5%", "tokens_per_s:-5%"])
    regressions = {c.case_id for c in result.regressions}
    assert regressions == {"tiny/v7/prefill/float32/cpu/b1-p32"}
    assert not result.passed and len(result.failures) == 2  # both rules see it
    assert all(c.verdict == "unchanged" for c in result.paired if c.case_id not in regressions)
    slow = next(c for c in result.paired if c.rule.startswith("latency") and c.case_id in regressions)
    assert slow.ratio == pytest.approx(1.06, abs=0.01) and slow.rounds == 10


def test_an_a_a_pair_passes():
    base, new = _pair(20)
    result = evaluate_ab(base, new)
    assert result.passed and result.counts()["regression"] == 0


def test_fdr_adjusts_across_the_run_once_per_case():
    base, new = _pair(5, slow_case=2, factor=1.0)
    result = evaluate_ab(base, new, ["latency_ms_p50:+5%", "tokens_per_s:-5%"])
    latency = [c for c in result.paired if c.metric == "latency_ms_p50"]
    p = sorted(c.p_value for c in latency)
    q = sorted(c.q_value for c in latency)
    assert all(qi >= pi for pi, qi in zip(p, q))
    # five tests, not ten: tokens_per_s is judged on the same rounds as the latency
    assert q[0] == pytest.approx(min(1.0, min(p[i] * 5 / (i + 1) for i in range(5))))
    throughput = {c.case_id: c.q_value for c in result.paired if c.metric == "tokens_per_s"}
    assert all(throughput[c.case_id] == c.q_value for c in latency)


def test_a_case_failing_on_one_side_fails_and_accuracy_rules_still_apply():
    base, new = _pair(2)
    new[1] = Record(new[1].case_id, new[1].case, "failed", reason="boom")
    drift_b = Record("tiny/sdpa/drift/float32/cpu/w2-p32-n4", {"workload": "drift", "variant": "sdpa"}, "ok",
                     metrics={"kl_mean": 0.001})
    drift_n = Record(drift_b.case_id, drift_b.case, "ok", metrics={"kl_mean": 0.2})
    result = evaluate_ab(base + [drift_b], new + [drift_n])
    text = "\n".join(result.failures)
    assert not result.passed
    assert "was ok, now failed" in text and "kl_mean" in text


def test_renderers_show_verdicts_and_escape():
    base, new = _pair(3, slow_case=0)
    result = evaluate_ab(base, new)
    text = render_ab_text(result, "header <b>")
    assert "regression" in text and "ab: FAIL" in text
    md = render_ab_markdown(result, "header")
    assert md.startswith("## ❌ infermatrix ab: failed") and "| `tiny/v0" in md
    page = render_ab_html(result, "<script>")
    assert "<script>" not in page and "&lt;script&gt;" in page and 'class="worse"' in page
    data = json.loads(json.dumps(ab_json(result)))
    assert data["counts"]["regression"] == 2 and not data["passed"]
    assert "false alarms: 2" in render_ab_calibration(result)


def test_default_rules_gate_speed_at_five_percent_and_keep_accuracy_bounds():
    assert "latency_ms_p50:+5%" in AB_DEFAULT_RULES and "tokens_per_s:-5%" in AB_DEFAULT_RULES
    assert "kl_mean:<=0.05" in AB_DEFAULT_RULES
