"""Which backends to benchmark: parsed from `--backend` or discovered for this machine.

A target is a backend spec plus constructor options, written `SPEC@key=value,...` (for example
`torch:cpu@pad_single=false` or `torch-compile:cuda@cuda_graphs=true`), because variants such as
channels-last or the batch-1 padding are options of one spec, not specs of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2anet.engines import Backend, open_backend
from m2anet.engines.spec import artifact_path
from m2anet.export.manifest import read_manifest

PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")
TORCH_CUDA = (
    ("torch:cuda", {}),
    ("torch:cuda:fp16", {}),
    ("torch:cuda", {"channels_last": True}),
    ("torch-compile:cuda", {"cuda_graphs": True}),
)


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Target:
    spec: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def artifact(self) -> Path | None:
        path = artifact_path(self.spec)
        return Path(path) if path else None

    @property
    def label(self) -> str:
        """Independent of where the artifacts live, so reports from two machines compare."""
        path = artifact_path(self.spec)
        prefix = self.spec[: len(self.spec) - len(path)] if path else self.spec
        base = prefix + f"{Path(path).parent.name}/{Path(path).name}" if path else prefix
        opts = ",".join(f"{k}={str(v).lower()}" for k, v in self.options.items())
        return f"{base}@{opts}" if opts else base

    def open(self, model: str, threads: int | None) -> Backend:
        options = dict(self.options)
        if self.spec.startswith("torch"):
            options.setdefault("model_name", model)
        elif self.spec.startswith("ort") and threads:
            options.setdefault("threads", threads)
        return open_backend(self.spec, **options)


def parse(text: str) -> Target:
    spec, sep, opts = text.rpartition("@")
    if not sep or "=" not in opts:
        return Target(text)
    options = {}
    for item in opts.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"backend option {item!r} in {text!r}: write SPEC@key=value,key=value")
        options[key.strip()] = _value(value.strip())
    return Target(spec, options)


def baseline_label(device_kind: str) -> str:
    """The reference every ratio is taken to: PyTorch eager FP32 on the same kind of device."""
    return f"torch:{device_kind}"


def artifacts(folder: Path, suffix: str) -> list[Path]:
    entries = read_manifest(folder).get("artifacts", {})
    names = [n for n in entries if n.endswith(suffix)]
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    names.sort(key=lambda n: rank.get(entries[n].get("precision"), len(rank)))
    return [folder / n for n in names]


def discover(folder: Path) -> list[Target]:
    """Every backend that can run here on the artifacts of `folder`, torch references first.

    On the CPU torch is also run with `pad_single=False`, the batch-1 path that falls into
    aten::slow_conv3d_forward, so the report shows the cliff the padding avoids."""
    onnx = artifacts(folder, ".onnx")
    found = [Target("torch:cpu"), Target("torch:cpu", {"pad_single": False})]
    found += [Target(f"ort:cpu:{p}") for p in onnx]
    if not torch.cuda.is_available():
        return found
    import onnxruntime

    from m2anet.export.tensorrt_build import tensorrt_unavailable

    found += [Target(spec, dict(opts)) for spec, opts in TORCH_CUDA]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        found += [Target(f"ort:cuda:{p}") for p in onnx]
    if tensorrt_unavailable() is None:
        found += [Target(f"trt:{p}") for p in artifacts(folder, ".plan")]
    return found
