"""Compile every Triton kernel for a GPU architecture, on a machine without one.

Triton lowers a kernel to PTX and runs its bundled ptxas with no GPU present, so
this catches what the CPU interpreter cannot: code the compiler refuses (types,
layouts, unsupported ops) and tiles that do not fit. For each kernel at the
configurations we launch it prints its resource use, read from the cubin with
Triton's bundled cuobjdump: registers per thread, shared memory per program,
and local memory (spills, which make a kernel slow, not wrong).

    python scripts/compile_kernels.py [--arch 90]

Exits 1 if a kernel fails to compile or needs more shared memory than the
architecture has. Run it without TRITON_INTERPRET=1 (the interpreter replaces
the kernels with Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from infermatrix.kernels import attention_triton, block_sparse_triton, decode_attention_triton  # noqa: E402
from infermatrix.kernels import int8_matmul_triton, paged_attention_triton  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per program (opt-in maximum)
FLOAT_ARGS = {"qk_scale"}


def signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton types of fn's runtime arguments: the named pointers, fp32 scales, i32 the rest."""
    return {name: pointers.get(name) or ("fp32" if name in FLOAT_ARGS else "i32")
            for name in fn.arg_names if name not in constexprs}


def aligned(fn, pointers: dict[str, str]) -> dict[tuple, list]:
    """What a launch on real tensors tells the compiler: pointers and strides divisible
    by 16. Without it the compiler cannot use asynchronous copies, so it would report
    a fraction of the shared memory the kernel takes at run time."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if name in pointers or name.startswith("stride_")}


def cases(shared_limit: int) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, jit function, pointer types, constexprs, options) for each launch configuration we use
    on a GPU with `shared_limit` bytes of shared memory per program."""
    attention_triton._shared_memory_limit = lambda device: shared_limit  # prune as on that GPU
    out = []
    prefill = attention_triton._prefill_kernel
    for dtype, head_dim in (("fp16", 128), ("bf16", 64), ("fp16", 256), ("fp32", 32)):
        ptrs = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")} | {"Lo": "*i32", "Hi": "*i32"}
        configs = prefill.configs if head_dim in (128, 256) else prefill.configs[:1]  # 256: the pruned ones
        fake_q = torch.empty(0, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
        for config in attention_triton._prune_configs(configs, {"Q": fake_q, "BLOCK_D": head_dim, "n_q": 4096}):
            for bounds in (attention_triton.BOUNDS_CAUSAL, attention_triton.BOUNDS_TENSOR):
                const = dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=head_dim, BOUNDS=bounds,
                             DOT_PRECISION="tf32", **config.kwargs)
                label = (f"prefill {dtype} D{head_dim} bounds={bounds} M{config.kwargs['BLOCK_M']} "
                         f"N{config.kwargs['BLOCK_N']} w{config.num_warps} s{config.num_stages}")
                out.append((label, prefill.fn, ptrs, const,
                            dict(num_warps=config.num_warps, num_stages=config.num_stages)))
    decode = decode_attention_triton
    for dtype in ("fp16", "bf16"):
        ptrs = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")} | {
            "PartOut": "*fp32", "PartLse": "*fp32", "Lo": "*i32", "Hi": "*i32", "Counters": "*i32"}
        default = decode_attention_triton.DEFAULT_CONFIG
        for block_n, warps, stages, fuse, group, merge in (
                (default.block_n, default.num_warps, default.num_stages, default.fuse_combine, 4, 32),
                (64, 4, 3, False, 4, 16), (64, 4, 3, True, 1, 32), (32, 2, 4, True, 8, 8), (128, 4, 3, True, 4, 16)):
            const = dict(GROUP=group, BLOCK_H=max(16, group), HEAD_DIM=128, BLOCK_D=128, BLOCK_N=block_n,
                         HAS_BOUNDS=True, DOT_PRECISION="tf32", FUSE_COMBINE=fuse, BLOCK_G=group, BLOCK_S=merge)
            out.append((f"decode split {dtype} N{block_n} w{warps} s{stages} fused={fuse} G{group} S{merge}",
                        decode._split_kernel, ptrs, const, dict(num_warps=warps, num_stages=stages)))
        out.append((f"decode combine {dtype}", decode.combine_kernel,
                     {"PartOut": "*fp32", "PartLse": "*fp32", "Out": f"*{dtype}"},
                     dict(GROUP=4, BLOCK_G=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=16), dict(num_warps=4)))
    paged = paged_attention_triton._paged_decode_kernel
    for dtype, head_dim, block_size, group, split, fuse in (
            ("bf16", 128, 16, 4, True, True), ("fp16", 128, 16, 4, True, True),  # blocks of 16: 4 per tile
            ("bf16", 128, 64, 4, False, False),  # a block holds the whole tile
            ("bf16", 256, 16, 8, True, True), ("fp32", 80, 32, 1, True, False)):
        ptrs = {n: f"*{dtype}" for n in ("Q", "KPool", "VPool", "Out")} | {
            "BlockTables": "*i32", "SeqLens": "*i32", "PartOut": "*fp32", "PartLse": "*fp32", "Counters": "*i32"}
        default = decode_attention_triton.DEFAULT_CONFIG
        block_d = max(16, triton.next_power_of_2(head_dim))
        const = dict(GROUP=group, BLOCK_H=max(16, group), HEAD_DIM=head_dim, BLOCK_D=block_d,
                     BLOCK_N=default.block_n, BLOCK_SIZE=block_size, DOT_PRECISION="tf32", SPLIT=split,
                     FUSE_COMBINE=fuse, BLOCK_G=group, BLOCK_S=16)
        out.append((f"paged decode {dtype} D{head_dim} block {block_size} G{group} split={split} fused={fuse}",
                    paged, ptrs, const, dict(num_warps=default.num_warps, num_stages=default.num_stages)))
    sparse = block_sparse_triton._block_sparse_kernel
    for dtype, block, head_dim in (("bf16", 128, 128), ("bf16", 256, 128), ("fp16", 64, 64)):
        ptrs = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")} | {"KvNum": "*i32", "KvIdx": "*i32"}
        const = dict(GROUP=1, CAUSAL=True, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK=block, DOT_PRECISION="tf32")
        big = block * head_dim > 128 * 64  # as block_sparse_attention_triton launches it
        out.append((f"block-sparse {dtype} block {block} D{head_dim}", sparse, ptrs, const,
                    dict(num_warps=8 if big else 4, num_stages=2)))
    int8 = int8_matmul_triton._int8_weight_only_kernel
    for dtype in ("bf16", "fp16"):
        for m in (1, 64, 1024):
            blocks = int8_matmul_triton._blocks(m)
            options = dict(num_warps=blocks.pop("num_warps"), num_stages=blocks.pop("num_stages"))
            ptrs = {"x_ptr": f"*{dtype}", "q_ptr": "*i8", "scale_ptr": "*fp32", "bias_ptr": f"*{dtype}",
                    "out_ptr": f"*{dtype}"}
            out.append((f"int8 matmul {dtype} M={m}", int8, ptrs, dict(HAS_BIAS=True, IEEE=False, **blocks), options))
    return out


