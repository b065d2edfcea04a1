"""Which layers must stay in FP32 for an INT8 graph to pass its parity tier?

Like Polygraphy's `debug precision`, but ranked instead of bisected: ONNX Runtime's QDQ debug
tools measure, per quantized activation, the signal-to-quantization-noise ratio between the
INT8 and the FP32 graph on calibration nodes; the consuming convolutions are then excluded
worst-first (1, 2, 4, ... layers, then all), re-quantizing with the recorded calibration each time
(its ranges computed once and then read from ONNX Runtime's calibration cache), until the tier passes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    compute_activation_error,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)

from m2anet.data import Cohort, load_split
from m2anet.engines.base import run_cohort
from m2anet.engines.ort_backend import OrtBackend
from m2anet.export.int8 import PLACEMENTS, Calibration, CalibrationReader, quantize_int8
from m2anet.io import sha256_file
from m2anet.manifest import TRUSTED_KEY_ENV, artifact_entry, trusted_key, write_manifest
from m2anet.parity import TIERS, compare


def layer_sensitivity(fp32: Path, int8: Path, nodes: int = 16) -> list[tuple[str, float]]:
    """Conv/ConvTranspose node names with the SQNR (dB) of their quantized input, worst first."""
    cohort = load_split("calib", n=nodes)
    with tempfile.TemporaryDirectory() as tmp:
        acts = {}
        for key, path in (("float", fp32), ("qdq", int8)):
            augmented = Path(tmp) / f"{key}.onnx"
            modify_model_output_intermediate_tensors(str(path), str(augmented))
            acts[key] = collect_activations(str(augmented), CalibrationReader(cohort, 4, lambda n: None))
    errors = compute_activation_error(create_activation_matching(acts["qdq"], acts["float"]))
    graph = onnx.load(str(fp32)).graph
    scores: dict[str, float] = {}
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.input[0] in errors:
            scores[node.name] = float(errors[node.input[0]].get("xmodel_err", float("inf")))
    return sorted(scores.items(), key=lambda kv: kv[1])


def diagnose_int8(int8: Path, reference: list[np.ndarray], cohort: Cohort, threshold: float) -> dict:
    """Exclude the worst layers until the int8 tier passes against the `reference` outputs on
    `cohort`; returns the ranking, the trials and the advice."""
    if trusted_key() is not None:  # the trial graphs' manifests are sealed but cannot be signed
        raise ValueError(
            f"--diagnose re-quantizes into unsigned trial folders, which {TRUSTED_KEY_ENV} refuses: "
            "run it where you export, without that variable"
        )
    entry = artifact_entry(int8)
    if entry["precision"] != "int8" or not int8.name.endswith(".onnx"):
        raise ValueError("--diagnose needs an INT8 ONNX artifact: m2a-verify ort:cpu:FOLDER/model.int8.onnx")
    fp32 = int8.parent / entry["source"]
    calib = entry["calibration"]
    ranked = layer_sensitivity(fp32, int8)
    calibration = load_split("calib", n=calib["nodes"])  # the nodes the artifact was calibrated on
    trials = []
    sizes = sorted({*(2**i for i in range(len(ranked).bit_length())), len(ranked)} - {0})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for k in sizes:
            exclude = tuple(name for name, _ in ranked[:k]) + tuple(calib["excluded"])
            candidate = folder / "model.int8.onnx"
            quantize_int8(
                fp32,
                candidate,
                Calibration(
                    calib["method"],
                    calib["nodes"],
                    target=calib["target"],
                    exclude=exclude,
                    residual=calib.get("placement") != PLACEMENTS[False],  # the artifact's placement
                ),
                cohort=calibration,
                cache=folder / "calibration.json",
            )
            write_manifest(
                folder,
                {"artifacts": {"model.int8.onnx": {"sha256": sha256_file(candidate), "precision": "int8"}}},
            )
            with OrtBackend(candidate) as backend:
                outputs = run_cohort(backend, cohort, desc=f"exclude {k}")
            result = compare(reference, outputs, cohort, threshold, TIERS["int8"])
            trials.append(
                {
                    "excluded": list(exclude),
                    "passed": result["passed"],
                    "label_flips": result["label_flips"],
                    "failures": result["failures"],
                }
            )
            if result["passed"]:
                line = "--int8-exclude " + " ".join(exclude)
                return {
                    "ranked": ranked,
                    "trials": trials,
                    "exclude": list(exclude),
                    "advice": f"the int8 tier passes with {k} layer(s) in FP32: m2a-export --precision int8 "
                    f"{line}",
                }
    return {
        "ranked": ranked,
        "trials": trials,
        "exclude": None,
        "advice": "no exclusion set restored the int8 tier: "
        "try another --calib-method or a larger --calib-size",
    }
