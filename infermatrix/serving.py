"""Serving a request stream: continuous batching over a paged KV cache.

`Scheduler.step()` runs one forward over a mixed batch: one decode token for every
running request whose prompt is in the cache, then prefill chunks of the others
(in admission order) up to a token budget, all flattened into one row so every
linear layer runs once over them (the paged cache keeps each sequence's attention to
its own blocks). A request whose fed tokens reach its last known token gets its next
token (greedy). A request not yet started waits while the pool has no block for it;
when a request under way needs a block the pool lacks, the running request that arrived
last is preempted: its blocks are freed and it waits to be recomputed (prompt and
output so far, prefilled in chunks like any prompt) when there is room again.

`batching = "static"` is the baseline it replaces: a batch is admitted only when the
previous one has finished, so requests arriving meanwhile wait.

A step feeds at most `token_budget` tokens, decode tokens first (the matrix keeps the
budget at or above the running requests, so each gets its token every step).

A stream is driven by a load (`OpenLoop`: Poisson arrivals at a rate; `ClosedLoop`:
`concurrency` clients, each sending its next request when the last one ends) on a
clock: `WallClock` for measurements, `FakeClock` (each step costs a set time) for
tests that pin the latency figures. Every time is the clock's, in seconds; a request's
latencies run from its arrival, so the wait for admission counts.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Protocol

import numpy as np
import torch

from infermatrix.model import Transformer

BATCHING = ("continuous", "static")


@dataclass
class Request:
    id: int
    prompt: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    output: list[int] = field(default_factory=list)
    token_s: list[float] = field(default_factory=list)  # when each output token was produced
    done_s: float | None = None
    preemptions: int = 0
    computed: int = 0  # leading tokens of prompt + output whose keys and values are in the cache

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """The most positions it will hold: prompt and output, the last output never fed."""
        return len(self.prompt) + self.max_new_tokens - 1


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...

    def stepped(self, tokens: int) -> None:
        """A forward over `tokens` tokens has run."""


class WallClock:
    def __init__(self) -> None:
        self._start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def sleep_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))

    def stepped(self, tokens: int) -> None:
        pass


class FakeClock:
    """Time moves only when told: each forward costs step_s plus token_s per token."""

    def __init__(self, step_s: float, token_s: float = 0.0) -> None:
        self.t, self.step_s, self.token_s = 0.0, step_s, token_s

    def now(self) -> float:
        return self.t

    def sleep_until(self, t: float) -> None:
        self.t = max(self.t, t)

    def stepped(self, tokens: int) -> None:
        self.t += self.step_s + self.token_s * tokens


class Scheduler:
    def __init__(self, model: Transformer, cache, *, max_running: int, token_budget: int,
                 batching: str = "continuous"):
        if batching not in BATCHING:
            raise ValueError(f"batching {batching!r}: valid: {', '.join(BATCHING)}")
        self.model, self.cache = model, cache
        self.max_running, self.token_budget, self.static = max_running, token_budget, batching == "static"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.preemptions = 0
        self.steps = 0
        self.step_tokens = 0  # summed over steps
        self.device = model.tok_embeddings.weight.device

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def submit(self, request: Request) -> None:
        if self.cache.blocks_for(request.length) > self.cache.num_blocks:
            raise ValueError(f"request {request.id} needs {self.cache.blocks_for(request.length)} KV blocks and "
                             f"the pool has {self.cache.num_blocks}; give the pool more blocks")
        self.waiting.append(request)

    def _admit(self) -> None:
        if self.static and self.running:
            return  # a static batch runs to its end
        while self.waiting and len(self.running) < self.max_running:
            self.running.append(self.waiting.popleft())

    def _preempt(self, request: Request) -> None:
        """Send `request` back to wait. One with keys and values in the cache is preempted:
        its blocks are freed, and it is recomputed (its prompt and output so far, a prefill
        in chunks like any) when it runs again; one not yet started only waits for room."""
        self.cache.release(request.id)
        self.running.remove(request)
        if request.computed:
            request.computed = 0
            request.preemptions += 1
            self.preemptions += 1
        self.waiting = deque(sorted([request, *self.waiting], key=lambda r: (r.arrival_s, r.id)))  # first come

    def _schedule(self) -> list[tuple[Request, int]]:
        """(request, tokens to feed) of the next step: decode tokens first, then prefill
        chunks, each with blocks for them. A request not yet started waits when the pool is
        short; one under way preempts the running request that arrived last."""
        budget = self.token_budget
        chosen: dict[int, tuple[Request, int]] = {}
        for request in sorted(self.running, key=lambda r: len(r.tokens) - r.computed > 1):  # decodes first
            if request not in self.running or budget == 0:
                continue  # preempted for an older one, or no budget left
            n = min(len(request.tokens) - request.computed, budget)
            while not self.cache.grow(request.id, request.computed + n):
                if not request.computed:
                    self._preempt(request)  # not started: nothing to take from the others for it
                    break
                victim = max(self.running, key=lambda r: (r.arrival_s, r.id))
                self._preempt(victim)
                if victim.id in chosen:
                    budget += chosen.pop(victim.id)[1]
                if victim is request:
                    break
            else:
                chosen[request.id] = (request, n)
                budget -= n
        return list(chosen.values())

    @torch.no_grad()
    def step(self, clock: Clock) -> list[Request]:
        """One forward; returns the requests it finished."""
        self._admit()
        batch = self._schedule()
        if not batch:
            return []
        tokens = [t for r, n in batch for t in r.tokens[r.computed:r.computed + n]]
        positions = [p for r, n in batch for p in range(r.computed, r.computed + n)]
        self.cache.plan([(r.id, r.computed, n) for r, n in batch])  # (sequence, first position, tokens)
        ends = np.cumsum([n for _, n in batch]) - 1  # each segment's last token
        logits = self.model(torch.tensor([tokens], device=self.device), torch.tensor(positions, device=self.device),
                            self.cache, logits_at=torch.tensor(ends, device=self.device))  # (1, len(batch), vocab)
        nexts = logits[0].argmax(dim=-1).tolist()
        clock.stepped(len(tokens))
        now = clock.now()
        self.steps += 1
        self.step_tokens += len(tokens)
        finished = []
        for (request, n), token in zip(batch, nexts):
            request.computed += n
            if request.computed < len(request.tokens):
                continue  # a prefill chunk short of the end: no token yet
            request.output.append(token)
            request.token_s.append(now)
            if len(request.output) == request.max_new_tokens:
                request.done_s = now
                self.cache.release(request.id)
                self.running.remove(request)
                finished.append(request)
        return finished


class Load(Protocol):
    sent: int  # requests it has sent (arrivals within its duration)

    def due(self, now: float) -> list[Request]:
        """Requests that have arrived by `now` and were not yet handed out."""

    def next_arrival(self) -> float | None:
        """When the next request arrives (None: none until one ends, or no more)."""

    def finished(self, request: Request, now: float) -> None: ...


class OpenLoop:
    """Requests at Poisson arrival times: exponential gaps of mean 1/rate seconds."""

    def __init__(self, requests: list[Request], rate: float, seed: int = 0, duration_s: float | None = None):
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(requests))
        arrivals = np.cumsum(gaps) - gaps[0]  # the first at 0
        self.pending = deque()
        for request, t in zip(requests, arrivals):
            if duration_s is None or t <= duration_s:
                request.arrival_s = float(t)
                self.pending.append(request)
        self.sent = len(self.pending)  # the requests this load sends

    def due(self, now: float) -> list[Request]:
        out = []
        while self.pending and self.pending[0].arrival_s <= now:
            out.append(self.pending.popleft())
        return out

    def next_arrival(self) -> float | None:
        return self.pending[0].arrival_s if self.pending else None

    def finished(self, request: Request, now: float) -> None:
        pass


class ClosedLoop:
    """`concurrency` clients: each sends a request at the start, then its next as soon as
    its last one ends, until the requests run out (or duration_s has passed)."""

    def __init__(self, requests: list[Request], concurrency: int, duration_s: float | None = None):
        self.left, self.duration_s = deque(requests), duration_s
        self.ready: list[Request] = []
        self.sent = 0  # the requests sent so far
        for _ in range(min(concurrency, len(requests))):
            self._send(0.0)

    def _send(self, now: float) -> None:
        if self.left and (self.duration_s is None or now <= self.duration_s):
            request = self.left.popleft()
            request.arrival_s = now
            self.ready.append(request)
            self.sent += 1

    def due(self, now: float) -> list[Request]:
        out, self.ready = self.ready, []
        return out

    def next_arrival(self) -> float | None:
        return None

    def finished(self, request: Request, now: float) -> None:
        self._send(now)


def serve_stream(scheduler: Scheduler, load: Load, clock: Clock) -> list[Request]:
    """Run the load to its end: the finished requests, in the order they ended."""
    done: list[Request] = []
    while True:
        for request in load.due(clock.now()):
            scheduler.submit(request)
        if scheduler.idle:
            arrival = load.next_arrival()
            if arrival is None:
                return done
            clock.sleep_until(arrival)
            continue
        for request in scheduler.step(clock):
            done.append(request)
            load.finished(request, clock.now())


@torch.no_grad()
def serve_greedy(model: Transformer, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding of each row of prompts (B, T) as a request of one stream, all
    running at once (the drift workload's greedy agreement of a paged model) -> (B, N)."""
    requests = [Request(i, row.tolist(), max_new_tokens) for i, row in enumerate(prompts)]
    per_request = -(-(prompts.shape[1] + max_new_tokens) // 16)  # blocks hold 16 positions or more
    cache = model.paged_cache_factory(model, len(requests) * per_request)
    scheduler = Scheduler(model, cache, max_running=len(requests), token_budget=prompts.numel() + len(requests))
    done = serve_stream(scheduler, ClosedLoop(requests, len(requests)), FakeClock(0.0))
    return torch.tensor([r.output for r in sorted(done, key=lambda r: r.id)], device=prompts.device)  # (B, N)


def percentiles(values: Iterable[float], prefix: str) -> dict[str, float]:
    """{prefix_p50, _p90, _p99} of `values` (linear interpolation); {} when empty."""
    data = np.asarray(list(values), dtype=float)
    if not data.size:
        return {}
    return {f"{prefix}_p{q}": float(np.percentile(data, q)) for q in (50, 90, 99)}


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 0.0  # 0: not judged
    itl_ms: float = 0.0  # a request's mean inter-token latency; 0: not judged
    pct: int = 90  # the share of requests that must meet it, in percent

    @property
    def given(self) -> bool:
        return self.ttft_ms > 0 or self.itl_ms > 0

    def met_by(self, request: Request) -> bool:
        ttft = (request.token_s[0] - request.arrival_s) * 1e3
        itl = mean_itl_ms(request)
        return (self.ttft_ms <= 0 or ttft <= self.ttft_ms) and (self.itl_ms <= 0 or itl <= self.itl_ms)


def mean_itl_ms(request: Request) -> float:
    """The mean gap between a request's output tokens (0 for one token)."""
    n = len(request.token_s)
    return (request.token_s[-1] - request.token_s[0]) * 1e3 / (n - 1) if n > 1 else 0.0


def stream_metrics(done: list[Request], slo: SLO) -> tuple[dict, dict[str, list[float]]]:
    """Latency percentiles, throughputs and goodput of a finished stream, and the raw
    samples (ms): TTFT and end-to-end per request, every inter-token gap."""
    if not done:
        raise ValueError("no request of the stream finished; give it more requests or a longer duration_s")
    ttft = [(r.token_s[0] - r.arrival_s) * 1e3 for r in done]
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.token_s, r.token_s[1:])]
    e2e = [(r.done_s - r.arrival_s) * 1e3 for r in done]
    span = max(r.done_s for r in done) - min(r.arrival_s for r in done)
    metrics = {**percentiles(ttft, "ttft_ms"), **percentiles(itl, "itl_ms"), **percentiles(e2e, "e2e_ms")}
    tokens = sum(len(r.output) for r in done)
    metrics.update(requests_completed=len(done), stream_s=span, request_throughput=len(done) / span,
                   tokens_per_s=tokens / span, preemptions=sum(r.preemptions for r in done))
    if slo.given:
        good = sum(slo.met_by(r) for r in done)
        metrics.update(goodput_rps=good / span, slo_attainment=good / len(done),
                       meets_slo=float(good * 100 >= slo.pct * len(done)))
    return metrics, {"ttft_ms": ttft, "itl_ms": itl, "e2e_ms": e2e}
