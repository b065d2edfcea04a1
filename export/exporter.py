"""Reference model -> verified FP32/FP16/INT8 ONNX graphs -> TensorRT engines, in one artifact folder.

Precision is decided in the ONNX graph and verified on ONNX Runtime before TensorRT sees it, by
the same checks `m2a-verify` makes: the precision's parity tier and the stress inputs;
TensorRT then builds exactly the types it is given (strongly typed networks, as TensorRT 11
requires). Artifacts whose recipe and hash still match the manifest are reused. `m2a-export` is
the command line over `export_artifacts`.

A run killed at any point can be rerun: the manifest is rewritten after every artifact and after
every parity check, an entry is reused only with its parity recorded for this threshold and
parity cohort (an intact file without one gets its check redone), and the temporary files of
the killed run are removed. Entries of precisions this run does not build are kept while their
files and their sources are unchanged, so exporting one precision does not drop the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from m2anet.data import load_split
from m2anet.engines.base import Backend, run_cohort
from m2anet.engines.environment import library_versions, tensorrt_missing_reason
from m2anet.engines.ort_backend import OrtBackend
from m2anet.engines.torch_backend import TorchBackend
from m2anet.engines.trt_backend import TensorRTBackend
from m2anet.export.fp16 import convert_fp16
from m2anet.export.int8 import PLACEMENTS, Calibration, Target, calibration_search, quantize_int8
from m2anet.export.onnx_export import ExportError, check_node_names, export_fp32, io_signature, max_abs_diff
from m2anet.export.tensorrt_build import build_engine
from m2anet.io import sha256_file
from m2anet.manifest import (
    MANIFEST,
    PRECISIONS,
    TRUSTED_KEY_ENV,
    ArtifactError,
    artifact_name,
    key_id,
    read_manifest,
    signing_key,
    trusted_key,
    write_manifest,
)
from m2anet.model import Heads, config_dict, create_model, get_config
from m2anet.parity import FP32_LOGIT_TOLERANCE, TIERS, compare, judge_stress, stress_inputs, stress_outputs
from m2anet.weights import shipped_weights, training_record


@dataclass
class ExportOptions:
    """What `m2a-export` takes; every field has the command line's default."""

    model: str = "m2anet_base"
    weights: Path | None = None
    heads: Heads = "both"
    out: Path = Path("artifacts")
    batch: tuple[int, int, int] = (1, 32, 128)
    force: bool = False
    threshold: float | None = None
    parity_nodes: int = 192
    threads: int | None = None
    calib_method: str = "auto"
    calib_size: int | None = None
    int8_target: Target = "tensorrt"
    int8_exclude: list[str] = field(default_factory=list)
    allow_parity_fail: bool = False
    fp16_keep: list[str] = field(default_factory=list)
    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatible: bool = False
    sign: Path | None = None
    """Ed25519 private key (PEM) that signs the manifest."""
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
    try:
        failed = []
        for precision in dict.fromkeys(("fp32", *precisions)):
            entry = exporter.onnx_artifact(precision)
            if not entry["parity"]["passed"]:
                failed.append(precision)
                continue
            exporter.engine(precision)
        manifest = exporter.finish()
    finally:
        exporter.close()
    return ExportResult(exporter.folder, manifest, exporter.stages, failed)


