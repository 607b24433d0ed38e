"""The reference encoder against what users run: Hugging Face's BertModel and
BertForMaskedLM (saved with save_pretrained, read back through our loader) and
torch.nn.TransformerEncoder (post- and pre-norm, relu and gelu), at fp32 on a batch
with right padding, comparing real (non-pad) positions only.

Tolerance: 1e-5 of the hidden-state (or logit) scale. Both sides run the same fp32
math in a different op order (fused SDPA or nested tensors on theirs); measured errors
are ~2e-7 of the scale, while a mis-mapped weight or a wrong norm order moves
outputs by O(1)."""

import json

import pytest
import torch
import torch.nn as nn

from infermatrix.encoder import ENCODER_PRESETS, Encoder, sinusoidal_positions
from infermatrix.encoder_weights import encoder_from_torch
from infermatrix.errors import UserError
from infermatrix.weights import load_model, model_config, model_fingerprint, preset_names

transformers = pytest.importorskip("transformers")

TOL = 1e-5
VOCAB, T = 99, 20


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, T), generator=gen)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[1, 12:] = False  # rows of 20, 12 and 5 real tokens
    mask[2, 5:] = False
    return tokens, mask


def _rel_err(ours, theirs, mask):
    return float((ours - theirs)[mask].abs().max() / theirs[mask].abs().max())


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Values far from any init (norms around 1, biases non-zero), so every tensor matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name.lower() else p.normal_(0.0, 0.1)


def _bert(cls, tmp_path, **config):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=72, max_position_embeddings=64, **config)
    hf = cls(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf, load_model(str(tmp_path)).model


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_bert_model_hidden_states_and_pooler_match_transformers(tmp_path, act):
    hf, ours = _bert(transformers.BertModel, tmp_path, hidden_act=act)
    assert isinstance(ours, Encoder) and ours.pooler is not None and ours.config.activation == act
    tokens, mask = _batch()
    types = torch.zeros_like(tokens)
    types[0, 10:] = 1  # a second segment in one row: token-type embeddings are read by position
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=mask.long(), token_type_ids=types)
        hidden = ours(tokens, mask, types)
        assert _rel_err(hidden, theirs.last_hidden_state, mask) < TOL
        assert float((ours.pooled(hidden) - theirs.pooler_output).abs().max()) < TOL


@pytest.mark.parametrize("tied", [True, False])
def test_bert_masked_lm_logits_match_transformers(tmp_path, tied):
    hf, ours = _bert(transformers.BertForMaskedLM, tmp_path, tie_word_embeddings=tied)
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied
    tokens, mask = _batch(1)
    with torch.no_grad():
        theirs = hf(input_ids=tokens, attention_mask=mask.long()).logits
        logits = ours.mlm_logits(ours(tokens, mask))
    assert _rel_err(logits, theirs, mask) < TOL
    assert model_config(str(tmp_path)).num_params() == sum(p.numel() for p in ours.parameters())
    assert model_fingerprint(str(tmp_path)).startswith("hf:")


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_transformer_encoder_instance_matches_torch(norm_first, act):
    layer = nn.TransformerEncoderLayer(48, 4, 80, dropout=0.0, activation=act, batch_first=True,
                                       norm_first=norm_first)
    torch_encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(48) if norm_first else None,
                                          enable_nested_tensor=False).eval()
    embedding = nn.Embedding(VOCAB, 48)
    _randomize(torch_encoder)
    ours = encoder_from_torch(torch_encoder, embedding, "sinusoidal")
    assert (ours.config.norm_first, ours.config.activation, ours.config.final_norm) == (norm_first, act, norm_first)
    tokens, mask = _batch()
    with torch.no_grad():
        x = embedding(tokens) + sinusoidal_positions(T, 48, "cpu")
        theirs = torch_encoder(x, src_key_padding_mask=~mask)  # True = padding, on their side
        assert _rel_err(ours(tokens, mask), theirs, mask) < TOL


