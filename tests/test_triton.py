from concurrent import futures

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from m2anet import NodeClassifier, triton
from m2anet.cli import triton as triton_cli
from m2anet.cli import verify as verify_cli
from m2anet.data import make_study
from m2anet.engines import open_backend
from m2anet.io import sha256_file
from m2anet.manifest import ArtifactError, read_manifest, write_manifest
from m2anet.preprocess import prepare_study


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


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just enough of Triton's gRPC service to serve the generated config with ONNX Runtime."""

    def __init__(self, config, onnx_path):
        self.config = config
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name == self.config.name)

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self.config)

    def ModelInfer(self, request, context):
        assert len(request.inputs) == 2 and request.inputs[0].shape[0] <= self.config.max_batch_size
        feeds = {
            t.name: np.frombuffer(raw, np.float32).reshape(t.shape)
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        names = [o.name for o in request.outputs]
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        for name, array in zip(names, self.session.run(names, feeds), strict=True):
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(np.ascontiguousarray(array, np.float32).tobytes())
        return response


@pytest.fixture
def server(repo):
    # Triton sets its gRPC limit to INT32_MAX (grpc_server.cc); grpc's default 4 MB holds 8 patches
    unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=unlimited)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        FakeTriton(_parse(repo / "m2anet"), repo / "m2anet" / "1" / "model.onnx"), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)


def test_triton_backend_gives_the_local_results(small, server):
    study = prepare_study(*make_study(seed=5, n_nodes=2)[:2])
    with NodeClassifier.from_artifacts(None, backend=f"triton:{server}") as remote:
        info = remote.info
        got = remote.predict_patches(study.ct, study.mask)
    with NodeClassifier.from_artifacts(small, "fp32", "ort:cpu") as local:
        expected = local.predict_patches(study.ct, study.mask)
    manifest = read_manifest(small)
    assert info["backend"] == "triton" and info["precision"] == "fp32" and info["model"] == "m2anet_small"
    assert info["sha256"] == manifest["artifacts"]["model.fp32.onnx"]["sha256"]
    assert info["threshold"] == pytest.approx(manifest["model"]["threshold"])
    np.testing.assert_allclose(got.probability, expected.probability, atol=1e-6)
    np.testing.assert_allclose(got.seg, expected.seg, atol=1e-6)


def test_triton_model_from_other_artifacts_is_refused(server, tmp_path, small):
    folder = tmp_path / "other"
    folder.mkdir()
    manifest = read_manifest(small)
    manifest["artifacts"] = {}
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="was not made from"):
        NodeClassifier.from_artifacts(folder, backend=f"triton:{server}")


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


def test_verify_a_triton_server(server, capsys):
    """The model, heads, threshold and precision come from what m2a-triton recorded in the served
    config: the default --model (m2anet_base) is not what this server runs."""
    code = verify_cli.main([f"triton:{server}", "--n", "16", "--no-stress"])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "tier fp32: PASS" in out.out and "16 test nodes" in out.out
