"""Shared fixtures. The Triton ones import tritonclient when used, not here: the GPU tests run on an
offline GPU image without it (ci/gpu-check)."""

import contextlib
import fcntl
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from m2anet.cli import export as cli
from m2anet.data import load_split
from m2anet.parity import TIERS, Tier


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def test_split():
    """The synthetic test split's first 200 nodes (of 577), generated once per session: enough for the
    label model's figures, and a third of the time of the whole split."""
    return load_split("test", n=200)


def _built_once(tmp_path_factory, name, build):
    """What `build(folder)` returns (JSON), built once per test run. Each pytest-xdist worker (ci/test runs
    two) holds its own session, so a session fixture would be built by every worker that asks for it: the
    first builds it in the run's shared temp root under a lock, the others wait there and reuse it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    result = root / f"{name}.json"  # written last: a build that failed leaves none, the next tries again
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not result.is_file():
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result.write_text(json.dumps(build(folder)), encoding="utf-8")
    return json.loads(result.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """One `m2a-export --precision all` of the small model, shared by the export and verify tests. INT8 is
    calibrated with max on 64 nodes, where `--calib-method auto` ends for these weights after two failed
    percentile tries (the search itself: `refused_int8`)."""

    def export(out):
        args = ["--model", "m2anet_small", "--precision", "all", "--out", str(out), "--quiet"]
        assert cli.main([*args, "--parity-nodes", "24", "--calib-method", "max", "--calib-size", "64"]) == 0
        return str(out / "m2anet_small")

    return Path(_built_once(tmp_path_factory, "artifacts", export))


@pytest.fixture(scope="session")
def refused_int8(small, tmp_path_factory):
    """An INT8 export of the small model held to a tier no graph can pass (AUC >= 150% of FP32).

    Calibrated on 8 nodes, each method of `--calib-method auto` in turn, beside a copy of the shared
    FP32 graph. Returns m2a-export's exit code and stderr when it refuses the graph, its exit code
    with --allow-parity-fail, and the folder then kept: the export tests check the refusal and the
    calibrations tried, the --diagnose test re-quantizes this graph, on 8 calibration nodes per
    trial instead of the shared export's 64.
    """

    def refuse(out):
        folder = out / "m2anet_small"
        folder.mkdir()
        for name in ("manifest.json", "model.fp32.onnx"):  # the FP32 graph is reused, not re-exported
            shutil.copy(small / name, folder / name)
        args = ["--model", "m2anet_small", "--precision", "int8", "--out", str(out), "--quiet"]
        args += ["--parity-nodes", "24", "--calib-size", "8"]
        stderr = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(TIERS, "int8", Tier("int8", max_flip_fraction=0.0, min_relative_auc=1.5))
            with contextlib.redirect_stderr(stderr):
                refused = cli.main(args)
            kept = cli.main([*args, "--allow-parity-fail"])
        return {"refused": refused, "stderr": stderr.getvalue(), "kept": kept, "folder": str(folder)}

    built = _built_once(tmp_path_factory, "refused", refuse)
    return {**built, "folder": Path(built["folder"])}


@pytest.fixture(scope="session")
def triton_python():
    """The Triton server venv's python: built once (about a minute), then reused from the cache."""
    from triton_serving.server_venv import VenvError, ensure_venv

    try:
        return ensure_venv()
    except VenvError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def triton_repo(small, tmp_path_factory):
    """What `m2a-triton` writes for the small model's FP32 and INT8 graphs, one model each, beside
    a model that is not M2ANet (other tensors), as a repository shared with other models has."""
    from triton_serving.other_model import write_other_model

    from m2anet import triton

    repo = tmp_path_factory.mktemp("triton-repo")
    for precision in ("fp32", "int8"):
        # what is served, not whether the artifact passed its parity tier, is under test here
        triton.write_repository(
            small, repo, precision=precision, fmt="onnx", name=f"m2anet_{precision}", allow_parity_fail=True
        )
    write_other_model(repo / "not_m2anet")
    return repo


@pytest.fixture(scope="session")
def triton_server(triton_python, triton_repo, tmp_path_factory):
    """A real tritonserver on free loopback ports serving `triton_repo`; stopped at the end."""
    from triton_serving.process import TritonProcess

    server = TritonProcess(triton_python, triton_repo, tmp_path_factory.mktemp("triton-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def keys(tmp_path):
    """Two Ed25519 key pairs as PEM files: (private, public) of the site's key and of another."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    paths = []
    for who in ("site", "other"):
        key = Ed25519PrivateKey.generate()
        private, public = tmp_path / f"{who}.pem", tmp_path / f"{who}.pub.pem"
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        public.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        paths.append((private, public))
    return paths


def pytest_configure(config):
    """One torch thread per pytest-xdist worker: two workers of two threads each on CI's two cores
    oversubscribe them, and OpenMP's spinning threads slowed the resume-training test from 27 s to 76 s."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        torch.set_num_threads(1)
