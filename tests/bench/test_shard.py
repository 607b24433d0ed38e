import dataclasses
import hashlib

import pytest

from infermatrix.bench.matrix import Case, load_matrix, parse_matrix
from infermatrix.bench.runner import peak_dtypes, run_matrix
from infermatrix.bench.shard import (assign_shards, estimate_cost, parse_shard, shard_costs, shard_matrix,
                                     split_settings)
from infermatrix.errors import UserError
from infermatrix.reports.record import read_records

QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 10, "max_time_s": 0.5, "isolate": False}

# lists in one order, and the same matrix with every list and table reversed
TABLES = [
    {"model": "tiny", "variant": ["reference", "sdpa", "kv_cache+sdpa"], "workload": ["prefill", "decode"],
     "dtype": ["float32", "bfloat16"], "batch": [1, 2, 4], "prompt_len": [16, 32, 64], "new_tokens": 4},
    {"model": "tiny", "variant": ["reference", "sdpa"], "workload": "attention", "prompt_len": [64, 128, 256]},
    {"model": "tiny", "variant": "reference", "workload": "linear", "batch": [1, 8], "prompt_len": [16, 512]},
]


def _reversed(table):
    return dict(reversed([(k, list(reversed(v)) if isinstance(v, list) else v) for k, v in table.items()]))


def matrix(tables=TABLES):
    return parse_matrix({"run": QUICK, "cases": tables})


def ids(cases):
    return [c.case_id for c in cases]


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 3 / 3 ", (3, 3))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0/3", "--shard 0/3: the shard index K counts from 1 to N (3); use --shard 1/3 to --shard 3/3"),
    ("4/3", "--shard 4/3: the shard index K counts from 1 to N (3); use --shard 1/3 to --shard 3/3"),
    ("a/b", "--shard 'a/b' is not K/N: write two whole numbers, e.g. --shard 2/4"),
    ("2", "--shard '2' is not K/N"),
    ("-1/3", "is not K/N"),
    ("1/0", "--shard 1/0: the shard count N must be at least 1"),
])
def test_bad_shard_is_refused_with_the_fix(text, message):
    with pytest.raises(UserError) as err:
        parse_shard(text)
    assert message in str(err.value)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 200])
def test_shards_cover_every_case_exactly_once(n):
    m = matrix()
    shards = [shard_matrix(m, k, n) for k in range(1, n + 1)]
    together = [case for s in shards for case in s.cases]
    assert len(together) == len(m.cases) == len(set(together))
    assert set(together) == set(m.cases)
    for k, s in enumerate(shards, 1):  # each shard keeps the file's order and says which it is
        assert ids(s.cases) == [c.case_id for c in m.cases if c in set(s.cases)]
        assert (s.shard.index, s.shard.count, s.shard.matrix_cases) == (k, n, len(m.cases))
    if n > len(m.cases):
        assert sum(not s.cases for s in shards) == n - len(m.cases)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_assignment_is_stable_under_reordering_of_the_files_lists(n):
    forward = matrix()
    backward = matrix([_reversed(t) for t in reversed(TABLES)])
    assert ids(forward.cases) != ids(backward.cases) and set(forward.cases) == set(backward.cases)
    for k in range(1, n + 1):
        assert set(shard_matrix(forward, k, n).cases) == set(shard_matrix(backward, k, n).cases)


def test_split_ignores_command_line_overrides_of_run_settings(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[run]\nmax_time_s = 10.0\n\n[[cases]]\nmodel = "tiny"\nvariant = ["reference", "sdpa"]\n'
                    'workload = ["prefill", "decode", "attention"]\nprompt_len = [16, 64, 256]\nbatch = [1, 8]\n')
    plain, overridden = load_matrix(path), load_matrix(path, {"max_time_s": 0.01, "timeout_s": 5})
    assert overridden.settings.max_time_s == 0.01 and split_settings(overridden) == plain.settings
    for k in (1, 2, 3):
        assert ids(shard_matrix(plain, k, 3).cases) == ids(shard_matrix(overridden, k, 3).cases)


@pytest.mark.parametrize("name, n", [("default", 2), ("default", 3), ("default", 4), ("ci", 3)])
def test_shards_are_balanced_by_estimated_cost(name, n):
    m = load_matrix(name)
    costs = shard_costs(m, n)
    biggest = max(estimate_cost(c, m.settings) for c in m.cases)
    # greedy onto the least-loaded shard: no shard ends more than one case above another
    assert max(costs) - min(costs) <= biggest + 1e-9
    assert sum(costs) == pytest.approx(sum(estimate_cost(c, m.settings) for c in m.cases))


def test_greedy_balances_better_than_dealing_cases_in_turn():
    m = matrix()
    costs = {c: estimate_cost(c, m.settings) for c in m.cases}
    greedy = max(sum(costs[c] for c in s) for s in assign_shards(m.cases, 4, m.settings))
    ordered = sorted(m.cases, key=lambda c: (-costs[c], c.case_id))
    dealt = max(sum(costs[c] for c in ordered[i::4]) for i in range(4))
    assert greedy <= dealt
    assert greedy <= sum(costs.values()) / 4 + max(costs.values())


def test_cost_model_ranks_cases_by_work():
    base = Case("tiny", "sdpa", "prefill", prompt_len=64)
    assert estimate_cost(dataclasses.replace(base, prompt_len=512)) > estimate_cost(base)
    assert estimate_cost(dataclasses.replace(base, batch=8)) > estimate_cost(base)
    decode = Case("llama-1b", "sdpa", "decode", prompt_len=256, new_tokens=64)
    assert estimate_cost(dataclasses.replace(decode, variant="kv_cache+sdpa")) < estimate_cost(decode)
    assert estimate_cost(dataclasses.replace(base, variant="compile+sdpa")) >= estimate_cost(base) + 30
    assert estimate_cost(dataclasses.replace(base, device="cuda")) < estimate_cost(base)


