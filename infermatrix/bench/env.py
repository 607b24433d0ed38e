"""The environment a run measured on: versions, machine, device, threads, git SHA, and
which energy counters a case can read (or why none)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

import torch

from infermatrix.bench.energy import describe_machine

_PACKAGES = ("infermatrix", "torch", "triton", "bitsandbytes", "numpy", "gguf", "tokenizers")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ISA flags that decide whether a dtype's matmul is native here: without avx512_bf16
# (or AMX) bf16 GEMMs are emulated, without avx512_vnni int8 paths may fall back.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _cpuinfo_field(cpuinfo: str, name: str) -> str | None:
    """The value of the first `name : value` line (every processor repeats them)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str) -> dict[str, bool] | None:
    """Each of CPU_FLAGS -> present or not, from /proc/cpuinfo's text; None when the
    text has no flags line (another OS): unknown is not the same as absent."""
    flags = _cpuinfo_field(cpuinfo, "flags")
    if flags is None:
        return None
    present = set(flags.split())
    return {flag: flag in present for flag in CPU_FLAGS}


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name (from /proc/cpuinfo's text, read when not given)."""
    cpuinfo = _read_cpuinfo() if cpuinfo is None else cpuinfo
    return _cpuinfo_field(cpuinfo, "model name") or platform.processor() or platform.machine()


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(__file__))
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "driver": driver, "count": torch.cuda.device_count()}


def capture_env() -> dict:
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cpuinfo = _read_cpuinfo()
    return {
        "host": platform.node(),  # which machine measured, when shards or Ray workers run elsewhere
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(cpuinfo),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ISA torch's CPU kernels dispatch to
        "cpu_flags": cpu_flags(cpuinfo),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_affinity": affinity,  # the cores this process may run on (pinning)
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_available": torch.cuda.is_available(),
        "gpu": _gpu(),
        "energy": describe_machine(),  # per device type: the counters read, or why there are none
        "git_sha": _git_sha(),
        "versions": {name: _version(name) for name in _PACKAGES},
    }
