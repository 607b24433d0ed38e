"""Load weights into the reference encoder (infermatrix.encoder): Hugging Face
`BertModel` / `BertForMaskedLM` safetensors folders, and `torch.nn.TransformerEncoder`
instances or state dicts with their embedding and positions.

Every path gives each parameter of the encoder exactly one tensor; a tensor the
encoder has no place for, or a parameter no tensor fills, is refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from infermatrix.encoder import ACTIVATIONS, Encoder, EncoderConfig
from infermatrix.errors import UserError
from infermatrix.weights import (BERT_ARCHITECTURES, LoadedModel, _assign, _empty_model, folder_model, hf_architecture,
                                 read_folder_tensors)

# ---------------------------------------------------------------- BERT (Hugging Face)

# A BERT block's tensors under Hugging Face's names -> ours (weight and bias each)
_BERT_BLOCK_NAMES = {
    "attention.self.query": "attention.wq", "attention.self.key": "attention.wk",
    "attention.self.value": "attention.wv", "attention.output.dense": "attention.wo",
    "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "feed_forward.w1",
    "output.dense": "feed_forward.w2", "output.LayerNorm": "ffn_norm",
}
_BERT_NAMES = {
    "embeddings.word_embeddings": "tok_embeddings", "embeddings.position_embeddings": "pos_embeddings",
    "embeddings.token_type_embeddings": "type_embeddings", "embeddings.LayerNorm": "embed_norm",
    "pooler.dense": "pooler", "cls.predictions.transform.dense": "mlm_dense",
    "cls.predictions.transform.LayerNorm": "mlm_norm", "cls.predictions.decoder": "output",
}
# buffers some exports keep: not weights
_BERT_BUFFERS = ("embeddings.position_ids",)


def _bert_keys(folder: Path) -> list[str]:
    """The tensor names of a folder's safetensors shards (headers only, no data read)."""
    from safetensors import safe_open

    keys = []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            keys += list(f.keys())
    return keys


def bert_config(raw: dict, folder: Path) -> EncoderConfig:
    """config.json of a BertModel / BertForMaskedLM folder -> EncoderConfig. Whether a
    BertModel has its pooler is not in its config: the checkpoint's tensor names say."""
    source = str(folder)
    arch = hf_architecture(raw)
    if arch not in BERT_ARCHITECTURES:
        raise UserError(f"{source}: architecture {arch!r} is not an encoder we load; valid: "
                        f"{', '.join(BERT_ARCHITECTURES)}")
    act = raw.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:  # HF's names are ours (gelu: exact, erf)
        raise UserError(f"{source}: hidden_act {act!r} is not supported; valid: {', '.join(ACTIVATIONS)}")
    position_type = raw.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UserError(f"{source}: position_embedding_type {position_type!r} is not supported; valid: 'absolute'")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise UserError(f"{source}: config sets is_decoder or add_cross_attention; the encoder loads "
                        "bidirectional BERT only")
    pooler = arch == "BertModel" and any(_strip_prefix(k).startswith("pooler.") for k in _bert_keys(folder))
    try:
        return EncoderConfig(
            vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
            n_heads=raw["num_attention_heads"], hidden_dim=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", 512), norm_eps=raw.get("layer_norm_eps", 1e-12),
            norm_first=False, positions="learned", activation=act,
            type_vocab_size=raw.get("type_vocab_size", 2), embed_norm=True, final_norm=False,
            mlm_head=arch == "BertForMaskedLM", tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
            pooler=pooler,
        )
    except KeyError as exc:
        raise UserError(f"{source}: config.json lacks {exc.args[0]!r}") from None
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None


def _strip_prefix(key: str) -> str:
    return key.removeprefix("bert.")  # BertForMaskedLM keeps the encoder under `bert.`


def bert_name(key: str) -> str | None:
    """A BERT checkpoint's tensor name -> ours, or None for one we have no place for."""
    key = _strip_prefix(key)
    if key == "cls.predictions.bias":  # the vocab projection's bias (decoder.bias is the same tensor)
        return "output.bias"
    # original Google exports name LayerNorm's weight and bias gamma and beta
    module, _, kind = key.rpartition(".")
    kind = {"gamma": "weight", "beta": "bias"}.get(kind, kind)
    if kind not in ("weight", "bias"):
        return None
    if module.startswith("encoder.layer."):
        _, _, layer, part = module.split(".", 3)
        return f"layers.{layer}.{_BERT_BLOCK_NAMES[part]}.{kind}" if part in _BERT_BLOCK_NAMES else None
    return f"{_BERT_NAMES[module]}.{kind}" if module in _BERT_NAMES else None


def load_bert_checkpoint(folder: Path, cfg: EncoderConfig, dtype: torch.dtype, device) -> LoadedModel:
    tensors, unknown = read_folder_tensors(folder, bert_name, lambda key: _strip_prefix(key) in _BERT_BUFFERS,
                                           dtype, device)
    if cfg.mlm_head and cfg.tie_embeddings:
        tensors.pop("output.weight", None)  # a copy of the embedding table some exports keep
    return folder_model(folder, _empty_model(cfg), tensors, unknown, dtype, device)


# ---------------------------------------------------------------- torch.nn.TransformerEncoder

_TORCH_BLOCK_NAMES = {  # nn.TransformerEncoderLayer -> ours (in_proj is split in three)
    "self_attn.out_proj": "attention.wo", "linear1": "feed_forward.w1", "linear2": "feed_forward.w2",
    "norm1": "attention_norm", "norm2": "ffn_norm",
}


