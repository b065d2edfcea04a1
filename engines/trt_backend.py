"""TensorRT runtime for a plan built by `m2anet.export.tensorrt_build`.

The plan's sha256 is checked against its manifest before TensorRT is even imported, and the plan is
refused (ArtifactError, one line naming the fix) when it was built for another GPU architecture or
TensorRT version, instead of letting TensorRT fail later with a less helpful message.

Memory is allocated once, for the engine's profile maximum batch: device buffers are torch CUDA
tensors (so they come from torch's caching allocator), host staging buffers are pinned, and all work
runs on a dedicated stream. One instance owns ONE execution context and these buffers, so it is NOT
thread-safe: use one instance per thread (they may share a GPU).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from m2anet.engines.base import INPUT_NAMES, OUTPUT_NAMES, Backend
from m2anet.engines.environment import gpu_facts, tensorrt_missing_reason
from m2anet.manifest import ArtifactError, artifact_entry
from m2anet.model import PATCH_SHAPE
from m2anet.optional import lazy_import

if TYPE_CHECKING:
    import tensorrt as trt
else:
    trt = lazy_import("tensorrt", "pip install 'm2anet[gpu]'")

REBUILD = "rebuild it with m2a-export --force on this machine"


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """Dims as a tuple; indexed, because the stubs type Dims as indexable but not iterable."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def trt_major(version: str) -> int:
    return int(version.split(".")[0])


def trt_major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def trt_logger() -> trt.ILogger:
    """One logger per process: TensorRT warns when builders and runtimes get different loggers."""
    return trt.Logger(trt.Logger.WARNING)


def _compatible_versions(built: tuple[int, int], here: tuple[int, int], version_compatible: bool) -> bool:
    """Same major.minor, or a version-compatible plan run by a later runtime that TensorRT supports.

    NVIDIA supports version-compatible plans within a major version and from 10.x to an 11.x runtime.
    """
    if built == here:
        return True
    return version_compatible and here > built and (here[0] == built[0] or (built[0], here[0]) == (10, 11))


