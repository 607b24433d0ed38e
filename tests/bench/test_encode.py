"""Encoders through the harness: the encode workload (real sentences of different
lengths, right-padded), encoder drift (hidden-state cosine and SQNR, masked-LM top-1),
what the reports show of them, and the combinations refused when a matrix is read."""

import pytest
import torch

from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.bench.text import default_text, sentences
from infermatrix.errors import UserError
from infermatrix.reports.html_report import render_html
from infermatrix.reports.markdown_report import render_markdown
from infermatrix.reports.table import render_table

QUICK = {"warmup": 1, "min_runs": 3, "max_runs": 5, "max_time_s": 0.5, "isolate": False}


def quiet(line):
    pass


def run(tmp_path, **case):
    matrix = parse_matrix({"run": QUICK, "cases": [{"model": "tiny-encoder", "variant": "sdpa", **case}]})
    records = run_matrix(matrix, tmp_path, log=quiet)
    assert all(r.status == "ok" for r in records), [r.reason for r in records]
    return records


def test_encode_reports_latency_sequences_and_real_tokens_per_second(tmp_path):
    (rec,) = run(tmp_path, workload="encode", batch=6, prompt_len=24)
    m = rec.metrics
    assert rec.case_id == "tiny-encoder/sdpa/encode/float32/cpu/b6-p24"
    # without a tokenizer, each sentence is as many seeded ids as it has words, cut to prompt_len
    lengths = [min(len(s.split()), 24) for s in sentences(default_text())[:6]]
    assert len(set(lengths)) > 1  # sentences of different lengths: the batch is padded
    assert m["real_tokens"] == sum(lengths) and m["padded_tokens"] == 6 * max(lengths)
    seconds = m["latency_ms_p50"] / 1e3
    assert m["sequences_per_s"] == pytest.approx(6 / seconds)
    assert m["tokens_per_s"] == pytest.approx(sum(lengths) / seconds)  # real tokens, not pad
    assert m["flops"] > 0 and m["weight_bytes"] == m["weight_bytes_dense"]
    table, md, page = render_table([rec]), render_markdown([rec]), render_html([rec])
    assert "seq/s" in table and "seq/s" in md and 'data-col="sequences_per_s"' in page
    assert f"{m['sequences_per_s']:,.1f}" in md


def test_encoder_drift_reports_hidden_state_and_mlm_agreement(tmp_path):
    reference, int8 = run(tmp_path, workload="drift", variant=["reference", "int8_weight_only"], prompt_len=32,
                          windows=3)
    assert reference.case_id == "tiny-encoder/reference/drift/float32/cpu/w3-p32"  # no generated tokens
    m = reference.metrics
    assert (m["hidden_cosine_mean"], m["hidden_sqnr_db"], m["mlm_top1_agree_pct"], m["mlm_kl_mean"]) == \
        (pytest.approx(1.0), float("inf"), 100.0, 0.0)
    q = int8.metrics
    assert 0.999 < q["hidden_cosine_mean"] < 1.0 and 20.0 < q["hidden_sqnr_db"] < 80.0
    assert 90.0 <= q["mlm_top1_agree_pct"] <= 100.0 and q["mlm_kl_mean"] > 0
    assert q["eval_tokens"] == m["eval_tokens"] and q["weight_bytes"] < q["weight_bytes_dense"]
    md = render_markdown([reference, int8])
    assert "hidden cos" in md and "MLM top-1 %" in md and "| inf |" in md


def test_decoder_tables_gain_no_encoder_columns():
    from infermatrix.reports.record import Record

    rec = Record(case_id="tiny/sdpa/prefill", case={"model": "tiny", "workload": "prefill"}, status="ok",
                 metrics={"latency_ms_p50": 1.0, "tokens_per_s": 10.0})
    assert "seq/s" not in render_markdown([rec]) and "cos" not in render_table([rec])


