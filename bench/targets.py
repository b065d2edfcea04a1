"""Which backends to benchmark: given as specs (`SPEC@key=value,...`) or discovered for this machine."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import torch

from m2anet.engines import Backend, BackendSpec
from m2anet.engines.environment import tensorrt_missing_reason
from m2anet.manifest import read_manifest

PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")
TORCH_CUDA: tuple[tuple[str, dict[str, bool]], ...] = (
    ("torch:cuda", {}),
    ("torch:cuda:tf32", {}),
    ("torch:cuda:fp16", {}),
    ("torch:cuda:bf16", {}),
    ("torch:cuda:fp16", {"cuda_graphs": True}),
    ("torch:cuda:bf16", {"cuda_graphs": True}),
    ("torch-compile:cuda:fp16", {}),
    ("torch-compile:cuda:bf16", {}),
)
"""The PyTorch GPU paths, cheapest first: eager in each precision (FP32 is the baseline; FP16 and BF16
channels-last), eager with one CUDA graph per batch size, and torch.compile with CUDA graphs, which
compiles once per process and batch shape (partly cached across runs) and comes last."""


def open_target(target: BackendSpec, model: str, threads: int | None) -> Backend:
    """PyTorch targets run `model`; artifact targets run their own file."""
    defaults: dict = {}
    if target.kind.startswith("torch"):
        defaults["model_name"] = model
    elif target.kind == "ort" and threads:
        defaults["threads"] = threads
    return target.open(**defaults)


def baseline_label(device_kind: str) -> str:
    """The reference every ratio is taken to: PyTorch eager FP32 on the same kind of device."""
    return f"torch:{device_kind}"


def artifacts(folder: Path, suffix: str) -> list[Path]:
    entries = read_manifest(folder).get("artifacts", {})
    names = [n for n in entries if n.endswith(suffix)]
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    names.sort(key=lambda n: rank.get(entries[n].get("precision"), len(rank)))
    return [folder / n for n in names]


def discover(folder: Path) -> list[BackendSpec]:
    """Every backend that can run here on the artifacts of `folder`, torch references first.

    On the CPU torch is also run with `pad_single=False`, the batch-1 path that falls into
    aten::slow_conv3d_forward, so the report shows the cliff the padding avoids."""
    onnx = artifacts(folder, ".onnx")
    found = [BackendSpec("torch:cpu"), BackendSpec("torch:cpu", {"pad_single": False})]
    found += [BackendSpec(f"ort:cpu:{p}") for p in onnx]
    if not torch.cuda.is_available():
        return found
    found += [BackendSpec(spec, dict(opts)) for spec, opts in TORCH_CUDA]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        found += [BackendSpec(f"ort:cuda:{p}") for p in onnx]
    if tensorrt_missing_reason() is None:
        found += [BackendSpec(f"trt:{p}") for p in artifacts(folder, ".plan")]
    return found
