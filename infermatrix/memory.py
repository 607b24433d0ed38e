"""How many bytes a module's tensors occupy: the weight_bytes every model reports
(decoder, encoder, peers) and the op workloads' weight figures."""

from __future__ import annotations

import torch
import torch.nn as nn


def storage_bytes(module: nn.Module) -> int:
    """Bytes of a module's distinct parameter and buffer storage (shared tensors once)."""
    seen, total = set(), 0
    pending = list(module.parameters()) + list(module.buffers())
    while pending:
        t = pending.pop()
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            pending += [getattr(t, name) for name in t.__tensor_flatten__()[0]]  # a wrapper (e.g. torchao's
            continue  # int8 weight) has no storage of its own: count the tensors inside it
        if t.is_mkldnn:  # oneDNN's packed layout has no storage pointer; never shared
            total += t.numel() * t.element_size()
            continue
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
