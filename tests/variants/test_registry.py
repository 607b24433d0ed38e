import dataclasses
import textwrap
import warnings
from dataclasses import dataclass

import pytest
import torch

from infermatrix.errors import UserError
from infermatrix.variants import base
from infermatrix.variants import (
    Variant, apply_variants, canonical_spec, parse_spec, register_variant, registered_variants,
    unmet_requirements,
)
from infermatrix.weights import load_model


@pytest.fixture
def scratch_registry():
    """Variants registered by a test are removed afterwards."""
    saved = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


@pytest.fixture
def toy_variants(scratch_registry):
    @register_variant("toy_linear")
    @dataclass(frozen=True)
    class ToyLinear(Variant):
        axis = "linear"
        bits: int = 8
        scale: float = 1.0
        fused: bool = False

        def apply(self, model):
            return model

    @register_variant("toy_graph")
    @dataclass(frozen=True)
    class ToyGraph(Variant):
        axis = "graph"
        requires = frozenset({"cuda"})

        def apply(self, model):
            return model

    return ToyLinear, ToyGraph


def test_builtins_are_registered_on_the_attention_axis():
    variants = registered_variants()
    assert variants["reference"].axis == "attention"
    assert variants["sdpa"].axis == "attention"


def test_spec_is_ordered_by_axis_and_canonical(toy_variants):
    variants = parse_spec("toy_graph + sdpa + toy_linear(bits=4, fused=true)")
    assert [v.axis for v in variants] == ["linear", "attention", "graph"]
    assert variants[0].bits == 4 and variants[0].fused is True and variants[0].scale == 1.0
    assert canonical_spec(variants) == "toy_linear(bits=4,fused=True)+sdpa+toy_graph"
    assert parse_spec(canonical_spec(variants)) == variants


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sdpa+reference", "puts 'sdpa' and 'reference' on the same axis 'attention'"),
        ("flashy", "unknown variant 'flashy'; valid: .*reference, sdpa"),
        ("toy_linear(bitz=4)", "no parameter 'bitz'; its parameters: bits, fused, scale"),
        ("toy_linear(bits=four)", "parameter bits='four' is invalid"),
        ("toy_linear(fused=maybe)", "expected true or false"),
        ("", "variant spec is empty"),
        ("sdpa(", "malformed"),
    ],
)
def test_bad_specs_name_the_problem(toy_variants, spec, message):
    with pytest.raises(UserError, match=message):
        parse_spec(spec)


def test_registering_on_an_unknown_axis_fails(scratch_registry):
    with pytest.raises(ValueError, match="axis 'sideways'; valid axes: fusion, linear, attention, cache, decoding, graph, peer"):
        @register_variant("bad")
        @dataclass(frozen=True)
        class Bad(Variant):
            axis = "sideways"


def test_requirements_give_readable_skip_reasons(toy_variants):
    variants = parse_spec("sdpa+toy_graph")
    assert unmet_requirements(variants, "cpu") == "toy_graph needs CUDA (device is cpu)"
    assert unmet_requirements(parse_spec("sdpa"), "cpu") is None


def test_attention_variants_do_not_mutate_the_base_model():
    base_model = load_model("tiny").model
    swapped = apply_variants(base_model, parse_spec("sdpa"))
    assert swapped.attention is not base_model.attention
    assert base_model.attention.__name__ == "math_attention"
    assert swapped.tok_embeddings.weight is base_model.tok_embeddings.weight  # weights shared, not copied
    swapped.output = torch.nn.Linear(4, 4)  # a later variant swapping a top-level module
    assert base_model.output.weight.shape == (base_model.config.vocab_size, base_model.config.dim)


def test_an_attention_written_to_the_seam_contract_runs_the_model_cached_and_not():
    """The README's plugin attention, `(q, k, v, *, causal, mask=None)`: the decoder
    passes mask= on every call (None without a cache, the cache's mask with one), and
    an AttentionFn that hands its arguments to the reference gives the same logits."""
    from infermatrix.generate import GreedyDecoder
    from infermatrix.model import math_attention
    from infermatrix.variants import AttentionFn, with_attention

    masks = []

    def mine(q, k, v, *, causal, mask=None):
        masks.append(mask is not None)
        return math_attention(q, k, v, causal=causal, mask=mask)

    attention: AttentionFn = mine
    model = load_model("tiny").model
    tokens = torch.randint(0, model.config.vocab_size, (1, 8))
    torch.testing.assert_close(with_attention(model, attention)(tokens), model(tokens), rtol=0, atol=0)
    assert masks and not any(masks)
    cached = with_attention(apply_variants(model, parse_spec("kv_cache")), attention)
    want = GreedyDecoder(apply_variants(model, parse_spec("kv_cache")), tokens, 4)
    got = GreedyDecoder(cached, tokens, 4)
    assert [got.step().tolist() for _ in range(4)] == [want.step().tolist() for _ in range(4)]
    assert any(masks)


def test_variants_must_be_frozen_dataclass_subclasses(scratch_registry):
    with pytest.raises(ValueError, match="must be a frozen dataclass"):
        @register_variant("mutable")
        @dataclass
        class Mutable(Variant):
            axis = "graph"

    with pytest.raises(ValueError, match="must subclass infermatrix.variants.Variant"):
        register_variant("stranger")(type("Stranger", (), {"axis": "graph"}))


def test_third_party_variant_arrives_through_entry_points(tmp_path, monkeypatch, scratch_registry):
    (tmp_path / "toy_plugin.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from infermatrix.variants import Variant

        @dataclass(frozen=True)
        class Plugged(Variant):
            axis = "cache"
            def apply(self, model):
                return model
    '''))
    dist = tmp_path / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[infermatrix.variants]\nplugged = toy_plugin:Plugged\nbroken = toy_plugin:Missing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variants = registered_variants()
    assert variants["plugged"].axis == "cache"
    assert parse_spec("plugged+sdpa")[1].name == "plugged"
    assert any("'broken'" in str(w.message) for w in caught)  # a broken plugin warns, the rest load


def test_variant_configs_are_frozen(toy_variants):
    toy = parse_spec("toy_linear")[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        toy.bits = 2
    assert hash(toy) == hash(parse_spec("toy_linear")[0])
