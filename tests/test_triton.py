import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from m2anet import triton
from m2anet.cli import triton as triton_cli
from m2anet.engines import open_backend
from m2anet.io import sha256_file
from m2anet.manifest import read_manifest, write_manifest


def _parse(model_dir):
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def repo(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton")
    assert (
        triton_cli.main([str(small), "--out", str(out), "--precision", "fp32", "--queue-delay-us", "500"])
        == 0
    )
    return out


def test_config_parses_and_matches_the_manifest(small, repo):
    manifest = read_manifest(small)
    entry = manifest["artifacts"]["model.fp32.onnx"]
    config = _parse(repo / "m2anet")
    assert config.name == "m2anet" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == manifest["batch_profile"]["max"]
    for declared, expected in ((config.input, entry["inputs"]), (config.output, entry["outputs"])):
        assert [t.name for t in declared] == [t["name"] for t in expected]
        assert [list(t.dims) for t in declared] == [t["shape"][1:] for t in expected]  # batch left out
        assert all(t.data_type == mc.TYPE_FP32 for t in declared)
    assert list(config.input[0].dims) == [1, 16, 64, 64] and list(config.output[0].dims) == [1]
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == sorted(
        {manifest["batch_profile"]["opt"], manifest["batch_profile"]["max"]}
    )
    assert batching.max_queue_delay_microseconds == 500
    assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 1)]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"
    assert config.parameters["m2anet_sha256"].string_value == entry["sha256"]
    assert sha256_file(repo / "m2anet" / "1" / "model.onnx") == entry["sha256"]


def test_the_parse_rejects_a_misspelt_field(repo):
    text = (repo / "m2anet" / "config.pbtxt").read_text()
    assert "max_batch_size" in text
    with pytest.raises(text_format.ParseError, match="max_batch_sizes"):
        text_format.Parse(text.replace("max_batch_size", "max_batch_sizes"), mc.ModelConfig())


def test_a_tensorrt_plan_gets_the_tensorrt_platform(small, tmp_path):
    """No TensorRT here: a stand-in plan file, listed in the manifest as m2a-export would list it."""
    folder = tmp_path / "artifacts"
    folder.mkdir()
    (folder / "model.fp16.plan").write_bytes(b"stand-in plan")
    manifest = read_manifest(small)
    manifest["artifacts"] = {
        "model.fp16.plan": {
            **manifest["artifacts"]["model.fp16.onnx"],
            "format": "tensorrt",
            "sha256": sha256_file(folder / "model.fp16.plan"),
        }
    }
    write_manifest(folder, manifest)
    model_dir = triton.write_repository(folder, tmp_path / "repo", name="m2anet_trt")
    config = _parse(model_dir)
    assert config.platform == "tensorrt_plan" and config.name == "m2anet_trt"
    assert not config.optimization.HasField("execution_accelerators")
    assert (model_dir / "1" / "model.plan").read_bytes() == b"stand-in plan"


def test_unverified_artifacts_are_refused(small, tmp_path, capsys):
    folder = tmp_path / "artifacts"
    folder.mkdir()
    manifest = read_manifest(small)
    (folder / "model.fp32.onnx").write_bytes((small / "model.fp32.onnx").read_bytes() + b"\0")
    write_manifest(folder, manifest)
    assert triton_cli.main([str(folder), "--out", str(tmp_path / "repo"), "--precision", "fp32"]) == 2
    assert "corrupted or was replaced" in capsys.readouterr().err
    assert triton_cli.main([str(folder), "--out", str(tmp_path / "repo"), "--precision", "int8"]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "m2anet" / "config.pbtxt").exists()


@pytest.mark.parametrize("url", ["grpc://127.0.0.1:1", "http://127.0.0.1:1/m2anet"])
def test_unreachable_server_is_one_clear_error(url):
    with pytest.raises(RuntimeError, match="cannot be used") as caught:
        open_backend(f"triton:{url}", timeout_s=5)
    assert "\n" not in str(caught.value)


def test_triton_spec_needs_a_url():
    with pytest.raises(ValueError, match="names no server"):
        open_backend("triton:")
    with pytest.raises(ValueError, match="Triton URL"):
        open_backend("triton:ftp://host/model")


# --- the accelerator's precision, caches and profile, and the warmup (synthetic manifests, no export) ---

SIGNATURE = {
    "inputs": [{"name": n, "shape": ["batch", 1, 16, 64, 64], "dtype": "float32"} for n in ("ct", "mask")],
    "outputs": [
        {"name": "met_logit", "shape": ["batch", 1], "dtype": "float32"},
        {"name": "seg_logit", "shape": ["batch", 1, 16, 64, 64], "dtype": "float32"},
    ],
}


