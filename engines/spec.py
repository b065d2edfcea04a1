"""`open_backend(spec)`: one string names a backend everywhere (CLI flags, configs, reports).

torch:cpu | torch:cuda[:fp16|bf16] | torch-compile:cuda[:fp16|bf16] | torch-trt:cuda[:fp16]
ort:cpu:PATH.onnx | ort:cuda:PATH.onnx | ort:trt:PATH.onnx
trt:PATH.plan
triton:grpc://HOST:8001[/MODEL] | triton:http://HOST:8000[/MODEL]
"""

from __future__ import annotations

from typing import Any

from m2anet.engines.base import Backend

SPEC_HELP = (
    "torch:cpu, torch:cuda[:fp16], torch-compile:cuda, torch-trt:cuda, ort:cpu:FILE.onnx, "
    "ort:cuda:FILE.onnx, trt:FILE.plan, triton:grpc://HOST:8001[/MODEL]"
)


def artifact_path(spec: str) -> str | None:
    """The artifact file an ort: or trt: spec names; None for specs that name none."""
    kind, _, rest = spec.partition(":")
    if kind == "ort":
        return rest.partition(":")[2] or None
    return (rest or None) if kind == "trt" else None


def open_backend(spec: str, **options: Any) -> Backend:
    """Build a backend; `options` go to its constructor (model_name, heads, threads, ...)."""
    kind, _, rest = spec.partition(":")
    if kind in ("torch", "torch-compile", "torch-trt"):
        device, _, precision = (rest or "cpu").partition(":")
        if device == "cuda" and ":" in precision:  # torch:cuda:1:fp16
            index, _, precision = precision.partition(":")
            device = f"cuda:{index}"
        from m2anet.engines.torch_backend import TorchBackend

        if kind == "torch-trt":
            options.setdefault("tensorrt_batch", (1, 32, 128))
        return TorchBackend(
            device=device, precision=precision or "fp32", compile=kind == "torch-compile", **options
        )
    if kind == "ort":
        device, _, path = rest.partition(":")
        if not path:
            raise ValueError(f"backend spec {spec!r} names no ONNX file: use ort:cpu:FILE.onnx")
        from m2anet.engines.ort_backend import OrtBackend

        return OrtBackend(path, device=device, **options)
    if kind == "trt":
        if not rest:
            raise ValueError(f"backend spec {spec!r} names no engine: use trt:FILE.plan")
        from m2anet.engines.trt_backend import TensorRTBackend

        return TensorRTBackend(rest, **options)
    if kind == "triton":
        if not rest:
            raise ValueError(f"backend spec {spec!r} names no server: use triton:grpc://HOST:8001")
        from m2anet.engines.triton_backend import TritonBackend

        return TritonBackend(rest, **options)
    raise ValueError(f"unknown backend spec {spec!r}: use one of {SPEC_HELP}")
