from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from infermatrix.bench import roofline
from infermatrix.bench.roofline import (
    Cost,
    Peaks,
    attention_cost,
    decode_step_cost,
    forward_cost,
    kv_cache_bytes,
    limit_fraction,
    linear_cost,
    load_or_measure_peaks,
    measure_peaks,
    prefill_cost,
)
from infermatrix.model import SHAPE_PRESETS, ModelConfig, causal_mask

# head_dim 4, one KV head for two query heads: every term small enough to add by hand
TINY = ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=12, max_seq_len=16)


def test_cost_add_and_scale():
    c = Cost(2.0, 3.0)
    assert c + Cost(1.0, 1.0) == Cost(3.0, 4.0)
    assert 2 * c == c * 2 == Cost(4.0, 6.0)
    assert c.intensity == pytest.approx(2 / 3)


def test_linear_cost():
    # x (4, 8) @ W (8, 16): 2*4*8*16 FLOPs; bytes 2*(4*8 + 4*16) activations + 0.5*8*16 int4-ish weights
    assert linear_cost(4, 8, 16, act_bytes=2, weight_bytes_per_elem=0.5) == Cost(1024.0, 256.0)


def test_attention_causal_vs_full_square():
    full = attention_cost(2, 4, 2, 5, 5, 8, causal=False, dtype_bytes=2)
    causal = attention_cost(2, 4, 2, 5, 5, 8, causal=True, dtype_bytes=2)
    assert full.flops == 4 * 2 * 4 * 25 * 8  # 6400
    assert causal.flops == 4 * 2 * 4 * 15 * 8  # 5*6/2 = 15 visible pairs per head
    # Q and O at 4 heads, K and V at 2 KV heads; causality saves no bytes
    assert full.bytes == causal.bytes == 2 * (2 * 2 * 4 * 5 * 8 + 2 * 2 * 2 * 5 * 8)


def test_attention_causal_short_query():
    # 2 queries at key positions 3 and 4 of 5: they see 4 and 5 keys
    cost = attention_cost(1, 1, 1, 2, 5, 4, causal=True, dtype_bytes=4)
    assert cost.flops == 4 * 9 * 4
    assert cost.bytes == 4 * (2 * 2 * 4 + 2 * 5 * 4)
    assert attention_cost(1, 1, 1, 2, 5, 4, causal=False, dtype_bytes=4).flops == 4 * 10 * 4


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (1, 7), (3, 7), (6, 6), (7, 9)])
def test_causal_pairs_match_model_mask(q_len, k_len):
    assert roofline.causal_pairs(q_len, k_len) == int(causal_mask(q_len, k_len, torch.device("cpu")).sum())


@pytest.mark.parametrize("q_len, k_len, window", [(1, 1, 1), (7, 7, 3), (40, 40, 8), (1, 30, 8), (5, 12, 20),
                                                   (6, 9, 4)])
def test_a_models_own_window_counts_only_the_pairs_and_keys_it_sees(q_len, k_len, window):
    """Mistral-style window: the model mask's visible pairs, and a decode step past the
    window reads window keys of a longer cache, not all of them."""
    visible = causal_mask(q_len, k_len, torch.device("cpu"), window)
    assert roofline.causal_pairs(q_len, k_len, window) == int(visible.sum())
    cfg = dataclasses.replace(SHAPE_PRESETS["tiny"], sliding_window=window)
    windowed, plain = (attention_cost(1, 4, 2, q_len, k_len, 16, causal=True, dtype_bytes=4, window=w)
                       for w in (window, None))
    keys = min(k_len, window + q_len - 1)
    assert windowed.bytes == plain.bytes - 4 * 2 * 2 * (k_len - keys) * 16
    step, full = (decode_step_cost(c, 1, k_len, dtype_bytes=4, kv_cache=True) for c in (cfg, SHAPE_PRESETS["tiny"]))
    assert (step.flops < full.flops) == (k_len > window)


def test_causal_rejects_more_queries_than_keys():
    with pytest.raises(ValueError, match="q_len <= k_len"):
        attention_cost(1, 1, 1, 4, 3, 4, causal=True, dtype_bytes=2)


