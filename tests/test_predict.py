import csv
import gzip
import json
import locale
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m2anet import NodeClassifier, node_report
from m2anet.classifier import CPU_BATCH
from m2anet.cli import predict
from m2anet.contract import PATCH_SHAPE, PATCH_SPACING_MM
from m2anet.data import make_study, resample_study
from m2anet.engines import InputError
from m2anet.engines.environment import tensorrt_missing_reason
from m2anet.io import COMMIT_JOURNAL, finish_commit, sha256_file
from m2anet.manifest import ArtifactError, read_manifest, write_manifest
from m2anet.node_report import StudyReport, write_outputs
from m2anet.preprocess import PreparedStudy, StudyError, prepare_study, read_image, short_axis_mm, to_image
from m2anet.weights import shipped_weights

# Geometry read back from NIfTI passes through float32 (the header's type): 0.8 mm becomes
# 0.800000012 mm, so a centroid 200 mm from the origin moves by ~5e-6 mm. 1e-3 mm is far below
# any clinical meaning and far above that round-off.
CENTROID_MM = 1e-3
# A voxel volume from float32 spacing carries a relative error of ~1e-7 per axis.
VOLUME_REL = 1e-5


@pytest.fixture(scope="module")
def study():
    """A 3-node synthetic study: CT (HU) and label map on a 0.8 x 0.8 x 3.0 mm identity grid."""
    return make_study(seed=5, n_nodes=3)


