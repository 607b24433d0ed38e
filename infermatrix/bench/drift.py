"""Accuracy drift of a variant against the fp32 reference, as pure functions on tensors.

The metrics follow llama.cpp's perplexity tool in KL-divergence mode:
KL(reference || variant) per position, top-1 agreement and
Δp = p_variant(target) - p_reference(target) in percentage points, plus
perplexity on real text and raw-logit errors (max-abs, relative L2, SQNR).

Percentiles use linear interpolation between order statistics (numpy's default).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from infermatrix.encoder import Encoder
from infermatrix.errors import UserError
from infermatrix.model import Transformer, math_attention

# Rows per chunk are chosen so one float64 chunk holds about this many elements
# (32 MiB): a 1024 x 49152 logit matrix in float64 would otherwise need ~400 MB
# per temporary, several times over.
_CHUNK_ELEMENTS = 4 * 1024 * 1024


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x, q))


def drift_metrics(ref_logits: torch.Tensor, var_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Drift of var_logits against ref_logits at N next-token positions.

    ref_logits, var_logits (N, V) in any float dtype; targets (N,) the true next tokens.
    Everything is computed in float64, in chunks of rows to bound memory.

    Keys: ppl_ref, ppl, ppl_delta_pct; kl_mean, kl_median, kl_p99, kl_max;
    top1_agree_pct; dp_mean, dp_rms, dp_p01, dp_p05, dp_median, dp_p95, dp_p99,
    dp_min, dp_max (percentage points); logits_max_abs, logits_rel_l2, sqnr_db
    (float('inf') when the logits are identical).
    """
    if ref_logits.dim() != 2 or ref_logits.shape != var_logits.shape:
        raise ValueError(
            f"ref_logits {tuple(ref_logits.shape)} and var_logits {tuple(var_logits.shape)} "
            "must both be (N, V) with the same shape"
        )
    n, vocab = ref_logits.shape
    if targets.shape != (n,):
        raise ValueError(f"targets has shape {tuple(targets.shape)}; expected ({n},), one per logit row")
    if n == 0:
        raise ValueError("drift_metrics needs at least one position")
    device = ref_logits.device
    var_logits = var_logits.to(device)
    targets = targets.to(device=device, dtype=torch.long)

    kl = torch.empty(n, dtype=torch.float64, device=device)  # (N,)
    nll_ref = torch.empty_like(kl)  # (N,)
    nll_var = torch.empty_like(kl)  # (N,)
    dp = torch.empty_like(kl)  # (N,)
    agree = 0
    max_abs = torch.zeros((), dtype=torch.float64, device=device)  # a tensor: Python max() would drop a nan
    sum_ref_sq = 0.0
    sum_err_sq = 0.0

    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        ref = ref_logits[sl].to(torch.float64)  # (n, V)
        var = var_logits[sl].to(torch.float64)  # (n, V)
        tgt = targets[sl].unsqueeze(1)  # (n, 1)

        logp_ref = torch.log_softmax(ref, dim=-1)  # (n, V)
        logp_var = torch.log_softmax(var, dim=-1)  # (n, V)
        p_ref = logp_ref.exp()  # (n, V)
        # Terms with p_ref == 0 contribute 0 (0·log 0 = 0); computing them would give nan from -inf - -inf.
        terms = torch.where(p_ref > 0, p_ref * (logp_ref - logp_var), torch.zeros_like(p_ref))  # (n, V)
        # Rounding can leave a tiny negative sum where the distributions are equal; KL is >= 0.
        kl[sl] = terms.sum(dim=-1).clamp_min(0.0)  # (n,)

        lp_ref_t = logp_ref.gather(1, tgt).squeeze(1)  # (n,)
        lp_var_t = logp_var.gather(1, tgt).squeeze(1)  # (n,)
        nll_ref[sl] = -lp_ref_t
        nll_var[sl] = -lp_var_t
        dp[sl] = 100.0 * (lp_var_t.exp() - lp_ref_t.exp())  # (n,) percentage points

        agree += int((ref.argmax(dim=-1) == var.argmax(dim=-1)).sum())
        err = var - ref  # (n, V)
        max_abs = torch.maximum(max_abs, err.abs().max())
        sum_ref_sq += float(ref.square().sum())
        sum_err_sq += float(err.square().sum())

    ppl_ref = math.exp(float(nll_ref.mean()))
    ppl = math.exp(float(nll_var.mean()))
    return {
        "ppl_ref": ppl_ref,
        "ppl": ppl,
        "ppl_delta_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "kl_mean": float(kl.mean()),
        "kl_median": _quantile(kl, 0.5),
        "kl_p99": _quantile(kl, 0.99),
        "kl_max": float(kl.max()),
        "top1_agree_pct": 100.0 * agree / n,
        "dp_mean": float(dp.mean()),
        "dp_rms": math.sqrt(float(dp.square().mean())),
        "dp_p01": _quantile(dp, 0.01),
        "dp_p05": _quantile(dp, 0.05),
        "dp_median": _quantile(dp, 0.5),
        "dp_p95": _quantile(dp, 0.95),
        "dp_p99": _quantile(dp, 0.99),
        "dp_min": float(dp.min()),
        "dp_max": float(dp.max()),
        "logits_max_abs": float(max_abs),
        "logits_rel_l2": _ratio(math.sqrt(sum_err_sq), math.sqrt(sum_ref_sq)),
        "sqnr_db": _sqnr_db(sum_ref_sq, sum_err_sq),
    }


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf  # identical logits: no quantization noise at all
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def greedy_match_length(ref_tokens: torch.Tensor, var_tokens: torch.Tensor) -> int | float:
    """Length of the common prefix of two greedy generations.

    1-D (N,) inputs -> int. 2-D (B, N) inputs -> the mean over the B rows, as a
    float (the mean says more about a batch than its worst row; a single
    diverging row still pulls it down). Sequences of different lengths are
    compared over the shorter one.
    """
    if ref_tokens.dim() != var_tokens.dim() or ref_tokens.dim() not in (1, 2):
        raise ValueError(
            f"token sequences must both be 1-D (N,) or 2-D (B, N); got {tuple(ref_tokens.shape)} "
            f"and {tuple(var_tokens.shape)}"
        )
    if ref_tokens.dim() == 2 and ref_tokens.shape[0] != var_tokens.shape[0]:
        raise ValueError(f"batch sizes differ: {ref_tokens.shape[0]} vs {var_tokens.shape[0]}")
    n = min(ref_tokens.shape[-1], var_tokens.shape[-1])
    same = ref_tokens[..., :n].cpu() == var_tokens[..., :n].cpu()  # (..., n)
    # cumprod stays 1 up to the first mismatch, then 0: its sum is the prefix length.
    prefix = same.long().cumprod(dim=-1).sum(dim=-1)  # () or (B,)
    if ref_tokens.dim() == 1:
        return int(prefix)
    return float(prefix.double().mean()) if prefix.numel() else 0.0


