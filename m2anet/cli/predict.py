"""`m2a-predict`: a CT study and its node label map -> nodes.csv and nodes.json, one row per node.

Outputs are written only once the whole study is done, and as one set (nodes.csv, nodes.json and
masks.nii.gz change together: `m2anet.io.atomic_files`), so the files on disk are one run's complete
report. Nodes run `--max-batch` at a time, so memory does not grow with the study. Exit 0 when
the study was reported (skipped nodes are listed as such), 2 on bad input, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from tqdm import tqdm

from m2anet.classifier import BACKEND_HELP, CPU_BATCH, NodeClassifier
from m2anet.cli.args import interruptible, make_parser, output_dir, positive_int, probability
from m2anet.data import write_study
from m2anet.manifest import MANIFEST, PRECISIONS
from m2anet.node_report import text_table, write_outputs
from m2anet.preprocess import read_image

DEFAULT_ARTIFACTS = Path("artifacts/m2anet_base")
DEMO_ARTIFACTS = Path("artifacts/m2anet_small")


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
        return NodeClassifier.from_weights("m2anet_small", threshold=args.threshold, max_batch=args.max_batch)
    triton = args.backend is not None and args.backend.startswith("triton:")
    with warnings.catch_warnings(record=True) as caught:  # one line each, as the report's warnings
        classifier = NodeClassifier.from_artifacts(
            args.artifacts if args.artifacts is not None or triton else default,
            args.precision,
            args.backend,
            allow_parity_fail=args.allow_parity_fail,
            threshold=args.threshold,
            max_batch=args.max_batch,
        )
    for caught_warning in caught:
        print(f"m2a-predict: warning: {caught_warning.message}", file=sys.stderr)
    return classifier


def parser() -> argparse.ArgumentParser:
    ap = make_parser("m2a-predict", __doc__)
    ap.add_argument("ct", nargs="?", help="CT: .nii/.nii.gz, .nrrd, .mha/.mhd or a DICOM series folder")
    ap.add_argument("nodes", nargs="?", help="node label map (0 = background, one integer per node)")
    ap.add_argument("--backend", help=f"default: the best available here; one of {BACKEND_HELP}")
    ap.add_argument(
        "--artifacts",
        type=Path,
        help=f"m2a-export folder (default {DEFAULT_ARTIFACTS}; demo: {DEMO_ARTIFACTS})",
    )
    ap.add_argument("--precision", default="fp16", choices=list(PRECISIONS))
    ap.add_argument("--out", type=output_dir, help="output folder (default: the current one; demo: m2a-demo)")
    ap.add_argument("--threshold", type=probability, help="decision threshold (default: the manifest's)")
    ap.add_argument(
        "--max-batch",
        type=positive_int,
        help=f"nodes per inference call; bounds memory whatever the study's size (default: {CPU_BATCH} "
        "on the CPU, the export's opt batch on a GPU)",
    )
    ap.add_argument("--save-masks", action="store_true", help="write predicted node masks as masks.nii.gz")
    ap.add_argument("--demo", action="store_true", help="make a synthetic study and run on it")
    ap.add_argument("--allow-parity-fail", action="store_true", help="use an artifact that failed parity")
    ap.add_argument("--quiet", action="store_true", help="no progress bar, notes or table")
    return ap


@interruptible("m2a-predict")
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
        print(text_table(report))
        print(
            f"{info['backend']} {info['precision']} on {info['device']}; wrote {', '.join(map(str, written))}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
