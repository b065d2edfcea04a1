"""Build a TensorRT engine (plan) from an already-typed M2ANet ONNX file.

Precision lives in the ONNX graph (FP32, FP16 inside, or explicit INT8 Q/DQ), never in builder
flags: TensorRT 11 removed the weak-typing flags (FP16, INT8, ...) and always builds strongly
typed networks, so building strongly typed on 10.x too gives the same engine semantics on both.

`tensorrt` is imported inside the functions, so this module (and everything that imports it)
loads on machines without TensorRT or a GPU; `tensorrt_unavailable()` says why it cannot run.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m2anet.engines.base import INPUT_NAMES
from m2anet.io import atomic_path
from m2anet.model import PATCH_SHAPE

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


def tensorrt_unavailable() -> str | None:
    """None when TensorRT can build and run here, otherwise a one-line reason (for skips and errors)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'm2anet[gpu]')"
    except Exception as e:  # a placeholder package or missing CUDA libraries fail with other errors
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        return f"tensorrt failed to import ({type(e).__name__}: {first}): reinstall 'm2anet[gpu]'"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def trt_major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def trt_logger() -> trt.ILogger:
    """One logger per process: TensorRT warns when builders and runtimes get different loggers."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def gpu_facts(device: int | None = None) -> dict[str, str]:
    """The GPU facts an engine is tied to, as the manifest records and the runtime checks them."""
    import torch

    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": _driver_version(),
        "cuda_runtime": str(torch.version.cuda),
    }


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception as e:  # NVML missing (containers without the driver's NVML) must not fail a build
        return f"unknown ({type(e).__name__})"
    return version.decode() if isinstance(version, bytes) else str(version)


def _network_flags() -> int:
    """STRONGLY_TYPED on 10.x; on 11.x every network is strongly typed and the flag is deprecated."""
    import tensorrt as trt

    if trt_major(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _progress_monitor() -> trt.IProgressMonitor:
    """A tqdm bar per top-level build phase; TensorRT calls it from several threads, hence the lock."""
    import tensorrt as trt
    from tqdm import tqdm

    class _Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)  # pybind trampolines need the explicit base __init__
            self._lock = threading.Lock()
            self._bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                with self._lock:
                    self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                if phase_name in self._bars:
                    self._bars[phase_name].update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Progress()


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    *,
    batch: tuple[int, int, int],
    timing_cache: Path,
    opt_level: int = 3,
    version_compatible: bool = False,
    hardware_compatible: bool = False,
    workspace_gib: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Build `plan_path` from `onnx_path` with one (min, opt, max) batch profile; return manifest facts.

    The timing cache is read from and written back to `timing_cache` so rebuilds (other precisions,
    other batch profiles) reuse the kernel timings instead of re-measuring them.
    """
    onnx_path, plan_path, timing_cache = Path(onnx_path), Path(plan_path), Path(timing_cache)
    bmin, bopt, bmax = batch
    if not 1 <= bmin <= bopt <= bmax:
        raise ValueError(f"batch profile {batch} is not 1 <= min <= opt <= max: pass e.g. (1, 32, 256)")
    if not 0 <= opt_level <= 5:
        raise ValueError(f"opt_level {opt_level} is outside 0..5: TensorRT's default is 3")
    reason = tensorrt_unavailable()
    if reason is not None:
        raise RuntimeError(f"cannot build {plan_path.name}: {reason}")
    import tensorrt as trt

    start = time.perf_counter()
    logger = trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {' '.join(errors.split())}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(INPUT_NAMES):
        raise ValueError(f"{onnx_path} has inputs {sorted(inputs)}, expected ct and mask: re-export the ONNX")

    profile = builder.create_optimization_profile()
    shapes = [trt.Dims([b, 1, *PATCH_SHAPE]) for b in batch]
    for name in INPUT_NAMES:
        profile.set_shape(name, shapes[0], shapes[1], shapes[2])

    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.builder_optimization_level = opt_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    monitor = _progress_monitor() if progress else None  # must outlive the build: keep the reference
    if monitor is not None:
        config.progress_monitor = monitor

    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another GPU or TensorRT version: start afresh rather than trust foreign timings
        log.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", timing_cache)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path.name} (see the TensorRT log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(memoryview(plan))
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))

    return {
        "version": trt.__version__,
        **gpu_facts(),
        "batch": list(batch),
        "opt_level": opt_level,
        "version_compatible": version_compatible,
        "hardware_compatible": hardware_compatible,
        "workspace_gib": workspace_gib,
        "build_s": round(time.perf_counter() - start, 1),
    }
