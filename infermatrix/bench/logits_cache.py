"""On-disk cache of reference logits.

The fp32 reference forward over the eval windows is the slowest part of a drift
measurement and its result depends only on (model, text, windows, reference
spec) and on the code that computed it (model and loader source, GGUF conversion
version, torch version: every key carries `code_versions()`), so it is computed
once and stored under ``<cache>/ref_logits/<sha256 of the key>.safetensors``.
safetensors, never pickle: loading a cache file must not be able to run code.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from infermatrix import encoder, encoder_weights, generate, model, weights
from infermatrix.bench import drift
from infermatrix.cache import atomic_path, cache_dir

# Bump when the file layout changes, so old files are never read as new ones.
_FORMAT_VERSION = 1


def sources_sha256(files: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def model_code_sha256() -> str:
    """sha256 of the source that turns weights into reference logits: model.py and
    encoder.py (the math), generate.py (the reference's greedy tokens), weights.py and
    encoder_weights.py (loading, the presets' random init, the GGUF conversion) and
    drift.py (the windows and the chunked logits). Any edit recomputes the references:
    a stale one costs far more than a recompute."""
    files = (model.__file__, encoder.__file__, generate.__file__, weights.__file__, encoder_weights.__file__,
             drift.__file__)
    return sources_sha256(tuple(Path(f) for f in files))


def code_versions() -> dict[str, Any]:
    """What, beyond the caller's key, a cached result depends on. CONVERSION_VERSION
    names the converted-weights folder the reference read, as the weights cache keys it."""
    return {"model_code": model_code_sha256(), "conversion": weights.CONVERSION_VERSION,
            "torch": str(torch.__version__)}


def _canonical_json(key_parts: dict[str, Any]) -> str:
    # Sorted keys and fixed separators: the same parts always give the same bytes.
    # No default=str: repr-like strings of arbitrary objects can embed addresses and
    # make the key unstable, so non-JSON values are rejected instead.
    try:
        return json.dumps(
            {"format": _FORMAT_VERSION, "parts": key_parts, "code": code_versions()},
            sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise TypeError(f"reference-logits key parts must be plain JSON values (str, int, float, bool, None, "
                        f"lists, dicts): {exc}") from None


def _file_for(key_json: str) -> Path:
    return cache_dir("ref_logits") / f"{hashlib.sha256(key_json.encode('ascii')).hexdigest()}.safetensors"


def cache_path(key_parts: dict[str, Any]) -> Path:
    """Where the reference logits for key_parts live (or would live)."""
    return _file_for(_canonical_json(key_parts))


def _load(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when the file is missing or unreadable (then they are recomputed)."""
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        warnings.warn(f"ignoring unreadable reference-logits cache file {path}: {exc}; recomputing", stacklevel=3)
        return None


def _store(path: Path, tensors: dict[str, torch.Tensor], key_json: str) -> None:
    """Write atomically; a cache that cannot be written (disk full, read-only) costs
    only the next run's time, so it warns instead of failing the measurement."""
    try:
        with atomic_path(path) as tmp:
            # The key JSON rides along as metadata so a file can be traced back to its inputs.
            save_file(tensors, str(tmp), metadata={"key": key_json})
    except OSError as exc:
        warnings.warn(f"could not write cache file {path}: {exc}; continuing without it", stacklevel=3)


def cached_tensors(key_parts: dict[str, Any], compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Named CPU tensors from the cache when key_parts was seen before, else from
    compute() and then stored. key_parts holds JSON values that pin the result."""
    key_json = _canonical_json(key_parts)
    path = _file_for(key_json)
    hit = _load(path)
    if hit is not None:
        return hit
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in compute().items()}
    _store(path, tensors, key_json)
    return tensors


def reference_logits(
    key_parts: dict[str, Any],
    compute: Callable[[], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, V) float32, targets (N,) long) on the CPU, from the cache when
    key_parts was seen before, else from compute() and then stored.

    key_parts holds JSON values that pin the result, e.g. the weights' hash, text
    sha256, window, n_windows and the reference spec; with code_versions() its sha256
    names the file.
    """

    def canonical() -> dict[str, torch.Tensor]:
        # Store and return the same canonical form, so a hit and a miss look alike to the caller.
        logits, targets = compute()
        logits = logits.to(dtype=torch.float32)  # (N, V)
        targets = targets.to(dtype=torch.long)  # (N,)
        if logits.dim() != 2 or targets.shape != (logits.shape[0],):
            raise ValueError(f"compute() returned logits {tuple(logits.shape)} and targets "
                             f"{tuple(targets.shape)}; expected (N, V) and (N,)")
        return {"logits": logits, "targets": targets}

    tensors = cached_tensors(key_parts, canonical)
    return tensors["logits"], tensors["targets"]
