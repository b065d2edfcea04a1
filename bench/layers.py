"""Where one forward's time goes, convolution by convolution, next to each convolution's own floor.

A whole network at 19% of its floor says how far it is, not where: a layer with 16 channels at full
resolution may run at its memory floor while a 3-channel attention convolution idles the tensor cores. So
each convolution gets the roofline the network gets in bench.json: its FLOPs over the device's measured
matrix-product peak or its compulsory bytes (input, weight and output once, at the backend's precision) over
the measured copy bandwidth, whichever is longer, against the time its runtime's own profiler gives it.

The convolutions and their shapes come from one forward of the model on the meta device (shapes, no
arithmetic), so a batch of 256 costs nothing to describe. Their times come from
- PyTorch: torch.profiler's operator tree, the outermost convolution operator of each call
  (`aten::convolution` in eager PyTorch and in inductor's calls to cuDNN; oneDNN's fused
  `mkldnn::_convolution_pointwise` in a frozen CPU graph) with everything it launched, which in eager
  PyTorch includes the bias add; kernels on CUDA, operator time on the CPU;
- ONNX Runtime on the CPU: its per-node profile, every node whose operator takes a convolution's input and
  weight (`Conv`, `FusedConv` with its fused activation, `QLinearConv` in an INT8 graph, ...).
A convolution is recognised by its input's and weight's dimensions (in order of size: oneDNN keeps a
transposed weight with its channels swapped, ONNX Runtime's NHWC kernels their input channels-last), so
convolutions with the same shapes share a row. Whatever is not a convolution (BatchNorm, ReLU, the
descriptors, fused elementwise kernels, quantization) is one row, the rest of the forward.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import conv_flop_count

from m2anet.bench.floor import WEIGHT_BYTES, Peaks, floor_seconds, percent_of_floor
from m2anet.engines.base import Backend
from m2anet.engines.ort_backend import OrtBackend
from m2anet.engines.torch_backend import TorchBackend
from m2anet.model import Heads, M2ANet, M2ANetConfig, get_config

CALLS = 5
"""Profiled forwards per batch size, after two unprofiled ones."""

Key = tuple[tuple[int, ...], tuple[int, ...]]
Timed = tuple[Sequence[int], Sequence[int] | None, Sequence[int] | None, float]
"""A profiled convolution call: its input's, weight's and output's shapes (what the profiler recorded; the
torch profiler records no outputs, ONNX Runtime's no prepacked weights) and its seconds."""


def _dims(shape: Sequence[int]) -> tuple[int, ...]:
    """A shape's dimensions in order of size: the same for any layout of the same tensor."""
    return tuple(sorted(shape))


def _key(x: Sequence[int], w: Sequence[int]) -> Key:
    return _dims(x), _dims(w)


def _row_of(
    rows: list[dict[str, Any]], x: Sequence[int], w: Sequence[int] | None, out: Sequence[int] | None
) -> int | None:
    """The index of the one row whose shapes are those recorded (`w` or `out` None: not recorded)."""
    found = [
        i
        for i, row in enumerate(rows)
        if _dims(row["input"]) == _dims(x)
        and (w is None or _dims(row["weight"]) == _dims(w))
        and (out is None or _dims(row["output"]) == _dims(out))
    ]
    return found[0] if len(found) == 1 else None


