"""The per-node report of a study: one row per node label, and the files `m2a-predict` writes.

Each row: label, centroid (mm, in the DICOM/ITK LPS patient frame, hence the column names) and
nearest voxel index, volume, short-axis diameter, metastasis probability and predicted label, or
why the node was skipped; the JSON adds the backend, the artifact's sha256, the threshold and
timings.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from m2anet import __version__
from m2anet.io import atomic_files
from m2anet.preprocess import Node

COLUMNS = (
    "label",
    "status",
    "centroid_lps_x_mm",
    "centroid_lps_y_mm",
    "centroid_lps_z_mm",
    "voxel_i",
    "voxel_j",
    "voxel_k",
    "volume_mm3",
    "short_axis_mm",
    "larger_than_patch",
    "probability",
    "prediction",
    "note",
)
"""Keys of a per-node result, in report order. Centroids are in the DICOM/ITK patient frame (LPS: x to
the patient's left, y to the back); nibabel and 3D Slicer use RAS, which is (-x, -y, z)."""


PROVENANCE = ("backend", "precision", "artifact_sha256")
"""Study-wide columns repeated on every CSV row, so the table keeps its provenance on its own."""


@dataclass
class StudyReport:
    nodes: list[dict[str, Any]]  # one row per label (COLUMNS), skipped nodes included
    warnings: list[str]
    timings_s: dict[str, float]
    masks: sitk.Image | None  # predicted node masks on the CT grid, when asked for


def node_row(node: Node, probability: float | None, threshold: float) -> dict[str, Any]:
    """The report row of one node; `probability` None for a skipped node."""
    x, y, z = node.centroid_mm
    i, j, k = node.voxel_index
    prediction = None
    if probability is not None:
        prediction = "metastatic" if probability >= threshold else "benign"
    note = node.skipped or ("central crop of a node larger than the patch" if node.larger_than_patch else "")
    return {
        "label": node.label,
        "status": "skipped" if probability is None else "classified",
        "centroid_lps_x_mm": x,
        "centroid_lps_y_mm": y,
        "centroid_lps_z_mm": z,
        "voxel_i": i,
        "voxel_j": j,
        "voxel_k": k,
        "volume_mm3": node.volume_mm3,
        "short_axis_mm": node.short_axis_mm,
        "larger_than_patch": node.larger_than_patch,
        "probability": probability,
        "prediction": prediction,
        "note": note,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_outputs(
    out: Path, report: StudyReport, info: dict[str, Any], inputs: dict[str, str], timings: dict[str, float]
) -> list[Path]:
    """masks.nii.gz (if any), nodes.json and nodes.csv as one set: all are written under temp names, then
    renamed together (`m2anet.io.atomic_files`), so the folder never holds files of two runs."""
    names = (["masks.nii.gz"] if report.masks is not None else []) + ["nodes.json", "nodes.csv"]
    provenance = {
        "backend": info["backend"],
        "precision": info["precision"],
        "artifact_sha256": info["sha256"],
    }
    with atomic_files(out, names) as tmp:
        if report.masks is not None:
            sitk.WriteImage(
                report.masks, str(tmp["masks.nii.gz"]), useCompression=True, imageIO="NiftiImageIO"
            )
        document = {
            "m2anet": __version__,
            "inputs": inputs,
            "classifier": info,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "warnings": report.warnings,
            "outputs": names,
            "nodes": report.nodes,
        }
        tmp["nodes.json"].write_text(json.dumps(document, indent=2) + "\n")
        with open(tmp["nodes.csv"], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*COLUMNS, *PROVENANCE])
            for row in report.nodes:
                writer.writerow([_cell(row[c]) for c in COLUMNS] + [_cell(provenance[c]) for c in PROVENANCE])
    return [out / name for name in names]


def text_table(report: StudyReport) -> str:
    """The per-node table m2a-predict prints."""
    lines = [f"{'label':>5}  {'short axis':>10}  {'volume':>12}  {'probability':>11}  prediction"]
    for row in report.nodes:
        prob = "-" if row["probability"] is None else f"{row['probability']:.3f}"
        lines.append(
            f"{row['label']:>5}  {row['short_axis_mm']:>7.1f} mm  {row['volume_mm3']:>8.0f} mm3  {prob:>11}  "
            f"{row['prediction'] or 'skipped: ' + row['note']}"
        )
    return "\n".join(lines)
