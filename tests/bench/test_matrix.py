from pathlib import Path

import pytest

from infermatrix.bench.matrix import Case, builtin_matrices, load_matrix, parse_matrix
from infermatrix.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_tables_expand_to_their_cartesian_product():
    m = parse_matrix({"cases": [{
        "model": "tiny", "variant": ["reference", "sdpa"], "workload": "decode",
        "dtype": ["float32", "bfloat16"], "batch": [1, 4], "prompt_len": 16, "new_tokens": 3,
    }]})
    assert len(m.cases) == 8
    assert Case("tiny", "sdpa", "decode", "bfloat16", "cpu", 4, 16, 3, windows=0) in m.cases
    assert len({c.case_id for c in m.cases}) == 8


def test_prefill_ignores_new_tokens_and_duplicates_run_once():
    m = parse_matrix({"cases": [
        {"model": "tiny", "variant": "sdpa", "workload": "prefill", "new_tokens": [4, 8]},
        {"model": "tiny", "variant": "sdpa", "workload": "prefill"},
    ]})
    assert m.cases == (Case("tiny", "sdpa", "prefill", prompt_len=128, new_tokens=0, windows=0),)


def test_variant_specs_are_canonicalized():
    m = parse_matrix({"cases": [{"model": "tiny", "variant": " sdpa "}]})
    assert m.cases[0].variant == "sdpa"


def test_shipped_matrices_parse_by_name_and_by_path():
    assert load_matrix().source == "default.toml (built in)"
    assert load_matrix().cases
    ci = load_matrix("ci")
    assert len(ci.cases) == 16 and {c.model for c in ci.cases} == {"tiny"} and ci.settings.isolate is False
    assert load_matrix(REPO / "benchmarks" / "ci.toml").cases == ci.cases
    assert load_matrix("ci", {"isolate": True}).settings.isolate is True  # command-line overrides