def test_encoder_cases_are_costed_as_encoder_forwards():
    from infermatrix.bench.shard import _CASE_START_S

    encode = Case("bert-base", "sdpa", "encode", batch=8, prompt_len=128)
    assert estimate_cost(dataclasses.replace(encode, batch=32)) > estimate_cost(encode) > _CASE_START_S
    drift = Case("bert-base", "sdpa", "drift", prompt_len=128, windows=4, new_tokens=0)
    assert estimate_cost(dataclasses.replace(drift, windows=16)) > estimate_cost(drift)
    assert estimate_cost(load_matrix("encoders").cases[0]) > 0


def test_a_shard_run_records_its_shard_and_resumes_only_as_the_same_shard(tmp_path):
    m = dataclasses.replace(matrix(TABLES[1:]), text="# op workloads: quick\n")
    first = shard_matrix(m, 1, 2)
    records = run_matrix(first, tmp_path, log=lambda line: None)
    assert sorted(r.case_id for r in records) == sorted(ids(first.cases))
    for r in read_records(tmp_path):
        assert r.env["shard"] == {"index": 1, "count": 2, "matrix_cases": len(m.cases),
                                  "device_dtypes": [["cpu", "float32"]]}
        assert r.env["matrix_sha256"] == hashlib.sha256(b"# op workloads: quick\n").hexdigest()
    with pytest.raises(UserError, match=r"--shard 2/2: .* holds shard 1/2; resume it with --shard 1/2"):
        run_matrix(shard_matrix(m, 2, 2), tmp_path, resume=True, log=lambda line: None)
    with pytest.raises(UserError, match=r"no --shard: .* holds shard 1/2; resume it with --shard 1/2"):
        run_matrix(m, tmp_path, resume=True, log=lambda line: None)
    edited = shard_matrix(dataclasses.replace(m, text="# op workloads: edited\n"), 1, 2)
    with pytest.raises(UserError, match="another version of the matrix file"):
        run_matrix(edited, tmp_path, resume=True, log=lambda line: None)
    again = run_matrix(first, tmp_path, resume=True, log=lambda line: None)
    assert len(again) == len(records)


def test_a_whole_run_is_not_resumed_as_a_shard(tmp_path):
    m = dataclasses.replace(matrix([{"model": "tiny", "variant": "sdpa", "workload": "attention",
                                     "prompt_len": 16}]), text="# one case\n")
    run_matrix(m, tmp_path, log=lambda line: None)
    with pytest.raises(UserError, match=r"--shard 1/2: .* holds the whole matrix; resume it without --shard"):
        run_matrix(shard_matrix(m, 1, 2), tmp_path, resume=True, log=lambda line: None)


def test_an_empty_shard_still_writes_a_run_folder(tmp_path):
    m = matrix([{"model": "tiny", "variant": "sdpa", "workload": "attention", "prompt_len": 16}])
    empty = shard_matrix(m, 2, 2)
    assert empty.cases == ()
    assert run_matrix(empty, tmp_path, log=lambda line: None) == []
    assert (tmp_path / "records.jsonl").read_text() == "" and (tmp_path / "results.csv").is_file()


@pytest.mark.parametrize("args, message", [
    (["--shard", "0/3"], "infermatrix: error: --shard 0/3: the shard index K counts from 1 to N (3); use --shard 1/3"),
    (["--shard", "4/3"], "infermatrix: error: --shard 4/3: the shard index K counts from 1 to N (3)"),
    (["--shard", "a/b"], "infermatrix: error: --shard 'a/b' is not K/N: write two whole numbers"),
    (["--address", "auto"], "infermatrix: error: --address and --cpus-per-case need --executor ray"),
])
def test_cli_refuses_bad_shard_and_executor_options_with_exit_2(tmp_path, capsys, args, message):
    from infermatrix.cli import main

    assert main(["run", "ci", "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_cli_runs_one_shard(tmp_path, capsys):
    from infermatrix.cli import main

    path = tmp_path / "m.toml"
    path.write_text('[run]\nmin_runs = 3\nmax_time_s = 0.1\nisolate = false\n\n[[cases]]\nmodel = "tiny"\n'
                    'variant = ["reference", "sdpa"]\nworkload = "attention"\nprompt_len = [8, 16, 32]\n')
    assert main(["run", str(path), "--shard", "2/2", "--out", str(tmp_path / "run"), "-q"]) == 0
    expected = shard_matrix(load_matrix(path), 2, 2).cases
    out = capsys.readouterr().out
    assert f"infermatrix: {len(expected)} cases (shard 2/2 of 6, 50% of the estimated cost) from {path}" in out
    assert sorted(r.case_id for r in read_records(tmp_path / "run")) == sorted(ids(expected))


def test_every_shard_measures_peaks_for_the_whole_matrix_dtypes():
    """The peaks' cache key is the dtypes of the whole matrix, so shards on one machine
    share one measurement and one % of the limit, whichever dtypes each shard drew."""
    m = matrix([{"model": "tiny", "variant": "sdpa", "workload": "attention", "prompt_len": [16, 32, 64],
                 "dtype": ["float32", "bfloat16"]}])
    whole = peak_dtypes(m)
    assert whole == {"cpu": ("bfloat16", "float32")}
    for k in (1, 2, 3, 4, 5, 6):
        assert peak_dtypes(shard_matrix(m, k, 6)) == whole
