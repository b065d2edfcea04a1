"""An `m2a-export` folder -> a Triton Inference Server model repository (`m2a-triton`).

Hospitals that outgrow one GPU serve the same verified artifacts from Triton rather than from a
home-made server. The repository holds `MODEL/config.pbtxt` and `MODEL/1/model.plan` (platform
`tensorrt_plan`) or `MODEL/1/model.onnx` (`onnxruntime_onnx`, with ONNX Runtime's TensorRT
execution accelerator). The config is built as a `model_config_pb2.ModelConfig` message, the
protobuf definition Triton itself parses, so a misspelt field fails here rather than in the
server. Its `parameters` record the artifact's sha256, precision, model and decision threshold,
which the ONNX Runtime and TensorRT backends do not read and `NodeClassifier` reads back to report
what it ran.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from m2anet.io import atomic_path, is_plain_name
from m2anet.manifest import ArtifactError, artifact_entry, artifact_name, check_parity, read_manifest

PRECISION_MODE = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}
"""ONNX Runtime TensorRT accelerator `precision_mode` per artifact precision (INT8 honours the QDQ nodes)."""


def _data_type(dtype: str) -> int:
    names = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
    if dtype not in names:
        raise ArtifactError(f"tensor dtype {dtype!r} has no Triton mapping here: re-export with m2a-export")
    return mc.DataType.Value(names[dtype])


def model_config(
    manifest: dict[str, Any],
    artifact: str,
    *,
    name: str = "m2anet",
    queue_delay_us: int = 100,
    instances: int = 1,
) -> mc.ModelConfig:
    """The Triton config of one manifest artifact; dims leave out the batch, which Triton adds."""
    entry = manifest["artifacts"][artifact]
    profile = manifest["batch_profile"]
    plan = entry["format"] == "tensorrt"
    config = mc.ModelConfig(
        name=name,
        platform="tensorrt_plan" if plan else "onnxruntime_onnx",
        max_batch_size=int(profile["max"]),
    )
    for group, tensors in ((config.input, entry["inputs"]), (config.output, entry["outputs"])):
        for tensor in tensors:
            group.add(name=tensor["name"], data_type=_data_type(tensor["dtype"]), dims=tensor["shape"][1:])
    preferred = sorted({int(profile["opt"]), int(profile["max"])})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
    if not plan:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt"
        )
        accelerator.parameters["precision_mode"] = PRECISION_MODE[entry["precision"]]
        accelerator.parameters["max_workspace_size_bytes"] = str(1 << 30)
    model = manifest["model"]
    for key, value in {
        "m2anet_model": model["name"],
        "m2anet_heads": model["heads"],
        "m2anet_threshold": repr(float(model["threshold"])),
        "m2anet_precision": entry["precision"],
        "m2anet_artifact": artifact,
        "m2anet_sha256": entry["sha256"],
    }.items():
        config.parameters[key].string_value = value
    return config


def pick_artifact(manifest: dict[str, Any], precision: str, fmt: str) -> str:
    """`model.PRECISION.plan` when asked for or (auto) when exported, else the ONNX graph."""
    artifacts = manifest.get("artifacts", {})
    candidates = {"plan": [artifact_name(precision, "plan")], "onnx": [artifact_name(precision, "onnx")]}
    candidates["auto"] = candidates["plan"] + candidates["onnx"]
    for name in candidates[fmt]:
        if name in artifacts:
            return name
    raise ArtifactError(
        f"the manifest lists no {' or '.join(candidates[fmt])}: run m2a-export --precision {precision}"
    )


def write_repository(
    folder: str | Path,
    out: str | Path,
    *,
    precision: str = "fp16",
    fmt: str = "auto",
    name: str = "m2anet",
    queue_delay_us: int = 100,
    instances: int = 1,
    allow_parity_fail: bool = False,
) -> Path:
    """Copy one verified artifact into `out/NAME/1/` and write `out/NAME/config.pbtxt`."""
    if not is_plain_name(name):
        raise ValueError(
            f"model name {name!r} is not a folder name inside the repository: use letters, digits, '-', '_'"
        )
    folder = Path(folder)
    manifest = read_manifest(folder)
    artifact = pick_artifact(manifest, precision, fmt)
    entry = artifact_entry(folder / artifact)  # refuses a corrupted or replaced file
    check_parity(artifact, entry, allow_parity_fail)
    config = model_config(manifest, artifact, name=name, queue_delay_us=queue_delay_us, instances=instances)
    model_dir = Path(out) / name
    target = model_dir / "1" / ("model.plan" if entry["format"] == "tensorrt" else "model.onnx")
    with atomic_path(target) as tmp:
        shutil.copyfile(folder / artifact, tmp)
    with atomic_path(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(text_format.MessageToString(config))
    return model_dir
