"""Whole CT study + node label map -> the per-node patches M2ANet was trained on.

Scanner software has a CT series and node contours, not 16x64x64 patches. This module makes the
patches exactly as `m2anet.data` does for training, in the patient frame:

* Reference lattice: an axis-aligned grid (identity direction) at (z, y, x) = (3.0, 0.8, 0.8) mm
  whose first voxel centre sits half a voxel inside the corner of the CT's physical bounding box.
  It depends only on where the CT lies in patient space, so the same anatomy stored with another
  axis order or flipped axes (another direction matrix) gives the same patches, and a CT already at
  0.8 x 0.8 x 3.0 mm with identity direction is sampled at its own voxel centres (no smoothing).
* Each node's patch is that lattice cropped to 16x64x64 around the node's centroid (snapped to the
  lattice). Only the patches are resampled, not the whole study: the result is the same as
  resampling the study and cropping, at a fraction of the memory. CT: linear, -1024 HU outside the
  scan; labels: nearest neighbour, 0 outside. Other nodes in a patch are zeroed in its mask.
* Measurements use the CT's own grid: centroid (mean voxel position, in mm in patient coordinates,
  and the nearest voxel index i, j, k), volume (voxel count x voxel volume).
* Short axis: on axial slices of the lattice (patient z), the node's minimum Feret width (the
  narrowest caliper across its pixels, pixel corners included), largest over the slices. For the
  ellipse-like sections of lymph nodes this is RECIST's short axis; unlike "longest extent
  perpendicular to the longest diameter" it is not thrown off by corners of irregular outlines.

ITK's NIfTI reader replaces NaN voxels by 0 as it reads, and turns a NaN voxel size into an SVD
dump on stderr: NIfTI files are checked on their raw header and data (nibabel) before ITK reads
them. Every CT must also look like a chest CT in Hounsfield units and millimetres: not constant,
within the HU scale, with air in it (lungs, airways), and voxels a CT's size; anything else is refused
with the conversion to make.

SimpleITK is imported on first use, so the patch measurements (`short_axis_mm`, used in training)
work where it is not installed.

Input problems raise `StudyError` (one line); node problems that leave the rest of the study
reportable mark that node skipped with a one-line reason.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import numpy as np
from scipy.spatial import ConvexHull

from m2anet.contract import PATCH_SHAPE, PATCH_SPACING_MM
from m2anet.data import hu_to_input
from m2anet.optional import lazy_import

AIR_HU = -1024.0
AIR_BAND_HU = (-1200.0, -500.0)
"""Air (-1000 HU) and lung (-900 to -700 HU) fall here; padding sentinels outside the scanned
circle (-2048, -3024, -32768) and raw scanner numbers (0..4095) do not."""
MIN_AIR_FRACTION = 1e-3
"""Lungs and airways fill a fifth or more of a chest CT; 0.1% leaves room for tight crops."""
HU_LIMITS = (-35000.0, 35000.0)
"""Nothing in Hounsfield units lies outside: vacuum is -1000, the extended scale for metal ends near
+31000 and the lowest padding sentinel is the int16 minimum with the usual -1024 intercept."""
CT_VOXEL_MM = (0.05, 20.0)
"""A clinical CT's voxels measure 0.1 to 1.5 mm in-plane (0.05 with a 1024 matrix on a small field of
view) and 0.25 to 10 mm between slices. A header written in metres or micrometres falls outside, and
would otherwise shrink or swell every node a thousandfold: all read 0.0 mm and "benign"."""
LATTICE_SPACING = PATCH_SPACING_MM[::-1]
"""(x, y, z) mm: ITK order of the patch spacing."""
PATCH_SIZE = PATCH_SHAPE[::-1]
"""(x, y, z) voxels: ITK order of the patch shape."""

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as nodes are prepared."""


class StudyError(ValueError):
    """A study that cannot be reported; the message names the problem in one line."""


if TYPE_CHECKING:
    import SimpleITK as sitk
else:  # a training or GPU image may lack it; short_axis_mm and the constants need none
    sitk = lazy_import("SimpleITK", "pip install 'SimpleITK>=2.3' (to read and resample studies)")


