import json

import pandas as pd
import pytest
import torch

from infermatrix.bench import runner, workloads
from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.errors import UserError
from infermatrix.reports.record import read_records
from infermatrix.weights import LoadedModel

QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 10, "max_time_s": 0.5}


def quiet(line):
    pass


def small_matrix(run=None, **overrides):
    table = {"model": "tiny", "variant": ["reference", "sdpa"], "workload": ["prefill", "decode"],
             "batch": [1, 2], "prompt_len": 16, "new_tokens": 3, **overrides}
    return parse_matrix({"run": {**QUICK, "isolate": False, **(run or {})}, "cases": [table]})


def test_run_writes_one_record_and_one_csv_row_per_case(tmp_path):
    matrix = small_matrix()
    records = run_matrix(matrix, tmp_path, log=quiet)
    assert [r.status for r in records] == ["ok"] * 8
    on_disk = read_records(tmp_path)
    assert sorted(r.case_id for r in on_disk) == sorted(c.case_id for c in matrix.cases)
    frame = pd.read_csv(tmp_path / "results.csv")
    assert len(frame) == 8
    assert {"model", "variant", "workload", "latency_ms_p50", "latency_ms_p99", "latency_ms_ci_rel",
            "tokens_per_s", "weight_bytes", "pct_of_limit"} <= set(frame.columns)
    assert (frame["tokens_per_s"] > 0).all()
    decode = next(r for r in on_disk if r.case["workload"] == "decode")
    runs = decode.metrics["runs"]
    assert len(decode.samples["generation_ms"]) == runs and len(decode.samples["tpot_ms"]) == 2 * runs
    assert decode.metrics["tpot_ms_p50"] <= decode.metrics["tpot_ms_p99"]
    assert decode.env["versions"]["torch"] and decode.env["peaks"]["cpu"]["bandwidth_gbs"] > 0


@pytest.mark.parametrize("workload, keys", [
    ("generate", ["latency_ms_p50", "ttft_ms_p50", "tpot_ms_p90", "tokens_per_s"]),
    ("attention", ["achieved_tflops", "achieved_gbs", "pct_of_limit", "bound"]),
    ("linear", ["achieved_tflops", "achieved_gbs", "pct_of_limit", "weight_bytes"]),
    ("drift", ["kl_mean", "top1_agree_pct", "ppl_delta_pct", "dp_p99", "sqnr_db", "greedy_match_len"]),
])
def test_every_workload_reports_its_metrics(tmp_path, workload, keys):
    matrix = parse_matrix({"run": {**QUICK, "isolate": False}, "cases": [
        {"model": "tiny", "variant": "reference" if workload == "linear" else "sdpa", "workload": workload,
         "prompt_len": 16, "new_tokens": 3, "windows": 2}]})
    rec = run_matrix(matrix, tmp_path, log=quiet)[0]
    assert rec.status == "ok", rec.reason
    assert all(rec.metrics.get(k) is not None for k in keys), rec.metrics


def test_cached_decode_reports_its_exact_cache_bytes_and_cached_roofline(tmp_path):
    matrix = small_matrix(workload="decode", variant=["sdpa", "kv_cache+sdpa"], batch=2, new_tokens=5)
    plain, cached = run_matrix(matrix, tmp_path, log=quiet)
    assert plain.metrics["kv_cache_bytes"] == 0
    # tiny: 2 layers x K and V x batch 2 x 2 KV heads x (16 + 5) slots x head dim 16 x 4 bytes
    assert cached.metrics["kv_cache_bytes"] == 2 * 2 * 2 * 2 * 21 * 16 * 4
    assert cached.metrics["flops"] < plain.metrics["flops"]  # one position per step, not the prefix
    assert cached.metrics["first_call_ms"] > 0


@pytest.mark.parametrize("seed", [0, 3])
def test_reference_drift_against_itself_is_zero(tmp_path, seed):
    matrix = parse_matrix({"run": {**QUICK, "isolate": False, "seed": seed}, "cases": [
        {"model": "tiny", "variant": "reference", "workload": "drift", "prompt_len": 16, "windows": 2,
         "new_tokens": 4}]})
    m = run_matrix(matrix, tmp_path, log=quiet)[0].metrics
    assert (m["kl_max"], m["top1_agree_pct"], m["ppl_delta_pct"], m["greedy_match_len"]) == (0.0, 100.0, 0.0, 4)



