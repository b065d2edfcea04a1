"""How much of the label the synthetic cohort's images carry (issue 14, items 1 and 2).

A model can only learn a sign that the patch shows. This study measures, on the generator as it
is (`m2anet.data`), two things that a change of the cohort must keep in view:

* visibility: each sign's weight in the label (the SD of its term in `metastasis_logit` over a
  large simulation of the sign draws, no rendering) beside how well the best simple measurement
  of it on the rendered, noisy patch follows it (Pearson r over rendered nodes);
* ceilings: the label model with and without the patient effect (which no image shows), a
  radiomics reader (the same hand measurements, logistic regression fitted on `train`, threshold
  for accuracy on `val`), and the clinical size rule, on `test` and on a fresh-seed cohort.

Signs are read back from the generator, not from a copy of its formulas: a node's patch is drawn
from its own random generator and `_draw_signs` is the first draw from it, so drawing the signs
from a copy of that generator gives the signs of the patch. `rendered_nodes` checks this on every node
(the short axis and the label probability must match what the patch reports), so a generator
change that breaks it stops the study instead of mis-attributing signs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from tqdm import tqdm

from m2anet.contract import HU_WINDOW, PATCH_SPACING_MM
from m2anet.data import (
    FRESH_NODES,
    FRESH_SEED,
    GENERATOR_VERSION,
    SIGN_NAMES,
    SPLITS,
    NodeSigns,
    _draw_signs,
    _patch,
    _patients,
    metastasis_logit,
)
from m2anet.io import atomic_path, write_json
from m2anet.metrics import accuracy_threshold, binary_metrics, roc_auc, sigmoid
from m2anet.optional import lazy_import
from m2anet.preprocess import short_axis_mm

sklearn_linear = lazy_import("sklearn.linear_model", "pip install 'm2anet[dev]' (scikit-learn)")

VISIBLE_R = 0.6
HEAVY_LOGIT_SD = 1.0
"""Issue 14's bar: a sign whose logit term has SD >= 1 needs a measurement with |r| >= 0.6."""

SIGN_MEASUREMENTS: dict[str, tuple[str, ...]] = {
    "short_axis_mm": ("contour_short_axis_mm", "contour_equivalent_diameter_mm"),
    "roundness": ("contour_moment_roundness", "contour_axial_roundness"),
    "necrosis": ("core_rim_drop_hu", "interior_mean_hu", "low_attenuation_fraction"),
    "heterogeneity": ("interior_sd_hu", "interior_smooth_sd_hu", "texture_excess_hu"),
    "irregularity": ("contour_solidity", "contour_sphericity", "image_solidity"),
    "fatty_hilum": ("fat_fraction", "interior_p05_hu"),
    "calcified": ("max_hu", "bright_fraction"),
}
"""The measurements of each sign that the visibility table chooses from (the best |r| wins). Only
measurements of the sign itself: the size measurements also follow necrosis (necrosis depends on
size), which is not necrosis being visible. `correlations` in the report has every pair."""

FEATURES: tuple[str, ...] = (
    "contour_short_axis_mm",
    "contour_equivalent_diameter_mm",
    "contour_moment_roundness",
    "contour_axial_roundness",
    "contour_solidity",
    "contour_sphericity",
    "image_solidity",
    "interior_mean_hu",
    "interior_sd_hu",
    "interior_smooth_sd_hu",
    "texture_excess_hu",
    "noise_sd_hu",
    "core_rim_drop_hu",
    "low_attenuation_fraction",
    "fat_fraction",
    "interior_p05_hu",
    "max_hu",
    "bright_fraction",
)
"""The radiomics reader's inputs, in this order."""

_SPACING = np.array(PATCH_SPACING_MM)
_IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)  # one voxel in y and x, not in z
_SMOOTH = (0.5, 1.5, 1.5)  # voxels: keeps the generator's enhancement texture, suppresses its noise
_NOISE_SMOOTH = (0.3, 0.8, 0.8)  # about the noise's own correlation: takes the edge off single voxels


