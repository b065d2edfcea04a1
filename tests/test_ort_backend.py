"""The options `ort:cpu|cuda|trt` pass to ONNX Runtime's execution providers.

The TensorRT and CUDA providers cannot run here; what they are given is a pure function of the
manifest, the artifact and the provider, checked here name by name against ONNX Runtime's documented
options.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from m2anet.engines.ort_backend import ORT_TRT_CACHE, precision_run, provider_options
from m2anet.manifest import ArtifactError

# Every execution-provider option this project may pass, with where ONNX Runtime documents it
# (onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html, "Execution Provider Options")
# and the pull request that added it where it came late. All of them are in onnxruntime-gpu 1.20.0, the
# oldest release the gpu extra admits (its Python bindings were read for each name); those bindings
# parse the TensorRT provider's booleans as 'True' or 'False' only.
TRT_OPTIONS = {
    "trt_engine_cache_enable": "bool",
    "trt_engine_cache_path": "path",
    "trt_engine_cache_prefix": "str (microsoft/onnxruntime#19083)",
    "trt_timing_cache_enable": "bool (microsoft/onnxruntime#14767)",
    "trt_timing_cache_path": "path (microsoft/onnxruntime#17865)",
    "trt_profile_min_shapes": "shapes (microsoft/onnxruntime#15546)",
    "trt_profile_opt_shapes": "shapes (microsoft/onnxruntime#15546)",
    "trt_profile_max_shapes": "shapes (microsoft/onnxruntime#15546)",
    "trt_int8_enable": "bool",
}
CUDA_OPTIONS = {"use_tf32": "0 or 1 (microsoft/onnxruntime#19357 and #19426, ONNX Runtime 1.18)"}
"""The CUDA provider's, parsed as integers: CUDA_OPTIONS in onnxruntime.ai/docs/execution-providers/
CUDA-ExecutionProvider.html."""
NEVER = {"trt_fp16_enable", "trt_bf16_enable", "trt_cuda_graph_enable", "enable_cuda_graph"}
SIGNATURE = [{"name": n, "shape": ["batch", 1, 16, 64, 64], "dtype": "float32"} for n in ("ct", "mask")]


def manifest(precision: str, profile: dict | None = None) -> dict:
    name = f"model.{precision}.onnx"
    artifact = {"sha256": "0123456789abcdef" * 4, "precision": precision, "inputs": SIGNATURE}
    return {
        "batch_profile": profile or {"min": 1, "opt": 32, "max": 128},
        "artifacts": {name: artifact},
    }


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_provider_gets_caches_and_the_profile_but_not_a_precision(tmp_path, precision):
    onnx = tmp_path / f"model.{precision}.onnx"
    providers = provider_options(manifest(precision), onnx, "trt")
    assert [name for name, _ in providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    trt_options = providers[0][1]
    cache = str(tmp_path / ORT_TRT_CACHE)
    expected = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_engine_cache_prefix": f"m2anet_{precision}_0123456789abcdef",
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": "ct:1x1x16x64x64,mask:1x1x16x64x64",
        "trt_profile_opt_shapes": "ct:32x1x16x64x64,mask:32x1x16x64x64",
        "trt_profile_max_shapes": "ct:128x1x16x64x64,mask:128x1x16x64x64",
    }
    if precision == "int8":  # explicit Q/DQ: a weakly typed TensorRT 10 network needs INT8 enabled for them
        expected["trt_int8_enable"] = "True"
    assert trt_options == expected
    assert providers[1][1] == {"use_tf32": "0"}  # the CUDA fallback: IEEE FP32
    assert providers[2][1] == {}


@pytest.mark.parametrize("provider", ["cpu", "cuda", "trt"])
def test_every_option_is_a_documented_one_with_a_valid_value(tmp_path, provider):
    for precision in ("fp32", "fp16", "int8"):
        for name, options in provider_options(
            manifest(precision), tmp_path / f"model.{precision}.onnx", provider
        ):
            assert not set(options) & NEVER, (name, precision)
            if name == "CUDAExecutionProvider":
                assert options == {"use_tf32": "0"}, precision  # IEEE FP32 in every graph's FP32 parts
                assert set(options) <= set(CUDA_OPTIONS) and set(options.values()) <= {"0", "1"}
                continue
            for key, value in options.items():
                assert key in TRT_OPTIONS, (name, key)
                assert isinstance(value, str)
                if TRT_OPTIONS[key].startswith("bool"):
                    assert value in ("True", "False"), (key, value)


def test_cpu_and_cuda_need_no_batch_profile(tmp_path):
    bare = {"artifacts": {"model.fp32.onnx": {"sha256": "0" * 64, "precision": "fp32"}}}
    onnx = tmp_path / "model.fp32.onnx"
    assert provider_options(bare, onnx, "cpu") == [("CPUExecutionProvider", {})]
    assert provider_options(bare, onnx, "cuda") == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}),
        ("CPUExecutionProvider", {}),
    ]
    with pytest.raises(ArtifactError, match="no batch_profile"):
        provider_options(bare, onnx, "trt")


def test_the_engine_cache_follows_the_artifact_hash(tmp_path):
    """ONNX Runtime names cached engines by file and node names, not weights: a re-export must miss."""
    onnx = tmp_path / "model.fp16.onnx"
    before = manifest("fp16")
    after = manifest("fp16")
    after["artifacts"]["model.fp16.onnx"]["sha256"] = "f" * 64
    prefix = [dict(provider_options(m, onnx, "trt"))["TensorrtExecutionProvider"] for m in (before, after)]
    assert prefix[0]["trt_engine_cache_prefix"] != prefix[1]["trt_engine_cache_prefix"]


def test_unknown_provider_is_refused():
    with pytest.raises(ValueError, match="choose cpu, cuda, trt"):
        provider_options(manifest("fp32"), Path("model.fp32.onnx"), "rocm")


@pytest.mark.parametrize(
    ("graph", "provider", "environ", "runs"),
    [
        ("fp32", "trt", {}, "tf32"),  # TensorRT allows TF32, and this provider cannot say otherwise
        ("fp32", "trt", {"NVIDIA_TF32_OVERRIDE": "0"}, "fp32"),
        ("fp32", "trt", {"NVIDIA_TF32_OVERRIDE": "1"}, "tf32"),
        ("fp32", "cuda", {}, "fp32"),  # use_tf32 off
        ("fp32", "cpu", {}, "fp32"),
        ("fp16", "trt", {}, "fp16"),  # its FP32 islands in TF32 are within the fp16 tier
        ("int8", "trt", {}, "int8"),
    ],
)
def test_the_precision_reported_is_the_one_that_runs(graph, provider, environ, runs):
    assert precision_run(graph, provider, environ) == runs
