"""block_sparse and flex variants: spec parsing and its errors, the model through
them against the reference with the layout's mask, KV-cache decoding against
full recomputation, the Triton backend (interpreter) against the CPU kernel,
FlexAttention agreement, and what the attention workload reports."""

import pytest
import torch

from infermatrix.bench.matrix import Case
from infermatrix.errors import UserError
from infermatrix.generate import GreedyDecoder
from infermatrix.kernels import block_sparse_layout as L
from infermatrix.model import math_attention
from infermatrix.reports.html_report import render_html
from infermatrix.reports.record import Record
from infermatrix.tolerances import ATTENTION, close
from infermatrix.variants import apply_variants, canonical_spec, parse_spec, with_attention
from infermatrix.variants.block_sparse import BlockSparseAttention
from infermatrix.variants.flex import FlexAttention, to_flex_block_mask
from infermatrix.weights import load_model

FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny").model  # 4 heads, 2 KV heads, head dim 16, context 512


def layout_masked(layout):
    """The reference's own math with the layout's element mask: what block_sparse must compute."""
    def attention(q, k, v, *, causal, mask=None):
        return math_attention(q, k, v, causal=False, mask=layout.dense_mask()[None])
    return attention


def test_spec_round_trip_and_defaults():
    (v,) = parse_spec("block_sparse(pattern=bigbird,window=128,n_random=2,seed=3)")
    assert (v.pattern, v.window, v.n_random, v.seed, v.n_global) == ("bigbird", 128, 2, 3, None)
    assert canonical_spec((v,)) == "block_sparse(pattern=bigbird,window=128,n_random=2,seed=3)"
    assert parse_spec("flex(pattern=longformer,window=64,global_tokens=0;100)")[0].layout_params() == {
        "window": 64, "global_tokens": [0, 100]}
    assert canonical_spec(parse_spec("kv_cache+block_sparse")) == "block_sparse+kv_cache"


@pytest.mark.parametrize("spec, match", [
    ("block_sparse(pattern=sliding,stride=128)", "pattern 'sliding' has no parameter 'stride'; its parameters: window"),
    ("block_sparse(pattern=sliding,window=100)", "window=100 is not a multiple of block_size=64"),
    ("block_sparse(pattern=sliding,window=96,block=64)", "window=96 is not a multiple of block_size=64"),
    ("block_sparse(pattern=sliding)", "needs 'window'"),
    ("block_sparse(pattern=diagonal)", "unknown pattern 'diagonal'"),
    ("block_sparse(backend=cuda)", "backend must be one of auto, torch, triton"),
    ("flex(pattern=strided,stride=64,windw=3)", "has no parameter 'windw'"),
    ("block_sparse(pattern=longformer,window=64,global_tokens=a)", "global_tokens='a' must be token positions"),
])
def test_bad_specs_are_user_errors_naming_the_field(spec, match):
    with pytest.raises(UserError, match=match):
        parse_spec(spec)


def test_a_window_that_fits_the_cpu_block_but_not_cudas_fails_when_the_matrix_is_read():
    """window=64 suits the CPU's default block (64) but not CUDA's (128): a CUDA case
    must fail when the matrix file is read, naming the fix, not hours into the run."""
    from infermatrix.bench.matrix import parse_matrix

    spec = "block_sparse(pattern=sliding,window=64)"
    assert parse_matrix({"cases": [{"model": "tiny", "variant": spec, "device": "cpu"}]}).cases
    with pytest.raises(UserError, match=r"on cuda: .*window=64 is not a multiple of block_size=128.*give block="):
        parse_matrix({"cases": [{"model": "tiny", "variant": spec, "device": "cuda"}]})
    assert parse_matrix({"cases": [{"model": "tiny", "variant": spec.replace(")", ",block=64)"),
                                    "device": "cuda"}]}).cases


