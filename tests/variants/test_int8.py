"""int8 linear variants: each quantized layer within a bound derived from its
quantization steps, the scales' round trip, LLM.int8's outlier columns, the whole
tiny model within a drift bound, exact weight bytes, and bad input refused clearly."""

import pytest
import torch
import torch.nn as nn

from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.errors import UserError
from infermatrix.variants import apply_variants, missing_requirements, parse_spec
from infermatrix.variants.int8 import (
    Int8DynamicLinear,
    Int8LLMLinear,
    Int8WeightOnlyLinear,
    QuantizedLinear,
    check_int_mm_shape,
    dequantize_per_channel,
    quantize_per_channel,
    quantize_per_token,
)
from infermatrix.tolerances import INT8_LINEAR_REL_L2, INT8_LOGITS_KL_MEAN, INT8_LOGITS_REL_L2
from infermatrix.weights import load_model

SPECS = ["int8_weight_only", "int8_weight_only(backend=dequant)", "int8_dynamic", "int8_dynamic(alpha=0.5)",
         "int8_llm", "torchao_int8_weight_only"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny").model


def layer(k, n, dtype=torch.float32, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(k, n, bias=bias)).to(dtype).eval()


def quantized(holder, spec):
    return apply_variants(holder, parse_spec(spec))[0]


def test_scales_round_trip_within_half_a_step():
    w = torch.randn(40, 96) * torch.logspace(-3, 1, 40)[:, None]  # rows over four decades of magnitude
    w[7] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
    assert torch.equal(scale, w.abs().amax(1).clamp(min=1e-12) / 127)
    assert torch.equal(q.abs().amax(1)[torch.arange(40) != 7], torch.full((39,), 127, dtype=torch.int8))
    assert not q[7].any()  # an all-zero row stays zero, with a finite scale
    # rounding to the nearest step is the only error: |w - q·s| <= s/2 (plus fp32 ulps of w)
    err = (w - dequantize_per_channel(q, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7 * w.abs()).all()
    q2, scale2 = quantize_per_channel(dequantize_per_channel(q, scale))  # quantizing again changes nothing
    assert torch.equal(q2, q) and torch.allclose(scale2, scale, rtol=1e-6)


# The bounds below. One output y_n = Σ_k x_k w_nk.
# * Weight-only: ŵ_nk = w_nk + e_nk with |e_nk| <= s_n/2 (s_n = max_k |w_nk| / 127), so
#   |ŷ_n - y_n| <= (s_n/2) Σ_k |x_k|.
# * W8A8 adds the activation's step t_m = max_k |x_mk| / 127 per token:
#   x̂ŵ - xw = (x̂ - x)ŵ + x(ŵ - w), so |Δ| <= (t_m/2) Σ_k |ŵ_nk| + (s_n/2) Σ_k |x_mk|.
# * Low-precision arithmetic adds u·Σ_k |x_k||w_nk| for inputs rounded to a format with
#   unit roundoff u (fp16 2^-11, bf16 2^-8: bitsandbytes computes from fp16 copies),
#   and u·|y| for the rounded output.
def weight_step_bound(x, q, scale):
    return scale[None, :] / 2 * x.abs().sum(1, keepdim=True)  # (M, N)


def act_step_bound(x, q, scale):
    t = x.abs().amax(1, keepdim=True) / 127  # (M, 1)
    return t / 2 * dequantize_per_channel(q, scale).abs().sum(1)[None, :]


def rounding_bound(x, w, y, u):
    return u * (x.abs() @ w.abs().t()) + u * y.abs()


# int8pack serves bf16/fp16 activations; fp32 takes the dequant path (see weight_only_backend)
@pytest.mark.parametrize("backend, dtype", [("dequant", torch.float32), ("dequant", torch.bfloat16),
                                            ("int8pack", torch.bfloat16)])
def test_weight_only_linear_within_its_step_bound(backend, dtype):
    holder = layer(96, 80, dtype, bias=True)
    mod = quantized(holder, f"int8_weight_only(backend={backend})")
    assert isinstance(mod, Int8WeightOnlyLinear) and mod.backend == backend
    x = torch.randn(5, 96).to(dtype)
    xf, w = x.float(), holder[0].weight.float()
    y_ref = xf @ w.t() + holder[0].bias.float()
    bound = weight_step_bound(xf, mod.weight_int8, mod.scale)
    if dtype == torch.bfloat16:  # bf16 scales, bias and output: u = 2^-8 on products and result
        bound = bound + rounding_bound(xf, w, y_ref, 2**-8) + 2**-8 * holder[0].bias.float().abs()
    assert ((mod(x).float() - y_ref).abs() <= bound * 1.01 + 1e-6).all()
    assert (mod(x).float() - y_ref).abs().max() > 0  # it did quantize


def test_dynamic_linear_within_its_step_bound():
    holder = layer(96, 80)
    mod = quantized(holder, "int8_dynamic")
    assert isinstance(mod, Int8DynamicLinear)
    for m in (1, 3, 40):  # torch._int_mm on the CPU takes any number of rows (CUDA pads below 17)
        x = torch.randn(m, 96)
        x[:, 5] *= 8.0  # an outlier channel: it sets each token's step
        y_ref = x @ holder[0].weight.t()
        bound = weight_step_bound(x, mod.weight_int8, mod.scale) + act_step_bound(x, mod.weight_int8, mod.scale)
        assert ((mod(x) - y_ref).abs() <= bound * 1.001 + 1e-5).all(), m


def test_per_token_scales_are_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -7.0]])
    xq, s = quantize_per_token(x)
    assert torch.equal(s.squeeze(1), torch.tensor([2.0, 100.0]) / 127)
    assert xq[0, 1] == -127 and xq[1, 0] == 127


