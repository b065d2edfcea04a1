"""TensorRT runtime for a plan built by `m2anet.export.tensorrt_build`.

The plan's sha256 is checked against its manifest before TensorRT is even imported, and the plan is
refused (ArtifactError, one line naming the fix) when it was built for another GPU architecture or
TensorRT version, instead of letting TensorRT fail later with a less helpful message.

Memory is allocated once, for the engine's profile maximum batch: device buffers are torch CUDA
tensors (so they come from torch's caching allocator), host staging buffers are pinned, and all work
runs on a dedicated stream. One instance owns its execution context(s) and these buffers, so it is
NOT thread-safe: use one instance per thread (they may share a GPU).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from m2anet.contract import PATCH_SHAPE
from m2anet.engines.base import INPUT_NAMES, OUTPUT_NAMES, Backend
from m2anet.engines.environment import gpu_facts, tensorrt_missing_reason
from m2anet.engines.torch_backend import capture
from m2anet.manifest import ArtifactError, artifact_entry
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


def trt_release(version: str) -> tuple[int, ...]:
    """The numeric part of a TensorRT version, for ordering: '10.13.0.35' -> (10, 13, 0, 35)."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    if match is None:
        raise ValueError(f"{version!r} is not a TensorRT version")
    return tuple(int(part) for part in match.group().split("."))


@functools.cache
def trt_logger() -> trt.ILogger:
    """One logger per process: TensorRT warns when builders and runtimes get different loggers."""
    return trt.Logger(trt.Logger.WARNING)


def _compatible_versions(built: str, here: str, version_compatible: bool) -> bool:
    """Whether TensorRT `here` may deserialize a plan that TensorRT `built` made (both as trt.__version__).

    A plan built without version compatibility is tied to the exact release that built it: the full
    version strings must be equal. A version-compatible plan runs on the same or a later release of its
    major version, and a 10.x one also on 11.x, the only pair across majors NVIDIA supports (support
    matrix, "Engine Portability"); never on an older runtime.
    """
    if built == here:
        return True
    if not version_compatible:
        return False
    b, h = trt_release(built), trt_release(here)
    return h > b and (h[0] == b[0] or (b[0], h[0]) == (10, 11))


def check_plan_version(plan_name: str, info: dict[str, Any], here: str) -> None:
    """Refuse (ArtifactError naming both versions and the fix) a plan that TensorRT `here` may not run.

    `info` is the plan's manifest 'tensorrt' section. Checked before deserializing, so the refusal is
    one line naming the fix rather than TensorRT's log and a None engine.
    """
    built = info.get("version")
    if not isinstance(built, str):
        raise ArtifactError(f"the manifest gives {plan_name} no TensorRT version: {REBUILD}")
    version_compatible = bool(info.get("version_compatible"))
    try:
        compatible = _compatible_versions(built, here, version_compatible)
    except ValueError:
        raise ArtifactError(f"the manifest gives {plan_name} TensorRT version {built!r}: {REBUILD}") from None
    if compatible:
        return
    if not version_compatible:
        raise ArtifactError(
            f"{plan_name} was built with TensorRT {built} without version compatibility, so only TensorRT "
            f"{built} can run it, but {here} is installed: install TensorRT {built} or {REBUILD}"
        )
    major = trt_major(built)
    later = f"later {major}.x releases" + (" and on 11.x" if major == 10 else "")
    raise ArtifactError(
        f"{plan_name} was built version-compatible with TensorRT {built}, which runs on {later}, but "
        f"{here} is installed: install one of those or {REBUILD}"
    )