@pytest.mark.parametrize("spec, layout", [
    ("block_sparse(pattern=causal,block=32)", lambda t: L.causal(t, 32)),
    ("block_sparse(pattern=sliding,window=64,block=32)", lambda t: L.sliding_window(t, 32, 64)),
    ("block_sparse(pattern=bigbird,window=32,n_random=1,seed=4,block=32)", lambda t: L.bigbird(t, 32, 32, 1, 1, 4)),
])
def test_model_logits_match_the_reference_with_the_layout_mask(tiny, spec, layout):
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 150))  # 150: a short last block
    sparse = apply_variants(tiny, parse_spec(spec))
    masked = with_attention(tiny, layout_masked(layout(150)))
    with torch.no_grad():
        torch.testing.assert_close(sparse(tokens), masked(tokens), **FP32)


def test_causal_pattern_is_exactly_dense_causal_attention(tiny):
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 128))
    with torch.no_grad():
        torch.testing.assert_close(apply_variants(tiny, parse_spec("block_sparse"))(tokens), tiny(tokens), **FP32)


@pytest.mark.parametrize("spec", ["block_sparse(pattern=sliding,window=64,block=32)",
                                  "block_sparse(pattern=bigbird,window=32,n_random=2,seed=1,block=32)",
                                  "block_sparse(pattern=strided,stride=64,block=32)"])
def test_cached_decode_attends_the_layout_rows_like_full_recompute(tiny, spec):
    """Each decode step's new query sees only the key blocks its row allows: the
    same logits as recomputing the whole prefix through the layout."""
    sparse = apply_variants(tiny, parse_spec(spec))
    cached = apply_variants(tiny, parse_spec("kv_cache+" + spec))
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 120))
    cache = cached.new_cache(2, 120)
    with torch.no_grad():
        torch.testing.assert_close(cached(tokens[:, :70], torch.arange(70), cache), sparse(tokens[:, :70]), **FP32)
        for t in range(70, 120, 7):  # steps into earlier blocks' rows and across block edges
            cached(tokens[:, t - 6:t], torch.arange(t - 6, t), cache)  # fill the positions skipped
            step = cached(tokens[:, t:t + 1], torch.tensor([t]), cache)[:, -1]
            torch.testing.assert_close(step, sparse(tokens[:, :t + 1])[:, -1], **FP32)


def test_cached_greedy_generation_matches_recompute(tiny):
    spec = "block_sparse(pattern=sliding,window=32,block=16)"
    prompt = torch.randint(0, tiny.config.vocab_size, (2, 40))
    runs = []
    for full in (spec, "kv_cache+" + spec):
        decoder = GreedyDecoder(apply_variants(tiny, parse_spec(full)), prompt, 30)
        with torch.no_grad():
            runs.append(torch.cat([decoder.step() for _ in range(30)], dim=1))
    assert torch.equal(runs[0], runs[1])


def test_triton_backend_through_the_interpreter_matches_the_cpu_kernel(tiny):
    from infermatrix.kernels.attention_triton import interpreting

    if not interpreting() and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    q, k, v = torch.randn(1, 4, 192, 16), torch.randn(1, 2, 192, 16), torch.randn(1, 2, 192, 16)
    spec = "pattern=bigbird,window=32,n_random=1,block=32"
    triton_out = BlockSparseAttention(parse_spec(f"block_sparse({spec},backend=triton)")[0])(q, k, v, causal=True)
    cpu_out = BlockSparseAttention(parse_spec(f"block_sparse({spec})")[0])(q, k, v, causal=True)
    torch.testing.assert_close(triton_out, cpu_out, **close(ATTENTION, torch.float32))


@pytest.fixture(scope="module")
def flex_shapes():
    """One shape for every FlexAttention test: each new shape is a compile (seconds)."""
    torch.manual_seed(0)
    return torch.randn(1, 4, 256, 16), torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)


@pytest.mark.slow
@pytest.mark.parametrize("params", ["pattern=sliding,window=64", "pattern=bigbird,window=32,n_random=2,seed=5",
                                    "pattern=longformer,window=32,global_tokens=100", "pattern=fixed,stride=128"])
