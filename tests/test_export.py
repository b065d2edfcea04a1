import collections
import json
import math
import shutil

import numpy as np
import onnx
import pytest

from m2anet import create_model
from m2anet.cli import export as cli
from m2anet.data import load_split
from m2anet.engines import InputError, open_backend
from m2anet.export.int8 import (
    CALIB_SEARCH,
    DEFAULT_CALIB_SIZE,
    PLACEMENTS,
    Calibration,
    calibration_search,
    quantize_int8,
    residual_adds,
)
from m2anet.export.onnx_export import export_fp32, max_abs_diff
from m2anet.io import atomic_path, sha256_file
from m2anet.manifest import ArtifactError, artifact_entry, read_manifest, write_manifest
from m2anet.parity import FP32_LOGIT_TOLERANCE as FP32_TOLERANCE


def _ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


# the base config differs from the small one only in widths: its classification-only graph adds nothing
@pytest.mark.parametrize(
    ("name", "heads"), [("m2anet_small", "both"), ("m2anet_small", "cls"), ("m2anet_base", "both")]
)
def test_fp32_export_matches_pytorch(request, tmp_path, name, heads):
    if (name, heads) == ("m2anet_small", "both"):  # the shared `small` export made this graph already
        model = create_model(name, pretrained=True)
        path = request.getfixturevalue("small") / "model.fp32.onnx"
    else:
        model = create_model(name, heads=heads)
        path = export_fp32(model, tmp_path / "m.onnx")
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["ct", "mask"]
    assert [o.name for o in proto.graph.output] == ["met_logit", "seg_logit"][: 2 if heads == "both" else 1]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [1, 16, 64, 64]  # only the batch is dynamic
    assert "BatchNormalization" not in _ops(path)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    for out, err in max_abs_diff(model, path, batches=(1, 7)).items():
        assert err <= FP32_TOLERANCE[out], (out, err)


def test_fp16_graph_is_typed_as_claimed(small):
    proto = onnx.load(str(small / "model.fp16.onnx"))
    values = collections.Counter()  # by elements: the FP32 tail has many small constants, few weights
    for t in proto.graph.initializer:
        values[t.data_type] += math.prod(t.dims)
    assert values[onnx.TensorProto.FLOAT16] > 10 * values[onnx.TensorProto.FLOAT]
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")}
    init = {t.name: t.data_type for t in proto.graph.initializer}
    assert all(init[w] == onnx.TensorProto.FLOAT16 for w in conv_weights if w in init)
    io = [*proto.graph.input, *proto.graph.output]
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in io)
    # the masked pooling stays in FP32
    inferred = onnx.shape_inference.infer_shapes(proto)
    vtype = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    matmul_out = [n.output[0] for n in proto.graph.node if n.op_type == "MatMul"]
    assert matmul_out and all(vtype[o] == onnx.TensorProto.FLOAT for o in matmul_out)


