"""Energy of the timed calls, read from the hardware's own cumulative energy counters.

Counters (never an estimate from TDP or a power model: no counter, no figure):

* CPU cases: RAPL through Linux powercap, `/sys/class/powercap/intel-rapl:N/energy_uj`
  of every package zone (named `package-N`; AMD Zen exposes its packages under the same
  interface on recent kernels). Their subzones (core, uncore, a package's dram) are left
  out, being inside the package; so are `psys` (the whole platform, packages included)
  and the `intel-rapl-mmio` duplicates. The counter wraps at `max_energy_range_uj` and
  updates about every millisecond. Since Linux 5.10 `energy_uj` is readable by root only.
* CUDA cases: NVML's total-energy counter of the case's GPU
  (`nvmlDeviceGetTotalEnergyConsumption`, mJ since the driver loaded; Volta or newer)
  through the optional `nvidia-ml-py` package (`pip install 'infermatrix[energy]'`). It
  updates at a limited rate (tens of ms to ~100 ms), so a window shorter than about
  100 ms is noise; windows shorter than NVML_MIN_WINDOW_S are refused.

Both counters are device-wide: they count everything running on the package or the GPU
during the window, not only this process.

An EnergyMeter reads its counters at the start and the end of each timed window (the
timer's sampling loop, or each turn of an interleaved measurement), never around
warm-up, and adds the windows up. A measurement is dropped, with its reason, when a
window is shorter than its source's minimum, a read fails, or a counter went backwards
without a wrap explaining it.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

POWERCAP_ROOT = Path("/sys/class/powercap")
RAPL_MIN_WINDOW_S = 0.1  # RAPL updates about every 1 ms: 100 updates per window at least
NVML_MIN_WINDOW_S = 0.5  # NVML updates every ~100 ms at worst: a window of 5 updates at least
# A decrease read as a wrap-around must not imply more than this average power over the
# window; no CPU package or GPU draws 10 kW, so a larger figure is a reset, not a wrap.
PLAUSIBLE_MAX_W = 10_000.0

# the metrics a measured case carries (README, "results.csv columns"); ENERGY_DROPPED: the
# reason, when a counter exists but the measurement was refused
ENERGY_METRICS = ("energy_j", "energy_j_per_token", "avg_power_w", "energy_window_s")
ENERGY_DROPPED = "energy_dropped"

_PACKAGE_ZONE = re.compile(r"intel-rapl:(\d+)")  # top level only: subzones are intel-rapl:N:M


class NoCounter(Exception):
    """No counter is readable for a device; the message says why."""


class Dropped(Exception):
    """A reading or a window that cannot give an energy figure; the message says why."""


@dataclass(frozen=True)
class Counter:
    """One cumulative energy counter."""

    name: str  # e.g. "intel-rapl:0 (package-0)", "nvml GPU-5d1c..."
    read_j: Callable[[], float]  # joules since some origin; raises Dropped when the read fails
    wraps_at_j: float | None  # the counter's range (it restarts from 0 past it); None: never wraps


@dataclass(frozen=True)
class Source:
    """The counters summed for one device, and the shortest window they measure well."""

    kind: str  # "rapl" | "nvml"
    counters: tuple[Counter, ...]
    min_window_s: float

    def describe(self) -> dict:
        return {"source": self.kind, "counters": [c.name for c in self.counters], "min_window_s": self.min_window_s}


# ---------------------------------------------------------------- RAPL (powercap)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except PermissionError:
        raise NoCounter(f"{path}: permission denied (RAPL counters are readable by root only since Linux 5.10; "
                        f"allow reading with `sudo chmod a+r {path.parent.parent}/intel-rapl:*/energy_uj`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NoCounter(f"{path}: unreadable ({exc})") from None


def _rapl_reader(path: Path) -> Callable[[], float]:
    def read_j() -> float:
        try:
            return int(path.read_text(encoding="ascii")) / 1e6  # µJ
        except (OSError, ValueError) as exc:
            raise Dropped(f"reading {path} failed ({exc})") from None
    return read_j


def rapl_source(root: Path | str | None = None) -> Source:
    """The package zones under a powercap root (default /sys/class/powercap); NoCounter
    when there is none, or one cannot be read (a sum missing a package would be wrong)."""
    root = Path(root) if root is not None else POWERCAP_ROOT
    if not root.is_dir():
        raise NoCounter(f"no readable RAPL counter: {root} does not exist (no powercap interface: most VMs and "
                        "containers lack it, or the intel_rapl driver is not loaded)")
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        raise NoCounter(f"no readable RAPL counter: {root} cannot be listed ({exc})") from None
    zones = sorted((int(m.group(1)), p) for p in entries if (m := _PACKAGE_ZONE.fullmatch(p.name)))
    counters = []
    for _, zone in zones:
        name = _read_text(zone / "name")
        if not name.startswith("package"):  # psys: the platform, packages included
            continue
        energy = zone / "energy_uj"
        value = _read_text(energy)  # readable now, or NoCounter with the reason
        if not value.isdigit():
            raise NoCounter(f"{energy}: not a counter ({value!r})")
        try:
            wraps_at = int(_read_text(zone / "max_energy_range_uj")) / 1e6
        except (NoCounter, ValueError):
            wraps_at = None  # unknown range: any decrease is a counter going backwards
        counters.append(Counter(f"{zone.name} ({name})", _rapl_reader(energy),
                                wraps_at if wraps_at and wraps_at > 0 else None))
    if not counters:
        raise NoCounter(f"no readable RAPL counter: {root} has no package zone (intel-rapl:N named package-N)")
    return Source("rapl", tuple(counters), RAPL_MIN_WINDOW_S)


# ---------------------------------------------------------------- NVML


def _import_nvml():
    try:
        import pynvml
    except ImportError:
        raise NoCounter("no readable NVML counter: nvidia-ml-py is not installed (pip install "
                        "'infermatrix[energy]')") from None
    return pynvml


def _nvml_uuid(index: int) -> str | None:
    """The NVML UUID of torch's CUDA device `index` (GPU-...), or None when torch does not
    say: CUDA_VISIBLE_DEVICES renumbers devices, so NVML's index may be another GPU."""
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def nvml_source(device: torch.device | str, nvml=None, uuid: str | None = None) -> Source:
    """NVML's total-energy counter of a CUDA device. `nvml`: the pynvml module (default:
    imported, optional dependency); `uuid`: the device's NVML UUID (default: from torch)."""
    device = torch.device(device)
    index = device.index if device.index is not None else 0
    nvml = nvml or _import_nvml()
    error = getattr(nvml, "NVMLError", Exception)
    try:
        nvml.nvmlInit()
    except error as exc:
        raise NoCounter(f"no readable NVML counter: NVML did not initialise ({exc})") from None
    if uuid is None:
        uuid = _nvml_uuid(index)
    try:
        if uuid is not None:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
        elif not os.environ.get("CUDA_VISIBLE_DEVICES"):
            handle, uuid = nvml.nvmlDeviceGetHandleByIndex(index), f"index {index}"
        else:
            raise NoCounter(f"no readable NVML counter: cannot tell which NVML device is {device} (torch gives no "
                            "UUID and CUDA_VISIBLE_DEVICES renumbers the GPUs)")
        nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except error as exc:
        raise NoCounter(f"no readable NVML counter for {device} ({uuid}): {exc} (the total-energy counter needs "
                        "a Volta or newer GPU, and no MIG slice)") from None

    def read_j() -> float:
        try:
            return nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ
        except error as exc:
            raise Dropped(f"reading NVML's energy counter of {uuid} failed ({exc})") from None

    return Source("nvml", (Counter(f"nvml {uuid}", read_j, None),), NVML_MIN_WINDOW_S)


