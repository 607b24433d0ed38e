"""The `decoding` axis: speculative decoding, exact under greedy verification
(infermatrix.speculative). Each variant sets the model's `speculation` seam; the
generation workloads, and drift's greedy agreement, decode through it.

* prompt_lookup(ngram=3, k=5): drafts the tokens that followed the context's last
  n-gram where it occurred before (copy-heavy output: edits, summaries, code).
* draft(model=PRESET_OR_PATH, k=4, dtype=): a smaller model of the same vocabulary
  drafts with its own KV cache (kv_cache+sdpa), in `dtype` (default: the case's).
* early_exit(layer=L, k=4): the model's first L blocks, then its final norm and head,
  draft over its own cache (self-speculation).

One sequence at a time (batch 1): batched verification is refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from infermatrix.model import Transformer
from infermatrix.speculative import EarlyExitDrafter, PromptLookupDrafter, Speculation
from infermatrix.variants.base import Variant, register_variant, shared_copy

GENERATING_WORKLOADS = ("decode", "generate", "drift")


class SpeculativeVariant(Variant):
    axis: ClassVar[str] = "decoding"
    kind_refusal: ClassVar[str] = "an encoder reads its whole input in one pass; it generates no tokens to draft"
    k: int = 4

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k}: the drafts per step must be at least 1")

    def speculation(self) -> Speculation:
        raise NotImplementedError

    def apply(self, model: Transformer) -> Transformer:
        speculating = shared_copy(model)  # the base model keeps decoding one token per forward
        speculating.speculation = self.speculation()
        return speculating

    def check_case(self, workload: str, device: torch.device, spec: tuple) -> None:
        if workload not in GENERATING_WORKLOADS:
            raise ValueError(f"{self.name} changes how tokens are generated, and the {workload} workload "
                             f"generates none; use it on {', '.join(GENERATING_WORKLOADS)}")
        axes = {v.axis: v.name for v in spec}
        if "cache" not in axes:
            raise ValueError(f"{self.name} verifies drafts over a KV cache and rolls it back; add kv_cache "
                             f"(e.g. {self.name}+kv_cache+sdpa)")
        if "graph" in axes:
            raise ValueError(f"{self.name} with {axes['graph']}: each verification feeds a different number of "
                             "tokens, which a static-shape graph would recompile for; drop the graph variant")
        if "peer" in axes:
            raise ValueError(f"{self.name} with {axes['peer']}: a peer runs its own generation loop; compare it "
                             "as its own row")

    def check_shape(self, case) -> None:
        if case.workload in ("decode", "generate") and case.batch != 1:
            raise ValueError(f"{self.name} verifies one sequence at a time: batched verification is not "
                             "supported (rows accept different numbers of drafts and would need per-row cache "
                             "positions); use batch = 1")


@register_variant("prompt_lookup")
@dataclass(frozen=True)
class PromptLookup(SpeculativeVariant):
    description = "speculative decoding drafting from the context's earlier n-grams (prompt lookup), exact"
    ngram: int = 3  # the longest n-gram matched; shorter ones down to min_ngram when it has no match
    k: int = 5
    min_ngram: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.min_ngram <= self.ngram:
            raise ValueError(f"ngram={self.ngram}, min_ngram={self.min_ngram}: need 1 <= min_ngram <= ngram")

    def speculation(self) -> Speculation:
        drafter = PromptLookupDrafter(self.ngram, self.min_ngram)
        return Speculation(self.k, lambda model, cache, max_len: drafter)


@register_variant("draft")
@dataclass(frozen=True)
class DraftModelVariant(SpeculativeVariant):
    description = "speculative decoding with a smaller draft model of the same vocabulary, exact"
    model: str = ""  # a preset, .gguf file or checkpoint folder
    k: int = 4
    dtype: str = ""  # the draft's dtype; "": the case's

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("name the draft model: draft(model=PRESET_OR_PATH)")

    def speculation(self) -> Speculation:
        return Speculation(self.k, draft_model=self.model, draft_dtype=self.dtype)

    def check_draft(self, target, draft, same_tokenizer: bool | None, positions: int) -> None:
        """Refuse a draft whose token ids mean other tokens than the target's: `target`,
        `draft` are model configs, same_tokenizer whether their vocabularies are equal
        (None: neither has a tokenizer); `positions` the case's prompt + new tokens."""
        if draft.kind != "decoder":
            raise ValueError(f"the draft model {self.model!r} is an {draft.kind}; it cannot generate tokens")
        if draft.vocab_size != target.vocab_size or same_tokenizer is False:
            why = (f"{draft.vocab_size} against {target.vocab_size} ids" if draft.vocab_size != target.vocab_size
                   else "their tokenizers map ids to different tokens")
            raise ValueError(f"the draft model {self.model!r} has another vocabulary than the target ({why}); "
                             "use a draft trained with the target's tokenizer")
        if positions > draft.max_seq_len:
            raise ValueError(f"the draft model {self.model!r} holds {draft.max_seq_len} positions, fewer than the "
                             f"case's {positions}; lower prompt_len or new_tokens")


@register_variant("early_exit")
@dataclass(frozen=True)
class EarlyExit(SpeculativeVariant):
    description = "self-speculation: the first `layer` blocks plus the final norm and head draft, exact"
    layer: int = 0  # blocks the draft runs
    k: int = 4

    def check_model(self, config) -> None:
        super().check_model(config)
        if not 1 <= self.layer < config.n_layers:
            raise ValueError(f"early_exit(layer={self.layer}) is outside the model: its draft runs the first "
                             f"`layer` of {config.n_layers} blocks; give 1 <= layer < {config.n_layers}")

    def speculation(self) -> Speculation:
        layer = self.layer
        return Speculation(self.k, lambda model, cache, max_len: EarlyExitDrafter(model, cache, layer))