def window_tokens(ids: list[int] | torch.Tensor, window: int, n_windows: int) -> torch.Tensor:
    """Consecutive, disjoint windows from the start of ids -> (n_windows, window+1) long.

    Each row is window+1 tokens: the model reads the first window and predicts
    the last window (the row shifted by one), as llama.cpp scores independent chunks.
    """
    if window < 1 or n_windows < 1:
        raise UserError(f"window ({window}) and n_windows ({n_windows}) must both be at least 1")
    ids_t = torch.as_tensor(ids, dtype=torch.long).cpu()
    if ids_t.dim() != 1:
        raise ValueError(f"ids must be a 1-D token sequence, got shape {tuple(ids_t.shape)}")
    need = n_windows * (window + 1)
    if ids_t.numel() < need:
        raise UserError(
            f"eval text has only {ids_t.numel()} tokens; need at least {need} for {n_windows} windows of "
            f"{window} (+1 target token each); pass a longer --eval-text or fewer/smaller windows"
        )
    return ids_t[:need].view(n_windows, window + 1)  # (n_windows, window+1)


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def model_logits(
    model: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    windows: torch.Tensor,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits of model over windows (n_windows, window+1).

    Returns logits (n_windows*window, V) float32 and targets (n_windows*window,) long,
    both on the CPU: the reference is cached on disk and compared there, and
    holding them on the accelerator would eat memory the benchmark needs.
    device defaults to the device of the model's first parameter.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n_windows, window+1) with window >= 1, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = _model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    inputs = windows[:, :-1]  # (W, T)
    targets = windows[:, 1:].reshape(-1).to(torch.long).cpu()  # (W*T,)
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], batch_size):
            batch = inputs[start:start + batch_size].to(device)  # (b, T)
            logits = model(batch)  # (b, T, V)
            chunks.append(logits.float().cpu())
    # cat outside inference_mode makes an ordinary tensor, usable later where inference tensors are not.
    logits = torch.cat(chunks, dim=0)  # (W, T, V)
    return logits.reshape(-1, logits.shape[-1]), targets  # (W*T, V), (W*T,)


