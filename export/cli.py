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
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from tqdm import tqdm

from m2anet.data import load_split
from m2anet.engines.base import Backend
from m2anet.engines.ort_backend import OrtBackend
from m2anet.engines.torch_backend import TorchBackend
from m2anet.export.fp16 import convert_fp16
from m2anet.export.int8 import CALIB_METHODS, Calibration, quantize_int8
from m2anet.export.manifest import ArtifactError, read_manifest, write_manifest
from m2anet.export.onnx_export import FP32_TOLERANCE, ExportError, export_fp32, io_signature, max_abs_diff
from m2anet.io import sha256_file
from m2anet.model import config_dict, create_model, list_models
from m2anet.parity import TIERS, compare, run_cohort
from m2anet.weights import WeightsError, shipped_weights, training_record

PRECISIONS = ("fp32", "fp16", "int8")


class Exporter:
    """Builds one artifact folder; keeps the state the stages share (model, manifest, reference)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = create_model(
            args.model, pretrained=args.weights is None, heads=args.heads, weights=args.weights
        )
        self.weights = Path(args.weights) if args.weights else shipped_weights(args.model)
        self.weights_sha = sha256_file(self.weights)
        self.threshold = self._threshold()
        self.folder = args.out / (args.model + ("-cls" if args.heads == "cls" else ""))
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self.previous = read_manifest(self.folder).get("artifacts", {})
        except ArtifactError:
            self.previous = {}
        self.artifacts: dict[str, dict] = {}
        self.stages: list[dict] = []
        self._reference: list[np.ndarray] | None = None
        self.parity_set = load_split("test", n=args.parity_nodes)

    def _threshold(self) -> float:
        if self.args.threshold is not None:
            return self.args.threshold
        if self.args.weights is None:
            return float(training_record(self.args.model)["threshold"])
        return 0.5

    def log(self, stage: str, text: str, seconds: float) -> None:
        self.stages.append({"stage": stage, "result": text, "seconds": round(seconds, 2)})
        if not self.args.quiet and not self.args.json:
            print(f"[{stage:>10}] {text} ({seconds:.1f} s)", file=sys.stderr, flush=True)

    def reusable(self, name: str, recipe: dict) -> dict | None:
        old, path = self.previous.get(name), self.folder / name
        same = old is not None and old.get("recipe") == json.loads(json.dumps(recipe))  # tuples -> lists
        if self.args.force or not same or not path.is_file():
            return None
        return old if sha256_file(path) == old["sha256"] else None  # type: ignore[index]

    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            ref = TorchBackend(self.args.model, heads=self.args.heads, weights=str(self.weights))
            self._reference = run_cohort(ref, self.parity_set, desc="reference torch:cpu")
        return self._reference

    def parity(self, backend: Backend, precision: str) -> dict:
        candidate = run_cohort(backend, self.parity_set, desc=backend.name)
        report = compare(self.reference(), candidate, self.parity_set, self.threshold, TIERS[precision])
        report["split"] = "test"
        report["cohort_sha256"] = self.parity_set.sha256()
        return report

    def record(self, name: str, precision: str, recipe: dict, extra: dict) -> dict:
        path = self.folder / name
        entry = {
            "sha256": sha256_file(path),
            "size": path.stat().st_size,
            "precision": precision,
            "format": "onnx" if name.endswith(".onnx") else "tensorrt",
            **(io_signature(path) if name.endswith(".onnx") else {}),
            "recipe": recipe,
            **extra,
        }
        self.artifacts[name] = entry
        self.write_manifest()  # runtimes verify every artifact against the manifest, parity runs included
        return entry

    def onnx_artifact(self, precision: str) -> dict:
        name = f"model.{precision}.onnx"
        path = self.folder / name
        recipe: dict[str, Any] = {"weights_sha256": self.weights_sha, "heads": self.args.heads}
        if precision != "fp32":
            recipe["source_sha256"] = self.artifacts["model.fp32.onnx"]["sha256"]
        if precision == "int8":
            recipe["calibration"] = vars(self.calibration())
        old = self.reusable(name, recipe)
        if old is not None:
            self.artifacts[name] = old
            self.log(precision, f"{name} reused (hash and recipe match the manifest)", 0.0)
            return old
        t0 = time.perf_counter()
        extra: dict[str, Any] = {}
        if precision == "fp32":
            export_fp32(self.model, path, max_batch=max(1024, self.args.batch[2]))
            diff = max_abs_diff(self.model, path)
            bad = [k for k, v in diff.items() if v > FP32_TOLERANCE[k]]
            if bad:
                path.unlink()
                raise ExportError(
                    f"exported {bad[0]} differs from PyTorch by {diff[bad[0]]:.2e} "
                    f"(> {FP32_TOLERANCE[bad[0]]:g}): report this with the model config"
                )
            extra["torch_max_abs_diff"] = diff
        elif precision == "fp16":
            convert_fp16(self.folder / "model.fp32.onnx", path, self.args.fp16_keep)
        else:
            bar = tqdm(
                total=self.args.calib_size, desc="calibrate", unit="node", file=sys.stderr, leave=False
            )
            extra["calibration"] = quantize_int8(
                self.folder / "model.fp32.onnx", path, self.calibration(), bar.update
            )
            bar.close()
        if precision != "fp32":
            extra["source"] = "model.fp32.onnx"
        self.log(precision, f"{name} written and checked", time.perf_counter() - t0)
        self.record(name, precision, recipe, extra)
        t0 = time.perf_counter()
        with OrtBackend(path, threads=self.args.threads) as backend:
            report = self.parity(backend, precision)
        self.artifacts[name]["parity"] = report
        verdict = "passes" if report["passed"] else "FAILS (" + "; ".join(report["failures"]) + ")"
        self.log(
            precision,
            f"parity on ort:cpu, {report['nodes']} test nodes: {report['label_flips']} label flips, "
            f"max prob error {report['prob_max_abs']:.1e}; {precision} tier {verdict}",
            time.perf_counter() - t0,
        )
        return self.artifacts[name]

    def calibration(self) -> Calibration:
        a = self.args
        return Calibration(
            method=a.calib_method, size=a.calib_size, target=a.int8_target, exclude=tuple(a.int8_exclude)
        )

    def engine(self, precision: str) -> None:
        from m2anet.export.tensorrt_build import build_engine, tensorrt_unavailable

        reason = tensorrt_unavailable()
        if reason:
            self.log(precision, f"engine step skipped: {reason}", 0.0)
            return
        source = f"model.{precision}.onnx"
        name = f"model.{precision}.plan"
        a = self.args
        recipe = {
            "source_sha256": self.artifacts[source]["sha256"],
            "batch": list(a.batch),
            "opt_level": a.opt_level,
            "version_compatible": a.version_compatible,
            "hardware_compatible": a.hardware_compatible,
        }
        old = self.reusable(name, recipe)
        if old is not None:
            self.artifacts[name] = old
            self.log(precision, f"{name} reused", 0.0)
            return
        t0 = time.perf_counter()
        info = build_engine(
            self.folder / source,
            self.folder / name,
            batch=tuple(a.batch),
            timing_cache=self.folder / "timing.cache",
            opt_level=a.opt_level,
            version_compatible=a.version_compatible,
            hardware_compatible=a.hardware_compatible,
            progress=not (a.quiet or a.json),
        )
        self.record(
            name,
            precision,
            recipe,
            {"source": source, "tensorrt": info, **io_signature(self.folder / source)},
        )
        self.log(precision, f"{name} built", time.perf_counter() - t0)
        from m2anet.engines.trt_backend import TensorRTBackend

        with TensorRTBackend(self.folder / name) as backend:
            self.artifacts[name]["parity"] = self.parity(backend, precision)

    def write_manifest(self) -> Path:
        a = self.args
        return write_manifest(
            self.folder,
            {
                "model": {
                    **config_dict(a.model),
                    "heads": a.heads,
                    "weights": str(self.weights),
                    "weights_sha256": self.weights_sha,
                    "threshold": self.threshold,
                },
                "batch_profile": dict(zip(("min", "opt", "max"), a.batch, strict=True)),
                "preprocessing": {
                    "patch_shape_zyx": [16, 64, 64],
                    "spacing_mm_zyx": [3.0, 0.8, 0.8],
                    "hu_window": [-175.0, 275.0],
                    "scale": "(clip(HU) + 175) / 450",
                },
                "tools": {
                    "torch": torch.__version__,
                    "onnx": onnx.__version__,
                    "onnxruntime": onnxruntime.__version__,
                },
                "command": shlex.join(["m2a-export", *a.argv]),
                "artifacts": self.artifacts,
                "stages": self.stages,
            },
        )


def _batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: give MIN,OPT,MAX such as 1,32,128") from None
    if not 1 <= lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
    return lo, opt, hi


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2a-export", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="m2anet_base", choices=list_models())
    ap.add_argument("--weights", help="a .safetensors or .pt state dict (default: the shipped weights)")
    ap.add_argument("--heads", default="both", choices=["both", "cls"])
    ap.add_argument(
        "--precision",
        default="fp16",
        choices=[*PRECISIONS, "all", "best"],
        help="best: export all, then m2a-bench --select records the fastest that passes parity",
    )
    ap.add_argument("--out", type=Path, default=Path("artifacts"))
    ap.add_argument("--batch", type=_batch, default=(1, 32, 128), help="TensorRT profile MIN,OPT,MAX")
    ap.add_argument("--force", action="store_true", help="rebuild even what the manifest says is valid")
    ap.add_argument("--threshold", type=float, help="decision threshold (default: the weights' record)")
    ap.add_argument("--parity-nodes", type=int, default=192, help="test-split nodes for the parity check")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    g = ap.add_argument_group("int8")
    g.add_argument("--calib-method", default="max", choices=list(CALIB_METHODS))
    g.add_argument("--calib-size", type=int, default=128, help="calibration nodes from the calib split")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    args.argv = argv
    if args.calib_size < args.batch[0] or args.parity_nodes < 1:
        parser().error("--calib-size and --parity-nodes must be positive")
    if args.precision == "best" and args.heads != "both":
        parser().error("--precision best benchmarks the two-head artifacts: drop --heads cls")
    precisions = PRECISIONS if args.precision in ("all", "best") else ("fp32", args.precision)
    try:
        exporter = Exporter(args)
        failed = []
        for precision in dict.fromkeys(precisions):
            entry = exporter.onnx_artifact(precision)
            if not entry["parity"]["passed"]:
                failed.append(precision)
                continue
            exporter.engine(precision)
        manifest = exporter.write_manifest()
    except (ExportError, ArtifactError, WeightsError, ValueError, RuntimeError) as e:
        print(f"m2a-export: error: {e}", file=sys.stderr)
        return 2
    hard = [p for p in failed if p != "int8" or not args.allow_parity_fail]
    if args.json:
        print(
            json.dumps(
                {"manifest": str(manifest), "stages": exporter.stages, "parity_failed": failed}, indent=2
            )
        )
    elif not args.quiet:
        print(f"manifest: {manifest}")
    if hard:
        print(
            f"m2a-export: error: {', '.join(hard)} failed its parity tier; for int8 try --calib-method, "
            "--calib-size, --int8-exclude (see m2a-verify --diagnose) or pass --allow-parity-fail",
            file=sys.stderr,
        )
        return 1
    if args.precision == "best":
        from m2anet.bench.cli import main as bench

        threads = ["--threads", str(args.threads)] if args.threads else []
        return bench(
            [
                "--model",
                args.model,
                "--artifacts",
                str(args.out),
                "--select",
                "--scenario",
                "single",
                *threads,
            ]
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