@pytest.mark.parametrize("name", sorted(builtin_matrices()))
def test_every_shipped_matrix_expands(name):
    """Matrices meant for other machines (gpu, gpu-quick, int8) must still parse here."""
    assert load_matrix(name).cases


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cases": [{"model": "tiny", "variant": "sdpa", "colour": "red"}]}, "unknown key 'colour'; valid: model, "),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "train"}]}, "unknown workload 'train'; valid: prefill, decode, generate, drift, attention, linear"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "dtype": "fp8"}]}, "unknown dtype 'fp8'; valid: float32, float16, bfloat16"),
        ({"cases": [{"model": "gpt-5", "variant": "sdpa"}]}, "#1: unknown model 'gpt-5'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa+reference"}]}, "same axis 'attention'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "batch": 0}]}, "batch must be a positive integer"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "decode", "new_tokens": 1}]}, "new_tokens >= 2"),
        ({"cases": [{"model": "tiny"}]}, "missing 'variant'"),
        ({"cases": []}, "no \\[\\[cases\\]\\] tables"),
        ({"run": {"min_runs": 0}, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "min_runs must be positive"),
        ({"run": {"min_runs": 9, "max_runs": 3}, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "max_runs \\(3\\) is below"),
        ({"run": {"isolate": 1}, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "isolate must be true or false"),
        ({"run": {"min_run": 5}, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "unknown \\[run\\] key 'min_run'; did you mean 'min_runs'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "prompt_lenght": 8}]}, "did you mean 'prompt_len'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "decod"}]}, "unknown workload 'decod'; did you mean 'decode'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "prompt_len": -4}]}, "prompt_len must be a positive integer, got -4"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "decode", "prompt_len": 500, "new_tokens": 20}]},
         "prompt_len 500 \\+ new_tokens 20 exceeds tiny's context of 512 tokens"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "attention", "heads": 8, "kv_heads": 3}]},
         "heads \\(8\\) must be a multiple of kv_heads \\(3\\)"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "attention", "heads": 7}]},
         "heads \\(7\\) does not divide tiny's dim \\(64\\)"),
        ({"cases": [{"model": "tiny", "variant": "sdpa"}], "exclude": [{"colour": "red"}]}, "\\[\\[exclude\\]\\] #1: unknown key 'colour'"),
        ({"matrix": []}, "unknown top-level key"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "device": "cuda:x"}]}, "unknown device 'cuda:x'"),
        ({"run": 3, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "'run' must be a table"),
        ({"cases": {"model": "tiny", "variant": "sdpa"}}, "write \\[\\[cases\\]\\], with double brackets"),
        # labels are promises: combinations that would run something else are refused when read
        ({"cases": [{"model": "tiny", "variant": "kv_cache+flex", "workload": ["prefill", "decode"]}]},
         "kv_cache\\+flex cannot be timed on decode: FlexAttention has no decode step"),
        ({"run": {"cuda_graph": True}, "cases": [{"model": "tiny", "variant": "kv_cache+sdpa",
                                                  "workload": ["prefill", "decode", "generate"]}]},
         "cuda_graph = true times CUDA-graph replays of one call, but decode and generate time each step"),
    ],
)
def test_bad_matrices_name_the_field(data, message):
    with pytest.raises(UserError, match=message):
        parse_matrix(data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass a TOML file or a built-in name: block_sparse, ci, decode, decode-limit, default"):
        load_matrix(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[cases]\nmodel = 1\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_matrix(bad)


def test_exclude_drops_matching_cases_and_include_adds_after():
    m = parse_matrix({
        "cases": [{"model": "tiny", "variant": ["reference", "sdpa"], "dtype": ["float32", "bfloat16"]}],
        "exclude": [{"variant": "reference", "dtype": "bfloat16"}, {"variant": "sdpa", "dtype": ["bfloat16"]}],
        "include": [{"model": "tiny", "variant": "sdpa", "dtype": "bfloat16", "prompt_len": 64}],
    })
    assert [(c.variant, c.dtype, c.prompt_len) for c in m.cases] == [
        ("reference", "float32", 128), ("sdpa", "float32", 128), ("sdpa", "bfloat16", 64)]


def test_op_workload_case_ids_name_their_shapes():
    m = parse_matrix({"cases": [
        {"model": "tiny", "variant": "sdpa", "workload": "attention", "prompt_len": 64, "heads": 8, "kv_heads": 2,
         "head_dim": 32, "causal": False},
        {"model": "tiny", "variant": "reference", "workload": "linear", "batch": 2, "prompt_len": 16,
         "in_features": 64, "out_features": 256},
        {"model": "tiny", "variant": "sdpa", "workload": "drift", "windows": 3, "prompt_len": 32, "new_tokens": 8},
    ]})
    assert [c.case_id.split("/", 5)[-1] for c in m.cases] == [
        "b1-p64-h8-kv2-d32-full", "b2-p16-k64-n256", "w3-p32-n8"]


def test_what_the_labels_allow_still_parses():
    """flex without a cache decodes by recomputing through its own kernel, and a
    cached flex prefill is sparse: both stay; so does cuda_graph for one-call workloads."""
    assert len(parse_matrix({"cases": [{"model": "tiny", "variant": ["flex", "kv_cache+flex"],
                                        "workload": "prefill"}]}).cases) == 2
    assert parse_matrix({"cases": [{"model": "tiny", "variant": "flex", "workload": "decode"}]}).cases
    assert parse_matrix({"cases": [{"model": "tiny", "variant": "kv_cache+flex", "workload": "drift"}]}).cases
    assert parse_matrix({"run": {"cuda_graph": True}, "cases": [{"model": "tiny", "variant": "sdpa",
                                                                 "workload": ["prefill", "attention"]}]}).cases
    # a refused combination that the matrix excludes is never refused
    assert len(parse_matrix({"cases": [{"model": "tiny", "variant": "kv_cache+flex", "workload": ["prefill", "decode"]}],
                             "exclude": [{"workload": "decode"}]}).cases) == 1
    with pytest.raises(UserError, match="compile\\+block_sparse on the CPU: the block-sparse CPU kernel"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "compile+block_sparse", "workload": "prefill"}]})
    assert parse_matrix({"cases": [{"model": "tiny", "variant": "compile+block_sparse(backend=triton)",
                                    "workload": "prefill"}]}).cases


