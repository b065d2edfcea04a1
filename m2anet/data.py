"""Synthetic mediastinal CT lymph-node cohort: deterministic, seeded, patient-grouped.

No real esophageal lymph-node data can be shipped, so every weight, calibration set, parity
check and benchmark in this project runs on patches drawn here. Clinical basis of the
parameters (see docs/cohort.md for the table):

* Background: mediastinal fat (-100 HU) with slow texture, soft-tissue structures (muscle,
  pleura; 30-60 HU), an esophagus-like tube (3 mm wall at ~40 HU, air or fluid lumen),
  contrast-enhanced vessels (150-250 HU, portal-venous/arterial phase), occasional
  calcification (400-900 HU), lung at the patch edge in some patches (-850 HU).
* Nodes: irregular ellipsoids at ~40 HU. Signs of metastasis follow the radiology literature
  on oesophageal cancer staging: short-axis diameter (the clinical rule is >= 10 mm),
  roundness (short/long axis ratio > 0.7 is suspicious), central necrosis (hypodense core),
  heterogeneous enhancement and an irregular margin; benign nodes tend to be small, oval,
  homogeneous, sometimes with a fatty hilum.
* The label is drawn from a logistic model of these signs plus a per-patient effect (stage),
  so even a perfect reader is right only ~85-92% of the time (`bayes_probability`).
* Image formation: soft edges (partial volume at 3.0 x 0.8 x 0.8 mm), Gaussian blur (PSF),
  correlated noise with a per-patient sigma of 15-25 HU.
* The input contour is the true node mask with delineation noise (one-voxel erosion or
  dilation, a small shift), which the soft mask expansion is meant to absorb.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from m2anet.contract import HU_WINDOW, PATCH_SHAPE, PATCH_SPACING_MM, hu_scale

if TYPE_CHECKING:
    import SimpleITK as sitk

GENERATOR_VERSION = 3

# How strongly the signs are rendered (version 3: each sign a reader can measure at r >= 0.75 where nothing
# else covers it; docs/cohort.md has the table)
HETEROGENEITY_SPLIT_HU = 30.0  # x heterogeneity: the hypo-enhancing side's drop (tanh across the node)
HETEROGENEITY_MOTTLE_HU = 100.0  # x heterogeneity: SD of the mottled texture
NECROSIS_RIM_HU = 40.0  # the enhancing rim around a necrotic core of -5..15 HU
HILUM_RADIUS = 0.9  # of the short semi-axis: the fatty hilum's radius
LOBULATION, LOBES = 0.3, 6.0  # x irregularity: the margin's lobes (radius fraction) and their frequency

SPLITS: dict[str, tuple[int, int]] = {
    # name: (seed, nodes); test has the paper's 577 nodes
    "train": (1001, 2000),
    "calib": (2002, 256),
    "val": (3003, 320),
    "test": (4004, 577),
}
FRESH_SEED, FRESH_NODES = 9090, 600
"""The fresh cohort of issue 14's goals: a seed no split and no training run uses, 600 nodes."""


@dataclass(frozen=True)
class Cohort:
    """Arrays of one split; `ct` is model input ([0, 1]), `mask` the noisy input contour."""

    ct: np.ndarray  # float32 (N, 1, 16, 64, 64)
    mask: np.ndarray  # float32 (N, 1, 16, 64, 64), {0, 1}
    seg: np.ndarray  # float32 (N, 1, 16, 64, 64), true node mask
    label: np.ndarray  # int64 (N,), 1 = metastatic
    patient_id: np.ndarray  # str (N,)
    node_id: np.ndarray  # str (N,)
    short_axis_mm: np.ndarray  # float32 (N,), for the clinical size rule
    bayes_probability: np.ndarray  # float32 (N,), P(metastatic | signs, patient)
    signs: np.ndarray  # float32 (N, 7), the node's signs in SIGN_NAMES order: training's auxiliary targets

    def __len__(self) -> int:
        return len(self.label)

    def sha256(self) -> str:
        """Content hash: what a calibration or a parity check was run on."""
        h = hashlib.sha256()
        for f in fields(self):
            h.update(np.ascontiguousarray(getattr(self, f.name)).tobytes())
        return h.hexdigest()


