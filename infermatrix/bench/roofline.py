"""Roofline: FLOPs and bytes per workload, measured machine peaks, "% of the limit".

A timing alone says little; next to the hardware limit it says how much headroom is
left. The limit of a workload is the roofline minimum time
``max(flops / peak_flops, bytes / peak_bandwidth)``; we report it as a share of the
measured time, and which of the two terms binds.

Counting rules (all counts are per call; ``bytes`` are the minimum traffic to and
from main memory of an ideal implementation that touches each operand once):

* Matmul (M, K) x (K, N): ``2*M*K*N`` FLOPs (one multiply and one add per term).
  Bytes: read the activations ``M*K``, read the weights ``K*N``, write the output
  ``M*N`` (activations at the activation dtype, weights at their own bytes/element).
* Attention, q_len queries against k_len keys, H query heads, Hkv key/value heads,
  head dim D, batch B: two matmuls (Q Kᵀ, then P V), each ``2*D`` FLOPs per
  (query, key) pair, so ``4*B*H*pairs*D`` FLOPs with pairs per head
    - non-causal: ``q_len * k_len``;
    - causal: queries sit at the last q_len of the k_len key positions (as in
      ``model.causal_mask``), so query i (0-based) sees ``k_len - q_len + i + 1``
      keys, and ``pairs = q_len*(k_len - q_len) + q_len*(q_len + 1)/2``; for
      q_len == k_len that is exactly ``q*(q+1)/2``, about half of q*k;
    - a model's own sliding window W (``ModelConfig.sliding_window``): the query at
      position p sees ``min(p + 1, W)`` keys, and only the last ``W + q_len - 1``
      keys are read.
  Bytes: read Q (B*H*q_len*D), K and V (2*B*Hkv*k_len*D: grouped-query heads are
  read once per KV head, not per query head), write O (B*H*q_len*D). The score
  matrix is not counted: a fused (flash) kernel never writes it, and the limit is
  what the best kernel could reach. Causal masking saves FLOPs, not bytes: the last
  query needs every key.
* Softmax, RMSNorm, RoPE, SiLU, residual adds and other elementwise ops: their FLOPs
  and their memory traffic are ignored (small next to the matmuls for any real size,
  and a fused implementation folds them into the matmuls' reads and writes).
* Forward of the model, q_len new tokens per sequence attending to k_len keys
  (k_len == q_len for a prefill or a cache-less recompute, k_len = context for a
  cached decode step); m = batch * q_len token rows:
    - per layer, linears q (C -> H*D), k and v (C -> Hkv*D), o (H*D -> C),
      gate and up (C -> F), down (F -> C); then the LM head (C -> vocab) on all m
      rows (the model computes logits for every position);
    - attention per layer as above;
    - weights: every streamed weight read once per forward, ``num_params *
      dtype_bytes`` (or ``weight_bytes`` for e.g. quantized weights) minus the
      untied embedding table, which is gathered, not streamed: the lookup reads
      only ``m`` rows of ``C`` elements (one per token; repeated tokens are counted
      again, an upper bound). A tied table is the LM head's weight, read in full
      once by the head, and its lookup rows are counted on top;
    - activations: each linear's input read and output written, as above;
    - KV cache: read is attention's K and V read (k_len keys and values per layer
      per KV head); written: the q_len new keys and values stored into the cache,
      ``2*B*Hkv*q_len*D`` elements per layer (not counted without a cache).
* Decode reads every weight and the KV cache once per token: a cached step is
  forward(q_len=1, k_len=context); a cache-less step recomputes the whole prefix,
  forward(q_len=k_len=context).

Peaks are measured, not taken from a datasheet (gpt-fast's bandwidth figure, for
example, is achieved bytes/s over the nominal HBM bandwidth): memory bandwidth from a
large tensor copy (read + write bytes, STREAM "copy" convention; write-allocate
traffic on CPUs is not counted) and GEMM FLOP/s from square matmuls, best of several.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

import infermatrix.cache
from infermatrix.bench.env import cpu_name
from infermatrix.model import ModelConfig
from infermatrix.weights import parse_dtype

_MIB = 1 << 20


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved by one call of a workload."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, factor: float) -> Cost:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Cost(self.flops * factor, self.bytes * factor)

    __rmul__ = __mul__

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte (the roofline's x axis)."""
        return self.flops / self.bytes if self.bytes else float("inf")


