"""`NodeClassifier`: the embedding API, from a CT study (or ready-made patches) to per-node results.

Thread safety: a classifier owns one backend and runs one batch at a time on it, under a lock. A
TensorRT backend has one execution context and one set of I/O buffers, and tritonclient's HTTP
client is not safe to share mid-call, so the lock is what makes one classifier safe to call from
several threads. Reading and preprocessing a study, most of a study's CPU time, run outside the
lock, so threads still overlap there. For concurrent inference on one GPU, open one classifier per
thread (one execution context each) or serve the model from Triton.
"""

from __future__ import annotations

import numbers
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from m2anet.contract import HU_WINDOW
from m2anet.engines import Backend, BackendSpec, InputError, check_inputs, open_backend
from m2anet.engines.choice import fastest_artifact_spec
from m2anet.engines.environment import cuda_missing_reason, tensorrt_missing_reason
from m2anet.io import sha256_file
from m2anet.manifest import (
    PRECISIONS,
    ArtifactError,
    artifact_entry,
    artifact_name,
    check_parity,
    read_manifest,
    verified_weights,
)
from m2anet.metrics import sigmoid
from m2anet.node_report import StudyReport, node_row
from m2anet.preprocess import MaskCanvas, Progress, StudyNodes, as_image
from m2anet.weights import shipped_weights, training_record

if TYPE_CHECKING:  # images are read and resampled by m2anet.preprocess, which imports it on first use
    import SimpleITK as sitk

CPU_BATCH = 8
"""Nodes per inference batch on the CPU: ms/node at batch 8 is as good as at larger batches there, and
each node in flight holds ~15-35 MB of activations (m2anet_small..m2anet_base)."""
GPU_BATCH = 32
"""Nodes per batch on a GPU or server without a recorded profile: m2a-export's default opt batch."""

BACKEND_HELP = (
    "trt, ort:cpu, ort:cuda, ort:trt, torch:cpu, torch:cuda, triton:URL "
    "(or a file: ort:cpu:FILE.onnx, trt:FILE.plan)"
)


class StudyWarning(UserWarning):
    """A node was skipped or classified from a partial view; the rest of the study is reported."""


@dataclass(frozen=True)
class PatchPredictions:
    probability: np.ndarray  # (N,) float64, P(metastatic)
    predicted: np.ndarray  # (N,) int64, 1 = metastatic (probability >= threshold)
    seg: np.ndarray | None  # (N, 16, 64, 64) float32 node-mask probability; None: no seg head, or seg=False


def _check_options(threshold: float | None, max_batch: int | None) -> None:
    """Checked before any backend opens: a threshold outside (0, 1) calls every node one class, NaN none
    metastatic (m2a-predict's parser refuses them; the API took them)."""
    if threshold is not None and (
        not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not 0 < threshold < 1
    ):
        raise ValueError(f"threshold must be a number between 0 and 1 (exclusive), got {threshold!r}")
    if max_batch is not None and (
        not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1
    ):
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")


