"""Optimized variants, registered by name and composed one per axis.

Importing this package registers the built-in variants; third-party ones arrive
through the `infermatrix.variants` entry-point group.

`AttentionFn` is the contract of the attention seam that `with_attention` swaps in.
"""

# importing registers the built-ins
from infermatrix.variants import compiled, kv_cache, reference, sdpa, triton_attention  # noqa: F401
from infermatrix.variants import block_sparse, flex  # noqa: F401  (block-sparse attention)
from infermatrix.variants import int8  # noqa: F401  (int8 linear layers)
from infermatrix.variants import fused, packed, peers  # noqa: F401  (decode at the limit; peers as rows)
from infermatrix.variants import paged_kv_cache, speculative  # noqa: F401  (serving; the decoding axis)
from infermatrix.model import AttentionFn
from infermatrix.variants.base import (
    ANY_MODEL,
    AXES,
    ENTRY_POINT_GROUP,
    Variant,
    apply_variants,
    canonical_spec,
    missing_requirements,
    note_path,
    parse_spec,
    register_variant,
    registered_variants,
    runs_in_triton_interpreter,
    take_paths,
    unmet_requirements,
    variant_class,
    with_attention,
)

__all__ = [
    "ANY_MODEL", "AXES", "ENTRY_POINT_GROUP", "AttentionFn", "Variant", "apply_variants", "canonical_spec",
    "missing_requirements", "note_path", "parse_spec", "register_variant", "registered_variants",
    "runs_in_triton_interpreter", "take_paths", "unmet_requirements", "variant_class", "with_attention",
]
