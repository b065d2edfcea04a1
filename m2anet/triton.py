"""An `m2a-export` folder -> a Triton Inference Server model repository (`m2a-triton`).

Hospitals that outgrow one GPU serve the same verified artifacts from Triton rather than from a
home-made server. The repository holds `MODEL/config.pbtxt` and `MODEL/1/model.plan` (platform
`tensorrt_plan`, preferred where exported) or `MODEL/1/model.onnx` (`onnxruntime_onnx`, with ONNX
Runtime's TensorRT execution accelerator, its engine cache and the manifest's batch profile), and
`MODEL/warmup/mask` for the warmup requests Triton sends before it reports the model ready. The
config is built as a `model_config_pb2.ModelConfig` message, the protobuf definition Triton itself
parses, so a misspelt field fails here rather than in the server. Its `parameters` record the
artifact's sha256, precision, model and decision threshold, which the ONNX Runtime and TensorRT
backends do not read and `NodeClassifier` reads back to report what it ran.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from m2anet.engines.ort_backend import ORT_TRT_CACHE, trt_engine_cache_prefix, trt_profile_shapes
from m2anet.io import atomic_path
from m2anet.manifest import ArtifactError, artifact_entry, artifact_name, check_parity, read_manifest

PRECISION_MODE = {"fp32": "FP32", "fp16": "FP32", "int8": "INT8"}
"""ONNX Runtime TensorRT accelerator `precision_mode` per artifact precision: the graph's, never FP16.

Triton maps FP16 to ONNX Runtime's trt_fp16_enable, which lets TensorRT run in FP16 the parts that
model.fp16.onnx keeps in FP32 (neither Triton's onnxruntime backend nor the provider has a strongly
typed mode), so the parity proved on the graph would not carry over. Under FP32 the FP16 graph's FP16
parts may run in FP32: slower, never less accurate; the plan (strongly typed) runs them in FP16. INT8
maps to trt_int8_enable, which a weakly typed TensorRT 10 network needs to accept the graph's explicit
Q/DQ; TensorRT then quantizes where they are and nowhere else. TF32 has no accelerator parameter: TensorRT
allows it for FP32 layers unless the server runs with NVIDIA_TF32_OVERRIDE=0, so serve the plan (TF32
cleared at build) where FP32 must be IEEE FP32 (`ort_backend.precision_run`)."""
MODEL_NAME = re.compile(r"[A-Za-z0-9_-]+")
"""The model's folder, its config's name and a path segment of the server's HTTP URLs."""
WARMUP_MASK = "mask"
"""The warmup sample's mask, a file in MODEL/warmup/ (Triton's `input_data_file`)."""
ONNX_HEADER = (
    "# ONNX Runtime's TensorRT accelerator keeps the graph's precision: precision_mode is never FP16\n"
    "# (that would run in FP16 what model.fp16.onnx keeps in FP32); INT8 only for the Q/DQ graph.\n"
)


def _data_type(dtype: str) -> int:
    names = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
    if dtype not in names:
        raise ArtifactError(f"tensor dtype {dtype!r} has no Triton mapping here: re-export with m2a-export")
    return mc.DataType.Value(names[dtype])


def warmup_mask(shape: list[int]) -> np.ndarray:
    """One patch's mask for the warmup requests: a node contour at the patch centre.

    Triton runs no checks of ours, but a warmup request should be one a scanner could send: an empty
    mask is outside the input contract (`check_inputs` refuses it) and would run the model on empty
    rings and zero contour moments, which no request has.
    """
    mask = np.zeros(shape, np.float32)
    d, h, w = shape[-3:]
    mask[..., d // 2 - 2 : d // 2 + 2, h // 2 - 6 : h // 2 + 6, w // 2 - 6 : w // 2 + 6] = 1.0
    return mask


def model_config(
    manifest: dict[str, Any],
    artifact: str,
    *,
    name: str = "m2anet",
    queue_delay_us: int = 100,
    instances: int = 1,
    engine_cache: str | None = None,
) -> mc.ModelConfig:
    """The Triton config of one manifest artifact; dims leave out the batch, which Triton adds.

    `engine_cache`: where the server may write ONNX Runtime's TensorRT engine and timing caches (its
    parent must exist there); by default MODEL/ort-trt-cache under /models, where docs/embedding.md
    mounts the repository.
    """
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
        cache = engine_cache or f"/models/{name}/{ORT_TRT_CACHE}"
        accelerator.parameters.update(
            {
                "precision_mode": PRECISION_MODE[entry["precision"]],
                "max_workspace_size_bytes": str(1 << 30),
                "trt_engine_cache_enable": "1",
                "trt_engine_cache_path": cache,
                "trt_engine_cache_prefix": trt_engine_cache_prefix(manifest, artifact),
                "trt_timing_cache_enable": "1",
                "trt_timing_cache_path": cache,
                **trt_profile_shapes(manifest, artifact),
            }
        )
    # one warmup request per point of the batch profile: a zero CT (a valid patch: -175 HU, air and
    # fat) with a node contour at its centre; the first builds ONNX Runtime's engine before Triton
    # reports the model ready, the others set up TensorRT for those shapes
    for batch in sorted({int(profile[point]) for point in ("min", "opt", "max")}):
        warmup = config.model_warmup.add(name=f"batch_{batch}", batch_size=batch)
        for tensor in entry["inputs"]:
            sample = warmup.inputs[tensor["name"]]
            sample.data_type = _data_type(tensor["dtype"])
            sample.dims.extend(tensor["shape"][1:])
            if tensor["name"] == "mask":
                sample.input_data_file = WARMUP_MASK
            else:
                sample.zero_data = True
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
    engine_cache: str | None = None,
) -> Path:
    """Copy one verified artifact into `out/NAME/1/`, write `out/NAME/config.pbtxt` and the warmup mask."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(
            f"model name {name!r} cannot name a model folder, config and URL: use letters, digits, '-', '_'"
        )
    folder = Path(folder)
    manifest = read_manifest(folder)
    artifact = pick_artifact(manifest, precision, fmt)
    entry = artifact_entry(folder / artifact)  # refuses a corrupted or replaced file
    check_parity(artifact, entry, allow_parity_fail)
    config = model_config(
        manifest,
        artifact,
        name=name,
        queue_delay_us=queue_delay_us,
        instances=instances,
        engine_cache=engine_cache,
    )
    model_dir = Path(out) / name
    plan = entry["format"] == "tensorrt"
    target = model_dir / "1" / ("model.plan" if plan else "model.onnx")
    with atomic_path(target) as tmp:
        shutil.copyfile(folder / artifact, tmp)
    (mask,) = (t for t in entry["inputs"] if t["name"] == "mask")
    with atomic_path(model_dir / "warmup" / WARMUP_MASK) as tmp:
        tmp.write_bytes(warmup_mask(mask["shape"][1:]).tobytes())
    with atomic_path(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(("" if plan else ONNX_HEADER) + text_format.MessageToString(config), encoding="utf-8")
    return model_dir
