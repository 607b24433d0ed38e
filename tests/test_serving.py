"""Continuous batching over the paged KV cache: each request's greedy output equals
decoding it alone, however the scheduler mixed and preempted it; blocks are all
returned; latency figures follow their definitions on a fake clock."""

import pytest
import torch

from infermatrix.generate import generate_greedy
from infermatrix.model import SHAPE_PRESETS
from infermatrix.serving import (SLO, ClosedLoop, FakeClock, OpenLoop, Request, Scheduler, serve_stream,
                                 stream_metrics)
from infermatrix.variants import apply_variants, parse_spec
from infermatrix.weights import random_model

TINY = SHAPE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, torch.float32, "cpu", seed=0)


def make_requests(count: int, seed: int = 0, prompt=(3, 40), output=(2, 12)) -> list[Request]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        n = int(torch.randint(*prompt, (1,), generator=gen))
        m = int(torch.randint(*output, (1,), generator=gen))
        out.append(Request(i, torch.randint(0, TINY.vocab_size, (n,), generator=gen).tolist(), m))
    return out


class FixedArrivals:
    """A load whose requests arrive at given times."""

    def __init__(self, requests, times):
        self.pending = sorted(zip(times, requests), key=lambda p: p[0])
        for t, r in self.pending:
            r.arrival_s = t

    def due(self, now):
        out = [r for t, r in self.pending if t <= now]
        self.pending = [(t, r) for t, r in self.pending if t > now]
        return out

    def next_arrival(self):
        return self.pending[0][0] if self.pending else None

    def finished(self, request, now):
        pass


def serve(model, requests, load, *, blocks, block=16, max_running=8, budget=32, batching="continuous",
          clock=None):
    paged = apply_variants(model, parse_spec(f"paged_kv_cache(block={block})+sdpa"))
    cache = paged.paged_cache_factory(paged, blocks)
    scheduler = Scheduler(paged, cache, max_running=max_running, token_budget=budget, batching=batching)
    done = serve_stream(scheduler, load, clock or FakeClock(0.01))
    return done, scheduler, cache


@pytest.mark.parametrize("batching", ["continuous", "static"])
@pytest.mark.parametrize("blocks", [64, 6])  # 6 blocks of 16: preemption
def test_every_request_decodes_exactly_what_it_decodes_alone(tiny, batching, blocks):
    requests = make_requests(12)
    alone = {r.id: generate_greedy(apply_variants(tiny, parse_spec("kv_cache+sdpa")), torch.tensor([r.prompt]),
                                   r.max_new_tokens)[0].tolist() for r in requests}
    load = OpenLoop(requests, rate=200.0, seed=1)  # arrivals faster than steps: batches mix
    done, scheduler, cache = serve(tiny, requests, load, blocks=blocks, batching=batching)
    assert sorted(r.id for r in done) == list(range(12))
    for r in done:
        assert r.output == alone[r.id], r.id
    if blocks == 6:  # requests under way were preempted, and finished the same after recomputing
        assert scheduler.preemptions > 0 and sum(r.preemptions for r in done) == scheduler.preemptions
    assert scheduler.step_tokens > scheduler.steps  # steps held several tokens: batches mixed
    # every block came back, and the pool was never overdrawn
    assert cache.used == 0 and not cache.tables and 0 < cache.peak_used <= blocks


def test_chunked_prefill_and_decode_share_steps(tiny):
    """A long prompt arriving while another request decodes is fed in budget-sized chunks,
    each step also carrying the running request's decode token."""
    first, second = Request(0, list(range(1, 6)), 6), Request(1, list(range(10, 40)), 3)
    load = FixedArrivals([first, second], [0.0, 0.015])
    clock = FakeClock(0.01)
    done, scheduler, _ = serve(tiny, [first, second], load, blocks=16, budget=9, clock=clock)
    # steps end at: .01 first's prefill; .02 first decodes (second arrives at .015, after the
    # step began); .03, .04, .05 first decodes + 8 of second's 30; .06 first decodes + the
    # last 6 -> second's first token; .07, .08 second decodes
    assert first.token_s == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    assert second.token_s == pytest.approx([0.06, 0.07, 0.08])
    assert scheduler.step_tokens == 5 + 1 + 3 * (1 + 8) + (1 + 6) + 1 + 1


def test_latency_figures_follow_their_definitions_on_a_fake_clock(tiny):
    """Two clients, each request 4 prompt tokens and 3 outputs, every step 10 ms: both
    prefill in step 1 (t = 10 ms), then decode at 20 and 30 ms; the second pair the same
    from 30 ms."""
    requests = [Request(i, [1 + i, 2, 3, 4], 3) for i in range(4)]
    done, _, _ = serve(tiny, requests, ClosedLoop(requests, concurrency=2), blocks=16)
    metrics, samples = stream_metrics(done, SLO(ttft_ms=15.0, itl_ms=10.5, pct=90))
    assert samples["ttft_ms"] == pytest.approx([10.0] * 4)
    assert samples["itl_ms"] == pytest.approx([10.0] * 8)
    assert samples["e2e_ms"] == pytest.approx([30.0] * 4)
    assert metrics["stream_s"] == pytest.approx(0.06) and metrics["request_throughput"] == pytest.approx(4 / 0.06)
    assert metrics["tokens_per_s"] == pytest.approx(12 / 0.06)
    assert metrics["goodput_rps"] == pytest.approx(4 / 0.06) and metrics["meets_slo"] == 1.0
    strict, _ = stream_metrics(done, SLO(ttft_ms=5.0))
    assert strict["slo_attainment"] == 0.0 and strict["goodput_rps"] == 0.0 and strict["meets_slo"] == 0.0