def resources(cubin: bytes) -> dict[str, int]:
    """REG, SHARED (static) and LOCAL from cuobjdump's resource report of one cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|LOCAL):(\d+)", report)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (default 90)")
    parser.add_argument("--only", default="", help="compile only kernels whose label matches this regex")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    limit = SHARED_LIMIT.get(args.arch)
    failures = []
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':58} {'regs':>5} {'shared':>7} {'spill':>6}")
    for label, fn, pointers, constexprs, options in cases(limit or SHARED_LIMIT[90]):
        if not re.search(args.only, label):
            continue
        while not isinstance(fn, JITFunction):  # an autotuned kernel wraps its JIT function
            fn = fn.fn
        try:
            source = ASTSource(fn, signature(fn, pointers, constexprs), constexprs, aligned(fn, pointers))
            compiled = triton.compile(source, target=target, options=options)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures.append(label)
            print(f"{label:58} FAILED: {str(error).splitlines()[-1] if str(error) else type(error).__name__}")
            continue
        shared = compiled.metadata.shared
        use = resources(compiled.asm["cubin"])
        too_big = limit is not None and shared > limit
        if too_big:
            failures.append(label)
        print(f"{label:58} {use.get('REG', -1):5} {shared:7} {use.get('LOCAL', -1):6}"
              + (f"  over the {limit}-byte shared-memory limit" if too_big else ""))
    if failures:
        print(f"{len(failures)} failed: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
