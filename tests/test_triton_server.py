"""The `triton:` backend against a real Triton Inference Server (tritonserver from nvidia-pytriton).

The server serves the repository `m2a-triton` writes, read from its config.pbtxt (tests/
triton_serving/serve.py), on ONNX Runtime's CPU provider. Skipped, with the reason, where the
server's venv cannot be built (no /usr/bin/python3.11, no package index).
"""

import csv
import json
import socket
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from triton_serving.process import TritonProcess

from m2anet import NodeClassifier, triton
from m2anet.bench.server_scenario import ServerSettings, reference_answers, run_server
from m2anet.cli import predict, verify
from m2anet.data import load_split, write_study
from m2anet.engines import open_backend
from m2anet.manifest import ArtifactError, read_manifest, write_manifest

LOGIT_ATOL = 1e-5
"""Triton runs the same graph on the same ONNX Runtime; only batch composition could move a logit."""


@pytest.fixture(scope="module")
def patches():
    cohort = load_split("calib", n=6)
    return cohort.ct, cohort.mask


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("precision", "protocol"), [("fp32", "grpc"), ("int8", "grpc"), ("fp32", "http")])
def test_served_model_gives_onnx_runtime_logits(triton_server, small, patches, precision, protocol):
    ct, mask = patches
    manifest = read_manifest(small)
    with (
        open_backend(triton_server.url(f"m2anet_{precision}", protocol)) as served,
        open_backend(f"ort:cpu:{small}/model.{precision}.onnx") as local,
    ):
        assert served.precision == precision and served.max_batch == manifest["batch_profile"]["max"]
        assert served.outputs == ("met_logit", "seg_logit")
        for n in (1, len(ct)):
            got, expected = served.infer(ct[:n], mask[:n]), local.infer(ct[:n], mask[:n])
            for g, e in zip(got, expected, strict=True):
                assert g.shape == e.shape and g.dtype == np.float32
                np.testing.assert_allclose(g, e, rtol=0, atol=LOGIT_ATOL)


