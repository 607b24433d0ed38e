"""The energy meter on fake counters: a powercap tree in tmp_path and a fake NVML."""

from __future__ import annotations

import pathlib
import time

import pandas as pd
import pytest
import torch

from infermatrix.bench import energy
from infermatrix.bench.energy import (Counter, Dropped, EnergyMeter, NoCounter, Source, counter_delta, describe,
                                      merge_energy, meter_for, nvml_source, rapl_source)
from infermatrix.bench.matrix import parse_matrix
from infermatrix.bench.runner import run_matrix
from infermatrix.bench.timing import TimerConfig, measure

RANGE_UJ = 262_143_328_850  # a real package's max_energy_range_uj


def zone(root: pathlib.Path, folder: str, name: str, energy_uj: int | None = 0,
         max_range_uj: int | None = RANGE_UJ) -> pathlib.Path:
    path = root / folder
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    if energy_uj is not None:
        (path / "energy_uj").write_text(f"{energy_uj}\n")
    if max_range_uj is not None:
        (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


def set_uj(path: pathlib.Path, value: int) -> None:
    (path / "energy_uj").write_text(f"{value}\n")


class Clock:
    """A clock the test moves: each call returns the current time."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def window(meter: EnergyMeter, clock: Clock, seconds: float, during=lambda: None) -> None:
    with meter.window():
        during()
        clock.now += seconds


@pytest.fixture
def two_packages(tmp_path):
    """Two packages with subzones, plus a psys zone and an mmio duplicate that must not count."""
    root = tmp_path / "powercap"
    p0 = zone(root, "intel-rapl:0", "package-0", 1_000_000)
    zone(root, "intel-rapl:0:0", "core", 5_000_000)
    zone(root, "intel-rapl:0:1", "dram", 7_000_000)
    p1 = zone(root, "intel-rapl:1", "package-1", 2_000_000)
    zone(root, "intel-rapl:2", "psys", 9_000_000)
    zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000)
    return root, p0, p1


def test_rapl_sums_the_package_zones_only(two_packages):
    root, p0, p1 = two_packages
    source = rapl_source(root)
    assert [c.name for c in source.counters] == ["intel-rapl:0 (package-0)", "intel-rapl:1 (package-1)"]
    assert source.counters[0].wraps_at_j == pytest.approx(RANGE_UJ / 1e6)
    clock = Clock()
    meter = EnergyMeter(source, clock=clock)

    def consume():  # 3 J on package 0, 1 J on package 1
        set_uj(p0, 4_000_000)
        set_uj(p1, 3_000_000)

    window(meter, clock, 2.0, consume)
    assert meter.metrics(calls=8, tokens_per_call=4) == pytest.approx(
        {"energy_j": 0.5, "energy_j_per_token": 4 / 32, "avg_power_w": 2.0, "energy_window_s": 2.0})


def test_windows_add_up_and_the_ops_get_no_per_token_figure(two_packages):
    root, p0, _ = two_packages
    clock = Clock()
    meter = EnergyMeter(rapl_source(root), clock=clock)
    window(meter, clock, 0.5, lambda: set_uj(p0, 2_000_000))  # 1 J
    clock.now += 10.0  # between turns: another side runs, not counted
    set_uj(p0, 50_000_000)
    window(meter, clock, 0.5, lambda: set_uj(p0, 52_000_000))  # 2 J
    assert meter.metrics(calls=3) == pytest.approx({"energy_j": 1.0, "avg_power_w": 3.0, "energy_window_s": 1.0})


def test_a_wrap_around_at_the_counters_range_is_counted(two_packages):
    root, p0, p1 = two_packages
    set_uj(p0, RANGE_UJ - 1_000_000)  # 1 J below the top
    clock = Clock()
    meter = EnergyMeter(rapl_source(root), clock=clock)
    window(meter, clock, 1.0, lambda: set_uj(p0, 2_500_000))  # wraps: 1 J + 2.5 J
    assert meter.metrics(calls=1)["energy_j"] == pytest.approx(3.5)


def test_a_counter_going_backwards_without_a_wrap_drops_the_metric_with_its_reason(two_packages):
    root, p0, _ = two_packages
    set_uj(p0, 200_000_000_000)  # 200 kJ of a 262 kJ range
    clock = Clock()
    meter = EnergyMeter(rapl_source(root), clock=clock)
    window(meter, clock, 1.0, lambda: set_uj(p0, 5_000_000))  # as a wrap: 62 kJ in 1 s, 62 kW
    metrics = meter.metrics(calls=10, tokens_per_call=10)
    assert set(metrics) == {"energy_dropped"}
    assert "intel-rapl:0 (package-0) went backwards" in metrics["energy_dropped"]
    assert "it was reset, not wrapped" in metrics["energy_dropped"]
    window(meter, clock, 1.0)  # a dropped measurement stays dropped
    assert set(meter.metrics(calls=10)) == {"energy_dropped"}


def test_without_a_known_range_any_decrease_is_a_counter_going_backwards(tmp_path):
    root = tmp_path / "powercap"
    p0 = zone(root, "intel-rapl:0", "package-0", 9_000_000, max_range_uj=None)
    source = rapl_source(root)
    assert source.counters[0].wraps_at_j is None
    clock = Clock()
    meter = EnergyMeter(source, clock=clock)
    window(meter, clock, 1.0, lambda: set_uj(p0, 8_000_000))
    assert "went backwards (9.000000 J, then 8.000000 J) and never wraps" in meter.metrics(1)["energy_dropped"]


def test_counter_delta_refuses_readings_past_the_range():
    counter = Counter("c", lambda: 0.0, wraps_at_j=10.0)
    assert counter_delta(counter, 9.0, 1.0, 1.0) == pytest.approx(2.0)
    assert counter_delta(counter, 1.0, 4.0, 1.0) == pytest.approx(3.0)
    with pytest.raises(Dropped, match="a reading past its range of 10.000000 J"):
        counter_delta(counter, 12.0, 1.0, 1.0)


def test_a_window_shorter_than_the_sources_minimum_is_refused(two_packages):
    root, p0, _ = two_packages
    clock = Clock()
    meter = EnergyMeter(rapl_source(root), clock=clock)
    window(meter, clock, 0.05, lambda: set_uj(p0, 2_000_000))
    why = meter.metrics(calls=5, tokens_per_call=1)["energy_dropped"]
    assert "a timed window of 0.050 s is shorter than the 0.1 s the rapl counter needs" in why
    assert "min_runs" in why


def test_a_read_that_fails_mid_run_drops_the_metric(two_packages):
    root, p0, _ = two_packages
    clock = Clock()
    meter = EnergyMeter(rapl_source(root), clock=clock)
    window(meter, clock, 1.0, lambda: (p0 / "energy_uj").unlink())
    assert meter.metrics(calls=1)["energy_dropped"].startswith(f"reading {p0 / 'energy_uj'} failed")


def test_no_powercap_tree_means_no_metrics_and_the_reason(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NoCounter, match="does not exist"):
        rapl_source(missing)
    meter = meter_for("cpu", powercap_root=missing)
    with meter.window():
        pass
    assert meter.metrics(calls=5, tokens_per_call=3) == {}  # absent, not zero
    assert describe("cpu", powercap_root=missing) == {"source": None, "why": meter.why}
    assert f"no readable RAPL counter: {missing} does not exist" in meter.why


def test_a_tree_without_package_zones_says_so(tmp_path):
    root = tmp_path / "powercap"
    zone(root, "intel-rapl:0", "psys", 1)
    zone(root, "intel-rapl:0:0", "package-0", 1)  # a subzone, whatever its name
    assert describe("cpu", powercap_root=root)["why"].endswith("has no package zone (intel-rapl:N named package-N)")


def test_a_root_only_counter_names_the_file_and_the_fix(two_packages, monkeypatch):
    root, p0, _ = two_packages
    read_text = pathlib.Path.read_text

    def root_only(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", root_only)  # the tests run as root; a user may not read it
    why = describe("cpu", powercap_root=root)["why"]
    assert why.startswith(f"{p0 / 'energy_uj'}: permission denied")
    assert f"sudo chmod a+r {root}/intel-rapl:*/energy_uj" in why


def test_this_machine_records_its_counter_or_why_it_has_none():
    found = describe("cpu")
    if found["source"] is None:  # this VM: no /sys/class/powercap
        assert found["why"].startswith(("no readable RAPL counter", str(energy.POWERCAP_ROOT)))
    else:
        assert found["source"] == "rapl" and found["counters"]


# ---------------------------------------------------------------- NVML


class FakeNVML:
    """The pynvml calls the meter makes, on a counter in mJ the test sets."""

    class NVMLError(Exception):
        pass

    def __init__(self, mj=0, supported=True, uuid="GPU-1234"):
        self.mj, self.supported, self.uuid, self.inits = mj, supported, uuid, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != self.uuid:
            raise self.NVMLError("Not Found")
        return ("handle", uuid)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        assert handle == ("handle", self.uuid)
        if not self.supported:
            raise self.NVMLError("Not Supported")
        return self.mj


def test_nvml_reads_the_gpus_counter_in_millijoules():
    nvml = FakeNVML(mj=5_000)
    source = nvml_source("cuda:0", nvml, uuid="GPU-1234")
    assert (source.kind, [c.name for c in source.counters], source.min_window_s) == ("nvml", ["nvml GPU-1234"], 0.5)
    clock = Clock()
    meter = EnergyMeter(source, clock=clock)

    def run():
        nvml.mj += 150_000  # 150 J

    window(meter, clock, 0.5, run)
    window(meter, clock, 1.0, run)
    assert meter.metrics(calls=100, tokens_per_call=3) == pytest.approx(
        {"energy_j": 3.0, "energy_j_per_token": 1.0, "avg_power_w": 200.0, "energy_window_s": 1.5})


def test_nvml_windows_shorter_than_half_a_second_are_refused():
    nvml = FakeNVML()
    clock = Clock()
    meter = EnergyMeter(nvml_source("cuda:0", nvml, uuid="GPU-1234"), clock=clock)
    window(meter, clock, 0.2)
    assert "0.200 s is shorter than the 0.5 s the nvml counter needs (it updates every ~100 ms)" in \
        meter.metrics(calls=4)["energy_dropped"]


def test_an_nvml_counter_going_backwards_is_a_reset():
    nvml = FakeNVML(mj=9_000_000)
    clock = Clock()
    meter = EnergyMeter(nvml_source("cuda:0", nvml, uuid="GPU-1234"), clock=clock)

    def driver_reload():
        nvml.mj = 100

    window(meter, clock, 1.0, driver_reload)
    assert "nvml GPU-1234 went backwards (9000.000000 J, then 0.100000 J) and never wraps" in \
        meter.metrics(calls=1)["energy_dropped"]


def test_a_gpu_without_the_counter_or_without_nvml_has_no_source(monkeypatch):
    with pytest.raises(NoCounter, match="Not Supported.*Volta or newer"):
        nvml_source("cuda:0", FakeNVML(supported=False), uuid="GPU-1234")
    with pytest.raises(NoCounter, match="Not Found"):
        nvml_source("cuda:0", FakeNVML(), uuid="GPU-other")
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # not installed
    with pytest.raises(NoCounter, match=r"nvidia-ml-py is not installed \(pip install 'infermatrix\[energy\]'\)"):
        nvml_source("cuda:0", uuid="GPU-1234")


# ---------------------------------------------------------------- the timer's window


def counting_source(state: dict) -> Source:
    """A counter gaining 1 J per call of the timed fn (warm-up included, if it were read)."""
    return Source("test", (Counter("calls", lambda: float(state["calls"]), None),), min_window_s=0.0)


def test_the_window_covers_the_sampling_loop_and_not_the_warm_up():
    state = {"calls": 0}

    def fn():
        state["calls"] += 1

    meter = EnergyMeter(counting_source(state))
    m = measure(fn, device="cpu", config=TimerConfig(warmup_runs=7, min_runs=6, max_runs=6),
                around_timed=meter.window)
    assert state["calls"] == 7 + 6 and meter.windows == 1
    assert meter.joules == 6.0  # the six timed calls, none of the seven warm-up calls
    assert meter.metrics(len(m.samples_ms), tokens_per_call=2)["energy_j_per_token"] == 0.5


def test_interleaved_turns_each_get_a_window_and_the_wait_between_is_left_out():
    from infermatrix.bench import timing

    state = {"calls": 0}

    class Turns:
        def __init__(self):
            self.grants = [0.0, 0.0]

        def wait_turn(self):
            state["calls"] += 100  # the other side's calls while this one waits: not counted
            return self.grants.pop() if self.grants else None

        def end_turn(self, samples_ms):
            pass

    def fn():
        state["calls"] += 1

    meter = EnergyMeter(counting_source(state))
    timing.interleave_with(Turns())
    m = measure(fn, device="cpu", config=TimerConfig(warmup_runs=1), around_timed=meter.window)
    assert m.stopped_by == "turns" and len(m.samples_ms) == 2
    assert (meter.windows, meter.joules) == (2, 2.0)


# ---------------------------------------------------------------- A/B turns


def test_merging_turns_sums_their_joules_over_all_their_calls():
    a = {"runs": 2, "energy_j": 3.0, "energy_j_per_token": 1.0, "avg_power_w": 6.0, "energy_window_s": 1.0}
    b = {"runs": 6, "energy_j": 1.0, "energy_j_per_token": 1 / 3, "avg_power_w": 2.0, "energy_window_s": 3.0}
    assert merge_energy([a, b]) == pytest.approx(
        {"energy_j": 12 / 8, "energy_j_per_token": 12 / 24, "avg_power_w": 3.0, "energy_window_s": 4.0})
    assert merge_energy([a, {"runs": 3, "energy_dropped": "why"}]) == {"energy_dropped": "why"}
    assert merge_energy([a, {"runs": 3}]) == {"energy_dropped": "1 of 2 turns measured no energy"}
    assert merge_energy([{"runs": 3}, {"runs": 3}]) == {}


# ---------------------------------------------------------------- whole runs

QUICK = {"warmup": 1, "min_runs": 6, "max_runs": 6, "isolate": False}
TIMED = [{"model": "tiny", "variant": "sdpa", "workload": ["prefill", "decode", "generate"], "batch": 2,
          "prompt_len": 16, "new_tokens": 3},
         {"model": "tiny", "variant": "reference", "workload": "linear", "batch": 1, "prompt_len": 8}]
ENERGY_KEYS = {"energy_j", "energy_j_per_token", "avg_power_w", "energy_window_s", "energy_dropped"}


def test_a_run_on_this_machine_records_its_counters_or_why_there_are_none(tmp_path):
    record = run_matrix(parse_matrix({"run": QUICK, "cases": [TIMED[0] | {"workload": "prefill"}]}), tmp_path,
                        log=lambda line: None)[0]
    assert record.status == "ok", record.reason
    cpu = record.env["energy"]["cpu"]
    assert cpu == describe("cpu")
    if cpu["source"] is None:  # this machine (a VM without /sys/class/powercap): absent, with the reason
        assert "no readable RAPL counter" in cpu["why"] or "permission denied" in cpu["why"]
        assert not ENERGY_KEYS & set(record.metrics)
    else:
        assert {"energy_j", "energy_dropped"} & set(record.metrics)


def fifty_watts(device, **kwargs) -> Source:
    """A counter of a device drawing a steady 50 W."""
    return Source("test", (Counter("50 W", lambda: 50.0 * time.perf_counter(), None),), min_window_s=0.0)


def test_energy_per_token_uses_the_tokens_each_timed_call_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "find_source", fifty_watts)
    records = {r.case["workload"]: r for r in run_matrix(parse_matrix({"run": QUICK, "cases": TIMED}), tmp_path,
                                                           log=lambda line: None)}
    for workload, tokens in (("prefill", 2 * 16), ("decode", 2 * 3), ("generate", 2 * 3)):
        m = records[workload].metrics
        assert m["avg_power_w"] == pytest.approx(50.0, rel=0.01)  # the reads bracket the window's clock
        assert m["energy_j_per_token"] == pytest.approx(m["energy_j"] / tokens)
        # joules per call: the loop's joules over its calls; the loop lasts at least its samples
        assert m["energy_j"] * m["runs"] == pytest.approx(50.0 * m["energy_window_s"], rel=0.01)
        assert m["energy_window_s"] * 1e3 >= sum(records[workload].samples.get("latency_ms")
                                                 or records[workload].samples["generation_ms"])
    linear = records["linear"].metrics
    assert linear["energy_j"] > 0 and "energy_j_per_token" not in linear  # an op processes no tokens
    frame = pd.read_csv(tmp_path / "results.csv")
    assert {"energy_j", "energy_j_per_token", "avg_power_w", "energy_window_s"} <= set(frame.columns)


def test_a_run_too_short_for_the_counter_records_why_it_has_no_energy(tmp_path, monkeypatch):
    monkeypatch.setattr(energy, "find_source",
                        lambda device, **kw: Source("nvml", fifty_watts(device).counters, min_window_s=60.0))
    record = run_matrix(parse_matrix({"run": QUICK, "cases": [TIMED[1]]}), tmp_path, log=lambda line: None)[0]
    assert record.status == "ok" and not {"energy_j", "avg_power_w"} & set(record.metrics)
    assert "is shorter than the 60 s the nvml counter needs" in record.metrics["energy_dropped"]
    assert "is shorter than" in pd.read_csv(tmp_path / "results.csv")["energy_dropped"][0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_gpus_counter_gives_a_plausible_power():
    pytest.importorskip("pynvml", reason="needs nvidia-ml-py (pip install 'infermatrix[energy]')")
    meter = meter_for("cuda:0")
    if meter.source is None:
        pytest.skip(meter.why)
    x = torch.randn(4096, 4096, device="cuda")
    with meter.window():  # one second of matmuls: twice NVML's minimum window
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            x @ x
            torch.cuda.synchronize()
    metrics = meter.metrics(calls=1)
    assert 20 < metrics["avg_power_w"] < 2000, metrics


def test_an_op_timed_with_an_l2_flush_per_call_drops_its_energy(monkeypatch):
    """On CUDA with l2_flush the counter's window holds a 256 MiB flush before every op
    call, far longer than the op: such an op's joules are dropped, with the reason."""
    from infermatrix.bench import workloads
    from infermatrix.bench.runner import RunContext
    from infermatrix.bench.timing import TimerResult
    from infermatrix.bench.matrix import Case, RunSettings

    state = {"calls": 0}
    monkeypatch.setattr(energy, "meter_for", lambda device: EnergyMeter(counting_source(state)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: None)

    def fake_measure(fn, *, device, config, fn_returns_ms, around_timed):
        with around_timed():
            for _ in range(4):
                state["calls"] += 1
        return TimerResult(samples_ms=[1.0] * 4, warmup_runs=0, stopped_by="max_runs", summary=None)

    monkeypatch.setattr(workloads, "measure", fake_measure)
    case = Case(model="tiny", variant="sdpa", workload="attention", device="cuda")
    for flush, tokens in ((True, None), (False, None), (True, 8)):
        ctx = RunContext(RunSettings(l2_flush=flush), {}, None, {}, {})
        _, metrics = workloads.measure_for_case(lambda: None, case, ctx, tokens_per_call=tokens)
        dropped = flush and tokens is None
        assert ("energy_j" in metrics) is not dropped
        assert ("L2 flush" in metrics.get("energy_dropped", "")) is dropped