@dataclass(frozen=True)
class RenderedNode:
    """One node as `load_split` draws it, with the signs and patient effect its label came from."""

    ct: np.ndarray  # (16, 64, 64), model input in [0, 1]
    mask: np.ndarray  # (16, 64, 64), the noisy input contour
    label: int
    short_axis_mm: float
    bayes_probability: float
    signs: NodeSigns
    patient_effect: float


def rendered_nodes(seed: int, n: int) -> Iterator[RenderedNode]:
    """The first n nodes of the cohort `load_split` draws from `seed`, one at a time (a cohort of
    thousands of patches does not have to sit in memory to be measured)."""
    for _pid, patient, rngs in _patients(seed, n):
        for rng in rngs:
            signs = _draw_signs(copy.deepcopy(rng))
            row = _patch(rng, patient)
            if not (
                math.isclose(row["short_axis_mm"], signs.short_axis_mm)
                and math.isclose(
                    row["bayes_probability"],
                    float(sigmoid(metastasis_logit(signs, patient["effect"]))),
                    rel_tol=1e-9,
                )
            ):
                raise RuntimeError(
                    "m2anet.data._patch no longer draws its signs first: update "
                    "m2anet.cohort_study.rendered_nodes to read them back"
                )
            yield RenderedNode(
                ct=row["ct"][0],
                mask=row["mask"][0],
                label=row["label"],
                short_axis_mm=row["short_axis_mm"],
                bayes_probability=row["bayes_probability"],
                signs=signs,
                patient_effect=patient["effect"],
            )


def _sign_value(signs: NodeSigns, name: str) -> float:
    return float(getattr(signs, name))


def _solidity(points_mm: np.ndarray, volume_mm3: float) -> float:
    """Volume over convex-hull volume (1 for a convex node); voxel corners, so a voxel block is 1."""
    try:
        return float(min(volume_mm3 / ConvexHull(points_mm).volume, 1.0))
    except (QhullError, ValueError):  # fewer than 4 points or all in one plane
        return 1.0


def _corners(mask: np.ndarray) -> np.ndarray:
    """The corners (mm) of the mask's surface voxels: what the convex hull needs."""
    surface = mask & ~ndimage.binary_erosion(mask)
    offsets = np.array([[a, b, c] for a in (-0.5, 0.5) for b in (-0.5, 0.5) for c in (-0.5, 0.5)])
    return np.unique((np.argwhere(surface)[:, None, :] + offsets[None]).reshape(-1, 3), axis=0) * _SPACING


def _interior(mask: np.ndarray) -> np.ndarray:
    """The contour eroded in-plane past its delineation error (two voxels), less for small nodes."""
    for steps in (2, 1):
        inner = ndimage.binary_erosion(mask, _IN_PLANE, iterations=steps)
        if inner.sum() >= 8:
            return inner
    return mask


