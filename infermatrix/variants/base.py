"""The variant registry: frozen-dataclass configs registered by name, composed one
per axis from a spec string such as ``kv_cache+int8_weight_only+sdpa``.

A variant's ``apply(model)`` returns the transformed model and must leave its input
usable as it was (the runner reuses the loaded base model across cases): a variant
that only swaps the attention seam returns a shallow copy; one that swaps modules
builds new ones.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import re
import typing
import warnings
from typing import ClassVar

import torch

from infermatrix.errors import UserError
from infermatrix.kernels import interpreting
from infermatrix.model import AttentionFn, Transformer

# Axes in the order variants are applied: the weights' layout first, then their
# precision, the graph last. A `peer` (a whole model users deploy, such as Hugging
# Face transformers) replaces the model alone.
AXES = ("fusion", "linear", "attention", "cache", "decoding", "graph", "peer")
ENTRY_POINT_GROUP = "infermatrix.variants"
# Variant.model_kinds of a variant that runs on decoders and encoders alike
ANY_MODEL = frozenset({"decoder", "encoder"})
# What running our Triton kernels needs: the package, and CUDA (or the CPU interpreter).
TRITON_KERNELS = frozenset({"triton", "triton_device"})


class Variant:
    """Base class. Subclasses are frozen dataclasses decorated with @register_variant."""

    name: ClassVar[str] = ""
    axis: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    def apply(self, model: Transformer) -> Transformer:
        raise NotImplementedError

    def requirements(self) -> frozenset[str]:
        """What this configuration needs: `requires`, unless a parameter (a backend) adds to it."""
        return self.requires

    def check_device(self, device: torch.device) -> None:
        """Refuse, with a ValueError naming the fix, settings that cannot run on `device`
        (called when a matrix is read, so a case fails then, not mid-run)."""

    # runs the model's GGUF file itself (a llama.cpp peer): skipped on other models
    needs_gguf: ClassVar[bool] = False

    def skip_reason(self, case) -> str | None:
        """Why this machine or this case's shape cannot run this variant, or None (the
        case is recorded as skipped with it); `case` is a bench Case."""
        return None

    def report_metrics(self, case) -> dict:
        """Metrics this variant adds to an op case's record for the reports (a sparse
        layout's density and picture); `case` is a bench Case."""
        return {}

    def check_shape(self, case) -> None:
        """Refuse, with a ValueError, a case whose shape this variant cannot run as its
        label says (`case` is a bench Case; called when a matrix is read, after its excludes)."""

    def check_case(self, workload: str, device: torch.device, spec: tuple["Variant", ...]) -> None:
        """Refuse, with a ValueError giving the reason, a case (`workload` on `device`,
        composed with `spec`) this variant cannot run as its label says (called when a
        matrix is read, after its excludes)."""

    # the model kinds (ModelConfig.kind, EncoderConfig.kind) this variant runs on as its
    # label says; a variant opts in to the encoder once it is tested there
    model_kinds: ClassVar[frozenset[str]] = frozenset({"decoder"})
    # why not, said when a matrix puts it on a kind it does not run on
    kind_refusal: ClassVar[str] = "it has not been made and tested to run on one"

    def check_model(self, config) -> None:
        """Refuse, with a ValueError giving the reason, a model this variant cannot run as
        it is: one of a kind it does not run on (config.kind "decoder" | "encoder"), or one
        whose own fields it would change (e.g. a sliding window). Called when a matrix is
        read (model workloads) and by apply_variants; overrides call super() first."""
        kind = config.kind
        if kind not in self.model_kinds:
            raise ValueError(f"{self.name} does not run on an {kind} model: {self.kind_refusal}"
                             if kind == "encoder" else f"{self.name} runs on encoder models only")

    def spec(self) -> str:
        """Canonical spec text: the name, plus the parameters that differ from their defaults."""
        params = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if getattr(self, f.name) != f.default
        ]
        return f"{self.name}({','.join(params)})" if params else self.name


