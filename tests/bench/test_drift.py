from __future__ import annotations

import math

import pytest
import torch

from infermatrix.bench import drift
from infermatrix.bench.drift import drift_metrics, greedy_match_length, model_logits, window_tokens
from infermatrix.errors import UserError
from infermatrix.model import SHAPE_PRESETS, Transformer

KEYS = {
    "ppl_ref", "ppl", "ppl_delta_pct", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agree_pct",
    "dp_mean", "dp_rms", "dp_p01", "dp_p05", "dp_median", "dp_p95", "dp_p99", "dp_min", "dp_max",
    "logits_max_abs", "logits_rel_l2", "sqnr_db",
}


def test_identical_logits_have_zero_drift():
    ref = torch.randn(16, 50)
    targets = torch.randint(0, 50, (16,))
    m = drift_metrics(ref, ref.clone(), targets)
    assert set(m) == KEYS
    assert all(isinstance(v, float) for v in m.values())
    for key in ("kl_mean", "kl_median", "kl_p99", "kl_max", "ppl_delta_pct", "logits_max_abs", "logits_rel_l2"):
        assert m[key] == 0.0, key
    for key in ("dp_mean", "dp_rms", "dp_p01", "dp_p05", "dp_median", "dp_p95", "dp_p99", "dp_min", "dp_max"):
        assert m[key] == 0.0, key
    assert m["top1_agree_pct"] == 100.0
    assert m["sqnr_db"] == float("inf")
    assert m["ppl"] == m["ppl_ref"] > 1.0


def test_hand_computed_three_token_vocab():
    # Logits are log-probabilities, so softmax gives these distributions back exactly.
    p_ref = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], dtype=torch.float64)
    p_var = torch.tensor([[0.35, 0.45, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
    targets = torch.tensor([1, 2])
    m = drift_metrics(p_ref.log(), p_var.log(), targets)

    kl0 = 0.5 * math.log(0.5 / 0.35) + 0.3 * math.log(0.3 / 0.45)  # the 0.2 terms cancel
    kl1 = 0.2 * math.log(0.2 / 0.1) + 0.7 * math.log(0.7 / 0.8)
    assert m["kl_mean"] == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    assert m["kl_max"] == pytest.approx(max(kl0, kl1), rel=1e-12)
    assert m["kl_median"] == pytest.approx((kl0 + kl1) / 2, rel=1e-12)  # median of two = their mean

    ppl_ref = (0.3 * 0.7) ** -0.5  # exp of the mean NLL of the targets
    ppl = (0.45 * 0.8) ** -0.5
    assert m["ppl_ref"] == pytest.approx(ppl_ref, rel=1e-12)
    assert m["ppl"] == pytest.approx(ppl, rel=1e-12)
    assert m["ppl_delta_pct"] == pytest.approx(100 * (ppl / ppl_ref - 1), rel=1e-9)

    # Δp in percentage points: row 0 gains 15 (0.30 -> 0.45), row 1 gains 10 (0.7 -> 0.8).
    assert m["dp_mean"] == pytest.approx(12.5)
    assert m["dp_rms"] == pytest.approx(math.sqrt((15**2 + 10**2) / 2))
    assert m["dp_min"] == pytest.approx(10.0)
    assert m["dp_max"] == pytest.approx(15.0)
    assert m["dp_median"] == pytest.approx(12.5)
    assert m["dp_p01"] == pytest.approx(10.05)  # linear interpolation between 10 and 15
    assert m["dp_p99"] == pytest.approx(14.95)

    assert m["top1_agree_pct"] == 50.0  # row 0 flips from token 0 to token 1

    diff = p_var.log() - p_ref.log()
    assert m["logits_max_abs"] == pytest.approx(float(diff.abs().max()))
    assert m["logits_rel_l2"] == pytest.approx(float(diff.norm() / p_ref.log().norm()))
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(float(p_ref.log().square().sum() / diff.square().sum())))


def test_two_token_vocab_kl():
    ref = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    var = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4)
    m = drift_metrics(ref, var, torch.tensor([0]))
    assert m["kl_mean"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-6)
    assert m["dp_mean"] == pytest.approx(25.0, rel=1e-6)
    assert m["ppl_ref"] == pytest.approx(2.0, rel=1e-6)
    assert m["ppl"] == pytest.approx(4 / 3, rel=1e-6)


def test_constant_shift_is_zero_drift_except_max_abs():
    ref = torch.randn(32, 100, dtype=torch.float64)
    targets = torch.randint(0, 100, (32,))
    m = drift_metrics(ref, ref + 3.5, targets)
    assert m["kl_max"] < 1e-12
    assert m["top1_agree_pct"] == 100.0
    assert abs(m["dp_min"]) < 1e-10 and abs(m["dp_max"]) < 1e-10
    assert abs(m["ppl_delta_pct"]) < 1e-10
    assert m["logits_max_abs"] == pytest.approx(3.5)


def test_top1_disagreement_counted_exactly():
    ref = torch.randn(10, 7)
    var = ref.clone()
    for row in (2, 5, 7):
        other = (int(ref[row].argmax()) + 1) % 7
        var[row, other] = ref[row].max() + 1.0  # a different token now wins
    m = drift_metrics(ref, var, torch.zeros(10, dtype=torch.long))
    assert m["top1_agree_pct"] == pytest.approx(70.0)


def test_low_precision_inputs_and_chunking(monkeypatch):
    ref = torch.randn(37, 64)
    var = ref + 0.05 * torch.randn(37, 64)
    targets = torch.randint(0, 64, (37,))
    whole = drift_metrics(ref, var, targets)
    monkeypatch.setattr(drift, "_CHUNK_ELEMENTS", 5 * 64)  # 5 rows per chunk, ragged last chunk
    chunked = drift_metrics(ref, var, targets)
    assert chunked == pytest.approx(whole, rel=1e-9)
    half = drift_metrics(ref.bfloat16(), var.bfloat16(), targets)
    assert half["kl_mean"] > 0 and math.isfinite(half["sqnr_db"])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        drift_metrics(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        drift_metrics(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2, 3], [9, 2, 3], 0),  # agreement after a mismatch does not count
        ([1, 2], [1, 2, 3], 2),
        ([], [], 0),
    ],
)
def test_greedy_match_length_1d(a, b, expected):
    got = greedy_match_length(torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long))
    assert got == expected and isinstance(got, int)