def test_llm_int8_linear_within_its_step_bound():
    holder = layer(96, 80, bias=True)
    mod = quantized(holder, "int8_llm")
    assert isinstance(mod, Int8LLMLinear)
    x = (torch.randn(4, 96) * 1.5).clamp(-5.5, 5.5)  # below the 6.0 threshold: the pure int8 path
    w = holder[0].weight
    wq = mod.inner.weight.data if mod.inner.weight.data.dtype == torch.int8 else mod.inner.state.CB
    q, scale = wq, mod.scb.float() / 127
    y_ref = x @ w.t() + holder[0].bias
    bound = (weight_step_bound(x, q, scale) + act_step_bound(x, q, scale)
             + rounding_bound(x, w, y_ref, 2**-11) + 2**-11 * holder[0].bias.abs())
    assert ((mod(x) - y_ref).abs() <= bound * 1.01 + 1e-4).all()


def test_llm_int8_keeps_outlier_columns_in_fp16():
    holder = layer(128, 64)
    x = torch.rand(6, 128) * 2 - 1
    x[:, 9] = 40.0  # one outlier input column, far above the threshold
    plain, decomposed = quantized(holder, "int8_llm(threshold=0)"), quantized(holder, "int8_llm")
    # the reference uses the same int8 weights, so only the activation's treatment differs
    w_hat = dequantize_per_channel(decomposed.inner.state.CB if decomposed.inner.state.CB is not None
                                   else decomposed.inner.weight.data, decomposed.scb.float() / 127)
    y_ref = x @ w_hat.t()
    err_plain = (plain(x) - y_ref).abs().max()
    err_decomposed = (decomposed(x) - y_ref).abs().max()
    assert 9 in decomposed.inner.state.idx.tolist()  # the column bitsandbytes split off
    # with the outlier inside the int8 range, every token's step is 40/127 instead of 1/127
    assert err_decomposed * 10 < err_plain, (err_decomposed, err_plain)
    assert err_decomposed < 0.05


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).float()


@pytest.mark.parametrize("spec", SPECS + ["int8_weight_only(backend=triton)"])
def test_whole_tiny_model_stays_within_a_drift_bound(tiny, spec):
    # backend=triton: the compiled kernel on a GPU, else the interpreter (tests/conftest.py sets it)
    if "triton" in spec and torch.cuda.is_available():
        tiny = load_model("tiny", torch.float32, "cuda").model
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 24), device=tiny.output.weight.device)
    ref = logits(tiny, tokens)
    out = logits(apply_variants(tiny, parse_spec(spec)), tokens)
    # The bounds and their reasons: infermatrix.tolerances (measured 0.9-1.3%, KL ~2e-6).
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < INT8_LOGITS_REL_L2, rel
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert kl.mean() < INT8_LOGITS_KL_MEAN


def test_smoothquant_moves_an_activation_outlier_into_the_weights(tiny):
    """An outlier channel in layer 0's attention input: per-token int8 then spends its
    whole range on it; alpha=0.5 divides it out of the activation first."""
    spiked = load_model("tiny").model
    with torch.no_grad():
        spiked.layers[0].attention_norm.weight[5] = 60.0
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 24))
    ref = logits(spiked, tokens)

    def err(spec):
        return ((logits(apply_variants(spiked, parse_spec(spec)), tokens) - ref).norm() / ref.norm()).item()

    plain, smoothed = err("int8_dynamic"), err("int8_dynamic(alpha=0.5)")
    assert smoothed < plain / 2, (smoothed, plain)
    wq = apply_variants(spiked, parse_spec("int8_dynamic(alpha=0.5)")).layers[0].attention.wq
    assert wq.inv_smooth[5] < wq.inv_smooth.median() / 4  # the outlier channel is scaled down most


