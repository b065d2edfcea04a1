"""`m2a-predict`: a CT study and its node label map -> nodes.csv and nodes.json, one row per node.

Each row: label, centroid (mm, in the DICOM/ITK LPS patient frame, hence the column names) and
nearest voxel index, volume, short-axis diameter, metastasis probability and predicted label, or
why the node was skipped; the JSON adds the backend, the artifact's sha256, the threshold and
timings. Outputs are written atomically and only once the whole study is done, so a nodes.csv on
disk is always a complete report.
Exit 0 when the study was reported (skipped nodes are listed as such), 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from tqdm import tqdm

from m2anet import __version__
from m2anet.classifier import COLUMNS, KINDS_HELP, NodeClassifier, StudyReport
from m2anet.export.manifest import MANIFEST
from m2anet.io import atomic_path, write_json
from m2anet.preprocess import read_image

DEFAULT_ARTIFACTS = Path("artifacts/m2anet_base")
DEMO_ARTIFACTS = Path("artifacts/m2anet_small")
PROVENANCE = ("backend", "precision", "artifact_sha256")
"""Study-wide columns repeated on every CSV row, so the table keeps its provenance on its own."""


def _note(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"m2a-predict: {text}", file=sys.stderr)


def open_classifier(args: argparse.Namespace) -> NodeClassifier:
    """`--backend`/`--artifacts` as given; the demo falls back to the shipped weights on PyTorch."""
    default = DEMO_ARTIFACTS if args.demo else DEFAULT_ARTIFACTS
    if args.demo and args.artifacts is None and args.backend is None and not (default / MANIFEST).is_file():
        _note(
            f"no artifacts in {default}: running the shipped m2anet_small weights on PyTorch "
            "(m2a-export --model m2anet_small gives ONNX and TensorRT artifacts)",
            args.quiet,
        )
        return NodeClassifier.from_weights("m2anet_small", threshold=args.threshold)
    triton = args.backend is not None and args.backend.startswith("triton:")
    return NodeClassifier.from_artifacts(
        args.artifacts if args.artifacts is not None or triton else default,
        args.precision,
        args.backend,
        allow_parity_fail=args.allow_parity_fail,
        threshold=args.threshold,
    )


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
    """masks.nii.gz (if any), nodes.json, then nodes.csv: each atomic, none before all are ready."""
    written = []
    if report.masks is not None:
        with atomic_path(out / "masks.nii.gz") as tmp:
            sitk.WriteImage(report.masks, str(tmp), useCompression=True, imageIO="NiftiImageIO")
        written.append(out / "masks.nii.gz")
    write_json(
        out / "nodes.json",
        {
            "m2anet": __version__,
            "inputs": inputs,
            "classifier": info,
            "timings_s": {k: round(v, 4) for k, v in timings.items()},
            "warnings": report.warnings,
            "nodes": report.nodes,
        },
    )
    written.append(out / "nodes.json")
    provenance = {
        "backend": info["backend"],
        "precision": info["precision"],
        "artifact_sha256": info["sha256"],
    }
    with atomic_path(out / "nodes.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*COLUMNS, *PROVENANCE])
        for row in report.nodes:
            writer.writerow([_cell(row[c]) for c in COLUMNS] + [_cell(provenance[c]) for c in PROVENANCE])
    written.append(out / "nodes.csv")
    return written


def _table(report: StudyReport) -> str:
    lines = [f"{'label':>5}  {'short axis':>10}  {'volume':>12}  {'probability':>11}  prediction"]
    for row in report.nodes:
        prob = "-" if row["probability"] is None else f"{row['probability']:.3f}"
        lines.append(
            f"{row['label']:>5}  {row['short_axis_mm']:>7.1f} mm  {row['volume_mm3']:>8.0f} mm3  {prob:>11}  "
            f"{row['prediction'] or 'skipped: ' + row['note']}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2a-predict", description=__doc__.splitlines()[0])
    ap.add_argument("ct", nargs="?", help="CT: .nii/.nii.gz, .nrrd, .mha/.mhd or a DICOM series folder")
    ap.add_argument("nodes", nargs="?", help="node label map (0 = background, one integer per node)")
    ap.add_argument("--backend", help=f"default: the best available here; one of {KINDS_HELP}")
    ap.add_argument(
        "--artifacts",
        type=Path,
        help=f"m2a-export folder (default {DEFAULT_ARTIFACTS}; demo: {DEMO_ARTIFACTS})",
    )
    ap.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--out", type=Path, help="output folder (default: the current one; demo: m2a-demo)")
    ap.add_argument("--threshold", type=float, help="decision threshold (default: the manifest's)")
    ap.add_argument("--save-masks", action="store_true", help="write predicted node masks as masks.nii.gz")
    ap.add_argument("--demo", action="store_true", help="make a synthetic study and run on it")
    ap.add_argument("--allow-parity-fail", action="store_true", help="use an artifact that failed parity")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, notes or table")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.demo and (args.ct or args.nodes):
        ap.error("--demo makes its own study: drop CT and NODES")
    if not args.demo and not (args.ct and args.nodes):
        ap.error("give CT and NODES (or --demo)")
    out = args.out or Path("m2a-demo" if args.demo else ".")
    start = time.perf_counter()
    try:
        if args.demo:
            from m2anet.data import write_study

            paths = write_study(out / "demo-study", seed=0, n_nodes=6)
            args.ct, args.nodes = paths["ct"], paths["nodes"]
            _note(
                f"demo study in {out / 'demo-study'} (truth.json: the generator's ground truth)", args.quiet
            )
        t0 = time.perf_counter()
        ct = read_image(args.ct, "CT")  # bad files fail before the model loads
        labels = read_image(args.nodes, "node label map")
        read_s = time.perf_counter() - t0
        with open_classifier(args) as classifier:
            with tqdm(
                desc="preprocess", unit="node", file=sys.stderr, leave=False, disable=args.quiet or None
            ) as bar:

                def progress(stage: str, done: int, total: int) -> None:
                    bar.total = total
                    bar.set_description(stage, refresh=False)
                    bar.update(done - bar.n)

                report = classifier.classify(ct, labels, masks=args.save_masks, progress=progress)
            info = classifier.info
        inputs = {"ct": str(args.ct), "nodes": str(args.nodes)}
        timings = {"read_s": read_s, **report.timings_s}
        timings["total_s"] = time.perf_counter() - start
        written = write_outputs(out, report, info, inputs, timings)
    except (ValueError, RuntimeError, OSError) as e:  # StudyError, ArtifactError, InputError are ValueErrors
        print(f"m2a-predict: error: {e}", file=sys.stderr)
        return 2
    for message in report.warnings:
        print(f"m2a-predict: warning: {message}", file=sys.stderr)
    if not args.quiet:
        print(_table(report))
        print(
            f"{info['backend']} {info['precision']} on {info['device']}; wrote {', '.join(map(str, written))}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
