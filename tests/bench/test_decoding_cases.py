"""The decoding axis in the harness: speculative cases' records, the edit task's
prompts, and the refusals when a matrix is read."""

import pytest
import torch

from infermatrix.bench import workloads
from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.errors import UserError
from infermatrix.model import SHAPE_PRESETS
from infermatrix.variants import parse_spec
from refusals import refusal

QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 6, "max_time_s": 0.5, "isolate": False}


def quiet(line):
    pass


def decode_matrix(**table):
    return parse_matrix({"run": QUICK, "cases": [{"model": "tiny", "workload": "decode", "prompt_len": 16,
                                                  "new_tokens": 9, **table}]})


def test_a_speculative_decode_record_has_acceptance_tokens_per_forward_and_draft_share(tmp_path):
    plain, lookup = run_matrix(decode_matrix(variant=["kv_cache+sdpa", "prompt_lookup(k=3)+kv_cache+sdpa"]),
                               tmp_path, log=quiet)
    m = lookup.metrics
    assert lookup.status == "ok" and 0.0 <= m["acceptance_rate"] <= 1.0 and 0.0 < m["draft_time_share"] < 1.0
    assert 1.0 <= m["tokens_per_forward"] <= 4.0  # 1 .. k + 1 tokens per verifying forward
    assert m["target_forwards"] * m["tokens_per_forward"] == pytest.approx(8)  # the 8 decode tokens
    # one forward per token is the roofline's model: a speculative row has no % of limit
    assert "pct_of_limit" not in m and "pct_of_limit" in plain.metrics
    assert "acceptance_rate" not in plain.metrics


def test_speculative_decode_figures_follow_their_definitions(tmp_path, monkeypatch):
    """The draft is the target itself (tiny, same seed): every draft is accepted, so 8
    decode tokens take 2 steps, of 5 (k = 4, plus the model's own) and 3 (capped at the
    tokens left). The prefill step takes 10 ms, each decode step 2 ms."""

    def fake_time_once(step, device):
        prefill = step.__self__.tokens.shape[1] == step.__self__.prompt_len
        step()
        return 10.0 if prefill else 2.0

    monkeypatch.setattr(workloads, "time_once", fake_time_once)
    record = run_matrix(decode_matrix(variant="draft(model=tiny)+kv_cache+sdpa"), tmp_path, log=quiet)[0]
    m = record.metrics
    assert m["acceptance_rate"] == 1.0 and m["tokens_per_forward"] == 4.0 and m["target_forwards"] == 2
    assert m["drafted_tokens"] == 6 and m["ttft_ms_p50"] == 10.0
    assert m["tokens_per_s"] == pytest.approx(8 / 4e-3)  # 8 decode tokens in 2 x 2 ms, as plain rows count
    assert m["latency_ms_p50"] == pytest.approx(4 / 8)  # ms per decode token
    runs = m["runs"]  # each generation: a step of 5 tokens, one of 3; a sample per token
    assert sorted(record.samples["tpot_ms"]) == pytest.approx(sorted([2 / 5] * 5 * runs + [2 / 3] * 3 * runs))


def test_drift_of_a_speculative_variant_matches_the_reference_greedy_tokens(tmp_path):
    matrix = parse_matrix({"run": QUICK, "cases": [{"model": "tiny", "workload": "drift", "prompt_len": 16,
                                                    "windows": 2, "new_tokens": 12,
                                                    "variant": "prompt_lookup+kv_cache+sdpa"}]})
    m = run_matrix(matrix, tmp_path, log=quiet)[0].metrics
    assert m["greedy_match_len"] == 12 and m["kl_mean"] == pytest.approx(0.0, abs=1e-9)


def test_the_task_field_names_edit_cases_and_leaves_continue_ids_as_they_were():
    matrix = parse_matrix({"cases": [
        {"model": "smollm2-135m", "variant": "kv_cache+sdpa", "workload": "decode", "task": ["continue", "edit"]},
        {"model": "smollm2-135m", "variant": "sdpa", "workload": "prefill", "task": "edit"},
    ]})
    ids = [c.case_id for c in matrix.cases]
    assert ids == ["smollm2-135m/sdpa+kv_cache/decode/float32/cpu/b1-p128-n32",
                   "smollm2-135m/sdpa+kv_cache/decode/float32/cpu/b1-p128-n32-edit",
                   "smollm2-135m/sdpa/prefill/float32/cpu/b1-p128"]  # prefill takes no task


def test_edit_prompts_fill_prompt_len_with_an_instruction_around_real_text(smollm2):
    prompts = workloads.edit_prompts(smollm2, 2, 200, None)
    assert prompts.shape == (2, 200) and not torch.equal(prompts[0], prompts[1])  # a passage per row
    text = smollm2.tokenizer.decode(prompts[0].tolist(), skip_special_tokens=False)
    assert text.startswith(f"<|im_start|>user\n{workloads.EDIT_INSTRUCTION}\n\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "statement" in text
    with pytest.raises(UserError, match="raise prompt_len to at least"):
        workloads.edit_prompts(smollm2, 1, 20, None)


def test_a_draft_with_another_vocabulary_or_too_few_positions_is_refused():
    draft = parse_spec("draft(model=other)")[0]
    tiny = SHAPE_PRESETS["tiny"]
    draft.check_draft(tiny, tiny, None, 64)  # the same vocabulary
    with pytest.raises(ValueError, match="another vocabulary than the target .512 against 128256 ids"):
        draft.check_draft(SHAPE_PRESETS["llama-1b"], tiny, None, 64)
    with pytest.raises(ValueError, match="their tokenizers map ids to different tokens"):
        draft.check_draft(tiny, tiny, False, 64)
    with pytest.raises(ValueError, match="holds 512 positions"):
        draft.check_draft(tiny, tiny, None, 600)


def test_a_draft_without_the_target_s_tokenizer_is_refused_when_the_matrix_is_read():
    """SmolLM2 has a tokenizer; a random preset has none, so its ids mean no tokens."""
    with pytest.raises(UserError, match="the draft has no tokenizer and the other has one"):
        parse_matrix({"cases": [{"model": "smollm2-135m", "workload": "decode",
                                 "variant": "draft(model=tiny)+kv_cache+sdpa"}]})


@pytest.mark.parametrize("table, message", [
    ('variant = "prompt_lookup(k=0)+kv_cache"', "k=0: the drafts per step must be at least 1"),
    ('variant = "early_exit(layer=2)+kv_cache"', "early_exit(layer=2) is outside the model"),
    ('variant = "draft(model=llama-1b)+kv_cache"', "another vocabulary than the target (128256 against 512 ids)"),
    ('variant = "prompt_lookup+sdpa"', "add kv_cache"),
    ('variant = "prompt_lookup+kv_cache"\nbatch = 2', "batched verification is not supported"),
    ('variant = "prompt_lookup+kv_cache"\nworkload = "prefill"', "the prefill workload generates none"),
    ('variant = "prompt_lookup+kv_cache+compile"', "drop the graph variant"),
    ('variant = "kv_cache"\ntask = "edit"', "needs its tokenizer"),
    ('variant = "kv_cache"\ntask = "summarise"', "unknown task 'summarise'"),
])
def test_bad_decoding_input_is_one_line_and_exit_2(tmp_path, table, message):
    workload = "" if "workload" in table else 'workload = "decode"\n'
    assert message in refusal(tmp_path, f'[[cases]]\nmodel = "tiny"\n{workload}{table}\n')