@dataclass(frozen=True)
class Node:
    """One labelled node: measurements on the CT grid, and why it was skipped (if it was)."""

    label: int
    centroid_mm: tuple[float, float, float]  # patient coordinates (x, y, z), as ITK/DICOM (LPS)
    voxel_index: tuple[int, int, int]  # (i, j, k) of the CT voxel nearest the centroid
    volume_mm3: float
    short_axis_mm: float
    larger_than_patch: bool
    skipped: str | None = None


class _Measured(TypedDict):
    """The fields of a `Node` measured before it is known whether it is classified."""

    label: int
    centroid_mm: tuple[float, float, float]
    voxel_index: tuple[int, int, int]
    volume_mm3: float
    short_axis_mm: float


@dataclass
class PreparedStudy:
    """Model inputs for the classifiable nodes, plus what is needed to map results back."""

    ct: np.ndarray  # float32 (N, 1, 16, 64, 64), model input in [0, 1]
    mask: np.ndarray  # float32 (N, 1, 16, 64, 64), {0, 1}
    nodes: list[Node]  # every label in the map, classified or skipped, in label order
    classified: list[int]  # indices into `nodes` of the patches, in patch order
    patch_origins: list[tuple[float, float, float]]  # physical (x, y, z) of each patch's first voxel
    reference: sitk.Image  # the CT: its grid is the one masks are pasted back onto
    warnings: list[str]


def _itk_reason(error: RuntimeError) -> str:
    """The line of an ITK exception that says why, without source paths and object addresses."""
    for line in str(error).splitlines():
        line = line.strip()
        if not line or line.startswith("Exception thrown in SimpleITK") or line.endswith(":"):
            continue
        return re.sub(r"^(ITK ERROR|sitk::ERROR): (\w+\(0x[0-9a-f]+\): )?", "", line)[:160]
    return type(error).__name__


def _nifti(path: Path, role: str):  # -> nibabel.Nifti1Image | Nifti2Image, header and data not read
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as e:  # nibabel raises a dozen types for a bad header; each is one line
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise StudyError(f"{role} {path} cannot be read ({reason}): is it truncated, or not NIfTI?") from None


def _gzip_length(path: Path) -> int | None:
    """The uncompressed length (mod 2^32) a gzip file's trailer states. A truncated file ends in
    compressed data instead, which states the expected length once in 4 billion; decompressing a CT
    to count its bytes took as long as ITK's own read of it."""
    try:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            return int.from_bytes(f.read(4), "little")
    except OSError:  # shorter than a gzip trailer
        return None


def _check_nifti(path: Path, role: str) -> None:
    """Voxel size, orientation and data of a NIfTI file, checked before ITK reads it.

    ITK's NIfTI reader zero-fills a truncated file and replaces NaN voxels by 0 without a word, and
    prints an SVD dump for a NaN voxel size. Float data, and compressed data whose gzip trailer does
    not state the expected length, is streamed once (memory stays at one chunk), counting bytes and,
    for float data, non-finite values.
    """
    image = _nifti(path, role)
    header = image.header
    geometry = [("voxel size", header["pixdim"][1 : 1 + min(int(header["dim"][0]), 3)])]
    for name, matrix in (("qform", header.get_qform), ("sform", header.get_sform)):
        if int(header[f"{name}_code"]) > 0:
            with np.errstate(invalid="ignore"):
                geometry.append((name, matrix()))
    for name, values in geometry:
        if not np.isfinite(values).all() or (name == "voxel size" and not (np.asarray(values) > 0).all()):
            raise StudyError(
                f"{role} {path} has a NaN, infinite or non-positive {name} in its header: "
                "rewrite it from the source series with its voxel size and orientation"
            )
    # the image's header is a copy with its data offset reset; the proxy keeps the file's
    dtype, offset = image.dataobj.dtype, int(image.dataobj.offset)
    expected = int(np.prod(image.dataobj.shape)) * dtype.itemsize
    float_data = dtype.kind in "fc"
    if not float_data and not path.name.endswith(".gz"):
        if path.stat().st_size < offset + expected:
            raise StudyError(f"{role} {path} is truncated or corrupt (its data ends early): copy it again")
        return
    if not float_data and _gzip_length(path) == (offset + expected) % 2**32:
        return  # whole: nothing left to count, and ITK decompresses it again anyway
    read, nonfinite, carry = 0, 0, b""
    try:
        with gzip.open(path) if path.name.endswith(".gz") else open(path, "rb") as f:
            f.read(offset)
            while read < expected:
                chunk = f.read(min(1 << 22, expected - read))
                if not chunk:
                    break
                read += len(chunk)
                if float_data:
                    chunk = carry + chunk
                    usable = len(chunk) - len(chunk) % dtype.itemsize
                    values = np.frombuffer(chunk[:usable], dtype)
                    nonfinite += int(values.size - np.count_nonzero(np.isfinite(values)))
                    carry = chunk[usable:]
    except (EOFError, OSError, zlib.error):
        read = -1
    if read < expected:
        raise StudyError(f"{role} {path} is truncated or corrupt (its data ends early): copy it again")
    if nonfinite:
        raise StudyError(
            f"{role} {path} has {nonfinite} NaN or infinite voxels: fix its reconstruction or conversion"
        )