def test_int8_graph_has_symmetric_qdq_for_tensorrt(small):
    path = small / "model.int8.onnx"
    ops = _ops(path)
    assert ops["QuantizeLinear"] >= ops["Conv"] and ops["DequantizeLinear"] > ops["Conv"]
    proto = onnx.load(str(path))
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [init[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    entry = artifact_entry(path)
    assert entry["calibration"]["nodes"] == 64 and len(entry["calibration"]["sha256"]) == 64


def test_int8_graph_quantizes_the_skip_input_of_each_residual_add(small, tmp_path):
    """TensorRT fuses conv2, the residual Add and its ReLU into an INT8 kernel with an INT8 output when
    the skip input is quantized and the main one is not: one Add per ResBlock (7 in m2anet_small), each
    reading conv2's float output and a dequantized skip, its own output read by the ReLU as it is; no
    other Add reads a DequantizeLinear. The fallback, from the same ranges, is ONNX Runtime's placement
    for convolutions: a Q/DQ pair on every convolution's output as on its inputs, so conv2's output reaches
    the Add dequantized."""
    fp32 = small / "model.fp32.onnx"
    residual = residual_adds(onnx.load(str(fp32)).graph)
    assert len(residual) == 7
    cohort, cache = load_split("calib", n=16), tmp_path / "calibration.json"
    for placement in (True, False):
        path = tmp_path / f"residual-{placement}.onnx"
        calib = Calibration("max", 16, target="tensorrt", residual=placement)
        record = quantize_int8(fp32, path, calib, cohort=cohort, cache=cache)
        assert record["placement"] == PLACEMENTS[placement] and record["residual_adds"] == 7 * placement
        proto = onnx.load(str(path))
        producer = {out: n.op_type for n in proto.graph.node for out in n.output}
        readers: dict[str, list[str]] = {}
        for n in proto.graph.node:
            for t in n.input:
                readers.setdefault(t, []).append(n.op_type)
        convs = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose")]
        float_outputs = [n for n in convs if readers[n.output[0]] != ["QuantizeLinear"]]
        assert len(convs) == 31 and len(float_outputs) == 7 * placement
        for node in proto.graph.node if placement else ():
            if node.op_type != "Add":
                continue
            sources = sorted(producer.get(t, "constant") for t in node.input)
            if node.name in residual:
                assert sources == ["Conv", "DequantizeLinear"], node.name
                assert readers[node.output[0]] == ["Relu"], node.name  # the Add's output stays float
            else:
                assert "DequantizeLinear" not in sources, node.name


def test_int8_export_records_each_placement_it_tried(small):
    """The export tries the residual placement first and falls back to convolution inputs only at the same
    calibration; the manifest says which placement each try had and which was kept."""
    calibration = artifact_entry(small / "model.int8.onnx")["calibration"]
    trials = calibration["trials"]
    assert [t["placement"] for t in trials] == [PLACEMENTS[k % 2 == 0] for k in range(len(trials))]
    assert calibration["placement"] == trials[-1]["placement"]
    assert calibration["residual_adds"] == (7 if calibration["placement"] == PLACEMENTS[True] else 0)


def test_manifest_describes_and_verifies_every_artifact(small):
    manifest = read_manifest(small)
    assert set(manifest["artifacts"]) == {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx"}
    for name, entry in manifest["artifacts"].items():
        assert entry["sha256"] == sha256_file(small / name)
        assert entry["parity"]["passed"], (name, entry["parity"]["failures"])
        assert [i["name"] for i in entry["inputs"]] == ["ct", "mask"]
    assert manifest["model"]["weights_sha256"] == sha256_file(manifest["model"]["weights"])
    assert manifest["batch_profile"] == {"min": 1, "opt": 32, "max": 128}
    assert manifest["command"].startswith("m2a-export --model m2anet_small")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_artifact_runs_through_open_backend(small, test_split, precision):
    with open_backend(f"ort:cpu:{small / f'model.{precision}.onnx'}") as backend:
        met, seg = backend.infer(test_split.ct[:3], test_split.mask[:3])
    assert backend.precision == precision
    assert met.shape == (3, 1) and seg.shape == (3, 1, 16, 64, 64) and met.dtype == np.float32


def test_rerun_reuses_valid_artifacts(small, capsys):
    args = ["--model", "m2anet_small", "--precision", "all", "--out", str(small.parent), "--json"]
    assert cli.main([*args, "--parity-nodes", "24", "--calib-method", "max", "--calib-size", "64"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert sum("reused" in s["result"] for s in stages) == 3


def test_corrupted_artifact_is_refused(small, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("manifest.json", "model.fp32.onnx"):
        (folder / name).write_bytes((small / name).read_bytes())
    data = bytearray((folder / "model.fp32.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.fp32.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted or was replaced"):
        open_backend(f"ort:cpu:{folder / 'model.fp32.onnx'}")
    with pytest.raises(ArtifactError, match="not found"):
        open_backend(f"ort:cpu:{folder / 'model.int8.onnx'}")


def test_interrupted_write_leaves_no_final_file(tmp_path):
    target = tmp_path / "model.fp32.onnx"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half an onnx file")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous"


@pytest.mark.parametrize("spec", ["ort:cpu:{}/model.fp32.onnx", "torch:cpu"])
def test_a_backend_returns_the_outputs_asked_for_in_that_order(small, spec):
    calib = load_split("calib", n=3)
    options = {"model_name": "m2anet_small"} if spec.startswith("torch") else {}
    with open_backend(spec.format(small), **options) as backend:
        met, seg = backend.infer(calib.ct, calib.mask)
        alone = backend.infer(calib.ct, calib.mask, outputs=("met_logit",))
        swapped = backend.infer(calib.ct, calib.mask, outputs=("seg_logit", "met_logit"))
        for wrong in [("mask",), ()]:
            with pytest.raises(ValueError, match="choose among this backend's"):
                backend.infer(calib.ct, calib.mask, outputs=wrong)
    assert len(alone) == 1 and np.array_equal(alone[0], met)
    assert np.array_equal(swapped[0], seg) and np.array_equal(swapped[1], met)


def test_backend_input_errors(small):
    backend = open_backend(f"ort:cpu:{small / 'model.fp32.onnx'}")
    ct = np.zeros((2, 1, 16, 64, 64), np.float32)
    mask = np.zeros_like(ct)
    mask[:, :, 8, 32, 32] = 1
    cases = [
        (ct[:, :, :8], mask, "ct has shape"),
        (ct.astype(np.float64), mask, "dtype float64"),
        (np.where(ct == 0, np.nan, ct).astype(np.float32), mask, "NaN"),
        (ct, mask * 0.5, "not binary"),
        (ct, np.where(mask == 0, np.nan, mask).astype(np.float32), "not binary"),
        (ct, mask * 2, "not binary"),
        (ct, np.zeros_like(mask), "mask of patch 0 is empty"),
        (ct, mask[:1], "one mask per patch"),
    ]
    for c, m, message in cases:
        with pytest.raises(InputError, match=message):
            backend.infer(c, m)


def test_bad_cli_input_exits_nonzero(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--batch", "4,2,1", "--out", str(tmp_path)])
    assert e.value.code == 2
    code = cli.main(
        ["--model", "m2anet_small", "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("m2a-export: error:") and "not found" in err[-1]


def test_int8_that_fails_its_tier_is_not_shipped_silently(refused_int8):
    assert refused_int8["refused"] == 1
    assert "failed its parity tier" in refused_int8["stderr"]
    assert refused_int8["kept"] == 0
    assert not read_manifest(refused_int8["folder"])["artifacts"]["model.int8.onnx"]["parity"]["passed"]


def test_calibration_search_tries_what_was_asked():
    assert calibration_search("auto", None) == list(CALIB_SEARCH)
    assert calibration_search("auto", 32) == [("percentile", 32), ("max", 32)]
    assert calibration_search("max", None) == [("max", DEFAULT_CALIB_SIZE)]
    assert calibration_search("entropy", 16) == [("entropy", 16)]


def test_int8_search_keeps_the_calibration_closest_to_passing(refused_int8):
    """No calibration passes this tier: each method was tried at the asked size, every try is in the
    manifest, and the graph kept is the one with the fewest failures: the file the manifest names,
    with no stashed try left beside it."""
    folder = refused_int8["folder"]
    entry = read_manifest(folder)["artifacts"]["model.int8.onnx"]
    assert sha256_file(folder / "model.int8.onnx") == entry["sha256"]
    assert not list(folder.glob(".partial-*"))
    calibration = entry["calibration"]
    trials = calibration["trials"]
    tried = [(t["method"], t["nodes"], t["placement"]) for t in trials]
    assert tried == [(m, 8, PLACEMENTS[r]) for m in ("percentile", "max") for r in (True, False)]
    assert not any(t["passed"] for t in trials) and all(t["failures"] for t in trials)
    best = min(trials, key=lambda t: (len(t["failures"]), t["label_flips"], t["stress_prob_max_abs"]))
    kept = (calibration["method"], calibration["nodes"], calibration["placement"])
    assert kept == (best["method"], best["nodes"], best["placement"])


def test_parity_runs_m2a_verify_stress_inputs(small):
    """The export's check is m2a-verify's: every graph passed the stress inputs too, and INT8 says
    which calibrations it tried before the one it kept."""
    artifacts = read_manifest(small)["artifacts"]
    for name, entry in artifacts.items():
        cases = {row["case"]: row for row in entry["parity"]["stress"]}
        assert {"random masks", "all-background patch", "extreme HU (checkerboard)"} <= set(cases), name
        assert all(row["finite"] and row["passed"] for row in cases.values()), name
    calibration = artifacts["model.int8.onnx"]["calibration"]
    assert calibration["trials"][-1]["passed"] and not any(t["passed"] for t in calibration["trials"][:-1])
    assert (calibration["method"], calibration["nodes"]) == (
        calibration["trials"][-1]["method"],
        calibration["trials"][-1]["nodes"],
    )


def test_parity_recorded_without_stress_inputs_is_checked_again(small, tmp_path, capsys):
    """A folder exported before the export ran the stress inputs keeps its graphs; their check runs."""
    folder = tmp_path / "m2anet_small"
    shutil.copytree(small, folder)
    manifest = read_manifest(folder)
    del manifest["artifacts"]["model.fp32.onnx"]["parity"]["stress"]
    write_manifest(folder, manifest)
    assert _rerun(folder, "--precision", "fp32") == 0
    stages = [s["result"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert "model.fp32.onnx reused (hash and recipe match); its parity check is run again" in stages
    assert read_manifest(folder)["artifacts"]["model.fp32.onnx"]["parity"]["stress"]


def test_int8_cpu_runner_is_exact_on_every_x64_cpu(small):
    """ONNX Runtime's fused u8s8 convolution overflows 16-bit sums on x64 CPUs without VNNI (Dice of
    the INT8 masks fell to 0.81 there); OrtBackend asks for the exact kernel, so the optimized
    session must agree with the unoptimized one, which runs the Q/DQ graph as written."""
    import onnxruntime as ort

    from m2anet.data import load_split
    from m2anet.metrics import dice

    cohort = load_split("test", n=16)
    path = small / "model.int8.onnx"
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    ref_seg = reference.run(["seg_logit"], {"ct": cohort.ct, "mask": cohort.mask})[0]
    with open_backend(f"ort:cpu:{path}") as backend:
        seg = backend.infer(cohort.ct, cohort.mask)[1]
    assert dice(seg > 0, ref_seg > 0) >= 0.99


# --- an export killed at any point reruns to the result of an uninterrupted one ----------------
def test_export_killed_before_any_manifest_write_reruns_to_the_same_result(small, tmp_path, monkeypatch):
    """A SIGKILL runs no cleanup: the folder is left as it was just before the write, plus the
    write's own temporary file. Each write of one export is such a kill point; the folder is copied
    there instead of exporting once per kill point. The run that takes the copies starts itself from
    the first kill point (the FP32 graph written, no manifest yet), with the shared export's graph."""
    from m2anet.export import exporter

    folder = tmp_path / "killed" / "m2anet_small"
    folder.mkdir(parents=True)
    shutil.copyfile(small / "model.fp32.onnx", folder / "model.fp32.onnx")
    real, writes, kill_points = exporter.write_manifest, [], []

    def copy_then_write(target, manifest, **options):
        writes.append(target)
        if len(writes) > 1:  # before the first write: the state this run started from
            kill_points.append(tmp_path / f"before-write-{len(writes)}" / "m2anet_small")
            shutil.copytree(target, kill_points[-1])
        return real(target, manifest, **options)

    def leave_temporary_files(folder):
        (folder / ".partial-kx0j2s-manifest.json").write_bytes(b"")
        (folder / ".partial-9f3kq1-model.fp16.onnx").write_bytes(b"half a graph")

    def export(folder):
        args = ["--model", "m2anet_small", "--precision", "fp16", "--out", str(folder.parent), "--quiet"]
        assert cli.main([*args, "--parity-nodes", "4"]) == 0
        assert not list(folder.glob(".partial-*"))
        artifacts = read_manifest(folder)["artifacts"]
        return {
            name: (e["sha256"], e["parity"]["passed"], e["parity"]["cohort_sha256"])
            for name, e in artifacts.items()
        }

    leave_temporary_files(folder)
    monkeypatch.setattr(exporter, "write_manifest", copy_then_write)
    expected = export(folder)
    monkeypatch.setattr(exporter, "write_manifest", real)
    # graphs and verdicts of the uninterrupted session export (its parity cohort is larger)
    shared = read_manifest(small)["artifacts"]
    assert set(expected) == {"model.fp32.onnx", "model.fp16.onnx"}
    for name, (sha256, passed, _) in expected.items():
        assert (
            (sha256, passed) == (shared[name]["sha256"], shared[name]["parity"]["passed"]) == (sha256, True)
        )
    for point in kill_points:
        leave_temporary_files(point)
        assert export(point) == expected, point.parent.name
    # per artifact: the file recorded, its parity recorded; then the last write
    assert len(writes) == 2 * len(expected) + 1


def _rerun(folder, *extra):
    """The shared export's options (so everything it built is reused) and `extra`."""
    args = [
        "--model",
        "m2anet_small",
        "--out",
        str(folder.parent),
        "--parity-nodes",
        "24",
        "--calib-method",
        "max",
        "--calib-size",
        "64",
    ]
    return cli.main([*args, "--json", *extra])


def test_exporting_one_precision_keeps_the_other_entries(small, tmp_path, capsys):
    from m2anet import NodeClassifier

    folder = tmp_path / "m2anet_small"
    shutil.copytree(small, folder)
    before = read_manifest(folder)["artifacts"]
    assert _rerun(folder, "--precision", "fp16") == 0
    stages = [s["result"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert "model.int8.onnx kept" in stages
    assert read_manifest(folder)["artifacts"] == before
    with NodeClassifier.from_artifacts(folder, "int8") as clf:
        assert clf.info["precision"] == "int8"

    (folder / "model.int8.onnx").unlink()
    assert _rerun(folder, "--precision", "fp16") == 0
    stages = [s["result"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert "model.int8.onnx dropped: the file is gone or was changed" in stages
    assert set(read_manifest(folder)["artifacts"]) == {"model.fp32.onnx", "model.fp16.onnx"}


def test_fp16_keep_rebuilds_the_graph_and_a_misnamed_node_is_refused(small, tmp_path, capsys):
    """Before, --fp16-keep on a folder with an FP16 graph reused it ('hash, recipe and parity match'),
    and a misspelt node name exported with nothing kept."""
    folder = tmp_path / "m2anet_small"
    shutil.copytree(small, folder)
    first_conv = next(n for n in onnx.load(str(folder / "model.fp32.onnx")).graph.node if n.op_type == "Conv")
    before = read_manifest(folder)["artifacts"]
    for flag in ("--fp16-keep", "--int8-exclude"):
        assert _rerun(folder, "--precision", "all", flag, first_conv.name + "x") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag} '{first_conv.name}x': model.fp32.onnx has no node" in err[0], err
    assert read_manifest(folder)["artifacts"] == before
    assert _rerun(folder, "--precision", "fp16", "--fp16-keep", first_conv.name) == 0
    entry = read_manifest(folder)["artifacts"]["model.fp16.onnx"]
    assert (
        entry["recipe"]["keep_fp32"] == [first_conv.name]
        and entry["sha256"] != before["model.fp16.onnx"]["sha256"]
    )
    graph = onnx.load(str(folder / "model.fp16.onnx")).graph
    kept = next(n for n in graph.node if n.name == first_conv.name)
    assert kept.input[1] not in {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}


def test_sign_writes_a_signature_the_trusted_key_accepts(small, tmp_path, monkeypatch, capsys, keys):
    from m2anet.manifest import TRUSTED_KEY_ENV

    folder = tmp_path / "m2anet_small"
    shutil.copytree(small, folder)
    (private, public), _ = keys
    assert _rerun(folder, "--precision", "fp16", "--sign", str(private)) == 0
    capsys.readouterr()
    monkeypatch.setenv(TRUSTED_KEY_ENV, str(public))
    manifest = read_manifest(folder)
    assert set(manifest["artifacts"]) == {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx"}
    assert manifest["seal"]["ed25519"]["value"]
    assert _rerun(folder, "--precision", "fp16") == 2  # the site asks for signed manifests
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the manifest must be signed: pass --sign" in err[0]
    assert _rerun(folder, "--precision", "all", "--sign", str(private)) == 0
    stages = [s["result"] for s in json.loads(capsys.readouterr().out)["stages"]]
    assert sum("reused (hash, recipe and parity match" in s for s in stages) == 3
