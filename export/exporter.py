"""Reference model -> verified FP32/FP16/INT8 ONNX graphs -> TensorRT engines, in one artifact folder.

Precision is decided in the ONNX graph and verified on ONNX Runtime before TensorRT sees it;
TensorRT then builds exactly the types it is given (strongly typed networks, as TensorRT 11
requires). Artifacts whose recipe and hash still match the manifest are reused. `m2a-export` is
the command line over `export_artifacts`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from m2anet.data import load_split
from m2anet.engines.base import Backend, run_cohort
from m2anet.engines.environment import library_versions, tensorrt_missing_reason
from m2anet.engines.ort_backend import OrtBackend
from m2anet.engines.torch_backend import TorchBackend
from m2anet.engines.trt_backend import TensorRTBackend
from m2anet.export.fp16 import convert_fp16
from m2anet.export.int8 import Calibration, quantize_int8
from m2anet.export.onnx_export import ExportError, export_fp32, io_signature, max_abs_diff
from m2anet.export.tensorrt_build import build_engine
from m2anet.io import sha256_file
from m2anet.manifest import PRECISIONS, ArtifactError, artifact_name, read_manifest, write_manifest
from m2anet.model import config_dict, create_model, get_config
from m2anet.parity import FP32_LOGIT_TOLERANCE, TIERS, compare
from m2anet.weights import shipped_weights, training_record


@dataclass
class ExportOptions:
    """What `m2a-export` takes; every field has the command line's default."""

    model: str = "m2anet_base"
    weights: Path | None = None
    heads: str = "both"
    out: Path = Path("artifacts")
    batch: tuple[int, int, int] = (1, 32, 128)
    force: bool = False
    threshold: float | None = None
    parity_nodes: int = 192
    threads: int | None = None
    calib_method: str = "max"
    calib_size: int = 128
    int8_target: str = "tensorrt"
    int8_exclude: list[str] = field(default_factory=list)
    allow_parity_fail: bool = False
    fp16_keep: list[str] = field(default_factory=list)
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatible: bool = False
    quiet: bool = False
    command: str = "m2a-export"
    """Recorded in the manifest: the exact command that built the folder."""


@dataclass
class ExportResult:
    folder: Path
    manifest: Path
    stages: list[dict]
    parity_failed: list[str]
    """Precisions whose artifact failed its parity tier (no engine was built from them)."""


def export_artifacts(options: ExportOptions, precisions: tuple[str, ...] = PRECISIONS) -> ExportResult:
    """Build (or reuse) the ONNX graph and, where TensorRT runs, the engine of each precision.

    FP32 is always built first: the others are derived from it. An artifact that fails its
    parity tier is recorded with the failure and gets no engine."""
    exporter = Exporter(options)
    failed = []
    for precision in dict.fromkeys(("fp32", *precisions)):
        entry = exporter.onnx_artifact(precision)
        if not entry["parity"]["passed"]:
            failed.append(precision)
            continue
        exporter.engine(precision)
    manifest = exporter.write_manifest()
    return ExportResult(exporter.folder, manifest, exporter.stages, failed)


class Exporter:
    """Builds one artifact folder; keeps the state the stages share (model, manifest, reference)."""

    def __init__(self, args: ExportOptions) -> None:
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
        if not self.args.quiet:
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
        name = artifact_name(precision, "onnx")
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
            bad = [k for k, v in diff.items() if v > FP32_LOGIT_TOLERANCE[k]]
            if bad:
                path.unlink()
                raise ExportError(
                    f"exported {bad[0]} differs from PyTorch by {diff[bad[0]]:.2e} "
                    f"(> {FP32_LOGIT_TOLERANCE[bad[0]]:g}): report this with the model config"
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
        reason = tensorrt_missing_reason()
        if reason:
            self.log(precision, f"engine step skipped: {reason}", 0.0)
            return
        source = artifact_name(precision, "onnx")
        name = artifact_name(precision, "plan")
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
            progress=not a.quiet,
        )
        self.record(
            name,
            precision,
            recipe,
            {"source": source, "tensorrt": info, **io_signature(self.folder / source)},
        )
        self.log(precision, f"{name} built", time.perf_counter() - t0)
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
                "preprocessing": get_config(a.model).inputs.as_dict(),
                "tools": library_versions(("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")),
                "command": a.command,
                "artifacts": self.artifacts,
                "stages": self.stages,
            },
        )