def convolutions(config: M2ANetConfig, heads: Heads, batch: int) -> list[dict[str, Any]]:
    """The convolutions of one forward of the architecture at `batch`, in the order they run, those with
    the same shapes in one row: names, shapes and FLOPs per forward."""
    with torch.device("meta"):  # built there: no time spent initialising weights
        meta = M2ANet(config, heads).eval()
    rows: dict[Key, dict[str, Any]] = {}

    def seen(
        name: str, module: nn.Conv3d | nn.ConvTranspose3d, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        x, w = tuple(args[0].shape), tuple(module.weight.shape)
        transposed = isinstance(module, nn.ConvTranspose3d)
        row = rows.setdefault(
            _key(x, w),
            {"layers": [], "input": x, "weight": w, "output": tuple(out.shape), "transposed": transposed},
        )
        row["layers"].append(name)
        flop = conv_flop_count(list(x), list(w), list(out.shape), transposed)
        row["gflop"] = len(row["layers"]) * flop / 1e9

    for name, module in meta.named_modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            module.register_forward_hook(functools.partial(seen, name))
    ct = torch.zeros(batch, 1, *config.inputs.patch_shape_zyx, device="meta")
    with torch.no_grad():
        meta(ct, ct)
    return list(rows.values())


def not_profiled(backend: Backend) -> str | None:
    """Why `backend` gets no layer profile, or None."""
    if isinstance(backend, TorchBackend) and backend.name != "torch-trt":
        return None
    if isinstance(backend, OrtBackend) and backend.device == "cpu":
        return None
    return (
        "--layers reads PyTorch's profiler and ONNX Runtime's on the CPU (not TensorRT's, not GPU providers')"
    )


def profile_layers(backend: Backend, ct: np.ndarray, mask: np.ndarray, calls: int = CALLS) -> dict[str, Any]:
    """Time per forward of each convolution of `backend` on one batch (`ct`, `mask`), and of the rest."""
    if isinstance(backend, OrtBackend):
        model = backend.manifest.get("model")
        if model is None:
            raise ValueError(f"{backend.path.parent}'s manifest names no model: profile an m2a-export folder")
        rows = convolutions(get_config(model["name"]), model["heads"], len(ct))
        total, timed = _onnx_runtime_times(backend, ct, mask, calls)
        return _attribute(rows, timed, total, len(ct), len(ct), calls, "ONNX Runtime nodes")
    assert isinstance(backend, TorchBackend), not_profiled(backend)
    ran = 2 if backend.pad_single and len(ct) == 1 else len(ct)  # the CPU's single node runs as a pair
    rows = convolutions(backend.model.config, backend.model.heads, ran)
    total, timed = _torch_times(backend, ct, mask, calls)
    timer = "CUDA kernels" if backend.torch_device.type == "cuda" else "CPU operators"
    return _attribute(rows, timed, total, len(ct), ran, calls, timer)


def _attribute(
    rows: list[dict[str, Any]],
    timed: Iterable[Timed],
    total: float,
    batch: int,
    ran: int,
    calls: int,
    timer: str,
) -> dict[str, Any]:
    """Seconds of each timed convolution (summed over the profiled calls) into its row, per forward; a call
    no row or more than one row matches counts as another convolution."""
    spent = [0.0] * len(rows)
    unknown = 0.0
    for x, w, out, seconds in timed:
        i = _row_of(rows, x, w, out)
        if i is None:
            unknown += seconds
        else:
            spent[i] += seconds
    for row, seconds in zip(rows, spent, strict=True):
        row["ms"] = seconds * 1e3 / calls
    return {
        "batch": batch,
        "ran_as": ran,
        "calls": calls,
        "timer": timer,
        "total_ms": total * 1e3 / calls,
        "rest_ms": (total - sum(spent) - unknown) * 1e3 / calls,
        "unmatched_conv_ms": unknown * 1e3 / calls,
        "rows": rows,
    }


@functools.cache
def _torch_conv_arguments(name: str, arity: int) -> tuple[int, int] | None:
    """Positions of the input and the weight among the `arity` arguments of operator `name`, from its
    schema; None when it is not a convolution. The profiler names operators without their overload, and
    oneDNN's binary fused convolution puts its residual first."""
    if "convolution" not in name:
        return None
    for schema in torch._C._jit_get_schemas_for_operator(name):
        names = [a.name for a in schema.arguments]
        if len(names) == arity:
            return _input_and_weight(names)
    return None


def _input_and_weight(names: list[str]) -> tuple[int, int] | None:
    for x, w in (("input", "weight"), ("X", "W"), ("x", "w")):
        if x in names and w in names:
            return names.index(x), names.index(w)
    return None


def _torch_conv(event: Any) -> tuple[list[int], list[int]] | None:
    """The input's and weight's shapes of a convolution operator's call; None for other operators."""
    where = _torch_conv_arguments(event.name, len(event.input_shapes))
    return None if where is None else (event.input_shapes[where[0]], event.input_shapes[where[1]])


def _outermost(event: Any) -> bool:
    """Not inside another convolution operator (`aten::convolution` runs `aten::_convolution`, ...)."""
    parent = event.cpu_parent
    while parent is not None:
        if _torch_conv(parent) is not None:
            return False
        parent = parent.cpu_parent
    return True


def _torch_times(
    backend: TorchBackend, ct: np.ndarray, mask: np.ndarray, calls: int
) -> tuple[float, list[Timed]]:
    """torch.profiler over `calls` forwards. CUDA graphs are not replayed here: their kernels, launched one
    by one as the graph would replay them, are what the profiler can attribute to operators."""
    cuda = backend.torch_device.type == "cuda"
    x, m = (torch.from_numpy(a).to(backend.torch_device) for a in (ct, mask))
    for _ in range(2):
        backend.infer_torch(x, m, replay=False)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            backend.infer_torch(x, m, replay=False)
        if cuda:
            torch.cuda.synchronize(backend.torch_device)

    def seconds(event: Any) -> float:
        return (event.device_time_total if cuda else event.cpu_time_total) / 1e6

    # the device's own events (kernels, copies) are listed beside the operators that launched them
    operators = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    if cuda:
        total = (
            sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
        )
    else:
        total = sum(seconds(e) for e in operators if e.cpu_parent is None)
    timed: list[Timed] = [
        (*shapes, None, seconds(e))
        for e in operators
        if (shapes := _torch_conv(e)) is not None and _outermost(e)
    ]
    return total, timed


@functools.cache
def _onnx_conv_arguments(op: str) -> tuple[int, int] | None:
    """Positions of a convolution's input and weight among the inputs of ONNX Runtime operator `op` (in any
    domain: `FusedConv` is ONNX Runtime's own), from the schemas it registers; None for other operators."""
    from onnxruntime.capi import _pybind_state

    if "Conv" not in op:
        return None
    for schema in _pybind_state.get_all_operator_schema():
        if schema.name == op:
            return _input_and_weight([i.name for i in schema.inputs])
    return None


def _onnx_runtime_times(
    backend: OrtBackend, ct: np.ndarray, mask: np.ndarray, calls: int
) -> tuple[float, list[Timed]]:
    """ONNX Runtime's per-node profile of `calls` runs in a second session of the same graph and options
    (after two more that the profile also holds, left out): each node's kernel time."""
    with tempfile.TemporaryDirectory() as folder:
        session = backend.new_session(str(Path(folder) / "profile"))
        for _ in range(2 + calls):
            session.run(None, {"ct": ct, "mask": mask})
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-calls:]
    nodes = [
        e
        for e in events
        if e.get("cat") == "Node"
        and e["name"].endswith("_kernel_time")
        and runs[0][0] <= e["ts"] <= runs[-1][1]
    ]
    timed: list[Timed] = []
    for e in nodes:
        where = _onnx_conv_arguments(e["args"]["op_name"])
        if where is not None:
            shapes = [next(iter(t.values())) for t in e["args"]["input_type_shape"]]
            (out,) = (next(iter(t.values())) for t in e["args"]["output_type_shape"])
            # a weight ONNX Runtime prepacked is left out of the recorded inputs: then the bias is second
            w = shapes[where[1]] if len(shapes) > where[1] and len(shapes[where[1]]) > 1 else None
            timed.append((shapes[where[0]], w, out, e["dur"] / 1e6))
    return sum(e["dur"] for e in nodes) / 1e6, timed


