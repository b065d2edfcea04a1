"""Parity of a deployed artifact against the PyTorch FP32 reference, judged by named tiers.

Element-wise error alone cannot tell harmless FP16 rounding from an INT8 graph that changes
diagnoses, so every comparison also counts label flips at the model's threshold and compares
accuracy, AUC and the predicted node masks. Tiers follow MLPerf's rule of keeping >= 99% of
the reference's quality, tightened to what each precision can reach on this model:

* fp32: logits within 1e-4 (met) / 1e-3 (seg), zero label flips: the export is exact.
* fp16: probability error <= 5e-3, zero label flips (a node within 5e-3 of the threshold may
  flip and is reported, not counted), predicted-mask Dice vs reference >= 0.99.
* tf32: the fp16 criteria. TF32 rounds the operands of each convolution and matrix product to an
  11-bit significand (10 bits stored), relative error <= 2^-11 = 4.9e-4, FP16's unit roundoff, but
  accumulates and stores everything in FP32; its error is at most FP16's. The fp32 tier's 1e-4 on a
  logit is out of its reach: one rounding of 4.9e-4 on the head's inputs moves a logit of 2 by 1e-3.
* bf16: probability error <= 2e-2, zero label flips outside 2e-2 of the threshold, Dice >= 0.98.
  BF16 keeps 8 significant bits, unit roundoff 2^-8 = 3.9e-3, 8x FP16's: FP16 moved probabilities by
  at most 9.4e-4 on 128 nodes on an H200, so BF16 should by about 7.5e-3; 2e-2 leaves a margin of 2.7.
* int8: accuracy and AUC >= 99% of the reference, label flips <= 1% of nodes, Dice >= 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from m2anet.data import Cohort, hu_to_input
from m2anet.metrics import binary_metrics, dice, roc_auc, roc_auc_rows, sigmoid


@dataclass(frozen=True)
class Tier:
    name: str
    met_logit_abs: float | None = None
    seg_logit_abs: float | None = None
    prob_abs: float | None = None
    max_flip_fraction: float = 0.0
    min_relative_accuracy: float | None = None
    min_relative_auc: float | None = None
    min_mask_dice: float | None = None


FP32_LOGIT_TOLERANCE = {"met_logit": 1e-4, "seg_logit": 1e-3}
"""Max abs logit difference of an FP32 artifact: the export check and the fp32 tier use this one table."""

TIERS = {
    "fp32": Tier(
        "fp32",
        met_logit_abs=FP32_LOGIT_TOLERANCE["met_logit"],
        seg_logit_abs=FP32_LOGIT_TOLERANCE["seg_logit"],
    ),
    "fp16": Tier("fp16", prob_abs=5e-3, min_mask_dice=0.99),
    "tf32": Tier("tf32", prob_abs=5e-3, min_mask_dice=0.99),
    "bf16": Tier("bf16", prob_abs=2e-2, min_mask_dice=0.98),
    "int8": Tier(
        "int8", max_flip_fraction=0.01, min_relative_accuracy=0.99, min_relative_auc=0.99, min_mask_dice=0.95
    ),
}


def tensor_agreement(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    diff = np.abs(ref.astype(np.float64) - cand)
    a, b = ref.reshape(-1).astype(np.float64), cand.reshape(-1).astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_rel": float((diff / (np.abs(ref) + 1e-6)).max()),
        "cosine": cosine,
    }


def expected_calibration_error(label: np.ndarray, prob: np.ndarray, bins: int = 10) -> float:
    """Weighted mean |observed rate - mean probability| over equal-width probability bins."""
    which = np.minimum((prob * bins).astype(int), bins - 1)
    return float(
        sum(
            abs(label[which == b].mean() - prob[which == b].mean()) * (which == b).mean()
            for b in range(bins)
            if (which == b).any()
        )
    )


def bootstrap_auc_difference(
    label: np.ndarray, p_ref: np.ndarray, p_cand: np.ndarray, seed: int = 0, rounds: int = 1000
) -> dict[str, float]:
    """Paired bootstrap over nodes: 95% interval of AUC(candidate) - AUC(reference). All rounds are
    ranked at once (every parity check runs this; a loop of `rounds` AUCs cost 0.5 s per check);
    resamples with one class only are left out."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(label), (rounds, len(label)))
    resampled = np.asarray(label).astype(bool)[idx]
    both = resampled.any(axis=1) & ~resampled.all(axis=1)
    idx, resampled = idx[both], resampled[both]
    diffs = roc_auc_rows(resampled, p_cand[idx]) - roc_auc_rows(resampled, p_ref[idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"low": float(lo), "high": float(hi), "rounds": rounds, "seed": seed}


def compare(
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    cohort: Cohort,
    threshold: float,
    tier: Tier,
    seed: int = 0,
) -> dict:
    """Agreement of two runs over the same cohort, and the tier's verdict with reasons."""
    p_ref, p_cand = sigmoid(reference[0][:, 0]), sigmoid(candidate[0][:, 0])
    flips = np.flatnonzero((p_ref >= threshold) != (p_cand >= threshold))
    label = cohort.label

    def task(prob: np.ndarray) -> dict[str, float]:
        return {
            **binary_metrics(label, prob, threshold),
            "auc": roc_auc(label, prob),
            "ece": expected_calibration_error(label, prob),
        }

    ref_metrics, cand_metrics = task(p_ref), task(p_cand)
    report: dict = {
        "nodes": len(cohort),
        "threshold": threshold,
        "tensors": {
            name: tensor_agreement(r, c)
            for name, r, c in zip(("met_logit", "seg_logit"), reference, candidate, strict=False)
        },
        "met_logit_max_abs": float(np.abs(reference[0] - candidate[0]).max()),
        "prob_max_abs": float(np.abs(p_ref - p_cand).max()),
        "prob_mean_abs": float(np.abs(p_ref - p_cand).mean()),
        "auc_difference_ci95": bootstrap_auc_difference(label, p_ref, p_cand, seed),
        "label_flips": len(flips),
        "flipped": [
            {"node_id": str(cohort.node_id[i]), "reference": float(p_ref[i]), "candidate": float(p_cand[i])}
            for i in flips
        ],
        "reference": ref_metrics,
        "candidate": cand_metrics,
    }
    if len(reference) > 1 and len(candidate) > 1:
        report["seg_logit_max_abs"] = float(np.abs(reference[1] - candidate[1]).max())
        report["mask_dice"] = dice(reference[1] > 0, candidate[1] > 0)
        ref_metrics["dice_vs_truth"] = dice(reference[1] > 0, cohort.seg > 0.5)
        cand_metrics["dice_vs_truth"] = dice(candidate[1] > 0, cohort.seg > 0.5)
    failures = []

    def need(ok: bool, text: str) -> None:
        if not ok:
            failures.append(text)

    if tier.met_logit_abs is not None:
        need(report["met_logit_max_abs"] <= tier.met_logit_abs, f"met_logit error > {tier.met_logit_abs:g}")
    if tier.seg_logit_abs is not None and "seg_logit_max_abs" in report:
        need(report["seg_logit_max_abs"] <= tier.seg_logit_abs, f"seg_logit error > {tier.seg_logit_abs:g}")
    if tier.prob_abs is not None:
        need(report["prob_max_abs"] <= tier.prob_abs, f"probability error > {tier.prob_abs:g}")
    # A node within the tier's probability tolerance of the threshold may flip however exact the
    # artifact is; flips are counted against the tier only outside that band (all are reported).
    band = tier.prob_abs or 0.0
    decisive = [i for i in flips if abs(p_ref[i] - threshold) > band]
    report["label_flips_outside_tolerance"] = len(decisive)
    need(
        len(decisive) <= tier.max_flip_fraction * len(cohort),
        f"{len(decisive)} label flips > {tier.max_flip_fraction:.0%} of {len(cohort)} nodes"
        + (f" (not counting {len(flips) - len(decisive)} within {band:g} of the threshold)" if band else ""),
    )
    if tier.min_relative_accuracy is not None:
        need(
            cand_metrics["accuracy"] >= tier.min_relative_accuracy * ref_metrics["accuracy"],
            f"accuracy < {tier.min_relative_accuracy:.0%} of the reference",
        )
    if tier.min_relative_auc is not None:
        need(
            cand_metrics["auc"] >= tier.min_relative_auc * ref_metrics["auc"],
            f"AUC < {tier.min_relative_auc:.0%} of the reference",
        )
    if tier.min_mask_dice is not None and "mask_dice" in report:
        need(report["mask_dice"] >= tier.min_mask_dice, f"mask Dice vs reference < {tier.min_mask_dice}")
    report.update({"tier": tier.name, "passed": not failures, "failures": failures})
    return report


STRESS_PROB_ABS = 0.05
"""On inputs outside the data distribution only gross disagreement (overflow, saturation) fails."""


class Infers(Protocol):
    def infer(self, ct: np.ndarray, mask: np.ndarray, *, check: bool = True) -> tuple[np.ndarray, ...]: ...


def stress_inputs(
    cohort: Cohort, batch: int | None, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Inputs no split contains, where FP16 overflow or INT8 saturation would show: random masks on
    the cohort's first 4 nodes, and one patch of each constant or patterned CT under a node-sized
    mask; with `batch`, also the cohort tiled to that batch (an engine's largest profile batch may
    take other kernels)."""
    rng = np.random.default_rng(seed)
    n = min(4, len(cohort))
    ct, mask = cohort.ct[:n], cohort.mask[:n]
    blob = np.zeros_like(mask[:1])
    blob[:, :, 6:10, 28:36, 28:36] = 1.0
    random_masks = (rng.random(mask.shape) < 0.02).astype(np.float32)
    random_masks[:, :, 8, 32, 32] = 1.0
    shape = blob.shape
    cases = {
        "random masks": (ct, random_masks),
        "all-background patch": (np.full(shape, hu_to_input(np.array(-100.0, np.float32)), np.float32), blob),
        "extreme HU (all >= 275)": (np.ones(shape, np.float32), blob),
        "extreme HU (all <= -175)": (np.zeros(shape, np.float32), blob),
        "extreme HU (checkerboard)": (
            (np.indices(shape[2:]).sum(0) % 2).astype(np.float32)[None, None],
            blob,
        ),
    }
    if batch is not None:
        reps = -(-batch // len(cohort))
        cases[f"largest batch ({batch})"] = (
            np.tile(cohort.ct, (reps, 1, 1, 1, 1))[:batch],
            np.tile(cohort.mask, (reps, 1, 1, 1, 1))[:batch],
        )
    return cases


def stress_outputs(
    backend: Infers, inputs: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, tuple[np.ndarray, ...]]:
    return {name: backend.infer(ct, mask, check=False) for name, (ct, mask) in inputs.items()}


def judge_stress(report: dict, reference: dict[str, tuple], candidate: dict[str, tuple]) -> None:
    """Add the stress rows to a `compare` report: a case that disagrees by more than STRESS_PROB_ABS
    or is not finite fails the report whatever its tier says."""
    rows: list[dict[str, Any]] = []
    for name, ref in reference.items():
        cand = candidate[name]
        finite = all(np.isfinite(c).all() for c in cand)
        err = float(np.abs(sigmoid(ref[0]) - sigmoid(cand[0])).max()) if finite else float("inf")
        rows.append(
            {
                "case": name,
                "nodes": len(ref[0]),
                "finite": finite,
                "prob_max_abs": err,
                "passed": finite and err <= STRESS_PROB_ABS,
            }
        )
    report["stress"] = rows
    bad = [r["case"] for r in rows if not r["passed"]]
    if bad:
        report["failures"].append(f"stress inputs disagree or overflow: {', '.join(bad)}")
        report["passed"] = False
