"""`m2a-export`: reference model -> verified FP32/FP16/INT8 ONNX graphs -> TensorRT engines.

Precision is decided in the ONNX graph and verified on ONNX Runtime before TensorRT sees it;
TensorRT then builds exactly the types it is given (strongly typed networks, as TensorRT 11
requires). Artifacts whose recipe and hash still match the manifest are reused.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import fields
from pathlib import Path

from m2anet.best import benchmark_and_select
from m2anet.cli.args import int_at_least, interruptible, make_parser, output_dir, positive_int, probability
from m2anet.cli.bench import print_run, print_selection
from m2anet.export.exporter import ExportOptions, export_artifacts
from m2anet.export.int8 import CALIB_METHODS, CALIB_SEARCH, DEFAULT_CALIB_SIZE
from m2anet.export.onnx_export import ExportError
from m2anet.manifest import PRECISIONS, ArtifactError
from m2anet.model import list_models
from m2anet.weights import WeightsError


def _batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN,OPT,MAX such as 1,32,128") from None
    if not 1 <= lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def parser() -> argparse.ArgumentParser:
    ap = make_parser("m2a-export", __doc__)
    ap.add_argument("--model", default="m2anet_base", choices=list_models())
    ap.add_argument("--weights", help="a .safetensors or .pt state dict (default: the shipped weights)")
    ap.add_argument("--heads", default="both", choices=["both", "cls"])
    ap.add_argument(
        "--precision",
        default="fp16",
        choices=[*PRECISIONS, "all", "best"],
        help="best: export all, then m2a-bench --select records the fastest that passes parity",
    )
    ap.add_argument("--out", type=output_dir, default=Path("artifacts"))
    ap.add_argument("--batch", type=_batch, default=(1, 32, 128), help="TensorRT profile MIN,OPT,MAX")
    ap.add_argument("--force", action="store_true", help="rebuild even what the manifest says is valid")
    ap.add_argument("--threshold", type=probability, help="decision threshold (default: the weights' record)")
    ap.add_argument(
        "--parity-nodes", type=int_at_least(2), default=192, help="test-split nodes for the parity check"
    )
    ap.add_argument("--threads", type=positive_int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument(
        "--sign",
        type=Path,
        metavar="KEYFILE",
        help="sign manifest.json with this Ed25519 private key (PEM); readers check it against "
        "the public key in M2ANET_TRUSTED_KEY",
    )
    g = ap.add_argument_group("int8")
    search = ", ".join(f"{m}/{n}" for m, n in CALIB_SEARCH)
    g.add_argument(
        "--calib-method",
        default="auto",
        choices=["auto", *CALIB_METHODS],
        help=f"auto: try {search} (method/nodes) until the int8 tier and the stress inputs pass",
    )
    g.add_argument(
        "--calib-size",
        type=positive_int,
        default=None,
        help=f"calibration nodes from the calib split (default: {DEFAULT_CALIB_SIZE} for a named method; "
        "with auto, each method at this size)",
    )
    g.add_argument("--int8-target", default="tensorrt", choices=["tensorrt", "cpu"])
    g.add_argument(
        "--int8-exclude", nargs="*", default=[], metavar="NODE", help="ONNX node names kept in FP32"
    )
    g.add_argument("--allow-parity-fail", action="store_true", help="keep an INT8 graph that fails its tier")
    g = ap.add_argument_group("fp16")
    g.add_argument("--fp16-keep", nargs="*", default=[], metavar="NODE", help="ONNX node names kept in FP32")
    g = ap.add_argument_group("tensorrt")
    g.add_argument("--opt-level", type=int, default=3, choices=range(6), help="builder_optimization_level")
    g.add_argument("--version-compatible", action="store_true")
    g.add_argument("--hardware-compatible", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    return ap


@interruptible("m2a-export")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.precision == "best" and args.heads != "both":
        parser().error("--precision best benchmarks the two-head artifacts: drop --heads cls")
    precisions = PRECISIONS if args.precision in ("all", "best") else (args.precision,)
    options = ExportOptions(
        **{
            f.name: getattr(args, f.name) for f in fields(ExportOptions) if f.name not in ("quiet", "command")
        },
        quiet=args.quiet or args.json,
        command=shlex.join(["m2a-export", *argv]),
    )
    try:
        result = export_artifacts(options, precisions)
    except (ExportError, ArtifactError, WeightsError, ValueError, RuntimeError, OSError) as e:
        print(f"m2a-export: error: {e}", file=sys.stderr)
        return 2
    failed = result.parity_failed
    hard = [p for p in failed if p != "int8" or not args.allow_parity_fail]
    if args.json:
        print(
            json.dumps(
                {"manifest": str(result.manifest), "stages": result.stages, "parity_failed": failed}, indent=2
            )
        )
    elif not args.quiet:
        print(f"manifest: {result.manifest}")
    if hard:
        print(
            f"m2a-export: error: {', '.join(hard)} failed its parity tier; for int8 (the calibrations "
            "tried are in the manifest) try a larger --calib-size, --int8-exclude (see m2a-verify "
            "--diagnose) or pass --allow-parity-fail",
            file=sys.stderr,
        )
        return 1
    if args.precision == "best":
        run, selection = benchmark_and_select(options, result)
        print_run(run, as_json=False)
        print_selection(selection, result.folder, to_stderr=False)
        return 1 if run.failed else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
