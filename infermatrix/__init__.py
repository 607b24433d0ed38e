"""infermatrix: a benchmark suite for Transformer inference optimizations."""

__version__ = "0.1.0"