def require_fp32_reference(reference: torch.nn.Module, variant: torch.nn.Module) -> None:
    """Refuse a drift reference that is not the plain fp32 reference model: a variant
    measured against itself, against a low-precision copy or against another variant
    would report a drift of (nearly) zero and pass every accuracy rule."""
    if reference is variant:
        raise UserError("drift compares the variant with its own reference model; the reference must be "
                        "the fp32 reference model loaded on its own")
    problem = None
    if not isinstance(reference, (Transformer, Encoder)):
        problem = f"it is a {type(reference).__name__}, not the reference Transformer or Encoder"
    elif reference.attention is not math_attention:
        name = getattr(reference.attention, "__name__", reference.attention)
        problem = f"its attention is {name!r}, not math_attention"
    else:
        low = sorted({str(t.dtype).removeprefix("torch.") for t in (*reference.parameters(), *reference.buffers())
                      if t.is_floating_point() and t.dtype != torch.float32})
        swapped = sorted({type(m).__name__ for m in reference.modules()
                          if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear})
        if low:
            problem = f"it holds {', '.join(low)} tensors"
        elif swapped:
            problem = f"its linear layers are {', '.join(swapped)}"
    if problem:
        raise UserError(f"drift needs the fp32 reference model as its reference, but {problem}; "
                        "load it with load_model(..., torch.float32) and apply no variant")


def hidden_state_drift(ref_hidden: torch.Tensor, var_hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Drift of an encoder's final hidden states (B, T, C) against the reference's, over
    the real positions of mask (B, T) (True = a real token; pad positions hold values
    nobody reads). In float64.

    Keys: hidden_cosine_mean, hidden_cosine_min (cosine similarity of each token's
    vector), hidden_sqnr_db (over every real element; inf when identical),
    hidden_rel_l2.
    """
    if ref_hidden.shape != var_hidden.shape or ref_hidden.dim() != 3 or mask.shape != ref_hidden.shape[:2]:
        raise ValueError(f"hidden states {tuple(ref_hidden.shape)} and {tuple(var_hidden.shape)} must both be "
                         f"(B, T, C), and the mask {tuple(mask.shape)} (B, T)")
    mask = mask.to(device=ref_hidden.device, dtype=torch.bool)
    if not bool(mask.any()):
        raise ValueError("hidden_state_drift needs at least one real position")
    ref = ref_hidden[mask].to(torch.float64)  # (N, C)
    var = var_hidden.to(ref_hidden.device)[mask].to(torch.float64)  # (N, C)
    cosine = torch.nn.functional.cosine_similarity(ref, var, dim=-1)  # (N,)
    signal, noise = float(ref.square().sum()), float((var - ref).square().sum())
    return {
        "hidden_cosine_mean": float(cosine.mean()),
        "hidden_cosine_min": float(cosine.min()),
        "hidden_sqnr_db": _sqnr_db(signal, noise),
        "hidden_rel_l2": _ratio(math.sqrt(noise), math.sqrt(signal)),
    }