@pytest.mark.parametrize("spec", SPECS)
def test_the_input_model_is_left_as_it_was(tiny, spec):
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 12))
    before, weights = logits(tiny, tokens), {k: v.clone() for k, v in tiny.state_dict().items()}
    quantized_model = apply_variants(tiny, parse_spec(spec))
    assert all(type(m) is nn.Linear for m in tiny.modules() if isinstance(m, nn.Linear))
    assert not any(isinstance(m, QuantizedLinear) for m in tiny.modules())
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in weights.items())
    assert torch.equal(logits(tiny, tokens), before)
    assert quantized_model.tok_embeddings is tiny.tok_embeddings  # untouched modules are shared, not copied


def test_weight_bytes_are_exact(tiny):
    cfg = tiny.config
    shapes = [(m.out_features, m.in_features) for m in tiny.modules() if isinstance(m, nn.Linear)]
    dense_linear = sum(n * k * 4 for n, k in shapes)
    others = tiny.weight_bytes - dense_linear  # embedding, norms (tiny's head is untied)
    assert not cfg.tie_embeddings
    q_bytes = sum(n * k + 4 * n for n, k in shapes)  # int8 weights + one fp32 scale per row
    assert apply_variants(tiny, parse_spec("int8_weight_only")).weight_bytes == others + q_bytes
    head = tiny.output.out_features * tiny.output.in_features
    head_dense = apply_variants(tiny, parse_spec("int8_weight_only(head=false)"))
    assert type(head_dense.output) is nn.Linear and type(head_dense.layers[0].attention.wq) is not nn.Linear
    assert head_dense.weight_bytes == others + q_bytes - (head + 4 * tiny.output.out_features) + 4 * head
    assert apply_variants(tiny, parse_spec("int8_llm")).weight_bytes == others + q_bytes  # SCB: fp32 per row
    assert apply_variants(tiny, parse_spec("int8_dynamic")).weight_bytes == others + q_bytes
    smooth = apply_variants(tiny, parse_spec("int8_dynamic(alpha=0.5)")).weight_bytes
    assert smooth == others + q_bytes + sum(4 * k for _, k in shapes)  # + 1/s per input channel
    # torchao: int8 data, fp32 scale and an int8 zero point per row
    assert apply_variants(tiny, parse_spec("torchao_int8_weight_only")).weight_bytes == \
        others + sum(n * k + 5 * n for n, k in shapes)


def test_records_carry_weight_bytes_before_and_after(tmp_path):
    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False}, "cases": [
        {"model": "tiny", "variant": ["kv_cache+int8_weight_only", "int8_llm"], "workload": ["decode", "drift"],
         "prompt_len": 16, "new_tokens": 3, "windows": 2}]})
    records = run_matrix(matrix, tmp_path, log=lambda line: None)
    for rec in records:
        assert rec.status == "ok", rec.reason
        m = rec.metrics
        assert m["weight_bytes_dense"] == load_model("tiny").model.weight_bytes
        assert 0.3 * m["weight_bytes_dense"] < m["weight_bytes"] < 0.5 * m["weight_bytes_dense"]


def test_the_linear_op_workload_runs_every_int8_variant(tmp_path):
    """The op workload builds its layer inside inference_mode (torchao's weights must be
    made there too, or state_dict cannot detach them)."""
    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False}, "cases": [
        {"model": "tiny", "variant": ["reference", "int8_weight_only", "torchao_int8_weight_only", "int8_llm",
                                      "int8_dynamic"], "workload": "linear", "dtype": "bfloat16", "prompt_len": 4}]})
    records = run_matrix(matrix, tmp_path, log=lambda line: None)
    assert [r.status for r in records] == ["ok"] * 5, [r.reason for r in records]
    dense = records[0].metrics["weight_bytes"]
    assert dense == 64 * 172 * 2  # tiny's dim -> hidden, bf16
    assert all(r.metrics["weight_bytes"] < 0.6 * dense for r in records[1:])


# ---------------------------------------------------------------------------- bad input

def test_quantizing_a_quantized_model_is_refused(tiny):
    once = apply_variants(tiny, parse_spec("int8_weight_only"))
    for spec in ("int8_weight_only", "int8_dynamic", "int8_llm", "torchao_int8_weight_only"):
        with pytest.raises(UserError, match=f"{spec}: layer 'layers.0.attention.wq' is already quantized "
                                            "\\(by int8_weight_only\\); quantize the dense model once"):
            apply_variants(once, parse_spec(spec))
    ao = apply_variants(tiny, parse_spec("torchao_int8_weight_only"))
    with pytest.raises(UserError, match="already quantized \\(by Linear with Int8Tensor weights\\)"):
        apply_variants(ao, parse_spec("int8_weight_only"))
    with pytest.raises(UserError, match="the model has no nn.Linear layer to quantize"):
        apply_variants(nn.Sequential(nn.ReLU()), parse_spec("int8_dynamic"))