def read_image(path: str | Path, role: str = "CT") -> sitk.Image:
    """NIfTI, NRRD, MHA/MHD or a folder holding one DICOM series (read by SimpleITK/GDCM)."""
    p = Path(path)
    if not p.exists():
        raise StudyError(
            f"{role} {p} not found: check the path (a NIfTI, NRRD or MHA file, or a DICOM series folder)"
        )
    try:
        if p.is_dir():
            series = sitk.ImageSeriesReader()
            ids = series.GetGDCMSeriesIDs(str(p))
            if not ids:
                raise StudyError(f"{role} folder {p} holds no DICOM series: pass a series folder or a file")
            if len(ids) > 1:
                raise StudyError(
                    f"{role} folder {p} holds {len(ids)} DICOM series ({', '.join(ids[:3])}"
                    f"{', ...' if len(ids) > 3 else ''}): put the series to analyse in a folder of its own"
                )
            series.SetFileNames(series.GetGDCMSeriesFileNames(str(p), ids[0]))
            image = series.Execute()
        else:
            if p.name.endswith((".nii", ".nii.gz")):
                _check_nifti(p, role)
            image = sitk.ReadImage(str(p))
    except RuntimeError as e:
        raise StudyError(
            f"{role} {p} cannot be read ({_itk_reason(e)}): is it truncated, or not NIfTI/NRRD/MHA/DICOM?"
        ) from None
    _check_geometry(image, f"{role} {p}")
    return image


