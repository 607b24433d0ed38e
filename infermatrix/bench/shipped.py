"""The matrix files shipped in the package. Torch-free, so the CLI can list them in
its help without paying for torch's import."""

from __future__ import annotations

from importlib import resources


def builtin_matrices() -> dict[str, object]:
    """The matrix files shipped in the package, by name without `.toml`."""
    folder = resources.files("infermatrix") / "benchmarks"
    return {f.name.removesuffix(".toml"): f for f in folder.iterdir() if f.name.endswith(".toml")}
