"""PyTorch eager, torch.compile and torch-tensorrt runners of the reference model.

Precisions on CUDA mean what they say. `fp32` is IEEE FP32: PyTorch's default lets cuDNN round the
operands of FP32 convolutions to TF32 (10-bit mantissa), which fails the fp32 parity tier. `tf32` asks for
TF32 convolutions and matrix products. `fp16` and `bf16` run under autocast, channels-last by default:
cuDNN's half-precision 3D convolutions are fast in NDHWC and slower than FP32 in NCDHW.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2anet.contract import PATCH_SHAPE
from m2anet.engines.base import INPUT_NAMES, Backend
from m2anet.engines.environment import aoti_toolkit_missing_reason, cuda_missing_reason
from m2anet.engines.spec import TORCH_PRECISIONS
from m2anet.model import Heads, create_model, fold_batchnorm
from m2anet.optional import lazy_import

TORCH_TRT_KEYWORDS: dict[str, Any] = json.loads(
    resources.files("m2anet.engines").joinpath("torch_tensorrt_compile.json").read_text()
)["versions"]
OPTIONAL_KEYWORDS = {"use_explicit_typing"}
"""Keywords that later releases dropped because what they asked for became the only behaviour."""
torch_tensorrt = lazy_import(
    "torch_tensorrt", "pip install 'm2anet[gpu]' (torch-tensorrt matching your torch)"
)

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_TF32 = {"fp32": False, "tf32": True}
"""Whether each FP32 precision lets cuDNN and cuBLAS round their operands to TF32."""
COMPILE_MODE = "default"
"""torch.compile's mode here. Inductor's own CUDA graphs stay off: the graphs are this module's, one per batch
size. `max-autotune-no-cudagraphs` also times Triton templates against cuDNN for every convolution: on an
H200 it had not finished the first graph of m2anet_base (batch 1) after 110 s, too long to be a default."""
CACHE_ENV = "M2ANET_CACHE_DIR"

_FLAGS_LOCK = threading.RLock()
_MIXED = "refused: legacy and new TF32 settings mixed"


def _read(getter: Callable[[], Any]) -> Any:
    try:
        return getter()
    except RuntimeError:  # PyTorch refuses to answer a legacy query once a host mixed the two APIs
        return _MIXED


@functools.cache
def _fp32_precision_nodes() -> dict[str, tuple[Any, Any]]:
    """The `fp32_precision` settings (PyTorch >= 2.9) the scope may change, each with the one it inherits
    from ("none"), parents first."""
    b = torch.backends
    if not hasattr(b, "fp32_precision"):
        return {}
    return {
        "cuda": (b.cudnn, b),
        # cudnn.conv and mkldnn.matmul are class attributes of the module objects that replace
        # torch.backends.cudnn and torch.backends.mkldnn in sys.modules: there at runtime, not in the stubs
        "cuda.conv": (b.cudnn.conv, b.cudnn),  # type: ignore[attr-defined]
        "cuda.rnn": (b.cudnn.rnn, b.cudnn),
        "cuda.matmul": (b.cuda.matmul, b.cudnn),
        "mkldnn.matmul": (b.mkldnn.matmul, b.mkldnn),  # type: ignore[attr-defined]
    }


def math_flags() -> dict[str, Any]:
    """What every public getter of PyTorch's TF32 and cuDNN-benchmark settings answers now."""
    b = torch.backends
    state = {
        "cudnn.allow_tf32": _read(lambda: b.cudnn.allow_tf32),
        "cuda.matmul.allow_tf32": _read(lambda: b.cuda.matmul.allow_tf32),
        "float32_matmul_precision": _read(torch.get_float32_matmul_precision),
        "cudnn.benchmark": b.cudnn.benchmark,
    }
    state.update({name: node.fp32_precision for name, (node, _) in _fp32_precision_nodes().items()})
    return state


def _set_math(tf32: bool | None, cudnn_benchmark: bool | None) -> None:
    """Through the legacy setters, which keep both APIs consistent (inductor and dynamo still read the
    legacy ones, and raise on a mix); then the CUDA parent of the new API, so a host's
    `torch.backends.fp32_precision = "tf32"` cannot reach the convolutions the legacy setter left
    inheriting."""
    b = torch.backends
    if tf32 is not None:
        b.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        if _fp32_precision_nodes():
            b.cudnn.fp32_precision = "tf32" if tf32 else "ieee"
    if cudnn_benchmark is not None:
        b.cudnn.benchmark = cudnn_benchmark


