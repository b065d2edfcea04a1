"""ONNX Runtime runner for any of the exported graphs (CPU, CUDA or TensorRT provider)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from m2anet.engines.base import Backend
from m2anet.manifest import artifact_entry

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OrtBackend(Backend):
    """Opens an exported ONNX artifact after checking its hash against the manifest.

    On a GPU provider, inputs and outputs go through IOBinding (one host-to-device copy per
    input, outputs left on the device until copied back once), not through per-call feeds.
    """

    def __init__(self, path: str | Path, device: str = "cpu", threads: int | None = None) -> None:
        if device not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime device {device!r}: choose {', '.join(PROVIDERS)}")
        entry = artifact_entry(path)
        available = ort.get_available_providers()
        if PROVIDERS[device][0] not in available:
            raise RuntimeError(
                f"ONNX Runtime here has no {PROVIDERS[device][0]} (has {', '.join(available)}): "
                "install onnxruntime-gpu (m2anet[gpu]) or use ort:cpu"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if device == "cpu" and entry["precision"] == "int8":
            # On x64 without VNNI (AVX2 only) ONNX Runtime's fused u8s8 QLinearConv keeps pairwise sums
            # in 16 bits and overflows: the segmentation mask of the INT8 graph fell to Dice 0.81.
            # The u8u8 kernel is exact; ORT documents the switch and ignores it on other CPUs.
            options.add_session_config_entry("session.x64quantprecision", "1")
        self.session = ort.InferenceSession(str(path), options, providers=PROVIDERS[device])
        # `device` says where it runs (cpu or cuda); the provider is in the name
        self.name, self.precision = f"ort:{device}", entry["precision"]
        self.device = "cpu" if device == "cpu" else "cuda"
        self.max_batch = None
        self.outputs = tuple(o.name for o in self.session.get_outputs())
        self.path = Path(path)
        self.sha256 = entry["sha256"]

    def _run(self, ct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.device == "cpu":
            return tuple(self.session.run(None, {"ct": ct, "mask": mask}))
        binding = self.session.io_binding()
        binding.bind_cpu_input("ct", ct)
        binding.bind_cpu_input("mask", mask)
        for name in self.outputs:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        return tuple(binding.copy_outputs_to_cpu())

    def close(self) -> None:
        self.__dict__.pop("session", None)
