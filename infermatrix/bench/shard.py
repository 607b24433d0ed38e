"""Split a matrix's cases into N shards, so N CI jobs, a Slurm job array or N
machines each run one share: `infermatrix run MATRIX --shard K/N`.

The split depends only on the set of expanded cases and the file's [run] settings,
never on the order of the file's lists nor on the machine (each shard computes it on
its own machine, and all must agree): cases are put in a canonical order (estimated cost,
highest first, then case id) and each goes to the shard with the least estimated work
so far (greedy longest-processing-time, within 4/3 of the best possible balance).

The cost model is deliberately simple: a case's seconds are estimated from the FLOPs
and bytes of one call of its workload (bench.roofline) at nominal rates per device and
dtype, times the calls the timer makes (capped by max_time_s), plus loading the
weights and starting the case. It only has to rank cases, not predict them.
"""

from __future__ import annotations

import dataclasses
import heapq
import re

from infermatrix.bench import roofline
from infermatrix.bench.matrix import (Case, Matrix, RunSettings, Shard, _parse_settings, attention_shape,
                                      device_dtypes, linear_shape, tomllib)
from infermatrix.errors import UserError
from infermatrix.weights import DTYPES, model_config

# Nominal rates a whole model reaches (FLOP/s by dtype, bytes/s), well under GEMM peaks:
# a CPU without native bf16 matmul runs it several times slower than fp32 (8x on this
# project's 2-core CI machine); a GPU runs half precision on tensor cores.
_FLOPS = {
    "cpu": {"float32": 50e9, "bfloat16": 10e9, "float16": 10e9},
    "cuda": {"float32": 20e12, "bfloat16": 200e12, "float16": 200e12},
}
_BYTES_PER_S = {"cpu": 10e9, "cuda": 2e12}
_CASE_START_S = 0.5  # fork, imports, allocations
_LOAD_BYTES_PER_S = 1e9  # reading or generating weights
_COMPILE_S = 30.0  # torch.compile's first call, outside the timed samples


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 1 <= K <= N; anything else is a UserError saying the fix."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match:
        raise UserError(f"--shard {text!r} is not K/N: write two whole numbers, e.g. --shard 2/4 "
                        "for the second of four shards")
    k, n = int(match[1]), int(match[2])
    if n < 1:
        raise UserError(f"--shard {text}: the shard count N must be at least 1, e.g. --shard 1/{max(k, 1)}")
    if not 1 <= k <= n:
        raise UserError(f"--shard {text}: the shard index K counts from 1 to N ({n}); "
                        f"use --shard 1/{n} to --shard {n}/{n}")
    return k, n


def _call_seconds(cost: roofline.Cost, kind: str, dtype: str) -> float:
    flops = _FLOPS[kind].get(dtype, _FLOPS[kind]["float32"])
    return max(cost.flops / flops, cost.bytes / _BYTES_PER_S[kind])


def estimate_cost(case: Case, settings: RunSettings = RunSettings()) -> float:
    """Estimated seconds the case takes on a nominal machine of its device type."""
    kind = "cuda" if case.device.startswith("cuda") else "cpu"
    nbytes = DTYPES[case.dtype].itemsize
    cfg = model_config(case.model)
    load = 0.0
    if case.workload == "attention":
        heads, kv_heads, head_dim = attention_shape(case)
        call = roofline.attention_cost(case.batch, heads, kv_heads, case.prompt_len, case.prompt_len, head_dim,
                                       causal=case.causal, dtype_bytes=nbytes)
    elif case.workload == "linear":
        m, k, n = linear_shape(case)
        call = roofline.linear_cost(m, k, n, act_bytes=nbytes, weight_bytes_per_elem=nbytes)
    elif cfg.kind == "encoder":  # encode, drift: one forward over a padded batch of at most prompt_len
        load = cfg.num_params() * nbytes / _LOAD_BYTES_PER_S
        if case.workload == "drift":  # untimed, by the variant and by the fp32 reference
            load += cfg.num_params() * 4 / _LOAD_BYTES_PER_S
            forward = roofline.encode_cost(cfg, case.windows, case.prompt_len, dtype_bytes=nbytes)
            seconds = _call_seconds(forward, kind, case.dtype) + _call_seconds(forward, kind, "float32")
            return _CASE_START_S + load + seconds + _compile_s(case)
        call = roofline.encode_cost(cfg, case.batch, case.prompt_len, dtype_bytes=nbytes)
    else:
        load = cfg.num_params() * nbytes / _LOAD_BYTES_PER_S
        prefill = roofline.prefill_cost(cfg, case.batch, case.prompt_len, dtype_bytes=nbytes)
        if case.workload == "prefill":
            call = prefill
        elif case.workload == "drift":
            # untimed, done by the variant and by the fp32 reference: logits over all
            # windows at once, then greedy decoding of the first 32 tokens of each
            load += cfg.num_params() * 4 / _LOAD_BYTES_PER_S
            logits = roofline.prefill_cost(cfg, case.windows, case.prompt_len, dtype_bytes=nbytes)
            greedy = _generation(cfg, case, case.windows, min(32, case.prompt_len), case.new_tokens + 1, nbytes)
            both = logits + greedy
            seconds = _call_seconds(both, kind, case.dtype) + _call_seconds(both, kind, "float32")
            return _CASE_START_S + load + seconds + _compile_s(case)
        else:  # decode / generate: one call is a whole generation
            call = _generation(cfg, case, case.batch, case.prompt_len, case.new_tokens, nbytes)
    per_call = _call_seconds(call, kind, case.dtype)
    # the timer: warm-up, then at least min_runs (6 for a 95% CI) and usually more, within max_time_s
    # (the time cap is hard, but one timed call is always made)
    runs = min(settings.max_runs, max(settings.min_runs, 6) * 2)
    sampling = max(per_call, min(settings.max_time_s, runs * per_call))
    warm = max(settings.warmup * per_call, settings.warmup_s)
    return _CASE_START_S + load + warm + sampling + _compile_s(case)