def annotate(layers: dict[str, Any], peaks: Peaks, precision: str) -> None:
    """Each row's floor at the backend's precision and the share of it the measured time reaches."""
    width = WEIGHT_BYTES.get(precision, 4)
    for row in layers["rows"]:
        moved = width * sum(math.prod(row[k]) for k in ("input", "weight", "output")) * len(row["layers"])
        seconds = floor_seconds(row["gflop"] * 1e9, moved, peaks.best_flops(precision), peaks.bandwidth)
        row["floor_ms"] = 1e3 * seconds
        row["pct_of_floor"] = percent_of_floor(row["floor_ms"], row["ms"]) if row["ms"] > 0 else None


def _shape(shape: tuple[int, ...] | list[int]) -> str:
    return "×".join(map(str, shape[1:]))


def _names(row: dict[str, Any], at_most: int) -> str:
    names = row["layers"]
    return ", ".join(names) if len(names) <= at_most else f"{names[0]} +{len(names) - 1}"


def markdown(backend: dict[str, Any], layers: dict[str, Any]) -> list[str]:
    """One table per profiled batch: a row per convolution shape, then the rest of the forward."""
    total = layers["total_ms"]
    convs = sum(r["ms"] for r in layers["rows"])
    batch = f"batch {layers['batch']}" + (
        f" (run as {layers['ran_as']})" if layers["ran_as"] != layers["batch"] else ""
    )
    lines = [
        f"### {backend['backend']} ({backend['precision']}), {batch}: "
        f"{total:.3f} ms of {layers['timer']} per forward, {100 * convs / total:.0f}% in convolutions",
        "",
        "| layers | in → out (C×D×H×W) | GFLOP | ms | TFLOP/s | floor ms | % of floor | share |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in layers["rows"]:
        kind = " (transposed)" if r["transposed"] else ""
        rate = f"{r['gflop'] / r['ms']:.3g}" if r["ms"] > 0 else "-"
        pct = "-" if r.get("pct_of_floor") is None else f"{r['pct_of_floor']:.1f}"
        floor_ms = "-" if "floor_ms" not in r else f"{r['floor_ms']:.3f}"
        lines.append(
            f"| {_names(r, 3)}{kind} | {_shape(r['input'])} → {_shape(r['output'])} | {r['gflop']:.2f} "
            f"| {r['ms']:.3f} | {rate} | {floor_ms} | {pct} | {100 * r['ms'] / total:.1f}% |"
        )
    if layers["unmatched_conv_ms"]:
        lines.append(f"| other convolutions | | | {layers['unmatched_conv_ms']:.3f} | | | | |")
    rest = layers["rest_ms"]
    lines += [f"| everything else | | | {rest:.3f} | | | | {100 * rest / total:.1f}% |", ""]
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    """layers.md: every profiled backend's tables, and which backends have none and why."""
    lines = [
        "# m2a-bench --layers",
        "",
        "Each convolution's time per forward against its own floor: its FLOPs over the measured "
        "matrix-product peak of the backend's precision or its input, weight and output bytes over the "
        "measured copy bandwidth, whichever is longer (bench.md has the peaks). Convolutions with the same "
        "input and weight shapes share a row. In eager PyTorch a convolution's time includes its bias add; "
        "CUDA graphs' kernels are launched one by one to be attributed.",
        "",
    ]
    skipped = []
    for b in report["backends"]:
        for layers in b.get("layers", []):
            lines += markdown(b, layers)
        if b.get("layers_error"):
            skipped.append(f"* {b['backend']}: {b['layers_error']}")
    if skipped:
        lines += ["Not profiled:", "", *skipped, ""]
    return "\n".join(lines)


def figure(report: dict[str, Any]) -> Any:
    """layers.png's figure: per backend, at its largest profiled batch, each convolution's time and floor;
    None when no backend was profiled."""
    import matplotlib.pyplot as plt

    panels = [(b, b["layers"][-1]) for b in report["backends"] if b.get("layers")]
    if not panels:
        return None
    count = max(len(layers["rows"]) for _, layers in panels)
    size = (5 * len(panels) + 2, 0.28 * count + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=size, squeeze=False, sharex=True)
    for ax, (b, layers) in zip(axes[0], panels, strict=True):
        rows = layers["rows"]
        ys = range(len(rows) + 1)
        ax.barh(ys, [*(r["ms"] for r in rows), layers["rest_ms"]], color="tab:blue", label="measured")
        ax.barh(ys[:-1], [r.get("floor_ms", 0.0) for r in rows], height=0.35, color="black", label="floor")
        ax.set_yticks(ys, [*(_names(r, 1) for r in rows), "everything else"])
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set(xlabel="ms per forward", title=f"{b['backend']}, batch {layers['batch']}")
        ax.legend(fontsize=7)
    return fig
