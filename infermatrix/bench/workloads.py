"""Workloads: what a case runs and times.

* prefill: one forward over (batch, prompt_len) tokens -> time to first token and
  prefill tokens/s.
* decode: greedy generation of new_tokens after the prompt. Step 1 processes the
  prompt (TTFT); steps 2..N are the decode steps whose time per output token
  (TPOT) and tokens/s are reported. Without a cache each step recomputes the
  whole prefix: the honest naive baseline.
"""

from __future__ import annotations

import statistics
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import torch

from infermatrix.bench.text import default_text
from infermatrix.bench.timing import summarize, time_calls, time_once
from infermatrix.errors import UserError
from infermatrix.model import Transformer, greedy_step
from infermatrix.weights import LoadedModel

if TYPE_CHECKING:
    from infermatrix.bench.matrix import Case, RunSettings

Measurement = tuple[dict[str, float], dict[str, list[float]]]  # metrics, raw samples (ms)


@lru_cache(maxsize=4)
def _text_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode(default_text()).ids)


def prompt_tokens(loaded: LoadedModel, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) prompt: consecutive windows of real text (wrapping around the
    text if it is too short) when the model has a tokenizer, seeded random ids otherwise."""
    vocab = loaded.model.config.vocab_size
    if loaded.tokenizer is None:
        gen = torch.Generator().manual_seed(1234)
        return torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    ids = torch.tensor(_text_ids(loaded.tokenizer))
    if int(ids.max()) >= vocab:
        raise UserError(f"the tokenizer emits id {int(ids.max())} but the model's vocab_size is {vocab}; "
                        "the tokenizer does not belong to these weights")
    rows = ids[torch.arange(batch * length) % len(ids)].view(batch, length)  # (B, T)
    return rows.to(device)


def run_prefill(model: Transformer, loaded: LoadedModel, case: Case, settings: RunSettings) -> Measurement:
    device = torch.device(case.device)
    tokens = prompt_tokens(loaded, case.batch, case.prompt_len, device)  # (B, T)
    samples = time_calls(lambda: model(tokens), warmup=settings.warmup, repeat=settings.repeat, device=device)
    metrics = summarize(samples, "latency_ms")
    metrics["ttft_ms_p50"] = metrics["latency_ms_p50"]
    metrics["tokens_per_s"] = case.batch * case.prompt_len / (metrics["latency_ms_p50"] / 1e3)
    return metrics, {"latency_ms": samples}


def run_decode(model: Transformer, loaded: LoadedModel, case: Case, settings: RunSettings) -> Measurement:
    device = torch.device(case.device)
    prompt = prompt_tokens(loaded, case.batch, case.prompt_len, device)  # (B, T)
    for _ in range(settings.warmup):  # a prefill step and a decode step
        greedy_step(model, greedy_step(model, prompt))
    ttft, steps, totals = [], [], []
    for _ in range(settings.repeat):
        tokens = prompt
        times = []
        for _ in range(case.new_tokens):
            def step():
                nonlocal tokens
                tokens = greedy_step(model, tokens)  # (B, T+1)
            times.append(time_once(step, device))
        ttft.append(times[0])
        steps.extend(times[1:])
        totals.append(sum(times[1:]))
    metrics = summarize(steps, "latency_ms")  # per decode step = per output token
    metrics["tpot_ms_p50"] = metrics["latency_ms_p50"]
    metrics["ttft_ms_p50"] = statistics.median(ttft)
    decode_s = statistics.median(totals) / 1e3  # median over repeats of the whole decode
    metrics["tokens_per_s"] = case.batch * (case.new_tokens - 1) / decode_s
    return metrics, {"latency_ms": steps, "ttft_ms": ttft}


WORKLOAD_FNS: dict[str, Callable[[Transformer, LoadedModel, "Case", "RunSettings"], Measurement]] = {
    "prefill": run_prefill,
    "decode": run_decode,
}