def _generation(cfg, case: Case, batch: int, prompt_len: int, new_tokens: int, nbytes: int) -> roofline.Cost:
    """A prefill, then new_tokens - 1 decode steps (recomputing the prefix without a KV cache).
    The steps' costs grow at most quadratically with the context: Simpson's rule over the
    first, middle and last step instead of a loop over every step."""
    cached = "kv_cache" in case.variant
    prefill = roofline.prefill_cost(cfg, batch, prompt_len, dtype_bytes=nbytes)
    steps = new_tokens - 1
    if steps < 1:
        return prefill
    first, last = prompt_len + 1, prompt_len + steps
    step = [roofline.decode_step_cost(cfg, batch, ctx, dtype_bytes=nbytes, kv_cache=cached)
            for ctx in (first, (first + last) // 2, last)]
    return prefill + (step[0] + 4 * step[1] + step[2]) * (steps / 6)


def _compile_s(case: Case) -> float:
    return _COMPILE_S if any(p.split("(")[0] == "compile" for p in case.variant.split("+")) else 0.0


def assign_shards(cases, n: int, settings: RunSettings = RunSettings()) -> list[list[Case]]:
    """N lists of cases (each in the order given), every case in exactly one, balanced
    by estimated cost; the same case set gives the same split in any order."""
    # integer milliseconds: sums and ties are exact, so every machine splits alike
    costs = {c: int(round(estimate_cost(c, settings) * 1000)) for c in cases}
    canonical = sorted(costs, key=lambda c: (-costs[c], c.case_id, repr(c)))
    loads = [(0, i) for i in range(n)]  # (estimated ms, shard index): least loaded, then lowest index
    owner: dict[Case, int] = {}
    for case in canonical:
        load, i = heapq.heappop(loads)
        owner[case] = i
        heapq.heappush(loads, (load + costs[case], i))
    return [[c for c in cases if owner[c] == i] for i in range(n)]


def split_settings(matrix: Matrix) -> RunSettings:
    """The [run] settings the split uses: the file's, without command-line overrides,
    so shards started with different --timeout or --max-time still agree."""
    if matrix.text is None:
        return matrix.settings
    table = tomllib.loads(matrix.text).get("run", {})
    return _parse_settings(table, matrix.source) if isinstance(table, dict) else matrix.settings


def shard_matrix(matrix: Matrix, k: int, n: int) -> Matrix:
    """The matrix with only the K-th of N shards' cases (K from 1), in the file's order."""
    shards = assign_shards(matrix.cases, n, split_settings(matrix))
    return dataclasses.replace(matrix, cases=tuple(shards[k - 1]),
                               shard=Shard(k, n, len(matrix.cases), device_dtypes(matrix.cases)))


def shard_costs(matrix: Matrix, n: int) -> list[float]:
    """Estimated seconds of each shard, for balance reports."""
    settings = split_settings(matrix)
    return [sum(estimate_cost(c, settings) for c in shard) for shard in assign_shards(matrix.cases, n, settings)]


def share_note(whole: Matrix, k: int, n: int) -> str:
    """What `run --shard K/N` says of its share of the `whole` matrix: its place, the
    matrix's case count and the share of the estimated cost it carries."""
    costs = shard_costs(whole, n)
    share = costs[k - 1] / sum(costs) if sum(costs) else 0.0
    return f"shard {k}/{n} of {len(whole.cases)}, {share:.0%} of the estimated cost"