@pytest.fixture(scope="module")
def classifier(small):
    with NodeClassifier.from_artifacts(small, "fp32", "ort:cpu") as clf:
        yield clf


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_demo_runs_end_to_end_and_matches_the_generator(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no artifacts/ here: the demo falls back to the shipped weights
    assert predict.main(["--demo", "--save-masks"]) == 0
    out = tmp_path / "m2a-demo"
    truth = json.loads((out / "demo-study" / "truth.json").read_text())
    rows = _rows(out / "nodes.csv")
    report = json.loads((out / "nodes.json").read_text())
    assert [int(r["label"]) for r in rows] == [t["label"] for t in truth]
    assert report["classifier"]["sha256"] == sha256_file(shipped_weights("m2anet_small"))
    assert set(report["timings_s"]) >= {"read_s", "preprocess_s", "infer_s", "total_s"}
    threshold = report["classifier"]["threshold"]
    ct_path = out / "demo-study" / "ct.nii.gz"
    itk_ct, ras_affine = sitk.ReadImage(str(ct_path)), nib.load(ct_path).affine
    for row, node, t in zip(rows, report["nodes"], truth, strict=True):
        assert row["status"] == "classified" and row["backend"] == "torch"
        centroid = [node[f"centroid_lps_{a}_mm"] for a in "xyz"]
        assert [float(row[f"centroid_lps_{a}_mm"]) for a in "xyz"] == pytest.approx(centroid, rel=1e-5)
        np.testing.assert_allclose(centroid, t["centroid_mm"], atol=CENTROID_MM)
        # the frame the column names promise: nibabel reads the same voxel at RAS = (-x, -y, z) of LPS
        ijk = [node[f"voxel_{a}"] for a in "ijk"]
        lps = np.array(itk_ct.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose((ras_affine @ [*ijk, 1])[:3], lps * [-1, -1, 1], atol=CENTROID_MM)
        assert np.all(np.abs(lps - centroid) <= np.array(itk_ct.GetSpacing()) / 2 + CENTROID_MM)
        assert node["volume_mm3"] == pytest.approx(t["volume_mm3"], rel=VOLUME_REL)
        # the generator's short axis is a design parameter: twice the smallest semi-axis of an
        # ellipsoid whose margin ripples change its widths by up to ~20%, tilted at random so an
        # axial cut is wider than the 3-D minimum (0.63x..1.66x over 36 nodes of 6 studies)
        assert 0.6 * t["short_axis_mm"] <= node["short_axis_mm"] <= 1.8 * t["short_axis_mm"]
        assert 0.0 <= node["probability"] <= 1.0
        assert node["prediction"] == ("metastatic" if node["probability"] >= threshold else "benign")
        assert float(row["probability"]) == pytest.approx(node["probability"], rel=1e-5)
    masks = sitk.ReadImage(str(out / "masks.nii.gz"))
    ct = sitk.ReadImage(str(out / "demo-study" / "ct.nii.gz"))
    assert masks.GetSize() == ct.GetSize() and masks.GetOrigin() == ct.GetOrigin()
    assert set(np.unique(sitk.GetArrayViewFromImage(masks))) <= set(range(len(truth) + 1))
    assert "probability" in capsys.readouterr().out


def _hand_crops(ct, labels, study: PreparedStudy):
    """Crop the numpy arrays with slicing alone: on a native 0.8 x 0.8 x 3.0 mm identity grid the
    patches must be the voxels themselves, not resampled values."""
    shape = np.array([16, 64, 64])  # the patch; also the padding, enough for any crop
    hu = np.pad(sitk.GetArrayFromImage(ct).astype(np.float32), [(n, n) for n in shape], constant_values=-1024)
    lab = np.pad(sitk.GetArrayFromImage(labels), [(n, n) for n in shape])
    crops, masks = [], []
    for i, origin in zip(study.classified, study.patch_origins, strict=True):
        start = np.round((np.array(origin) - ct.GetOrigin()) / ct.GetSpacing()).astype(int)[::-1] + shape
        box = tuple(slice(s, s + n) for s, n in zip(start, shape, strict=True))
        crops.append(np.clip((hu[box] + 175) / 450, 0, 1))
        masks.append(lab[box] == study.nodes[i].label)
    return np.stack(crops)[:, None].astype(np.float32), np.stack(masks)[:, None].astype(np.float32)


def test_predict_study_equals_predict_patches_on_the_same_crops(classifier, study):
    ct, labels, _ = study
    prepared = prepare_study(ct, labels)
    hand_ct, hand_mask = _hand_crops(ct, labels, prepared)
    np.testing.assert_allclose(prepared.ct, hand_ct, atol=1e-6)
    np.testing.assert_array_equal(prepared.mask, hand_mask)
    assert all(m.sum() > 0 for m in hand_mask)
    rows = classifier.predict_study(ct, labels)
    by_patch = classifier.predict_patches(hand_ct, hand_mask)
    # the same patches through the same ONNX Runtime session: only float round-off may differ
    np.testing.assert_allclose([r["probability"] for r in rows], by_patch.probability, atol=1e-6)
    assert [r["prediction"] == "metastatic" for r in rows] == by_patch.predicted.astype(bool).tolist()


def test_mask_probabilities_are_float32_and_left_out_when_not_asked_for(classifier, study):
    prepared = prepare_study(*study[:2])
    with_seg = classifier.predict_patches(prepared.ct, prepared.mask)
    without = classifier.predict_patches(prepared.ct, prepared.mask, seg=False)
    logits = classifier.backend.infer(prepared.ct, prepared.mask)
    assert without.seg is None and np.array_equal(without.probability, with_seg.probability)
    assert with_seg.seg is not None and with_seg.seg.dtype == np.float32
    np.testing.assert_allclose(with_seg.seg, 1 / (1 + np.exp(-logits[1][:, 0].astype(np.float64))), atol=1e-6)


def _reoriented(image: sitk.Image, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> sitk.Image:
    """The same voxels in patient space, stored with permuted and flipped axes (ITK x, y, z order).

    New axis j is old axis perm[j], reversed where flips[j]; the direction matrix and origin are set
    so that every voxel keeps its physical position.
    """
    old = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (x, y, z)
    new = old.transpose(perm)
    new = np.flip(new, [j for j in range(3) if flips[j]])
    size, spacing = np.array(image.GetSize()), np.array(image.GetSpacing())
    direction = np.zeros((3, 3))
    first = np.zeros(3)  # old index of the new image's first voxel
    for j in range(3):
        direction[perm[j], j] = -1.0 if flips[j] else 1.0
        first[perm[j]] = size[perm[j]] - 1 if flips[j] else 0
    out = sitk.GetImageFromArray(np.ascontiguousarray(new.transpose(2, 1, 0)))
    out.SetSpacing(spacing[list(perm)].tolist())
    out.SetDirection(direction.ravel().tolist())
    out.SetOrigin(image.TransformIndexToPhysicalPoint([int(v) for v in first]))
    return out


def test_study_rotated_in_patient_space_gives_the_same_results(classifier, study):
    ct, labels, _ = study
    turned_ct = _reoriented(ct, (2, 0, 1), (True, False, True))
    turned_labels = _reoriented(labels, (2, 0, 1), (True, False, True))
    assert turned_ct.GetDirection() != ct.GetDirection() and turned_ct.GetSize() != ct.GetSize()
    # the same anatomy gives the same lattice, so the patches agree to round-off in ITK's index maths
    np.testing.assert_allclose(
        prepare_study(turned_ct, turned_labels).ct, prepare_study(ct, labels).ct, atol=1e-5
    )
    before = classifier.predict_study(ct, labels)
    after = classifier.predict_study(turned_ct, turned_labels)
    for a, b in zip(before, after, strict=True):
        assert a["label"] == b["label"]
        # probabilities of patches equal to 1e-5 (HU scaled by 1/450): the network is smooth at that scale
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
        for key in ("centroid_lps_x_mm", "centroid_lps_y_mm", "centroid_lps_z_mm"):
            assert a[key] == pytest.approx(b[key], abs=CENTROID_MM)
        assert a["volume_mm3"] == pytest.approx(b["volume_mm3"], rel=VOLUME_REL)
        assert a["short_axis_mm"] == pytest.approx(b["short_axis_mm"], abs=1e-6)
        assert turned_ct.TransformIndexToPhysicalPoint([b[f"voxel_{a}"] for a in "ijk"]) == pytest.approx(
            ct.TransformIndexToPhysicalPoint([a[f"voxel_{k}"] for k in "ijk"]), abs=CENTROID_MM
        )


def test_patch_masks_are_the_label_map_at_the_patch_points_on_an_oblique_grid(study):
    """A node's patch mask is cut from its whole-extent sample on the lattice, not resampled: it must be
    the label map at the patch's own lattice points, here on a 0.75 x 0.75 x 2.0 mm grid turned 12
    degrees about z and 4 about x."""
    ct, labels = resample_study(*study[:2], (0.75, 0.75, 2.0), 12.0)
    prepared = prepare_study(ct, labels)
    assert len(prepared.classified) == 3
    for i, origin, mask in zip(prepared.classified, prepared.patch_origins, prepared.mask[:, 0], strict=True):
        at_patch = sitk.Resample(
            labels,
            PATCH_SHAPE[::-1],
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            origin,
            PATCH_SPACING_MM[::-1],
        )
        np.testing.assert_array_equal(mask, sitk.GetArrayFromImage(at_patch) == prepared.nodes[i].label)


def test_a_node_inside_its_patch_is_not_called_larger_than_it():
    """On 1.25 mm slices every fifth patch slice lies half way between two CT slices, where round-off
    picks the nearest. The node's mask and its patch's were sampled apart and could pick differently:
    8 voxels apart, node 5 here (7.4 mm short axis, 409 mm3) was reported larger than the 51 x 51 x 48
    mm patch."""
    ct, labels = resample_study(*make_study(seed=1, n_nodes=6)[:2], (0.7, 0.7, 1.25))
    prepared = prepare_study(ct, labels)
    assert len(prepared.classified) == 6 and prepared.warnings == []
    assert not any(node.larger_than_patch for node in prepared.nodes)


def test_numpy_inputs_with_geometry_match_images(classifier, study):
    ct, labels, _ = study
    rows = classifier.predict_study(
        sitk.GetArrayFromImage(ct),
        sitk.GetArrayFromImage(labels),
        spacing=ct.GetSpacing(),
        origin=ct.GetOrigin(),
    )
    assert [r["probability"] for r in rows] == pytest.approx(
        [r["probability"] for r in classifier.predict_study(ct, labels)], abs=1e-7
    )
    with pytest.raises(StudyError, match="needs its geometry"):
        classifier.predict_study(sitk.GetArrayFromImage(ct), labels)


def test_concurrent_calls_give_the_sequential_results(classifier, study):
    ct, labels, _ = study
    prepared = prepare_study(ct, labels)
    expected = classifier.predict_patches(prepared.ct, prepared.mask).probability
    results = [None] * 4

    def work(i):
        results[i] = classifier.predict_patches(prepared.ct, prepared.mask).probability

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-7)


def test_short_axis_of_a_rotated_rectangle():
    yy, xx = np.mgrid[:80, :80] * 0.8
    angle = np.deg2rad(30)
    u = (xx - 32) * np.cos(angle) + (yy - 32) * np.sin(angle)
    v = -(xx - 32) * np.sin(angle) + (yy - 32) * np.cos(angle)
    plane = (np.abs(u) <= 10) & (np.abs(v) <= 3)  # 20 x 6 mm
    # pixel corners are counted, so a rasterised edge adds at most one pixel diagonal (1.13 mm)
    assert 6.0 <= short_axis_mm(plane[None]) <= 6.0 + 0.8 * np.sqrt(2)
    assert short_axis_mm(np.zeros((2, 4, 4), bool) | (np.arange(4) == 1)[None, None]) == pytest.approx(0.8)


# ---------------------------------------------------------------- bad input, through the CLI


def _small_hu():
    """24 x 96 x 96 HU: fat, a strip of lung (a CT without air is refused) and two 6 mm nodes."""
    hu = np.random.default_rng(0).normal(-100, 20, (24, 96, 96)).astype(np.int16)
    hu[:, :, 84:] = -850
    hu[10:13, 30:38, 30:38] = 40
    hu[10:13, 60:68, 60:68] = 45
    return hu


def _small_study(folder, labels=None, hu=None, **geometry):
    """A 24 x 96 x 96 CT with two 6 mm cubes as nodes 1 and 2; the CT and label map can be swapped."""
    hu = _small_hu() if hu is None else hu
    if labels is None:
        labels = np.zeros((24, 96, 96), np.uint16)
        labels[10:13, 30:38, 30:38] = 1
        labels[10:13, 60:68, 60:68] = 2
    spacing = geometry.pop("spacing", (0.8, 0.8, 3.0))
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_image(hu, (0.8, 0.8, 3.0)), str(folder / "ct.nii.gz"))
    sitk.WriteImage(to_image(labels, spacing, **geometry), str(folder / "nodes.nii.gz"))
    return folder / "ct.nii.gz", folder / "nodes.nii.gz"


def _run(capsys, small, ct, nodes, out):
    code = predict.main(
        [str(ct), str(nodes), "--artifacts", str(small), "--precision", "fp32", "--out", str(out), "--quiet"]
    )
    return code, capsys.readouterr().err.strip().splitlines()


def _write_dicom_series(image, folder, series_uid):
    """ITK's GDCM writer leaves the process in the "C" locale (ASCII text I/O for everything that runs later
    in the test session, torch's inductor templates included): it is put back. m2anet only reads DICOM."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(image, folder, series_uid)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(image, folder, series_uid):
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid.rsplit('.', 1)[1]}-{k:03d}.dcm"))
        writer.Execute(plane)


def _bad_case(case, tmp_path):
    """Write the bad study for `case`; returns (ct path, nodes path)."""
    folder = tmp_path / case
    labels = np.zeros((24, 96, 96), np.uint16)
    labels[10:13, 30:38, 30:38] = 1
    if case == "nan_ct":  # NRRD: ITK's NIfTI reader turns NaN into 0 before anyone can see it
        ct, nodes = _small_study(folder)
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).astype(np.float32)
        hu[5, 5, 5] = np.nan
        sitk.WriteImage(to_image(hu, (0.8, 0.8, 3.0)), str(folder / "ct.nrrd"))
        return folder / "ct.nrrd", nodes
    if case == "all_nan_nifti":  # ITK's NIfTI reader alone would read an all-zero (constant) CT
        return _small_study(folder, hu=np.full((24, 96, 96), np.nan, np.float32))
    if case == "raw_0_4095":  # stored values without the rescale intercept: air 0, fat 924
        return _small_study(folder, hu=(_small_hu() + 1024).astype(np.uint16))
    if case == "constant_ct":
        return _small_study(folder, hu=np.full((24, 96, 96), 40, np.int16))
    if case == "complex_ct":  # to_image refuses complex arrays: write it with SimpleITK itself
        ct, nodes = _small_study(folder)
        image = sitk.GetImageFromArray(_small_hu().astype(np.complex64))
        image.SetSpacing((0.8, 0.8, 3.0))
        sitk.WriteImage(image, str(ct))
        return ct, nodes
    if case == "shifted_grid":
        return _small_study(folder, origin=(4.0, 0.0, 0.0))
    if case == "voxel_size_in_metres":  # every node was classified at 0.0 mm and 0 mm3, "benign"
        metres = (0.0008, 0.0008, 0.003)
        ct, nodes = _small_study(folder, spacing=metres)
        sitk.WriteImage(to_image(_small_hu(), metres), str(ct))
        return ct, nodes
    if case == "outside_grid":
        return _small_study(folder, labels=labels[:, :48, :48], origin=(0.0, 60.0, 0.0))
    if case == "empty_labels":
        return _small_study(folder, labels=np.zeros_like(labels))
    if case == "fractional_labels":
        return _small_study(folder, labels=labels.astype(np.float32) * 0.5)
    if case == "missing_file":
        ct, _ = _small_study(folder)
        return ct, folder / "no-such-nodes.nii.gz"
    if case == "truncated_file":
        ct, nodes = _small_study(folder)
        data = ct.read_bytes()
        ct.write_bytes(data[: len(data) // 2])
        return ct, nodes
    if case == "two_dicom_series":
        _, nodes = _small_study(folder)
        series = folder / "dicom"
        series.mkdir()
        image = to_image(np.zeros((24, 96, 96), np.int16), (0.8, 0.8, 3.0))
        for uid in ("1.2.826.0.1.3680043.2.1125.100", "1.2.826.0.1.3680043.2.1125.200"):
            _write_dicom_series(image, series, uid)
        return series, nodes
    if case == "only_node_at_edge":
        edge = np.zeros_like(labels)
        edge[0:2, 40:46, 40:46] = 1
        return _small_study(folder, labels=edge)
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("nan_ct", "NaN"),
        ("all_nan_nifti", "ct.nii.gz has 221184 NaN or infinite voxels"),
        ("raw_0_4095", "no air"),
        ("constant_ct", "CT is constant"),
        ("complex_ct", "CT has complex voxels"),
        ("shifted_grid", "incompatible grid"),
        ("voxel_size_in_metres", "CT voxel size 0.0008 x 0.0008 x 0.003 mm (x, y, z) is outside"),
        ("outside_grid", "incompatible grid"),
        ("empty_labels", "empty"),
        ("fractional_labels", "non-integer"),
        ("missing_file", "not found: check the path"),
        ("truncated_file", "truncated"),
        ("two_dicom_series", "2 DICOM series"),
        ("only_node_at_edge", "no node could be classified"),
    ],
)
def test_bad_input_fails_in_one_line_without_a_report(small, tmp_path, capsys, case, message):
    ct, nodes = _bad_case(case, tmp_path)
    code, err = _run(capsys, small, ct, nodes, tmp_path / "out")
    errors = [line for line in err if line.startswith("m2a-predict: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not (tmp_path / "out" / "nodes.csv").exists()


def test_nan_voxel_size_in_a_nifti_header_fails_in_one_line_without_an_itk_dump(small, tmp_path, capfd):
    ct, nodes = _small_study(tmp_path / "study")
    header = bytearray(gzip.decompress(ct.read_bytes()))
    header[80:84] = struct.pack("<f", float("nan"))  # pixdim[1]: the x voxel size
    header[280:284] = struct.pack("<f", float("nan"))  # srow_x[0]: ITK prints an SVD dump for it
    ct.write_bytes(gzip.compress(bytes(header)))
    args = [str(ct), str(nodes), "--artifacts", str(small), "--precision", "fp32", "--quiet"]
    assert predict.main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m2a-predict: error:") and "NaN" in err[0], err
    assert "voxel size" in err[0]


def test_numpy_volumes_of_the_wrong_kind_fail_in_one_line(classifier, study, capfd):
    ct, labels, _ = study
    hu, nodes = sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(labels)
    geometry = {"spacing": ct.GetSpacing()}
    # a boolean mask of one node is a label map holding label 1
    assert [r["label"] for r in classifier.predict_study(hu, nodes == 2, **geometry)] == [1]
    cases = [
        (hu.astype(np.complex64), geometry, "complex values"),
        (hu > 0, geometry, "CT has no air"),
        (hu, {"spacing": (float("nan"), 0.8, 3.0)}, "bad geometry"),
        (hu, {"spacing": (0.8, 0.8, 0.0)}, "bad geometry"),
        (hu, {"spacing": (800.0, 800.0, 3000.0)}, "voxel size 800 x 800 x 3000 mm"),  # micrometres
    ]
    for volume, kwargs, message in cases:
        with pytest.raises(StudyError, match=message) as caught:
            classifier.predict_study(volume, nodes, **kwargs)
        assert "\n" not in str(caught.value)
    assert "vnl_svd" not in capfd.readouterr().err  # ITK's SVD dump for a NaN spacing


def test_a_chest_ct_with_scanner_padding_is_plausible(study):
    """Outside the scanned circle scanners store a sentinel far below air: neither air nor out of range."""
    ct, labels, _ = study
    hu = sitk.GetArrayFromImage(ct)
    _, yy, xx = np.indices(hu.shape)
    outside = (yy - hu.shape[1] / 2) ** 2 + (xx - hu.shape[2] / 2) ** 2 > (hu.shape[1] / 2) ** 2
    expected = prepare_study(ct, labels).ct  # the nodes' patches lie inside the circle
    for sentinel in (-3024, -32768):
        padded = to_image(np.where(outside, sentinel, hu).astype(np.int16), ct.GetSpacing())
        np.testing.assert_array_equal(prepare_study(padded, labels).ct, expected)


def test_predict_patches_refuses_raw_hu(classifier, study):
    prepared = prepare_study(*study[:2])
    raw = prepared.ct * 450.0 - 175.0  # the patches back in HU
    with pytest.raises(InputError, match=r"values in \[-175, 275\], not \[0, 1\]: .*hu_to_input"):
        classifier.predict_patches(raw, prepared.mask)


def test_preprocess_imports_without_simpleitk():
    """Training (short_axis_mm) runs on GPU images without SimpleITK; reading a study says what to install."""
    code = (
        "import sys\nsys.modules['SimpleITK'] = None\n"
        "import numpy as np\nfrom m2anet.preprocess import short_axis_mm, to_image\n"
        "print(short_axis_mm(np.ones((1, 5, 5), bool), (1.0, 1.0)))\n"
        "try:\n    to_image(np.zeros((2, 2, 2)), (1, 1, 1))\nexcept ImportError as e:\n    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    width, message = run.stdout.strip().splitlines()
    assert float(width) == pytest.approx(5.0)
    assert message.startswith("SimpleITK is not installed") and "pip install" in message


def test_predict_on_onnx_runtime_runs_without_torch(small, tmp_path):
    """m2a-predict on an ONNX artifact needs no torch: importing it took 1.35 s of the command's start,
    which is 0.7 s without it (and a host running ONNX Runtime or a Triton client need not load it)."""
    ct, nodes = _small_study(tmp_path / "study")
    argv = [str(ct), str(nodes), "--artifacts", str(small), "--precision", "fp32", "--backend", "ort:cpu"]
    code = (
        "import sys\nsys.modules['torch'] = None\nfrom m2anet.cli import predict\n"
        f"predict.main({[*argv, '--out', str(tmp_path / 'out'), '--quiet']!r})\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(_rows(tmp_path / "out" / "nodes.csv")) == 2


def test_node_at_the_edge_is_skipped_and_reported_as_such(small, tmp_path, capsys):
    labels = np.zeros((24, 96, 96), np.uint16)
    labels[10:13, 30:38, 30:38] = 1
    labels[21:24, 60:68, 60:68] = 2  # reaches the last slice
    ct, nodes = _small_study(tmp_path / "study", labels=labels)
    code, err = _run(capsys, small, ct, nodes, tmp_path / "out")
    assert code == 0
    assert any(line.startswith("m2a-predict: warning: node 2 touches the edge") for line in err)
    rows = _rows(tmp_path / "out" / "nodes.csv")
    assert [(r["label"], r["status"]) for r in rows] == [("1", "classified"), ("2", "skipped")]
    assert rows[1]["probability"] == "" and "edge" in rows[1]["note"]
    assert float(rows[0]["volume_mm3"]) == pytest.approx(3 * 8 * 8 * 0.8 * 0.8 * 3.0, rel=VOLUME_REL)


def test_dicom_series_folder_reads_like_nifti(tmp_path):
    hu = np.random.default_rng(1).normal(0, 100, (6, 20, 24)).astype(np.int16)
    image = to_image(hu, (0.8, 0.8, 3.0), origin=(10.0, 20.0, 30.0))
    _write_dicom_series(image, tmp_path, "1.2.826.0.1.3680043.2.1125.300")
    read = read_image(tmp_path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), hu)
    assert read.GetSpacing() == pytest.approx((0.8, 0.8, 3.0)) and read.GetOrigin() == pytest.approx(
        (10, 20, 30)
    )


def test_large_node_is_classified_from_its_central_crop(classifier):
    hu = np.full((24, 96, 96), -100, np.int16)
    hu[:, :, :4] = -1000  # air beside the body
    labels = np.zeros((24, 96, 96), np.uint16)
    labels[6:18, 10:86, 20:60] = 1  # 61 x 32 x 36 mm: wider than the 51.2 mm patch
    with pytest.warns(UserWarning, match="larger than the 16 x 64 x 64 patch"):
        (row,) = classifier.predict_study(to_image(hu, (0.8, 0.8, 3.0)), to_image(labels, (0.8, 0.8, 3.0)))
    assert row["status"] == "classified" and row["larger_than_patch"] and row["probability"] is not None


def test_artifacts_are_checked_before_use(small, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    manifest = read_manifest(small)
    for name in ("model.fp32.onnx", "model.int8.onnx"):
        (folder / name).write_bytes((small / name).read_bytes())
    manifest["artifacts"]["model.int8.onnx"]["parity"] = {"passed": False, "failures": ["3 label flips"]}
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="did not pass its int8 parity check"):
        NodeClassifier.from_artifacts(folder, "int8")
    with NodeClassifier.from_artifacts(folder, "int8", allow_parity_fail=True) as clf:
        assert clf.info["precision"] == "int8" and clf.info["backend"] == "ort:cpu"
    with open(folder / "model.fp32.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 8)
    with pytest.raises(ArtifactError, match="corrupted or was replaced"):
        NodeClassifier.from_artifacts(folder, "fp32")
    # a folder named as the file: before, the manifest of the folder above it was 'not found'
    with pytest.raises(ArtifactError, match=r"copy is a folder: name one of its model files \(here: model"):
        NodeClassifier.from_artifacts(None, "fp32", f"ort:cpu:{folder}")


@pytest.mark.skipif(
    tensorrt_missing_reason() is None, reason="TensorRT runs here: the export would have a plan"
)
def test_a_plan_asked_for_where_tensorrt_cannot_run_names_why(small):
    """Before: 'model.fp32.plan not found: run m2a-export', which skips plans here for the same reason."""
    with pytest.raises(
        ArtifactError, match=r"model\.fp32\.plan not found, and no plan can be built or run here: "
    ):
        NodeClassifier.from_artifacts(small, "fp32", "trt")


def test_the_api_refuses_the_thresholds_and_batches_the_cli_refuses(small):
    """Before, from_artifacts took threshold=5 (every node benign) and NaN, and ran max_batch=0 as 8."""
    for options in ({"threshold": 5.0}, {"threshold": float("nan")}, {"threshold": 0}, {"max_batch": 0}):
        name = next(iter(options))
        with pytest.raises(ValueError, match=f"^{name} must be a"):
            NodeClassifier.from_artifacts(small, "fp32", **options)
    with pytest.raises(ValueError, match=r"^threshold must be a number between 0 and 1"):
        NodeClassifier.from_weights("m2anet_small", threshold=1.0)
    with NodeClassifier.from_artifacts(small, "fp32", threshold=np.float32(0.25), max_batch=1) as clf:
        assert clf.threshold == 0.25 and clf.max_batch == 1


def test_best_available_backend_is_picked_and_reported(small):
    with NodeClassifier.from_artifacts(small, "fp16") as clf:
        info = clf.info
    # CI has no GPU: ONNX Runtime on the CPU; with TensorRT and a GPU, the plan would win
    artifact = {"trt": "model.fp16.plan"}.get(info["backend"], "model.fp16.onnx")
    assert info["backend"] in ("ort:cpu", "ort:cuda", "trt") and info["precision"] == "fp16"
    assert info["sha256"] == read_manifest(small)["artifacts"][artifact]["sha256"]
    assert info["artifact"].endswith(artifact)


def test_without_an_onnx_of_that_precision_the_weights_run_on_pytorch(small, tmp_path, capsys):
    manifest = read_manifest(small)
    write_manifest(tmp_path, manifest)  # the manifest alone: it names the weights and their hash
    with (
        pytest.warns(UserWarning, match="has no model.fp16.onnx"),
        NodeClassifier.from_artifacts(tmp_path, "fp16") as clf,
    ):
        assert clf.info["backend"] == "torch" and clf.info["sha256"] == manifest["model"]["weights_sha256"]
    # m2a-predict says so in one line, as it gives the report's warnings (it printed Python's two)
    ct, nodes = _small_study(tmp_path / "study")
    code, err = _run(capsys, tmp_path, ct, nodes, tmp_path / "out")
    assert code == 0 and [line for line in err if "warning" in line or "UserWarning" in line] == [
        f"m2a-predict: warning: {tmp_path} has no model.fp32.onnx: running the exported weights on torch:cpu "
        "(export fp32 for speed)"
    ], err


# ---------------------------------------------------------------- bounded memory, batches


LABEL_VALUES_SCRIPT = """
import json, resource, sys
limit = 3 << 30  # the process stays near 0.4 GB; one box per label value up to 2e8 needed ~11 GB
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
import numpy as np
import SimpleITK as sitk
from m2anet import NodeClassifier
from m2anet.preprocess import to_image

hu = np.random.default_rng(0).normal(-100, 20, (24, 96, 96)).astype(np.int16)
hu[:, :, 84:] = -850  # a strip of lung: a CT without air is refused
hu[10:13, 30:38, 30:38] = 40
hu[10:13, 60:68, 60:68] = 45
result = {}
with NodeClassifier.from_weights("m2anet_small", max_batch=1) as clf:
    for second in (2, 200_000_000):
        labels = np.zeros((24, 96, 96), np.uint32)
        labels[10:13, 30:38, 30:38] = 1
        labels[10:13, 60:68, 60:68] = second
        report = clf.classify(to_image(hu, (0.8, 0.8, 3.0)), to_image(labels, (0.8, 0.8, 3.0)), masks=True)
        masks = sitk.GetArrayViewFromImage(report.masks)
        result[second] = {
            "labels": [r["label"] for r in report.nodes],
            "probability": [r["probability"] for r in report.nodes],
            "mask_values": sorted(int(v) for v in np.unique(masks)),
            "mask_voxels": [int((masks == v).sum()) for v in (1, second)],
        }
print(json.dumps(result))
"""


def test_a_huge_label_value_costs_no_memory_and_changes_no_result():
    """Labels {1, 200000000} classify exactly as {1, 2}; before, scipy's find_objects allocated a box per
    label value (11 GB), which the 3 GB data limit of this subprocess turns into a MemoryError."""
    done = subprocess.run([sys.executable, "-c", LABEL_VALUES_SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    small_labels, huge_labels = json.loads(done.stdout.strip().splitlines()[-1]).values()
    assert small_labels["labels"] == [1, 2] and huge_labels["labels"] == [1, 200_000_000]
    assert huge_labels["probability"] == small_labels["probability"]
    assert huge_labels["mask_values"] == [0, 1, 200_000_000] and small_labels["mask_values"] == [0, 1, 2]
    assert huge_labels["mask_voxels"] == small_labels["mask_voxels"]


def test_classify_in_batches_of_two_equals_one_batch(small, study):
    ct, labels, _ = study
    reports = {}
    for max_batch in (2, 64):
        with NodeClassifier.from_artifacts(small, "fp32", "ort:cpu", max_batch=max_batch) as clf:
            assert clf.max_batch == max_batch
            reports[max_batch] = clf.classify(ct, labels, masks=True)
    two, one = reports[2], reports[64]
    assert len(two.nodes) == 3  # so batches of 2 are 2 + 1
    assert [r["probability"] for r in two.nodes] == pytest.approx(
        [r["probability"] for r in one.nodes], abs=1e-7
    )
    assert [{k: v for k, v in r.items() if k != "probability"} for r in two.nodes] == [
        {k: v for k, v in r.items() if k != "probability"} for r in one.nodes
    ]
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(two.masks), sitk.GetArrayViewFromImage(one.masks)
    )
    assert two.warnings == one.warnings


def test_default_batch_is_bounded_and_bad_batches_are_refused(small):
    with NodeClassifier.from_artifacts(small, "fp32", "ort:cpu") as clf:
        assert clf.max_batch == CPU_BATCH
        with pytest.raises(ValueError, match="max_batch must be a positive integer"):
            NodeClassifier(clf.backend, 0.5, model="m2anet_small", max_batch=0)


def test_unknown_precision_is_refused(small):
    for backend in (None, "ort:cpu", "torch:cpu"):
        with pytest.raises(ValueError, match="precision 'int4': choose one of fp32, fp16, int8"):
            NodeClassifier.from_artifacts(small, "int4", backend)


def test_the_torch_backend_takes_the_options_of_its_spec(small):
    """Before, the classifier rebuilt the spec without its options: a typo and a real option were both
    dropped without a word."""
    with NodeClassifier.from_artifacts(small, "fp32", "torch:cpu@pad_single=false") as clf:
        assert clf.backend.pad_single is False
    with pytest.raises(ValueError, match="has no option 'chanels_last': torch takes model_name, "):
        NodeClassifier.from_artifacts(small, "fp32", "torch:cpu@chanels_last=false")
    with pytest.raises(ValueError, match=r"backend option 'weights': the manifest of .* sets it; drop it"):
        NodeClassifier.from_artifacts(small, "fp32", "torch:cpu@weights=other.safetensors")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_torch_cuda_without_cuda_is_one_line(small, tmp_path, capsys):
    ct, nodes = _small_study(tmp_path / "study")
    code = predict.main(
        [str(ct), str(nodes), "--artifacts", str(small), "--backend", "torch:cuda", "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("m2a-predict: error: cuda cannot run here"), err
    assert "torch:cpu" in err[0]


# ---------------------------------------------------------------- outputs as one set


def _outputs(folder):
    return {name: (folder / name).read_bytes() for name in ("masks.nii.gz", "nodes.json", "nodes.csv")}


def test_outputs_change_as_one_set(classifier, study, tmp_path, monkeypatch):
    """A failure between two writes leaves the old set; one between two renames leaves a journal that
    the next run (or a reader, with finish_commit) completes into the new set: never a mix."""
    ct, labels, _ = study
    report = classifier.classify(ct, labels, masks=True)
    out = tmp_path / "out"
    write_outputs(out, report, classifier.info, {"ct": "old"}, {"total_s": 1.0})
    old = _outputs(out)
    mask_array = sitk.GetArrayFromImage(report.masks)
    new_masks = sitk.GetImageFromArray(np.where(mask_array > 0, 0, 1).astype(np.uint32))
    new_masks.CopyInformation(report.masks)
    flipped = [{**r, "probability": 1 - r["probability"]} for r in report.nodes]
    new_report = StudyReport(nodes=flipped, warnings=[], timings_s={}, masks=new_masks)
    new_args = (out, new_report, classifier.info, {"ct": "new"}, {"total_s": 2.0})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(node_report.csv, "writer", disk_full)  # nodes.csv is the last file written
        with pytest.raises(OSError, match="No space"):
            write_outputs(*new_args)
    assert _outputs(out) == old
    assert sorted(p.name for p in out.iterdir()) == ["masks.nii.gz", "nodes.csv", "nodes.json"]

    renames = []
    real_replace = os.replace

    def killed_after_one_rename(src, dst):
        if len(renames) == 2:  # the journal, then masks.nii.gz: killed before nodes.json
            raise KeyboardInterrupt
        renames.append(Path(dst).name)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed_after_one_rename)
        with pytest.raises(KeyboardInterrupt):
            write_outputs(*new_args)
    assert renames == [COMMIT_JOURNAL, "masks.nii.gz"]
    assert (out / COMMIT_JOURNAL).is_file()  # the marker that says: this set is being replaced
    finish_commit(out)
    new = _outputs(out)
    assert all(new[name] != old[name] for name in new)
    assert json.loads(new["nodes.json"])["inputs"] == {"ct": "new"}
    assert sorted(p.name for p in out.iterdir()) == ["masks.nii.gz", "nodes.csv", "nodes.json"]
    write_outputs(*new_args)  # and a rerun after the kill works, leaving the same set
    assert _outputs(out).keys() == new.keys() and json.loads(_outputs(out)["nodes.json"])["outputs"] == [
        "masks.nii.gz",
        "nodes.json",
        "nodes.csv",
    ]