def artifact_folder(folder, names):
    """A folder whose manifest lists stand-in files `names` as m2a-export would (parity passed)."""
    folder.mkdir()
    artifacts = {}
    for name in names:
        (folder / name).write_bytes(f"stand-in {name}".encode())
        artifacts[name] = {
            "sha256": sha256_file(folder / name),
            "precision": name.split(".")[1],
            "format": "onnx" if name.endswith(".onnx") else "tensorrt",
            "parity": {"passed": True},
            **SIGNATURE,
        }
    write_manifest(
        folder,
        {
            "model": {"name": "m2anet_small", "heads": "both", "threshold": 0.4},
            "batch_profile": {"min": 1, "opt": 32, "max": 128},
            "artifacts": artifacts,
        },
    )
    return folder


@pytest.mark.parametrize(("precision", "mode"), [("fp32", "FP32"), ("fp16", "FP32"), ("int8", "INT8")])
def test_onnx_accelerator_keeps_the_graph_precision_caches_engines_and_has_the_profile(
    tmp_path, precision, mode
):
    name = f"model.{precision}.onnx"
    folder = artifact_folder(tmp_path / "artifacts", [name])
    model_dir = triton.write_repository(folder, tmp_path / "repo", precision=precision)
    config = _parse(model_dir)
    assert config.platform == "onnxruntime_onnx"
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    sha = read_manifest(folder)["artifacts"][name]["sha256"]
    assert accelerator.name == "tensorrt"
    assert (
        dict(accelerator.parameters)
        == {
            "precision_mode": mode,  # FP16 would be trt_fp16_enable: FP16 also where the graph keeps FP32
            "max_workspace_size_bytes": str(1 << 30),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": "/models/m2anet/ort-trt-cache",
            "trt_engine_cache_prefix": f"m2anet_{precision}_{sha[:16]}",
            "trt_timing_cache_enable": "1",
            "trt_timing_cache_path": "/models/m2anet/ort-trt-cache",
            "trt_profile_min_shapes": "ct:1x1x16x64x64,mask:1x1x16x64x64",
            "trt_profile_opt_shapes": "ct:32x1x16x64x64,mask:32x1x16x64x64",
            "trt_profile_max_shapes": "ct:128x1x16x64x64,mask:128x1x16x64x64",
        }
    )
    assert (model_dir / "config.pbtxt").read_text().startswith("# ONNX Runtime's TensorRT accelerator")
    moved = triton.write_repository(
        folder, tmp_path / "other", precision=precision, engine_cache="/srv/cache"
    )
    (accelerator,) = _parse(moved).optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["trt_engine_cache_path"] == accelerator.parameters["trt_timing_cache_path"]
    assert accelerator.parameters["trt_engine_cache_path"] == "/srv/cache"


@pytest.mark.parametrize("fmt", ["auto", "onnx"])
def test_warmup_sends_a_valid_request_at_each_profile_batch(tmp_path, fmt):
    from m2anet.engines import check_inputs

    folder = artifact_folder(tmp_path / "artifacts", ["model.fp16.plan", "model.fp16.onnx"])
    model_dir = triton.write_repository(folder, tmp_path / "repo", precision="fp16", fmt=fmt)
    config = _parse(model_dir)
    assert [(w.name, w.batch_size) for w in config.model_warmup] == [
        ("batch_1", 1),
        ("batch_32", 32),
        ("batch_128", 128),
    ]
    for warmup in config.model_warmup:
        ct, mask = warmup.inputs["ct"], warmup.inputs["mask"]
        assert set(warmup.inputs) == {"ct", "mask"}
        assert list(ct.dims) == list(mask.dims) == [1, 16, 64, 64]
        assert ct.data_type == mask.data_type == mc.TYPE_FP32
        assert ct.WhichOneof("input_data_type") == "zero_data"
        assert mask.WhichOneof("input_data_type") == "input_data_file" and mask.input_data_file == "mask"
    raw = (model_dir / "warmup" / "mask").read_bytes()
    sample = np.frombuffer(raw, np.float32).reshape(1, 1, 16, 64, 64)  # one patch; Triton repeats it
    check_inputs(np.zeros_like(sample), sample.copy())  # a request our own checks accept


def test_auto_prefers_the_plan_and_onnx_can_be_asked_for(tmp_path):
    folder = artifact_folder(tmp_path / "artifacts", ["model.fp16.plan", "model.fp16.onnx"])
    manifest = read_manifest(folder)
    assert triton.pick_artifact(manifest, "fp16", "auto") == "model.fp16.plan"
    assert triton.pick_artifact(manifest, "fp16", "onnx") == "model.fp16.onnx"
    plan_dir = triton.write_repository(folder, tmp_path / "plan", precision="fp16")
    assert _parse(plan_dir).platform == "tensorrt_plan" and (plan_dir / "1" / "model.plan").is_file()
    assert not (plan_dir / "config.pbtxt").read_text().startswith("#")
    onnx_dir = triton.write_repository(folder, tmp_path / "onnx", precision="fp16", fmt="onnx")
    assert _parse(onnx_dir).platform == "onnxruntime_onnx" and (onnx_dir / "1" / "model.onnx").is_file()
