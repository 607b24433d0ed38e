"""Workloads: what a case runs, times and reports.

Model workloads (real-text prompts when the model has a tokenizer):
* prefill: one forward over (batch, prompt_len) -> time to first token, prefill tokens/s.
* decode: greedy generation of new_tokens (min = max); step 1 is the prefill (TTFT),
  steps 2..N are timed one by one -> TPOT median/p90/p99 and decode tokens/s.
  Without a cache variant each step recomputes the whole prefix.
* generate: the same generation timed end to end -> latency and tokens/s.
* drift: the variant, in the case's dtype, against the fp32 `reference` on the same
  weights, over `windows` eval-text windows of prompt_len tokens (reference logits
  cached on disk), plus greedy-decode agreement over new_tokens.

Encoder workloads (infermatrix.encoder):
* encode: one forward over `batch` real eval-text sentences of different lengths (each
  cut to prompt_len tokens), right-padded, with the key-padding mask -> latency,
  sequences/s and tokens/s of real tokens (pad positions are computed, not counted).
* drift: the variant's final hidden states against the fp32 reference's over `windows`
  passages of whole sentences (up to prompt_len tokens each, right-padded): cosine
  similarity and SQNR at real positions; masked-LM top-1 agreement and KL when the
  model has the head.

Op workloads (no model weights; the model gives default shapes):
* attention: (batch, heads, kv_heads, seq = prompt_len, head_dim, causal) through the
  variant's attention callable -> TFLOP/s and GB/s.
* linear: (M = batch * prompt_len, K = in_features, N = out_features) through a
  Linear the variant's linear axis may swap -> TFLOP/s and GB/s.

Every timing is also reported against the machine's measured peaks (roofline.py).

Energy (energy.py), when the device has a readable counter, is read around the whole
sampling loop of each timed workload, never around warm-up: energy_j is joules per timed
call (prefill, encode and the ops: one forward or op call; decode and generate: one
whole generation, its prefill step included: a counter cannot be read around single
steps), energy_j_per_token the loop's joules over the tokens its calls processed
(prefill: batch * prompt_len per call; decode and generate: batch * new_tokens per
generation, all the tokens the generation produced, the first by its prefill; encode:
the real tokens; the ops have none), avg_power_w over the loop's wall time.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn

from infermatrix.bench import energy, roofline
from infermatrix.bench.drift import (drift_metrics, greedy_match_length, hidden_state_drift,
                                     model_logits, require_fp32_reference, window_tokens)
from infermatrix.bench.logits_cache import cached_tensors, reference_logits
from infermatrix.bench.matrix import attention_keys, attention_shape, length_range, linear_shape, serve_pool
from infermatrix.bench.stats import summarize
from infermatrix.bench.text import load_text, sentences, text_sha256
from infermatrix.bench.timing import TimerConfig, TimerResult, measure, time_once
from infermatrix.encoder import Encoder
from infermatrix.errors import UserError
from infermatrix.generate import generate_greedy, new_decoder
from infermatrix.memory import storage_bytes
from infermatrix.model import Transformer, math_attention
from infermatrix.serving import SLO, ClosedLoop, OpenLoop, Request, Scheduler, WallClock, serve_stream, stream_metrics
from infermatrix.speculative import SpeculationStats
from infermatrix.variants import apply_variants, parse_spec
from infermatrix.weights import DTYPES, LoadedModel, load_model, model_fingerprint

if TYPE_CHECKING:
    from infermatrix.bench.matrix import Case
    from infermatrix.bench.runner import ModelCache, RunContext

WorkloadResult = tuple[dict[str, float | int | str | bool | None], dict[str, list[float]]]  # metrics, raw samples (ms)

DRIFT_PROMPT_TOKENS = 32  # greedy-agreement prompts: the first tokens of each eval window


def measure_for_case(fn, case: Case, ctx: RunContext, *, tokens_per_call: int | None,
                     fn_returns_ms: bool = False) -> tuple[TimerResult, dict]:
    """measure() with the run's settings, and the energy metrics of its sampling loop
    (energy.EnergyMeter.metrics: {} when the device has no readable counter; the run's
    env["energy"] says why). tokens_per_call: the tokens one timed call processes (None
    for the ops). CUDA memory peaks are reset first, so they cover the timed calls, not
    loading."""
    s, device = ctx.settings, torch.device(case.device)
    cuda = device.type == "cuda"  # the L2 flush and CUDA graphs exist only there
    config = TimerConfig(warmup_runs=s.warmup, warmup_s=s.warmup_s, min_runs=s.min_runs, max_runs=s.max_runs,
                         target_ci_rel=s.target_ci, max_time_s=s.max_time_s, l2_flush=s.l2_flush and cuda,
                         cuda_graph=s.cuda_graph and cuda and not fn_returns_ms)  # a graph cannot time itself
    meter = energy.meter_for(device)
    if cuda:  # the runner reads the peaks when the workload returns
        torch.cuda.reset_peak_memory_stats(device)
    m = measure(fn, device=device, config=config, fn_returns_ms=fn_returns_ms, around_timed=meter.window)
    used = meter.metrics(len(m.samples_ms), tokens_per_call)
    if config.l2_flush and tokens_per_call is None and "energy_j" in used:
        # an op's call lasts microseconds, and the 256 MiB flush before each one is inside
        # the counter's window: its joules would be mostly the flush's
        used = {energy.ENERGY_DROPPED: "the energy window includes an L2 flush per op call (l2_flush = true)"}
    return m, used


_CUT_TOKENS = 16  # the last tokens of a cut text may differ from the whole text's (a word cut in two)


@lru_cache(maxsize=8)
def _text_ids(tokenizer, eval_text_path: str | None, count: int) -> tuple[int, ...]:
    """The first `count` token ids of the eval text (all of them when it has fewer). Only
    a prefix is encoded, grown until it holds `count` tokens before its last few: the
    whole pydoc text takes 0.26 s, paid by every case process."""
    text = load_text(eval_text_path)
    chars = 8 * (count + _CUT_TOKENS)
    while chars < len(text):
        ids = tokenizer.encode(text[:chars]).ids
        if len(ids) >= count + _CUT_TOKENS:
            return tuple(ids[:count])
        chars *= 2
    return tuple(tokenizer.encode(text).ids)


def token_ids(loaded: LoadedModel, count: int, eval_text_path: str | None, seed: int) -> torch.Tensor:
    """`count` token ids: the eval text (wrapping around if short) when the model has a
    tokenizer, seeded random ids otherwise."""
    vocab = loaded.model.config.vocab_size
    if loaded.tokenizer is None:
        return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor(_text_ids(loaded.tokenizer, eval_text_path, count))
    if int(ids.max()) >= vocab:
        raise UserError(f"the tokenizer emits id {int(ids.max())} but the model's vocab_size is {vocab}; "
                        "the tokenizer does not belong to these weights")
    return ids[torch.arange(count) % len(ids)]


def prompt_tokens(loaded: LoadedModel, case: Case, ctx: RunContext) -> torch.Tensor:
    """(batch, prompt_len) prompts on the case's device: consecutive text windows, or with
    task = "edit" each row an instruction to fix the typos of its own text passage."""
    if case.task == "edit":
        return edit_prompts(loaded, case.batch, case.prompt_len, ctx.eval_text_path).to(case.device)
    ids = token_ids(loaded, case.batch * case.prompt_len, ctx.eval_text_path, ctx.settings.seed)
    return ids.view(case.batch, case.prompt_len).to(case.device)  # (B, T)


EDIT_INSTRUCTION = "Fix the typos in this text and return the corrected text:"
MIN_EDIT_PASSAGE = 16  # tokens of text the edit prompt holds at least


def edit_prompts(loaded: LoadedModel, batch: int, prompt_len: int, eval_text_path: str | None) -> torch.Tensor:
    """(batch, prompt_len) prompts asking the model to fix the typos of consecutive eval-text
    passages, each filling the prompt. A good answer copies most of the passage: the
    workload where drafting from the context pays. In the chat format when the tokenizer
    has ChatML's tokens (SmolLM2, Qwen), else as plain text."""
    tok = loaded.tokenizer
    if tok is None:
        raise UserError('task = "edit" needs a model with a tokenizer: its prompt is an instruction over real text')
    chat = tok.token_to_id("<|im_start|>") is not None
    head = tok.encode(f"<|im_start|>user\n{EDIT_INSTRUCTION}\n\n" if chat else f"{EDIT_INSTRUCTION}\n\n").ids
    tail = tok.encode("<|im_end|>\n<|im_start|>assistant\n" if chat else "\n\nCorrected text:\n").ids
    room = prompt_len - len(head) - len(tail)
    if room < MIN_EDIT_PASSAGE:
        raise UserError(f"prompt_len {prompt_len} leaves {room} tokens of text beside the edit instruction; "
                        f"raise prompt_len to at least {prompt_len - room + MIN_EDIT_PASSAGE}")
    passages = _text_ids(tok, eval_text_path, batch * room)
    rows = [head + list(passages[i * room:(i + 1) * room]) + tail for i in range(batch)]
    return torch.tensor(rows)  # (B, T)


