"""GGUF files of each decoder family (llama, qwen2, qwen3, gemma, phi3), written from
a random-weight Hugging Face twin the way llama.cpp's convert_hf_to_gguf.py writes
them, load into the same model as the safetensors twin: equal configs and fp32 logits.
llama.cpp itself, where installed, reads the same files as the twin (so the writer
here converts as llama.cpp expects). Bad files are refused in one line."""

import dataclasses
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support: pip install gguf")

from hf_twins import hf_twin  # noqa: E402  (skips without transformers)
from infermatrix.errors import UserError  # noqa: E402
from infermatrix.weights import load_model, model_config  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "gemma", "phi3")  # each the twin family of the same name
# Gemma's converter writes no rope.freq_base (llama.cpp then takes 10000, Gemma's own
# value), so a twin with another theta could not survive conversion: its twin keeps 10000.
OVERRIDES = {"gemma": dict(rope_theta=10000.0)}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Converted GGUFs go to this test's own cache, never the user's (nor a stale one)."""
    monkeypatch.setenv("INFERMATRIX_CACHE", str(tmp_path / "cache"))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's LlamaModel.permute: each head's rows to adjacent RoPE pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_vocab(writer, pre: str) -> None:
    """A 256-token byte-level BPE vocabulary (one merge): llama.cpp loads no file without one."""
    from tokenizers import pre_tokenizers

    tokens = sorted(pre_tokenizers.ByteLevel.alphabet())[:255] + ["ĠĠ"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges(["Ġ Ġ"])


def write_gguf(folder, path, arch: str, drop: tuple[str, ...] = (), vocab: bool = True, extra=None,
               label: str | None = None) -> None:
    """Convert the HF checkpoint in `folder` as convert_hf_to_gguf.py does for `arch`
    (its metadata keys, tensor names, Q/K permutation and norm offset), tensors in f32.
    `drop`: metadata keys left out; `extra(writer)`: more keys or tensors; `label`: the
    architecture the file claims (and prefixes its keys with), if not `arch`."""
    from safetensors.torch import load_file

    hp = json.loads((folder / "config.json").read_text())
    rope = hp.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hp.get("rope_theta"))
    n_head, n_embd = hp["num_attention_heads"], hp["hidden_size"]
    n_kv = hp.get("num_key_value_heads") or n_head
    K = gguf.Keys
    keys = [  # (key, type, value) of each converter's set_gguf_parameters
        (K.LLM.BLOCK_COUNT, "uint32", hp["num_hidden_layers"]),
        (K.LLM.CONTEXT_LENGTH, "uint32", hp["max_position_embeddings"]),
        (K.LLM.EMBEDDING_LENGTH, "uint32", n_embd),
        (K.LLM.FEED_FORWARD_LENGTH, "uint32", hp["intermediate_size"]),
        (K.Attention.HEAD_COUNT, "uint32", n_head),
        (K.Attention.HEAD_COUNT_KV, "uint32", n_kv),
        (K.Attention.LAYERNORM_RMS_EPS, "float32", hp["rms_norm_eps"]),
    ]
    if arch != "gemma":  # Gemma's converter writes no rope theta
        keys.append((K.Rope.FREQ_BASE, "float32", theta))
    if hp.get("head_dim") is not None:  # the base converter writes it when config.json has it; Gemma's always
        keys += [(K.Attention.KEY_LENGTH, "uint32", hp["head_dim"]),
                 (K.Attention.VALUE_LENGTH, "uint32", hp["head_dim"])]
    if arch == "llama":
        keys += [(K.LLM.VOCAB_SIZE, "uint32", hp["vocab_size"]),
                 (K.Rope.DIMENSION_COUNT, "uint32", hp.get("head_dim") or n_embd // n_head)]
    if arch == "phi3":
        keys += [(K.Rope.SCALING_ORIG_CTX_LEN, "uint32", hp.get("original_max_position_embeddings", 4096)),
                 (K.Rope.DIMENSION_COUNT, "uint32", n_embd // n_head),
                 (K.Attention.SLIDING_WINDOW, "uint32", hp.get("sliding_window") or 0)]
    label = label or arch
    writer = gguf.GGUFWriter(str(path), label)
    for key, kind, value in keys:
        key = key.format(arch=label)
        if key not in drop:
            getattr(writer, f"add_{kind}")(key, value)
    if vocab:
        _byte_vocab(writer, "qwen2" if arch.startswith("qwen") else "default")
    if extra:
        extra(writer)
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, hp["num_hidden_layers"])
    for name, tensor in load_file(str(folder / "model.safetensors")).items():
        if arch == "gemma" and name == "lm_head.weight":
            continue  # Gemma's converter skips it: the head is the embedding table
        data = tensor.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if arch == "gemma" and name.endswith("norm.weight"):
            data = data + 1  # the converter stores Gemma's (1 + w) scale
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, name
        writer.add_tensor(new_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def twin_and_gguf(arch: str, tmp_path, **kwargs):
    hf = hf_twin(arch, tmp_path / "hf", **OVERRIDES.get(arch, {}))
    path = tmp_path / f"{arch}.gguf"
    write_gguf(tmp_path / "hf", path, arch, **kwargs)
    return hf, path


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_loads_as_the_safetensors_twin(arch, tmp_path):
    """fp32: the same weights in the same model, so the logits agree to rounding (the
    stored 1 + w of Gemma's norms, an f32 epsilon); any mapping mistake moves them O(1)."""
    hf, path = twin_and_gguf(arch, tmp_path)
    ours, twin = load_model(str(path)), load_model(str(tmp_path / "hf"))
    got, want = ours.model.config, twin.model.config
    assert got.norm_eps == pytest.approx(want.norm_eps, rel=1e-6)  # stored as float32
    assert dataclasses.replace(got, norm_eps=want.norm_eps) == want
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        a, b = ours.model(tokens), twin.model(tokens)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_reads_the_written_gguf_as_the_twin(arch, tmp_path):
    """The writer above converts as llama.cpp expects: llama.cpp's own logits on the
    file match transformers' on the twin. Its KV cache is f16, hence 5e-3 of the logit
    scale; a missing Q/K permutation or Gemma norm offset is off by ~0.8 of it."""
    pytest.importorskip("llama_cpp", reason="llama.cpp peer: pip install llama-cpp-python")
    from infermatrix.variants import apply_variants, parse_spec

    hf, path = twin_and_gguf(arch, tmp_path)
    peer = apply_variants(load_model(str(path)).model, parse_spec("llama_cpp"))
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        got, want = peer(tokens), hf(tokens).logits
    assert (got - want).abs().max() <= 5e-3 * want.abs().max()


# ------------------------------------------------------------------ tokenizer


def test_qwen2_byte_level_tokenizer_is_rebuilt(tmp_path):
    """A BPE vocabulary with Qwen2's pre-tokenizer (its tokenizer.json regex: digits one
    by one), a CONTROL and a USER_DEFINED token, written as the converter writes it:
    the tokenizer rebuilt from the GGUF encodes text as the original does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    original = Tokenizer(models.BPE())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                                   r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    original.decoder = decoders.ByteLevel()
    corpus = ["The year 2024 wasn't 1999; they'll say it's 12345 again.\n\n  Indented   text!"] * 20
    original.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    original.add_special_tokens([AddedToken("<|im_end|>", special=True, normalized=False)])
    original.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    vocab = original.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(original.to_str())["model"]["merges"]
    kinds = {"<|im_end|>": gguf.TokenType.CONTROL, "<tool_call>": gguf.TokenType.USER_DEFINED}

    def vocab_keys(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([kinds.get(t, gguf.TokenType.NORMAL) for t in tokens])
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])

    # the model's vocabulary must be the tokenizer's: a twin of that size
    hf_twin("qwen2", tmp_path / "hf", vocab_size=len(tokens))
    write_gguf(tmp_path / "hf", tmp_path / "q.gguf", "qwen2", vocab=False, extra=vocab_keys)
    rebuilt = load_model(str(tmp_path / "q.gguf")).tokenizer
    text = "In 2024 they'll say it's 12345 again.\n\n  Indented<tool_call>x<|im_end|>  text!"
    want = original.encode(text)
    assert rebuilt.encode(text).ids == want.ids
    assert "<tool_call>" in want.tokens and "<|im_end|>" in want.tokens and "2" in want.tokens
    assert rebuilt.decode(want.ids, skip_special_tokens=False) == text


# ------------------------------------------------------------------ bad input


def test_an_unknown_architecture_is_refused_in_one_line(tmp_path):
    _, path = twin_and_gguf("llama", tmp_path, label="mamba")
    with pytest.raises(UserError) as err:
        load_model(str(path))
    valid = "valid: 'llama', 'qwen2', 'qwen3', 'gemma', 'phi3'"
    assert f"GGUF architecture 'mamba' is not supported; {valid}" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch, key", [("qwen3", "qwen3.attention.layer_norm_rms_epsilon"),
                                       ("phi3", "phi3.embedding_length")])
def test_a_missing_metadata_key_is_named(arch, key, tmp_path):
    _, path = twin_and_gguf(arch, tmp_path, drop=(key,))
    with pytest.raises(UserError, match=f"GGUF metadata lacks '{key}'"):
        load_model(str(path))


def test_tensors_the_architecture_has_no_place_for_are_refused(tmp_path):
    """Qwen2's q/k/v biases in a file labelled llama would be dropped silently."""
    _, path = twin_and_gguf("qwen2", tmp_path, label="llama")
    with pytest.raises(UserError, match=r"6 tensors a plain 'llama' model has no place for, "
                                        r"e.g. \['blk.0.attn_k.bias'"):
        load_model(str(path))


def test_phi3_longrope_factors_are_refused(tmp_path):
    factors = np.ones(8, dtype=np.float32)
    _, path = twin_and_gguf("phi3", tmp_path, extra=lambda w: w.add_tensor("rope_factors_long.weight", factors))
    with pytest.raises(UserError, match=r"scaled RoPE \(rope_factors_long \(Phi-3 longrope\)\) is not supported"):
        model_config(str(path))


def test_vocab_size_falls_back_to_the_embedding_table(tmp_path):
    """Only llama's converter writes vocab_size; without a token list either, the
    embedding table's rows are the vocabulary."""
    _, path = twin_and_gguf("qwen2", tmp_path, vocab=False)
    assert model_config(str(path)).vocab_size == 256
    assert load_model(str(path)).tokenizer is None


def test_a_malformed_block_tensor_name_is_refused_by_name(tmp_path):
    """`blk.` names that do not split into layer, kind and weight|bias are refused
    with the others a model has no place for, not an unpacking crash."""
    one = np.ones(4, dtype=np.float32)
    _, path = twin_and_gguf("llama", tmp_path, extra=lambda w: w.add_tensor("blk.norm", one))
    with pytest.raises(UserError, match=r"no place for, e.g. \['blk.norm'\]"):
        load_model(str(path))