def test_forward_cost_tiny_by_hand():
    cost = forward_cost(TINY, batch=1, q_len=3, k_len=3, dtype_bytes=2)
    # linears (in, out): q 8x8, k 8x4, v 8x4, o 8x8, gate 8x12, up 8x12, down 12x8, head 8x10
    # sum in*out = 64+32+32+64+96+96+96+80 = 560; 3 token rows -> 2*3*560
    linear_flops = 2 * 3 * 560
    attn_flops = 4 * 1 * 2 * 6 * 4  # causal 3x3: 6 pairs per head, 2 heads, D=4
    assert cost.flops == linear_flops + attn_flops == 3552
    # activations: 3 rows * sum(in + out) = 3 * (16+12+12+16+20+20+20+18) = 3*134, at 2 bytes
    acts = 2 * 3 * 134
    attn = 2 * (2 * 2 * 3 * 4 + 2 * 1 * 3 * 4)  # Q, O at 2 heads; K, V at 1 KV head
    # params: layer 64+32+32+64 attn + 288 mlp + 16 norms = 496; embed 80; head 80; norm 8 -> 664;
    # the untied table (80) is gathered, not streamed
    assert TINY.num_params() == 664
    weights = 2 * (664 - 80)
    rows = 2 * 3 * 8  # embedding lookup: one 8-wide row per token
    kv_write = 2 * 2 * 1 * 3 * 4  # K and V, 1 KV head, 3 new tokens, D=4
    assert cost.bytes == acts + attn + weights + rows + kv_write == 2212
    no_cache = forward_cost(TINY, 1, 3, 3, dtype_bytes=2, kv_cache=False)
    assert no_cache == Cost(cost.flops, cost.bytes - kv_write)


def test_tied_embeddings_counted_once():
    tied = ModelConfig(**{**TINY.to_dict(), "tie_embeddings": True})
    # tied: the shared table is streamed by the head; untied: the head streams, the table is gathered
    assert roofline.streamed_weight_bytes(tied, dtype_bytes=2) == 2 * tied.num_params() == 2 * 584
    assert forward_cost(tied, 1, 3, 3, dtype_bytes=2) == forward_cost(TINY, 1, 3, 3, dtype_bytes=2)


def test_forward_weight_bytes_override():
    # e.g. int8 linears: the model's whole storage, untied table (at dtype_bytes) taken off
    base = forward_cost(TINY, 1, 3, 3, dtype_bytes=2)
    quant = forward_cost(TINY, 1, 3, 3, dtype_bytes=2, weight_bytes=1000)
    assert quant.bytes - base.bytes == (1000 - 2 * 80) - 2 * 584


def test_prefill_is_square_forward():
    assert prefill_cost(TINY, 2, 5, dtype_bytes=4) == forward_cost(TINY, 2, 5, 5, dtype_bytes=4)


def test_decode_with_cache_reads_weights_and_kv():
    cfg, ctx, bf16 = SHAPE_PRESETS["llama-7b"], 1024, 2
    step = decode_step_cost(cfg, 1, ctx, dtype_bytes=bf16, kv_cache=True)
    assert step == forward_cost(cfg, 1, 1, ctx, dtype_bytes=bf16)
    weights_and_kv = roofline.streamed_weight_bytes(cfg, dtype_bytes=bf16) + kv_cache_bytes(cfg, 1, ctx, bf16)
    assert step.bytes == pytest.approx(weights_and_kv, rel=1e-3)
    assert step.flops == pytest.approx(2 * cfg.num_params(), rel=0.05)  # ~2 FLOPs per weight per token


def test_decode_without_cache_recomputes_prefix():
    step = decode_step_cost(TINY, 2, 6, dtype_bytes=2, kv_cache=False)
    assert step == forward_cost(TINY, 2, 6, 6, dtype_bytes=2, kv_cache=False)
    cached = decode_step_cost(TINY, 2, 6, dtype_bytes=2, kv_cache=True)
    assert step.flops > 5 * cached.flops


def test_kv_cache_bytes_exact():
    cfg = SHAPE_PRESETS["llama-1b"]  # 16 layers, 8 KV heads, head dim 64
    assert kv_cache_bytes(cfg, 4, 2048, 2) == 2 * 16 * 4 * 8 * 2048 * 64 * 2 == 268_435_456


PEAKS = Peaks(device="cpu", bandwidth_gbs=100.0, gemm_tflops={"float32": 1.0}, measured_at="now")


def test_limit_fraction_memory_bound():
    # 1 GFLOP at 1 TFLOP/s = 1 ms; 1 GB at 100 GB/s = 10 ms; measured 20 ms
    out = limit_fraction(Cost(1e9, 1e9), 0.02, PEAKS, "float32")
    assert out["bound"] == "memory"
    assert out["pct_of_limit"] == pytest.approx(50.0)
    assert out["pct_of_bandwidth_peak"] == pytest.approx(50.0)
    assert out["pct_of_compute_peak"] == pytest.approx(5.0)
    assert out["achieved_gbs"] == pytest.approx(50.0)
    assert out["achieved_tflops"] == pytest.approx(0.05)


def test_limit_fraction_compute_bound():
    # 1 TFLOP = 1 s; 1 GB = 10 ms; measured 2 s
    out = limit_fraction(Cost(1e12, 1e9), 2.0, PEAKS, torch.float32)
    assert out["bound"] == "compute"
    assert out["pct_of_limit"] == pytest.approx(50.0)
    assert out["pct_of_bandwidth_peak"] == pytest.approx(0.5)
    with pytest.raises(KeyError, match="bfloat16"):
        limit_fraction(Cost(1.0, 1.0), 1.0, PEAKS, "bfloat16")