def _model(case: Case, models: ModelCache) -> tuple[Transformer, LoadedModel]:
    """The case's model with its variants applied; a draft-model variant's draft is loaded
    here (in its own dtype, or the case's) with a KV cache, and bound to it."""
    loaded = models.get(case.model, case.dtype, case.device)
    model = apply_variants(loaded.model, parse_spec(case.variant))
    speculation = getattr(model, "speculation", None)
    if speculation is not None and speculation.drafter is None:
        draft = models.get(speculation.draft_model, speculation.draft_dtype or case.dtype, case.device).model
        model.speculation = speculation.with_draft(apply_variants(draft, parse_spec(DRAFT_SPEC)))
    return model, loaded


DRAFT_SPEC = "kv_cache+sdpa"  # how a draft model decodes


def table_is_head(model) -> bool | None:
    """Whether the embedding table is the output head's weight (tied and not replaced by
    a variant's own head copy); None for a model without ours (a peer): its config says."""
    table, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if table is None or head is None:
        return None
    return getattr(head, "weight", None) is table.weight


def _roofline(cost: roofline.Cost, seconds: float, case: Case, ctx: RunContext) -> dict:
    metrics = {"flops": cost.flops, "bytes_moved": cost.bytes}
    peaks = ctx.peaks.get(torch.device(case.device).type) if ctx.peaks else None
    if peaks is not None and case.dtype in peaks.gemm_tflops:
        metrics.update(roofline.limit_fraction(cost, seconds, peaks, case.dtype))
    return metrics