def test_flex_agrees_with_block_sparse_on_the_same_layout(flex_shapes, params):
    q, k, v = flex_shapes
    spec = f"{params},block=32"
    ours = BlockSparseAttention(parse_spec(f"block_sparse({spec})")[0])
    flex = FlexAttention(parse_spec(f"flex({spec})")[0])
    with torch.no_grad():
        torch.testing.assert_close(flex(q, k, v, causal=True), ours(q, k, v, causal=True),
                                   **close(ATTENTION, torch.float32))


def test_flex_block_mask_has_the_layout_blocks():
    layout = L.bigbird(256, 32, 32, n_global=1, n_random=2, seed=5)
    block_mask = to_flex_block_mask(layout, "cpu")
    dense = block_mask.to_dense()[0, 0].bool()  # partial and full blocks together
    assert torch.equal(dense, layout.block_mask()[0])
    assert torch.equal(block_mask.kv_num_blocks[0, 0], torch.ones(8, dtype=torch.int32))  # only the diagonal masked


def test_attention_workload_reports_density_and_a_picture():
    (variant,) = parse_spec("block_sparse(pattern=sliding,window=128)")
    metrics = variant.report_metrics(Case(model="tiny", variant="block_sparse", workload="attention", prompt_len=512,
                                          causal=True, device="cpu"))
    assert metrics["attention_density"] == pytest.approx(15 / 64)
    grid = metrics["attention_layout"]
    assert grid.split("/")[1] == "ff000000"
    record = Record(case_id="m/block_sparse/attention", case={"variant": "block_sparse", "workload": "attention",
                                                              "prompt_len": 512}, status="ok", metrics=metrics)
    page = render_html([record])
    assert 'data-chart="layout"' in page and "density 23.4%" in page and page.count("<rect x=") == 15


@pytest.mark.parametrize("seq", [1024, 4096])
@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_a_density_spec_picks_the_sliding_window_nearest_the_target_at_each_length(seq, target):
    """density=... is a sweep across lengths: the window (whole blocks) whose layout density
    is nearest the target, checked against every window's real layout."""
    (variant,) = parse_spec(f"block_sparse(pattern=sliding,density={target})")
    got = variant.report_metrics(Case(model="tiny", variant="block_sparse", workload="attention", prompt_len=seq))
    windows = range(64, seq + 1, 64)
    best = min(windows, key=lambda w: abs(L.sliding_window(seq, 64, w).density - target))
    assert got["layout_window"] == best
    assert got["attention_density"] == pytest.approx(L.sliding_window(seq, 64, best).density)
    assert abs(got["attention_density"] - target) < 64 / seq  # one block of window moves density by < 1/n


def test_density_needs_the_sliding_pattern_and_no_window():
    for spec in ("block_sparse(pattern=strided,stride=128,density=0.1)",
                 "block_sparse(pattern=sliding,window=128,density=0.1)", "flex(pattern=sliding,density=1.5)"):
        with pytest.raises(UserError, match="density"):
            parse_spec(spec)


def test_a_longformer_spec_with_far_global_tokens_parses():
    """The spec is probed at parse time on a layout long enough for its global tokens."""
    (variant,) = parse_spec("block_sparse(pattern=longformer,window=128,global_tokens=0;512)")
    assert variant.layout_params()["global_tokens"] == [0, 512]


def rows_masked(layout):
    """The old cached path, kept as the oracle: the buffer-length layout's rows at each
    query's position, with the cache's mask, through the reference math."""
    def attention(q, k, v, *, causal, mask=None):
        from infermatrix.model import last_visible_key

        allowed = layout.rows_mask(last_visible_key(mask)).permute(1, 0, 2, 3)  # (B, Hl, Tq, Tk)
        return math_attention(q, k, v, causal=False, mask=allowed & mask)
    return attention


