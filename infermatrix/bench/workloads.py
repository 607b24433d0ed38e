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
from infermatrix.model import Transformer
from infermatrix.weights import LoadedModel

if TYPE_CHECKING:
    from infermatrix.bench.matrix import Case, RunSettings

Measurement = tuple[dict[str, float], dict[str, list[float]]]  # metrics, raw samples (ms)


@lru_cache(maxsize=4)
def _text_ids(tokenizer) -> tuple[int, ...]:
    return tuple(tokenizer.encode(default_text()).ids)


def prompt_tokens(loaded: LoadedModel, batch: int, length: int, device) -> torch.Tensor:
    """(batch, length) prompt: consecutive windows of real text when the model has a
    tokenizer, seeded random ids otherwise."""
    vocab = loaded.model.config.vocab_size
    if loaded.tokenizer is not None:
        ids = _text_ids(loaded.tokenizer)
        if len(ids) >= batch * length:
            rows = torch.tensor(ids[: batch * length]).view(batch, length)  # (B, T)
            return rows.clamp_(max=vocab - 1).to(device)
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (batch, length), generator=gen).to(device)


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
    for _ in range(settings.warmup):
        model(prompt)
    ttft, steps, totals = [], [], []
    for _ in range(settings.repeat):
        tokens = prompt
        times = []
        for _ in range(case.new_tokens):
            def step():
                nonlocal tokens
                logits = model(tokens)  # (B, T, vocab)
                next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
                tokens = torch.cat([tokens, next_token], dim=1)  # (B, T+1)
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