# Which implementation each seam really ran in this process since the last
# `take_paths()`: {"attention": {"block_sparse_gather", ...}, "linear": {...}}. Variants
# whose label could hide another path (a dense fallback, a library's fp32 fallback)
# note it; the runner puts it in the case's record ("labels are promises").
_paths_taken: dict[str, set[str]] = {}


def note_path(seam: str, path: str) -> None:
    """Record that `seam` ran `path`. Skipped while torch.compile traces (a Python
    side effect there would break the graph): a compiled case records only the paths
    noted outside its graph, such as an int8 layer's when it is built."""
    if not torch.compiler.is_compiling():
        _paths_taken.setdefault(seam, set()).add(path)


def take_paths() -> dict[str, str]:
    """{"<seam>_path": "a+b"} of the paths noted since the last call, then forget them."""
    taken = {f"{seam}_path": "+".join(sorted(paths)) for seam, paths in sorted(_paths_taken.items())}
    _paths_taken.clear()
    return taken


def shared_copy(model: Transformer) -> Transformer:
    """A copy of `model` sharing its weights, for a variant that must leave the base
    model as it was. The top-level module, parameter and buffer tables are copied
    too, so a later variant that replaces a top-level module cannot reach the base."""
    copied = copy.copy(model)
    for table in ("_modules", "_parameters", "_buffers"):
        setattr(copied, table, dict(getattr(model, table)))
    return copied


def with_attention(model: Transformer, attention: AttentionFn) -> Transformer:
    """A copy of `model` sharing its weights, with the attention seam replaced by
    `attention` (its contract: infermatrix.model.AttentionFn)."""
    swapped = shared_copy(model)
    swapped.attention = attention
    return swapped


_REGISTRY: dict[str, type[Variant]] = {}
_entry_points_loaded = False


