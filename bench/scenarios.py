"""The three MLPerf-style scenarios, timed the way trtexec times a GPU and LoadGen a query.

* single: one node per query, the next after the previous completes (SingleStream).
* study: a scan's nodes in one query, host arrays in and out, copies included.
* offline: throughput at each batch size of a sweep; on a GPU, queries are enqueued ahead.

Warm-up queries (at least a count and a time) are excluded and counted; a step runs until both a
minimum duration and a minimum query count are reached. Inputs rotate among several batches drawn
from the calibration split, so a cache holding the last input is not what gets measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from m2anet.bench.stats import summarize
from m2anet.bench.telemetry import Telemetry
from m2anet.data import load_split
from m2anet.engines import Backend

SCENARIOS = ("single", "study", "offline")


@dataclass(frozen=True)
class Settings:
    duration_s: float = 5.0
    min_queries: int = 10
    warmup_s: float = 1.0
    warmup_queries: int = 2
    study_nodes: int = 24
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    rotate: int = 4
    pool: int = 16
    offline_min_queries: int = 3
    """An offline point is a throughput, not a tail: a few large batches over the duration suffice."""
    offline_depth: int = 4
    """Queries a GPU runner enqueues before it waits, so launch gaps do not count against throughput."""


class Inputs:
    """Realistic patches (calibration split, never the test split), re-drawn into rotating batches."""

    def __init__(self, pool: int = 16) -> None:
        cohort = load_split("calib", n=pool)
        self.ct, self.mask = cohort.ct, cohort.mask

    def batches(self, batch: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(batch)
        picks = rng.integers(0, len(self.ct), (count, batch))
        return [(self.ct[p], self.mask[p]) for p in picks]  # fancy indexing: each batch its own memory


def is_cuda(backend: Backend) -> bool:
    return backend.device.startswith("cuda")


class Runner(Protocol):
    timer: str

    def run(self, start: int, n: int) -> tuple[list[int], list[tuple[float, float, float]] | None]:
        """Run queries start..start+n-1; their latencies in ns and, if timed, (h2d, compute, d2h) ms."""
        ...


class HostRunner:
    """numpy in and out through `Backend.infer`, the public path; timed by the host clock.

    A GPU backend without `infer_torch` (ONNX Runtime) returns host arrays, so its time includes
    the copies but cannot be split."""

    timer = "perf_counter_ns"

    def __init__(self, backend: Backend, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        self.backend, self.batches = backend, batches

    def run(self, start: int, n: int) -> tuple[list[int], None]:
        out = []
        for k in range(start, start + n):
            ct, mask = self.batches[k % len(self.batches)]
            t0 = time.perf_counter_ns()
            self.backend.infer(ct, mask, check=False)
            out.append(time.perf_counter_ns() - t0)
        return out, None


class CudaRunner:
    """Pinned host batches through `infer_torch`, with CUDA events around the host-to-device copy,
    the compute and the device-to-host copy, as trtexec splits them.

    With n == 1 the query is synchronous and its latency is the host's wall time; with n > 1 the
    queries are enqueued ahead and each latency is its event span on the stream."""

    timer = "cuda_events"

    def __init__(self, backend: Any, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
        import torch

        self.torch, self.backend = torch, backend
        dev = torch.device(backend.device)
        self.dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        self.host = [(torch.from_numpy(c).pin_memory(), torch.from_numpy(m).pin_memory()) for c, m in batches]
        self.dev_in = [(c.to(self.dev), m.to(self.dev)) for c, m in self.host]
        self.host_out: dict[tuple[int, ...], Any] = {}
        self.events: list[list[Any]] = []

    def _pinned(self, shape: tuple[int, ...]) -> Any:
        if shape not in self.host_out:
            self.host_out[shape] = self.torch.empty(shape, dtype=self.torch.float32, pin_memory=True)
        return self.host_out[shape]

    def run(self, start: int, n: int) -> tuple[list[int], list[tuple[float, float, float]]]:
        torch = self.torch
        while len(self.events) < n:
            self.events.append([torch.cuda.Event(enable_timing=True) for _ in range(4)])
        with torch.cuda.device(self.dev):
            t0 = time.perf_counter_ns()
            for k in range(n):
                i = (start + k) % len(self.host)
                ev = self.events[k]
                ev[0].record()
                for dst, src in zip(self.dev_in[i], self.host[i], strict=True):
                    dst.copy_(src, non_blocking=True)
                ev[1].record()
                outs = self.backend.infer_torch(*self.dev_in[i])
                ev[2].record()
                for o in outs:
                    self._pinned(tuple(o.shape)).copy_(o, non_blocking=True)
                ev[3].record()
            torch.cuda.synchronize(self.dev)
            wall = time.perf_counter_ns() - t0
        split = [
            (e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2]), e[2].elapsed_time(e[3]))
            for e in self.events[:n]
        ]
        latencies = [wall] if n == 1 else [round(sum(s) * 1e6) for s in split]
        return latencies, split


def make_runner(backend: Backend, batches: list[tuple[np.ndarray, np.ndarray]]) -> Runner:
    if is_cuda(backend) and hasattr(backend, "infer_torch"):
        return CudaRunner(backend, batches)
    return HostRunner(backend, batches)


def warm_up(runner: Runner, settings: Settings) -> tuple[int, float]:
    """At least `warmup_queries` and `warmup_s`: compilation, autotuning and graph capture end here."""
    count, t0 = 0, time.perf_counter()
    while count < settings.warmup_queries or time.perf_counter() - t0 < settings.warmup_s:
        runner.run(count, 1)
        count += 1
    return count, time.perf_counter() - t0


def measure(runner: Runner, settings: Settings, min_queries: int, ahead: int) -> dict[str, Any]:
    """Run until both the duration and the query count are reached; every latency is kept."""
    latencies: list[int] = []
    split: list[tuple[float, float, float]] = []
    start = time.perf_counter_ns()
    while True:
        lat, dev = runner.run(len(latencies), ahead)
        latencies += lat
        split += dev or []
        wall = time.perf_counter_ns() - start
        if len(latencies) >= min_queries and wall >= settings.duration_s * 1e9:
            break
    step: dict[str, Any] = {
        "queries": len(latencies),
        "wall_s": wall / 1e9,
        "timer": runner.timer,
        "enqueued_ahead": ahead > 1,
        "queue_depth": ahead,
        "latency_source": "wall clock" if ahead == 1 else "cuda events",
        "samples_ns": latencies,
        "latency_ms": summarize(latencies, 1e-6),
        "device_ms": None,
        "device_samples_ms": None,
    }
    if split:
        parts = dict(zip(("h2d", "compute", "d2h"), zip(*split, strict=True), strict=True))
        step["device_ms"] = {k: summarize(v) for k, v in parts.items()}
        step["device_samples_ms"] = {k: list(v) for k, v in parts.items()}
    return step


def plan(scenarios: tuple[str, ...], settings: Settings) -> list[tuple[str, int]]:
    """(scenario, batch) steps in run order."""
    steps: list[tuple[str, int]] = []
    for s in scenarios:
        if s == "single":
            steps.append((s, 1))
        elif s == "study":
            steps.append((s, settings.study_nodes))
        else:
            steps += [(s, b) for b in settings.batches]
    return steps


def run_backend(
    backend: Backend,
    scenarios: tuple[str, ...],
    settings: Settings,
    inputs: Inputs,
    on_step: Callable[[str, int], None] | None = None,
    results: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every step of `scenarios` on one open backend; GPU steps carry NVML telemetry. Each finished
    step is appended to `results` (a new list by default) at once, so a caller interrupted mid-way
    keeps the steps that finished."""
    cuda = is_cuda(backend)
    results = [] if results is None else results
    for scenario, batch in plan(scenarios, settings):
        runner = make_runner(backend, inputs.batches(batch, settings.rotate))
        offline = scenario == "offline"
        min_queries = settings.offline_min_queries if offline else settings.min_queries
        ahead = settings.offline_depth if offline and isinstance(runner, CudaRunner) else 1
        warm, warm_s = warm_up(runner, settings)
        if cuda:
            import torch

            # torch's allocator holds the buffers of the torch and TensorRT runners, not ONNX Runtime's
            gpu = runner.dev if isinstance(runner, CudaRunner) else None
            if gpu is not None:
                torch.cuda.reset_peak_memory_stats(gpu)
            with Telemetry(backend.device if backend.device.startswith("cuda") else "cuda") as tel:
                step = measure(runner, settings, min_queries, ahead)
            step["telemetry"] = tel.summary(step["queries"] * batch)
            peak = None if gpu is None else torch.cuda.max_memory_allocated(gpu) / 2**20
        else:
            step = measure(runner, settings, min_queries, ahead)
            step["telemetry"] = peak = None
        step["torch_peak_memory_mib"] = peak
        nodes = step["queries"] * batch
        step.update(
            scenario=scenario,
            batch=batch,
            warmup_queries=warm,
            warmup_s=warm_s,
            nodes=nodes,
            ms_per_node=step["wall_s"] * 1e3 / nodes,
            nodes_per_s=nodes / step["wall_s"],
        )
        results.append(step)
        if on_step is not None:
            on_step(scenario, batch)
    return results
