import json
import shutil

import numpy as np
import onnx

from m2anet.cli import verify
from m2anet.io import sha256_file
from m2anet.manifest import read_manifest, write_manifest
from m2anet.parity import TIERS, Tier, bootstrap_auc_difference


def _run(capsys, *args):
    """24 test nodes, the ones the `small` export's parity check used; the largest-batch stress case
    (5) stays larger than the random-mask case (4 patches)."""
    code = verify.main([*args, "--n", "24", "--stress-batch", "5"])
    return code, capsys.readouterr()


def test_shipped_int8_graph_passes_its_tier(small, capsys, tmp_path):
    """INT8, the graph furthest from the reference; the export checked every graph the same way."""
    precision = "int8"
    code, out = _run(capsys, f"ort:cpu:{small / f'model.{precision}.onnx'}", "--report", str(tmp_path))
    assert code == 0, out.out
    assert f"tier {precision}: PASS" in out.out and "nodes changing diagnosis" in out.out
    report = json.loads((tmp_path / "verify.json").read_text())
    md = (tmp_path / "verify.md").read_text()
    assert report["passed"] and report["tier"] == precision
    assert f"| accuracy | {report['reference']['accuracy']:.4f} | {report['candidate']['accuracy']:.4f}" in md
    assert (tmp_path / "verify.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {s["case"] for s in report["stress"]} >= {"random masks", "all-background patch"}
    assert all(s["finite"] for s in report["stress"])


def test_damaged_candidate_fails_naming_the_criterion(small, tmp_path, capsys):
    folder = tmp_path / "damaged"
    folder.mkdir()
    proto = onnx.load(str(small / "model.fp32.onnx"))
    gemm_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Gemm"}
    for t in proto.graph.initializer:
        if t.name in gemm_weights:
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(w * 1.5 + 0.05, t.name))
    onnx.save(proto, str(folder / "model.fp32.onnx"))
    manifest = read_manifest(small)
    manifest["artifacts"] = {
        "model.fp32.onnx": {
            **manifest["artifacts"]["model.fp32.onnx"],
            "sha256": sha256_file(folder / "model.fp32.onnx"),
        }
    }
    write_manifest(folder, manifest)
    code, out = _run(capsys, f"ort:cpu:{folder / 'model.fp32.onnx'}", "--json", "--no-stress")
    report = json.loads(out.out)
    assert code == 1 and not report["passed"]
    assert any("met_logit error" in f for f in report["failures"])


def test_failing_criteria_are_printed_first(small, capsys):
    code, out = _run(capsys, f"ort:cpu:{small / 'model.int8.onnx'}", "--tier", "fp32", "--no-stress")
    assert code == 1
    assert out.out.splitlines()[0].startswith("FAIL: met_logit error > 0.0001")


def test_bootstrap_is_reproducible_with_a_seed():
    rng = np.random.default_rng(3)
    label = rng.integers(0, 2, 200)
    p_ref = np.clip(label * 0.3 + rng.random(200) * 0.7, 0, 1)
    p_cand = np.clip(p_ref + rng.normal(0, 0.05, 200), 0, 1)
    a = bootstrap_auc_difference(label, p_ref, p_cand, seed=7, rounds=300)
    assert a == bootstrap_auc_difference(label, p_ref, p_cand, seed=7, rounds=300)
    assert a != bootstrap_auc_difference(label, p_ref, p_cand, seed=8, rounds=300)
    assert a["low"] <= 0 <= a["high"] + 0.05


def test_bad_spec_is_a_one_line_error(capsys):
    assert verify.main(["ort:cpu:/nonexistent/model.int8.onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m2a-verify: error:")


def test_an_artifact_folder_for_a_file_is_one_line_listing_its_models(small, capsys):
    """Before, the folder was 'not found', though it was there."""
    assert verify.main([f"ort:cpu:{small}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"m2a-verify: error: artifact {small} is a folder: name one of its model files (here: "
        "model.fp16.onnx, model.fp32.onnx, model.int8.onnx)"
    ], err


def test_a_model_or_heads_other_than_the_artifacts_is_refused(small, capsys):
    """Before, --model and --heads were dropped for an artifact, which verified its own model instead."""
    artifact = f"ort:cpu:{small / 'model.fp16.onnx'}"
    for flag, value, held in (("--model", "m2anet_base", "m2anet_small"), ("--heads", "cls", "both")):
        assert verify.main([artifact, flag, value, "--n", "2", "--no-stress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"error: {flag} {value} does not match" in err[0], err
        assert f"which holds {held}: drop {flag}" in err[0]
    code, _ = _run(capsys, artifact, "--model", "m2anet_small", "--heads", "both", "--no-stress")
    assert code == 0


def test_diagnose_finds_layers_to_keep_in_fp32(refused_int8, monkeypatch, capsys, tmp_path):
    folder = refused_int8["folder"]  # calibrated on 8 nodes: each re-quantization is cheap
    monkeypatch.setitem(TIERS, "int8", Tier("int8", met_logit_abs=1e-4))  # the int8 graph fails this
    args = [f"ort:cpu:{folder / 'model.int8.onnx'}", "--n", "8", "--no-stress", "--diagnose"]
    code = verify.main([*args, "--report", str(tmp_path)])
    out = capsys.readouterr().out
    ranked = json.loads((tmp_path / "verify.json").read_text())["diagnosis"]["ranked"]
    assert len(ranked) >= 20 and [s for _, s in ranked] == sorted(s for _, s in ranked)
    assert code == 1 and "--int8-exclude " in out
    assert out.strip().splitlines()[-1].split("--int8-exclude ")[1].split()[0] == ranked[0][0]


def test_a_folder_copied_from_another_machine_verifies(small, tmp_path, capsys):
    """The manifest names the weights by the build machine's path; here only the shipped copy with
    the recorded hash exists."""
    folder = tmp_path / "copied" / "m2anet_small"
    shutil.copytree(small, folder)
    manifest = read_manifest(folder)
    manifest["model"]["weights"] = "/build-machine/m2anet/weights/m2anet_small.safetensors"
    write_manifest(folder, manifest)
    code = verify.main([f"ort:cpu:{folder / 'model.fp32.onnx'}", "--n", "16", "--no-stress"])
    out = capsys.readouterr()
    assert code == 0, out.err  # FP32 within 1e-4 of the reference: the reference ran the same weights
    assert "tier fp32: PASS" in out.out
