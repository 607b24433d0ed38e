"""Greedy generation over the reference model or any variant of it: the loop the
decode, generate and drift workloads time, and the oracle the tests compare with.

The model is a seam user: it is called with tokens, their positions and, when a
cache variant set its cache seam, the KV cache `model.new_cache` builds; nothing here
knows which variant ran. A decoding variant's `model.speculation` builds its own
decoder (infermatrix.speculative), which emits one or more tokens per step.
"""

from __future__ import annotations

import torch

from infermatrix.model import Transformer


class GreedyDecoder:
    """Greedy decoding, one new token per `step()`; the first step processes the prompt.

    With a KV cache (`model.new_cache` builds one once a cache variant is applied) the prompt is
    written to the cache once and each later step feeds one token at its position;
    without one every step recomputes the whole prefix (the naive baseline).
    `pad` (B,) counts left padding per row and needs a cache, whose mask hides it.
    """

    def __init__(self, model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                 pad: torch.Tensor | None = None, cache=None):
        """`cache`: one to reuse (a static cache is valid for any generation of the same
        shape: prefill overwrites it and the mask hides stale slots); None builds one."""
        self.model, self.tokens = model, prompt  # (B, T)
        self.prompt_len = prompt.shape[1]
        if cache is None:  # None again when the model has no cache variant
            cache = model.new_cache(prompt.shape[0], self.prompt_len + max_new_tokens, pad)
        if cache is None and pad is not None:
            raise ValueError("left-padded prompts need a KV cache, whose mask hides the padding; apply kv_cache")
        self.cache = cache

    def step(self) -> torch.Tensor:
        """The next token of every row (B, 1), appended to self.tokens."""
        T = self.tokens.shape[1]
        if self.cache is None:
            logits = self.model(self.tokens)  # (B, T, vocab): the whole prefix again
        elif T == self.prompt_len:
            logits = self.model(self.tokens, torch.arange(T, device=self.tokens.device), self.cache)  # prefill
        else:  # one position: the token generated last (its own tensor: a view of the growing
            # self.tokens would change strides every step, and a compiled step would recompile)
            logits = self.model(self.last, torch.tensor([T - 1], device=self.tokens.device), self.cache)
        self.last = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        self.tokens = torch.cat([self.tokens, self.last], dim=1)  # (B, T+1)
        return self.last


def new_decoder(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                pad: torch.Tensor | None = None, cache=None):
    """The model's decoder: its decoding variant's (speculative: each step() returns 1 or
    more tokens (B, n)), else GreedyDecoder (one token per step)."""
    speculation = getattr(model, "speculation", None)  # a peer model has no such seam
    if speculation is not None:
        return speculation.decoder(model, prompt, max_new_tokens, pad, cache)
    return GreedyDecoder(model, prompt, max_new_tokens, pad, cache)


@torch.no_grad()
def generate_greedy(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                    pad: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy decoding (cached when the model has a KV cache). prompt (B, T) -> (B, N).
    A speculative decoder verifies one sequence at a time: its rows are decoded one by one.
    A paged cache serves the rows as one stream of requests (infermatrix.serving)."""
    if getattr(model, "paged_cache_factory", None) is not None:
        if pad is not None:
            raise ValueError("paged_kv_cache serves each prompt as its own request: pass them unpadded")
        from infermatrix.serving import serve_greedy  # a paged cache decodes through the stream scheduler

        return serve_greedy(model, prompt, max_new_tokens)
    if getattr(model, "speculation", None) is not None and prompt.shape[0] > 1 and pad is None:
        return torch.cat([generate_greedy(model, row[None], max_new_tokens) for row in prompt])  # (B, N)
    decoder = new_decoder(model, prompt, max_new_tokens, pad)
    while decoder.tokens.shape[1] < prompt.shape[1] + max_new_tokens:
        decoder.step()
    return decoder.tokens[:, prompt.shape[1]:]  # (B, N)