def node_features(ct: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Hand measurements of one patch (model input in [0, 1]) inside its input contour, in HU and mm:
    what a radiologist or a radiomics package reads from the image, not from the generator."""
    lo, hi = HU_WINDOW
    m = mask > 0.5
    zz, yy, xx = np.nonzero(ndimage.binary_dilation(m, iterations=3))
    box = (slice(zz.min(), zz.max() + 1), slice(yy.min(), yy.max() + 1), slice(xx.min(), xx.max() + 1))
    hu = ct[box].astype(np.float64) * (hi - lo) + lo
    m = m[box]
    smooth = ndimage.gaussian_filter(hu, _SMOOTH)
    voxel_mm3 = float(np.prod(_SPACING))
    volume = float(m.sum()) * voxel_mm3

    points = np.argwhere(m) * _SPACING
    cov = np.cov(points.T) if len(points) > 1 else np.zeros((3, 3))
    eig = np.linalg.eigvalsh(cov + np.diag(_SPACING**2 / 12.0))  # a voxel's own extent
    axial = np.linalg.eigvalsh(cov[1:, 1:] + np.diag(_SPACING[1:] ** 2 / 12.0))  # as read on axial slices
    faces = [np.abs(np.diff(np.pad(m, 1).astype(np.int8), axis=a)).sum() for a in range(3)]
    area = sum(f * np.prod(np.delete(_SPACING, a)) for a, f in enumerate(faces))

    inner = _interior(m)
    denoised = ndimage.gaussian_filter(hu, _NOISE_SMOOTH)
    values, soft_values = hu[inner], smooth[inner]
    noise = hu - denoised
    noise_sd = float(noise[inner].std()) if inner.sum() > 1 else 0.0

    # necrosis is a hypodense core: the deepest fifth of the contour against the next two fifths
    by_depth = smooth[m][np.argsort(-ndimage.distance_transform_edt(m, sampling=_SPACING)[m], kind="stable")]
    fifth = max(len(by_depth) // 5, 1)
    ring = by_depth[fifth : 3 * fifth]
    core_rim = float(ring.mean() - by_depth[:fifth].mean()) if len(ring) else 0.0

    region = ndimage.binary_dilation(m, _IN_PLANE, iterations=2) & (smooth > -20.0)
    parts, count = ndimage.label(region)
    if count:
        overlap = np.bincount(parts[m], minlength=count + 1)
        overlap[0] = 0
        seen = parts == int(overlap.argmax())
    else:
        seen = m
    return {
        "contour_short_axis_mm": short_axis_mm(m),
        "contour_equivalent_diameter_mm": float((6.0 * volume / math.pi) ** (1 / 3)),
        "contour_moment_roundness": float(math.sqrt(eig[0] / eig[-1])),
        "contour_axial_roundness": float(math.sqrt(axial[0] / axial[-1])),
        "contour_solidity": _solidity(_corners(m), volume),
        "contour_sphericity": float(math.pi ** (1 / 3) * (6.0 * volume) ** (2 / 3) / area),
        "image_solidity": _solidity(_corners(seen), float(seen.sum()) * voxel_mm3),
        "interior_mean_hu": float(values.mean()),
        "interior_sd_hu": float(values.std()),
        "interior_smooth_sd_hu": float(soft_values.std()),
        "texture_excess_hu": float(math.sqrt(max(values.var() - noise_sd**2, 0.0))),
        "noise_sd_hu": noise_sd,
        "core_rim_drop_hu": core_rim,
        "low_attenuation_fraction": float(((soft_values > -40.0) & (soft_values < 20.0)).mean()),
        "fat_fraction": float((denoised[inner] < -20.0).mean()),
        "interior_p05_hu": float(np.percentile(soft_values, 5)),
        "max_hu": float(denoised[m].max()),
        "bright_fraction": float((denoised[m] > 150.0).mean()),
    }


@dataclass
class MeasuredCohort:
    """What the study keeps of a rendered cohort: measurements, labels and truth, no patches."""

    name: str
    seed: int
    features: np.ndarray  # (N, len(FEATURES))
    label: np.ndarray
    short_axis_mm: np.ndarray  # the generator's true diameter
    bayes_probability: np.ndarray  # with the patient effect
    signs_logit: np.ndarray  # metastasis_logit without the patient effect
    signs: dict[str, np.ndarray]


def measure(name: str, seed: int, n: int, progress: bool = True) -> MeasuredCohort:
    feats, label, short, bayes, signs_logit, signs = [], [], [], [], [], []
    for node in tqdm(rendered_nodes(seed, n), total=n, desc=f"render+measure {name}", disable=not progress):
        f = node_features(node.ct, node.mask)
        feats.append([f[k] for k in FEATURES])
        label.append(node.label)
        short.append(node.short_axis_mm)
        bayes.append(node.bayes_probability)
        signs_logit.append(metastasis_logit(node.signs, 0.0))
        signs.append(node.signs)
    return MeasuredCohort(
        name=name,
        seed=seed,
        features=np.array(feats),
        label=np.array(label),
        short_axis_mm=np.array(short),
        bayes_probability=np.array(bayes),
        signs_logit=np.array(signs_logit),
        signs={
            f.name: np.array([_sign_value(s, f.name) for s in signs]) for f in dataclasses.fields(NodeSigns)
        },
    )


def reader_scores(label: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    return {**binary_metrics(label, score, threshold), "auc": roc_auc(label, score), "threshold": threshold}


@dataclass(frozen=True)
class LabelSimulation:
    """The label model on simulated sign draws: each node's logit with and without the patient
    effect, each sign's term in it, and a label drawn as the generator draws it."""

    seed: int
    logit: np.ndarray
    signs_logit: np.ndarray
    terms: dict[str, np.ndarray]
    label: np.ndarray
    signs: np.ndarray  # (n, 7), NodeSigns.vector() of each node

    def summary(self) -> dict[str, Any]:
        """Each sign's logit SD and the Bayes rule with and without the patient effect (zero-mean and
        symmetric, so without it the rule is still the signs' logit at 0)."""
        return {
            "nodes": len(self.label),
            "seed": self.seed,
            "prevalence": float(self.label.mean()),
            "logit_sd": {
                **{k: float(t.std()) for k, t in self.terms.items()},
                "patient_effect": float((self.logit - self.signs_logit).std()),
            },
            "logit_sd_total": float(self.logit.std()),
            "with_patient_effect": reader_scores(self.label, self.logit, 0.0),
            "signs_only": reader_scores(self.label, self.signs_logit, 0.0),
            "realism": self.realism(),
        }

    def realism(self) -> dict[str, Any]:
        """What issue 14 keeps realistic: the short axis of metastatic and benign nodes (quartiles),
        the 10 mm rule on the true diameter, and how specific necrosis and a fatty hilum are."""
        short = self.signs[:, SIGN_NAMES.index("short_axis_mm")]
        met = self.label == 1
        rule = binary_metrics(self.label, short, 10.0)
        out: dict[str, Any] = {
            "short_axis_quartiles_mm": {
                "metastatic": [float(q) for q in np.percentile(short[met], [25, 50, 75])],
                "benign": [float(q) for q in np.percentile(short[~met], [25, 50, 75])],
            },
            "size_rule_true_diameter": {k: rule[k] for k in ("sensitivity", "specificity")},
        }
        for sign in ("necrosis", "fatty_hilum"):
            present = self.signs[:, SIGN_NAMES.index(sign)] > 0
            out[sign] = {
                "in_metastatic": float(present[met].mean()),
                "in_benign": float(present[~met].mean()),
                "p_metastatic_if_present": float(met[present].mean()),
            }
        return out

    def without(self, unknown: list[str]) -> dict[str, Any]:
        """The signs-only ceiling when the `unknown` signs are not seen (held at their median): the
        best threshold is fitted on one half of the simulation and scored on the other."""
        score = self.signs_logit - sum((self.terms[k] for k in unknown), np.zeros_like(self.signs_logit))
        half = len(score) // 2
        threshold = accuracy_threshold(self.label[:half], score[:half])
        return {**reader_scores(self.label[half:], score[half:], threshold), "unknown_signs": unknown}


def simulate_label_model(n: int, seed: int, progress: bool = True) -> LabelSimulation:
    """The generator's sign draws and patient effects for n nodes, no rendering.

    A sign's term is the change of `metastasis_logit` when that sign alone is held at its median:
    for the generator's additive logit that is its weight times the sign, up to a constant, so its
    SD over nodes is the sign's share of the label's spread. Fields whose term is constant do not
    enter the logit and are left out.
    """
    drawn: list[tuple[NodeSigns, float]] = []
    with tqdm(total=n, desc="label model", disable=not progress) as bar:
        for _pid, patient, rngs in _patients(seed, n):
            drawn += [(_draw_signs(rng), patient["effect"]) for rng in rngs]
            bar.update(len(rngs))
    logit = np.array([metastasis_logit(s, e) for s, e in drawn])
    signs_logit = np.array([metastasis_logit(s, 0.0) for s, _ in drawn])
    terms = {}
    for f in tqdm(dataclasses.fields(NodeSigns), desc="sign terms", disable=not progress):
        held = type(getattr(drawn[0][0], f.name))(np.median([_sign_value(s, f.name) for s, _ in drawn]))
        held_logit = [metastasis_logit(dataclasses.replace(s, **{f.name: held}), 0.0) for s, _ in drawn]
        term = signs_logit - np.array(held_logit)
        if term.std() > 0:
            terms[f.name] = term
    label = np.random.default_rng([GENERATOR_VERSION, seed]).random(len(logit)) < sigmoid(logit)
    signs = np.stack([s.vector() for s, _ in drawn])
    return LabelSimulation(seed, logit, signs_logit, terms, label.astype(np.int64), signs)


def visibility(logit_sd: dict[str, float], cohorts: list[MeasuredCohort]) -> dict[str, Any]:
    """Per sign: its logit SD, the best of its measurements (|r| over all rendered nodes), a flag."""
    feats = np.concatenate([c.features for c in cohorts])
    correlations: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    for sign, sd in logit_sd.items():
        if sign == "patient_effect":
            continue
        value = np.concatenate([c.signs[sign] for c in cohorts])
        correlations[sign] = {  # 0 where the sign or the measurement is constant (a tiny cohort)
            k: float(np.corrcoef(value, feats[:, i])[0, 1]) if feats[:, i].std() * value.std() > 0 else 0.0
            for i, k in enumerate(FEATURES)
        }
        best = max(SIGN_MEASUREMENTS[sign], key=lambda k: abs(correlations[sign][k]))
        r = correlations[sign][best]
        rows.append(
            {
                "sign": sign,
                "logit_sd": sd,
                "measurement": best,
                "r": r,
                "flagged": sd >= HEAVY_LOGIT_SD and abs(r) < VISIBLE_R,
            }
        )
    rows.sort(key=lambda row: -row["logit_sd"])
    return {
        "nodes": len(feats),
        "cohorts": [f"{c.name} (seed {c.seed}, {len(c.label)} nodes)" for c in cohorts],
        "signs": rows,
        "correlations": correlations,
    }


Reader = Callable[[MeasuredCohort], np.ndarray]


def radiomics_reader(train: MeasuredCohort, val: MeasuredCohort) -> tuple[Any, Reader, float]:
    """Standardised hand features, logistic regression on `train`, threshold for accuracy on `val`."""
    mean, std = train.features.mean(0), train.features.std(0) + 1e-12
    fit = sklearn_linear.LogisticRegression(max_iter=5000).fit((train.features - mean) / std, train.label)

    def prob(c: MeasuredCohort) -> np.ndarray:
        return fit.predict_proba((c.features - mean) / std)[:, 1]

    return fit, prob, accuracy_threshold(val.label, prob(val))


def readers(c: MeasuredCohort, prob: Reader, threshold: float) -> dict[str, dict[str, float]]:
    """Every reader of issue 14's item 2 on one cohort."""
    return {
        "label model, with patient effect": reader_scores(c.label, c.bayes_probability, 0.5),
        "label model, signs only": reader_scores(c.label, c.signs_logit, 0.0),
        "radiomics reader": reader_scores(c.label, prob(c), threshold),
        "size rule, contour": reader_scores(
            c.label, c.features[:, FEATURES.index("contour_short_axis_mm")], 10.0
        ),
        "size rule, true diameter": reader_scores(c.label, c.short_axis_mm, 10.0),
    }


def study(
    train_nodes: int = 1000,
    sim_nodes: int = 200_000,
    seed: int = 14_014,
    fresh_seed: int = FRESH_SEED,
    fresh_nodes: int = FRESH_NODES,
    val_nodes: int | None = None,
    test_nodes: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole study: label-model simulation (`sim_nodes` from `seed`), rendered cohorts (the
    first `train_nodes` of `train`, `val` and `test` whole unless given), visibility, ceilings."""
    simulation = simulate_label_model(sim_nodes, seed, progress)
    label_model = simulation.summary()
    cohorts = {
        "train": measure("train", SPLITS["train"][0], train_nodes, progress),
        "val": measure("val", SPLITS["val"][0], val_nodes or SPLITS["val"][1], progress),
        "test": measure("test", SPLITS["test"][0], test_nodes or SPLITS["test"][1], progress),
        "fresh": measure("fresh", fresh_seed, fresh_nodes, progress),
    }
    vis = visibility(label_model["logit_sd"], list(cohorts.values()))
    label_model["visible_signs_only"] = simulation.without(
        [row["sign"] for row in vis["signs"] if row["flagged"]]
    )
    fit, prob, threshold = radiomics_reader(cohorts["train"], cohorts["val"])
    interior = np.concatenate([c.features[:, FEATURES.index("interior_mean_hu")] for c in cohorts.values()])
    return {
        "generator_version": GENERATOR_VERSION,
        "interior_hu": [float(q) for q in np.percentile(interior, [5, 50, 95])],
        "label_model": label_model,
        "visibility": vis,
        "reader": {
            "features": list(FEATURES),
            "coefficients": dict(zip(FEATURES, map(float, fit.coef_[0]), strict=True)),
            "train_nodes": len(cohorts["train"].label),
            "val_nodes": len(cohorts["val"].label),
            "threshold": threshold,
            "threshold_rule": "accuracy on val",
        },
        "ceilings": {
            f"{c.name} (seed {c.seed}, {len(c.label)} nodes)": readers(c, prob, threshold)
            for c in (cohorts["test"], cohorts["fresh"])
        },
    }


def _row(name: str, m: dict[str, float]) -> str:
    return (
        f"| {name} | {m['accuracy']:.3f} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['auc']:.3f} |"
    )


_HEADER = "| reader | accuracy | sensitivity | specificity | AUC |\n| --- | --- | --- | --- | --- |"


def markdown(report: dict[str, Any], command: str) -> str:
    """The report's tables, as docs/cohort.md shows them."""
    lm, vis, reader = report["label_model"], report["visibility"], report["reader"]
    lines = [
        f"Generator version {report['generator_version']}; reproduce with `{command}`.",
        "",
        f"**Visibility.** Logit SD: the SD of each sign's term in `metastasis_logit` over {lm['nodes']:,} "
        f"simulated nodes (seed {lm['seed']}; the whole logit has SD {lm['logit_sd_total']:.2f}). r: Pearson "
        f"correlation of the sign with the best of its measurements on the noisy patch and the input "
        f"contour, over {vis['nodes']:,} rendered nodes ({'; '.join(vis['cohorts'])}). Flagged: logit SD "
        f">= {HEAVY_LOGIT_SD:g} and |r| < {VISIBLE_R:g}.",
        "",
        "| sign | logit SD | best measurement | r | flagged |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in vis["signs"]:
        flag = "**yes**" if row["flagged"] else "no"
        lines.append(
            f"| {row['sign']} | {row['logit_sd']:.2f} | {row['measurement']} | {row['r']:+.2f} | {flag} |"
        )
    lines.append(f"| patient effect | {lm['logit_sd']['patient_effect']:.2f} | none (not in the image) | | |")
    unknown = lm["visible_signs_only"]["unknown_signs"]
    lines += [
        "",
        f"**Label-model ceilings** on the simulation (prevalence {lm['prevalence']:.3f}): the Bayes rule "
        "with every sign and the patient effect known; with the signs only (the patient effect is "
        "zero-mean and symmetric, so the rule is still the logit at 0); with the flagged signs unknown "
        "too (set to their median; threshold for accuracy on one half of the simulation, scored on "
        "the other).",
        "",
        _HEADER,
        _row("label model, with patient effect", lm["with_patient_effect"]),
        _row("label model, signs only", lm["signs_only"]),
        *(
            [_row(f"label model, signs only without {', '.join(unknown)}", lm["visible_signs_only"])]
            if unknown
            else []
        ),
        "",
        f"**Readers.** Radiomics reader: logistic regression (scikit-learn) on the {len(reader['features'])} "
        f"standardised measurements above, fitted on the first {reader['train_nodes']} `train` nodes, "
        f"threshold {reader['threshold']:.3f} for accuracy on `val` ({reader['val_nodes']} nodes). Size "
        "rule: short axis >= 10 mm, on the input contour and on the generator's true diameter. The "
        "label-model rows use the generator's own logit of each node.",
    ]
    for name, rows in report["ceilings"].items():
        lines += ["", f"{name}:", "", _HEADER, *(_row(k, m) for k, m in rows.items())]
    real, hu = lm["realism"], report["interior_hu"]
    rule = real["size_rule_true_diameter"]
    quartiles = {k: f"{q[1]:.1f} ({q[0]:.1f}-{q[2]:.1f})" for k, q in real["short_axis_quartiles_mm"].items()}
    contour_auc = " / ".join(
        f"{rows['size rule, contour']['auc']:.3f}" for rows in report["ceilings"].values()
    )
    lines += [
        "",
        f"**Realism** (the simulation's {lm['nodes']:,} nodes unless stated):",
        "",
        "| figure | value | kept at |",
        "| --- | --- | --- |",
        f"| prevalence | {lm['prevalence']:.3f} | 30-45% |",
        f"| short axis, metastatic: median (quartiles), mm | {quartiles['metastatic']} | above benign |",
        f"| short axis, benign | {quartiles['benign']} | median about 7-8 mm |",
        "| 10 mm rule on the true diameter: sensitivity / specificity | "
        f"{rule['sensitivity']:.2f} / {rule['specificity']:.2f} | about 0.5 / 0.8 |",
        f"| size rule on the contour: AUC ({' / '.join(report['ceilings'])}) | {contour_auc} | below 0.75 |",
        "| necrosis in metastatic / benign nodes; P(metastatic if necrotic) | "
        f"{real['necrosis']['in_metastatic']:.1%} / {real['necrosis']['in_benign']:.1%}; "
        f"{real['necrosis']['p_metastatic_if_present']:.2f} | a specific sign |",
        "| fatty hilum in metastatic / benign nodes; P(metastatic if present) | "
        f"{real['fatty_hilum']['in_metastatic']:.1%} / {real['fatty_hilum']['in_benign']:.1%}; "
        f"{real['fatty_hilum']['p_metastatic_if_present']:.2f} | a benign sign |",
        "| node interior HU (rendered nodes): median (5th-95th percentile) | "
        f"{hu[1]:.0f} ({hu[0]:.0f} to {hu[2]:.0f}) | soft tissue, lower with necrosis or fat |",
    ]
    return "\n".join(textwrap.fill(line, 100) if line.startswith("**") else line for line in lines) + "\n"


def write_report(out_dir: str | Path, report: dict[str, Any], command: str) -> dict[str, Path]:
    """cohort_study.json and cohort_study.md in `out_dir`, each written atomically."""
    out = Path(out_dir)
    paths = {"json": out / "cohort_study.json", "md": out / "cohort_study.md"}
    write_json(paths["json"], {**report, "command": command})
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(markdown(report, command), encoding="utf-8")
    return paths
