"""One grammar names a backend everywhere: CLI flags, configs, reports, the classifier.

    torch:DEVICE[:PRECISION]  torch-compile:...  torch-trt:...   DEVICE cpu | cuda | cuda:N
    ort:PROVIDER[:FILE.onnx]                                     PROVIDER cpu | cuda | trt
    trt[:FILE.plan]
    triton:grpc://HOST:8001[/MODEL] | triton:http://HOST:8000[/MODEL]

PRECISION of the torch kinds: fp32 (IEEE, TF32 off), tf32, fp16 or bf16 (autocast, channels-last).
Any spec may end in `@key=value,...`: options of one runner (`torch:cpu@pad_single=false`,
`torch:cuda:fp16@channels_last=false,cuda_graphs=true`), because variants such as channels-last are
options of one backend, not backends of their own. A spec without its file (`ort:cpu`, `trt`) names a way to
run an artifact folder; whoever holds the folder supplies the file (`with_artifact`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2anet.engines.base import Backend

SPEC_HELP = (
    "torch:cpu, torch:cuda[:tf32|fp16|bf16], torch-compile:cuda[:...], torch-trt:cuda, ort:cpu:FILE.onnx, "
    "ort:cuda:FILE.onnx, ort:trt:FILE.onnx, trt:FILE.plan, triton:grpc://HOST:8001[/MODEL]"
)
TORCH_PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
ORT_PROVIDERS = ("cpu", "cuda", "trt")

RUNNERS = {
    "torch": "m2anet.engines.torch_backend:TorchBackend",
    "torch-compile": "m2anet.engines.torch_backend:TorchBackend",
    "torch-trt": "m2anet.engines.torch_backend:TorchBackend",
    "ort": "m2anet.engines.ort_backend:OrtBackend",
    "trt": "m2anet.engines.trt_backend:TensorRTBackend",
    "triton": "m2anet.engines.triton_backend:TritonBackend",
}
"""The registry of backend kinds: each runner module is imported only when a backend of its kind
opens, so ONNX Runtime users never load TensorRT or tritonclient."""


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def _fields(spec: str) -> tuple[str, str | None, str | None, str | None]:
    """(kind, device, precision, target) of a spec without options; ValueError naming the fix."""
    kind, _, rest = spec.partition(":")
    if kind not in RUNNERS:
        raise ValueError(f"unknown backend spec {spec!r}: use one of {SPEC_HELP}")
    if kind.startswith("torch"):
        device, _, precision = (rest or "cpu").partition(":")
        if device == "cuda" and precision.partition(":")[0].isdigit():  # torch:cuda:1:fp16
            index, _, precision = precision.partition(":")
            device = f"cuda:{index}"
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"backend spec {spec!r}: the device is cpu, cuda or cuda:N")
        precision = precision or "fp32"
        if precision not in TORCH_PRECISIONS:
            raise ValueError(f"backend spec {spec!r}: precision is one of {', '.join(TORCH_PRECISIONS)}")
        return kind, device, precision, None
    if kind == "ort":
        provider, _, path = rest.partition(":")
        if provider not in ORT_PROVIDERS:
            raise ValueError(f"backend spec {spec!r}: use ort:cpu|cuda|trt:FILE.onnx")
        return kind, provider, None, path or None
    if kind == "trt":
        return kind, "cuda", None, rest or None
    if not rest:
        raise ValueError(f"backend spec {spec!r} names no server: use triton:grpc://HOST:8001")
    return kind, None, None, rest


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec: `spec` (without options) and its runner `options`."""

    spec: str
    options: dict[str, Any] = field(default_factory=dict)
    kind: str = field(init=False)
    device: str | None = field(init=False)
    """torch: cpu | cuda[:N]; ort: the provider; trt: cuda; triton: None."""
    precision: str | None = field(init=False)
    """torch kinds only: an artifact's precision is in its manifest."""
    target: str | None = field(init=False)
    """The artifact file (ort, trt) or server URL (triton)."""

    def __post_init__(self) -> None:
        for name, value in zip(("kind", "device", "precision", "target"), _fields(self.spec), strict=True):
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, text: str) -> BackendSpec:
        spec, sep, opts = text.rpartition("@")
        if not sep or "=" not in opts:
            return cls(text)
        options = {}
        for item in opts.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"backend option {item!r} in {text!r}: write SPEC@key=value,key=value")
            options[key.strip()] = _value(value.strip())
        return cls(spec, options)

    @property
    def artifact(self) -> Path | None:
        """The artifact file an ort: or trt: spec names."""
        return Path(self.target) if self.kind in ("ort", "trt") and self.target else None

    @property
    def label(self) -> str:
        """Independent of where the artifacts live, so reports from two machines compare."""
        base = self.spec
        if self.artifact is not None:
            prefix = self.spec[: len(self.spec) - len(str(self.target))]
            base = prefix + "/".join(p for p in (self.artifact.parent.name, self.artifact.name) if p)
        opts = ",".join(f"{k}={str(v).lower()}" for k, v in self.options.items())
        return f"{base}@{opts}" if opts else base

    def with_artifact(self, path: str | Path) -> BackendSpec:
        """`ort:cpu` + FILE -> `ort:cpu:FILE`; `trt` + FILE -> `trt:FILE`."""
        head = "trt" if self.kind == "trt" else f"ort:{self.device}"
        return BackendSpec(f"{head}:{path}", self.options)

    def _runner(self) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """The runner class and the arguments the spec itself gives it; ValueError naming the fix for an
        option after `@` that the runner does not take (a typo, or one the spec already sets)."""
        if self.kind in ("ort", "trt") and self.target is None:
            what = "ONNX file: use ort:cpu:FILE.onnx" if self.kind == "ort" else "engine: use trt:FILE.plan"
            raise ValueError(f"backend spec {self.spec!r} names no {what}")
        module, _, name = RUNNERS[self.kind].partition(":")
        runner = getattr(importlib.import_module(module), name)
        args: tuple[Any, ...] = (self.target,)
        given: dict[str, Any] = {"device": self.device} if self.kind == "ort" else {}
        if self.kind.startswith("torch"):
            args, given = (), {"device": self.device, "precision": self.precision}
            given["compile"] = self.kind == "torch-compile"
        names = [n for n in list(inspect.signature(runner).parameters)[len(args) :] if n not in given]
        for key in self.options:
            if key not in names:
                raise ValueError(
                    f"backend spec {self.spec!r} has no option {key!r}: {self.kind} takes {', '.join(names)}"
                )
        return runner, args, given

    def check(self) -> None:
        """Bad input of the spec (a missing file name, an unknown option) as ValueError, before anything
        opens; `open` checks the same."""
        self._runner()

    def open(self, **options: Any) -> Backend:
        """The runner; `options` (model_name, heads, threads, ...) add to the spec's own."""
        runner, args, given = self._runner()
        options = {**options, **self.options}
        if self.kind == "torch-trt":
            options.setdefault("tensorrt_batch", (1, 32, 128))
        return runner(*args, **given, **options)


def open_backend(spec: str | BackendSpec, **options: Any) -> Backend:
    """Build a backend from its spec; `options` go to its constructor (model_name, heads, threads, ...)."""
    return (spec if isinstance(spec, BackendSpec) else BackendSpec.parse(spec)).open(**options)
