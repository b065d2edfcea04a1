"""TensorRT build and runtime.

Tests marked `needs_trt` build a real engine and skip, with `tensorrt_missing_reason()`'s reason, where
TensorRT or a CUDA GPU is missing; the others check what must hold everywhere: the modules import
without TensorRT, and a plan that fails its manifest is refused before TensorRT is touched.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m2anet import create_model
from m2anet.contract import PATCH_SHAPE
from m2anet.engines.environment import tensorrt_missing_reason
from m2anet.engines.trt_backend import TensorRTBackend, _compatible_versions, check_plan_version
from m2anet.export.tensorrt_build import build_engine
from m2anet.io import sha256_file
from m2anet.manifest import MANIFEST, ArtifactError, write_manifest
from m2anet.parity import FP32_LOGIT_TOLERANCE

REASON = tensorrt_missing_reason()
needs_trt = pytest.mark.skipif(REASON is not None, reason=f"needs TensorRT and a GPU: {REASON}")
PROFILE = (1, 4, 8)


def patches(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ct = rng.random((n, 1, *PATCH_SHAPE), dtype=np.float32)
    mask = np.zeros_like(ct)
    mask[:, :, 6:10, 26:38, 26:38] = 1.0
    return ct, mask


def fake_artifact(folder: Path, *, sha256: str | None = None, tensorrt: dict | None = None) -> Path:
    plan = folder / "model.fp32.plan"
    plan.write_bytes(b"not a TensorRT plan")
    entry: dict = {"sha256": sha256 or sha256_file(plan), "precision": "fp32"}
    if tensorrt is not None:
        entry["tensorrt"] = tensorrt
    write_manifest(folder, {"artifacts": {plan.name: entry}})
    return plan


# --- everywhere -------------------------------------------------------------------------------


def test_unavailable_gives_a_reason_without_tensorrt():
    if REASON is None:
        pytest.skip("TensorRT and a GPU are present here")
    assert isinstance(REASON, str) and REASON.strip() and "\n" not in REASON


def test_modules_import_without_tensorrt():
    # sys.modules["tensorrt"] = None makes any `import tensorrt` raise ImportError, GPU machine or not
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import m2anet.engines.trt_backend, m2anet.export.tensorrt_build as b\n"
        "print(b.tensorrt_missing_reason())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("tensorrt is not installed")


def test_hash_mismatch_is_refused_before_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # touching tensorrt would raise ImportError
    plan = fake_artifact(tmp_path, sha256="0" * 64, tensorrt={"compute_capability": "9.0"})
    with pytest.raises(ArtifactError, match="corrupted or was replaced"):
        TensorRTBackend(plan)


def test_entry_without_tensorrt_section_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ArtifactError, match="no 'tensorrt' section"):
        TensorRTBackend(fake_artifact(tmp_path))


def test_unlisted_plan_is_refused(tmp_path):
    plan = fake_artifact(tmp_path)
    other = tmp_path / "other.plan"
    shutil.copy(plan, other)
    with pytest.raises(ArtifactError, match="not listed"):
        TensorRTBackend(other)


def test_bad_batch_profile_is_rejected_before_tensorrt(tmp_path):
    with pytest.raises(ValueError, match="batch profile"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", batch=(4, 2, 8), timing_cache=tmp_path / "t")


@pytest.mark.parametrize(
    ("built", "here", "compatible", "ok"),
    [
        ("10.13.0.35", "10.13.0.35", False, True),
        ("10.13.0.35", "10.13.3.9", False, False),  # same major.minor is not the same release
        ("10.13.0.35", "10.13.0.36", False, False),
        ("10.13.0.35", "10.14.1.48", False, False),
        ("10.13.0.35", "10.13.3.9", True, True),
        ("10.13.0.35", "10.14.1.48", True, True),
        ("10.9.0.34", "10.10.0.31", True, True),  # compared as numbers, not as text
        ("10.14.1.48", "10.13.0.35", True, False),  # never backwards
        ("10.13.0.35", "10.13.0.34", True, False),
        ("10.13.0.35", "11.0.0.114", True, True),  # NVIDIA supports 10.x version-compatible plans on 11.x
        ("11.0.0.114", "11.4.0.106", True, True),
        ("11.4.0.106", "12.0.0.1", True, False),
    ],
)
def test_version_compatibility_rule(built, here, compatible, ok):
    assert _compatible_versions(built, here, compatible) is ok


@pytest.mark.parametrize(
    ("info", "message"),
    [
        (
            {"version": "10.13.0.35", "version_compatible": False},
            "built with TensorRT 10.13.0.35 without version compatibility, so only TensorRT 10.13.0.35 "
            "can run it, but 10.13.3.9 is installed: install TensorRT 10.13.0.35 or rebuild",
        ),
        (
            {"version": "10.14.1.48", "version_compatible": True},
            "version-compatible with TensorRT 10.14.1.48, which runs on later 10.x releases and on 11.x, "
            "but 10.13.3.9 is installed: install one of those or rebuild",
        ),
        ({"version_compatible": False}, "no TensorRT version"),
        ({"version": "ten", "version_compatible": True}, "TensorRT version 'ten'"),
    ],
)
def test_a_plan_of_another_release_is_refused_naming_both_versions(info, message):
    with pytest.raises(ArtifactError, match=re.escape(message)) as caught:
        check_plan_version("model.fp32.plan", info, "10.13.3.9")
    assert "\n" not in str(caught.value)


def test_a_plan_of_this_release_passes():
    check_plan_version("model.fp32.plan", {"version": "10.13.3.9", "version_compatible": False}, "10.13.3.9")
    check_plan_version("model.fp32.plan", {"version": "10.13.0.35", "version_compatible": True}, "10.13.3.9")


def test_max_graphs_below_one_is_rejected_before_anything_else(tmp_path):
    with pytest.raises(ValueError, match="max_graphs=0"):
        TensorRTBackend(tmp_path / "missing.plan", cuda_graphs=True, max_graphs=0)


# --- with TensorRT and a GPU ------------------------------------------------------------------


def export_onnx(path: Path, heads: str) -> torch.nn.Module:
    model = create_model("m2anet_small", heads=heads).eval()
    ct, mask = (torch.from_numpy(a) for a in patches(2))
    batch = torch.export.Dim("batch", min=1, max=1024)
    outputs = ["met_logit", "seg_logit"] if heads == "both" else ["met_logit"]
    program = torch.onnx.export(
        model,
        (ct, mask),
        dynamo=True,
        input_names=["ct", "mask"],
        output_names=outputs,
        dynamic_shapes={"ct": {0: batch}, "mask": {0: batch}},
    )
    program.save(str(path))
    return model


def build_artifact(folder: Path, heads: str, batch: tuple[int, int, int]) -> tuple[Path, torch.nn.Module]:
    onnx_path, plan = folder / "model.fp32.onnx", folder / "model.fp32.plan"
    model = export_onnx(onnx_path, heads)
    info = build_engine(onnx_path, plan, batch=batch, timing_cache=folder / "timing.cache", opt_level=1)
    write_manifest(
        folder,
        {"artifacts": {plan.name: {"sha256": sha256_file(plan), "precision": "fp32", "tensorrt": info}}},
    )
    return plan, model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    if REASON is not None:
        pytest.skip(f"needs TensorRT and a GPU: {REASON}")
    return build_artifact(tmp_path_factory.mktemp("trt"), "both", PROFILE)


def copy_artifact(plan: Path, dest: Path) -> Path:
    shutil.copytree(plan.parent, dest, dirs_exist_ok=True)
    return dest / plan.name


@needs_trt
def test_build_records_gpu_and_cache(artifact):
    plan, _ = artifact
    info = json.loads((plan.parent / MANIFEST).read_text())["artifacts"][plan.name]["tensorrt"]
    major, minor = torch.cuda.get_device_capability()
    assert info["compute_capability"] == f"{major}.{minor}"
    assert info["batch"] == list(PROFILE) and info["build_s"] > 0
    assert (plan.parent / "timing.cache").stat().st_size > 0


@needs_trt
@pytest.mark.parametrize("n", [1, PROFILE[2] + 3])  # 11 > the profile max: the base class splits it
def test_matches_pytorch(artifact, n):
    plan, model = artifact
    ct, mask = patches(n, seed=n)
    with torch.no_grad():
        ref = [t.numpy() for t in model(torch.from_numpy(ct), torch.from_numpy(mask))]
    with TensorRTBackend(plan) as backend:
        assert backend.max_batch == PROFILE[2] and backend.outputs == ("met_logit", "seg_logit")
        assert backend.precision == "fp32" and backend.device == "cuda:0"
        met, seg = backend.infer(ct, mask)
    assert met.shape == (n, 1) and seg.shape == (n, 1, *PATCH_SHAPE) and met.dtype == np.float32
    # the fp32 tier's tolerances: TF32, on by default in TensorRT, would exceed them (tensorrt_build)
    np.testing.assert_allclose(met, ref[0], atol=FP32_LOGIT_TOLERANCE["met_logit"], rtol=0)
    np.testing.assert_allclose(seg, ref[1], atol=FP32_LOGIT_TOLERANCE["seg_logit"], rtol=0)


@needs_trt
def test_cuda_graphs_and_infer_torch_agree(artifact):
    plan, _ = artifact
    ct, mask = patches(5, seed=3)
    with TensorRTBackend(plan) as plain:
        expected = plain.infer(ct, mask)
    with TensorRTBackend(plan, cuda_graphs=True) as graphed:
        for _ in range(2):  # the first call captures, the second replays
            got = graphed.infer(ct, mask)
            for g, e in zip(got, expected, strict=True):
                np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
        on_gpu = graphed.infer_torch(torch.from_numpy(ct).cuda(), torch.from_numpy(mask).cuda())
    assert all(t.is_cuda and t.dtype == torch.float32 for t in on_gpu)
    for g, e in zip(on_gpu, expected, strict=True):
        np.testing.assert_allclose(g.cpu().numpy(), e, atol=1e-5, rtol=0)


@needs_trt
@pytest.mark.parametrize("max_graphs", [8, 1])  # 1: each size evicts the other's graph and context
def test_cuda_graphs_survive_other_batch_sizes(artifact, max_graphs):
    """Batches 1, 7, 1, 7: a graph replayed after its size was not the last one run still gives the
    results of a backend without graphs (each size has a context of its own, whose shapes never change)."""
    plan, _ = artifact
    calls = [patches(n, seed=i) for i, n in enumerate((1, 7, 1, 7))]
    with TensorRTBackend(plan) as plain:
        expected = [plain.infer(ct, mask) for ct, mask in calls]
    with TensorRTBackend(plan, cuda_graphs=True, max_graphs=max_graphs) as graphed:
        got = [graphed.infer(ct, mask) for ct, mask in calls]
        assert len(graphed._graphs) == len(graphed._graph_contexts) == min(2, max_graphs)
    for g, e in zip(got, expected, strict=True):
        for a, b in zip(g, e, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@needs_trt
def test_corrupted_plan_is_refused(artifact, tmp_path):
    plan = copy_artifact(artifact[0], tmp_path)
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        TensorRTBackend(plan)


@needs_trt
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("compute_capability", "1.0", "compute capability 1.0"),
        ("version", "9.0.0", "TensorRT 9.0.0"),
        # same major.minor, another release: refused, not deserialized (it was not built version-compatible)
        ("version", "{major_minor}.999", "so only TensorRT"),
    ],
)
def test_plan_for_another_gpu_or_version_is_refused(artifact, tmp_path, key, value, message):
    plan = copy_artifact(artifact[0], tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    info = manifest["artifacts"][plan.name]["tensorrt"]
    info[key] = value.format(major_minor=".".join(info["version"].split(".")[:2]))
    write_manifest(tmp_path, manifest)
    with pytest.raises(ArtifactError, match=message):
        TensorRTBackend(plan)


@needs_trt
def test_classification_only_engine(tmp_path):
    plan, model = build_artifact(tmp_path, "cls", (1, 1, 2))
    ct, mask = patches(3)
    with torch.no_grad():
        ref = model(torch.from_numpy(ct), torch.from_numpy(mask))[0].numpy()
    with TensorRTBackend(plan) as backend:
        assert backend.outputs == ("met_logit",)
        (met,) = backend.infer(ct, mask)
    np.testing.assert_allclose(met, ref, atol=FP32_LOGIT_TOLERANCE["met_logit"], rtol=0)