def test_the_pr_gate_matrix_covers_every_shipped_variant_with_judged_drift_rows():
    """The PR workflow gates benchmarks/pr.toml: each built-in variant must have a drift
    row there, and some accuracy rule of its [gate] must judge that row, so a change
    that breaks a variant's numerics fails the gate. A new variant must be added."""
    from infermatrix.reports.gate import filter_matches, parse_rule
    from infermatrix.variants import parse_spec, registered_variants

    matrix = load_matrix("pr")
    shipped = {name for name, cls in registered_variants().items() if cls.__module__.startswith("infermatrix.")}
    drift = [c for c in matrix.cases if c.workload == "drift"]
    assert shipped <= {v.name for c in drift for v in parse_spec(c.variant)} | {"reference"}
    rules = [parse_rule(r) for r in matrix.gate_rules]
    for case in drift:
        judged = {r.metric for r in rules if r.metric in ("kl_mean", "top1_agree_pct")
                  and filter_matches(r.filters, case.case_id, case.to_dict())}
        assert judged == {"kl_mean", "top1_agree_pct"}, case.case_id
    assert {"latency_ms_p50", "tokens_per_s"} <= {r.metric for r in rules}
    assert any(c.workload == "decode" for c in matrix.cases) and any(c.workload == "prefill" for c in matrix.cases)


def test_the_default_matrix_decodes_with_and_without_the_cache_at_one_shape():
    """The speedup chart can show what the cache buys only between rows of one shape."""
    decode = {(c.variant, c.prompt_len, c.new_tokens) for c in load_matrix().cases if c.workload == "decode"}
    recompute = {(p, n) for v, p, n in decode if v == "sdpa"}
    cached = {(p, n) for v, p, n in decode if "kv_cache" in v and "sdpa" in v}
    assert recompute & cached


def test_a_table_baseline_names_each_case_s_baseline_and_adds_missing_ones():
    matrix = parse_matrix({"cases": [
        {"model": "tiny", "variant": ["sdpa+int8_weight_only", "kv_cache+sdpa+int8_weight_only"],
         "workload": "decode", "prompt_len": 16, "new_tokens": 3, "baseline": {"without": "linear"}},
        {"model": "tiny", "variant": ["sdpa", "block_sparse(pattern=sliding,window=64)"], "workload": "attention",
         "prompt_len": 1, "kv_len": 256, "baseline": "sdpa"},
    ]})
    by_id = {c.case_id: c for c in matrix.cases}
    int8 = next(c for c in matrix.cases if c.variant == "int8_weight_only+sdpa+kv_cache")  # canonical order
    base = by_id[matrix.baselines[int8.case_id]]
    assert base.variant == "sdpa+kv_cache" and base.workload == "decode" and base.prompt_len == 16
    assert "sdpa" in {c.variant for c in matrix.cases if c.workload == "decode"}  # added: no table lists it
    sparse = next(c for c in matrix.cases if c.variant.startswith("block_sparse"))
    assert by_id[matrix.baselines[sparse.case_id]].variant == "sdpa"
    assert len(matrix.cases) == 6


@pytest.mark.parametrize("baseline, message", [
    ({"without": "linearr"}, "unknown axis 'linearr'; did you mean 'linear'"),
    ("no_such_variant", "baseline: unknown variant"),
    (3, "baseline must be a variant spec"),
])
def test_a_bad_baseline_is_refused_naming_it(baseline, message):
    with pytest.raises(UserError, match=message):
        parse_matrix({"cases": [{"model": "tiny", "variant": "sdpa", "baseline": baseline}]})


def test_one_case_with_two_baselines_is_refused():
    table = {"model": "tiny", "variant": ["reference", "sdpa"]}
    with pytest.raises(UserError, match="already has the baseline"):
        parse_matrix({"cases": [{**table, "baseline": "reference"}, {**table, "baseline": "sdpa"}]})


def test_a_baseline_that_an_exclude_drops_or_no_variant_can_run_is_refused_naming_it():
    table = {"model": "tiny", "variant": ["reference", "sdpa"], "baseline": "reference"}
    with pytest.raises(UserError, match=r"has the baseline tiny/reference/.*which \[\[exclude\]\] #1 drops"):
        parse_matrix({"cases": [table], "exclude": [{"variant": "reference"}]})
    with pytest.raises(UserError, match=r"a baseline no table lists; change the table's `baseline`.*flex runs fewer"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "attention", "prompt_len": 1,
                                 "kv_len": 256, "baseline": "flex(pattern=sliding,window=64)"}]})
    with pytest.raises(UserError, match="without = \\[\\] removes nothing"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "sdpa", "baseline": {"without": []}}]})