def _timing_metrics(m, per: int = 1) -> dict:
    """latency_ms_* statistics of the samples, each divided by `per` (a generation's
    decode steps, for per-token figures), and how the measurement stopped."""
    summary = summarize([x / per for x in m.samples_ms]) if per != 1 else m.summary
    metrics = summary.as_metrics("latency_ms")
    metrics.update(runs=len(m.samples_ms), warmup_runs=m.warmup_runs, stopped_by=m.stopped_by)
    return metrics


def run_prefill(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    model, loaded = _model(case, models)
    tokens = prompt_tokens(loaded, case, ctx)  # (B, T)
    first_call_ms = time_once(lambda: model(tokens), torch.device(case.device))  # cold: compile, lazy init
    m, energy_metrics = measure_for_case(lambda: model(tokens), case, ctx,
                                         tokens_per_call=case.batch * case.prompt_len)
    metrics = _timing_metrics(m)
    metrics["first_call_ms"] = first_call_ms
    median_s = m.summary.median / 1e3
    metrics["ttft_ms_p50"] = m.summary.median
    metrics["tokens_per_s"] = case.batch * case.prompt_len / median_s
    cfg = model.config
    cost = roofline.prefill_cost(cfg, case.batch, case.prompt_len, dtype_bytes=DTYPES[case.dtype].itemsize,
                                 weight_bytes=model.weight_bytes, kv_cache=False, table_is_head=table_is_head(model))
    metrics.update(_roofline(cost, median_s, case, ctx), weight_bytes=model.weight_bytes, kv_cache_bytes=0,
                   weight_bytes_dense=loaded.model.weight_bytes)  # before a quantizing variant
    metrics.update(energy_metrics)
    return metrics, {"latency_ms": m.samples_ms}


@dataclass
class GenerationSteps:
    """One greedy generation, each step timed on the host between synchronizes: step 0
    is the prefill, the rest decode steps; a speculative step may emit several tokens."""

    ms: list[float]
    tokens: list[int]  # emitted by each step
    speculation: SpeculationStats | None  # a speculative decoder's counts


def generation_step_times(model: Transformer, prompt: torch.Tensor, new_tokens: int, cache,
                          device: torch.device) -> GenerationSteps:
    decoder = new_decoder(model, prompt, new_tokens, cache=cache)
    ms, emitted = [], []
    while decoder.tokens.shape[1] < prompt.shape[1] + new_tokens:
        before = decoder.tokens.shape[1]
        ms.append(time_once(decoder.step, device))
        emitted.append(decoder.tokens.shape[1] - before)
    return GenerationSteps(ms, emitted, getattr(decoder, "stats", None))


def _static_cache(model: Transformer, case: Case):
    """One static cache for every generation of a case (None without a cache variant):
    same shapes, so a compiled step never recompiles, and its allocation is never timed."""
    return model.new_cache(case.batch, case.prompt_len + case.new_tokens)


def _run_generation(case: Case, ctx: RunContext, models: ModelCache, end_to_end: bool) -> WorkloadResult:
    """Greedy generation of new_tokens after the prompt; each sample is one whole
    generation, its steps timed one by one."""
    model, loaded = _model(case, models)
    device = torch.device(case.device)
    prompt = prompt_tokens(loaded, case, ctx)  # (B, T)
    runs: list[GenerationSteps] = []  # every call's steps, warm-up included
    cache = _static_cache(model, case)

    def generation() -> float:
        run = generation_step_times(model, prompt, case.new_tokens, cache, device)
        runs.append(run)
        return sum(run.ms) if end_to_end else sum(run.ms[1:])

    first_call_ms = generation()  # cold: compilation and lazy initialisation land here, not in the samples
    # the counter covers whole generations: every token they produce, the prefill's included
    m, energy_metrics = measure_for_case(generation, case, ctx, tokens_per_call=case.batch * case.new_tokens,
                                         fn_returns_ms=True)
    kept = runs[-len(m.samples_ms):]  # drop the cold and warm-up generations
    ttft = [run.ms[0] for run in kept]
    # per output token, pooled over positions (a recompute step grows with context); a
    # speculative step's time is shared by the tokens it emitted, one sample each
    steps = [ms / n for run in kept for ms, n in zip(run.ms[1:], run.tokens[1:]) for _ in range(n)]
    tpot = summarize(steps)
    median_s = m.summary.median / 1e3
    if end_to_end:
        metrics = _timing_metrics(m)  # per generation, prefill included
        metrics["tokens_per_s"] = case.batch * case.new_tokens / median_s
    else:
        metrics = _timing_metrics(m, per=case.new_tokens - 1)  # per output token, one value per generation
        metrics["tokens_per_s"] = case.batch * (case.new_tokens - 1) / median_s
    metrics.update({f"tpot_ms_{k}": v for k, v in (("p50", tpot.median), ("p90", tpot.p90), ("p99", tpot.p99))})
    metrics["ttft_ms_p50"] = statistics.median(ttft)
    cfg, dtype_bytes = model.config, DTYPES[case.dtype].itemsize
    metrics["first_call_ms"] = first_call_ms
    if kept[0].speculation is not None:
        # no roofline: the limit modelled is one forward per token, which speculation escapes
        metrics.update(speculation_metrics(kept, end_to_end))
    else:
        weights = dict(weight_bytes=model.weight_bytes, table_is_head=table_is_head(model),
                       kv_cache=cache is not None)
        cost = roofline.prefill_cost(cfg, case.batch, case.prompt_len, dtype_bytes=dtype_bytes, **weights) \
            if end_to_end else roofline.Cost(0.0, 0.0)
        for i in range(1, case.new_tokens):  # decode step i sees prompt_len + i tokens
            cost = cost + roofline.decode_step_cost(cfg, case.batch, case.prompt_len + i, dtype_bytes=dtype_bytes,
                                                    **weights)
        metrics.update(_roofline(cost, median_s, case, ctx))
    metrics.update(weight_bytes=model.weight_bytes, kv_cache_bytes=cache.nbytes if cache is not None else 0,
                   weight_bytes_dense=loaded.model.weight_bytes)  # before a quantizing variant
    metrics.update(energy_metrics)
    return metrics, {"generation_ms": m.samples_ms, "tpot_ms": steps, "ttft_ms": ttft}


def speculation_metrics(runs: list[GenerationSteps], end_to_end: bool) -> dict:
    """A speculative decoder's counts over the timed generations: the share of drafted
    tokens the model accepted, tokens per verifying forward, and the share of the timed
    steps' wall time spent drafting (with end_to_end the prefill step is timed, and a
    draft model's prefill in it counts as drafting)."""
    total = sum((run.speculation for run in runs), SpeculationStats())
    timed_ms = sum(sum(run.ms if end_to_end else run.ms[1:]) for run in runs)
    drafting_s = total.draft_s + (total.start_s if end_to_end else 0.0)
    return {"acceptance_rate": total.acceptance_rate, "tokens_per_forward": total.tokens_per_forward,
            "draft_time_share": drafting_s * 1e3 / timed_ms,
            "drafted_tokens": total.drafted / len(runs), "target_forwards": total.forwards / len(runs)}


def run_decode(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    return _run_generation(case, ctx, models, end_to_end=False)


def run_generate(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    return _run_generation(case, ctx, models, end_to_end=True)


def run_drift(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    model, loaded = _model(case, models)
    if isinstance(loaded.model, Encoder):
        return _encoder_drift(model, loaded, case, ctx)
    ids = token_ids(loaded, case.windows * (case.prompt_len + 1), ctx.eval_text_path, ctx.settings.seed)
    windows = window_tokens(ids, case.prompt_len, case.windows)  # (W, T+1)
    prompts = windows[:, : min(DRIFT_PROMPT_TOKENS, case.prompt_len)].to(case.device)  # (W, P)
    key = {
        "model": model_fingerprint(case.model, ctx.settings.seed),
        "text_sha256": text_sha256(load_text(ctx.eval_text_path)) if loaded.tokenizer else None,
        "window": case.prompt_len, "windows": case.windows, "reference": "reference/float32",
        "device": torch.device(case.device).type, "seed": ctx.settings.seed,
    }
    reference: Transformer | None = None

    def fp32_reference() -> Transformer:
        nonlocal reference
        if reference is None:
            reference = load_model(case.model, torch.float32, case.device, seed=ctx.settings.seed).model
            require_fp32_reference(reference, model)  # before any logits of it are cached as the reference
        return reference

    ref_logits, _ = reference_logits(key, lambda: model_logits(fp32_reference(), windows))
    ref_tokens = cached_tensors({**key, "greedy_tokens": case.new_tokens, "prompt": prompts.shape[1]},
                                lambda: {"tokens": generate_greedy(fp32_reference(), prompts, case.new_tokens)})
    reference = None  # free it before the variant runs
    logits, targets = model_logits(model, windows)
    metrics = drift_metrics(ref_logits, logits, targets)
    tokens = generate_greedy(model, prompts, case.new_tokens).cpu()
    metrics["greedy_match_len"] = greedy_match_length(ref_tokens["tokens"], tokens)
    metrics["greedy_tokens"] = case.new_tokens
    metrics["eval_tokens"] = int(targets.numel())
    metrics.update(weight_bytes=model.weight_bytes, weight_bytes_dense=loaded.model.weight_bytes)
    return metrics, {}


# ---------------------------------------------------------------- encoders


@lru_cache(maxsize=4)
def _text_sentences(eval_text_path: str | None) -> tuple[str, ...]:
    found = tuple(sentences(load_text(eval_text_path)))
    if not found:
        raise UserError("the eval text has no sentences (runs of 3+ words ending in '.', '!' or '?'); pass another "
                        "--eval-text")
    return found


def sentence_ids(loaded: LoadedModel, count: int, max_len: int, eval_text_path: str | None,
                 seed: int) -> list[list[int]]:
    """Token ids of the eval text's first `count` sentences (wrapping around), each cut
    to max_len: the model's tokenizer (special tokens included) when it has one, else
    seeded random ids, one per word of the sentence."""
    text = _text_sentences(eval_text_path)
    picked = [text[i % len(text)] for i in range(count)]
    vocab = loaded.model.config.vocab_size
    if loaded.tokenizer is None:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randint(0, vocab, (min(len(s.split()), max_len),), generator=gen).tolist() for s in picked]
    ids = [enc.ids[:max_len] for enc in loaded.tokenizer.encode_batch(picked)]
    top = max(max(row) for row in ids)
    if top >= vocab:
        raise UserError(f"the tokenizer emits id {top} but the model's vocab_size is {vocab}; "
                        "the tokenizer does not belong to these weights")
    return ids


def pad_right(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> tokens (B, T) right-padded with pad_id, and the
    key-padding mask (B, T), True = a real token."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = True
    return tokens.to(device), mask.to(device)


def _pad_id(loaded: LoadedModel) -> int:
    pad = loaded.tokenizer.token_to_id("[PAD]") if loaded.tokenizer is not None else None
    return 0 if pad is None else pad


def encode_batch(loaded: LoadedModel, case: Case,
                 ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """An encode case's (batch, T) tokens, its key-padding mask (None when no row is
    padded: attention then runs unmasked, as it would on one length) and each
    sentence's length."""
    rows = sentence_ids(loaded, case.batch, case.prompt_len, ctx.eval_text_path, ctx.settings.seed)
    tokens, mask = pad_right(rows, _pad_id(loaded), case.device)
    lengths = [len(r) for r in rows]
    return tokens, (None if min(lengths) == tokens.shape[1] else mask), lengths


def run_encode(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    model, loaded = _model(case, models)
    tokens, seam_mask, lengths = encode_batch(loaded, case, ctx)  # (B, T), (B, T) or None
    first_call_ms = time_once(lambda: model(tokens, seam_mask), torch.device(case.device))  # compile, lazy init
    real = sum(lengths)
    m, energy_metrics = measure_for_case(lambda: model(tokens, seam_mask), case, ctx, tokens_per_call=real)
    metrics = _timing_metrics(m)
    median_s = m.summary.median / 1e3
    metrics.update(first_call_ms=first_call_ms, sequences_per_s=case.batch / median_s, tokens_per_s=real / median_s,
                   real_tokens=real, padded_tokens=tokens.numel())
    streamed = sum(storage_bytes(part) for part in (model.layers, model.embed_norm, model.final_norm) if part)
    cost = roofline.encode_cost(loaded.model.config, case.batch, tokens.shape[1],
                                dtype_bytes=DTYPES[case.dtype].itemsize, streamed_bytes=streamed)
    metrics.update(_roofline(cost, median_s, case, ctx), weight_bytes=model.weight_bytes,
                   weight_bytes_dense=loaded.model.weight_bytes)  # before a quantizing variant
    metrics.update(energy_metrics)
    return metrics, {"latency_ms": m.samples_ms}


def encoder_passages(loaded: LoadedModel, count: int, max_len: int, eval_text_path: str | None,
                     seed: int) -> list[list[int]]:
    """`count` passages of whole consecutive eval-text sentences, as many as fit in
    max_len tokens (a longer sentence alone, cut): lengths differ, as real inputs do."""
    drawn = 16 * count
    while True:  # sentence_ids wraps around the text: drawing more always fills them
        passages, current = [], []
        for row in sentence_ids(loaded, drawn, max_len, eval_text_path, seed):
            if current and len(current) + len(row) > max_len:
                passages.append(current)
                current = []
                if len(passages) == count:
                    return passages
            current = current + row
        drawn *= 2


def _encoder_drift(model, loaded: LoadedModel, case: Case, ctx: RunContext) -> WorkloadResult:
    """The variant's final hidden states (and masked-LM logits) against the fp32
    reference's at real positions; the reference's are cached on disk, keyed by the
    weights, the exact input tokens and the code (logits_cache)."""
    rows = encoder_passages(loaded, case.windows, case.prompt_len, ctx.eval_text_path, ctx.settings.seed)
    tokens, mask = pad_right(rows, _pad_id(loaded), case.device)  # (W, T), (W, T)
    real = mask.cpu()
    key = {
        "model": model_fingerprint(case.model, ctx.settings.seed), "reference": "encoder/float32",
        "tokens_sha256": hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
        "shape": list(tokens.shape), "device": torch.device(case.device).type,
    }

    def fp32_reference() -> dict[str, torch.Tensor]:
        reference = load_model(case.model, torch.float32, case.device, seed=ctx.settings.seed).model
        require_fp32_reference(reference, model)  # before anything of it is cached as the reference
        hidden = reference(tokens, mask)  # (W, T, C)
        out = {"hidden": hidden.float()}
        if reference.config.mlm_head:
            out["mlm_logits"] = reference.mlm_logits(hidden).float()[mask]  # (N, V): real positions only
        return out

    ref = cached_tensors(key, fp32_reference)  # the reference is freed before the variant runs
    hidden = model(tokens, mask)  # (W, T, C)
    metrics = hidden_state_drift(ref["hidden"], hidden.float().cpu(), real)
    if "mlm_logits" in ref:
        logits = model.mlm_logits(hidden).float().cpu()[real]  # (N, V)
        mlm = drift_metrics(ref["mlm_logits"], logits, tokens.cpu()[real])
        metrics.update(mlm_top1_agree_pct=mlm["top1_agree_pct"], mlm_kl_mean=mlm["kl_mean"])
    metrics.update(eval_tokens=int(real.sum()), weight_bytes=model.weight_bytes,
                   weight_bytes_dense=loaded.model.weight_bytes)
    return metrics, {}


def _op_variants(case: Case, axis: str):
    """The case's variants, refusing any that cannot act on an op of this `axis`
    (`reference`, the baseline, is always allowed)."""
    variants = parse_spec(case.variant)
    for variant in variants:
        if variant.axis not in (axis, "graph") and variant.name != "reference":
            raise UserError(f"the {case.workload} workload measures {axis} variants; "
                            f"{variant.name!r} is on the {variant.axis} axis")
    return variants


def _attention_op(case: Case, ctx: RunContext) -> Callable[[], object]:
    """The variant's attention callable on seeded random q, k, v of the case's shape."""
    heads, kv_heads, head_dim = attention_shape(case)
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    holder = nn.Module()  # an attention seam with no model around it
    holder.attention = math_attention
    attention = apply_variants(holder, _op_variants(case, "attention")).attention
    gen = torch.Generator(device=device).manual_seed(ctx.settings.seed)
    keys = attention_keys(case)  # the queries are the last prompt_len of these positions
    q = torch.randn(case.batch, heads, case.prompt_len, head_dim, generator=gen, device=device).to(dtype)
    k = torch.randn(case.batch, kv_heads, keys, head_dim, generator=gen, device=device).to(dtype)
    v = torch.randn(case.batch, kv_heads, keys, head_dim, generator=gen, device=device).to(dtype)
    return lambda: attention(q, k, v, causal=case.causal)


def run_attention(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    heads, kv_heads, head_dim = attention_shape(case)
    m, energy_metrics = measure_for_case(_attention_op(case, ctx), case, ctx, tokens_per_call=None)
    layout = {}
    for variant in parse_spec(case.variant):  # e.g. a sparse layout's density and picture, for the reports
        layout.update(variant.report_metrics(case))
    # a sparse layout is credited with the pairs it computes, not the dense count
    cost = roofline.attention_cost(case.batch, heads, kv_heads, case.prompt_len, attention_keys(case), head_dim,
                                   causal=case.causal, dtype_bytes=DTYPES[case.dtype].itemsize,
                                   density=layout.get("attention_density"),
                                   keys_read=layout.get("attention_keys_read"))
    metrics = _timing_metrics(m)
    metrics.update(_roofline(cost, m.summary.median / 1e3, case, ctx), heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, **layout)
    metrics.update(energy_metrics)
    return metrics, {"latency_ms": m.samples_ms}


def _linear_op(case: Case, ctx: RunContext) -> tuple[Callable[[], object], int]:
    """One Linear of the case's shape (as the variant's linear axis leaves it) on a
    seeded random input, and its weight bytes."""
    m_dim, k_dim, n_dim = linear_shape(case)
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    torch.manual_seed(ctx.settings.seed)
    holder = nn.Sequential(nn.Linear(k_dim, n_dim, bias=False)).to(device=device, dtype=dtype).eval()
    holder.attention = math_attention  # so attention variants in the spec (the `reference` baseline) apply
    layer = apply_variants(holder, _op_variants(case, "linear"))
    x = torch.randn(m_dim, k_dim, device=device).to(dtype)
    weight_bytes = storage_bytes(layer)  # distinct storage; a tensor subclass (torchao) by its inner tensors
    return (lambda: layer[0](x)), weight_bytes


def run_linear(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    m_dim, k_dim, n_dim = linear_shape(case)
    op, weight_bytes = _linear_op(case, ctx)
    m, energy_metrics = measure_for_case(op, case, ctx, tokens_per_call=None)
    cost = roofline.linear_cost(m_dim, k_dim, n_dim, act_bytes=DTYPES[case.dtype].itemsize,
                                weight_bytes_per_elem=weight_bytes / (k_dim * n_dim))
    metrics = _timing_metrics(m)
    metrics.update(_roofline(cost, m.summary.median / 1e3, case, ctx), m=m_dim, k=k_dim, n=n_dim,
                   weight_bytes=weight_bytes, **energy_metrics)
    return metrics, {"latency_ms": m.samples_ms}


# ---------------------------------------------------------------- serving


def serve_requests(loaded: LoadedModel, case: Case, ctx: RunContext) -> list[Request]:
    """The stream's requests: prompt and output lengths drawn (seeded) from the case's
    distribution, each prompt the next window of the eval text (seeded ids without a
    tokenizer)."""
    rng = np.random.default_rng(ctx.settings.seed)
    prompts = rng.integers(*np.add(length_range(case.prompt_len, case.lengths), (0, 1)), size=case.requests)
    outputs = rng.integers(*np.add(length_range(case.new_tokens, case.lengths), (0, 1)), size=case.requests)
    ids = token_ids(loaded, int(prompts.sum()), ctx.eval_text_path, ctx.settings.seed).tolist()
    starts = np.cumsum(prompts) - prompts
    return [Request(i, ids[a:a + int(n)], int(m)) for i, (a, n, m) in enumerate(zip(starts, prompts, outputs))]


def run_serve(case: Case, ctx: RunContext, models: ModelCache) -> WorkloadResult:
    """A request stream through the continuous-batching scheduler, on the wall clock.
    One short request is served first, untimed (lazy initialisation, first calls)."""
    model, loaded = _model(case, models)
    _, pool = serve_pool(case)
    cache = model.paged_cache_factory(model, pool)

    def scheduler() -> Scheduler:
        return Scheduler(model, cache, max_running=case.batch, token_budget=case.token_budget,
                         batching=case.batching)

    # warm-up: `batch` requests at the longest prompt, together (the shapes and kernel
    # configurations of a full step); Triton may still compile configurations of other
    # sequence counts during the stream
    longest = length_range(case.prompt_len, case.lengths)[1]
    ids = token_ids(loaded, longest, ctx.eval_text_path, ctx.settings.seed).tolist()
    warm = [Request(-1 - i, ids, 2) for i in range(case.batch)]
    serve_stream(scheduler(), ClosedLoop(warm, case.batch), WallClock())
    cache.peak_used = 0
    requests = serve_requests(loaded, case, ctx)
    duration = case.duration_s or None
    load = OpenLoop(requests, case.rate, ctx.settings.seed, duration) if case.rate else \
        ClosedLoop(requests, case.concurrency, duration)
    served = scheduler()
    meter = energy.meter_for(torch.device(case.device))
    with meter.window():
        done = serve_stream(served, load, WallClock())
    try:
        metrics, samples = stream_metrics(done, SLO(case.slo_ttft_ms, case.slo_itl_ms, case.slo_pct))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    metrics.update(offered_rate=case.rate, requests_sent=load.sent,
                   peak_kv_blocks=cache.peak_used, kv_blocks=pool, kv_cache_bytes=cache.nbytes,
                   mean_step_tokens=served.step_tokens / served.steps, weight_bytes=model.weight_bytes,
                   weight_bytes_dense=loaded.model.weight_bytes)
    metrics.update(meter.metrics(1, sum(len(r.output) for r in done)))
    return metrics, samples


def benchmark_case(case: Case) -> Case:
    """The case pytest-benchmark times for `case`. It times one whole call, and decode's
    figures are per output token with the prefill left out, which a whole call cannot
    give: a decode case is benchmarked as its generate twin, under that id and name, so
    no row labelled decode ever holds a whole generation."""
    return replace(case, workload="generate") if case.workload == "decode" else case


def benchmark_callable(case: Case, ctx: RunContext, models: ModelCache) -> tuple[Callable[[], object], int]:
    """For pytest-benchmark: the case's timed call and the tokens it processes (0 for
    ops). generate calls what one sample of the generate workload times: a whole greedy
    generation, prefill included, on a static cache made once outside the call."""
    if case.workload == "attention":
        return _attention_op(case, ctx), 0
    if case.workload == "linear":
        return _linear_op(case, ctx)[0], 0
    if case.workload == "decode":
        raise UserError("pytest-benchmark cannot time decode's per-token steps alone; benchmark "
                        "benchmark_case(case), its generate twin")
    model, loaded = _model(case, models)
    if case.workload == "encode":
        tokens, seam_mask, lengths = encode_batch(loaded, case, ctx)
        return (lambda: model(tokens, seam_mask)), sum(lengths)
    prompt = prompt_tokens(loaded, case, ctx)  # (B, T)
    if case.workload == "prefill":
        return (lambda: model(prompt)), case.batch * case.prompt_len
    if case.workload == "generate":
        cache, device = _static_cache(model, case), torch.device(case.device)
        return (lambda: generation_step_times(model, prompt, case.new_tokens, cache, device),
                case.batch * case.new_tokens)
    raise UserError(f"the {case.workload} workload has no single timed call; pytest-benchmark cannot run it")


WORKLOAD_FNS: dict[str, Callable[[Case, RunContext, ModelCache], WorkloadResult]] = {
    "prefill": run_prefill,
    "decode": run_decode,
    "generate": run_generate,
    "drift": run_drift,
    "attention": run_attention,
    "linear": run_linear,
    "encode": run_encode,
    "serve": run_serve,
}
