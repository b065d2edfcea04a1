"""ONNX Runtime runner for any of the exported graphs (CPU, CUDA or TensorRT provider)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from m2anet.engines.base import Backend
from m2anet.manifest import ArtifactError, artifact_entry, read_manifest

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
ORT_TRT_CACHE = "ort-trt-cache"
"""The artifact folder's subfolder for the TensorRT execution provider's engine and timing caches."""


def trt_profile_shapes(manifest: dict[str, Any], artifact: str) -> dict[str, str]:
    """The TensorRT provider's min/opt/max profile options from the manifest's batch profile.

    Without them the provider builds an engine for the first batch it sees and rebuilds it whenever a
    larger one arrives; with them, one engine covers the profile `m2a-export` gave the plans.
    """
    profile = manifest.get("batch_profile")
    if not isinstance(profile, dict):
        raise ArtifactError(f"the manifest has no batch_profile for {artifact}: re-run m2a-export")
    inputs = manifest["artifacts"][artifact]["inputs"]
    return {
        f"trt_profile_{point}_shapes": ",".join(
            f"{t['name']}:{'x'.join(str(d) for d in [int(profile[point]), *t['shape'][1:]])}" for t in inputs
        )
        for point in ("min", "opt", "max")
    }


def trt_engine_cache_prefix(manifest: dict[str, Any], artifact: str) -> str:
    """The engine-cache file prefix: the artifact's precision and hash.

    ONNX Runtime names a cached engine by a hash of the model's file name, node names and its own
    version, never of the weights: a model.fp16.onnx re-exported after retraining would load the old
    weights' engine. The prefix makes the cache follow the file's sha256.
    """
    entry = manifest["artifacts"][artifact]
    return f"m2anet_{entry['precision']}_{entry['sha256'][:16]}"


def provider_options(manifest: dict[str, Any], onnx: Path, provider: str) -> list[tuple[str, dict[str, str]]]:
    """(provider, options) for `ort.InferenceSession(providers=...)`, for `onnx` in its artifact folder.

    TensorRT provider: engine and timing caches in `FOLDER/ort-trt-cache/` (engines named by the
    artifact's hash), and the manifest's batch profile. The precision is the graph's: trt_fp16_enable
    is never set, because it would let TensorRT run in FP16 the parts that model.fp16.onnx keeps in
    FP32 on purpose (this provider builds weakly typed networks and has no strongly typed mode), so
    the parity proved on the graph would not carry over; without it the graph's FP16 parts may run in
    FP32 instead, which is slower, never less accurate (the TensorRT plan, strongly typed, runs the
    graph's precisions exactly). trt_int8_enable is set for the INT8 graph only: it carries explicit
    Q/DQ, and a weakly typed TensorRT 10 network refuses Q/DQ layers unless INT8 is enabled ("Int8
    precision has been set for a layer or layer output, but int8 is not configured in the builder");
    with Q/DQ present TensorRT quantizes exactly where they are and nowhere else (explicit
    quantization), and no calibration table is given.

    CUDA graphs are not enabled (neither `enable_cuda_graph` nor `trt_cuda_graph_enable`): ONNX
    Runtime replays a captured graph with the shapes and device addresses of its capture, so every
    input and output must be bound through IOBinding to device buffers that never move, at one shape
    per graph (the CUDA provider can keep several, one per `gpu_graph_id` run option; the TensorRT
    provider one per session). This backend runs every batch size through one session and binds host
    arrays, which ONNX Runtime copies into device memory of its choosing on each call; a session bound
    per batch size would be a runner of its own. The CUDA-graph path here is
    `trt:FILE.plan@cuda_graphs=true` (one graph per batch size).

    CUDA provider (and the TensorRT provider's CUDA fallback): `use_tf32` off. The provider allows TF32 in
    FP32 convolutions and matrix products by default, rounding their inputs to 10-bit mantissas, which the
    fp32 tier does not allow; off, FP32 in the graph is IEEE FP32. The TensorRT provider has no such
    switch (`precision_run`).

    Option names and value spellings follow ONNX Runtime's execution provider documentation; all exist
    in onnxruntime-gpu 1.27, the oldest release the `gpu` extra admits (its Python bindings want the
    TensorRT provider's booleans spelled 'True'/'False'; the CUDA provider's are parsed as 0 or 1).
    """
    if provider not in PROVIDERS:
        raise ValueError(f"unknown ONNX Runtime device {provider!r}: choose {', '.join(PROVIDERS)}")
    options: dict[str, dict[str, str]] = {name: {} for name in PROVIDERS[provider]}
    if provider == "trt":
        cache = str(onnx.parent / ORT_TRT_CACHE)
        trt_options = {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": cache,
            "trt_engine_cache_prefix": trt_engine_cache_prefix(manifest, onnx.name),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": cache,
            **trt_profile_shapes(manifest, onnx.name),
        }
        if manifest["artifacts"][onnx.name]["precision"] == "int8":
            trt_options["trt_int8_enable"] = "True"
        options["TensorrtExecutionProvider"] = trt_options
    if "CUDAExecutionProvider" in options:
        options["CUDAExecutionProvider"]["use_tf32"] = "0"
    return list(options.items())


def precision_run(graph: str, provider: str, environ: Mapping[str, str] = os.environ) -> str:
    """The precision `provider` runs a `graph` precision ONNX file in. TensorRT allows TF32 for FP32
    layers unless told not to, and ONNX Runtime's TensorRT provider has no option to tell it (unlike its
    CUDA provider's `use_tf32`): an FP32 graph runs there in TF32, and is judged by the tf32 tier, unless
    the process was started with NVIDIA_TF32_OVERRIDE=0, which turns TF32 off in every CUDA library it
    loads. (Before Ampere there is no TF32 and FP32 runs: the looser tier then still holds.)"""
    if provider == "trt" and graph == "fp32" and environ.get("NVIDIA_TF32_OVERRIDE") != "0":
        return "tf32"
    return graph


class OrtBackend(Backend):
    """Opens an exported ONNX artifact after checking its hash against the manifest.

    On a GPU provider, inputs and outputs go through IOBinding (one host-to-device copy per
    input, outputs left on the device until copied back once), not through per-call feeds.
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        if device not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime device {device!r}: choose {', '.join(PROVIDERS)}")
        path = Path(path)
        entry = artifact_entry(path)
        available = ort.get_available_providers()
        if PROVIDERS[device][0] not in available:
            raise RuntimeError(
                f"ONNX Runtime here has no {PROVIDERS[device][0]} (has {', '.join(available)}): "
                "install onnxruntime-gpu (m2anet[gpu]) or use ort:cpu"
            )
        self.manifest = manifest = read_manifest(path.parent)
        self.path, self.threads, self.provider = path, threads, device
        self.name, self.precision = f"ort:{device}", precision_run(entry["precision"], device)
        self.session = self.new_session()
        # `device` says where it runs (cpu or cuda); the provider is in the name
        self.device = "cpu" if device == "cpu" else "cuda"
        # the TensorRT provider's engine covers the manifest's profile: larger batches are split
        self.max_batch = int(manifest["batch_profile"]["max"]) if device == "trt" else None
        self.outputs = tuple(o.name for o in self.session.get_outputs())
        self.sha256 = entry["sha256"]

    def new_session(self, profile_prefix: str | None = None) -> ort.InferenceSession:
        """A session of this backend's graph, threads and providers. With `profile_prefix` it records ONNX
        Runtime's per-node profile (`end_profiling()` returns the JSON file's name): profiling is a session
        option, fixed when the session loads."""
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        if self.provider == "cpu" and self.precision == "int8":
            # On x64 without VNNI (AVX2 only) ONNX Runtime's fused u8s8 QLinearConv keeps pairwise sums
            # in 16 bits and overflows: the segmentation mask of the INT8 graph fell to Dice 0.81.
            # The u8u8 kernel is exact; ORT documents the switch and ignores it on other CPUs.
            options.add_session_config_entry("session.x64quantprecision", "1")
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, profile_prefix
        providers = provider_options(self.manifest, self.path, self.provider)
        return ort.InferenceSession(str(self.path), options, providers=providers)

    def _run(self, ct: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        if self.device == "cpu":
            return tuple(self.session.run(list(outputs), {"ct": ct, "mask": mask}))
        binding = self.session.io_binding()
        binding.bind_cpu_input("ct", ct)
        binding.bind_cpu_input("mask", mask)
        for name in outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return tuple(binding.copy_outputs_to_cpu())

    def close(self) -> None:
        self.__dict__.pop("session", None)