def _drift_case(tmp_path, monkeypatch, variant="sdpa"):
    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "cache"))  # no reference cached by another test
    return parse_matrix({"run": {**QUICK, "isolate": False}, "cases": [
        {"model": "tiny", "variant": variant, "workload": "drift", "prompt_len": 16, "windows": 2,
         "new_tokens": 4}]})


def test_drift_against_a_non_fp32_reference_fails(tmp_path, monkeypatch):
    real_load = workloads.load_model
    monkeypatch.setattr(workloads, "load_model",  # the reference loaded in bf16 instead of fp32
                        lambda name, dtype, device, seed=0: real_load(name, torch.bfloat16, device, seed=seed))
    rec = run_matrix(_drift_case(tmp_path, monkeypatch), tmp_path / "run", log=quiet)[0]
    assert rec.status == "failed" and "fp32 reference" in rec.reason and "bfloat16" in rec.reason, rec.reason
    assert not list((tmp_path / "cache").glob("ref_logits/*"))  # nothing wrong is cached for later runs


def test_drift_of_a_variant_against_itself_fails(tmp_path, monkeypatch):
    variant_models = []
    real_apply = workloads.apply_variants

    def apply_and_keep(model, variants):
        variant_models.append(real_apply(model, variants))
        return variant_models[-1]

    monkeypatch.setattr(workloads, "apply_variants", apply_and_keep)
    # the variant's own model handed back as the reference
    monkeypatch.setattr(workloads, "load_model", lambda *a, **k: LoadedModel(variant_models[-1], None, "itself"))
    rec = run_matrix(_drift_case(tmp_path, monkeypatch, variant="reference"), tmp_path / "run", log=quiet)[0]
    assert rec.status == "failed" and "its own reference" in rec.reason, rec.reason


def test_drift_against_a_variant_as_reference_fails(tmp_path, monkeypatch):
    from infermatrix.variants import apply_variants, parse_spec

    real_load = workloads.load_model

    def sdpa_reference(name, dtype, device, seed=0):  # an fp32 model, but not the reference's math
        loaded = real_load(name, dtype, device, seed=seed)
        return LoadedModel(apply_variants(loaded.model, parse_spec("sdpa")), None, "sdpa")

    monkeypatch.setattr(workloads, "load_model", sdpa_reference)
    rec = run_matrix(_drift_case(tmp_path, monkeypatch), tmp_path / "run", log=quiet)[0]
    assert rec.status == "failed" and "fp32 reference" in rec.reason and "attention" in rec.reason, rec.reason


def test_an_interrupted_run_keeps_its_records_and_csv_and_resumes(tmp_path):
    def interrupt_after_first_case(line):
        if line.startswith("[1/"):
            raise KeyboardInterrupt

    matrix = small_matrix()
    with pytest.raises(KeyboardInterrupt):
        run_matrix(matrix, tmp_path, log=interrupt_after_first_case)
    first = read_records(tmp_path)
    assert len(first) == 1 and len(pd.read_csv(tmp_path / "results.csv")) == 1

    lines = []
    records = run_matrix(matrix, tmp_path, resume=True, log=lines.append)
    assert "resuming: 1 cases already recorded, 7 to run" in lines
    assert len(records) == 8 and len(read_records(tmp_path)) == 8
    assert sorted(r.case_id for r in records) == sorted(c.case_id for c in matrix.cases)
    assert read_records(tmp_path)[0].to_json() == first[0].to_json()  # nothing rewritten