def test_greedy_match_length_2d_is_row_mean():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    var = torch.tensor([[1, 2, 3, 4], [1, 7, 3, 4]])
    got = greedy_match_length(ref, var)
    assert got == 2.5 and isinstance(got, float)
    with pytest.raises(ValueError):
        greedy_match_length(ref, var[0])


def test_window_tokens_shapes():
    ids = list(range(25))
    w = window_tokens(ids, window=4, n_windows=5)
    assert w.shape == (5, 5) and w.dtype == torch.long
    assert w[1].tolist() == [5, 6, 7, 8, 9]  # consecutive, disjoint rows
    assert torch.equal(window_tokens(torch.arange(30), 4, 5), w)  # tensor input, extra tail ignored


def test_window_tokens_too_short():
    with pytest.raises(UserError, match=r"only 24 tokens; need at least 25 for 5 windows of 4.*--eval-text"):
        window_tokens(list(range(24)), window=4, n_windows=5)
    with pytest.raises(UserError):
        window_tokens(list(range(24)), window=0, n_windows=5)


def test_model_logits_matches_direct_forward():
    model = Transformer(SHAPE_PRESETS["tiny"]).eval()
    windows = torch.randint(0, 512, (3, 9))
    logits, targets = model_logits(model, windows, batch_size=2)
    assert logits.shape == (24, 512) and logits.dtype == torch.float32
    assert not logits.is_inference()
    assert torch.equal(targets, windows[:, 1:].reshape(-1))
    with torch.no_grad():
        direct = model(windows[:, :-1]).reshape(24, 512)
    torch.testing.assert_close(logits, direct)
    assert drift_metrics(logits, logits, targets)["kl_max"] == 0.0

    low, _ = model_logits(model.to(torch.bfloat16), windows)
    assert low.dtype == torch.float32