def test_served_config_is_the_written_one(triton_server, triton_repo, small):
    """What m2a-triton wrote is what the server reports, apart from the backend line."""
    entry = read_manifest(small)["artifacts"]["model.int8.onnx"]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.ports['http']}")
    try:
        served = client.get_model_config("m2anet_int8")
    finally:
        client.close()
    assert served["max_batch_size"] == 128
    assert [(t["name"], t["data_type"], t["dims"]) for t in served["input"]] == [
        ("ct", "TYPE_FP32", [1, 16, 64, 64]),
        ("mask", "TYPE_FP32", [1, 16, 64, 64]),
    ]
    assert [t["name"] for t in served["output"]] == ["met_logit", "seg_logit"]
    assert served["dynamic_batching"]["preferred_batch_size"] == [32, 128]
    assert served["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    params = {k: v["string_value"] for k, v in served["parameters"].items()}
    assert params["m2anet_sha256"] == entry["sha256"] and params["m2anet_precision"] == "int8"
    assert served["backend"] == "python"  # the one line that differs from a GPU deployment


def test_node_classifier_reads_threshold_and_hash_from_the_server(triton_server, small, patches):
    manifest = read_manifest(small)
    spec = triton_server.url("m2anet_int8")
    with (
        NodeClassifier.from_artifacts(None, backend=spec) as remote,
        NodeClassifier.from_artifacts(small, "int8", "ort:cpu", allow_parity_fail=True) as local,
    ):
        info = remote.info
        got, expected = remote.predict_patches(*patches), local.predict_patches(*patches)
        classified = remote.predict_patches(*patches, seg=False)  # the mask logits are not sent back
    assert info["backend"] == "triton" and info["precision"] == "int8" and info["model"] == "m2anet_small"
    assert info["sha256"] == manifest["artifacts"]["model.int8.onnx"]["sha256"]
    assert info["threshold"] == float(repr(manifest["model"]["threshold"]))
    np.testing.assert_allclose(got.probability, expected.probability, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got.predicted, expected.predicted)
    assert classified.seg is None and np.array_equal(classified.probability, got.probability)
    assert got.seg is not None and expected.seg is not None
    np.testing.assert_allclose(got.seg, expected.seg, rtol=0, atol=1e-6)
    with NodeClassifier.from_artifacts(small, backend=spec) as checked:  # the served hash is in the folder
        assert checked.sha256 == info["sha256"]


def test_a_served_model_from_other_artifacts_is_refused(triton_server, small, tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    manifest = read_manifest(small)
    manifest["artifacts"] = {}
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="was not made from"):
        NodeClassifier.from_artifacts(folder, backend=triton_server.url("m2anet_fp32"))


def test_m2a_predict_over_triton_matches_the_local_run(triton_server, small, tmp_path, capsys):
    paths = write_study(tmp_path / "study", seed=3, n_nodes=3)
    study = [str(paths["ct"]), str(paths["nodes"])]
    spec = triton_server.url("m2anet_fp32")
    assert predict.main([*study, "--backend", spec, "--out", str(tmp_path / "remote"), "--quiet"]) == 0
    local = f"ort:cpu:{small}/model.fp32.onnx"
    assert predict.main([*study, "--backend", local, "--out", str(tmp_path / "local"), "--quiet"]) == 0
    rows = {}
    for name in ("remote", "local"):
        with open(tmp_path / name / "nodes.csv", newline="") as f:
            rows[name] = list(csv.DictReader(f))
    assert len(rows["remote"]) == 3 and all(r["status"] == "classified" for r in rows["remote"])
    assert {r["backend"] for r in rows["remote"]} == {"triton"}
    for remote, here in zip(rows["remote"], rows["local"], strict=True):
        assert remote["label"] == here["label"] and remote["prediction"] == here["prediction"]
        assert remote["artifact_sha256"] == here["artifact_sha256"]
        assert float(remote["probability"]) == pytest.approx(float(here["probability"]), abs=1e-6)
    report = json.loads((tmp_path / "remote" / "nodes.json").read_text())
    assert report["classifier"]["threshold"] == pytest.approx(read_manifest(small)["model"]["threshold"])


def test_concurrent_clients_get_unchanged_answers_batched_by_the_server(triton_server, small, patches):
    """8 clients x 3 requests at once: each answer is its own input's, and the dynamic batcher of
    the config merged requests (fewer executions than requests)."""
    ct, mask = patches
    inputs = [(ct[i : i + 1 + i % 2], mask[i : i + 1 + i % 2]) for i in range(len(ct) - 1)]
    with open_backend(f"ort:cpu:{small}/model.fp32.onnx") as local:
        expected = [local.infer(c, m)[0] for c, m in inputs]
    stats = httpclient.InferenceServerClient(f"127.0.0.1:{triton_server.ports['http']}")
    headers = {"triton-access-token": triton_server.info["token"]}

    def executions():
        (model,) = stats.get_inference_statistics("m2anet_fp32", headers=headers)["model_stats"]
        return int(model["execution_count"])

    before = executions()
    barrier = threading.Barrier(8)
    errors, answers = [], []

    def client(k):
        try:
            with open_backend(triton_server.url("m2anet_fp32")) as backend:
                barrier.wait()
                for r in range(3):
                    i = (k + r) % len(inputs)
                    answers.append((i, backend.infer(*inputs[i])[0]))
        except Exception as e:  # surfaced below with the thread's answer count
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = executions()
    stats.close()
    assert not errors and len(answers) == 24
    for i, got in answers:
        np.testing.assert_allclose(got, expected[i], rtol=0, atol=LOGIT_ATOL)
    assert 0 < after - before < 24


def test_server_down_is_one_clear_error():
    with pytest.raises(RuntimeError, match="cannot be used") as caught:
        open_backend(f"triton:grpc://127.0.0.1:{_free_port()}/m2anet_fp32")
    assert "\n" not in str(caught.value) and "is it running?" in str(caught.value)


@pytest.mark.parametrize("options", [{"model_name": "m2anet_fp64"}, {"model_version": "7"}])
def test_unknown_model_or_version_is_not_ready(triton_server, options):
    spec = triton_server.url("m2anet_fp32").rpartition("/")[0]
    with pytest.raises(RuntimeError, match="is not ready on the Triton server") as caught:
        open_backend(spec, **{"model_name": "m2anet_fp32", **options})
    assert "\n" not in str(caught.value)


def test_a_model_with_other_tensors_is_refused(triton_server):
    with pytest.raises(
        RuntimeError, match="not M2ANet's: serve a repository written by m2a-triton"
    ) as caught:
        open_backend(triton_server.url("not_m2anet"))
    assert "['image']" in str(caught.value) and "\n" not in str(caught.value)


def test_the_server_enforces_the_configured_dims(triton_server, patches):
    """Unchecked input of the wrong patch size reaches the server, which refuses it by the config."""
    ct, mask = patches
    with (
        open_backend(triton_server.url("m2anet_fp32")) as backend,
        pytest.raises(Exception, match="ct") as caught,
    ):
        backend.infer(ct[:1, :, :8], mask[:1, :, :8], check=False)
    assert "shape" in str(caught.value)


def test_m2a_verify_over_triton(triton_server, capsys):
    code = verify.main(
        [triton_server.url("m2anet_fp32"), "--split", "test", "--n", "24", "--no-stress", "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["model"] == "m2anet_small" and report["tier"] == "fp32" and report["passed"]


@pytest.fixture(scope="module")
def private_server(triton_python, small, tmp_path_factory):
    """A server of its own (FP32 only) for the tests that crash or change it."""
    repo = tmp_path_factory.mktemp("private-repo")
    triton.write_repository(small, repo, precision="fp32", fmt="onnx", name="m2anet_fp32")
    server = TritonProcess(triton_python, repo, tmp_path_factory.mktemp("private-server"))
    server.start()
    yield server
    server.stop()


def test_load_survives_a_server_crash(private_server, small, patches):
    """The server is killed (SIGKILL, whole process group) in the middle of a Server-scenario run
    and restarted on the same ports: failed requests are reported one line each, transient ones
    retried, none lost, answers unchanged, and the clients get answers again once it is back."""
    ct, mask = patches
    inputs = [(ct[i : i + 1], mask[i : i + 1]) for i in range(len(ct))]
    with open_backend(f"ort:cpu:{small}/model.fp32.onnx") as local:
        reference = reference_answers(local, inputs)
    spec = private_server.url("m2anet_fp32")
    settings = ServerSettings(
        rate=4.0, clients=2, duration_s=18.0, min_queries=1, max_queries=120, retries=4, backoff_s=0.25
    )
    lines, run = [], {}

    def load():
        run["result"] = run_server(lambda: open_backend(spec), inputs, settings, reference, lines.append)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(2.0)
        private_server.kill()
        time.sleep(1.0)
        private_server.start()
        back = time.perf_counter()
    finally:
        thread.join()
    result = run["result"]
    assert result.sent == result.answered + result.failed
    assert result.changed == 0
    assert len(lines) == result.failed == len(result.failures)
    assert all("\n" not in line and line.startswith("request ") for line in lines)
    assert result.retried >= 1  # requests that met the dead server were answered on a later try
    recovered = [q for q in result.queries if q.arrival_s > back - result.t0 + 1.0]
    assert recovered, (
        f"the server took {back - result.t0:.0f} s of the {settings.duration_s:.0f} s run to come back"
    )
    assert all(q.status == "answered" and q.attempts == 1 for q in recovered)  # first try again


def test_an_unloaded_model_is_not_ready(private_server):
    client = httpclient.InferenceServerClient(f"127.0.0.1:{private_server.ports['http']}")
    try:
        client.unload_model("m2anet_fp32", headers={"triton-access-token": private_server.info["token"]})
    finally:
        client.close()
    with pytest.raises(RuntimeError, match="'m2anet_fp32' is not ready") as caught:
        open_backend(private_server.url("m2anet_fp32"))
    assert "\n" not in str(caught.value)