def test_peaks_cached_per_key(tmp_path, monkeypatch):
    calls = []

    def fake_measure(device, dtypes, **_):
        calls.append((device, tuple(dtypes)))
        return Peaks(str(device), 10.0 * len(calls), {d: 1.0 for d in dtypes}, "t")

    monkeypatch.setattr(roofline, "measure_peaks", fake_measure)
    first = load_or_measure_peaks("cpu", ("float32",), cache_dir=tmp_path)
    again = load_or_measure_peaks("cpu", ("float32",), cache_dir=tmp_path)
    assert len(calls) == 1 and again == first
    [path] = (tmp_path / "peaks").glob("*.json")
    assert json.loads(path.read_text())["key"]["dtypes"] == ["float32"]

    other = load_or_measure_peaks("cpu", ("float32", "bfloat16"), cache_dir=tmp_path)
    assert len(calls) == 2 and other.bandwidth_gbs == 20.0

    path.write_text("{not json")  # corrupt file: measured again, not crashed on
    load_or_measure_peaks("cpu", ("float32",), cache_dir=tmp_path)
    assert len(calls) == 3

    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "env"))
    load_or_measure_peaks("cpu", ("float32",))
    assert len(calls) == 4 and list((tmp_path / "env" / "peaks").glob("*.json"))


def test_measure_peaks_cpu_quick():
    start = time.perf_counter()
    peaks = measure_peaks("cpu", ("float32",), budget_s=0.5)
    assert time.perf_counter() - start < 5
    assert peaks.device == "cpu" and peaks.bandwidth_gbs > 0 and peaks.gemm_tflops["float32"] > 0


def test_a_sparse_layout_is_credited_with_the_pairs_it_computes():
    dense = attention_cost(1, 8, 8, 1024, 1024, 64, causal=True, dtype_bytes=4)
    sparse = attention_cost(1, 8, 8, 1024, 1024, 64, causal=True, dtype_bytes=4, density=0.125)
    assert sparse.flops == 4.0 * 8 * 0.125 * 1024 * 1024 * 64 and sparse.flops < dense.flops / 3
    assert sparse.bytes == dense.bytes  # Q, K, V and O are still read and written once


def test_encode_cost_by_hand():
    """Encoder: 4 C->C projections and C->F->C per layer on every padded row, attention
    over every pair (not causal), and the weights a forward streams: not the tables
    (gathered) nor the masked-LM head (not run)."""
    from infermatrix.bench.roofline import encode_cost
    from infermatrix.encoder import EncoderConfig

    cfg = EncoderConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, hidden_dim=12, max_seq_len=6,
                        type_vocab_size=2, mlm_head=True)
    cost = encode_cost(cfg, batch=2, seq_len=3, dtype_bytes=2)
    linear_flops = 2 * 6 * (4 * 64 + 96 + 96)  # 6 rows
    attn_flops = 4 * 2 * 2 * 9 * 4  # batch 2, 2 heads, 3x3 pairs, D=4
    assert cost.flops == linear_flops + attn_flops
    acts = 2 * 6 * (4 * 16 + 20 + 20)
    attn = 2 * (2 * 2 * 2 * 3 * 4 + 2 * 2 * 2 * 3 * 4)  # Q, O and K, V: batch 2, 2 heads, 3 rows, D=4
    layer = 4 * (64 + 8) + (96 + 12) + (96 + 8) + 4 * 8  # projections with biases, FFN, two LayerNorms
    assert cfg.num_params() == 18 * 8 + 16 + layer + (64 + 8 + 16 + 10)  # tables, embed norm, layer, head
    rows = 2 * 6 * 8
    assert cost.bytes == acts + attn + 2 * (layer + 16) + rows  # the embedding LayerNorm is read
    # measured streamed bytes (an int8 model's layers) replace the dtype's estimate
    assert encode_cost(cfg, batch=2, seq_len=3, dtype_bytes=2, streamed_bytes=100).bytes == acts + attn + 100 + rows


def test_encode_streams_the_int8_layers_not_the_head(tmp_path):
    """Quantizing the masked-LM head (which encode never runs) leaves the encode
    roofline's streamed bytes as they were; int8 layers stream fewer than dense."""
    from infermatrix.bench.matrix import parse_matrix
    from infermatrix.bench.runner import run_matrix

    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False}, "cases": [
        {"model": "tiny-encoder", "variant": ["sdpa", "int8_weight_only+sdpa", "int8_weight_only(head=false)+sdpa"],
         "workload": "encode", "batch": 2, "prompt_len": 16}]})
    dense, int8, int8_dense_head = (r.metrics["bytes_moved"] for r in run_matrix(matrix, tmp_path, log=print))
    assert int8 == int8_dense_head < dense
