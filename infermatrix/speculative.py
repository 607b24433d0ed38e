"""Speculative decoding: a cheap drafter proposes up to k next tokens, one forward of
the model verifies all of them, and the longest prefix the model agrees with is kept,
plus the model's own next token after it. Verification is greedy, so the output equals
plain greedy decoding token for token; only the number of forwards changes.

A step feeds [last token, d1 .. dn] at positions [T-1, T+n-1] over the KV cache. When
d1 .. da agree with the model's argmax, the step emits d1 .. da and the model's token
after them, and the cache is valid for positions [0, T+a): a static cache's mask hides
every slot past the query's position, so rolling back rejected drafts is only a position
reset (the next step overwrites those slots).

Drafters (`Drafter`): prompt lookup (an n-gram of the context seen earlier in it), a
smaller draft model with its own cache, and the model's own first layers (early exit,
sharing the model's cache: those layers' keys and values at accepted positions are the
ones the full model writes).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import torch

from infermatrix.model import Transformer


class Drafter(Protocol):
    def start(self, prompt: torch.Tensor) -> None:
        """Called with the prompt (1, T) in the prefill step (a draft model prefills here)."""

    def propose(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """Up to k guesses (n,) for the tokens after `tokens` (1, L), the whole context."""

    def verified(self, context_len: int, accepted: int) -> None:
        """The last proposal, made at context length context_len, kept its first `accepted`."""


# (model, its KV cache, the cache's max_len) -> a Drafter for one generation
DrafterFactory = Callable[[Transformer, object, int], Drafter]


@dataclass(frozen=True)
class Speculation:
    """A decoding variant's setting, kept on the model (`Transformer.speculation`):
    k drafts per step from `drafter`. A draft-model variant leaves `drafter` None and
    names its model (`draft_model`, `draft_dtype`): whoever loads models binds it
    (`with_draft`), since variants do not load weights."""

    k: int
    drafter: DrafterFactory | None = None
    draft_model: str = ""
    draft_dtype: str = ""  # "": the target's

    def with_draft(self, draft: Transformer) -> "Speculation":
        """This setting drafting with `draft`, a model with a cache variant applied."""
        return replace(self, drafter=DraftModel(draft).drafter)

    def decoder(self, model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                pad: torch.Tensor | None = None, cache=None) -> "SpeculativeDecoder":
        if self.drafter is None:
            raise ValueError(f"the draft model {self.draft_model!r} is not loaded; bind it with "
                             "Speculation.with_draft before decoding")
        return SpeculativeDecoder(model, prompt, max_new_tokens, self, pad, cache)


@dataclass
class SpeculationStats:
    """Counts over the decode steps of a generation (the prefill step is not one)."""

    forwards: int = 0  # verifying forwards of the model, one per decode step
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # proposed tokens the model agreed with
    emitted: int = 0  # tokens the decode steps produced: accepted, plus one per step
    draft_s: float = 0.0  # wall time spent drafting in the decode steps
    start_s: float = 0.0  # ... and in the prefill step (a draft model's own prefill)

    def __add__(self, other: "SpeculationStats") -> "SpeculationStats":
        """The counts of two generations together."""
        return SpeculationStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.emitted / self.forwards if self.forwards else 0.0


class SpeculativeDecoder:
    """Greedy decoding that emits 1 .. k+1 tokens per `step()`; the first step is the
    prefill. One sequence (batch 1): rows of a batch would accept different numbers of
    drafts and need per-row cache positions. Drafts are capped so a generation ends at
    exactly max_new_tokens."""

    def __init__(self, model: Transformer, prompt: torch.Tensor, max_new_tokens: int, speculation: Speculation,
                 pad: torch.Tensor | None = None, cache=None):
        if prompt.shape[0] != 1 or pad is not None:
            raise ValueError(f"speculative decoding verifies one sequence at a time; got a batch of "
                             f"{prompt.shape[0]}{' with padding' if pad is not None else ''}: decode rows one by one")
        self.model, self.tokens, self.k = model, prompt, speculation.k  # (1, T)
        self.prompt_len = prompt.shape[1]
        max_len = self.prompt_len + max_new_tokens
        self.cache = model.new_cache(1, max_len) if cache is None else cache
        if self.cache is None:
            raise ValueError("speculative decoding verifies drafts against a KV cache and rolls it back; "
                             "apply kv_cache")
        self.drafter = speculation.drafter(model, self.cache, max_len)
        self.remaining = max_new_tokens
        self.stats = SpeculationStats()
        device = prompt.device
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def step(self) -> torch.Tensor:
        """The tokens this step produced (1, n), appended to self.tokens."""
        if self.remaining < 1:
            raise ValueError("this generation already produced all its max_new_tokens")
        T, device = self.tokens.shape[1], self.tokens.device
        if T == self.prompt_len:  # prefill, and the drafter's own
            logits = self.model(self.tokens, torch.arange(T, device=device), self.cache)  # (1, T, vocab)
            started = time.perf_counter()
            self.drafter.start(self.tokens)  # a draft model's own prefill: drafting time too
            self._sync()
            self.stats.start_s = time.perf_counter() - started
            new = logits[0, -1:].argmax(dim=-1)  # (1,)
        else:
            new = self._verify(T, device)
        self.tokens = torch.cat([self.tokens, new[None]], dim=1)  # (1, T + n)
        self.last = new[-1:][None]  # (1, 1)
        self.remaining -= len(new)
        return new[None]

    def _verify(self, T: int, device) -> torch.Tensor:
        started = time.perf_counter()
        k = min(self.k, self.remaining - 1)  # the step also emits the model's own token
        drafts = self.drafter.propose(self.tokens, k)[:k] if k else self.tokens.new_empty(0)  # (n,)
        self._sync()
        self.stats.draft_s += time.perf_counter() - started
        n = len(drafts)
        fed = torch.cat([self.last[0], drafts])[None]  # (1, 1 + n): the last token, then the drafts
        logits = self.model(fed, torch.arange(T - 1, T + n, device=device), self.cache)  # (1, 1 + n, vocab)
        predicted = logits[0].argmax(dim=-1)  # (1 + n,): the model's token after each fed one
        accepted = int((predicted[:n] == drafts).cumprod(0).sum())  # one host read per step
        self.drafter.verified(T, accepted)
        self.stats.forwards += 1
        self.stats.drafted += n
        self.stats.accepted += accepted
        self.stats.emitted += accepted + 1
        return torch.cat([drafts[:accepted], predicted[accepted:accepted + 1]])  # (accepted + 1,)


class PromptLookupDrafter:
    """Prompt lookup: find the context's last n-gram earlier in the context (the most
    recent occurrence; longest n-gram first, from `ngram` down to `min_ngram`) and
    propose the tokens that followed it. No model, no state."""

    def __init__(self, ngram: int, min_ngram: int = 1):
        self.ngram, self.min_ngram = ngram, min_ngram

    def start(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        context = tokens[0]  # (L,)
        L = len(context)
        for n in range(min(self.ngram, L - 1), self.min_ngram - 1, -1):
            windows = context[:L - 1].unfold(0, n, 1)  # (L - n, n): each followed by at least one token
            hits = (windows == context[L - n:]).all(dim=1).nonzero()  # (H, 1)
            if len(hits):
                start = int(hits[-1]) + n
                return context[start:start + k]
        return context.new_empty(0)

    def verified(self, context_len: int, accepted: int) -> None:
        pass


class DraftModel:
    """A draft model and one cache reused by every generation of the same length (a
    static cache is valid for any: the prefill overwrites it, the mask hides the rest)."""

    def __init__(self, draft: Transformer):
        self.model, self._cache, self._max_len = draft, None, 0

    def drafter(self, target: Transformer, cache, max_len: int) -> "ModelDrafter":
        if self._max_len != max_len:
            self._cache, self._max_len = self.model.new_cache(1, max_len), max_len
        return ModelDrafter(self.model, self._cache)


class ModelDrafter:
    """A draft model proposes k tokens greedily, one forward each, over its own cache.
    `fed` counts the leading context positions its cache holds the right tokens for."""

    def __init__(self, draft: Transformer, cache):
        if cache is None:
            raise ValueError("the draft model has no KV cache; apply kv_cache to it")
        self.model, self.cache, self.fed = draft, cache, 0

    def start(self, prompt: torch.Tensor) -> None:
        self.model(prompt, torch.arange(prompt.shape[1], device=prompt.device), self.cache)
        self.fed = prompt.shape[1]

    def propose(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        L, device = tokens.shape[1], tokens.device
        fresh = tokens[:, self.fed:]  # (1, L - fed): the context the draft has not seen
        pos = torch.arange(self.fed, L, device=device)
        drafts = []
        for i in range(k):
            logits = self.model(fresh, pos, self.cache)  # (1, t, vocab)
            fresh = logits[:, -1:].argmax(dim=-1)  # (1, 1)
            drafts.append(fresh[0])
            pos = pos[-1:] + 1
        self.fed = L + k - 1  # the last draft was never fed
        return torch.cat(drafts)  # (k,)

    def verified(self, context_len: int, accepted: int) -> None:
        self.fed = min(self.fed, context_len + accepted)


class EarlyExitDrafter:
    """Self-speculation: the model's first `layer` blocks, then its final norm and head,
    draft over the model's own cache. Their keys and values at accepted positions are
    what the full model writes there, and verification rewrites every drafted slot."""

    def __init__(self, model: Transformer, cache, layer: int):
        self.model, self.cache, self.layer = model, cache, layer

    def start(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, tokens: torch.Tensor, k: int) -> torch.Tensor:
        L, device = tokens.shape[1], tokens.device
        token, pos = tokens[:, L - 1:], torch.tensor([L - 1], device=device)  # (1, 1): the unverified last
        drafts = []
        for _ in range(k):
            logits = self.model(token, pos, self.cache, exit_layer=self.layer)  # (1, 1, vocab)
            token = logits[:, -1:].argmax(dim=-1)  # (1, 1)
            drafts.append(token[0])
            pos = pos + 1
        return torch.cat(drafts)  # (k,)

    def verified(self, context_len: int, accepted: int) -> None:
        pass