SIGN_NAMES = (
    "short_axis_mm",
    "roundness",
    "necrosis",
    "heterogeneity",
    "irregularity",
    "fatty_hilum",
    "calcified",
)


@dataclass(frozen=True)
class NodeSigns:
    short_axis_mm: float
    roundness: float  # short / long axis
    necrosis: float  # fraction of the radius that is necrotic core, 0 = none
    heterogeneity: float  # 0..1
    irregularity: float  # 0..1, margin
    fatty_hilum: bool
    calcified: bool

    def vector(self) -> np.ndarray:
        """The signs in SIGN_NAMES order; necrosis as present (1) or not (0), as the label reads it."""
        return np.array(
            [float(getattr(self, k) > 0 if k == "necrosis" else getattr(self, k)) for k in SIGN_NAMES],
            np.float32,
        )


def hu_to_input(hu: np.ndarray) -> np.ndarray:
    return hu_scale(np.clip(hu, *HU_WINDOW)).astype(np.float32)


def _draw_signs(rng: np.random.Generator) -> NodeSigns:
    short = float(np.clip(rng.lognormal(np.log(8.0), 0.38), 3.5, 28.0))
    roundness = float(np.clip(rng.beta(4.0, 2.2), 0.35, 1.0))
    p_necrosis = 0.35 / (1.0 + np.exp(-(short - 12.0) / 2.5))
    necrosis = float(rng.uniform(0.55, 0.8)) if rng.random() < p_necrosis else 0.0
    return NodeSigns(
        short_axis_mm=short,
        roundness=roundness,
        necrosis=necrosis,
        heterogeneity=float(rng.beta(1.6, 2.6)),
        irregularity=float(rng.beta(1.6, 2.8)),
        fatty_hilum=bool(rng.random() < 0.3),
        calcified=bool(rng.random() < 0.06),
    )


def metastasis_logit(s: NodeSigns, patient_effect: float) -> float:
    """The label model: how strongly each radiological sign argues for metastasis."""
    return 1.2 * (
        -0.7
        + 0.85 * (s.short_axis_mm - 9.0) / 2.5
        + 1.4 * (s.roundness - 0.65) / 0.15
        + (2.7 if s.necrosis > 0 else 0.0)
        + 0.75 * (s.heterogeneity - 0.38) / 0.2
        + 0.75 * (s.irregularity - 0.36) / 0.2
        - (1.7 if s.fatty_hilum else 0.0)
        - (1.5 if s.calcified else 0.0)
        + patient_effect
    )


def _grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Physical coordinates (mm) of voxel centres, origin at the volume centre."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * sp for n, sp in zip(shape, spacing, strict=True)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _axial_rotation(rng: np.random.Generator) -> np.ndarray:
    """Columns: the world (z, y, x) directions of the node's long, craniocaudal and short axes. The long
    and short axes lie in the axial plane at a random angle, tilted a little, because roundness and the
    short axis are read on axial slices."""
    a = rng.uniform(0.0, np.pi)
    axes = np.array([[0.0, np.cos(a), np.sin(a)], [1.0, 0.0, 0.0], [0.0, np.sin(a), -np.cos(a)]]).T
    return Rotation.from_rotvec(rng.normal(scale=0.1, size=3)).as_matrix() @ axes


