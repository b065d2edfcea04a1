"""Where one forward's time goes, convolution by convolution, next to each convolution's own floor.

A whole network at 19% of its floor says how far it is, not where: a layer with 16 channels at full
resolution may run at its memory floor while a 3-channel attention convolution idles the tensor cores. So
each convolution gets the roofline the network gets in bench.json: its FLOPs over the device's measured
matrix-product peak or its compulsory bytes (input, weight and output once, at the backend's precision) over
the measured copy bandwidth, whichever is longer, against the time torch.profiler gives it.

The convolutions and their shapes come from one forward of the model on the meta device (shapes, no
arithmetic), so a batch of 256 costs nothing to describe. Their times come from the profiler's operator
tree: the outermost convolution operator of each call (`aten::convolution` in eager PyTorch and in inductor's
calls to cuDNN; oneDNN's fused `mkldnn::_convolution_pointwise` in a frozen CPU graph) with everything it
launched, which in eager PyTorch includes the bias add. Kernels on CUDA, operator time on the CPU.
Convolutions with the same input shape and weight cannot be told apart in a profile, so they share a row.
Whatever is not a convolution (BatchNorm, ReLU, the descriptors, inductor's fused elementwise kernels) is
one row, the rest of the forward.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import conv_flop_count

from m2anet.bench.floor import WEIGHT_BYTES, Peaks, floor_seconds, percent_of_floor
from m2anet.engines.torch_backend import TorchBackend
from m2anet.model import M2ANet

CALLS = 5
"""Profiled forwards per batch size, after two unprofiled ones."""


def convolutions(model: M2ANet, batch: int) -> list[dict[str, Any]]:
    """The convolutions of one forward of `model`'s architecture at `batch`, in the order they run, those
    with the same input shape and weight in one row: names, shapes, calls and FLOPs per forward."""
    with torch.device("meta"):  # built there: no time spent initialising weights
        meta = M2ANet(model.config, model.heads).eval()
    rows: dict[tuple[tuple[int, ...], tuple[int, ...]], dict[str, Any]] = {}

    def seen(
        name: str, module: nn.Conv3d | nn.ConvTranspose3d, args: tuple[torch.Tensor, ...], out: torch.Tensor
    ) -> None:
        x, w = tuple(args[0].shape), tuple(module.weight.shape)
        transposed = isinstance(module, nn.ConvTranspose3d)
        row = rows.setdefault(
            (x, tuple(sorted(w))),
            {"layers": [], "input": x, "weight": w, "output": tuple(out.shape), "transposed": transposed},
        )
        row["layers"].append(name)
        flop = conv_flop_count(list(x), list(w), list(out.shape), transposed)
        row["gflop"] = len(row["layers"]) * flop / 1e9

    for name, module in meta.named_modules():
        if isinstance(module, nn.Conv3d | nn.ConvTranspose3d):
            module.register_forward_hook(functools.partial(seen, name))
    ct = torch.zeros(batch, 1, *model.config.inputs.patch_shape_zyx, device="meta")
    with torch.no_grad():
        meta(ct, ct)
    return list(rows.values())


@functools.cache
def _conv_arguments(name: str, arity: int) -> tuple[int, int] | None:
    """Positions of the input and the weight among the `arity` arguments of operator `name`, from its
    schema; None when it is not a convolution. The profiler names operators without their overload, and
    oneDNN's binary fused convolution puts its residual first."""
    if "convolution" not in name:
        return None
    for schema in torch._C._jit_get_schemas_for_operator(name):
        names = [a.name for a in schema.arguments]
        if len(names) == arity and {"input", "weight"} <= set(names):
            return names.index("input"), names.index("weight")
        if len(names) == arity and {"X", "W"} <= set(names):
            return names.index("X"), names.index("W")
    return None


def _conv_key(event: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The input's shape and the weight's dimensions in order of size: oneDNN keeps a transposed
    convolution's weight with its two channel dimensions swapped."""
    where = _conv_arguments(event.name, len(event.input_shapes))
    if where is None:
        return None
    x, w = (event.input_shapes[i] for i in where)
    return tuple(x), tuple(sorted(w))


def _outermost(event: Any) -> bool:
    """Not inside another convolution operator (`aten::convolution` runs `aten::_convolution`, ...)."""
    parent = event.cpu_parent
    while parent is not None:
        if _conv_key(parent) is not None:
            return False
        parent = parent.cpu_parent
    return True


def profile_layers(
    backend: TorchBackend, ct: np.ndarray, mask: np.ndarray, calls: int = CALLS
) -> dict[str, Any]:
    """Time per forward of each convolution of `backend` on one batch (`ct`, `mask`), and of the rest.

    CUDA graphs are not replayed here: their kernels, launched one by one as the graph would replay them,
    are what the profiler can attribute to operators."""
    cuda = backend.torch_device.type == "cuda"
    ran = 2 if backend.pad_single and len(ct) == 1 else len(ct)  # the CPU's single node runs as a pair
    rows = convolutions(backend.model, ran)
    index = {(row["input"], tuple(sorted(row["weight"]))): row for row in rows}
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
        return (event.device_time_total if cuda else event.cpu_time_total) / 1e6 / calls

    events = prof.events()
    total = sum(seconds(e) for e in events if e.cpu_parent is None)
    spent = dict.fromkeys(index, 0.0)
    unknown = 0.0
    for event in events:
        key = _conv_key(event)
        if key is None or not _outermost(event):
            continue
        if key in spent:
            spent[key] += seconds(event)
        else:
            unknown += seconds(event)
    for key, row in index.items():
        row["ms"] = spent[key] * 1e3
    return {
        "batch": len(ct),
        "ran_as": ran,
        "calls": calls,
        "timer": "CUDA kernels" if cuda else "CPU operators",
        "total_ms": total * 1e3,
        "rest_ms": (total - sum(spent.values()) - unknown) * 1e3,
        "unmatched_conv_ms": unknown * 1e3,
        "rows": rows,
    }


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
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2, 0.28 * count + 1.5), squeeze=False)
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
