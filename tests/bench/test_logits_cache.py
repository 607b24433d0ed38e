from __future__ import annotations

from pathlib import Path

import pytest
import torch

from infermatrix.bench import logits_cache
from infermatrix.bench.logits_cache import cache_path, reference_logits

KEY = {"model": "abc123", "text_sha256": "def456", "window": 8, "n_windows": 2, "reference": "reference"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Counter:
    """A compute() that counts its calls and returns fixed (logits, targets)."""

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(16, 32, generator=gen, dtype=torch.float64)  # stored as float32
        self.targets = torch.randint(0, 32, (16,), generator=gen, dtype=torch.int32)  # stored as long
        self.calls = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.logits, self.targets


def test_cache_lives_under_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "x"))
    assert cache_path({"a": 1}).parent == tmp_path / "x" / "ref_logits"


def test_non_json_key_parts_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path))
    with pytest.raises(TypeError, match="plain JSON"):
        reference_logits({"dtype": torch.float32}, Counter())




def test_a_miss_computes_and_stores_a_hit_reads_back(cache):
    compute = Counter()
    logits, targets = reference_logits(KEY, compute)
    assert compute.calls == 1 and cache_path(KEY).is_file()
    assert logits.dtype == torch.float32 and targets.dtype == torch.long
    again = Counter(seed=99)  # would return other values if it were called
    hit_logits, hit_targets = reference_logits(dict(reversed(list(KEY.items()))), again)  # key order is irrelevant
    assert again.calls == 0
    assert torch.equal(hit_logits, logits) and torch.equal(hit_targets, targets)
    torch.testing.assert_close(hit_logits, compute.logits.float(), rtol=0, atol=0)


def test_a_different_key_recomputes(cache):
    reference_logits(KEY, Counter())
    other = Counter(seed=1)
    logits, _ = reference_logits({**KEY, "window": 16}, other)
    assert other.calls == 1 and torch.equal(logits, other.logits.float())


def test_a_failed_write_warns_leaves_no_temp_file_and_keeps_the_result(cache, monkeypatch):
    reference_logits(KEY, Counter())
    assert [p.name for p in (cache / "ref_logits").iterdir()] == [cache_path(KEY).name]

    def broken_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(logits_cache, "save_file", broken_save)
    compute = Counter(seed=3)
    with pytest.warns(UserWarning, match="disk full"):
        logits, _ = reference_logits({**KEY, "window": 4}, compute)
    assert torch.equal(logits, compute.logits.float())  # the measurement goes on
    assert [p.name for p in (cache / "ref_logits").iterdir()] == [cache_path(KEY).name]


def test_a_corrupt_file_is_recomputed(cache):
    reference_logits(KEY, Counter())
    cache_path(KEY).write_bytes(b"not safetensors")
    compute = Counter()
    with pytest.warns(UserWarning):
        logits, _ = reference_logits(KEY, compute)
    assert compute.calls == 1 and torch.equal(logits, compute.logits.float())
    assert torch.equal(reference_logits(KEY, Counter(seed=5))[0], logits)  # rewritten, readable again


def test_the_key_names_the_code_that_computed_the_reference(cache, monkeypatch):
    """A fix to model.py, to the GGUF conversion or a new torch must recompute the
    fp32 reference: each is part of the key; the same inputs keep the same file."""
    from infermatrix import weights

    same = cache_path(KEY)
    assert cache_path(dict(KEY)) == same
    changes = [
        (logits_cache, "model_code_sha256", lambda: "0" * 64),
        (weights, "CONVERSION_VERSION", weights.CONVERSION_VERSION + 1),
        (torch, "__version__", "9.9.9+cpu"),
    ]
    for owner, name, value in changes:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, value)
            assert cache_path(KEY) != same, name
    assert cache_path(KEY) == same


def test_the_model_code_hash_changes_when_a_source_it_covers_changes(tmp_path, monkeypatch):
    """Editing model.py, weights.py or drift.py must give another key: the hash is of
    those files' bytes (copies here, edited one at a time)."""
    from infermatrix import model, weights
    from infermatrix.bench import drift

    digest = logits_cache.model_code_sha256()
    assert len(digest) == 64 and digest == logits_cache.model_code_sha256()
    for module in (model, weights, drift):
        copy = tmp_path / Path(module.__file__).name
        copy.write_text(Path(module.__file__).read_text() + "\n# an edit\n")
        monkeypatch.setattr(module, "__file__", str(copy))
        logits_cache.model_code_sha256.cache_clear()
        assert logits_cache.model_code_sha256() != digest, module.__name__
        monkeypatch.undo()
        logits_cache.model_code_sha256.cache_clear()
    assert logits_cache.model_code_sha256() == digest