def test_static_batching_makes_a_late_arrival_wait_for_the_whole_batch(tiny):
    def ttft_of_late(batching):
        requests = [Request(0, [1, 2, 3], 8), Request(1, [4, 5, 6], 2)]
        serve(tiny, requests, FixedArrivals(requests, [0.0, 0.005]), blocks=16, batching=batching)
        return (requests[1].token_s[0] - requests[1].arrival_s) * 1e3

    assert ttft_of_late("continuous") == pytest.approx(15.0)  # joins at the next step (t = 20 ms)
    assert ttft_of_late("static") == pytest.approx(85.0)  # after the first's 8 steps (t = 90 ms)


def test_open_loop_arrivals_are_poisson_at_the_rate():
    requests = [Request(i, [1], 1) for i in range(4000)]
    times = [r.arrival_s for r in OpenLoop(requests, rate=4.0, seed=3).pending]
    gaps = torch.tensor(times).diff()
    assert times[0] == 0.0 and float(gaps.mean()) == pytest.approx(0.25, rel=0.05)
    assert float(gaps.std()) == pytest.approx(0.25, rel=0.08)  # exponential: std = mean
    assert len(OpenLoop([Request(i, [1], 1) for i in range(100)], rate=4.0, duration_s=5.0).pending) < 40


def test_the_pool_hands_out_and_takes_back_blocks(tiny):
    paged = apply_variants(tiny, parse_spec("paged_kv_cache+sdpa"))
    cache = paged.paged_cache_factory(paged, 4)
    assert cache.grow(0, 17) and cache.tables[0] == [0, 1] and cache.used == 2
    assert not cache.grow(1, 50) and not cache.tables.get(1) and cache.used == 2  # short: takes none
    assert cache.grow(1, 32) and cache.used == 4 and cache.peak_used == 4
    cache.release(0)
    assert cache.used == 2 and cache.grow(2, 1) and cache.tables[2] == [0]
    with pytest.raises(ValueError, match="give the pool more blocks"):
        Scheduler(paged, cache, max_running=2, token_budget=8).submit(Request(9, list(range(60)), 10))


def test_generate_greedy_serves_a_paged_model_s_rows_as_one_stream(tiny):
    """The drift workload's greedy agreement of a paged model runs through the scheduler."""
    prompts = torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(5))
    plain = generate_greedy(apply_variants(tiny, parse_spec("kv_cache+sdpa")), prompts, 10)
    assert torch.equal(generate_greedy(apply_variants(tiny, parse_spec("paged_kv_cache(block=32)+sdpa")), prompts, 10),
                       plain)


def test_triton_decode_steps_read_through_the_block_tables(tiny):
    """paged_kv_cache+triton: decode tokens go to the paged Triton kernel (its CPU
    interpreter here), prefill chunks to the gather path and the seam's Triton flash
    kernel; outputs equal plain decoding."""
    from infermatrix.variants import take_paths

    requests = make_requests(5, seed=2)
    alone = {r.id: generate_greedy(apply_variants(tiny, parse_spec("kv_cache+sdpa")), torch.tensor([r.prompt]),
                                   r.max_new_tokens)[0].tolist() for r in requests}
    paged = apply_variants(tiny, parse_spec("paged_kv_cache+triton"))
    cache = paged.paged_cache_factory(paged, 20)
    take_paths()
    done = serve_stream(Scheduler(paged, cache, max_running=4, token_budget=32), OpenLoop(requests, 300.0),
                        FakeClock(0.01))
    assert cache.decode_kernel and {r.id: r.output for r in done} == alone
    assert take_paths()["attention_path"] == "paged_gather+paged_triton_decode+triton_flash"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the paged Triton kernel compiled for a GPU")
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_on_cuda_every_served_request_decodes_what_it_decodes_alone(attention):
    """A Llama-shaped model of 4 layers (random weights) on the GPU in fp32: 24 requests
    through 8 running slots and a pool small enough to preempt."""
    from dataclasses import replace

    cfg = replace(SHAPE_PRESETS["llama-1b"], n_layers=4, vocab_size=4096, max_seq_len=512)
    model = random_model(cfg, torch.float32, "cuda", seed=0)
    requests = [Request(r.id, [t % cfg.vocab_size for t in r.prompt], r.max_new_tokens)
                for r in make_requests(24, seed=4, prompt=(8, 200), output=(4, 40))]
    plain = apply_variants(model, parse_spec("kv_cache+sdpa"))
    alone = {r.id: generate_greedy(plain, torch.tensor([r.prompt], device="cuda"), r.max_new_tokens)[0].tolist()
             for r in requests}
    paged = apply_variants(model, parse_spec(f"paged_kv_cache+{attention}"))
    cache = paged.paged_cache_factory(paged, 40)
    scheduler = Scheduler(paged, cache, max_running=8, token_budget=128)
    done = serve_stream(scheduler, OpenLoop(requests, 1000.0), FakeClock(0.01))
    assert {r.id: r.output for r in done} == alone
    assert cache.decode_kernel == (attention == "triton") and cache.used == 0 and scheduler.preemptions > 0
