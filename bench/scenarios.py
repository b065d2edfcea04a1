"""The three MLPerf-style scenarios, timed the way trtexec times a GPU and LoadGen a query.

* single: one node per query, the next after the previous completes (SingleStream).
* study: a scan's nodes in one query, host arrays in and out, copies included.
* offline: throughput at each batch size of a sweep; on a GPU, queries are enqueued ahead.

Warm-up queries (at least a count and a time) are excluded and counted; a step runs until both a
minimum duration and a minimum query count are reached. Inputs rotate among several batches drawn
from the calibration split, so a cache holding the last input is not what gets measured. Several
backends can share a step in alternating slices (`run_interleaved`), so their ratios are same-time ones.
"""

from __future__ import annotations

import contextlib
import itertools
import math
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
    interleaved: bool = False
    """Backends measured side by side, step by step, in alternating slices (`run_interleaved`)."""
    rounds: int = 8
    """Interleaved: the slices each backend's share of a step is cut into."""


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

        from m2anet.engines.torch_backend import PinnedBuffers

        self.torch, self.backend = torch, backend
        dev = torch.device(backend.device)
        self.dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        self.host = [(torch.from_numpy(c).pin_memory(), torch.from_numpy(m).pin_memory()) for c, m in batches]
        self.dev_in = [(c.to(self.dev), m.to(self.dev)) for c, m in self.host]
        self.host_out = PinnedBuffers()
        self.events: list[list[Any]] = []

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
                for j, o in enumerate(outs):
                    self.host_out.view(str(j), o.shape).copy_(o, non_blocking=True)
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


class Measurement:
    """One runner's measured queries of one step: in one go, or in slices between other runners' (an
    interleaved run). Its wall time is the sum of its own slices."""

    def __init__(self, runner: Runner, settings: Settings, min_queries: int, ahead: int) -> None:
        self.runner, self.settings, self.min_queries, self.ahead = runner, settings, min_queries, ahead
        self.latencies: list[int] = []
        self.split: list[tuple[float, float, float]] = []
        self.wall_ns = self.slices = 0

    def done(self, running_ns: int = 0) -> bool:
        """Both the duration and the query count reached (counting a slice still running)."""
        enough = self.wall_ns + running_ns >= self.settings.duration_s * 1e9
        return enough and len(self.latencies) >= self.min_queries

    def advance(self, seconds: float) -> None:
        """Queries until `seconds` have passed or the measurement is done; at least one call."""
        start = time.perf_counter_ns()
        while True:
            lat, dev = self.runner.run(len(self.latencies), self.ahead)
            self.latencies += lat
            self.split += dev or []
            elapsed = time.perf_counter_ns() - start
            if elapsed >= seconds * 1e9 or self.done(elapsed):
                break
        self.wall_ns += elapsed
        self.slices += 1

    def step(self) -> dict[str, Any]:
        step: dict[str, Any] = {
            "queries": len(self.latencies),
            "wall_s": self.wall_ns / 1e9,
            "slices": self.slices,
            "timer": self.runner.timer,
            "enqueued_ahead": self.ahead > 1,
            "queue_depth": self.ahead,
            "latency_source": "wall clock" if self.ahead == 1 else "cuda events",
            "samples_ns": self.latencies,
            "latency_ms": summarize(self.latencies, 1e-6),
            "device_ms": None,
            "device_samples_ms": None,
        }
        if self.split:
            parts = dict(zip(("h2d", "compute", "d2h"), zip(*self.split, strict=True), strict=True))
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


class StepRun:
    """One backend through one step: warmed up when made, then measured in slices, each under NVML
    telemetry on a GPU, with the peak of torch's allocator when the backend runs alone."""

    def __init__(
        self, backend: Backend, scenario: str, batch: int, settings: Settings, inputs: Inputs, alone: bool
    ) -> None:
        self.scenario, self.batch = scenario, batch
        runner = make_runner(backend, inputs.batches(batch, settings.rotate))
        offline = scenario == "offline"
        min_queries = settings.offline_min_queries if offline else settings.min_queries
        ahead = settings.offline_depth if offline and isinstance(runner, CudaRunner) else 1
        self.warm, self.warm_s = warm_up(runner, settings)
        self.measurement = Measurement(runner, settings, min_queries, ahead)
        self.telemetry = Telemetry(backend.device) if is_cuda(backend) else None
        # torch's allocator holds the buffers of the torch and TensorRT runners, not ONNX Runtime's; with
        # other backends open beside this one it holds theirs too, and its peak is not this backend's
        self.gpu = runner.dev if alone and isinstance(runner, CudaRunner) else None
        self.peak_mib: float | None = None

    def slice(self, seconds: float) -> None:
        import torch

        if self.gpu is not None:
            torch.cuda.reset_peak_memory_stats(self.gpu)
        with self.telemetry or contextlib.nullcontext():
            self.measurement.advance(seconds)
        if self.gpu is not None:
            self.peak_mib = max(self.peak_mib or 0.0, torch.cuda.max_memory_allocated(self.gpu) / 2**20)

    def result(self) -> dict[str, Any]:
        step = self.measurement.step()
        nodes = step["queries"] * self.batch
        step.update(
            telemetry=None if self.telemetry is None else self.telemetry.summary(nodes),
            torch_peak_memory_mib=self.peak_mib,
            scenario=self.scenario,
            batch=self.batch,
            warmup_queries=self.warm,
            warmup_s=self.warm_s,
            nodes=nodes,
            ms_per_node=step["wall_s"] * 1e3 / nodes,
            nodes_per_s=nodes / step["wall_s"],
        )
        return step


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
    results = [] if results is None else results
    for scenario, batch in plan(scenarios, settings):
        run = StepRun(backend, scenario, batch, settings, inputs, alone=True)
        run.slice(math.inf)
        results.append(run.result())
        if on_step is not None:
            on_step(scenario, batch)
    return results


def run_interleaved(
    backends: dict[int, Backend], scenario: str, batch: int, settings: Settings, inputs: Inputs
) -> tuple[dict[int, dict[str, Any]], dict[int, Exception]]:
    """One step on several open backends in rounds: each warms up, then every round gives each backend a
    slice of `duration / rounds` seconds (at least one call), in order in even rounds and in reverse in
    odd ones, until each is done. A machine that slows down for a while slows all of them alike, so their
    ratios hold where back-to-back runs drift (an H200's IEEE FP32 single node measured 3.7 to 7.4 ms in
    separate runs). The steps of the backends that ran, and the error of each that failed."""
    runs: dict[int, StepRun] = {}
    failed: dict[int, Exception] = {}
    for key, backend in backends.items():
        try:
            runs[key] = StepRun(backend, scenario, batch, settings, inputs, alone=len(backends) == 1)
        except Exception as e:  # one backend that cannot run this step must not cost the others theirs
            failed[key] = e
    share = settings.duration_s / settings.rounds
    for r in itertools.count():
        active = [key for key, run in runs.items() if not run.measurement.done()]
        if not active:
            break
        for key in active if r % 2 == 0 else active[::-1]:
            try:
                runs[key].slice(share)
            except Exception as e:
                failed[key] = e
                del runs[key]
    return {key: run.result() for key, run in runs.items()}, failed