def _restore_math(saved: dict[str, Any]) -> None:
    """Back to `saved`, checked getter by getter. The new API's getters answer the effective value, so a
    setting equal to its parent's comes back inherited ("none"). A legacy getter that refused to answer
    (the host mixed the two APIs) leaves its value to be found: each candidate is tried until every
    getter answers as before."""
    b = torch.backends
    cudnn = saved["cudnn.allow_tf32"]
    matmul = saved["float32_matmul_precision"]
    for cudnn_tf32, precision in itertools.product(
        [False, True] if cudnn == _MIXED else [cudnn],
        ["highest", "high", "medium"] if matmul == _MIXED else [matmul],
    ):
        b.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(precision)
        b.cudnn.benchmark = saved["cudnn.benchmark"]
        for name, (node, parent) in _fp32_precision_nodes().items():
            if node.fp32_precision != saved[name]:
                node.fp32_precision = "none" if saved[name] == parent.fp32_precision else saved[name]
        if math_flags() == saved:
            return
    warnings.warn(
        f"m2anet could not restore PyTorch's TF32 settings exactly (was {saved}, now {math_flags()})",
        RuntimeWarning,
        stacklevel=3,
    )


@contextlib.contextmanager
def cuda_math(tf32: bool | None = None, cudnn_benchmark: bool | None = None) -> Iterator[None]:
    """TF32 on or off for CUDA convolutions and matrix products, and cuDNN's benchmark mode, for the body
    only; None leaves a setting as it is. Every public getter answers as before afterwards, so a host
    application's own settings are untouched.

    The settings are process-wide in PyTorch (there is no per-thread one in Python), so the body holds one
    process-wide lock: m2anet backends with different precisions in several threads take turns, and a host
    thread running its own CUDA work during such a call sees the call's settings for its duration. The
    flags act when a kernel is chosen: a CUDA graph captured inside keeps them without the lock."""
    with _FLAGS_LOCK:
        if tf32 is None:  # the half precisions: one flag, no TF32 state to save (tens of microseconds)
            benchmark = torch.backends.cudnn.benchmark
            try:
                _set_math(None, cudnn_benchmark)
                yield
            finally:
                torch.backends.cudnn.benchmark = benchmark
            return
        saved = math_flags()
        try:
            _set_math(tf32, cudnn_benchmark)
            yield
        finally:
            _restore_math(saved)