def test_shapes_the_kernels_cannot_take_are_refused():
    # aten._weight_int8pack_mm gives wrong rows (or crashes) for K % 8 != 0 with M > 1
    with pytest.raises(UserError, match="backend=int8pack\\) needs in_features divisible by 8, a layer has 100; "
                                        "use backend=auto"):
        quantized(layer(100, 64, torch.bfloat16), "int8_weight_only(backend=int8pack)")
    auto = quantized(layer(100, 64, torch.bfloat16), "int8_weight_only")  # auto: the dequant path instead
    assert auto.backend == "dequant"
    with pytest.raises(UserError, match="layer 'w2' is 172 -> 64; torch._int_mm on CUDA needs in_features and "
                                        "out_features divisible by 8: use int8_weight_only"):
        check_int_mm_shape(172, 64, "cuda", "w2")
    check_int_mm_shape(172, 64, "cpu", "w2")  # the CPU takes any shape


def test_dtypes_and_devices_a_backend_does_not_support(monkeypatch):
    with pytest.raises(UserError, match="layer '0' has torch.float64 weights; int8 variants take float32, "
                                        "bfloat16 or float16 models: set dtype"):
        quantized(layer(64, 32, torch.float64), "int8_weight_only")
    with pytest.raises(UserError, match="torch.float64 weights"):
        quantized(layer(64, 32, torch.float64), "int8_llm")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(UserError, match="backend=triton\\) runs on CUDA .*use backend=auto on the CPU"):
        quantized(layer(64, 32), "int8_weight_only(backend=triton)")
    with pytest.raises(UserError, match="int8_dynamic\\(alpha>0\\) calibrates on a forward pass of a Transformer"):
        quantized(layer(64, 32), "int8_dynamic(alpha=0.5)")


@pytest.mark.parametrize("spec, message", [
    ("int8_weight_only(backend=cublas)", "backend 'cublas' is not valid; valid: auto, triton, int8pack, dequant"),
    ("int8_dynamic(alpha=1.5)", "alpha must be in \\[0, 1\\]"),
    ("int8_llm(threshold=-1)", "threshold must be >= 0"),
    ("int8_llm(treshold=4)", "has no parameter 'treshold'; its parameters: threshold"),
    ("int8_llm+int8_dynamic", "on the same axis 'linear'"),
])
def test_bad_specs_name_the_field_and_fix(spec, message):
    with pytest.raises(UserError, match=message):
        parse_spec(spec)


def test_requirements_are_known_checks():
    assert missing_requirements({"bitsandbytes", "torchao"}, "cpu") == []  # both installed (test extra)
    assert parse_spec("int8_llm(threshold=4)")[0].spec() == "int8_llm(threshold=4.0)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch._int_mm's M > 16 padding and the "
                                                           "compiled Triton kernel run only on a GPU")
@pytest.mark.parametrize("spec", ["int8_weight_only", "int8_dynamic", "int8_llm"])
def test_cuda_decode_shapes(spec):
    holder = layer(256, 128, torch.bfloat16).cuda()
    mod = quantized(holder, spec)
    for m in (1, 5, 33):
        x = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ holder[0].weight.float().t()
        assert (mod(x).float() - ref).norm() / ref.norm() < INT8_LINEAR_REL_L2, (spec, m)


def test_llm_int8_records_which_matmul_bitsandbytes_really_ran(tmp_path, monkeypatch):
    """Without a CPU kernel (no AVX-512), bitsandbytes multiplies in fp32: the record
    must say `fp32_fallback`, not pass it off as int8."""
    from infermatrix.variants.int8 import bnb_matmul_path

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    # bitsandbytes 0.50 registers its CPU int8 kernel only where torch dispatches to AVX-512
    expected = "int8" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "fp32_fallback"
    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False}, "cases": [
        {"model": "tiny", "variant": ["int8_llm", "int8_weight_only", "int8_dynamic", "sdpa"], "workload": "linear",
         "dtype": "bfloat16", "prompt_len": 4}]})
    llm, weight_only, dynamic, sdpa = run_matrix(matrix, tmp_path / "a", log=lambda line: None)
    assert llm.metrics["linear_path"] == expected
    assert weight_only.metrics["linear_path"] == "int8pack" and dynamic.metrics["linear_path"] == "int_mm"
    assert "linear_path" not in sdpa.metrics
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: False if op == "bitsandbytes::int8_linear_matmul" else has(op, key))
    assert bnb_matmul_path(torch.device("cpu")) == "fp32_fallback"
    (llm,) = run_matrix(parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False},
                                      "cases": [{"model": "tiny", "variant": "int8_llm", "workload": "linear",
                                                 "prompt_len": 4}]}), tmp_path / "b", log=lambda line: None)
    assert llm.metrics["linear_path"] == "fp32_fallback"