class TensorRTBackend(Backend):
    """Runs a TensorRT plan; `cuda_graphs=True` replays one captured CUDA graph per batch size.

    Not thread-safe: one execution context and one set of I/O buffers per instance.
    """

    name = "trt"

    def __init__(self, plan: str | Path, device: int = 0, cuda_graphs: bool = False) -> None:
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: torch.cuda.Stream | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._dev_in: dict[str, torch.Tensor] = {}
        self._dev_out: dict[str, torch.Tensor] = {}
        self._host_in: dict[str, torch.Tensor] = {}
        self._host_out: dict[str, torch.Tensor] = {}
        plan = Path(plan)
        entry = artifact_entry(plan)  # hash check first: nothing below runs on a corrupted plan
        info = entry.get("tensorrt")
        if not isinstance(info, dict):
            raise ArtifactError(f"the manifest entry of {plan.name} has no 'tensorrt' section: {REBUILD}")

        reason = tensorrt_missing_reason()
        if reason is not None:
            raise RuntimeError(f"cannot run {plan.name}: {reason}")

        if device >= torch.cuda.device_count():
            raise ValueError(f"cuda:{device} does not exist ({torch.cuda.device_count()} GPUs visible)")
        here = gpu_facts(device)
        built_cc, hw_compat = str(info.get("compute_capability")), bool(info.get("hardware_compatible"))
        if hw_compat and float(here["compute_capability"]) < 8.0:
            raise ArtifactError(
                f"{plan.name} is hardware-compatible for Ampere and newer but cuda:{device} is "
                f"{here['gpu']} (compute capability {here['compute_capability']}): {REBUILD}"
            )
        if built_cc != here["compute_capability"] and not hw_compat:
            raise ArtifactError(
                f"{plan.name} was built for compute capability {built_cc} ({info.get('gpu')}) "
                f"but cuda:{device} is {here['compute_capability']} ({here['gpu']}): {REBUILD}"
            )
        built_v, here_v = str(info.get("version")), trt.__version__
        version_compat = bool(info.get("version_compatible"))
        try:
            built_mm = trt_major_minor(built_v)
        except ValueError:
            raise ArtifactError(
                f"the manifest gives {plan.name} TensorRT version {built_v!r}: {REBUILD}"
            ) from None
        if not _compatible_versions(built_mm, trt_major_minor(here_v), version_compat):
            raise ArtifactError(
                f"{plan.name} was built with TensorRT {built_v} but {here_v} is installed: {REBUILD}"
            )

        self.device = f"cuda:{device}"
        self.precision = str(entry.get("precision", "unknown"))
        self._dev = torch.device("cuda", device)
        self._use_graphs = cuda_graphs
        with torch.cuda.device(self._dev):
            runtime = trt.Runtime(trt_logger())
            # a version-compatible plan embeds TensorRT's lean runtime, which is host code; the hash check
            # above is what makes trusting it acceptable
            runtime.engine_host_code_allowed = version_compat
            self._runtime = runtime  # kept: the runtime must outlive the engine it deserialized
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ArtifactError(
                    f"TensorRT {here_v} could not deserialize {plan} (see its log above): {REBUILD}"
                )
            self._engine = engine
            self._setup_io(engine, plan.name)
            context = engine.create_execution_context()
            if context is None:
                raise RuntimeError(
                    f"TensorRT could not create an execution context for {plan.name} (out of memory?)"
                )
            self._context = context
            self._stream = torch.cuda.Stream(device=self._dev)
            for name, buf in {**self._dev_in, **self._dev_out}.items():
                context.set_tensor_address(name, buf.data_ptr())
        self._batch_set = 0  # the batch the context's input shapes are currently set to

    def _setup_io(self, engine: trt.ICudaEngine, plan_name: str) -> None:

        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(inputs) != sorted(INPUT_NAMES) or "met_logit" not in outputs:
            raise ArtifactError(
                f"{plan_name} has inputs {inputs} and outputs {outputs}, not M2ANet's: {REBUILD}"
            )
        self.outputs = tuple(n for n in OUTPUT_NAMES if n in outputs)
        min_shape, _, max_shape = (_dims(d) for d in engine.get_tensor_profile_shape("ct", 0))
        if max_shape[1:] != (1, *PATCH_SHAPE):
            raise ArtifactError(f"{plan_name} expects patches of shape {max_shape[1:]}: {REBUILD}")
        self.max_batch = self._max_batch = max_shape[0]
        self._min_batch = min_shape[0]

        def alloc(name: str, pinned: bool) -> torch.Tensor:
            shape = (self._max_batch, *_dims(engine.get_tensor_shape(name))[1:])
            trt_dtype = engine.get_tensor_dtype(name)
            if trt_dtype not in dtypes:
                raise ArtifactError(
                    f"{plan_name}: tensor {name} has unsupported dtype {trt_dtype}: {REBUILD}"
                )
            if pinned:  # host staging stays float32, the Backend contract; copy_ converts on the way
                return torch.empty(shape, dtype=torch.float32, pin_memory=True)
            return torch.empty(shape, dtype=dtypes[trt_dtype], device=self._dev)

        self._dev_in = {n: alloc(n, False) for n in INPUT_NAMES}
        self._dev_out = {n: alloc(n, False) for n in self.outputs}
        self._host_in = {n: alloc(n, True) for n in INPUT_NAMES}
        self._host_out = {n: alloc(n, True) for n in self.outputs}

    def _enqueue(self, n: int) -> None:
        """Run the engine on the first `n` rows of the device buffers, on the backend's stream."""

        if self._context is None or self._stream is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        context, stream = self._context, self._stream
        if n != self._batch_set:
            for name in INPUT_NAMES:
                if not context.set_input_shape(name, (n, 1, *PATCH_SHAPE)):
                    raise RuntimeError(
                        f"TensorRT rejected batch {n} (profile {self._min_batch}..{self.max_batch})"
                    )
            self._batch_set = n
        graph = self._graphs.get(n)
        if graph is not None:
            graph.replay()
            return
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        if self._use_graphs:
            # captured after that ordinary run, so TensorRT's shape-dependent setup stays out of the graph;
            # the graph replays this run's kernels on the same buffers for every later batch of n
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed during CUDA graph capture")
            self._graphs[n] = graph

    def _run(self, ct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:

        if self._stream is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        b = ct.shape[0]
        n = max(b, self._min_batch)  # rows b..n-1 hold stale data: rows are independent in eval mode
        self._host_in["ct"][:b].numpy()[...] = ct
        self._host_in["mask"][:b].numpy()[...] = mask
        with torch.cuda.device(self._dev), torch.cuda.stream(self._stream):
            for name in INPUT_NAMES:
                self._dev_in[name][:b].copy_(self._host_in[name][:b], non_blocking=True)
            self._enqueue(n)
            for name in self.outputs:
                self._host_out[name][:b].copy_(self._dev_out[name][:b], non_blocking=True)
        self._stream.synchronize()
        return tuple(self._host_out[name][:b].numpy().copy() for name in self.outputs)

    def infer_torch(self, ct: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run CUDA tensors (B, 1, 16, 64, 64) without host round trips; outputs are new float32 tensors.

        Ordered with the caller's current stream both ways, so the result can be used right away.
        """

        if self._stream is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        stream = self._stream
        if ct.device != self._dev or mask.device != self._dev:
            raise ValueError(f"ct is on {ct.device} and mask on {mask.device}: move both to {self.device}")
        if ct.shape != mask.shape or tuple(ct.shape[1:]) != (1, *PATCH_SHAPE) or ct.shape[0] == 0:
            raise ValueError(
                f"ct {tuple(ct.shape)} and mask {tuple(mask.shape)} must both be (B>0, 1, 16, 64, 64)"
            )
        parts: list[tuple[torch.Tensor, ...]] = []
        caller = torch.cuda.current_stream(self._dev)
        for i in range(0, ct.shape[0], self._max_batch):
            b = min(ct.shape[0] - i, self._max_batch)
            stream.wait_stream(caller)  # inputs are ready and the previous chunk's outputs were copied
            with torch.cuda.device(self._dev), torch.cuda.stream(stream):
                self._dev_in["ct"][:b].copy_(ct[i : i + b])
                self._dev_in["mask"][:b].copy_(mask[i : i + b])
                self._enqueue(max(b, self._min_batch))
            caller.wait_stream(stream)
            # copied on the caller's stream, so the caching allocator ties the results to that stream
            parts.append(tuple(self._dev_out[name][:b].to(torch.float32, copy=True) for name in self.outputs))
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))

    def close(self) -> None:
        """Free graphs, context, engine and buffers (in that order); calling it again does nothing."""
        if self._stream is not None:
            self._stream.synchronize()  # the buffers came from torch's allocator on another stream
        self._graphs.clear()
        self._context = None  # TensorRT objects go in reverse order of creation
        self._engine = None
        self._runtime = None
        self._stream = None
        self._dev_in, self._dev_out, self._host_in, self._host_out = {}, {}, {}, {}
