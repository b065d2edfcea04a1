"""Build a TensorRT engine (plan) from an already-typed M2ANet ONNX file.

Precision lives in the ONNX graph (FP32, FP16 inside, or explicit INT8 Q/DQ), never in builder
flags: TensorRT 11 removed the weak-typing flags (FP16, INT8, ...) and always builds strongly
typed networks, so building strongly typed on 10.x too gives the same engine semantics on both.
The one precision flag left, TF32, is on by default in both and lets FP32 convolutions and matrix
products round their inputs to 10-bit mantissas: it is cleared, so FP32 in the graph (all of the fp32
graph, the FP32 islands of the others) is IEEE FP32, as the fp32 parity tier needs.

`tensorrt` is imported on first use, so this module (and everything that imports it) loads on
machines without TensorRT or a GPU; `tensorrt_missing_reason()` says why it cannot run.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from m2anet.contract import PATCH_SHAPE
from m2anet.engines.base import INPUT_NAMES
from m2anet.engines.environment import gpu_facts, tensorrt_missing_reason
from m2anet.engines.trt_backend import trt_logger, trt_major
from m2anet.io import atomic_path
from m2anet.optional import lazy_import

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = lazy_import("tensorrt", "pip install 'm2anet[gpu]'")

log = logging.getLogger(__name__)


def _network_flags() -> int:
    """STRONGLY_TYPED on 10.x; on 11.x every network is strongly typed and the flag is deprecated."""

    if trt_major(trt.__version__) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _progress_monitor() -> trt.IProgressMonitor:
    """A tqdm bar per top-level build phase; TensorRT calls it from several threads, hence the lock."""

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
    reason = tensorrt_missing_reason()
    if reason is not None:
        raise RuntimeError(f"cannot build {plan_path.name}: {reason}")

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
    config.clear_flag(trt.BuilderFlag.TF32)
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
