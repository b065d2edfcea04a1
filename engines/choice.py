"""Which runner serves an artifact folder fastest on this machine: TensorRT plan > ONNX Runtime GPU >
ONNX Runtime CPU, or None when the folder has no artifact of the precision (the caller falls back
to the PyTorch weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime

from m2anet.engines.environment import tensorrt_missing_reason
from m2anet.engines.spec import BackendSpec
from m2anet.manifest import artifact_name


def fastest_artifact_spec(folder: Path, manifest: dict[str, Any], precision: str) -> BackendSpec | None:
    artifacts = manifest.get("artifacts", {})
    plan, onnx = artifact_name(precision, "plan"), artifact_name(precision, "onnx")
    if plan in artifacts and (folder / plan).is_file() and tensorrt_missing_reason() is None:
        return BackendSpec(f"trt:{folder / plan}")
    if onnx in artifacts and (folder / onnx).is_file():
        gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
        return BackendSpec(f"ort:{'cuda' if gpu else 'cpu'}:{folder / onnx}")
    return None
