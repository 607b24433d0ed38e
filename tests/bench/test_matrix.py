from pathlib import Path

import pytest

from infermatrix.bench.matrix import Case, load_matrix, parse_matrix
from infermatrix.errors import UserError

REPO = Path(__file__).resolve().parents[2]


def test_tables_expand_to_their_cartesian_product():
    m = parse_matrix({"cases": [{
        "model": "tiny", "variant": ["reference", "sdpa"], "workload": "decode",
        "dtype": ["float32", "bfloat16"], "batch": [1, 4], "prompt_len": 16, "new_tokens": 3,
    }]})
    assert len(m.cases) == 8
    assert Case("tiny", "sdpa", "decode", "bfloat16", "cpu", 4, 16, 3) in m.cases
    assert len({c.case_id for c in m.cases}) == 8


def test_prefill_ignores_new_tokens_and_duplicates_run_once():
    m = parse_matrix({"cases": [
        {"model": "tiny", "variant": "sdpa", "workload": "prefill", "new_tokens": [4, 8]},
        {"model": "tiny", "variant": "sdpa", "workload": "prefill"},
    ]})
    assert m.cases == (Case("tiny", "sdpa", "prefill", prompt_len=128, new_tokens=0),)


def test_variant_specs_are_canonicalized():
    m = parse_matrix({"cases": [{"model": "tiny", "variant": " sdpa "}]})
    assert m.cases[0].variant == "sdpa"


def test_shipped_matrices_parse_by_name_and_by_path():
    assert load_matrix().source == "default.toml (built in)"
    assert load_matrix().cases
    assert load_matrix("ci").cases == load_matrix(REPO / "benchmarks" / "ci.toml").cases


@pytest.mark.parametrize(
    "data, message",
    [
        ({"cases": [{"model": "tiny", "variant": "sdpa", "colour": "red"}]}, "unknown key 'colour'; valid: model, "),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "train"}]}, "unknown workload 'train'; valid: prefill, decode"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "dtype": "fp8"}]}, "unknown dtype 'fp8'; valid: float32, float16, bfloat16"),
        ({"cases": [{"model": "gpt-5", "variant": "sdpa"}]}, "#1: unknown model 'gpt-5'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa+reference"}]}, "same axis 'attention'"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "batch": 0}]}, "batch must be a positive integer"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "decode", "new_tokens": 1}]}, "new_tokens >= 2"),
        ({"cases": [{"model": "tiny"}]}, "missing 'variant'"),
        ({"cases": []}, "no \\[\\[cases\\]\\] tables"),
        ({"run": {"repeat": 0}, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "repeat must be at least 1"),
        ({"run": {"speed": 1}, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "unknown \\[run\\] key 'speed'"),
        ({"matrix": []}, "unknown top-level key"),
        ({"cases": [{"model": "tiny", "variant": "sdpa", "device": "cuda:x"}]}, "unknown device 'cuda:x'"),
        ({"run": 3, "cases": [{"model": "tiny", "variant": "sdpa"}]}, "'run' must be a table"),
        ({"cases": {"model": "tiny", "variant": "sdpa"}}, "write \\[\\[cases\\]\\], with double brackets"),
    ],
)
def test_bad_matrices_name_the_field(data, message):
    with pytest.raises(UserError, match=message):
        parse_matrix(data)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist; pass a TOML file or a built-in name: ci, default"):
        load_matrix(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[cases]\nmodel = 1\n")
    with pytest.raises(UserError, match="invalid TOML"):
        load_matrix(bad)