def _soft(signed_distance: np.ndarray, width: float = 0.6) -> np.ndarray:
    """Partial-volume occupancy from a signed distance in mm (negative inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / width, -30, 30)))


@dataclass(frozen=True)
class NodeShape:
    center: np.ndarray  # (z, y, x) mm
    semi_axes: np.ndarray  # mm
    rotation: np.ndarray
    harmonics: np.ndarray  # (k, 4): direction (3) and amplitude for the irregular margin


def _node_shape(rng: np.random.Generator, s: NodeSigns, center: np.ndarray) -> NodeShape:
    short = s.short_axis_mm / 2.0
    long = short / s.roundness
    mid = short + rng.uniform(0.2, 0.8) * (long - short)
    dirs = rng.normal(size=(6, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = rng.uniform(0.5, 1.0, size=(6, 1)) * (0.02 + LOBULATION * s.irregularity)
    return NodeShape(
        center=center,
        semi_axes=np.array([long, mid, short]),
        rotation=_axial_rotation(rng),
        harmonics=np.concatenate([dirs, amps], axis=1),
    )


def _node_distance(shape: NodeShape, zz, yy, xx) -> tuple[np.ndarray, np.ndarray]:
    """Approximate signed distance (mm) to the irregular ellipsoid, and normalised radius."""
    d = np.stack(np.broadcast_arrays(zz - shape.center[0], yy - shape.center[1], xx - shape.center[2]))
    local = np.tensordot(shape.rotation.T, d, axes=1)
    rho = np.sqrt(sum((local[i] / shape.semi_axes[i]) ** 2 for i in range(3))) + 1e-6
    unit = local / (rho * shape.semi_axes.reshape(3, 1, 1, 1) + 1e-6)
    unit /= np.linalg.norm(unit, axis=0, keepdims=True) + 1e-6
    bump = sum(
        h[3] * np.cos(LOBES * np.tensordot(h[:3], unit, axes=1) + i) for i, h in enumerate(shape.harmonics)
    )
    r_eff = 1.0 + bump
    return (rho - r_eff) * shape.semi_axes.min(), rho / r_eff


def _render_node(
    hu: np.ndarray, rng: np.random.Generator, s: NodeSigns, shape: NodeShape, grid
) -> np.ndarray:
    """Paint a node into `hu` in place; returns its occupancy (0..1)."""
    dist, rho = _node_distance(shape, *grid)
    occ = _soft(dist)
    # heterogeneous enhancement: a hypo-enhancing part of the node (a soft split along a random
    # direction) plus mottled texture coarser than the scanner's noise, both scaled by the sign
    split_dir = rng.normal(size=3)
    split_dir /= np.linalg.norm(split_dir)
    along = sum(split_dir[i] * (grid[i] - shape.center[i]) for i in range(3)) / shape.semi_axes.min()
    patches = ndimage.gaussian_filter(rng.normal(size=hu.shape), (0.5, 1.3, 1.3))
    tissue = rng.uniform(40.0, 60.0) + s.heterogeneity * (
        HETEROGENEITY_SPLIT_HU * np.tanh(3.0 * along) + HETEROGENEITY_MOTTLE_HU * patches / patches.std()
    )
    if s.necrosis > 0:  # a near-water core inside an enhancing rim
        core = _soft((rho - s.necrosis) * 4.0, 0.5)
        tissue = tissue + NECROSIS_RIM_HU * (1.0 - core) + (rng.uniform(-5.0, 15.0) - tissue) * core
    if s.fatty_hilum:
        hilum_dir = rng.normal(size=3)
        hilum_dir /= np.linalg.norm(hilum_dir)
        hc = shape.center + hilum_dir * shape.semi_axes.min() * 0.55
        hd = np.sqrt((grid[0] - hc[0]) ** 2 + (grid[1] - hc[1]) ** 2 + (grid[2] - hc[2]) ** 2)
        tissue = tissue + (-90.0 - tissue) * _soft(hd - shape.semi_axes.min() * HILUM_RADIUS) * occ
    if s.calcified:
        cc = shape.center + rng.normal(size=3) * shape.semi_axes.min() * 0.3
        cd = np.sqrt((grid[0] - cc[0]) ** 2 + (grid[1] - cc[1]) ** 2 + (grid[2] - cc[2]) ** 2)
        tissue = tissue + rng.uniform(400.0, 800.0) * _soft(cd - rng.uniform(0.8, 1.6))
    hu += (tissue - hu) * occ
    return occ


def _tube(grid, rng: np.random.Generator, center_yx: np.ndarray, radius: float) -> np.ndarray:
    """Distance (mm) to the axis of a roughly craniocaudal tube, minus its radius."""
    tilt = rng.normal(scale=0.15, size=2)
    cy = center_yx[0] + tilt[0] * grid[0]
    cx = center_yx[1] + tilt[1] * grid[0]
    return np.sqrt((grid[1] - cy) ** 2 + (grid[2] - cx) ** 2) - radius


def _background(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    grid,
    keep_out: np.ndarray,
    vessel_hu: float,
) -> np.ndarray:
    """Mediastinal scene; structures avoid the `keep_out` point (the target node, mm)."""
    extent = np.array([n * sp for n, sp in zip(shape, PATCH_SPACING_MM, strict=True)])
    hu = -100.0 + 12.0 * ndimage.gaussian_filter(rng.normal(size=shape), (1.0, 6.0, 6.0)) / 0.03

    def place(min_dist: float) -> np.ndarray:
        for _ in range(50):
            p = rng.uniform(-0.5, 0.5, size=2) * extent[1:]
            if np.linalg.norm(p - keep_out[1:]) > min_dist:
                return p
        return keep_out[1:] + min_dist

    if rng.random() < 0.35:  # lung at one side of the patch
        normal = rng.normal(size=2)
        normal /= np.linalg.norm(normal)
        d = normal[0] * grid[1] + normal[1] * grid[2] - rng.uniform(0.32, 0.45) * extent[1]
        hu += (-850.0 - hu) * _soft(-d, 1.0)
        hu += (45.0 - hu) * _soft(np.abs(d) - 0.8, 0.4)  # pleura
    for _ in range(rng.integers(1, 3)):  # muscle / soft-tissue bands
        c = place(16.0)
        d = _tube(grid, rng, c, rng.uniform(3.0, 7.0))
        hu += (rng.uniform(30.0, 60.0) - hu) * _soft(d)
    if rng.random() < 0.85:  # esophagus: wall plus air or fluid lumen
        r = rng.uniform(7.0, 10.0)
        axis = _tube(grid, rng, place(r + 12.0), 0.0)
        hu += (rng.uniform(35.0, 50.0) - hu) * _soft(axis - r)
        lumen = -1000.0 if rng.random() < 0.6 else rng.uniform(0.0, 20.0)
        hu += (lumen - hu) * _soft(axis - (r - 3.0) * rng.uniform(0.3, 0.9))
    for _ in range(rng.integers(1, 4)):  # contrast-enhanced vessels
        r = rng.uniform(2.0, 12.0)
        d = _tube(grid, rng, place(r + 8.0), r)
        hu += (vessel_hu + rng.normal(0.0, 15.0) - hu) * _soft(d)
        if rng.random() < 0.12:  # calcified plaque in the wall
            hu += rng.uniform(300.0, 600.0) * _soft(np.abs(d) - 0.8) * (rng.random(shape) < 0.02)
    return hu


def _node_position(rng: np.random.Generator, jitter_mm: tuple[float, float, float]) -> np.ndarray:
    return rng.normal(scale=jitter_mm)


def _image_formation(hu: np.ndarray, rng: np.random.Generator, noise_sigma: float) -> np.ndarray:
    hu = ndimage.gaussian_filter(hu, (0.35, 0.6, 0.6))
    noise = ndimage.gaussian_filter(rng.normal(size=hu.shape), (0.3, 0.7, 0.7))
    return hu + noise * (noise_sigma / noise.std())


def _contour_noise(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Delineation error: one-voxel in-plane erosion or dilation and a small in-plane shift."""
    mask = seg.astype(bool)
    footprint = np.zeros((1, 3, 3), bool)
    footprint[0, 1, :] = footprint[0, :, 1] = True
    op = rng.choice(3, p=[0.4, 0.3, 0.3])
    if op == 1:
        eroded = ndimage.binary_erosion(mask, footprint)
        mask = eroded if eroded.sum() >= 0.5 * mask.sum() else mask
    elif op == 2:
        mask = ndimage.binary_dilation(mask, footprint)
    shift = rng.integers(-1, 2, size=2) * (rng.random(2) < 0.3)
    mask = np.roll(mask, tuple(int(v) for v in shift), axis=(1, 2))
    return mask.astype(np.float32)