# ---------------------------------------------------------------- choosing and describing


def find_source(device: torch.device | str, *, powercap_root: Path | str | None = None, nvml=None) -> Source:
    """The counters of a case's device: RAPL packages for the CPU, NVML for a CUDA
    device. NoCounter (with the reason) when none is readable."""
    device = torch.device(device)
    if device.type == "cpu":
        return rapl_source(powercap_root)
    if device.type == "cuda":
        return nvml_source(device, nvml)
    raise NoCounter(f"no energy counter is read for {device.type} devices")


def describe(device: torch.device | str, *, powercap_root: Path | str | None = None, nvml=None) -> dict:
    """What a case on `device` reads: {"source", "counters", "min_window_s"}, or
    {"source": None, "why"} when no counter is readable."""
    try:
        return find_source(device, powercap_root=powercap_root, nvml=nvml).describe()
    except NoCounter as exc:
        return {"source": None, "why": str(exc)}


def describe_machine(*, powercap_root: Path | str | None = None, nvml=None) -> dict:
    """env["energy"]: describe() of the CPU, and of the GPUs when there are some (their
    counters together; the first GPU without one, with its reason, makes it None)."""
    out = {"cpu": describe("cpu", powercap_root=powercap_root)}
    gpus = [describe(f"cuda:{i}", nvml=nvml) for i in range(torch.cuda.device_count())]
    if gpus:
        missing = next((g for g in gpus if g["source"] is None), None)
        out["cuda"] = missing or {**gpus[0], "counters": [name for g in gpus for name in g["counters"]]}
    return out


# ---------------------------------------------------------------- measuring