def _lock(folder: Path) -> int:
    """An exclusive lock on the folder for the whole run: two exports into one folder would overwrite
    each other's manifest, and the stale temporary files removed at start are then surely not
    another run's. The kernel drops the lock when the process dies, however it dies."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ArtifactError(f"another m2a-export is writing {folder}: wait for it to finish") from None
    return fd


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
        self._check_signing()
        self.folder = args.out / (args.model + ("-cls" if args.heads == "cls" else ""))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.artifacts: dict[str, dict] = {}
        self.stages: list[dict] = []
        self._lock = _lock(self.folder)
        try:
            self._remove_partials()
            self.previous = self._previous()
            self._reference_backend: TorchBackend | None = None
            self._reference: list[np.ndarray] | None = None
            self._stress: dict[int | None, tuple[dict, dict]] = {}
            self.parity_set = load_split("test", n=args.parity_nodes)
            self.cohort_sha = self.parity_set.sha256()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def _check_signing(self) -> None:
        """Fail before any work when the manifest would be refused here for its signature."""
        key = None if self.args.sign is None else signing_key(self.args.sign)
        trusted = trusted_key()
        if trusted is not None and (key is None or key_id(key.public_key()) != key_id(trusted)):
            raise ArtifactError(
                f"{TRUSTED_KEY_ENV} is set, so the manifest must be signed: "
                "pass --sign with the matching private key"
            )

    def _remove_partials(self) -> None:
        stale = sorted(self.folder.glob(".partial-*"))
        for path in stale:
            path.unlink()
        if stale:
            self.log("clean", f"removed {len(stale)} temporary file(s) left by an interrupted run", 0.0)

    def _previous(self) -> dict[str, dict]:
        """The entries of the manifest here whose files are still there, unchanged."""
        if not (self.folder / MANIFEST).exists():
            return {}
        try:
            entries = read_manifest(self.folder).get("artifacts", {})
        except ArtifactError as e:
            self.log("manifest", f"not reused, everything is rebuilt: {e}", 0.0)
            return {}
        previous = {}
        for name, entry in entries.items():
            path = self.folder / name
            if path.is_file() and sha256_file(path) == entry.get("sha256"):
                previous[name] = entry
            else:
                self.log("manifest", f"{name} dropped: the file is gone or was changed", 0.0)
        return previous

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
        """The earlier entry of an unchanged file built by the same recipe (its parity may be missing)."""
        old = self.previous.get(name)
        same = old is not None and old.get("recipe") == json.loads(json.dumps(recipe))  # tuples -> lists
        return None if self.args.force or not same else dict(old)  # type: ignore[arg-type]

    def parity_current(self, entry: dict) -> bool:
        """A parity result judged at this threshold on this parity cohort, stress inputs included."""
        parity = entry.get("parity")
        return (
            isinstance(parity, dict)
            and parity.get("threshold") == self.threshold
            and parity.get("cohort_sha256") == self.cohort_sha
            and "stress" in parity
        )

    def reference_backend(self) -> TorchBackend:
        if self._reference_backend is None:
            a = self.args
            self._reference_backend = TorchBackend(a.model, heads=a.heads, weights=str(self.weights))
        return self._reference_backend

    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            self._reference = run_cohort(
                self.reference_backend(), self.parity_set, desc="reference torch:cpu"
            )
        return self._reference

    def stress_reference(self, batch: int | None) -> tuple[dict, dict]:
        """The stress inputs and the reference's outputs on them, computed once per batch."""
        if batch not in self._stress:
            inputs = stress_inputs(self.parity_set, batch)
            self._stress[batch] = (inputs, stress_outputs(self.reference_backend(), inputs))
        return self._stress[batch]

    def parity(self, backend: Backend, precision: str, batch: int | None = None) -> dict:
        """The tier on the parity cohort and the stress inputs; `batch`, an engine's largest profile
        batch, is stressed too (ONNX Runtime's graphs take any batch the same way)."""
        candidate = run_cohort(backend, self.parity_set, desc=backend.name)
        report = compare(self.reference(), candidate, self.parity_set, self.threshold, TIERS[precision])
        inputs, reference = self.stress_reference(batch)
        judge_stress(report, reference, stress_outputs(backend, inputs))
        report["split"] = "test"
        report["cohort_sha256"] = self.cohort_sha
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

    def reuse(self, name: str, precision: str, old: dict) -> bool:
        """Take over an earlier entry; False when its parity check must still run."""
        self.artifacts[name] = old
        if self.parity_current(old):
            self.log(precision, f"{name} reused (hash, recipe and parity match the manifest)", 0.0)
            return True
        old.pop("parity", None)
        self.write_manifest()
        self.log(precision, f"{name} reused (hash and recipe match); its parity check is run again", 0.0)
        return False

    def onnx_artifact(self, precision: str) -> dict:
        name = artifact_name(precision, "onnx")
        recipe: dict[str, Any] = {"weights_sha256": self.weights_sha, "heads": self.args.heads}
        a, source = self.args, self.folder / "model.fp32.onnx"
        if precision != "fp32":
            recipe["source_sha256"] = self.artifacts[source.name]["sha256"]
        if precision == "fp16":
            check_node_names(source, a.fp16_keep, "--fp16-keep")
            recipe["keep_fp32"] = sorted(set(a.fp16_keep))  # a graph built without them is not reused
        if precision == "int8":
            check_node_names(source, a.int8_exclude, "--int8-exclude")
            recipe["calibration"] = {
                "method": a.calib_method, "size": a.calib_size, "target": a.int8_target,
                "exclude": list(a.int8_exclude), "placements": [PLACEMENTS[True], PLACEMENTS[False]],
            }  # fmt: skip
        old = self.reusable(name, recipe)
        if precision == "int8" and old is not None and not self.parity_current(old):
            old = None  # its calibration was chosen by a check that must be redone: search again
        if old is not None and self.reuse(name, precision, old):
            return old
        if precision == "int8":
            return self.search_int8(name, recipe)
        if old is None:
            self.build_onnx(name, precision, recipe)
        return self.check_onnx(name, precision)

    def check_onnx(self, name: str, precision: str) -> dict:
        t0 = time.perf_counter()
        with OrtBackend(self.folder / name, threads=self.args.threads) as backend:
            report = self.parity(backend, precision)
        self.artifacts[name]["parity"] = report
        self.write_manifest()
        verdict = "passes" if report["passed"] else "FAILS (" + "; ".join(report["failures"]) + ")"
        self.log(
            precision,
            f"parity on ort:cpu, {report['nodes']} test nodes: {report['label_flips']} label flips, "
            f"max prob error {report['prob_max_abs']:.1e}; {precision} tier {verdict}",
            time.perf_counter() - t0,
        )
        return self.artifacts[name]

    def search_int8(self, name: str, recipe: dict) -> dict:
        """Calibrate with each of `calibration_search`'s choices in turn, each with the residual Adds'
        skip inputs quantized and then without (`PLACEMENTS`), until the graph passes its tier and the
        stress inputs; when none does, the one closest to passing is written (and fails).
        Every try is recorded in the entry's calibration, so the manifest says why this one. The second
        placement reads the first's ranges from ONNX Runtime's calibration cache instead of calibrating
        again. The closest failing graph so far waits beside the folder's temporary files (an
        interrupted run removes it), so choosing it costs a rename instead of a second calibration."""
        a = self.args
        choices = [
            Calibration(method, size, target=a.int8_target, exclude=tuple(a.int8_exclude), residual=residual)
            for method, size in calibration_search(a.calib_method, a.calib_size)
            for residual in (True, False)
        ]
        trials: list[dict] = []
        closest: tuple[tuple, dict] | None = None  # (distance from passing, entry) of the stashed graph
        stash = self.folder / f".partial-closest-{name}"
        with tempfile.TemporaryDirectory(prefix="m2a-calibration-") as tmp:
            caches = Path(tmp)
            for calib in choices:
                self.build_onnx(name, "int8", recipe, calib, caches / f"{calib.method}-{calib.size}.json")
                entry = self.check_onnx(name, "int8")
                report = entry["parity"]
                stress_max = max(r["prob_max_abs"] for r in report["stress"])
                trials.append(
                    {
                        "method": calib.method, "nodes": calib.size, "placement": PLACEMENTS[calib.residual],
                        "passed": report["passed"],
                        "failures": report["failures"], "label_flips": report["label_flips"],
                        "prob_max_abs": report["prob_max_abs"], "stress_prob_max_abs": stress_max,
                    }
                )  # fmt: skip
                if report["passed"]:
                    break
                distance = (len(report["failures"]), report["label_flips"], stress_max)
                if closest is None or distance < closest[0]:
                    os.replace(self.folder / name, stash)
                    closest = (distance, entry)
            else:
                assert closest is not None
                os.replace(stash, self.folder / name)
                self.artifacts[name] = closest[1]
            stash.unlink(missing_ok=True)
        entry = self.artifacts[name]
        entry["calibration"]["trials"] = trials
        self.write_manifest()
        if len(trials) > 1:
            tried = ", ".join(
                f"{t['method']}/{t['nodes']} on {t['placement']} {'passes' if t['passed'] else 'fails'}"
                for t in trials
            )
            self.log("int8", f"calibrations tried: {tried}", 0.0)
        return entry

    def build_onnx(
        self,
        name: str,
        precision: str,
        recipe: dict,
        calib: Calibration | None = None,
        calib_cache: Path | None = None,
    ) -> None:
        path = self.folder / name
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
            assert calib is not None
            bar = tqdm(
                total=calib.size,
                desc=f"calibrate ({calib.method})",
                unit="node",
                file=sys.stderr,
                leave=False,
            )
            extra["calibration"] = quantize_int8(
                self.folder / "model.fp32.onnx", path, calib, bar.update, cache=calib_cache
            )
            bar.close()
        if precision != "fp32":
            extra["source"] = "model.fp32.onnx"
        self.log(precision, f"{name} written and checked", time.perf_counter() - t0)
        self.record(name, precision, recipe, extra)

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
            "tf32": False,  # plans built before TF32 was cleared (tensorrt_build) are not reused
        }
        old = self.reusable(name, recipe)
        if old is None:
            self.build_engine(name, precision, source, recipe)
        elif self.reuse(name, precision, old):
            return
        with TensorRTBackend(self.folder / name) as backend:
            self.artifacts[name]["parity"] = self.parity(backend, precision, batch=a.batch[2])
        self.write_manifest()

    def build_engine(self, name: str, precision: str, source: str, recipe: dict) -> None:
        a = self.args
        t0 = time.perf_counter()
        info = build_engine(
            self.folder / source,
            self.folder / name,
            batch=cast(tuple[int, int, int], tuple(a.batch)),
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

    def merged(self) -> dict[str, dict]:
        """This run's entries, then the earlier ones it did not rebuild that still belong with them:
        same weights and heads, built from the source listed here, for this batch profile, with
        parity judged at this threshold."""
        artifacts = dict(self.artifacts)
        for name in sorted(self.previous, key=lambda n: n.endswith(".plan")):  # graphs before engines
            entry = self.previous[name]
            if name not in artifacts and self._belongs(entry, artifacts):
                artifacts[name] = entry
        return artifacts

    def _belongs(self, entry: dict, artifacts: dict[str, dict]) -> bool:
        recipe, source = entry.get("recipe", {}), entry.get("source")
        if source is not None and artifacts.get(source, {}).get("sha256") != recipe.get("source_sha256"):
            return False
        if "parity" in entry and entry["parity"].get("threshold") != self.threshold:
            return False
        if entry.get("format") == "tensorrt":
            return recipe.get("batch") == list(self.args.batch)
        return recipe.get("weights_sha256") == self.weights_sha and recipe.get("heads") == self.args.heads

    def finish(self) -> Path:
        """The last write, which also reports what earlier entries were kept or dropped."""
        artifacts = self.merged()
        for name in self.previous:
            if name not in self.artifacts:
                kept = name in artifacts
                why = "kept" if kept else "dropped: built from other weights, sources, batch or threshold"
                self.log("manifest", f"{name} {why}", 0.0)
        return self.write_manifest()

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
                "artifacts": self.merged(),
                "stages": self.stages,
            },
            sign=a.sign,
        )