def test_transformer_encoder_state_dict_with_learned_positions_and_scale():
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    torch_encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    _randomize(torch_encoder, 1)
    embedding, positions = torch.randn(VOCAB, 32), torch.randn(40, 32)
    with pytest.raises(UserError, match="n_heads, norm_first, activation"):
        encoder_from_torch(torch_encoder.state_dict(), embedding, positions)
    ours = encoder_from_torch(torch_encoder.state_dict(), embedding, positions, n_heads=2, norm_first=False,
                              activation="relu", embed_scale=True)
    assert ours.config.max_seq_len == 40 and ours.config.n_layers == 3
    tokens, mask = _batch(2)
    with torch.no_grad():
        theirs = torch_encoder(embedding[tokens] * 32 ** 0.5 + positions[:T], src_key_padding_mask=~mask)
        assert _rel_err(ours(tokens, mask), theirs, mask) < TOL


def test_transformer_encoder_without_biases_is_refused_naming_them():
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True, bias=False)
    torch_encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    with pytest.raises(UserError, match=r"lacks \d+ weights.*bias"):
        encoder_from_torch(torch_encoder, nn.Embedding(VOCAB, 32))
    mixed = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True), 1,
                                  norm=nn.LayerNorm(32, eps=1e-6), enable_nested_tensor=False)
    with pytest.raises(UserError, match="final norm has eps 1e-06, its layers 1e-05"):
        encoder_from_torch(mixed, nn.Embedding(VOCAB, 32))
    with pytest.raises(UserError, match="activation"):
        encoder_from_torch(nn.TransformerEncoder(nn.TransformerEncoderLayer(
            32, 2, 64, activation=nn.GELU(approximate="tanh")), 1, enable_nested_tensor=False), torch.randn(9, 32))


def test_unknown_architecture_is_refused_listing_decoders_and_encoders(tmp_path):
    _bert(transformers.BertModel, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["RobertaModel"]}))
    with pytest.raises(UserError, match="'RobertaModel' is not supported; valid: .*LlamaForCausalLM.*BertModel, "
                                        "BertForMaskedLM"):
        model_config.__wrapped__(str(tmp_path))


def test_extra_and_missing_tensors_are_refused_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    _bert(transformers.BertForMaskedLM, tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    save_file({**tensors, "cls.seq_relationship.weight": torch.zeros(2, 48)}, str(file))
    with pytest.raises(UserError, match="no place for, e.g. .*cls.seq_relationship.weight"):
        load_model(str(tmp_path))
    tensors.pop("bert.encoder.layer.1.output.dense.bias")
    save_file(tensors, str(file))
    with pytest.raises(UserError, match=r"lacks 1 weights, e.g. \['layers.1.feed_forward.w2.bias'\]"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", sorted(ENCODER_PRESETS))
def test_encoder_presets_have_exact_parameter_counts(name):
    cfg = model_config(name)
    assert cfg.kind == "encoder" and name in preset_names()
    with torch.device("meta"):
        model = Encoder(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())  # a tied table is listed once
    assert model_fingerprint(name, seed=3) == f"preset:{name}:seed3"


def test_tiny_encoder_preset_loads_seeded_and_runs_with_padding():
    first, again = (load_model("tiny-encoder", seed=1).model for _ in range(2))
    tokens, mask = _batch()
    with torch.no_grad():
        hidden = first(tokens, mask)
        assert torch.equal(hidden, again(tokens, mask))
        assert first.mlm_logits(hidden).shape == (3, T, 512)
        # a pad position never reaches a real one: changing pad tokens changes no real output
        changed = tokens.clone()
        changed[~mask] = 7
        assert torch.equal(first(changed, mask)[mask], hidden[mask])
    assert first.embed_norm.bias.abs().sum() == 0 and first.embed_norm.weight.eq(1).all()
