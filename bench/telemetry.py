"""NVML telemetry sampled during a GPU run: power, energy, memory, clocks, temperature, throttling.

A run on a GPU that throttled measured its cooling or power cap, not the backend, so the report
flags it. Without NVML (no driver, a CPU-only machine) the benchmark still runs: one line on
stderr says what is missing, with no traceback.
"""

from __future__ import annotations

import functools
import itertools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pynvml

from m2anet.engines.environment import nvml_missing_reason

THROTTLE = {
    "sw_power_cap": pynvml.nvmlClocksThrottleReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksThrottleReasonHwSlowdown,
    "sw_thermal_slowdown": pynvml.nvmlClocksThrottleReasonSwThermalSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksThrottleReasonHwThermalSlowdown,
    "hw_power_brake_slowdown": pynvml.nvmlClocksThrottleReasonHwPowerBrakeSlowdown,
}
"""Reasons that lower clocks below what the workload asked for: a run that saw one is flagged."""

BENIGN = {
    "gpu_idle": pynvml.nvmlClocksThrottleReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksThrottleReasonApplicationsClocksSetting,
    "sync_boost": pynvml.nvmlClocksThrottleReasonSyncBoost,
    "display_clock_setting": pynvml.nvmlClocksThrottleReasonDisplayClockSetting,
}

# renamed "clocks event reasons" in newer NVML; the old names remain as aliases there
_REASONS = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
    pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
)


@functools.cache
def say_nvml_missing(reason: str) -> None:
    """One line on stderr per process, however many runs start without NVML."""
    print(
        f"m2a-bench: NVML unavailable ({reason}): no power, energy, clock or throttle telemetry",
        file=sys.stderr,
    )


def _handle(device: str) -> Any:
    """NVML's handle of a torch CUDA device, matched by PCI address: with CUDA_VISIBLE_DEVICES set,
    torch's index and NVML's differ."""
    import torch

    dev = torch.device(device)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    props = torch.cuda.get_device_properties(index)
    try:
        # written as NVML writes it: domain:bus:device.function in upper-case hex
        # (torch's stubs omit the pci_* fields, which its CUDA device properties have at runtime)
        pci = props.pci_domain_id, props.pci_bus_id, props.pci_device_id  # type: ignore[attr-defined]
        bus = f"{pci[0]:08X}:{pci[1]:02X}:{pci[2]:02X}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus)
    except (AttributeError, pynvml.NVMLError):
        return pynvml.nvmlDeviceGetHandleByIndex(index)


def _read(fn: Callable[..., Any], *args: Any) -> Any:
    """A field this GPU does not report (NVML_ERROR_NOT_SUPPORTED) is left out, not fatal."""
    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


@dataclass(frozen=True)
class Sample:
    t: float
    power_w: float | None
    memory_used: int | None
    sm_mhz: int | None
    mem_mhz: int | None
    temperature_c: int | None
    reasons: int | None


def _sample(h: Any) -> Sample:
    power = _read(pynvml.nvmlDeviceGetPowerUsage, h)
    memory = _read(pynvml.nvmlDeviceGetMemoryInfo, h)
    return Sample(
        t=time.perf_counter(),
        power_w=None if power is None else power / 1000.0,
        memory_used=None if memory is None else int(memory.used),
        sm_mhz=_read(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_SM),
        mem_mhz=_read(pynvml.nvmlDeviceGetClockInfo, h, pynvml.NVML_CLOCK_MEM),
        temperature_c=_read(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU),
        reasons=_read(_REASONS, h),
    )


def _span(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def summarize(
    spans: list[list[Sample]], seconds: float, energy_mj: float | None, nodes: int
) -> dict[str, Any]:
    """Summary of one run, sampled in one span or in several (an interleaved run's slices); energy from
    NVML's counter when the GPU has one, else power integrated within each span, never across the gap
    between two."""
    samples = [s for span in spans for s in span]
    power = [(s.t, s.power_w) for s in samples if s.power_w is not None]
    source = "counter"
    energy = None if energy_mj is None else energy_mj / 1000.0
    if energy is None and power:
        source = "power samples"
        within = [[(s.t, s.power_w) for s in span if s.power_w is not None] for span in spans]
        pairs = [(t1 - t0) * (p0 + p1) / 2 for w in within for (t0, p0), (t1, p1) in itertools.pairwise(w)]
        energy = sum(pairs) if pairs else power[0][1] * seconds
    mask = 0
    for s in samples:
        mask |= s.reasons or 0
    memory = [s.memory_used for s in samples if s.memory_used is not None]
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    throttled = sorted(name for name, bit in THROTTLE.items() if mask & bit)
    return {
        "available": True,
        "samples": len(samples),
        "seconds": seconds,
        "power_w": _span([p for _, p in power]),
        "energy_j": energy,
        "energy_source": source if energy is not None else None,
        "joules_per_node": None if energy is None or nodes == 0 else energy / nodes,
        "memory_used_mib_peak": max(memory) / 2**20 if memory else None,
        "sm_clock_mhz": _span([float(s.sm_mhz) for s in samples if s.sm_mhz is not None]),
        "mem_clock_mhz": _span([float(s.mem_mhz) for s in samples if s.mem_mhz is not None]),
        "temperature_c_max": max(temps) if temps else None,
        "clock_reasons": sorted(name for name, bit in {**THROTTLE, **BENIGN}.items() if mask & bit),
        "throttled": bool(throttled),
        "throttle_reasons": throttled,
    }


class Telemetry:
    """Samples one GPU on a thread between __enter__ and __exit__; `summary(nodes)` afterwards. Entered
    again, it adds a span: an interleaved run samples each backend only during its own slices.

    On a machine without NVML it samples nothing and `summary` says why, so callers need no branch.
    """

    def __init__(self, device: str = "cuda", interval_s: float = 0.05) -> None:
        self.device, self.interval_s = device, interval_s
        self.reason = nvml_missing_reason()
        if self.reason:
            say_nvml_missing(self.reason)
        self._spans: list[list[Sample]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._h: Any = None
        self._energy0: int | None = None
        self._energy_mj: float | None = 0.0
        self._t0 = self._seconds = 0.0

    def __enter__(self) -> Telemetry:
        if self.reason is not None:
            return self
        self._h = _handle(self.device)
        self._energy0 = _read(pynvml.nvmlDeviceGetTotalEnergyConsumption, self._h)
        self._t0 = time.perf_counter()
        self._spans.append([_sample(self._h)])
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(self._spans[-1],), name="m2a-bench-nvml", daemon=True
        )
        self._thread.start()
        return self

    def _loop(self, span: list[Sample]) -> None:
        while not self._stop.wait(self.interval_s):
            span.append(_sample(self._h))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._spans[-1].append(_sample(self._h))
        self._seconds += time.perf_counter() - self._t0
        energy1 = _read(pynvml.nvmlDeviceGetTotalEnergyConsumption, self._h)
        if self._energy0 is None or energy1 is None or self._energy_mj is None:
            self._energy_mj = None  # one span without the counter: integrate power over all of them
        else:
            self._energy_mj += float(energy1 - self._energy0)

    def summary(self, nodes: int) -> dict[str, Any]:
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        energy = self._energy_mj if self._spans else None
        return summarize(self._spans, self._seconds, energy, nodes)