CACHED_SPECS = {  # spec -> its layout over a 160-slot buffer (block 32: a short last block after 150)
    "sliding": ("block_sparse(pattern=sliding,window=64,block=32)", lambda n: L.sliding_window(n, 32, 64)),
    "bigbird": ("block_sparse(pattern=bigbird,window=32,n_random=2,seed=1,block=32)",
                lambda n: L.bigbird(n, 32, 32, 1, 2, 1)),
    "strided": ("block_sparse(pattern=strided,stride=64,block=32)", lambda n: L.strided(n, 32, 64)),
    "fixed": ("block_sparse(pattern=fixed,stride=64,block=32)", lambda n: L.fixed(n, 32, 64)),
    # a global token past the prompt: the prefix layout must be the buffer layout's prefix
    "longformer": ("block_sparse(pattern=longformer,window=32,global_tokens=0;130,block=32)",
                   lambda n: L.longformer(n, 32, 32, (0, 130))),
}


@pytest.mark.parametrize("name", list(CACHED_SPECS))
def test_cached_prefill_and_decode_run_sparse_and_match_the_layout(tiny, name, monkeypatch):
    """Labels are promises: with a KV cache the prefill runs the layout's kernel on the
    filled prefix and each decode step attends over its row's active keys only, never
    the whole buffer, and both give the logits of the layout's mask."""
    import infermatrix.variants.block_sparse as bs
    from infermatrix.variants import take_paths

    spec, make = CACHED_SPECS[name]
    buffer = 160
    seen_keys = []

    def spy(q, k, v, *, causal, mask=None):
        seen_keys.append(k.shape[2])
        return bs.sdpa_attention.__wrapped__(q, k, v, causal=causal, mask=mask)

    spy.__wrapped__ = bs.sdpa_attention
    monkeypatch.setattr(bs, "sdpa_attention", spy)
    cached = apply_variants(tiny, parse_spec("kv_cache+" + spec))
    oracle = apply_variants(tiny, parse_spec("kv_cache"))
    oracle = with_attention(oracle, rows_masked(make(buffer)))
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 150))
    cache, oracle_cache = cached.new_cache(2, buffer), oracle.new_cache(2, buffer)
    take_paths()
    with torch.no_grad():
        torch.testing.assert_close(cached(tokens[:, :100], torch.arange(100), cache),
                                   oracle(tokens[:, :100], torch.arange(100), oracle_cache), **FP32)
        assert take_paths() == {"attention_path": "block_sparse_cpu"} and seen_keys == []
        for t in range(100, 150):
            step = cached(tokens[:, t:t + 1], torch.tensor([t]), cache)
            torch.testing.assert_close(step, oracle(tokens[:, t:t + 1], torch.tensor([t]), oracle_cache), **FP32)
    assert take_paths() == {"attention_path": "block_sparse_gather"}
    layout = make(buffer)  # every step read only its row's keys, never the 160-slot buffer
    assert seen_keys == [len(layout.row_keys(t)) for t in range(100, 150) for _ in range(tiny.config.n_layers)]
    assert min(seen_keys) < 100 or name == "longformer"  # (a global token's block sees every key)


def test_a_padded_batch_runs_dense_and_the_record_says_so(tiny):
    """Left padding has no sparse cached path: it runs the layout as a dense mask,
    correctly, and names that path."""
    from infermatrix.variants import take_paths
    from infermatrix.variants.kv_cache import left_pad

    spec, make = CACHED_SPECS["sliding"]
    prompts = [torch.randint(0, tiny.config.vocab_size, (n,)) for n in (40, 33)]
    tokens, pad = left_pad(prompts)
    cached = apply_variants(tiny, parse_spec("kv_cache+" + spec))
    oracle = with_attention(apply_variants(tiny, parse_spec("kv_cache")), rows_masked(make(64)))
    take_paths()
    with torch.no_grad():
        got = cached(tokens, torch.arange(40), cached.new_cache(2, 64, pad))
        want = oracle(tokens, torch.arange(40), oracle.new_cache(2, 64, pad))
    torch.testing.assert_close(got[1, 7:], want[1, 7:], **FP32)
    torch.testing.assert_close(got[0], want[0], **FP32)
    assert take_paths() == {"attention_path": "dense_masked"}