def register_variant(name: str):
    """Class decorator: register a frozen dataclass Variant under `name`."""

    def decorate(cls: type[Variant]) -> type[Variant]:
        if cls.axis not in AXES:
            raise ValueError(f"variant {name!r} has axis {cls.axis!r}; valid axes: {', '.join(AXES)}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"variant name {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, Variant)):
            raise ValueError(f"variant {name!r} must subclass infermatrix.variants.Variant")
        if not dataclasses.is_dataclass(cls):
            cls = dataclasses.dataclass(frozen=True)(cls)
        if not cls.__dataclass_params__.frozen:
            raise ValueError(f"variant {name!r} must be a frozen dataclass: @dataclass(frozen=True)")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def load_entry_points() -> None:
    """Import third-party variants from the `infermatrix.variants` entry-point group.

    An entry point may name a module (importing it registers its variants) or a
    Variant subclass (registered under the entry point's name). A broken plugin is
    reported as a warning and does not stop the run.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if isinstance(obj, type) and obj not in _REGISTRY.values():
                register_variant(ep.name)(obj)
        except Exception as exc:  # a third-party import can fail in any way
            warnings.warn(f"variant plugin {ep.name!r} ({ep.value}) failed to load: {exc}", stacklevel=2)


def registered_variants() -> dict[str, type[Variant]]:
    load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def variant_class(name: str) -> type[Variant]:
    variants = registered_variants()
    if name not in variants:
        raise UserError(f"unknown variant {name!r}; valid: {', '.join(variants)}")
    return variants[name]


_SPEC_PART = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(?:\((.*)\))?\s*$")


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _coerce(cls: type[Variant], field: str, raw: str):
    hint = typing.get_type_hints(cls).get(field, str)
    origin_args = typing.get_args(hint) or (hint,)
    if bool in origin_args:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    for kind in (int, float):
        if kind in origin_args:
            return kind(raw)
    return raw


def make_variant(part: str) -> Variant:
    """One spec part, `name` or `name(key=value,...)`, to a Variant instance."""
    match = _SPEC_PART.match(part)
    if not match:
        raise UserError(f"variant spec part {part!r} is malformed; write name or name(key=value,...)")
    name, arg_text = match.group(1), match.group(2)
    cls = variant_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for item in filter(str.strip, _split_top_level(arg_text or "", ",")):
        key, eq, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not eq or key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise UserError(f"variant {name!r} has no parameter {key!r}; its parameters: {valid}")
        try:
            kwargs[key] = _coerce(cls, key, raw)
        except ValueError as exc:
            raise UserError(f"variant {name!r} parameter {key}={raw!r} is invalid: {exc}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise UserError(f"variant {name!r}: {exc}") from None


def parse_spec(spec: str) -> tuple[Variant, ...]:
    """`a+b(k=v)+c` to variants ordered by axis; at most one per axis."""
    if not spec or not spec.strip():
        raise UserError("variant spec is empty; give at least one variant, e.g. 'reference'")
    by_axis: dict[str, Variant] = {}
    for part in _split_top_level(spec, "+"):
        variant = make_variant(part)
        if variant.axis in by_axis:
            raise UserError(
                f"variant spec {spec!r} puts {by_axis[variant.axis].name!r} and {variant.name!r} on the same "
                f"axis {variant.axis!r}; pick one per axis ({', '.join(AXES)})"
            )
        by_axis[variant.axis] = variant
    return tuple(by_axis[axis] for axis in AXES if axis in by_axis)


def canonical_spec(variants: tuple[Variant, ...]) -> str:
    return "+".join(v.spec() for v in variants)


def _cuda_missing(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"needs CUDA (device is {device.type})"
    if not torch.cuda.is_available():
        return "needs CUDA (no CUDA device on this machine)"
    return None


def _triton_device_missing(device: torch.device) -> str | None:
    """Triton kernels run on CUDA, or on the CPU through Triton's interpreter when
    TRITON_INTERPRET=1 asks for it (correctness only)."""
    if interpreting() and device.type == "cpu":
        return None
    return _cuda_missing(device)


def _package_missing(module: str, dist: str | None = None) -> typing.Callable[[torch.device], str | None]:
    """A check that `module` imports; its reason names the package to pip install."""
    return lambda device: None if importlib.util.find_spec(module) else f"needs the {dist or module} package"


# requirement name -> check on the case's device: None when met, else why not
_REQUIREMENTS: dict[str, typing.Callable[[torch.device], str | None]] = {
    "cuda": _cuda_missing,
    "triton": _package_missing("triton"),
    "bitsandbytes": _package_missing("bitsandbytes"),
    "torchao": _package_missing("torchao"),
    "transformers": _package_missing("transformers"),
    "llama_cpp": _package_missing("llama_cpp", "llama-cpp-python"),
    "triton_device": _triton_device_missing,
}


def missing_requirements(requires: typing.Iterable[str], device: str | torch.device) -> list[str]:
    """Why each of `requires` is unmet on `device` (empty when all are met)."""
    device = torch.device(device)
    reasons = []
    for req in sorted(requires):
        check = _REQUIREMENTS.get(req)
        reason = check(device) if check else f"needs {req}"
        if reason:
            reasons.append(reason)
    return reasons


def unmet_requirements(variants: tuple[Variant, ...], device: str | torch.device) -> str | None:
    """A human-readable skip reason for a case, or None when it can run on `device`."""
    device = torch.device(device)
    reasons = missing_requirements({"cuda"} if device.type == "cuda" else (), device)
    reasons += [f"{v.name} {r}" for v in variants for r in missing_requirements(v.requirements(), device)]
    return "; ".join(reasons) or None


def runs_in_triton_interpreter(variants: tuple[Variant, ...], paths: dict[str, str] | None = None) -> bool:
    """True when a case's Triton kernels run through the CPU interpreter, on any device:
    its numbers are right (fp32/fp16) but its timings mean nothing. A case uses Triton
    when a variant requires it or a noted path (`take_paths()`) is a Triton kernel."""
    uses = any("triton_device" in v.requirements() for v in variants) or any(
        "triton" in path for path in (paths or {}).values())
    return interpreting() and uses


def apply_variants(model: Transformer, variants: tuple[Variant, ...]) -> Transformer:
    config = getattr(model, "config", None)  # None: an op workload's bare attention or linear holder
    for variant in variants:  # the same refusals as a matrix's, before anything is built
        if config is not None:
            variant.check_model(config)
    for variant in variants:  # already in axis order
        model = variant.apply(model)
    return model