@pytest.mark.parametrize("model, workload, variant, message", [
    ("tiny", "encode", "sdpa", "tiny is a decoder: the encode workload does not apply .*for a decoder use prefill"),
    ("tiny-encoder", "prefill", "sdpa", "tiny-encoder is an encoder: the prefill workload does not apply"),
    ("tiny-encoder", "decode", "sdpa", "an encoder has no next-token step; use encode"),
    ("tiny-encoder", "generate", "sdpa", "the generate workload does not apply"),
    ("tiny-encoder", "encode", "kv_cache+sdpa", "kv_cache does not run on an encoder model: .*no decoding to cache"),
    ("tiny-encoder", "encode", "fused", "fused does not run on an encoder model: it fuses the decoder's"),
    ("tiny-encoder", "encode", "flex(pattern=sliding,window=64)", "flex does not run on an encoder model: .*BlockMask"),
    ("tiny-encoder", "drift", "hf_transformers", "hf_transformers does not run on an encoder model"),
    ("tiny-encoder", "encode", "block_sparse", "block_sparse\\(pattern=causal\\) is causal attention"),
    ("tiny-encoder", "encode", "packed", "packed does not run on an encoder model: it has not been made"),
])
def test_combinations_that_do_not_apply_are_refused_when_the_matrix_is_read(model, workload, variant, message):
    with pytest.raises(UserError, match=message):
        parse_matrix({"cases": [{"model": model, "workload": workload, "variant": variant}]})


def test_encode_uses_the_checkpoint_tokenizer(tmp_path):
    """A BertForMaskedLM folder with its tokenizer: each sentence is tokenized, [CLS] and
    [SEP] included, then cut to prompt_len."""
    transformers = pytest.importorskip("transformers")
    words = sorted({w.strip(".,:;()'\"").lower() for s in sentences(default_text())[:40] for w in s.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w in words if w]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    folder = tmp_path / "bert"
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    matrix = parse_matrix({"run": QUICK, "cases": [{"model": str(folder), "variant": "reference",
                                                     "workload": ["encode", "drift"], "batch": 5,
                                                     "prompt_len": 16, "windows": 2}]})
    encode, drift = run_matrix(matrix, tmp_path / "out", log=quiet)
    assert encode.status == drift.status == "ok", (encode.reason, drift.reason)
    expected = [min(len(tokenizer(s)["input_ids"]), 16) for s in sentences(default_text())[:5]]
    assert encode.metrics["real_tokens"] == sum(expected)
    assert drift.metrics["mlm_top1_agree_pct"] == 100.0


def test_pytest_benchmark_times_one_encode_call_over_its_real_tokens():
    from infermatrix.bench.matrix import RunSettings
    from infermatrix.bench.runner import ModelCache, RunContext
    from infermatrix.bench.workloads import benchmark_callable

    (case,) = parse_matrix({"cases": [{"model": "tiny-encoder", "variant": "sdpa", "workload": "encode",
                                       "batch": 4, "prompt_len": 24}]}).cases
    call, tokens = benchmark_callable(case, RunContext(RunSettings(), {}), ModelCache())
    assert tokens == sum(min(len(s.split()), 24) for s in sentences(default_text())[:4])
    hidden = call()
    assert hidden.shape[0] == 4 and hidden.shape[2] == 64


def test_encoder_drift_reads_its_fp32_reference_from_the_cache_the_second_time(tmp_path, monkeypatch):
    from infermatrix.bench import workloads

    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "cache"))
    (first,) = run(tmp_path / "a", workload="drift", variant="int8_weight_only", prompt_len=32, windows=2)

    def no_reference(*args, **kwargs):
        raise AssertionError("the fp32 reference was loaded again")

    monkeypatch.setattr(workloads, "load_model", no_reference)
    (again,) = run(tmp_path / "b", workload="drift", variant="int8_weight_only", prompt_len=32, windows=2)
    assert again.metrics["hidden_sqnr_db"] == first.metrics["hidden_sqnr_db"]
    with pytest.raises(AssertionError, match="loaded again"):  # other inputs: another key
        run(tmp_path / "c", workload="drift", variant="int8_weight_only", prompt_len=24, windows=2)