def test_resume_survives_a_record_cut_off_mid_write(tmp_path):
    matrix = small_matrix(workload="prefill", variant="sdpa")  # 2 cases
    run_matrix(matrix, tmp_path, log=quiet)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second
    with pytest.warns(UserWarning, match="records.jsonl:2: skipping a record that does not parse"):
        records = run_matrix(matrix, tmp_path, resume=True, log=quiet)
    assert sorted(r.case_id for r in records) == sorted(c.case_id for c in matrix.cases)
    with pytest.warns(UserWarning):  # the cut line stays, on its own line; both records parse
        assert sorted(r.case_id for r in read_records(tmp_path)) == sorted(c.case_id for c in matrix.cases)


def test_decode_figures_follow_their_definitions(tmp_path, monkeypatch):
    """With every step timed at a fixed value, each figure has a known value: step 1
    (the prefill) is 10 ms, each decode step 2 ms."""
    calls = []

    def fake_time_once(fn, device):
        fn()
        calls.append(1)
        return 10.0 if (len(calls) - 1) % 5 == 0 else 2.0

    monkeypatch.setattr(workloads, "time_once", fake_time_once)
    matrix = small_matrix(workload="decode", variant="sdpa", batch=2, new_tokens=5)
    m = run_matrix(matrix, tmp_path, log=quiet)[0].metrics
    assert m["ttft_ms_p50"] == 10.0 and m["tpot_ms_p50"] == 2.0 and m["latency_ms_p50"] == 2.0
    assert m["tokens_per_s"] == pytest.approx(2 * 4 / 8e-3)  # batch 2 x 4 decode tokens in 4 x 2 ms


def test_cases_run_grouped_by_model_and_dtype(tmp_path, monkeypatch):
    loads = []
    real_load = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: loads.append(a[:2]) or real_load(*a, **k))
    matrix = small_matrix(dtype=["float32", "bfloat16"], workload="prefill", batch=1)  # 4 cases, 2 dtypes
    run_matrix(matrix, tmp_path, log=quiet)
    assert len(loads) == 2


@pytest.mark.parametrize("kind, reason", [
    ("raise", "RuntimeError: injected failure"),
    ("segfault", "case process crashed with SIGSEGV"),
    ("exit", "case process exited with status 3 without a record"),
])
def test_isolated_cases_that_crash_or_raise_become_failed_records(tmp_path, kind, reason):
    matrix = parse_matrix({"run": {**QUICK, "isolate": True, "timeout_s": 300}, "cases": [
        {"model": "tiny", "variant": f"sdpa+fault(kind={kind})", "prompt_len": 8},
        {"model": "tiny", "variant": "sdpa", "prompt_len": 8},
    ]})
    records = run_matrix(matrix, tmp_path, log=quiet)
    assert records[0].status == "failed" and reason in records[0].reason
    assert records[1].status == "ok"
    assert len(read_records(tmp_path)) == 2


def test_an_isolated_case_that_hangs_is_killed_at_its_timeout(tmp_path):
    matrix = parse_matrix({"run": {**QUICK, "isolate": True, "timeout_s": 4}, "cases": [
        {"model": "tiny", "variant": "sdpa+fault(kind=hang)", "prompt_len": 8}]})
    rec = run_matrix(matrix, tmp_path, log=quiet)[0]
    assert (rec.status, rec.reason) == ("failed", "timed out after 4 s (killed)")
    assert 4 <= rec.duration_s < 60


def test_cuda_case_without_a_gpu_is_skipped_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    matrix = parse_matrix({"run": QUICK, "cases": [{"model": "tiny", "variant": "sdpa", "device": "cuda"}]})
    rec = run_matrix(matrix, tmp_path, log=quiet)[0]
    assert (rec.status, rec.reason) == ("skipped", "needs CUDA (no CUDA device on this machine)")


def test_a_model_too_big_for_free_memory_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_free_memory", lambda device: 2**30)
    matrix = parse_matrix({"run": QUICK, "cases": [{"model": "llama-7b", "variant": "sdpa", "dtype": "bfloat16"}]})
    rec = run_matrix(matrix, tmp_path, log=quiet)[0]
    assert rec.status == "skipped" and rec.reason == "needs 12.6 GiB for weights alone, 1.0 GiB available"