def _patch(rng: np.random.Generator, patient: dict) -> dict:
    signs = _draw_signs(rng)
    grid = _grid(PATCH_SHAPE, PATCH_SPACING_MM)
    center = _node_position(rng, (1.5, 2.0, 2.0))
    hu = _background(rng, PATCH_SHAPE, grid, center, patient["vessel_hu"])
    for _ in range(rng.integers(0, 3)):  # distractor nodes: in the CT, not in the mask
        ds = _draw_signs(rng)
        direction = rng.normal(size=3) * np.array([0.4, 1.0, 1.0])
        direction /= np.linalg.norm(direction)
        dist = signs.short_axis_mm / signs.roundness / 2 + ds.short_axis_mm / ds.roundness / 2 + 4.0
        _render_node(hu, rng, ds, _node_shape(rng, ds, center + direction * dist), grid)
    occ = _render_node(hu, rng, signs, _node_shape(rng, signs, center), grid)
    seg = (occ > 0.5).astype(np.float32)
    if seg.sum() == 0:  # a node smaller than a voxel still gets its centre voxel
        seg[tuple(n // 2 for n in PATCH_SHAPE)] = 1.0
    hu = _image_formation(hu, rng, patient["noise_sigma"])
    logit = metastasis_logit(signs, patient["effect"])
    p = 1.0 / (1.0 + np.exp(-logit))
    return {
        "ct": hu_to_input(hu)[None],
        "seg": seg[None],
        "mask": _contour_noise(seg, rng)[None],
        "label": int(rng.random() < p),
        "short_axis_mm": signs.short_axis_mm,
        "bayes_probability": p,
        "signs": signs.vector(),
    }


def _patients(seed: int, n_nodes: int):
    """Yield (patient_id, patient, node_rngs), stopping after n_nodes nodes in all."""
    root = np.random.SeedSequence([GENERATOR_VERSION, seed])
    made, index = 0, 0
    while made < n_nodes:
        ps = root.spawn(1)[0]
        rng = np.random.default_rng(ps)
        n = min(int(rng.integers(2, 7)), n_nodes - made)
        patient = {
            "effect": float(rng.normal(0.0, 0.6)),
            "noise_sigma": float(rng.uniform(15.0, 25.0)),
            "vessel_hu": float(rng.uniform(150.0, 250.0)),
        }
        yield (
            f"s{seed}-p{index:04d}",
            patient,
            [np.random.default_rng(c) for c in ps.spawn(n)],
        )
        made += n
        index += 1


PARALLEL_FROM = 256
"""Cohorts of at least this many nodes are drawn in worker processes, one per available CPU (at most
MAX_WORKERS): about 18 nodes/s per core, so 20,000 training nodes take 19 minutes on one core and
about 1.2 minutes on a 16-core GPU host."""
MAX_WORKERS = 16


def _patient_rows(item: tuple[str, dict, list[np.random.Generator]]) -> list[dict]:
    pid, patient, rngs = item
    return [
        {**_patch(rng, patient), "patient_id": pid, "node_id": f"{pid}-n{k}"} for k, rng in enumerate(rngs)
    ]


def _workers(n: int) -> int:
    return 1 if n < PARALLEL_FROM else min(len(os.sched_getaffinity(0)), MAX_WORKERS)


def load_split(
    name: str, n: int | None = None, seed: int | None = None, workers: int | None = None
) -> Cohort:
    """A fixed split ('train', 'calib', 'val', 'test') or, with another seed, a fresh cohort.

    The first n nodes of a split are the same whatever n is, so small tests see a prefix of
    exactly what training and evaluation see. Every node draws from its own generator, spawned in
    order in this process, so `workers` (default: one per CPU from PARALLEL_FROM nodes on) changes
    how fast the cohort is drawn, never what is drawn.
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
    split_seed, size = SPLITS[name]
    n = size if n is None else n
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    patients = _patients(split_seed if seed is None else seed, n)
    workers = _workers(n) if workers is None else workers
    if workers > 1:  # spawned, not forked: the caller may hold torch's threads, which fork does not copy
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            groups = list(pool.map(_patient_rows, patients, chunksize=4))
    else:
        groups = [_patient_rows(p) for p in patients]
    rows = [row for group in groups for row in group]
    return Cohort(
        ct=np.stack([r["ct"] for r in rows]),
        mask=np.stack([r["mask"] for r in rows]),
        seg=np.stack([r["seg"] for r in rows]),
        label=np.array([r["label"] for r in rows], np.int64),
        patient_id=np.array([r["patient_id"] for r in rows]),
        node_id=np.array([r["node_id"] for r in rows]),
        short_axis_mm=np.array([r["short_axis_mm"] for r in rows], np.float32),
        bayes_probability=np.array([r["bayes_probability"] for r in rows], np.float32),
        signs=np.stack([r["signs"] for r in rows]),
    )


STUDY_SHAPE = (48, 256, 256)


def _mediastinum(rng: np.random.Generator, grid, shape: tuple[int, ...]) -> tuple[np.ndarray, list]:
    """A chest-like slab: lungs, spine, aorta, pulmonary trunk, trachea, esophagus in fat.

    Returns the HU volume and the tubes nodes must keep clear of, as (y, x, radius) in mm.
    """
    _z, y, x = grid
    hu = -100.0 + 12.0 * ndimage.gaussian_filter(rng.normal(size=shape), (1.0, 6.0, 6.0)) / 0.03
    for side in (-1, 1):  # lungs with their pleura
        d = np.sqrt(((y - 5.0) / 85.0) ** 2 + ((x - side * 72.0) / 42.0) ** 2) - 1.0
        hu += (-850.0 - hu) * _soft(d * 40.0, 1.0)
    spine = np.sqrt((y - 68.0) ** 2 + x**2) - 17.0
    hu += (rng.uniform(250.0, 350.0) - hu) * _soft(spine)
    hu += (rng.uniform(600.0, 900.0) - hu) * _soft(np.abs(spine) - 1.5)
    vessel_hu = rng.uniform(150.0, 250.0)
    tubes = [(38.0, 24.0, 12.0, vessel_hu), (-42.0, 12.0, 14.0, vessel_hu), (-48.0, -14.0, 10.0, 60.0)]
    for ty, tx, r, value in tubes:  # descending aorta, pulmonary trunk, superior vena cava
        hu += (value + rng.normal(0.0, 10.0) - hu) * _soft(np.sqrt((y - ty) ** 2 + (x - tx) ** 2) - r)
    for ty, tx, r, lumen_r in ((-8.0, 0.0, 9.0, 7.5), (32.0, -6.0, 9.0, 3.0)):  # trachea, esophagus
        axis = np.sqrt((y - ty) ** 2 + (x - tx) ** 2)
        hu += (40.0 - hu) * _soft(axis - r)
        hu += (-1000.0 - hu) * _soft(axis - lumen_r)
        tubes.append((ty, tx, r, 0.0))
    return hu, [(ty, tx, r) for ty, tx, r, *_ in tubes]


def make_study(seed: int = 0, n_nodes: int = 6, shape: tuple[int, int, int] = STUDY_SHAPE):
    """A whole-study CT (HU, int16) and node label map (uint16, 1..n) as SimpleITK images.

    Spacing (x, y, z) = (0.8, 0.8, 3.0) mm, identity direction, origin at the first voxel.
    Returns (ct_image, label_image, truth) where truth has one dict per node: label,
    centroid in mm (patient coordinates), volume in mm3, short-axis diameter, metastatic.
    """
    import SimpleITK as sitk

    rng = np.random.default_rng(np.random.SeedSequence([GENERATOR_VERSION, 90_000 + seed]))
    spacing = PATCH_SPACING_MM
    grid = _grid(shape, spacing)
    hu, tubes = _mediastinum(rng, grid, shape)
    labels = np.zeros(shape, np.uint16)
    extent = np.array(shape) * np.array(spacing) / 2
    placed: list[tuple[np.ndarray, float]] = []
    nodes: list[dict[str, float]] = []
    misses = 0
    while len(nodes) < n_nodes:
        if misses == 100_000:
            raise ValueError(
                f"only {len(nodes)} of {n_nodes} nodes fit in a study of shape {shape}: add slices"
            )
        signs = _draw_signs(rng)
        reach = signs.short_axis_mm / signs.roundness / 2 + 2.0
        center = rng.uniform([-extent[0] + 3 * reach, -50.0, -32.0], [extent[0] - 3 * reach, 48.0, 32.0])
        if any(np.hypot(center[1] - ty, center[2] - tx) < r + reach for ty, tx, r in tubes) or any(
            np.linalg.norm(center - c) < reach + rc for c, rc in placed
        ):
            misses += 1
            continue
        misses = 0
        placed.append((center, reach))
        lo = np.maximum(((center - reach - 3) / spacing + (np.array(shape) - 1) / 2).astype(int), 0)
        hi = np.minimum(((center + reach + 3) / spacing + (np.array(shape) - 1) / 2).astype(int) + 2, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        sub = [g[tuple(box[i] if g.shape[i] > 1 else slice(None) for i in range(3))] for g in grid]
        node_hu = hu[box].copy()
        occ = _render_node(node_hu, rng, signs, _node_shape(rng, signs, center), sub)
        hu[box] = node_hu
        labels[box][occ > 0.5] = len(nodes) + 1
        p = 1.0 / (1.0 + np.exp(-metastasis_logit(signs, 0.0)))
        nodes.append({"short_axis_mm": signs.short_axis_mm, "metastatic": int(rng.random() < p)})
    hu = _image_formation(hu, rng, rng.uniform(15.0, 25.0))

    def image(array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array)  # numpy (z, y, x) -> ITK (x, y, z)
        img.SetSpacing(spacing[::-1])
        return img

    ct_img, label_img = image(np.clip(np.round(hu), -1024, 3071).astype(np.int16)), image(labels)
    voxel_mm3 = float(np.prod(spacing))
    truth = []
    for k, node in enumerate(nodes, start=1):
        idx = np.argwhere(labels == k)
        centre_index = idx.mean(axis=0)[::-1]  # (x, y, z) continuous index
        truth.append(
            {
                "label": k,
                "centroid_mm": list(ct_img.TransformContinuousIndexToPhysicalPoint(centre_index.tolist())),
                "volume_mm3": len(idx) * voxel_mm3,
                **node,
            }
        )
    return ct_img, label_img, truth


def resample_study(
    ct: sitk.Image, labels: sitk.Image, spacing: tuple[float, float, float], turn_degrees: float = 0.0
) -> tuple[sitk.Image, sitk.Image]:
    """The study (SimpleITK images) as a scanner with voxels of `spacing` (x, y, z) mm would store it,
    its axes turned `turn_degrees` about z and a third of that about x (a gantry tilt), about the
    study's centre: `make_study` has one grid, a hospital's CTs have many."""
    import SimpleITK as sitk

    turn = Rotation.from_euler("zx", [turn_degrees, turn_degrees / 3], degrees=True).as_matrix()
    size = (np.array(ct.GetSize()) * ct.GetSpacing() / spacing).astype(int)
    centre = ct.TransformContinuousIndexToPhysicalPoint(((np.array(ct.GetSize()) - 1) / 2).tolist())
    grid = sitk.Image(size.tolist(), sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetDirection(turn.ravel().tolist())
    grid.SetOrigin((np.array(centre) - turn @ ((size - 1) / 2 * spacing)).tolist())
    return (
        sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, ct.GetPixelID()),
        sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()),
    )


def write_study(
    out_dir: str | Path, seed: int = 0, n_nodes: int = 6, shape: tuple[int, int, int] = STUDY_SHAPE
) -> dict[str, Path]:
    """Write ct.nii.gz, nodes.nii.gz and truth.json for a synthetic study (atomically)."""
    import SimpleITK as sitk

    from m2anet.io import atomic_path, write_json

    out = Path(out_dir)
    ct_img, label_img, truth = make_study(seed, n_nodes, shape)
    paths = {"ct": out / "ct.nii.gz", "nodes": out / "nodes.nii.gz", "truth": out / "truth.json"}
    for key, img in (("ct", ct_img), ("nodes", label_img)):
        with atomic_path(paths[key]) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=True, imageIO="NiftiImageIO")
    write_json(paths["truth"], truth)
    return paths
