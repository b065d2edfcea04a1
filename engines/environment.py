"""Facts about this machine, probed in one place: what can run here (TensorRT, NVML), and the
CPU, GPU, driver and library versions that bench reports, manifests and engine builds record.

The probes return a reason, not a boolean: a skipped test, a skipped build step and a refused
backend all print why, and where a GPU machine is missing something the fix is in the reason.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import pynvml

from m2anet.optional import lazy_import

tensorrt = lazy_import("tensorrt", "pip install 'm2anet[gpu]'")

LIBRARIES = ("m2anet", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt", "nvidia-ml-py")


def cuda_missing_reason(device: str = "cuda") -> str | None:
    """None when torch can run on `device` (cuda or cuda:N) here, otherwise a one-line reason: torch
    itself answers a CPU-only build with a bare AssertionError."""
    import torch  # here, as in gpu_facts: the probes that need it load it, not every importer

    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"there is no {device} ({torch.cuda.device_count()} CUDA device(s) visible)"
    return None


def tensorrt_missing_reason() -> str | None:
    """None when TensorRT can build and run here, otherwise a one-line reason (for skips and errors)."""
    return tensorrt.missing_reason() or cuda_missing_reason()


def aoti_toolkit_missing_reason(device_type: str) -> str | None:
    """None when AOTInductor can build a package for `device_type` here. For CUDA its C++ wrapper includes
    the CUDA toolkit's headers, which PyTorch's pip wheels do not carry, and inductor finds them only
    through CUDA_HOME, nvcc on PATH or /usr/local/cuda (torch.utils.cpp_extension): without one, the build
    fails late with "CUDA_HOME environment variable is not set" (pytorch/pytorch#150442)."""
    from torch.utils import cpp_extension

    if device_type == "cuda" and cpp_extension.CUDA_HOME is None:
        return (
            "it compiles against the CUDA toolkit's headers and none was found (CUDA_HOME, nvcc on PATH, "
            "/usr/local/cuda): install the toolkit or set CUDA_HOME, or drop aoti=true"
        )
    return None


@functools.cache
def nvml_missing_reason() -> str | None:
    """None when NVML answers (it stays initialised for the process); otherwise NVML's error."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return str(e)
    return None


def driver_version() -> str | None:
    if nvml_missing_reason():
        return None
    version = pynvml.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else str(version)


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The instruction-set flags of /proc/cpuinfo (empty where there is none)."""
    return set((_cpuinfo("flags") or "").split())


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Installed versions of `names`; the ones not installed are left out."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def gpu_facts(device: int | None = None) -> dict[str, str]:
    """The GPU facts an engine is tied to, as the manifest records and the runtime checks them."""
    import torch

    index = torch.cuda.current_device() if device is None else device
    props = torch.cuda.get_device_properties(index)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": driver_version() or f"unknown (NVML: {nvml_missing_reason()})",
        "cuda_runtime": str(torch.version.cuda),
    }


def git_commit() -> dict[str, Any] | None:
    """The checkout's commit and whether it had local changes (None outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}