class TensorRTBackend(Backend):
    """Runs a TensorRT plan; `cuda_graphs=True` replays one captured CUDA graph per batch size.

    Each captured batch size gets an execution context of its own whose input shapes never change
    after the capture. NVIDIA documents no guarantee that a graph captured on a context stays valid
    once that context has run other shapes (torch-tensorrt re-records on every shape change), and
    re-capturing on each change would capture on nearly every call in the classifier's pattern (chunks
    of `max_batch`, then a remainder). These contexts are created USER_MANAGED and all use one scratch
    block of the engine's device-memory size: TensorRT uses a context's device memory only from
    `execute_async_v3` until that execution completes, and everything here runs in order on one
    stream, so one block serves them all and an extra context costs only its own small state. At most
    `max_graphs` are kept; the least recently used is dropped (and re-captured if its size returns).
    Without graphs, one ordinary context runs every batch size.

    Not thread-safe: one set of contexts and I/O buffers per instance.
    """

    name = "trt"

    def __init__(
        self, plan: str | Path, device: int = 0, cuda_graphs: bool = False, max_graphs: int = 8
    ) -> None:
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: torch.cuda.Stream | None = None
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}  # in order of last use, oldest first
        self._graph_contexts: dict[int, trt.IExecutionContext] = {}
        self._scratch: torch.Tensor | None = None
        self._dev_in: dict[str, torch.Tensor] = {}
        self._dev_out: dict[str, torch.Tensor] = {}
        self._host_in: dict[str, torch.Tensor] = {}
        self._host_out: dict[str, torch.Tensor] = {}
        if max_graphs < 1:
            raise ValueError(f"max_graphs={max_graphs}: keep at least 1 CUDA graph (the default is 8)")
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
        here_v = trt.__version__
        check_plan_version(plan.name, info, here_v)
        version_compat = bool(info.get("version_compatible"))

        self.device = f"cuda:{device}"
        self.precision = str(entry.get("precision", "unknown"))
        self._dev = torch.device("cuda", device)
        self._use_graphs, self._max_graphs = cuda_graphs, max_graphs
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
            self._stream = torch.cuda.Stream(device=self._dev)
            if cuda_graphs:
                if trt_major(trt.__version__) >= 11:
                    size = engine.device_memory_size_v2
                else:
                    size = engine.device_memory_size
                self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self._dev)
            else:
                self._context = self._new_context(None)
        self._batch_set = 0  # the batch the ordinary context's input shapes are currently set to

    def _new_context(self, scratch: torch.Tensor | None) -> trt.IExecutionContext:
        """A context bound to the I/O buffers: on `scratch` if given, else on device memory of its own."""
        if self._engine is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        strategy = trt.ExecutionContextAllocationStrategy
        context = self._engine.create_execution_context(
            strategy.STATIC if scratch is None else strategy.USER_MANAGED
        )
        if context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        if scratch is not None:
            if trt_major(trt.__version__) >= 11:
                context.set_device_memory(scratch.data_ptr(), scratch.numel())
            else:  # a write-only property, missing from the 10.13 stubs
                context.device_memory = scratch.data_ptr()  # type: ignore[attr-defined]
        for name, buf in {**self._dev_in, **self._dev_out}.items():
            context.set_tensor_address(name, buf.data_ptr())
        return context

    def _set_batch(self, context: trt.IExecutionContext, n: int) -> None:
        for name in INPUT_NAMES:
            if not context.set_input_shape(name, (n, 1, *PATCH_SHAPE)):
                raise RuntimeError(
                    f"TensorRT rejected batch {n} (profile {self._min_batch}..{self.max_batch})"
                )

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

        if self._stream is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        if self._use_graphs:
            self._replay(n, self._stream)
            return
        if self._context is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        if n != self._batch_set:
            self._set_batch(self._context, n)
            self._batch_set = n
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _replay(self, n: int, stream: torch.cuda.Stream) -> None:
        """Replay batch `n`'s graph; the first time, run it on a new context of its own and capture."""
        graph = self._graphs.pop(n, None)
        if graph is not None:
            self._graphs[n] = graph  # now the most recently used
            graph.replay()
            return
        if len(self._graphs) >= self._max_graphs:
            stream.synchronize()  # the oldest graph may still be running on the stream
            oldest = next(iter(self._graphs))
            del self._graphs[oldest]  # the graph before the context it was captured on
            del self._graph_contexts[oldest]
        context: trt.IExecutionContext = self._new_context(self._scratch)
        self._set_batch(context, n)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log above)")
        # captured after that ordinary run (whose results are this call's), so TensorRT's shape-dependent
        # setup stays out of the graph; the context's shapes never change again
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with capture(graph, stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed during CUDA graph capture")
        self._graph_contexts[n] = context
        self._graphs[n] = graph

    def _run(self, ct: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> tuple[np.ndarray, ...]:

        if self._stream is None:
            raise RuntimeError("this TensorRTBackend is closed: create a new one")
        b = ct.shape[0]
        n = max(b, self._min_batch)  # rows b..n-1 hold stale data: rows are independent in eval mode
        self._host_in["ct"][:b].numpy()[...] = ct
        self._host_in["mask"][:b].numpy()[...] = mask
        try:
            with torch.cuda.device(self._dev), torch.cuda.stream(self._stream):
                for name in INPUT_NAMES:
                    self._dev_in[name][:b].copy_(self._host_in[name][:b], non_blocking=True)
                self._enqueue(n)
                for name in outputs:
                    self._host_out[name][:b].copy_(self._dev_out[name][:b], non_blocking=True)
        finally:  # after a failure too: the next call overwrites the page-locked inputs being copied
            self._stream.synchronize()
        return tuple(self._host_out[name][:b].numpy().copy() for name in outputs)

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
        # whatever runs next on the backend's stream (a call, close()) waits for these reads of its buffers
        stream.wait_stream(caller)
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))

    def close(self) -> None:
        """Free graphs, contexts, their scratch block, engine and buffers, in that order; idempotent."""
        if self._stream is not None:  # its work, infer_torch's result copies included (they precede it)
            self._stream.synchronize()
        self._graphs.clear()
        self._graph_contexts.clear()
        self._context = None  # TensorRT objects go in reverse order of creation
        self._scratch = None
        self._engine = None
        self._runtime = None
        self._stream = None
        self._dev_in, self._dev_out, self._host_in, self._host_out = {}, {}, {}, {}