class NodeClassifier:
    """Per-node metastasis probability for a CT study and its node label map, on any backend."""

    def __init__(
        self,
        backend: Backend,
        threshold: float,
        *,
        model: str,
        artifact: str | None = None,
        sha256: str | None = None,
        max_batch: int | None = None,
    ) -> None:
        """`max_batch`: nodes per inference call, which bounds memory whatever the study's size
        (default: CPU_BATCH on the CPU, GPU_BATCH elsewhere)."""
        _check_options(threshold, max_batch)
        self.backend = backend
        self.max_batch = int(max_batch or (CPU_BATCH if backend.device == "cpu" else GPU_BATCH))
        self.threshold = float(threshold)
        self.model = model
        self.artifact = artifact
        self.sha256 = sha256
        self._lock = threading.Lock()

    @classmethod
    def from_artifacts(
        cls,
        folder: str | Path | None,
        precision: str = "fp16",
        backend: str | None = None,
        *,
        allow_parity_fail: bool = False,
        threshold: float | None = None,
        max_batch: int | None = None,
    ) -> NodeClassifier:
        """Open the best artifact of `precision` in an `m2a-export` folder, or the one `backend` names.

        `backend`: None picks TensorRT plan > ONNX Runtime GPU > ONNX Runtime CPU > PyTorch; else
        one of BACKEND_HELP, a file spec (`ort:cpu:FILE.onnx`, `trt:FILE.plan`, whose folder is used), or
        `triton:URL`. Hashes are checked when the artifact opens, TensorRT plans also against this
        GPU and TensorRT version, and an artifact that failed its parity tier is refused unless
        `allow_parity_fail`. `max_batch` defaults to the export's opt batch on a GPU (CPU_BATCH on the CPU).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        _check_options(threshold, max_batch)
        spec = None if backend is None else BackendSpec.parse(backend)
        if spec is not None and spec.kind == "triton":
            return cls._from_triton(str(spec.target), folder, precision, threshold, max_batch)
        if spec is not None and spec.kind not in ("torch", "ort", "trt"):
            raise ValueError(f"unknown backend {backend!r}: use one of {BACKEND_HELP}")
        if spec is not None and spec.artifact is not None:
            artifact_entry(spec.artifact, verify=False)  # a folder or a typo named as such, not as its parent
            folder = spec.artifact.parent
        if folder is None:
            raise ValueError("give the artifact folder written by m2a-export (or a backend naming a file)")
        folder = Path(folder)
        manifest = read_manifest(folder)
        model = manifest["model"]
        threshold = float(model["threshold"]) if threshold is None else threshold
        opt = manifest.get("batch_profile", {}).get("opt")

        def batch(runner: Backend) -> int | None:
            return max_batch or (None if runner.device == "cpu" else opt)

        if spec is None:
            spec = fastest_artifact_spec(folder, manifest, precision)
            if spec is None:
                spec = BackendSpec("torch:cpu" if cuda_missing_reason() else "torch:cuda")
                warnings.warn(
                    f"{folder} has no {artifact_name(precision, 'onnx')}: running the exported weights on "
                    f"{spec.spec} (export {precision} for speed)",
                    stacklevel=2,
                )
        if spec.kind == "torch":
            weights = verified_weights(model)
            autocast = "fp16" if spec.device == "cuda" and precision == "fp16" else "fp32"
            from_manifest = {"model_name": model["name"], "heads": model["heads"], "weights": str(weights)}
            if clash := sorted(spec.options.keys() & from_manifest.keys()):
                raise ValueError(f"backend option {clash[0]!r}: the manifest of {folder} sets it; drop it")
            runner = open_backend(
                BackendSpec(f"torch:{spec.device}:{autocast}", spec.options), **from_manifest
            )
            return cls(
                runner,
                threshold,
                model=model["name"],
                artifact=str(weights),
                sha256=model["weights_sha256"],
                max_batch=batch(runner),
            )
        if spec.artifact is None:
            spec = spec.with_artifact(
                folder / artifact_name(precision, "plan" if spec.kind == "trt" else "onnx")
            )
        path = spec.artifact
        assert path is not None
        if spec.kind == "trt" and not path.exists() and (reason := tensorrt_missing_reason()):
            raise ArtifactError(  # m2a-export skipped the plan for this reason: exporting again cannot help
                f"{path} not found, and no plan can be built or run here: {reason}; use ort:cpu"
            )
        entry = artifact_entry(path, verify=False)  # the backend verifies the hash as it opens the file
        check_parity(path.name, entry, allow_parity_fail)
        runner = open_backend(spec)
        return cls(
            runner,
            threshold,
            model=model["name"],
            artifact=str(path),
            sha256=entry["sha256"],
            max_batch=batch(runner),
        )

    @classmethod
    def _from_triton(
        cls,
        url: str,
        folder: str | Path | None,
        precision: str,
        threshold: float | None,
        max_batch: int | None,
    ) -> NodeClassifier:
        """The server's model config carries what m2a-triton recorded: artifact hash and threshold."""
        runner = open_backend(f"triton:{url}")
        params: dict[str, str] = getattr(runner, "parameters", {})
        sha = params.get("m2anet_sha256")
        if folder is not None:
            manifest = read_manifest(folder)
            known = {e["sha256"]: name for name, e in manifest.get("artifacts", {}).items()}
            if sha is not None and sha not in known:
                runner.close()
                raise ArtifactError(
                    f"the Triton model at {url} was not made from {folder} (sha256 {sha[:12]}...): "
                    "rewrite its repository with m2a-triton or point to the right folder"
                )
            if threshold is None:
                threshold = float(manifest["model"]["threshold"])
        if threshold is None:
            if "m2anet_threshold" not in params:
                runner.close()
                raise ArtifactError(
                    f"the Triton model at {url} records no threshold: pass the artifact folder or a threshold"
                )
            threshold = float(params["m2anet_threshold"])
        return cls(
            runner,
            threshold,
            model=params.get("m2anet_model", "unknown"),
            artifact=url,
            sha256=sha,
            max_batch=max_batch,
        )

    @classmethod
    def from_weights(
        cls,
        model: str = "m2anet_small",
        device: str = "cpu",
        threshold: float | None = None,
        max_batch: int | None = None,
    ) -> NodeClassifier:
        """The shipped PyTorch weights, no export needed: the reference, and the demo's fallback."""
        _check_options(threshold, max_batch)
        runner = open_backend(f"torch:{device}", model_name=model)
        weights = shipped_weights(model)
        threshold = float(training_record(model)["threshold"]) if threshold is None else threshold
        return cls(
            runner,
            threshold,
            model=model,
            artifact=str(weights),
            sha256=sha256_file(weights),
            max_batch=max_batch,
        )

    @property
    def info(self) -> dict[str, Any]:
        """What produced the results: for reports and audit trails."""
        return {
            "model": self.model,
            "backend": self.backend.name,
            "device": self.backend.device,
            "precision": self.backend.precision,
            "artifact": self.artifact,
            "sha256": self.sha256,
            "threshold": self.threshold,
        }

    def predict_patches(self, ct: np.ndarray, mask: np.ndarray, *, seg: bool = True) -> PatchPredictions:
        """Patches cropped by the caller: float32 (N, 1, 16, 64, 64) each, as `m2anet.preprocess` makes.
        They run `max_batch` at a time, so activations stay bounded however many are passed.
        `seg=False` leaves the masks out (`seg` None): the backend returns no mask logits, which a GPU
        would copy back and Triton send over the network (256 KiB per node), and the host computes none of
        their 65,536 probabilities per node (docs/embedding.md, "Host work"). Only predicted masks need
        them."""
        check_inputs(ct, mask)
        if ct.size and (ct.min() < 0.0 or ct.max() > 1.0):
            raise InputError(
                f"ct patches hold values in [{ct.min():g}, {ct.max():g}], not [0, 1]: pass HU through "
                f"m2anet.data.hu_to_input (the window {HU_WINDOW} HU scaled to [0, 1])"
            )
        wanted = self.backend.outputs if seg else ("met_logit",)
        met, masks = [], []
        for i in range(0, len(ct), self.max_batch):
            with self._lock:
                outputs = self.backend.infer(
                    ct[i : i + self.max_batch], mask[i : i + self.max_batch], check=False, outputs=wanted
                )
            met.append(outputs[0][:, 0])
            if len(outputs) > 1:
                masks.append(sigmoid(outputs[1][:, 0], np.float32))
        probability = sigmoid(np.concatenate(met))
        return PatchPredictions(
            probability=probability,
            predicted=(probability >= self.threshold).astype(np.int64),
            seg=np.concatenate(masks) if masks else None,
        )

    def classify(
        self,
        ct_image: sitk.Image | np.ndarray,
        node_labels: sitk.Image | np.ndarray,
        *,
        spacing: tuple[float, float, float] | None = None,
        origin: tuple[float, float, float] | None = None,
        direction: tuple[float, ...] | None = None,
        masks: bool = False,
        progress: Progress | None = None,
    ) -> StudyReport:
        """`predict_study` with the warnings, timings and (with `masks`) predicted masks kept."""
        if masks and "seg_logit" not in self.backend.outputs:
            raise ValueError("this artifact has no segmentation head (heads=cls): it cannot predict masks")
        t0 = time.perf_counter()
        geometry = {"spacing": spacing, "origin": origin, "direction": direction}
        ct = as_image(ct_image, geometry, None)
        labels = as_image(node_labels, geometry, ct)
        study = StudyNodes(ct, labels)
        canvas = MaskCanvas(ct) if masks else None
        timings = {"preprocess_s": time.perf_counter() - t0, "infer_s": 0.0, "masks_s": 0.0}
        probability: dict[int, float] = {}
        # one batch in memory at a time: crop it, infer, keep per-node results, paste its masks
        batches = study.batches(self.max_batch, progress)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            t1 = time.perf_counter()
            timings["preprocess_s"] += t1 - t0
            if batch is None:
                break
            pred = self.predict_patches(batch.ct, batch.mask, seg=masks)
            probability.update(zip(batch.classified, pred.probability.tolist(), strict=True))
            t2 = time.perf_counter()
            timings["infer_s"] += t2 - t1
            if progress is not None:
                progress("infer", len(probability), len(study))
            if canvas is not None and pred.seg is not None:
                canvas.paste(pred.seg, [study.nodes[i].label for i in batch.classified], batch.patch_origins)
                timings["masks_s"] += time.perf_counter() - t2
        if not masks:
            del timings["masks_s"]
        rows = [node_row(node, probability.get(i), self.threshold) for i, node in enumerate(study.nodes)]
        mask_image = canvas.image() if canvas is not None else None
        return StudyReport(nodes=rows, warnings=study.warnings, timings_s=timings, masks=mask_image)

    def predict_study(
        self,
        ct_image: sitk.Image | np.ndarray,
        node_labels: sitk.Image | np.ndarray,
        *,
        spacing: tuple[float, float, float] | None = None,
        origin: tuple[float, float, float] | None = None,
        direction: tuple[float, ...] | None = None,
    ) -> list[dict[str, Any]]:
        """One dict per node label (keys: COLUMNS); skipped nodes have status 'skipped' and a note.

        Images are SimpleITK images, or numpy arrays indexed (z, y, x) with `spacing`, `origin`,
        `direction` in SimpleITK's (x, y, z) order (a numpy label map alone takes the CT's
        geometry). Skipped and oversized nodes also raise a `StudyWarning` each.
        """
        report = self.classify(ct_image, node_labels, spacing=spacing, origin=origin, direction=direction)
        for message in report.warnings:
            warnings.warn(message, StudyWarning, stacklevel=2)
        return report.nodes

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> NodeClassifier:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