def to_image(
    array: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
) -> sitk.Image:
    """A numpy volume as an image, with geometry in SimpleITK's conventions.

    `array` is indexed (z, y, x), as `sitk.GetArrayFromImage` returns it; `spacing`, `origin`
    (mm) and `direction` (row-major 3x3) are in (x, y, z) order, as `GetSpacing()`,
    `GetOrigin()` and `GetDirection()` return them.
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise StudyError(f"volume has shape {array.shape}: pass a 3-D array indexed (z, y, x)")
    if np.iscomplexobj(array):
        raise StudyError(
            f"volume has complex values ({array.dtype}): pass real numbers (HU for a CT, labels for nodes)"
        )
    if array.dtype == np.bool_:  # SimpleITK has no boolean pixels; one node's mask is label 1
        array = array.astype(np.uint8)
    try:
        geometry = [[float(v) for v in values] for values in (spacing, origin, direction)]
    except (TypeError, ValueError) as e:
        raise StudyError(f"bad geometry ({e}): spacing and origin need 3 numbers, direction 9") from None
    singular = len(geometry[2]) == 9 and abs(np.linalg.det(np.reshape(geometry[2], (3, 3)))) < 1e-6
    if not all(np.isfinite(v).all() for v in geometry) or min(geometry[0], default=0.0) <= 0 or singular:
        raise StudyError(
            f"bad geometry (spacing {geometry[0]}, origin {geometry[1]}, direction {geometry[2]}): spacing "
            "needs positive numbers, origin finite ones, direction a rotation matrix (row-major)"
        )
    image = sitk.GetImageFromArray(array)
    try:
        image.SetSpacing(geometry[0])
        image.SetOrigin(geometry[1])
        image.SetDirection(geometry[2])
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[-1][:120] if str(e).strip() else type(e).__name__
        raise StudyError(
            f"bad geometry ({first}): spacing and origin need 3 values, direction 9 (row-major)"
        ) from None
    return image


def as_image(
    volume: sitk.Image | np.ndarray, geometry: dict[str, Any], like: sitk.Image | None
) -> sitk.Image:
    """A SimpleITK image as given, or a (z, y, x) numpy volume with `geometry` (spacing, origin,
    direction in SimpleITK's x-y-z order), or with the geometry of `like` when none is given."""
    if isinstance(volume, sitk.Image):
        return volume
    if geometry["spacing"] is None:
        if like is None:
            raise StudyError(
                "a numpy CT needs its geometry: pass spacing (and origin, direction), x-y-z order"
            )
        return to_image(volume, like.GetSpacing(), like.GetOrigin(), like.GetDirection())
    return to_image(volume, **{k: v for k, v in geometry.items() if v is not None})


def _check_geometry(image: sitk.Image, what: str) -> None:
    """A NaN or zero voxel size or orientation turns every physical point into NaN."""
    spacing, direction = np.array(image.GetSpacing()), np.array(image.GetDirection())
    finite = np.isfinite([*spacing, *image.GetOrigin(), *direction]).all()
    d = image.GetDimension()
    if not finite or (spacing <= 0).any() or abs(np.linalg.det(direction.reshape(d, d))) < 1e-6:
        raise StudyError(
            f"{what} has a NaN, zero or infinite voxel size, origin or orientation (spacing "
            f"{tuple(spacing.tolist())}): rewrite it from the source series with its geometry"
        )


def _check_hounsfield(ct: np.ndarray) -> None:
    """Refuse what no chest CT in Hounsfield units looks like: the model reads HU through a fixed
    window, so a CT stored as raw scanner numbers (0..4095) gives confident, wrong diagnoses."""
    lo, hi = float(ct.min()), float(ct.max())
    if lo == hi:
        raise StudyError(
            f"CT is constant (every voxel is {lo:g}): it holds no image; export the series again"
        )
    if lo < HU_LIMITS[0] or hi > HU_LIMITS[1]:
        raise StudyError(
            f"CT values span {lo:g}..{hi:g}, beyond any CT in Hounsfield units ({HU_LIMITS[0]:g}.."
            f"{HU_LIMITS[1]:g}): convert it to HU (stored value x rescale slope + rescale intercept)"
        )
    a, b = AIR_BAND_HU
    if np.issubdtype(ct.dtype, np.integer):  # the same voxels, compared in the CT's type, not as float64
        a, b = math.ceil(a), math.floor(b)
    air = sum(
        int(np.count_nonzero((s >= a) & (s <= b))) for s in (ct[k : k + 16] for k in range(0, len(ct), 16))
    )
    if air < MIN_AIR_FRACTION * ct.size:
        raise StudyError(
            f"CT has no air ({air} voxels between {a:g} and {b:g} HU, where a chest CT's lungs and airways "
            f"lie; values span {lo:g}..{hi:g}): if it holds raw scanner values (e.g. 0..4095), convert them "
            "to HU with the series' rescale slope and intercept (HU = value x slope + intercept)"
        )


def _check_ct(ct: sitk.Image) -> None:
    if ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError(
            f"CT is a {ct.GetDimension()}-D image with {ct.GetNumberOfComponentsPerPixel()} component(s) "
            "per voxel: pass one 3-D scalar volume (a whole series, not one slice)"
        )
    array = sitk.GetArrayViewFromImage(ct)
    if np.iscomplexobj(array):
        raise StudyError(
            f"CT has complex voxels ({ct.GetPixelIDTypeAsString()}): pass a real-valued CT in HU"
        )
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise StudyError(f"CT has {bad} NaN or infinite voxels: fix its reconstruction or conversion")
    _check_geometry(ct, "CT")
    lo, hi = CT_VOXEL_MM
    if not all(lo <= s <= hi for s in ct.GetSpacing()):
        size = " x ".join(f"{s:g}" for s in ct.GetSpacing())
        raise StudyError(
            f"CT voxel size {size} mm (x, y, z) is outside any CT's ({lo:g} to {hi:g} mm): if its header "
            "is in metres or micrometres, rewrite it in millimetres from the source series"
        )
    _check_hounsfield(array)


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    tol = 1e-3 * min(a.GetSpacing())
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def _box_corners(image: sitk.Image, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Physical (x, y, z) of the 8 corners of the continuous-index box [lo, hi] (x, y, z)."""
    return np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint(np.where(bits, hi, lo).astype(float).tolist())
            for bits in np.ndindex(2, 2, 2)
        ]
    )


def _corners(image: sitk.Image) -> np.ndarray:
    """Physical corners of the whole image, voxel boxes included."""
    return _box_corners(image, np.full(3, -0.5), np.array(image.GetSize()) - 0.5)


def _labels_on_ct_grid(labels: sitk.Image, ct: sitk.Image) -> np.ndarray:
    """The label map's values (z, y, x) on the CT's grid, a view of `labels` where it is on that grid,
    or StudyError naming the mismatch."""
    if labels.GetDimension() != 3 or labels.GetNumberOfComponentsPerPixel() != 1:
        raise StudyError(
            f"node label map is a {labels.GetDimension()}-D image with "
            f"{labels.GetNumberOfComponentsPerPixel()} component(s): pass one 3-D integer label volume"
        )
    _check_geometry(labels, "node label map")
    values = sitk.GetArrayViewFromImage(labels)
    if np.iscomplexobj(values):
        raise StudyError("node label map has complex values: it must hold one integer label per node")
    if np.issubdtype(values.dtype, np.floating):
        fractional = ~np.isfinite(values) | (values != np.round(values))
        if fractional.any():
            example = values[fractional].flat[0]
            raise StudyError(
                f"node label map has non-integer values (e.g. {example:g}): it must hold one integer "
                "label per node and 0 for background (a probability map is not a label map)"
            )
    if values.min() < 0:
        raise StudyError(f"node label map has negative labels (min {values.min():g}): use 0 and 1, 2, ...")
    if values.max() > np.iinfo(np.uint32).max:
        raise StudyError(f"node label map has labels above 2^32 (max {values.max():g})")
    if _same_grid(labels, ct):
        return values
    if labels.GetSize() == ct.GetSize():
        raise StudyError(
            "node label map on an incompatible grid: it has the CT's size but another spacing, "
            "origin or direction (was its header lost in a conversion?): save it with the CT's header"
        )
    corners = np.array([ct.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in _corners(labels)])
    size = np.array(ct.GetSize())
    if (corners < -1.0).any() or (corners > size).any():  # half a CT voxel of slack beyond its edge
        raise StudyError(
            "node label map on an incompatible grid: it reaches outside the CT volume, so it was "
            "not drawn on this CT: pass the label map made on this series"
        )
    labels = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
    return sitk.GetArrayFromImage(labels)


def _lattice_origin(ct: sitk.Image) -> np.ndarray:
    return _corners(ct).min(axis=0) + np.array(LATTICE_SPACING) / 2


class _LatticeSampler:
    """`image` sampled on axis-aligned blocks of the lattice through one ITK filter, set up once:
    `sitk.Resample`'s procedural form builds a filter and three transforms on every call, 0.15-0.2 ms of
    each of a node's two resamples (0.4 and 0.8 ms)."""

    def __init__(self, image: sitk.Image, linear: bool, default: float) -> None:
        self._image, self._filter = image, sitk.ResampleImageFilter()
        self._filter.SetInterpolator(sitk.sitkLinear if linear else sitk.sitkNearestNeighbor)
        if linear:  # labels keep their compact map's type (one byte a voxel below 256 nodes)
            self._filter.SetOutputPixelType(sitk.sitkFloat32)
        self._filter.SetOutputSpacing(LATTICE_SPACING)
        self._filter.SetDefaultPixelValue(default)

    def __call__(self, origin: np.ndarray, size: Sequence[int]) -> np.ndarray:
        """The block of `size` (x, y, z) lattice voxels from `origin`, as an array (z, y, x)."""
        self._filter.SetOutputOrigin(origin.tolist())
        self._filter.SetSize([int(n) for n in size])
        return sitk.GetArrayFromImage(self._filter.Execute(self._image))


def short_axis_mm(node: np.ndarray, spacing_yx: tuple[float, float] = PATCH_SPACING_MM[1:]) -> float:
    """Short axis of a binary node (z, y, x) on an axial grid: largest min Feret width over slices."""
    offsets = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    rows = np.any(node, axis=2)
    # a slice's hull has corners of each row's first and last pixel as its vertices: the others add nothing
    first, last = node.argmax(axis=2), node.shape[2] - 1 - node[:, :, ::-1].argmax(axis=2)
    best = 0.0
    for z in np.flatnonzero(rows.any(axis=1)):
        y = np.flatnonzero(rows[z])
        pixels = np.stack([np.concatenate([y, y]), np.concatenate([first[z, y], last[z, y]])], axis=1)
        points = (pixels[:, None, :] + offsets[None]).reshape(-1, 2) * spacing_yx
        hull = points[ConvexHull(points).vertices]
        edges = np.roll(hull, -1, axis=0) - hull
        normals = np.stack([-edges[:, 1], edges[:, 0]], axis=1) / np.linalg.norm(edges, axis=1, keepdims=True)
        # the narrowest caliper of a convex polygon lies flush with one of its edges
        extent = hull @ normals.T
        best = max(best, float((extent.max(axis=0) - extent.min(axis=0)).min()))
    return best


def _measure(
    ct: sitk.Image, zyx: np.ndarray
) -> tuple[tuple[float, float, float], tuple[int, int, int], float]:
    """Centroid (mm, patient coordinates), nearest voxel index (i, j, k), volume (mm3) of the voxels
    `zyx` (n, 3)."""
    index = zyx.mean(axis=0)[::-1]  # (i, j, k) continuous
    x, y, z = ct.TransformContinuousIndexToPhysicalPoint(index.tolist())
    i, j, k = (int(v) for v in np.round(index))
    return (x, y, z), (i, j, k), len(zyx) * float(np.prod(ct.GetSpacing()))


def _node_extent_on_lattice(
    ct: sitk.Image, box: tuple[slice, ...], lattice: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Lattice index range (x, y, z), one voxel of margin, covering the node's CT-grid bounding box."""
    lo = np.array([s.start for s in box][::-1]) - 0.5
    hi = np.array([s.stop for s in box][::-1]) - 0.5
    idx = (_box_corners(ct, lo, hi) - lattice) / LATTICE_SPACING
    return np.floor(idx.min(axis=0)).astype(int) - 1, np.ceil(idx.max(axis=0)).astype(int) + 2


def _cut_patch(
    ct: _LatticeSampler, lattice: np.ndarray, centroid: np.ndarray, whole: np.ndarray, lo: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch origin (x, y, z), HU and node mask (z, y, x) of the lattice block centred on `centroid`.

    The mask is the block's part of `whole`, the node's mask on the lattice from lattice index `lo`
    (x, y, z): the same lattice points, so no second resampling that could break a tie otherwise."""
    centre = (centroid - lattice) / LATTICE_SPACING
    start = np.round(centre - (np.array(PATCH_SIZE) - 1) / 2).astype(int)
    origin = lattice + start * LATTICE_SPACING
    hu = ct(origin, PATCH_SIZE)
    mask = np.zeros(PATCH_SHAPE, bool)
    offset = (lo - start)[::-1]  # where `whole` begins in the block, (z, y, x)
    block = tuple(
        slice(max(o, 0), min(o + n, p)) for o, n, p in zip(offset, whole.shape, PATCH_SHAPE, strict=True)
    )
    if all(s.stop > s.start for s in block):
        mask[block] = whole[tuple(slice(s.start - o, s.stop - o) for s, o in zip(block, offset, strict=True))]
    if not mask.any():  # smaller than a lattice voxel: keep its centre voxel, as training does
        voxel = np.clip(np.round(centre - start).astype(int), 0, np.array(PATCH_SIZE) - 1)
        mask[tuple(voxel[::-1])] = True
    return origin, hu, mask


def _compact_labels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The map renumbered 1..n in the smallest unsigned type that holds n, the label values present, in
    order, and each node's voxels as ascending flat indices (`np.argwhere`'s order).

    Everything after this costs per node, not per label value or per voxel of the volume: a map whose
    one label is 200,000,000 took 11 GB in scipy's find_objects (a box per value up to the largest),
    and find_objects and each node's `argwhere` were passes over the volume that the nodes' voxels,
    gathered here in one, make unnecessary. A study of fewer than 256 nodes is one byte a voxel.
    """
    flat = values.reshape(-1)
    where = np.flatnonzero(flat != 0)  # through a bool array: 7x faster than on the labels themselves
    present, codes = np.unique(flat[where], return_inverse=True)
    compact = np.zeros(values.shape, np.min_scalar_type(len(present)))
    compact.reshape(-1)[where] = codes + 1
    voxels = where[np.argsort(codes, kind="stable")]
    return compact, present, np.split(voxels, np.cumsum(np.bincount(codes))[:-1])


@dataclass(frozen=True)
class PatchBatch:
    """Model inputs of consecutive classifiable nodes, in label order."""

    ct: np.ndarray  # float32 (n, 1, 16, 64, 64), model input in [0, 1]
    mask: np.ndarray  # float32 (n, 1, 16, 64, 64), {0, 1}
    classified: list[int]  # indices into the study's `nodes`
    patch_origins: list[tuple[float, float, float]]  # physical (x, y, z) of each patch's first voxel


class StudyNodes:
    """A checked study whose nodes are measured and cut into patches one batch at a time.

    A study's memory is then its volumes plus one batch of patches, whatever its number of nodes;
    `nodes` and `warnings` fill in, in label order, as `batches` runs. StudyError on a study that
    cannot be reported at all.
    """

    def __init__(self, ct: sitk.Image, labels: sitk.Image) -> None:
        _check_ct(ct)
        self._labels, self._values, self._voxels = _compact_labels(_labels_on_ct_grid(labels, ct))
        if not self._values.size:
            raise StudyError("node label map is empty (every voxel is 0): draw the nodes to classify")
        self.reference = ct
        self.nodes: list[Node] = []
        self.warnings: list[str] = []

    def __len__(self) -> int:
        return len(self._values)

    def batches(self, size: int | None = None, progress: Progress | None = None) -> Iterator[PatchBatch]:
        """Patches of the classifiable nodes, `size` at a time (None: all in one batch); StudyError
        after the last node when none could be classified."""
        ct, label_array = self.reference, self._labels
        label_image = sitk.GetImageFromArray(label_array)
        label_image.CopyInformation(ct)
        ct_on_lattice = _LatticeSampler(ct, True, AIR_HU)
        labels_on_lattice = _LatticeSampler(label_image, False, 0)
        lattice = _lattice_origin(ct)
        size_zyx = np.array(label_array.shape)
        self.nodes, self.warnings = [], []
        nodes, warnings = self.nodes, self.warnings
        ct_patches, mask_patches, classified, origins = [], [], [], []
        n_classified = 0
        for done, voxels in enumerate(self._voxels):
            index, value = done + 1, int(self._values[done])  # compact label, the map's own label
            zyx = np.stack(np.unravel_index(voxels, label_array.shape), axis=1)
            box = tuple(
                slice(int(a), int(b) + 1) for a, b in zip(zyx.min(axis=0), zyx.max(axis=0), strict=True)
            )
            centroid, voxel, volume = _measure(ct, zyx)
            lo, hi = _node_extent_on_lattice(ct, box, lattice)
            whole = labels_on_lattice(lattice + lo * LATTICE_SPACING, hi - lo) == index
            node_kwargs: _Measured = {
                "label": value,
                "centroid_mm": centroid,
                "voxel_index": voxel,
                "volume_mm3": volume,
                "short_axis_mm": short_axis_mm(whole),
            }
            touches = [s.start == 0 or s.stop == n for s, n in zip(box, size_zyx, strict=True)]
            if any(touches):
                reason = (
                    f"node {value} touches the edge of the CT volume ({'zyx'[touches.index(True)]} axis): "
                    "it may be cut off, so it is not classified"
                )
                warnings.append(reason)
                nodes.append(Node(**node_kwargs, larger_than_patch=False, skipped=reason))
            else:
                origin, hu, mask = _cut_patch(ct_on_lattice, lattice, np.array(centroid), whole, lo)
                larger = int(mask.sum()) < int(whole.sum())
                if larger:
                    warnings.append(
                        f"node {value} is larger than the {' x '.join(map(str, PATCH_SHAPE))} patch "
                        f"({volume:.0f} mm3): its central crop is classified"
                    )
                nodes.append(Node(**node_kwargs, larger_than_patch=larger))
                ct_patches.append(hu_to_input(hu))
                mask_patches.append(mask.astype(np.float32))
                classified.append(len(nodes) - 1)
                origins.append(cast(tuple[float, float, float], tuple(float(v) for v in origin)))
            if progress is not None:
                progress("preprocess", done + 1, len(self._voxels))
            if classified and (len(classified) == size or done + 1 == len(self._voxels)):
                n_classified += len(classified)
                yield PatchBatch(
                    np.stack(ct_patches)[:, None], np.stack(mask_patches)[:, None], classified, origins
                )
                ct_patches, mask_patches, classified, origins = [], [], [], []
        if not n_classified:
            raise StudyError(f"no node could be classified ({len(nodes)} skipped); first: {nodes[0].skipped}")


def prepare_study(ct: sitk.Image, labels: sitk.Image, progress: Progress | None = None) -> PreparedStudy:
    """Check the study, measure every node and cut the patches of the classifiable ones, all at once
    (`StudyNodes.batches` cuts them a batch at a time)."""
    study = StudyNodes(ct, labels)
    (batch,) = study.batches(None, progress)
    return PreparedStudy(
        ct=batch.ct,
        mask=batch.mask,
        nodes=study.nodes,
        classified=batch.classified,
        patch_origins=batch.patch_origins,
        reference=ct,
        warnings=study.warnings,
    )


class MaskCanvas:
    """Predicted node masks pasted back on the CT grid as a label map (the nodes' labels), a batch at a
    time. Probabilities are resampled linearly and thresholded at 0.5, so a mask upsampled from 3 mm
    slices stays smooth. Where two nodes' predictions overlap, the lower label keeps the voxel (batches
    come in label order)."""

    def __init__(self, reference: sitk.Image) -> None:
        self.reference = reference
        self.array = np.zeros(reference.GetSize()[::-1], np.uint32)

    def paste(
        self,
        seg_probability: np.ndarray,
        labels: Sequence[int],
        origins: Sequence[tuple[float, float, float]],
    ) -> None:
        """`seg_probability` (n, 16, 64, 64) of the nodes `labels`, patches starting at `origins`."""
        ref, out = self.reference, self.array
        size = np.array(ref.GetSize())
        for patch, label, origin in zip(seg_probability, labels, origins, strict=True):
            image = sitk.GetImageFromArray(patch.astype(np.float32))
            image.SetOrigin(origin)
            image.SetSpacing(LATTICE_SPACING)
            corners = np.array(
                [ref.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in _corners(image)]
            )
            lo = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, size)
            hi = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, size)
            if (hi <= lo).any():
                continue
            block = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
            block.SetSpacing(ref.GetSpacing())
            block.SetDirection(ref.GetDirection())
            block.SetOrigin(ref.TransformIndexToPhysicalPoint([int(v) for v in lo]))
            prob = sitk.GetArrayFromImage(sitk.Resample(image, block, sitk.Transform(), sitk.sitkLinear, 0.0))
            region = out[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
            region[(prob > 0.5) & (region == 0)] = label

    def image(self) -> sitk.Image:
        result = sitk.GetImageFromArray(self.array)
        result.CopyInformation(self.reference)
        return result


def paste_masks(study: PreparedStudy, seg_probability: np.ndarray) -> sitk.Image:
    """Predicted node masks (N, 16, 64, 64) back on the CT grid as a label map (see `MaskCanvas`)."""
    canvas = MaskCanvas(study.reference)
    canvas.paste(seg_probability, [study.nodes[i].label for i in study.classified], study.patch_origins)
    return canvas.image()
