"""The environment says what the CPU can do: torch's dispatch level and the ISA flags
that decide whether bf16/int8 matmuls are native or emulated."""

import torch

from infermatrix.bench import env
from infermatrix.bench.env import CPU_FLAGS, capture_env, cpu_flags

# Two processors, as /proc/cpuinfo lists them: the flags line repeats per processor.
AVX512_BF16_CPUINFO = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx avx2 avx512f avx512_bf16 avx512_vnni avx512bw
processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx avx2 avx512f avx512_bf16 avx512_vnni avx512bw
"""
AVX2_CPUINFO = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx avx2 fma\n"
AMX_CPUINFO = ("flags\t: avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n")


def test_cpu_flags_says_which_flags_are_present_and_which_absent():
    assert cpu_flags(AVX512_BF16_CPUINFO) == {"avx2": True, "avx512f": True, "avx512_vnni": True,
                                              "avx512_bf16": True, "amx_tile": False, "amx_int8": False,
                                              "amx_bf16": False}
    avx2 = cpu_flags(AVX2_CPUINFO)
    assert avx2["avx2"] and not any(v for k, v in avx2.items() if k != "avx2")
    assert all(cpu_flags(AMX_CPUINFO).values())
    assert set(cpu_flags(AMX_CPUINFO)) == set(CPU_FLAGS)


def test_cpu_flags_of_a_machine_without_cpuinfo_is_none():
    assert cpu_flags("") is None  # macOS, or /proc unreadable: unknown, not "no AVX2"


def test_capture_env_records_capability_and_flags(monkeypatch):
    monkeypatch.setattr(env, "_read_cpuinfo", lambda: AVX2_CPUINFO)
    captured = capture_env()
    assert captured["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert captured["cpu_flags"] == cpu_flags(AVX2_CPUINFO)
    assert captured["cpu"] == "Intel Xeon"