def test_an_op_workload_refuses_variants_of_another_axis(tmp_path):
    matrix = parse_matrix({"run": {**QUICK, "isolate": False}, "cases": [
        {"model": "tiny", "variant": "sdpa", "workload": "linear", "prompt_len": 8}]})
    rec = run_matrix(matrix, tmp_path, log=quiet)[0]
    assert rec.status == "failed" and "measures linear variants; 'sdpa' is on the attention axis" in rec.reason


def test_an_existing_run_folder_is_not_overwritten(tmp_path):
    run_matrix(small_matrix(workload="prefill", variant="sdpa", batch=1), tmp_path, log=quiet)
    before = (tmp_path / "records.jsonl").read_text()
    with pytest.raises(UserError, match="already holds records.jsonl; choose a new folder or pass --resume"):
        run_matrix(small_matrix(), tmp_path, log=quiet)
    assert (tmp_path / "records.jsonl").read_text() == before
    assert json.loads(before.splitlines()[0])["schema_version"] == 1


def test_eval_text_too_short_is_refused_before_any_case(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")
    matrix = parse_matrix({"run": QUICK, "cases": [
        {"model": "smollm2-135m", "variant": "sdpa", "workload": "drift", "prompt_len": 64, "windows": 2}]})
    with pytest.raises(UserError, match="eval text has 6 tokens for smollm2-135m; .* needs 130"):
        run_matrix(matrix, tmp_path / "run", eval_text=str(short), log=quiet)
    assert not (tmp_path / "run" / "records.jsonl").exists()


def test_decode_shaped_attention_times_one_query_against_kv_len_keys(tmp_path):
    """kv_len: the queries are the last prompt_len of kv_len positions, so a decode step
    (prompt_len 1) reads every key once; the roofline counts those keys, not one."""
    matrix = parse_matrix({"run": {**QUICK, "isolate": False}, "cases": [
        {"model": "tiny", "variant": ["sdpa", "block_sparse(pattern=sliding,window=64)"], "workload": "attention",
         "prompt_len": 1, "kv_len": 512}]})
    assert [c.case_id.rsplit("/", 1)[1] for c in matrix.cases] == ["b1-p1-kvlen512-causal"] * 2
    dense, sparse = run_matrix(matrix, tmp_path, log=quiet)
    assert dense.status == sparse.status == "ok", (dense.reason, sparse.reason)
    # tiny: 4 heads of dim 16 over 2 KV heads; one query sees all 512 keys: 4 * 512 * 16 flops per head
    assert dense.metrics["flops"] == 4 * 4 * 512 * 16
    assert dense.metrics["bytes_moved"] == 4 * (2 * 4 * 16 + 2 * 2 * 512 * 16)
    # the last row of a 64-token window (block 64) sees its own block: 1 of 8 key blocks
    assert sparse.metrics["attention_density"] == pytest.approx(1 / 8)
    assert sparse.metrics["attention_path"] == "block_sparse_gather"
    # ... and streams only that block's 64 keys, which the roofline's bytes count
    assert sparse.metrics["attention_keys_read"] == 64
    assert sparse.metrics["bytes_moved"] == 4 * (2 * 4 * 16 + 2 * 2 * 64 * 16)


def test_kv_len_equal_to_prompt_len_is_the_plain_case_and_below_it_is_refused():
    plain = parse_matrix({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "attention",
                                     "prompt_len": 64, "kv_len": [0, 64]}]})
    assert len(plain.cases) == 1 and plain.cases[0].kv_len == 0
    with pytest.raises(UserError, match=r"kv_len \(32\) is below prompt_len \(64\)"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "sdpa", "workload": "attention", "prompt_len": 64,
                                 "kv_len": 32}]})
    with pytest.raises(UserError, match="flex runs fewer queries"):
        parse_matrix({"cases": [{"model": "tiny", "variant": "flex(pattern=sliding,window=64)",
                                 "workload": "attention", "prompt_len": 1, "kv_len": 512}]})


