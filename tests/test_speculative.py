"""Speculative decoding is exact: every drafter's greedy output equals plain cached
greedy decoding token for token at fp32, and every rejection pattern leaves the KV
cache as plain decoding leaves it."""

import dataclasses

import pytest
import torch

from infermatrix.generate import GreedyDecoder, generate_greedy, new_decoder
from infermatrix.model import SHAPE_PRESETS
from infermatrix.speculative import PromptLookupDrafter, Speculation, SpeculativeDecoder
from infermatrix.tolerances import FP32_REORDER
from infermatrix.variants import apply_variants, parse_spec
from infermatrix.weights import load_model, random_model

TINY = SHAPE_PRESETS["tiny"]
# random presets the verification must be exact on: grouped-query heads, and a sliding
# window shorter than a generation (the cache's mask cuts it in every verify forward)
PRESETS = {"tiny": TINY, "tiny-window": dataclasses.replace(TINY, n_kv_heads=1, sliding_window=24)}


def repetitive_prompt(vocab: int, length: int = 40, period: int = 7, seed: int = 1) -> torch.Tensor:
    """(1, length): a random period repeated, so prompt lookup finds n-grams to draft from."""
    pattern = torch.randint(0, vocab, (period,), generator=torch.Generator().manual_seed(seed))
    return pattern.repeat(length // period + 1)[:length][None]


def decode(model, prompt: torch.Tensor, new_tokens: int):
    decoder = new_decoder(model, prompt, new_tokens)
    while decoder.tokens.shape[1] < prompt.shape[1] + new_tokens:
        decoder.step()
    return decoder


def with_draft(spec: str, base, draft):
    model = apply_variants(base, parse_spec(spec))
    model.speculation = model.speculation.with_draft(apply_variants(draft, parse_spec("kv_cache+sdpa")))
    return model


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("cache", ["kv_cache", "kv_cache(prefix=true)"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_every_drafter_decodes_exactly_what_plain_greedy_decoding_does(preset, cache, k):
    base = random_model(PRESETS[preset], torch.float32, "cpu", seed=0)
    other = random_model(PRESETS[preset], torch.float32, "cpu", seed=7)  # a draft that disagrees often
    prompt = repetitive_prompt(TINY.vocab_size)
    plain = generate_greedy(apply_variants(base, parse_spec(f"{cache}+sdpa")), prompt, 48)
    models = {
        "prompt_lookup": apply_variants(base, parse_spec(f"prompt_lookup(k={k})+{cache}+sdpa")),
        "early_exit": apply_variants(base, parse_spec(f"early_exit(layer=1,k={k})+{cache}+sdpa")),
        "draft (itself)": with_draft(f"draft(model=tiny,k={k})+{cache}+sdpa", base, base),
        "draft (other weights)": with_draft(f"draft(model=tiny,k={k})+{cache}+sdpa", base, other),
    }
    for name, model in models.items():
        decoder = decode(model, prompt, 48)
        assert torch.equal(decoder.tokens[:, prompt.shape[1]:], plain), name
        stats = decoder.stats
        assert stats.emitted == 47 and stats.emitted == stats.accepted + stats.forwards, name
        assert stats.drafted <= k * stats.forwards, name
    assert decode(models["draft (itself)"], prompt, 48).stats.acceptance_rate == 1.0
    # the drafters that guess wrong do get rejected: the equality above covered rollbacks
    assert decode(models["draft (other weights)"], prompt, 48).stats.acceptance_rate < 1.0
    lookup = decode(models["prompt_lookup"], prompt, 48).stats
    assert lookup.accepted > 0 and lookup.drafted > 0


def test_a_draft_model_proposes_its_own_greedy_continuation_after_every_rollback():
    """The draft's cache keeps the positions whose tokens it saw right (`fed`): after a
    rejection, its next proposal is still what the draft decodes from the whole context
    with no cache at all."""
    base = random_model(TINY, torch.float32, "cpu", seed=0)
    other = random_model(TINY, torch.float32, "cpu", seed=0)  # the same, one layer perturbed: agrees half the time
    w2 = other.layers[1].feed_forward.w2.weight
    with torch.no_grad():
        w2.add_(0.05 * torch.randn(w2.shape, generator=torch.Generator().manual_seed(1)))
    prompt = repetitive_prompt(TINY.vocab_size)
    decoder = new_decoder(with_draft("draft(model=tiny,k=3)+kv_cache+sdpa", base, other), prompt, 40)
    cached, checked = decoder.drafter.propose, []

    def propose(tokens, k):
        drafts = cached(tokens, k)
        assert torch.equal(drafts, generate_greedy(other, tokens, k)[0]), len(checked)  # recomputed, no cache
        checked.append(k)
        return drafts

    decoder.drafter.propose = propose
    while decoder.tokens.shape[1] < prompt.shape[1] + 40:
        decoder.step()
    assert len(checked) > 3 and 0 < decoder.stats.accepted < decoder.stats.drafted  # rollbacks happened


class ScriptedDrafter:
    """Proposes the true greedy continuation, with the draft at index `wrong` of each
    proposal replaced by another token (None: all correct), so each step's rejection
    pattern is known."""

    def __init__(self, truth: torch.Tensor, prompt_len: int, vocab: int, wrong):
        self.truth, self.prompt_len, self.vocab, self.wrong = truth, prompt_len, vocab, wrong

    def start(self, prompt):
        pass

    def propose(self, tokens, k):
        done = tokens.shape[1] - self.prompt_len
        drafts = self.truth[done:done + k].clone()
        if self.wrong is not None and len(drafts):
            index = self.wrong % len(drafts)  # -1: the last
            drafts[index] = (drafts[index] + 1) % self.vocab
        return drafts

    def verified(self, context_len, accepted):
        pass


@pytest.mark.parametrize("pattern, wrong", [("all accepted", None), ("none accepted", 0),
                                            ("rejected at the last draft", -1)])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_every_rejection_pattern_rolls_the_cache_back(pattern, wrong, k):
    base = apply_variants(random_model(TINY, torch.float32, "cpu", seed=0), parse_spec("kv_cache+sdpa"))
    prompt = repetitive_prompt(TINY.vocab_size, seed=3)
    plain = GreedyDecoder(base, prompt, 30)
    for _ in range(30):
        plain.step()
    truth = plain.tokens[0, prompt.shape[1]:]
    scripted = ScriptedDrafter(truth, prompt.shape[1], TINY.vocab_size, wrong)
    speculation = Speculation(k, lambda model, cache, max_len: scripted)
    decoder = SpeculativeDecoder(base, prompt, 30, speculation)
    per_step = []
    while decoder.tokens.shape[1] < prompt.shape[1] + 30:
        before = (decoder.stats.drafted, decoder.stats.accepted)
        decoder.step()
        per_step.append((decoder.stats.drafted - before[0], decoder.stats.accepted - before[1]))
    assert torch.equal(decoder.tokens, plain.tokens), pattern
    decode_steps = [(n, a) for n, a in per_step[1:] if n]  # the prefill step drafts nothing
    expected = {"all accepted": lambda n: n, "none accepted": lambda n: 0,
                "rejected at the last draft": lambda n: n - 1}[pattern]
    assert decode_steps and all(a == expected(n) for n, a in decode_steps), per_step
    # the cache holds what plain decoding wrote at every position fed so far (the last
    # emitted token is never fed): rejected drafts' slots were rewritten
    filled = decoder.tokens.shape[1] - 1
    for layer in range(TINY.n_layers):
        for ours, theirs in ((decoder.cache.k[layer], plain.cache.k[layer]),
                             (decoder.cache.v[layer], plain.cache.v[layer])):
            torch.testing.assert_close(ours[:, :, :filled], theirs[:, :, :filled], atol=FP32_REORDER, rtol=FP32_REORDER)


def test_prompt_lookup_proposes_what_followed_the_latest_earlier_match():
    drafter = PromptLookupDrafter(ngram=3)
    context = torch.tensor([[5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 6, 7]])  # ends in "6 7": seen twice before
    assert drafter.propose(context, 2).tolist() == [2, 3]  # the latest match's continuation
    assert drafter.propose(torch.tensor([[1, 2, 3, 4]]), 3).tolist() == []  # nothing repeats
    longest = torch.tensor([[1, 2, 3, 9, 2, 3, 8, 1, 2, 3]])  # "1 2 3" beats the later "2 3"
    assert drafter.propose(longest, 1).tolist() == [9]
    assert PromptLookupDrafter(ngram=3, min_ngram=3).propose(torch.tensor([[4, 5, 1, 5]]), 2).tolist() == []


def test_a_speculative_decoder_refuses_a_batch_and_a_model_without_a_cache():
    base = random_model(TINY, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="one sequence at a time"):
        new_decoder(apply_variants(base, parse_spec("prompt_lookup+kv_cache")), torch.zeros(2, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="apply kv_cache"):
        new_decoder(apply_variants(base, parse_spec("prompt_lookup")), torch.zeros(1, 4, dtype=torch.long), 3)
    unbound = apply_variants(base, parse_spec("draft(model=tiny)+kv_cache"))
    with pytest.raises(ValueError, match="not loaded"):
        new_decoder(unbound, torch.zeros(1, 4, dtype=torch.long), 3)


def test_generate_greedy_decodes_a_batch_row_by_row_through_a_speculative_decoder():
    base = random_model(TINY, torch.float32, "cpu", seed=0)
    prompts = torch.cat([repetitive_prompt(TINY.vocab_size, seed=s) for s in (1, 2, 3)])  # (3, 40)
    plain = generate_greedy(apply_variants(base, parse_spec("kv_cache")), prompts, 20)
    assert torch.equal(generate_greedy(apply_variants(base, parse_spec("prompt_lookup+kv_cache")), prompts, 20),
                       plain)


@pytest.mark.slow
def test_smollm2_speculative_decoding_is_exact_for_64_tokens(smollm2):
    """Real weights, a real prompt that copies its text (the edit task), 64 tokens."""
    from infermatrix.bench.workloads import edit_prompts

    prompt = edit_prompts(smollm2, 1, 256, None)  # (1, 256)
    plain = generate_greedy(apply_variants(smollm2.model, parse_spec("kv_cache+sdpa")), prompt, 64)
    bf16 = load_model("smollm2-135m", torch.bfloat16).model
    models = {
        "prompt_lookup": apply_variants(smollm2.model, parse_spec("prompt_lookup+kv_cache+sdpa")),
        "early_exit": apply_variants(smollm2.model, parse_spec("early_exit(layer=20,k=2)+kv_cache+sdpa")),
        "draft (bf16 itself)": with_draft("draft(model=smollm2-135m,dtype=bfloat16)+kv_cache+sdpa",
                                          smollm2.model, bf16),
    }
    for name, model in models.items():
        decoder = decode(model, prompt, 64)
        assert torch.equal(decoder.tokens[:, prompt.shape[1]:], plain), name
        assert decoder.stats.accepted > 0, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: speculative decoding on a GPU")
@pytest.mark.parametrize("spec", ["prompt_lookup(k=5)", "early_exit(layer=1,k=2)"])
def test_on_cuda_speculative_decoding_is_exact(spec):
    base = random_model(TINY, torch.float32, "cuda", seed=0)
    prompt = repetitive_prompt(TINY.vocab_size).cuda()
    plain = generate_greedy(apply_variants(base, parse_spec("kv_cache+sdpa")), prompt, 48)
    decoder = decode(apply_variants(base, parse_spec(f"{spec}+kv_cache+sdpa")), prompt, 48)
    assert torch.equal(decoder.tokens[:, prompt.shape[1]:], plain) and decoder.stats.forwards < 47
