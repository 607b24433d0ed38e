"""int8 quantization of the linear layers (axis `linear`), as module swaps the model
file knows nothing of:

* `int8_weight_only`: symmetric per-output-channel int8 weights, one fp32 scale per
  row; activations stay in the model's dtype and the dequantization is fused into the
  matmul (Triton kernel on CUDA, `aten._weight_int8pack_mm` on the CPU for bf16/fp16).
* `int8_dynamic`: W8A8. Per-token activation scales computed at run time, int8 x int8
  -> int32 through `torch._int_mm`, both scales applied to the int32 result; optional
  SmoothQuant migration (`alpha`) of activation outliers into the weights.
* `int8_llm`: bitsandbytes' LLM.int8 (`Linear8bitLt`): int8 vector-wise matmul plus
  the input columns with an outlier above `threshold` kept in fp16.
* `torchao_int8_weight_only`: torchao's own int8 weight-only config, when installed.

Every variant builds new modules on a shallow copy of the module tree (`swap_linears`),
so the runner's cached dense model is left as it was. All nn.Linear layers are
quantized, the LM head too (gpt-fast does the same; `int8_weight_only(head=false)`
keeps it dense); with tied embeddings the embedding table stays dense beside the
head's int8 copy, and `weight_bytes` counts both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from infermatrix.errors import UserError
from infermatrix.kernels import interpreting
from infermatrix.variants.base import ANY_MODEL, TRITON_KERNELS, Variant, note_path, register_variant, shared_copy

QMAX = 127  # symmetric: [-127, 127], so -x quantizes to -q and 0 is exact
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CALIBRATION_TOKENS = 64  # SmoothQuant statistics: one sequence of this many tokens


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8, scale (N,) fp32 with w ≈ q * scale[:, None].
    scale = max|w_n| / 127, so |w / scale| <= 127 and rounding is the only error:
    |w - q * scale| <= scale / 2 element-wise."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / QMAX  # (N,); an all-zero row keeps a finite scale
    q = torch.round(w32 / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)  # (N, K)
    return q, scale


def dequantize_per_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]  # (N, K) fp32


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> xq (M, K) int8, scale (M, 1) fp32: one dynamic scale per row (token)."""
    x32 = x.float()
    scale = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / QMAX  # (M, 1)
    return torch.round(x32 / scale).clamp(-QMAX, QMAX).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """Marker base of our quantized layers: a model holding one is already quantized."""

    variant: str = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias  # shared with the dense layer: bias stays in float, untouched
        self.train(False)  # bitsandbytes picks its inference path from `training`

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _refuse_quantized(model: nn.Module, variant: str) -> None:
    for name, module in model.named_modules():
        done = isinstance(module, QuantizedLinear) or (
            isinstance(module, nn.Linear) and (type(module) is not nn.Linear or type(module.weight) not in
                                               (torch.Tensor, nn.Parameter)))
        if done:
            by = getattr(module, "variant", "") or f"{type(module).__name__} with {type(module.weight).__name__} weights"
            raise UserError(f"{variant}: layer {name!r} is already quantized (by {by}); quantize the dense model "
                            "once, with one variant on the linear axis")


def swap_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module], variant: str) -> nn.Module:
    """A copy of `model` whose nn.Linear layers are replaced by make(name, layer).
    Modules on the path to a swapped layer are shallow copies; everything else, and
    the input model itself, is shared and left as it was."""
    _refuse_quantized(model, variant)

    def visit(module: nn.Module, prefix: str) -> nn.Module:
        changed = {}
        for name, child in module._modules.items():
            if child is None:
                continue
            if type(child) is nn.Linear:
                changed[name] = make(prefix + name, child)
            else:
                new = visit(child, f"{prefix}{name}.")
                if new is not child:
                    changed[name] = new
        if not changed:
            return module
        copied = shared_copy(module)  # own _modules table: the base keeps its layers
        copied._modules.update(changed)
        return copied

    swapped = visit(model, "")
    if swapped is model:
        raise UserError(f"{variant}: the model has no nn.Linear layer to quantize")
    return swapped


