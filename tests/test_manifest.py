"""The manifest's seal, its optional signature, names that stay in their folder, and entries left
without a parity result by an interrupted export."""

import hashlib
import json
import re
import shutil

import pytest

from m2anet import NodeClassifier
from m2anet.bench import select, suite, targets
from m2anet.cli import bench as bench_cli
from m2anet.cli import predict as predict_cli
from m2anet.cli import triton as triton_cli
from m2anet.engines import BackendSpec
from m2anet.io import write_json
from m2anet.manifest import (
    MANIFEST,
    SEAL,
    TRUSTED_KEY_ENV,
    ArtifactError,
    canonical,
    read_manifest,
    write_manifest,
)


@pytest.fixture
def folder(small, tmp_path):
    """A private copy of the shared export, free to edit."""
    copy = tmp_path / "artifacts" / "m2anet_small"
    shutil.copytree(small, copy)
    return copy


def _one_line_error(capsys, prog):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]


def _edit_threshold(folder):
    """The one-byte edit of the issue: the model's threshold 0.x... -> 0.9... (its first decimal)."""
    path = folder / MANIFEST
    text = path.read_text()
    at = text.index('"threshold": 0.') + len('"threshold": 0.')
    assert text[at] != "9", "the weights' threshold is already 0.9...: edit another digit"
    path.write_text(text[:at] + "9" + text[at + 1 :])
    assert json.loads(path.read_text())["model"]["threshold"] > 0.9


def test_a_one_byte_threshold_edit_is_refused_by_every_reader(folder, tmp_path, capsys):
    _edit_threshold(folder)
    with pytest.raises(ArtifactError, match="does not match its seal") as caught:
        read_manifest(folder)
    assert "\n" not in str(caught.value) and "re-run m2a-export" in str(caught.value)
    with pytest.raises(ArtifactError, match="does not match its seal"):
        NodeClassifier.from_artifacts(folder, "fp32")
    args = ["--demo", "--artifacts", str(folder), "--precision", "fp32", "--out", str(tmp_path / "p")]
    assert predict_cli.main([*args, "--quiet"]) == 2
    assert "does not match its seal" in _one_line_error(capsys, "m2a-predict")
    assert not (tmp_path / "p" / "nodes.csv").exists()
    assert triton_cli.main([str(folder), "--out", str(tmp_path / "repo"), "--precision", "fp32"]) == 2
    assert "does not match its seal" in _one_line_error(capsys, "m2a-triton")
    assert not (tmp_path / "repo").exists()


def test_int8_relabelled_as_fp32_is_refused(folder):
    """The INT8 graph put in the FP32 file's place, its hash written into the FP32 entry."""
    shutil.copyfile(folder / "model.int8.onnx", folder / "model.fp32.onnx")
    path = folder / MANIFEST
    text = path.read_text()
    manifest = json.loads(text)
    fp32, int8 = (manifest["artifacts"][f"model.{p}.onnx"]["sha256"] for p in ("fp32", "int8"))
    path.write_text(text.replace(f'"sha256": "{fp32}"', f'"sha256": "{int8}"'))
    with pytest.raises(ArtifactError, match="does not match its seal"):
        NodeClassifier.from_artifacts(folder, "fp32")
    # the entry's precision alone
    manifest = json.loads(text)
    manifest["artifacts"]["model.int8.onnx"]["precision"] = "fp32"
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ArtifactError, match="does not match its seal"):
        read_manifest(folder)


def test_a_manifest_from_before_the_seal_asks_for_a_new_export(folder, tmp_path, capsys):
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest[SEAL]
    write_json(folder / MANIFEST, manifest)
    with pytest.raises(ArtifactError, match=r"has no seal .*: re-run m2a-export$"):
        read_manifest(folder)
    assert predict_cli.main(["--demo", "--artifacts", str(folder), "--out", str(tmp_path), "--quiet"]) == 2
    assert "re-run m2a-export" in _one_line_error(capsys, "m2a-predict")


def test_written_manifests_are_sealed_and_read_back(folder):
    manifest = read_manifest(folder)
    seal = manifest[SEAL]
    assert seal["sha256"] == hashlib.sha256(canonical(manifest)).hexdigest()
    # the threshold and each artifact's precision are inside what the seal covers
    assert b'"threshold":' in canonical(manifest) and b'"precision":"int8"' in canonical(manifest)
    write_manifest(folder, {**manifest, "note": (1, 2)})  # tuples are sealed as JSON will read them
    assert read_manifest(folder)["note"] == [1, 2]


def test_signature_is_checked_against_the_trusted_key(folder, keys, monkeypatch):
    (site, site_pub), (other, _) = keys
    manifest = read_manifest(folder)
    write_manifest(folder, manifest, sign=site)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(site_pub))
    assert read_manifest(folder)["model"] == manifest["model"]
    with NodeClassifier.from_artifacts(folder, "int8") as clf:
        assert clf.info["precision"] == "int8"

    # forged: the threshold edited and the seal's hash recomputed, which anyone can do
    signed = read_manifest(folder)
    signed["model"]["threshold"] = 0.962
    signed[SEAL]["sha256"] = hashlib.sha256(canonical(signed)).hexdigest()
    write_json(folder / MANIFEST, signed)
    monkeypatch.delenv(TRUSTED_KEY_ENV)
    assert read_manifest(folder)["model"]["threshold"] == 0.962  # the seal alone does not stop this
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(site_pub))
    with pytest.raises(ArtifactError, match="no valid signature") as caught:
        read_manifest(folder)
    assert "\n" not in str(caught.value)

    write_manifest(folder, manifest, sign=other)  # a valid signature, of the wrong key
    with pytest.raises(ArtifactError, match="no valid signature"):
        NodeClassifier.from_artifacts(folder, "int8")
    write_manifest(folder, manifest)  # sealed, not signed
    with pytest.raises(ArtifactError, match="is not signed"):
        read_manifest(folder)