def counter_delta(counter: Counter, before: float, after: float, seconds: float) -> float:
    """Joules a counter gained between two readings `seconds` apart, a wrap-around
    included; Dropped when it went backwards and no wrap explains it (no known range, a
    reading past the range, or a wrap implying more than PLAUSIBLE_MAX_W)."""
    if after >= before:
        return after - before
    wraps_at = counter.wraps_at_j
    if wraps_at is None:
        raise Dropped(f"{counter.name} went backwards ({before:.6f} J, then {after:.6f} J) and never wraps: "
                      "it was reset (a driver reload?)")
    if not (0 <= after <= wraps_at and before <= wraps_at):
        raise Dropped(f"{counter.name} went backwards ({before:.6f} J, then {after:.6f} J), a reading past its "
                      f"range of {wraps_at:.6f} J: not a wrap-around")
    wrapped = wraps_at - before + after
    if wrapped > PLAUSIBLE_MAX_W * seconds:
        raise Dropped(f"{counter.name} went backwards ({before:.6f} J, then {after:.6f} J); a wrap at "
                      f"{wraps_at:.6f} J would mean {wrapped / seconds:,.0f} W over {seconds:.3f} s, more than "
                      f"{PLAUSIBLE_MAX_W:,.0f} W: it was reset, not wrapped")
    return wrapped


class EnergyMeter:
    """Adds up a source's energy over timed windows (`window()`, the timer's
    around_timed); without a source it measures nothing (`why` says why)."""

    def __init__(self, source: Source | None, why: str | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.source, self.why, self.clock = source, why, clock
        self.joules = 0.0
        self.seconds = 0.0
        self.windows = 0
        self.dropped: str | None = None  # why the measurement was refused

    def _read(self) -> list[float] | None:
        if self.source is None or self.dropped is not None:
            return None
        try:
            return [c.read_j() for c in self.source.counters]
        except Dropped as exc:
            self.dropped = str(exc)
            return None

    @contextmanager
    def window(self) -> Iterator[None]:
        """Read the counters before and after the body: one timed window."""
        before = self._read()
        t0 = self.clock()
        yield
        seconds = self.clock() - t0
        after = self._read() if before is not None else None
        if after is None:
            return
        try:
            if seconds < self.source.min_window_s:
                raise Dropped(f"a timed window of {seconds:.3f} s is shorter than the {self.source.min_window_s:g} s "
                              f"the {self.source.kind} counter needs (it updates every "
                              f"{'~1 ms' if self.source.kind == 'rapl' else '~100 ms'}); a longer timed loop (a higher "
                              "min_runs, a smaller target_ci; a longer turn_s for turns) gives one")
            joules = sum(counter_delta(c, b, a, seconds) for c, b, a in zip(self.source.counters, before, after))
        except Dropped as exc:
            self.dropped = str(exc)
            return
        self.joules += joules
        self.seconds += seconds
        self.windows += 1

    def metrics(self, calls: int, tokens_per_call: int | None = None) -> dict:
        """The case's energy metrics over `calls` timed calls: energy_j (joules per call),
        energy_j_per_token (when the call processes tokens), avg_power_w, energy_window_s;
        or {energy_dropped: why} when refused; {} without a source (env says why)."""
        if self.source is None:
            return {}
        if self.dropped is not None:
            return {ENERGY_DROPPED: self.dropped}
        if not self.windows or calls <= 0:
            return {ENERGY_DROPPED: "no timed window was measured"}
        out = {"energy_j": self.joules / calls}
        if tokens_per_call:
            out["energy_j_per_token"] = self.joules / (calls * tokens_per_call)
        out.update(avg_power_w=self.joules / self.seconds, energy_window_s=self.seconds)
        return out


def meter_for(device: torch.device | str, *, powercap_root: Path | str | None = None, nvml=None) -> EnergyMeter:
    """A meter of the case's device, or one that measures nothing, with the reason."""
    try:
        return EnergyMeter(find_source(device, powercap_root=powercap_root, nvml=nvml))
    except NoCounter as exc:
        return EnergyMeter(None, str(exc))


def merge_energy(turns: Sequence[Mapping]) -> dict:
    """The energy metrics of one case measured in several processes' turns (A/B), from
    each turn's metrics (with its `runs`): joules and windows summed over the turns. A
    turn dropped drops the whole; {} when no turn measured energy."""
    dropped = next((m[ENERGY_DROPPED] for m in turns if m.get(ENERGY_DROPPED)), None)
    if dropped is not None:
        return {ENERGY_DROPPED: dropped}
    measured = [m for m in turns if m.get("energy_j") is not None]
    if not measured:
        return {}
    if len(measured) < len(turns):
        return {ENERGY_DROPPED: f"{len(turns) - len(measured)} of {len(turns)} turns measured no energy"}
    joules = sum(m["energy_j"] * m["runs"] for m in measured)
    calls = sum(m["runs"] for m in measured)
    seconds = sum(m["energy_window_s"] for m in measured)
    out = {"energy_j": joules / calls}
    if all(m.get("energy_j_per_token") for m in measured):
        tokens = sum(m["energy_j"] / m["energy_j_per_token"] * m["runs"] for m in measured)
        out["energy_j_per_token"] = joules / tokens
    out.update(avg_power_w=joules / seconds, energy_window_s=seconds)
    return out