def _check_float(linear: nn.Linear, name: str, variant: str) -> None:
    if linear.weight.dtype not in FLOAT_DTYPES:
        raise UserError(f"{variant}: layer {name!r} has {linear.weight.dtype} weights; int8 variants take float32, "
                        "bfloat16 or float16 models: set dtype to one of them")


# ---------------------------------------------------------------------------- weight-only

WEIGHT_ONLY_BACKENDS = ("auto", "triton", "int8pack", "dequant")
DEQUANT_CHUNK_BYTES = 1 << 20  # fp32 rows dequantized per step of the `dequant` path: stays in L2


def weight_only_backend(requested: str, device: torch.device, dtype: torch.dtype, in_features: int) -> str:
    """The path one layer takes, or a UserError naming the field and the fix.

    auto: CUDA -> the Triton kernel. CPU bf16/fp16 -> `_weight_int8pack_mm` (measured
    fastest: the linear rows of `infermatrix run int8`) when in_features is a multiple of 8,
    else `dequant`. CPU fp32 -> `dequant` (int8pack's fp32 path measured ~8x slower).
    """
    if requested == "auto":
        if device.type == "cuda":
            return "triton"
        return "int8pack" if dtype != torch.float32 and in_features % 8 == 0 else "dequant"
    if requested == "triton":
        if importlib.util.find_spec("triton") is None:
            raise UserError("int8_weight_only(backend=triton) needs the triton package; pip install triton")
        if device.type != "cuda" and not interpreting():
            raise UserError("int8_weight_only(backend=triton) runs on CUDA (or on the CPU with TRITON_INTERPRET=1, "
                            "for correctness only); use backend=auto on the CPU")
    if requested == "int8pack":
        if device.type != "cpu":
            raise UserError(f"int8_weight_only(backend=int8pack) is a CPU kernel, the device is {device.type}; "
                            "use backend=auto")
        # aten._weight_int8pack_mm on the CPU returns wrong values or crashes for more than one
        # row when K % 8 != 0 (measured with torch 2.13: K = 100, 172); refuse rather than risk it.
        if in_features % 8:
            raise UserError(f"int8_weight_only(backend=int8pack) needs in_features divisible by 8, a layer has "
                            f"{in_features}; use backend=auto, which takes the dequant path for such layers")
    return requested