def test_bad_keys_are_one_line_errors(folder, keys, monkeypatch, tmp_path):
    (site, site_pub), _ = keys
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(tmp_path / "missing.pem"))
    with pytest.raises(ArtifactError, match=f"{TRUSTED_KEY_ENV}=.*No such file"):
        read_manifest(folder)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(site))  # the private key where the public one belongs
    with pytest.raises(ArtifactError, match="not an Ed25519 public key"):
        read_manifest(folder)
    monkeypatch.delenv(TRUSTED_KEY_ENV)
    with pytest.raises(ArtifactError, match="not an unencrypted Ed25519 private key"):
        write_manifest(folder, read_manifest(folder), sign=site_pub)


# --- names that leave their folder -----------------------------------------------------------
@pytest.mark.parametrize("key", ["../evil.onnx", "../../etc/model.fp32.onnx", "sub/model.onnx", "..", ""])
def test_artifact_names_that_leave_the_folder_are_refused(folder, key, capsys):
    manifest = read_manifest(folder)
    manifest["artifacts"][key] = manifest["artifacts"]["model.fp32.onnx"]
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="not a file name inside its folder"):
        targets.discover(folder)
    assert bench_cli.main(["--model", "m2anet_small", "--artifacts", str(folder.parent)]) == 2
    assert "not a file name inside its folder" in _one_line_error(capsys, "m2a-bench")


def test_a_source_that_leaves_the_folder_is_refused(folder):
    manifest = read_manifest(folder)
    manifest["artifacts"]["model.int8.onnx"]["source"] = "../model.fp32.onnx"
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match=re.escape("'../model.fp32.onnx', which is not a file name")):
        read_manifest(folder)


# --- an entry without parity (an export killed before its check) -----------------------------
def test_an_entry_without_parity_is_not_verified_for_every_reader(folder, tmp_path, capsys):
    manifest = read_manifest(folder)
    del manifest["artifacts"]["model.int8.onnx"]["parity"]
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="not verified: its export stopped before the parity check"):
        NodeClassifier.from_artifacts(folder, "int8")
    assert triton_cli.main([str(folder), "--out", str(tmp_path / "repo"), "--precision", "int8"]) == 2
    assert "not verified" in _one_line_error(capsys, "m2a-triton")

    spec = BackendSpec(f"ort:cpu:{folder / 'model.int8.onnx'}")
    info = suite.describe(spec, "m2anet_small")
    assert info["parity_passed"] is None
    step = {"scenario": "single", "batch": 1, "latency_ms": {"p90": 1.0}, "ms_per_node": 1.0}
    report = {"backends": [{**info, "steps": [{**step, "nodes_per_s": 1e3}]}]}
    ranked, excluded = select._candidates(report, folder, "single", {})
    assert not ranked and excluded[0]["reason"].startswith("not verified")


def test_triton_model_names_stay_inside_the_repository(small, tmp_path, capsys):
    out = tmp_path / "deep" / "repo"
    for name in ("../../x", "", ".", "..", "a/b", "a b", 'a"b'):  # the last two were written
        assert triton_cli.main([str(small), "--out", str(out), "--precision", "fp32", "--name", name]) == 2
        assert "cannot name a model folder, config and URL" in _one_line_error(capsys, "m2a-triton")
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_folder_one_level_off_is_one_line_naming_the_right_one(small, tmp_path, capsys):
    """Before: '.../model.fp16.onnx/manifest.json not found: run m2a-export', for a folder exported
    already; and m2a-bench, whose --artifacts is the folder above, asked to export into the model's."""
    model_file, root = small / "model.fp16.onnx", small.parent
    for folder, message in (
        (model_file, f"{model_file} is a file: give the m2a-export folder that holds it ({small})"),
        (root, f"{root / MANIFEST} not found: pass {small}"),
    ):
        assert triton_cli.main([str(folder), "--out", str(tmp_path / "repo")]) == 2
        assert _one_line_error(capsys, "m2a-triton") == f"m2a-triton: error: {message}"
    assert bench_cli.main(["--artifacts", str(small), "--out", str(tmp_path / "b")]) == 2
    assert _one_line_error(capsys, "m2a-bench") == (
        f"m2a-bench: error: {small} is one model's folder (it holds {MANIFEST}): m2a-bench takes the "
        f"folder above it, --artifacts {root} --model {small.name}"
    )
    assert not (tmp_path / "repo").exists() and not (tmp_path / "b").exists()


def test_select_re_signs_or_refuses_to_drop_the_signature(folder, keys, monkeypatch):
    (site, site_pub), _ = keys
    write_manifest(folder, read_manifest(folder), sign=site)
    info = suite.describe(BackendSpec(f"ort:cpu:{folder / 'model.fp16.onnx'}"), "m2anet_small")
    step = {
        "scenario": "single",
        "batch": 1,
        "latency_ms": {"p90": 1.0},
        "ms_per_node": 1.0,
        "nodes_per_s": 1e3,
    }
    env = {"cpu": "test", "threads": 1, "date": "today"}
    report = {"environment": env, "backends": [{**info, "steps": [step]}]}
    with pytest.raises(ArtifactError, match="would drop the signature: pass --sign KEYFILE"):
        select.select(report, folder)
    select.select(report, folder, sign=site)
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(site_pub))
    assert read_manifest(folder)["selection"]["single"]["artifact"] == "model.fp16.onnx"