def test_flex_that_cannot_compile_whole_fails_its_case_instead_of_running_eager(tmp_path, monkeypatch):
    """fullgraph: a graph break inside FlexAttention would fall back to unfused eager
    code under the flex label; the case fails instead, with the reason."""
    import torch.nn.attention.flex_attention as fa

    import infermatrix.variants.flex as flex_module
    from infermatrix.bench.matrix import parse_matrix
    from infermatrix.bench.runner import run_matrix

    real = fa.flex_attention

    def breaking(*args, **kwargs):
        torch._dynamo.graph_break()
        return real(*args, **kwargs)

    monkeypatch.setattr(fa, "flex_attention", breaking)
    monkeypatch.setattr(flex_module, "_compiled", None)
    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False},
                           "cases": [{"model": "tiny", "variant": "flex(pattern=sliding,window=64)",
                                      "workload": "attention", "prompt_len": 128}]})
    (record,) = run_matrix(matrix, tmp_path, log=lambda line: None)
    monkeypatch.setattr(flex_module, "_compiled", None)  # the next test compiles the real one
    assert record.status == "failed"
    assert record.reason.startswith("flex: FlexAttention did not compile into one graph")


@pytest.mark.slow
def test_cached_flex_prefill_runs_flex_and_its_decode_steps_say_dense(tiny):
    """A cached flex prefill is FlexAttention on the filled prefix; its decode steps
    (drift's greedy check only: the matrix refuses them for timing) say `dense_masked`."""
    from infermatrix.variants import take_paths

    spec, make = CACHED_SPECS["sliding"]
    cached = apply_variants(tiny, parse_spec("kv_cache+" + spec.replace("block_sparse", "flex")))
    oracle = with_attention(apply_variants(tiny, parse_spec("kv_cache")), rows_masked(make(160)))
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 129))
    cache, oracle_cache = cached.new_cache(1, 160), oracle.new_cache(1, 160)
    take_paths()
    with torch.no_grad():
        torch.testing.assert_close(cached(tokens[:, :128], torch.arange(128), cache),
                                   oracle(tokens[:, :128], torch.arange(128), oracle_cache), **FP32)
        assert take_paths() == {"attention_path": "flex"}
        torch.testing.assert_close(cached(tokens[:, 128:], torch.tensor([128]), cache),
                                   oracle(tokens[:, 128:], torch.tensor([128]), oracle_cache), **FP32)
    assert take_paths() == {"attention_path": "dense_masked"}


def test_a_cached_block_sparse_decode_record_names_the_sparse_paths(tmp_path):
    """The record of a timed cached decode says what ran: the layout's kernel for the
    prefill and the gathered rows for the steps, never the dense fallback."""
    from infermatrix.bench.matrix import parse_matrix
    from infermatrix.bench.runner import run_matrix

    matrix = parse_matrix({"run": {"warmup": 0, "min_runs": 2, "max_runs": 2, "isolate": False},
                           "cases": [{"model": "tiny", "workload": ["decode", "prefill"], "prompt_len": 96,
                                      "new_tokens": 4, "variant": ["kv_cache+block_sparse(pattern=sliding,window=32,"
                                                                   "block=16)", "kv_cache+sdpa"]}]})
    records = {(r.case["variant"], r.case["workload"]): r for r in run_matrix(matrix, tmp_path, log=lambda _: None)}
    sparse = "block_sparse(pattern=sliding,block=16,window=32)+kv_cache"
    assert records[(sparse, "decode")].metrics["attention_path"] == "block_sparse_cpu+block_sparse_gather"
    assert records[(sparse, "prefill")].metrics["attention_path"] == "block_sparse_cpu"
    assert "attention_path" not in records[("sdpa+kv_cache", "decode")].metrics