def test_records_carry_the_baseline_their_table_names(tmp_path):
    matrix = parse_matrix({"run": {**QUICK, "isolate": False}, "cases": [
        {"model": "tiny", "variant": ["sdpa", "block_sparse(pattern=sliding,window=64)"], "workload": "attention",
         "prompt_len": 128, "baseline": "sdpa"}]})
    dense, sparse = run_matrix(matrix, tmp_path, log=quiet)
    on_disk = {r.case_id: r for r in read_records(tmp_path)}
    assert on_disk[sparse.case_id].baseline_id == dense.case_id == on_disk[dense.case_id].baseline_id


def test_an_interleaved_run_gives_each_timed_case_of_a_group_the_same_rounds(tmp_path):
    """[run] interleave: the group's cases take turns, each in its own process; every
    record keeps all its samples and how many each round took, for paired ratios."""
    matrix = parse_matrix({"run": {**QUICK, "interleave": True, "rounds": 3, "turn_s": 0.05}, "cases": [
        {"model": "tiny", "variant": ["sdpa", "block_sparse(pattern=sliding,window=64)"],
         "workload": ["attention", "drift"], "prompt_len": 128, "windows": 1, "new_tokens": 2}]})
    records = {r.case_id: r for r in run_matrix(matrix, tmp_path, log=quiet)}
    assert [r.status for r in records.values()] == ["ok"] * 4, [r.reason for r in records.values()]
    timed = [r for r in records.values() if r.case["workload"] == "attention"]
    for rec in timed:
        sizes = rec.samples["round_sizes"]
        assert len(sizes) == 3 and min(sizes) >= 1
        assert sum(sizes) == len(rec.samples["latency_ms"]) == rec.metrics["runs"]
        assert rec.metrics["peak_rss_bytes"] > 0
    assert all("round_sizes" not in r.samples for r in records.values() if r.case["workload"] == "drift")


def test_interleave_needs_isolated_cases_and_one_machine(tmp_path):
    with pytest.raises(UserError, match="interleave = true .* needs isolate = true"):
        parse_matrix({"run": {"interleave": True, "isolate": False}, "cases": [{"model": "tiny", "variant": "sdpa"}]})
    matrix = parse_matrix({"run": {"interleave": True}, "cases": [{"model": "tiny", "variant": "sdpa"}]})
    with pytest.raises(UserError, match="cannot run on another executor"):
        run_matrix(matrix, tmp_path, log=quiet, executor=lambda cases, ctx, on_start: iter(()))


def test_an_interleaved_case_that_dies_mid_run_fails_alone_and_the_group_keeps_its_rounds(tmp_path):
    matrix = parse_matrix({"run": {**QUICK, "interleave": True, "rounds": 6, "turn_s": 0.1}, "cases": [
        {"model": "tiny", "variant": ["sdpa", "sdpa+fault(kind=exit_later)", "reference"], "workload": "attention",
         "prompt_len": 64}]})
    records = {r.case["variant"]: r for r in run_matrix(matrix, tmp_path, log=quiet)}
    dead = records["sdpa+fault(kind=exit_later)"]
    assert dead.status == "failed" and "exited with status 3" in dead.reason and "during a turn" in dead.reason
    for alive in (records["sdpa"], records["reference"]):
        assert alive.status == "ok" and len(alive.samples["round_sizes"]) == 6
        assert alive.env["interleave"] == records["sdpa"].env["interleave"]  # the same group's rounds
    assert len(read_records(tmp_path)) == 3


def test_an_interleaved_case_that_hangs_is_killed_after_its_timeout(tmp_path):
    matrix = parse_matrix({"run": {**QUICK, "interleave": True, "rounds": 2, "turn_s": 0.05, "timeout_s": 3},
                           "cases": [{"model": "tiny", "variant": ["sdpa", "sdpa+fault(kind=hang)"],
                                      "workload": "attention", "prompt_len": 64}]})
    records = {r.case["variant"]: r for r in run_matrix(matrix, tmp_path, log=quiet)}
    hung = records["sdpa+fault(kind=hang)"]
    assert hung.status == "failed" and hung.reason == "timed out after 3 s before its first turn (killed)"
    assert records["sdpa"].status == "ok" and len(records["sdpa"].samples["round_sizes"]) == 2
