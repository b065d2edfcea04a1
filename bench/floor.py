"""The arithmetic floor: the shortest time per node this device could physically reach.

FLOPs per node over the device's matrix-product peak, and the bytes a node must move over its
copy bandwidth; the larger of the two is the floor. Both rates are measured in this process, with
its threads and clocks, rather than read from a datasheet, so "% of floor" says how much of what
this machine actually delivers a backend uses. The floor counts only compulsory traffic (inputs,
outputs and weights once per batch), so it is a bound no backend can beat, not a target.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from m2anet.contract import PATCH_SHAPE
from m2anet.engines.environment import cpu_flags
from m2anet.engines.torch_backend import cuda_math

COMPUTE_TYPES = {
    "fp32": ("fp32",),
    "tf32": ("fp32", "tf32"),
    "fp16": ("fp32", "tf32", "fp16"),
    "bf16": ("fp32", "tf32", "bf16"),
    "int8": ("fp32", "tf32", "fp16", "bf16", "int8"),
}
"""Matrix-product types a backend of each precision may use: its floor takes the fastest of them. FP32 is
IEEE FP32 on every backend (TF32 is off in PyTorch's fp32, TensorRT builds and ONNX Runtime's CUDA provider;
an FP32 graph on ONNX Runtime's TensorRT provider is reported as tf32), so FP32's floor is FP32's own."""

WEIGHT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "int8": 1}
IO_BYTES_PER_NODE = 4 * (3 * PATCH_SHAPE[0] * PATCH_SHAPE[1] * PATCH_SHAPE[2] + 1)
"""float32 ct + mask in, seg_logit + met_logit out: the Backend contract keeps I/O in float32."""

DEFAULT_SIZE = {"cpu": (2048, 256 << 20), "cuda": (8192, 1 << 30)}
"""(matrix size, copy bytes) large enough to leave the caches: 256 MiB on the CPU, 1 GiB on a GPU."""

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}
_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass
class Peaks:
    """Measured rates of one device: matrix-product ops/s per compute type and copy bytes/s."""

    device: str
    flops: dict[str, float]
    bandwidth: float
    matmul_size: int
    copy_bytes: int
    skipped: dict[str, str] = field(default_factory=dict)
    measurements: int = 1

    def best_flops(self, precision: str) -> float:
        usable = [self.flops[t] for t in COMPUTE_TYPES.get(precision, ("fp32",)) if t in self.flops]
        return max(usable)

    def fastest(self, again: Peaks) -> Peaks:
        """Each rate at the faster of two measurements of the same device. A shared host can run at half
        speed while one measurement runs (the project's CPU machine measured 76 and then 137 GFLOP/s
        FP32 minutes apart), and a backend then beats its "floor"; the best the device delivered during
        the run is its peak."""
        return replace(
            self,
            flops={k: max(v, again.flops.get(k, 0.0)) for k, v in self.flops.items()},
            bandwidth=max(self.bandwidth, again.bandwidth),
            measurements=self.measurements + again.measurements,
        )


def node_bytes(batch: int, params: float, precision: str) -> float:
    """Compulsory bytes per node: its I/O plus its share of one read of the weights."""
    return IO_BYTES_PER_NODE + params * WEIGHT_BYTES.get(precision, 4) / batch


def floor_seconds(flops_per_node: float, bytes_per_node: float, peak_flops: float, bandwidth: float) -> float:
    return max(flops_per_node / peak_flops, bytes_per_node / bandwidth)


def percent_of_floor(floor_s: float, measured_s: float) -> float:
    """100 means the run reached the floor; 25 means it took four times the floor."""
    return 100.0 * floor_s / measured_s


def compute_types(device: str) -> list[str]:
    """The types the device runs natively: a CPU without FP16 units runs torch's FP16 matmul
    hundreds of times slower than FP32, which would say nothing about the hardware."""
    if device == "cpu":
        flags = cpu_flags()
        types = ["fp32", *(t for t, names in _CPU_FLAGS.items() if flags & set(names))]
        return [*types, "int8"] if flags & set(_INT8_FLAGS) else types
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return ["fp32", "fp16", "int8"] if (major, minor) < (8, 0) else ["fp32", "tf32", "fp16", "bf16", "int8"]


def _no_sync() -> None:
    """The CPU computes synchronously."""


def _best_seconds(fn: Callable[[], object], sync: Callable[[], None], min_time_s: float) -> float:
    """Fastest of repeated calls after one warm-up: the peak, not the average under interference."""
    fn()
    sync()
    best, start, runs = float("inf"), time.perf_counter(), 0
    while runs < 3 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def _matmul(device: torch.device, kind: str, n: int, sync: Callable[[], None], min_time_s: float) -> float:
    if kind == "int8":
        a = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-100, 100, (n, n), dtype=torch.int8, device=device)
        seconds = _best_seconds(lambda: torch._int_mm(a, b), sync, min_time_s)
        return 2.0 * n**3 / seconds
    a = torch.randn(n, n, device=device).to(_DTYPES[kind])
    b = torch.randn(n, n, device=device).to(_DTYPES[kind])
    with cuda_math(tf32=kind == "tf32") if device.type == "cuda" else contextlib.nullcontext():
        seconds = _best_seconds(lambda: torch.mm(a, b), sync, min_time_s)
    return 2.0 * n**3 / seconds


def measure(
    device: str, matmul_size: int | None = None, copy_bytes: int | None = None, min_time_s: float = 0.3
) -> Peaks:
    """Measure the peaks of `device` ("cpu", "cuda" or "cuda:N") with torch's current thread count."""
    dev = torch.device(device)
    default_n, default_bytes = DEFAULT_SIZE[dev.type]
    n, nbytes = matmul_size or default_n, copy_bytes or default_bytes
    sync = functools.partial(torch.cuda.synchronize, dev) if dev.type == "cuda" else _no_sync
    flops: dict[str, float] = {}
    skipped: dict[str, str] = {}
    for kind in compute_types(device):
        try:
            flops[kind] = _matmul(dev, kind, n, sync, min_time_s)
        except RuntimeError as e:  # e.g. an int8 product this build or GPU does not offer
            skipped[kind] = str(e).splitlines()[0]
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), sync, min_time_s)
    return Peaks(str(dev), flops, 2.0 * nbytes / seconds, n, nbytes, skipped)