ZERO = Cost(0.0, 0.0)


def linear_cost(m: int, k: int, n: int, *, act_bytes: float, weight_bytes_per_elem: float) -> Cost:
    """x (m, k) @ W (k, n): 2mkn FLOPs; read x and W, write the (m, n) output."""
    return Cost(
        flops=2.0 * m * k * n,
        bytes=act_bytes * (m * k + m * n) + weight_bytes_per_elem * k * n,
    )


def causal_pairs(q_len: int, k_len: int, window: int | None = None) -> int:
    """Visible (query, key) pairs per head, queries aligned to the last q_len keys
    (each seeing at most `window` keys, itself included, when given)."""
    if q_len > k_len:
        raise ValueError(f"causal attention needs q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    if window is not None:  # positions p < window see p + 1 keys, the others window keys
        first, last = k_len - q_len, k_len - 1
        short_end = min(last, window - 1)  # last position still seeing fewer than window keys
        short = (short_end + first + 2) * (short_end - first + 1) // 2 if short_end >= first else 0
        return short + (last - max(first, window) + 1) * window if last >= window else short
    # query i sees k_len - q_len + i + 1 keys; sum over i = 0 .. q_len - 1
    return q_len * (k_len - q_len) + q_len * (q_len + 1) // 2


def attention_cost(
    batch: int,
    heads: int,
    kv_heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    *,
    causal: bool,
    dtype_bytes: float,
    density: float | None = None,
    window: int | None = None,
    keys_read: int | None = None,
) -> Cost:
    """softmax(Q Kᵀ / √D) V: two matmuls over the visible pairs; read Q, K, V, write O.
    density: the share of (query, key) pairs a sparse layout computes, when it has one;
    window: a model's own sliding window (causal), which bounds pairs and keys read;
    keys_read: the keys a sparse layout's queries read at all (a decode step's row)."""
    pairs = causal_pairs(q_len, k_len, window if causal else None) if causal else q_len * k_len
    if density is not None:
        pairs = density * q_len * k_len
    if keys_read is None:
        keys_read = min(k_len, window + q_len - 1) if causal and window is not None else k_len
    q_and_o = 2 * batch * heads * q_len * head_dim
    k_and_v = 2 * batch * kv_heads * keys_read * head_dim
    return Cost(flops=4.0 * batch * heads * pairs * head_dim, bytes=dtype_bytes * (q_and_o + k_and_v))


def _linear_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(in, out) of every linear layer in one forward, LM head last."""
    d, h, hkv, hd, f = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim
    per_layer = [(d, h * hd), (d, hkv * hd), (d, hkv * hd), (h * hd, d), (d, f), (d, f), (f, d)]
    return per_layer * cfg.n_layers + [(d, cfg.vocab_size)]


def streamed_weight_bytes(cfg: ModelConfig, *, dtype_bytes: float, weight_bytes: float | None = None,
                          table_is_head: bool | None = None) -> float:
    """Weight bytes one forward reads in full: all weights but an embedding table that
    is not also the output head (the lookup gathers only a row per token).

    ``weight_bytes`` is the model's whole weight storage (as ``Transformer.weight_bytes``
    reports, tied weights once); the table is taken off at ``dtype_bytes`` because
    quantizing variants swap only the linear layers. ``table_is_head`` (None: the
    config's tie_embeddings) is False for a tied model whose head a variant replaced
    with its own copy (int8, packed), leaving the table beside it.
    """
    total = cfg.num_params() * dtype_bytes if weight_bytes is None else float(weight_bytes)
    if not (cfg.tie_embeddings if table_is_head is None else table_is_head):
        total -= cfg.vocab_size * cfg.dim * dtype_bytes
    return total


def forward_cost(
    cfg: ModelConfig,
    batch: int,
    q_len: int,
    k_len: int,
    *,
    dtype_bytes: float,
    weight_bytes: float | None = None,
    kv_cache: bool = True,
    table_is_head: bool | None = None,
) -> Cost:
    """One forward: q_len new tokens per sequence attending (causally) to k_len keys.

    ``kv_cache=False`` drops the cache-write term (a cache-less forward stores no K/V).
    """
    if q_len <= 0 or k_len < q_len:
        raise ValueError(f"need 0 < q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    m = batch * q_len  # token rows through every linear
    cost = ZERO
    for k, n in _linear_shapes(cfg):
        # weights are added once below, so only FLOPs and activation traffic here
        cost = cost + linear_cost(m, k, n, act_bytes=dtype_bytes, weight_bytes_per_elem=0)
    attn = attention_cost(batch, cfg.n_heads, cfg.n_kv_heads, q_len, k_len, cfg.head_dim,
                          causal=True, dtype_bytes=dtype_bytes, window=cfg.sliding_window)
    cost = cost + cfg.n_layers * attn  # includes reading k_len cached keys and values
    weights = streamed_weight_bytes(cfg, dtype_bytes=dtype_bytes, weight_bytes=weight_bytes,
                                    table_is_head=table_is_head)
    embedding_rows = m * cfg.dim * dtype_bytes  # the lookup gathers one row per token
    kv_write = 2 * cfg.n_layers * batch * cfg.n_kv_heads * q_len * cfg.head_dim * dtype_bytes if kv_cache else 0
    return cost + Cost(0.0, weights + embedding_rows + kv_write)


def prefill_cost(cfg: ModelConfig, batch: int, prompt_len: int, *, dtype_bytes: float,
                 weight_bytes: float | None = None, kv_cache: bool = True,
                 table_is_head: bool | None = None) -> Cost:
    """The whole prompt in one forward (time to first token)."""
    return forward_cost(cfg, batch, prompt_len, prompt_len, dtype_bytes=dtype_bytes,
                        weight_bytes=weight_bytes, kv_cache=kv_cache, table_is_head=table_is_head)


def decode_step_cost(cfg: ModelConfig, batch: int, context_len: int, *, dtype_bytes: float, kv_cache: bool,
                     weight_bytes: float | None = None, table_is_head: bool | None = None) -> Cost:
    """One new token per sequence with context_len keys visible (the new one included).

    With a cache: one query against the cache, so every weight and the KV cache are read
    once per token. Without: the whole prefix is recomputed (q_len = k_len = context_len).
    """
    q_len = 1 if kv_cache else context_len
    return forward_cost(cfg, batch, q_len, context_len, dtype_bytes=dtype_bytes,
                        weight_bytes=weight_bytes, kv_cache=kv_cache, table_is_head=table_is_head)


def kv_cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype_bytes: float) -> float:
    """Storage of a K and a V cache for every layer: 2 * L * B * Hkv * max_len * D * bytes."""
    return 2 * cfg.n_layers * batch * cfg.n_kv_heads * max_len * cfg.head_dim * dtype_bytes


# --------------------------------------------------------------------------- peaks


@dataclass
class Peaks:
    """Measured machine limits: copy bandwidth and square-GEMM throughput per dtype."""

    device: str
    bandwidth_gbs: float  # GB/s, 1e9 bytes
    gemm_tflops: dict[str, float]  # dtype name ("bfloat16") -> TFLOP/s
    measured_at: str  # ISO 8601 UTC

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Peaks:
        return cls(
            device=str(data["device"]),
            bandwidth_gbs=float(data["bandwidth_gbs"]),
            gemm_tflops={str(k): float(v) for k, v in data["gemm_tflops"].items()},
            measured_at=str(data["measured_at"]),
        )


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Returns time(fn, reps) -> seconds per call, the device's own clock."""
    if device.type == "cuda":
        def time_cuda(fn: Callable[[], object], reps: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        return time_cuda

    def time_cpu(fn: Callable[[], object], reps: int) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps
    return time_cpu


def _best_seconds(fn: Callable[[], object], device: torch.device, deadline: float, *,
                  reps: int = 1, max_trials: int = 8) -> float:
    """Fastest per-call time of up to max_trials timed trials, one warm-up first.

    At least one trial runs even past the deadline, so a result always comes back.
    """
    timer = _timer(device)
    timer(fn, 1)  # warm-up: allocator, library init, caches
    best = timer(fn, reps)
    for _ in range(max_trials - 1):
        if time.perf_counter() + best * reps > deadline:
            break
        best = min(best, timer(fn, reps))
    return best


def _last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    best = 0
    cache_dir = Path("/sys/devices/system/cpu/cpu0/cache")
    for size_file in cache_dir.glob("index*/size"):  # e.g. "32768K"
        text = size_file.read_text().strip()
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        try:
            value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except ValueError:
            continue
        best = max(best, value)
    return best


def _measure_bandwidth(device: torch.device, deadline: float) -> float:
    """GB/s of a large tensor copy, counting the bytes read plus the bytes written."""
    floor = 1 << 30 if device.type == "cuda" else 256 * _MIB
    nbytes = min(max(floor, 8 * _last_level_cache_bytes(device)), 4 << 30)  # >> LLC, so DRAM is measured
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    src.fill_(1.0)  # touch every page now, so page faults are not timed
    dst.fill_(0.0)
    reps = 4 if device.type == "cuda" else 1
    seconds = _best_seconds(lambda: dst.copy_(src), device, deadline, reps=reps)
    return 2 * nbytes / seconds / 1e9


def _measure_gemm(device: torch.device, dtype: torch.dtype, deadline: float) -> float:
    """TFLOP/s of the best square matmul; sizes grow while the budget allows.

    float32 on CUDA runs under the process's TF32 setting (off by default in torch).
    """
    sizes = (1024, 2048, 4096, 8192) if device.type == "cuda" else (128, 256, 512, 1024, 2048)
    reps = 10 if device.type == "cuda" else 1  # amortize launch overhead on the GPU
    best_tflops, last_seconds = 0.0, 0.0
    for n in sizes:
        # doubling n costs 8x; stop if a warm-up and two trials would overrun the budget
        if last_seconds and time.perf_counter() + 8 * last_seconds * (2 * reps + 1) > deadline:
            break
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        # F.linear (a @ bᵀ) is the op every nn.Linear runs; on some CPUs torch.mm takes a
        # far slower path for bfloat16 (~1 vs ~10 GFLOP/s here), which is no one's peak.
        last_seconds = _best_seconds(lambda: torch.nn.functional.linear(a, b), device, deadline, reps=reps)
        best_tflops = max(best_tflops, 2.0 * n**3 / last_seconds / 1e12)
    return best_tflops


def measure_peaks(device: str | torch.device = "cpu", dtypes: Sequence[str] = ("float32", "bfloat16"), *,
                  budget_s: float = 4.0) -> Peaks:
    """Measure copy bandwidth and GEMM TFLOP/s per dtype within about budget_s seconds.

    A quarter of the budget goes to bandwidth, the rest is split evenly across dtypes.
    """
    dev = torch.device(device)
    names = [_dtype_name(d) for d in dtypes]
    torch_dtypes = [parse_dtype(n) for n in names]  # fail on a bad name before measuring
    start = time.perf_counter()
    with torch.no_grad():
        bandwidth = _measure_bandwidth(dev, start + 0.25 * budget_s)
        gemm: dict[str, float] = {}
        for i, (name, dtype) in enumerate(zip(names, torch_dtypes)):
            now = time.perf_counter()
            share = (start + budget_s - now) / (len(names) - i)  # unused time rolls over
            gemm[name] = _measure_gemm(dev, dtype, now + max(share, 0.0))
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # give the measurement buffers back
    return Peaks(
        device=str(dev),
        bandwidth_gbs=bandwidth,
        gemm_tflops=gemm,
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def peaks_key(device: str | torch.device, dtypes: Sequence[str]) -> tuple[str, dict]:
    """Cache key of a machine's peaks and the fields it hashes (kept in the file)."""
    dev = torch.device(device)
    fields = {
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "dtypes": [_dtype_name(d) for d in dtypes],
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return f"{dev.type}-{digest}", fields


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else infermatrix.cache.cache_dir("peaks").parent


def load_or_measure_peaks(device: str | torch.device = "cpu", dtypes: Sequence[str] = ("float32", "bfloat16"),
                          cache_dir: str | os.PathLike | None = None) -> Peaks:
    """Peaks from ``<cache>/peaks/<key>.json``, measured and stored when missing or unreadable."""
    key, fields = peaks_key(device, dtypes)
    path = _cache_root(cache_dir) / "peaks" / f"{key}.json"
    try:
        return Peaks.from_dict(json.loads(path.read_text(encoding="utf-8"))["peaks"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # missing or corrupt: measure afresh
    peaks = measure_peaks(device, dtypes)
    with infermatrix.cache.atomic_path(path) as tmp:  # parallel runs never read half a file
        tmp.write_text(json.dumps({"key": fields, "peaks": peaks.to_dict()}, indent=2), encoding="utf-8")
    return peaks


def limit_fraction(cost: Cost, seconds: float, peaks: Peaks, dtype: str) -> dict[str, float | str]:
    """How close a measured time is to the roofline limit.

    Returns floats ``achieved_tflops``, ``achieved_gbs``, ``pct_of_compute_peak``,
    ``pct_of_bandwidth_peak``, ``pct_of_limit`` (roofline minimum time
    max(flops / peak_flops, bytes / peak_bw) over the measured seconds, in %), and the
    string ``bound``: "compute" or "memory", whichever term of that minimum is larger.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    name = _dtype_name(dtype)
    if name not in peaks.gemm_tflops:
        raise KeyError(f"no GEMM peak for dtype {name!r}; measured: {sorted(peaks.gemm_tflops)}")
    peak_flops = peaks.gemm_tflops[name] * 1e12
    peak_bytes = peaks.bandwidth_gbs * 1e9
    compute_s = cost.flops / peak_flops
    memory_s = cost.bytes / peak_bytes
    return {
        "achieved_tflops": cost.flops / seconds / 1e12,
        "achieved_gbs": cost.bytes / seconds / 1e9,
        "pct_of_compute_peak": 100.0 * compute_s / seconds,
        "pct_of_bandwidth_peak": 100.0 * memory_s / seconds,
        "pct_of_limit": 100.0 * max(compute_s, memory_s) / seconds,
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def encode_cost(cfg, batch: int, seq_len: int, *, dtype_bytes: float, streamed_bytes: float | None = None) -> Cost:
    """One encoder forward (infermatrix.encoder) over a right-padded (batch, seq_len)
    batch: what runs, pad positions included. Per layer, the q, k, v, o projections
    (C -> C) and the feed-forward (C -> F -> C) on batch * seq_len rows, and attention
    over every (query, key) pair (not causal). Weights: ``streamed_bytes``, what the
    forward streams as the model stores it (its layers and norms, int8 or not; the
    caller measures them), by default those parameters at ``dtype_bytes``. The embedding
    tables are gathered (a row per token); the masked-LM head and pooler do not run."""
    m = batch * seq_len
    c, f = cfg.dim, cfg.hidden_dim
    cost = ZERO
    for k, n in [(c, c)] * 4 + [(c, f), (f, c)]:
        cost = cost + cfg.n_layers * linear_cost(m, k, n, act_bytes=dtype_bytes, weight_bytes_per_elem=0)
    cost = cost + cfg.n_layers * attention_cost(batch, cfg.n_heads, cfg.n_heads, seq_len, seq_len, cfg.head_dim,
                                                causal=False, dtype_bytes=dtype_bytes)
    if streamed_bytes is None:
        layer = 4 * (c * c + c) + (c * f + f) + (f * c + c) + 4 * c  # projections, FFN, two LayerNorms
        norms = 2 * c * (int(cfg.embed_norm) + int(cfg.final_norm))
        streamed_bytes = (cfg.n_layers * layer + norms) * dtype_bytes
    return cost + Cost(0.0, streamed_bytes + m * c * dtype_bytes)  # and the looked-up embedding rows