def inductor_cache_dir(folder: str | Path | None = None) -> Path:
    """Where torch.compile keeps compiled graphs, autotuning results and kernels, so a later process with
    the same model, precision and batch sizes compiles less: it still traces and freezes (AOTAutograd's
    cache refuses frozen graphs, and on the CPU the FX-graph cache refuses oneDNN-packed weights), about
    half of a cold compile on the CPU (tests/bench/compile_cache.py).

    `folder` if given; else TORCHINDUCTOR_CACHE_DIR if the process set it; else $M2ANET_CACHE_DIR/inductor;
    else ${XDG_CACHE_HOME:-~/.cache}/m2anet/inductor (inductor's own default, /tmp/torchinductor_$USER, is
    gone after a reboot). Inductor reads only TORCHINDUCTOR_CACHE_DIR, so the choice is written there and
    holds for every torch.compile in the process. Inductor writes its default there itself the first time
    it needs a folder (importing its config does): that value is not taken for a host's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is None and given and os.path.abspath(given) != os.path.abspath(default_cache_dir()):
        return Path(given)
    if folder is None:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m2anet"
        folder = Path(os.environ.get(CACHE_ENV) or home) / "inductor"
    path = Path(folder).expanduser().resolve()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_options(mode: str) -> dict[str, Any]:
    """Inductor options of `mode` (torch.compile takes a mode or options, not both), with the FX graph cache
    on."""
    from torch._inductor import list_mode_options

    try:
        options = list_mode_options(mode)
    except KeyError:
        modes = ", ".join(list_mode_options())
        raise ValueError(f"torch.compile mode {mode!r} does not exist: use one of {modes}") from None
    return {**options, "fx_graph_cache": True}


def compiled(model: torch.nn.Module, mode: str, freezing: bool, dynamic: bool | None) -> Callable[..., Any]:
    """torch.compile of `model` in inductor's `mode`; with `freezing` the weights become constants, so
    BatchNorm folds into the convolutions, autocast's weight casts are made once, and the weights keep the
    model's memory format.

    Dynamo decides whether weights are constants or graph inputs when it traces, from inductor's global
    `freezing` setting: given only in torch.compile's options, which reach inductor after the trace,
    freezing finds the weights lifted to inputs and does nothing: BatchNorm runs at runtime and each weight
    is cast on every call into a new NCDHW tensor, which cuDNN transposes (docs/gpu.md). So each call,
    where dynamo may trace, runs with the setting in place and put back after, set directly (3 us a call on
    a 2-core Xeon; `config.patch` took 14 us on this per-call path).

    With `dynamic=None` a batch of more than one is marked dynamic from its first call, so its graph
    serves every other size: left to PyTorch's automatic dynamic shapes, a first batch of 16 compiled a
    graph for 16 alone and the next size a second one. m2a-verify's batches (16, 4, single nodes, 32)
    compiled three graphs of m2anet_small on the CPU and compile two now (the CPU's convolution choice
    still splits its graphs at batch 16); on a GPU, a compilation is tens of seconds of `ci/gpu-check`."""
    from torch._inductor import config

    forward = torch.compile(model, options=compile_options(mode), dynamic=dynamic)

    def run(*args: torch.Tensor) -> Any:
        if dynamic is None and args[0].shape[0] > 1:
            for x in args:
                torch._dynamo.maybe_mark_dynamic(x, 0)
        saved, config.freezing = config.freezing, freezing
        try:
            return forward(*args)
        finally:
            config.freezing = saved

    return run


class _Autocast(torch.nn.Module):
    """`model` with autocast inside its forward, where torch.export records it (a `wrap_with_autocast`
    region, whose casts the package then holds); autocast around the export call is not recorded."""

    def __init__(self, model: torch.nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.device_type, self.dtype = model, device_type, dtype

    def forward(self, ct: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None):
            return tuple(o.float() for o in self.model(ct, mask))


def aot_compiled(
    model: torch.nn.Module,
    example: tuple[torch.Tensor, torch.Tensor],
    autocast: torch.dtype | None,
    options: dict[str, Any],
    min_batch: int,
    identity: dict[str, Any],
    single_threaded: bool,
) -> Callable[..., Any]:
    """`model` compiled ahead of time by AOTInductor: exported with one dynamic batch of at least
    `min_batch` (`example`'s layout), built with inductor `options` into a package in
    inductor_cache_dir()/aoti, named by a hash of `identity`, the options, the example's strides, the
    weights and torch's version. The first backend builds it; every later one, in any process, loads it in
    milliseconds instead of tracing, freezing and compiling again as torch.compile does
    (tests/bench/compile_cache.py --aoti). Autocast is inside the package, and its outputs float32.
    `single_threaded` loads it without the runner's thread synchronisation, which PyTorch's documentation
    says conflicts with CUDA graphs."""
    digest = hashlib.sha256(
        json.dumps(
            {
                **identity,
                **options,
                "torch": torch.__version__,
                "min_batch": min_batch,
                "strides": [x.stride() for x in example],
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    path = inductor_cache_dir() / "aoti" / f"{digest.hexdigest()[:32]}.pt2"
    if not path.exists():
        reason = aoti_toolkit_missing_reason(example[0].device.type)
        if reason is not None:
            raise RuntimeError(f"aoti=true cannot build its package here: {reason}")
        path.parent.mkdir(parents=True, exist_ok=True)
        batch = torch.export.Dim("batch", min=min_batch)
        wrapped = _Autocast(model, example[0].device.type, autocast)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        try:
            # without grad, both: inductor freezes (BatchNorm and the weights' casts folded into constants,
            # oneDNN's weights packed) only then; compiled with grad on, the package ran every BatchNorm
            with torch.no_grad():
                program = torch.export.export(wrapped, example, dynamic_shapes=({0: batch}, {0: batch}))
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(partial), inductor_configs=options
                )
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    index = example[0].device.index
    return torch._inductor.aoti_load_package(
        str(path), run_single_threaded=single_threaded, device_index=-1 if index is None else index
    )


def memory_format(device_type: str, precision: str, channels_last: bool | None = None) -> torch.memory_format:
    """Channels-last (NDHWC) for fp16 and bf16 on CUDA, NCDHW otherwise, unless `channels_last` says."""
    if channels_last is None:
        channels_last = device_type == "cuda" and precision in _AUTOCAST
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def folds_batchnorm(cuda_graphs: bool, precision: str, fold_bn: bool | None = None) -> bool:
    """BatchNorm folded into the convolutions where CUDA graphs replay an eager half-precision network, unless
    `fold_bn` says: there cuDNN's NDHWC half-precision BatchNorm kernel is the largest item left (21% of
    eager FP16's kernel time at batch 32 on an H200), and folding it took a single node from 1.48 to 0.92 ms
    (docs/gpu.md). Elsewhere it did not pay: PyTorch adds the folded bias in a kernel of its own."""
    return cuda_graphs and precision in _AUTOCAST if fold_bn is None else fold_bn


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """`x` (B, C, D, H, W) with NDHWC strides. A one-channel NCDHW tensor is already in that memory order and
    is only re-strided: `contiguous(memory_format=...)` would leave its strides alone, and PyTorch's
    convolutions choose their layout from the strides."""
    if x.shape[1] == 1 and x.is_contiguous():
        _, _, d, h, w = x.shape
        return x.as_strided(x.shape, (d * h * w, 1, h * w, w, 1))
    return x.contiguous(memory_format=torch.channels_last_3d)


_Captured = tuple[Any, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]
"""A graph, its static inputs and its static outputs."""


def capture(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> torch.cuda.graph:
    """Capture into `graph` on `stream` in CUDA's thread-local mode, where only this thread's unsafe calls
    (an allocation, a synchronisation) invalidate the capture. CUDA's default, global mode also fails it
    on another thread's: a Server-scenario client that reopens its backend after a failure captures while
    the other clients run, and a host application may have threads of its own on the GPU. Inductor's CUDA
    graphs capture in this mode too (pytorch/pytorch#107407). A device-wide synchronisation elsewhere
    still breaks a capture in any mode, so no backend synchronises the whole device, and cuDNN's benchmark
    of a shape new to it does so (H200, 2026-11-29: another thread's backend meeting a new batch size
    failed both its call and the capture, "operation not permitted when stream is capturing"; at sizes it
    had met, or with cudnn_benchmark=False, 12 of its calls ran during the six captures): so a capture
    holds the lock that m2anet's forwards take (`cuda_math`), and no forward of theirs runs meanwhile."""
    return torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")


class CudaGraphs:
    """One captured CUDA graph per batch size (torch.cuda.graphs' whole-network capture): static input
    buffers, warm-up on a side stream, capture on the same stream, then copy in, replay, copy out. A replay
    launches the whole network at once instead of each of its few hundred kernels, which is most of a
    single node's time in eager PyTorch. Outputs are cloned, so the next replay cannot overwrite what a
    caller holds. Not thread-safe: one set of static buffers per batch size, as a TensorRT context."""

    def __init__(
        self,
        run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
        layout: torch.memory_format,
        warmup: int = 3,
    ) -> None:
        self.run, self.layout, self.warmup = run, layout, warmup
        self.graphs: dict[tuple[int, torch.device], _Captured] = {}

    def __call__(self, ct: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (ct.shape[0], ct.device)
        if key not in self.graphs:
            self.graphs[key] = self._capture(ct, mask)
        graph, inputs, outputs = self.graphs[key]
        for buffer, x in zip(inputs, (ct, mask), strict=True):
            buffer.copy_(x)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def _capture(self, ct: torch.Tensor, mask: torch.Tensor) -> _Captured:
        """Warm-up runs first (cuDNN's benchmark, torch.compile's compilation and autotuning synchronise,
        which a capture forbids), on the capture's stream so its cuBLAS workspace exists before capture."""
        inputs = tuple(torch.empty_like(x, memory_format=self.layout).copy_(x) for x in (ct, mask))
        caller = torch.cuda.current_stream(ct.device)
        stream = torch.cuda.Stream(ct.device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.run(*inputs)
        caller.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _FLAGS_LOCK, capture(graph, stream):  # no other m2anet forward while this captures (`capture`)
            outputs = self.run(*inputs)
        caller.wait_stream(stream)
        return graph, inputs, outputs


_CAST_ONCE = (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.Linear)


def cast_weights_once(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its convolution and linear weights stored in autocast's `dtype`. Autocast casts FP32
    weights on every call, one kernel each (95 per forward of m2anet_base in the H200 profile), which is
    what made eager FP16 and BF16 at batch 1 no faster than FP32; a weight already in `dtype` passes
    uncast. Bit for bit autocast's result: the same rounding, done once. BatchNorm and the other
    parameters stay FP32, as autocast uses them."""
    for module in model.modules():
        if isinstance(module, _CAST_ONCE):
            module.to(dtype)
    return model


def _inductor_graphs(mode: str) -> bool:
    return bool(compile_options(mode).get("triton.cudagraphs"))


class PinnedBuffers:
    """Page-locked host buffers by name, each grown to the largest shape asked for and reused.

    A copy between a numpy array (pageable memory) and the GPU goes through the CUDA driver's own staging
    buffer, in pieces, the host waiting on each; from page-locked memory it is one copy queued on the
    stream. m2a-bench's CUDA runner and TensorRTBackend copy from page-locked memory, so the numpy path,
    which NodeClassifier and m2a-predict take, does too. Their user holds `lock` from filling them to
    reading them back."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def view(self, name: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Float32 `shape` in buffer `name`; what an earlier view held there is overwritten."""
        n = math.prod(shape)
        if name not in self.buffers or self.buffers[name].numel() < n:
            self.buffers[name] = torch.empty(n, dtype=torch.float32, pin_memory=True)
        return self.buffers[name][:n].view(shape)


class TorchBackend(Backend):
    """Eager PyTorch or torch.compile on the CPU or CUDA; torch-tensorrt with `tensorrt_batch`.

    On the CPU a batch of one falls into `aten::slow_conv3d_forward` instead of oneDNN (about
    3x slower per node than batch 2 on the reference machine); `pad_single=True` (default)
    runs a single node as a batch of two and drops the copy, so users are not left on it. The two are
    a real copy: an expanded batch (stride 0) made torch.compile's frozen oneDNN convolutions return
    another layout than inductor had planned for (an AssertionError in m2a-verify of m2anet_base).

    On CUDA: `precision` fp32 | tf32 | fp16 | bf16 (module doc); `channels_last` (default on for fp16 and
    bf16) puts weights and inputs in NDHWC; `cuda_graphs` replays one captured CUDA graph per batch size
    (default on for torch-compile); `cudnn_benchmark` lets cuDNN time its algorithms once per shape;
    `fold_bn` folds each BatchNorm into its convolution (default: `folds_batchnorm`, on with CUDA graphs in
    fp16 and bf16).
    torch-compile compiles with inductor's `mode`, `freezing` and torch.compile's `dynamic` (None: batch 1,
    then one graph for every other batch size), cached in `inductor_cache_dir(cache_dir)`; with `aoti`,
    ahead of time instead, into one package for every batch size that later backends load (`aot_compiled`).
    """

    def __init__(
        self,
        model_name: str = "m2anet_base",
        device: str = "cpu",
        precision: str = "fp32",
        heads: Heads = "both",
        weights: str | None = None,
        compile: bool = False,
        cuda_graphs: bool | None = None,
        channels_last: bool | None = None,
        pad_single: bool = True,
        tensorrt_batch: tuple[int, int, int] | None = None,
        cudnn_benchmark: bool = True,
        mode: str = COMPILE_MODE,
        freezing: bool = True,
        dynamic: bool | None = None,
        cache_dir: str | None = None,
        fold_bn: bool | None = None,
        aoti: bool = False,
    ) -> None:
        """`tensorrt_batch=(min, opt, max)` compiles with torch-tensorrt's dynamo path instead."""
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(TORCH_PRECISIONS)}, got {precision!r}")
        reason = cuda_missing_reason(device) if device.startswith("cuda") else None
        if reason is not None:
            raise RuntimeError(f"{device} cannot run here: {reason}; use a cpu backend (torch:cpu, ort:cpu)")
        self.torch_device = torch.device(device)
        cuda = self.torch_device.type == "cuda"
        if precision != "fp32" and not cuda:
            raise ValueError(f"{precision} is offered on cuda only: use precision='fp32' on {device}")
        inductor_graphs = compile and _inductor_graphs(mode)
        if cuda_graphs is None:
            cuda_graphs = compile and cuda and not inductor_graphs
        if cuda_graphs and not cuda:
            raise ValueError(f"cuda_graphs needs a CUDA device, not {device}: drop cuda_graphs=true")
        if cuda_graphs and (inductor_graphs or tensorrt_batch is not None):
            owner = "torch-trt" if tensorrt_batch else f"mode {mode}"
            raise ValueError(
                f"cuda_graphs=true would capture what captures its own graphs ({owner}): "
                "drop cuda_graphs or pick another mode"
            )
        if aoti and (not compile or inductor_graphs or dynamic is not None):
            raise ValueError(
                "aoti=true builds one ahead-of-time package for every batch size: use it with "
                "torch-compile, without dynamic, in a mode without inductor's CUDA graphs (default, "
                "max-autotune-no-cudagraphs)"
            )
        if tensorrt_batch is not None and channels_last is None:
            channels_last = False  # torch-tensorrt picks the engine's layouts itself
        self.memory_format = memory_format(self.torch_device.type, precision, channels_last)
        model = create_model(model_name, pretrained=weights is None, heads=heads, weights=weights)
        if folds_batchnorm(cuda_graphs, precision, fold_bn):
            model = fold_batchnorm(model)
        # Module.to takes memory_format at runtime; torch's stubs leave it out
        model = model.to(self.torch_device, memory_format=self.memory_format)  # type: ignore[call-overload]
        self.model = model
        self.forward: Callable[..., Any] = self.model
        self.name = "torch-compile" if compile else "torch"
        if compile:
            inductor_cache_dir(cache_dir)
        if compile and not aoti:
            self.forward = compiled(self.model, mode, freezing, dynamic)
        self.autocast = _AUTOCAST.get(precision)
        if self.autocast is not None and not compile:  # inductor's freezing folds the casts by itself
            cast_weights_once(self.model, self.autocast)
        flags: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        if tensorrt_batch is not None:
            self.forward = _torch_tensorrt(self.model, tensorrt_batch, precision)
            self.name, self.max_batch, self.autocast = "torch-trt", tensorrt_batch[2], None
        elif cuda:
            flags = functools.partial(cuda_math, _TF32.get(precision), cudnn_benchmark)
            if precision == "tf32" and torch.cuda.get_device_capability(self.torch_device)[0] < 8:
                precision = "fp32"  # TF32 needs Ampere or newer: before it, what runs and is reported is FP32
        self._flags = flags
        if aoti:
            with flags():
                self.forward = self._aot_compiled(
                    model_name, heads, precision, pad_single, mode, freezing, cuda_graphs
                )
            self.autocast = None  # inside the package
        self.precision, self.device = precision, str(self.torch_device)
        self.outputs = self.outputs[: 2 if heads == "both" else 1]
        self.channels_last = self.memory_format == torch.channels_last_3d
        self.pad_single = pad_single and not cuda
        self.graphs = CudaGraphs(self._call, self.memory_format) if cuda_graphs else None
        self._pinned = PinnedBuffers()

    def _aot_compiled(
        self,
        model_name: str,
        heads: Heads,
        precision: str,
        pad_single: bool,
        mode: str,
        freezing: bool,
        cuda_graphs: bool,
    ) -> Callable[..., Any]:
        """`aot_compiled` of this backend's model, for its device (a GPU's name and architecture, or the
        CPU's instruction set: the package's kernels are built for them), precision and layout; on the CPU
        for batches of two or more when single nodes run as pairs; single-threaded under CUDA graphs."""
        dev = self.torch_device
        if dev.type == "cuda":
            where = f"{torch.cuda.get_device_name(dev)} {torch.cuda.get_device_capability(dev)}"
        else:
            where = f"cpu {torch.backends.cpu.get_cpu_capability()}"
        ct = torch.zeros((2, 1, *PATCH_SHAPE), device=dev)
        example = (ct, torch.ones_like(ct))
        if self.memory_format == torch.channels_last_3d:
            example = (channels_last(example[0]), channels_last(example[1]))
        identity = {"model": model_name, "heads": heads, "precision": precision, "device": where}
        options = {**compile_options(mode), "freezing": freezing}
        min_batch = 2 if pad_single and dev.type == "cpu" else 1
        return aot_compiled(self.model, example, self.autocast, options, min_batch, identity, cuda_graphs)

    def _call(self, ct: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One forward in this backend's precision, float32 out: what a CUDA graph captures. Autocast
        without its weight cache, which CUDA graph capture does not support."""
        dtype, device = self.autocast, self.torch_device.type
        with (
            self._flags(),
            torch.autocast(device, dtype=dtype, enabled=dtype is not None, cache_enabled=False),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            return tuple(o.float() for o in self.forward(ct, mask))

    @torch.no_grad()
    def infer_torch(
        self, ct: torch.Tensor, mask: torch.Tensor, replay: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Tensors already on the backend's device go in without a copy. `replay=False` launches a CUDA
        graph's kernels one by one, where a profiler can tell which operator launched each."""
        single = self.pad_single and ct.shape[0] == 1
        if single:
            ct, mask = ct.repeat(2, 1, 1, 1, 1), mask.repeat(2, 1, 1, 1, 1)
        if self.channels_last:
            ct, mask = channels_last(ct), channels_last(mask)
        out = self.graphs(ct, mask) if self.graphs is not None and replay else self._call(ct, mask)
        return tuple(o[:1] for o in out) if single else out

    def _run(self, ct: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        if self.torch_device.type != "cuda":
            cpu = dict(
                zip(self.outputs, self.infer_torch(torch.from_numpy(ct), torch.from_numpy(mask)), strict=True)
            )
            return tuple(cpu[name].numpy() for name in outputs)
        with self._pinned.lock:
            staged = self._pinned.view("inputs", (2, *ct.shape))
            staged[0].numpy()[...] = ct
            staged[1].numpy()[...] = mask
            try:
                x = staged.to(self.torch_device, non_blocking=True)
                out = dict(zip(self.outputs, self.infer_torch(x[0], x[1]), strict=True))
                host = [
                    self._pinned.view(name, out[name].shape).copy_(out[name], non_blocking=True)
                    for name in outputs
                ]
            finally:  # after a failure too: the next call overwrites the page-locked inputs being copied
                torch.cuda.current_stream(self.torch_device).synchronize()
            return tuple(h.numpy().copy() for h in host)

    def close(self) -> None:
        """Release the captured graphs, their memory pools and the page-locked buffers."""
        if self.graphs is not None:
            self.graphs.graphs.clear()
        self._pinned.buffers.clear()


def compile_keywords(version: str, wanted: dict[str, Any]) -> dict[str, Any]:
    """`wanted`, less the keywords this torch-tensorrt release does not take (`use_explicit_typing`
    went in 2.13, where every network is explicitly typed). `compile` swallows unknown keywords into
    **kwargs, so one left in would be ignored silently; the lists per release come from each
    release's sources (engines/torch_tensorrt_compile.json, checked by ci/trt-conformance)."""
    release = version.split("+")[0]
    known = TORCH_TRT_KEYWORDS.get(release)
    if known is None:
        raise RuntimeError(
            f"torch-tensorrt {version} is not a release this project was checked against "
            f"({', '.join(TORCH_TRT_KEYWORDS)}): pip install 'torch-tensorrt>=2.10,<2.15'"
        )
    accepted = set(known["torch_tensorrt.dynamo.compile"]["keyword_only"])
    missing = sorted(set(wanted) - accepted - OPTIONAL_KEYWORDS)
    if missing:
        raise RuntimeError(
            f"torch-tensorrt {version} has no compile keyword {', '.join(missing)}: upgrade it"
        )
    return {k: v for k, v in wanted.items() if k in accepted}


def _torch_tensorrt(model: torch.nn.Module, batch: tuple[int, int, int], precision: str) -> torch.nn.Module:
    """Compile with torch-tensorrt (dynamo IR), explicitly typed like every engine of this project:
    FP32 as exported, or FP16 through torch-tensorrt's autocast (it keeps reductions in FP32).
    Without `autocast_low_precision_type` the autocast is a no-op and the engine stays FP32. TF32, which
    TensorRT allows by default, is disabled: FP32 layers stay IEEE FP32 (export/tensorrt_build.py)."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"torch-trt offers fp32 or fp16, got {precision!r}")
    shape = (1, *PATCH_SHAPE)
    inputs = [
        torch_tensorrt.Input(
            min_shape=(batch[0], *shape),
            opt_shape=(batch[1], *shape),
            max_shape=(batch[2], *shape),
            dtype=torch.float32,
        )
        for _ in INPUT_NAMES
    ]
    half = precision == "fp16"
    wanted = {
        "use_explicit_typing": True,
        "disable_tf32": True,
        "enable_autocast": half,
        "autocast_low_precision_type": torch.float16 if half else None,
    }
    return torch_tensorrt.compile(
        model, ir="dynamo", inputs=inputs, **compile_keywords(torch_tensorrt.__version__, wanted)
    )