def _activation_name(activation) -> str:
    """nn.TransformerEncoderLayer's activation (a function or a module) -> ours."""
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu or (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return "gelu"
    raise UserError(f"nn.TransformerEncoderLayer activation {activation!r} is not supported; valid: relu, gelu "
                    "(exact)")


def _table(source, name: str) -> torch.Tensor:
    """An nn.Embedding or a (rows, dim) tensor -> the table tensor."""
    table = source.weight if isinstance(source, nn.Embedding) else source
    if not isinstance(table, torch.Tensor) or table.dim() != 2:
        raise UserError(f"{name} must be an nn.Embedding or a 2-D (rows, dim) tensor, got {type(source).__name__}")
    return table.detach()


def encoder_from_torch(encoder: nn.TransformerEncoder | Mapping[str, torch.Tensor],
                       embedding: nn.Embedding | torch.Tensor,
                       positions: str | nn.Embedding | torch.Tensor = "sinusoidal", *,
                       n_heads: int | None = None, norm_first: bool | None = None, activation: str | None = None,
                       norm_eps: float | None = None, max_seq_len: int = 512, embed_scale: bool = False,
                       dtype: torch.dtype = torch.float32, device="cpu") -> Encoder:
    """The reference encoder computing what `embedding` + `positions` + `encoder` compute.

    `encoder`: an nn.TransformerEncoder (its layers say heads, norm_first, activation and
    eps), or its state_dict, for which n_heads, norm_first and activation must be given.
    `positions`: "sinusoidal" (sin/cos interleaved, max_seq_len rows), or a learned table
    (an nn.Embedding or a (max_len, dim) tensor), added to the token embeddings, which
    are first multiplied by sqrt(dim) when `embed_scale` (PyTorch's tutorial does).
    A final LayerNorm (`encoder.norm`) is kept when present.
    """
    if isinstance(encoder, nn.TransformerEncoder):
        first = encoder.layers[0]
        n_heads = first.self_attn.num_heads if n_heads is None else n_heads
        norm_first = first.norm_first if norm_first is None else norm_first
        activation = _activation_name(first.activation) if activation is None else activation
        norm_eps = first.norm1.eps if norm_eps is None else norm_eps
        if encoder.norm is not None and encoder.norm.eps != norm_eps:  # one eps field for every LayerNorm
            raise UserError(f"the TransformerEncoder's final norm has eps {encoder.norm.eps}, its layers "
                            f"{norm_eps}; the reference encoder takes one norm_eps for all of them")
        state = encoder.state_dict()
    elif isinstance(encoder, Mapping):
        missing = [name for name, value in (("n_heads", n_heads), ("norm_first", norm_first),
                                            ("activation", activation)) if value is None]
        if missing:
            raise UserError(f"a TransformerEncoder state_dict does not say {', '.join(missing)}; pass "
                            f"{', '.join(f'{m}=...' for m in missing)}")
        state = dict(encoder)
    else:
        raise UserError(f"encoder must be an nn.TransformerEncoder or its state_dict, got {type(encoder).__name__}")
    tokens = _table(embedding, "embedding")
    learned = None if isinstance(positions, str) else _table(positions, "positions")
    if isinstance(positions, str) and positions != "sinusoidal":
        raise UserError(f"positions {positions!r} is not supported; valid: 'sinusoidal', an nn.Embedding or a "
                        "(max_len, dim) tensor of learned positions")
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    if "layers.0.self_attn.in_proj_weight" not in state:
        raise UserError("the TransformerEncoder state has no layers.0.self_attn.in_proj_weight; it needs packed "
                        "q/k/v projections (kdim = vdim = d_model) and at least one layer")
    dim = state["layers.0.self_attn.in_proj_weight"].shape[1]
    try:
        cfg = EncoderConfig(
            vocab_size=tokens.shape[0], dim=dim, n_layers=len(layers), n_heads=n_heads,
            hidden_dim=state["layers.0.linear1.weight"].shape[0],
            max_seq_len=learned.shape[0] if learned is not None else max_seq_len,
            norm_eps=1e-5 if norm_eps is None else norm_eps, norm_first=norm_first,
            positions="learned" if learned is not None else "sinusoidal", activation=activation,
            type_vocab_size=0, embed_norm=False, final_norm="norm.weight" in state, embed_scale=embed_scale,
        )
    except (KeyError, ValueError) as exc:
        raise UserError(f"nn.TransformerEncoder: {exc}") from None
    tensors = {"tok_embeddings.weight": tokens}
    if learned is not None:
        tensors["pos_embeddings.weight"] = learned
    unknown = []
    for key, tensor in state.items():
        tensor = tensor.detach()
        if key.startswith("norm."):
            tensors[f"final_norm.{key.split('.', 1)[1]}"] = tensor
            continue
        if not key.startswith("layers."):
            unknown.append(key)
            continue
        _, layer, rest = key.split(".", 2)
        part, _, kind = rest.rpartition(".")
        if rest in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, block in zip(("wq", "wk", "wv"), tensor.chunk(3, dim=0)):  # rows q, k, v
                tensors[f"layers.{layer}.attention.{name}.{kind}"] = block
        elif part in _TORCH_BLOCK_NAMES and kind in ("weight", "bias"):
            tensors[f"layers.{layer}.{_TORCH_BLOCK_NAMES[part]}.{kind}"] = tensor
        else:
            unknown.append(key)
    model = _empty_model(cfg)
    unknown += sorted(tensors.keys() - {name for name, _ in model.named_parameters()})
    if unknown:
        raise UserError(f"nn.TransformerEncoder: {len(unknown)} tensors the encoder has no place for: "
                        f"{', '.join(unknown[:8])}")
    return _assign(model, tensors, dtype, device, "nn.TransformerEncoder", copy=True)