class Int8WeightOnlyLinear(QuantizedLinear):
    variant = "int8_weight_only"

    def __init__(self, linear: nn.Linear, backend: str):
        super().__init__(linear)
        weight = linear.weight
        q, scale = quantize_per_channel(weight)
        self.backend, self.dtype = backend, weight.dtype
        note_path("linear", backend)  # triton | int8pack | dequant (auto may mix the last two)
        self.register_buffer("weight_int8", q.to(weight.device))  # (N, K)
        self.register_buffer("scale", scale.to(weight.device))  # (N,) fp32
        if backend == "int8pack":  # the kernel takes its scales in the activation dtype
            self.register_buffer("scale_act", scale.to(weight.device, weight.dtype))
        rows = max(1, DEQUANT_CHUNK_BYTES // (4 * self.in_features))
        self.chunks = [(n, min(n + rows, self.out_features)) for n in range(0, self.out_features, rows)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton":
            from infermatrix.kernels.int8_matmul_triton import int8_weight_only_matmul  # triton: imported on use

            return int8_weight_only_matmul(x, self.weight_int8, self.scale, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.backend == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale_act)  # (M, N)
        else:  # dequantize a slice of rows at a time (cache-sized), then a dense matmul
            y = torch.cat([F.linear(x2, self.weight_int8[a:b].to(x.dtype) * self.scale[a:b, None].to(x.dtype))
                           for a, b in self.chunks], dim=-1)  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)


@register_variant("int8_weight_only")
@dataclass(frozen=True)
class Int8WeightOnly(Variant):
    model_kinds = ANY_MODEL
    axis = "linear"
    description = "int8 weights, per-channel scales, dequant fused in the matmul (Triton on CUDA, int8pack on CPU)"
    backend: str = "auto"
    head: bool = True  # quantize the LM head too; false keeps it dense, so a table shows what it buys and costs

    def __post_init__(self) -> None:
        if self.backend not in WEIGHT_ONLY_BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not valid; valid: {', '.join(WEIGHT_ONLY_BACKENDS)}")

    def requirements(self) -> frozenset[str]:
        return self.requires | (TRITON_KERNELS if self.backend == "triton" else frozenset())

    def apply(self, model: nn.Module) -> nn.Module:
        def make(name: str, linear: nn.Linear) -> nn.Module:
            if name == "output" and not self.head:
                return linear
            _check_float(linear, name, self.name)
            w = linear.weight
            return Int8WeightOnlyLinear(linear, weight_only_backend(self.backend, w.device, w.dtype,
                                                                    linear.in_features))

        return swap_linears(model, make, self.name)


# ---------------------------------------------------------------------------- W8A8 dynamic

INT_MM_MIN_ROWS_CUDA = 17  # torch._int_mm on CUDA: M > 16, K and N multiples of 8


def check_int_mm_shape(in_features: int, out_features: int, device_type: str, name: str = "") -> None:
    """torch._int_mm's CUDA constraints on a layer (the CPU takes any shape)."""
    if device_type == "cuda" and (in_features % 8 or out_features % 8):
        raise UserError(f"int8_dynamic: layer {name!r} is {in_features} -> {out_features}; torch._int_mm on CUDA "
                        "needs in_features and out_features divisible by 8: use int8_weight_only for this model")


class Int8DynamicLinear(QuantizedLinear):
    variant = "int8_dynamic"

    def __init__(self, linear: nn.Linear, smooth: torch.Tensor | None):
        """`smooth` (K,): SmoothQuant factors s; the weight's columns are multiplied by
        s and the activation's divided by it, so x @ wᵀ is unchanged in exact arithmetic."""
        super().__init__(linear)
        w = linear.weight.detach().float()
        if smooth is not None:
            w = w * smooth[None, :]  # (N, K)
            self.register_buffer("inv_smooth", (1.0 / smooth).to(w.device))  # (K,) fp32
        else:
            self.inv_smooth = None
        q, scale = quantize_per_channel(w)
        self.register_buffer("weight_int8", q)  # (N, K)
        self.register_buffer("scale", scale)  # (N,) fp32
        note_path("linear", "int_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        xq, x_scale = quantize_per_token(x2)  # (M, K) int8, (M, 1)
        m = xq.shape[0]
        if x.is_cuda and m < INT_MM_MIN_ROWS_CUDA:  # decode: pad rows with zeros up to _int_mm's minimum
            xq = F.pad(xq, (0, 0, 0, 32 - m))
        acc = torch._int_mm(xq, self.weight_int8.t())[:m]  # (M, N) int32: exact int8 x int8 sums
        y = acc.float() * x_scale * self.scale  # both scales in the epilogue
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*lead, self.out_features)


def smoothquant_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant: s_j = max|X_j|^α / max|W_j|^(1-α) per input channel j (K,), fp32."""
    w_amax = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)  # (K,)
    return (act_amax.float().clamp(min=1e-5).pow(alpha) / w_amax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def activation_amax(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every nn.Linear, over one forward of `tokens`
    (hooks are removed before returning: the model is left as it was)."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            def hook(mod, args, name=name):
                amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()  # (K,)
                stats[name] = torch.maximum(stats[name], amax) if name in stats else amax
            handles.append(module.register_forward_pre_hook(hook))
    try:
        model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@register_variant("int8_dynamic")
@dataclass(frozen=True)
class Int8Dynamic(Variant):
    model_kinds = ANY_MODEL
    axis = "linear"
    description = "W8A8: per-token dynamic int8 activations x int8 weights -> int32 (torch._int_mm), SmoothQuant alpha"
    alpha: float = 0.0  # SmoothQuant migration strength; 0 = none. 0.5 is the paper's default

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (SmoothQuant migration strength), got {self.alpha}")

    def apply(self, model: nn.Module) -> nn.Module:
        stats = {}
        if self.alpha > 0:
            config = getattr(model, "config", None)
            if config is None or not hasattr(model, "tok_embeddings"):
                raise UserError("int8_dynamic(alpha>0) calibrates on a forward pass of a Transformer; "
                                "this workload has none: use alpha=0")
            _refuse_quantized(model, self.name)
            # Calibration text: seeded random token ids, since variants cannot reach the
            # tokenizer or the eval text. The outlier channels SmoothQuant targets are a
            # property of the weights (they show for any input), which is what it needs.
            device = model.tok_embeddings.weight.device
            gen = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, config.vocab_size, (1, min(CALIBRATION_TOKENS, config.max_seq_len)),
                                   generator=gen).to(device)
            stats = activation_amax(model, tokens)

        def make(name: str, linear: nn.Linear) -> nn.Module:
            _check_float(linear, name, self.name)
            check_int_mm_shape(linear.in_features, linear.out_features, linear.weight.device.type, name)
            smooth = smoothquant_factors(stats[name], linear.weight, self.alpha) if name in stats else None
            return Int8DynamicLinear(linear, smooth)

        return swap_linears(model, make, self.name)


# ---------------------------------------------------------------------------- LLM.int8

def bnb_matmul_path(device: torch.device) -> str:
    """What bitsandbytes' int8 matmul really runs on `device`: `int8` where it has a
    kernel for it (CUDA; a CPU with AVX-512, through torch._int_mm), else
    `fp32_fallback`, its default kernel, which multiplies A.float() @ B.float()."""
    import bitsandbytes  # noqa: F401  (importing registers its kernels)

    key = "CUDA" if device.type == "cuda" else "CPU"
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("bitsandbytes::int8_linear_matmul", key)
    return "int8" if has_kernel else "fp32_fallback"


class Int8LLMLinear(QuantizedLinear):
    variant = "int8_llm"

    def __init__(self, linear: nn.Linear, threshold: float):
        super().__init__(linear)
        import bitsandbytes as bnb  # imported on use: slow, and optional for the other variants

        device = linear.weight.device
        inner = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=threshold, device="meta")
        # Int8Params quantizes (row-wise absmax, from fp16) when moved to a device.
        inner.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu", torch.float16).clone(),
                                         requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:  # bitsandbytes casts its bias to the activation dtype (fp16) in place
            inner.bias = nn.Parameter(linear.bias.detach().to(torch.float16).clone(), requires_grad=False)
        self.inner = inner.to(device).train(False)
        self.bias = None  # the inner layer owns it
        # the row scales live in an attribute bitsandbytes moves into its state; a buffer
        # aliasing the same tensor makes weight_bytes count them
        self.register_buffer("scb", self.inner.weight.SCB, persistent=False)
        note_path("linear", bnb_matmul_path(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # bitsandbytes quantizes activations from fp16 (and warns on every call otherwise)
        return self.inner(x.to(torch.float16)).to(x.dtype)


@register_variant("int8_llm")
@dataclass(frozen=True)
class Int8LLM(Variant):
    axis = "linear"
    requires = frozenset({"bitsandbytes"})
    description = "bitsandbytes LLM.int8 (Linear8bitLt): int8 matmul, fp16 outlier columns above threshold"
    threshold: float = 6.0  # |activation| above it: that input column runs in fp16; 0 = pure int8

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 turns the outlier decomposition off), got {self.threshold}")

    def apply(self, model: nn.Module) -> nn.Module:
        def make(name: str, linear: nn.Linear) -> nn.Module:
            _check_float(linear, name, self.name)
            return Int8LLMLinear(linear, self.threshold)

        return swap_linears(model, make, self.name)


# ---------------------------------------------------------------------------- torchao peer

@register_variant("torchao_int8_weight_only")
@dataclass(frozen=True)
class TorchaoInt8WeightOnly(Variant):
    axis = "linear"
    requires = frozenset({"torchao"})
    description = "torchao's Int8WeightOnlyConfig, beside ours (needs torchao)"

    def apply(self, model: nn.Module) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def make(name: str, linear: nn.Linear) -> nn.Module:
            _check_float(linear, name, self.name)
            fresh = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
            fresh.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)  # quantize_ swaps it, not edits
            fresh.bias = linear.bias
            return fresh

        note_path("linear", "torchao")  # torchao picks its own kernel per device and dtype
        # Quantize in the caller's mode: a torchao weight made outside inference_mode cannot
        # be detached (state_dict) inside it, which the runner's linear workload does.
        swapped = swap_linears(model, make, self.name)
        quantize_(swapped, Int8WeightOnlyConfig(), filter_fn=lambda m, _: type(m) is nn.Linear)
        return swapped
