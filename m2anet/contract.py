"""The model's input contract: what a node patch must be, kept apart from the network so that
preprocessing, the cohort, the engines and the reports read it without importing torch (m2a-predict on
ONNX Runtime or Triton never needs it: importing it took 1.35 s of that command's 2 s start)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np


@dataclass(frozen=True)
class InputContract:
    """What a node patch must be for the model: kept with the registered config (as timm keeps a
    model's input size and normalisation in its `PretrainedCfg`), so preprocessing, export
    manifests and verification read it from one place instead of retyping it."""

    patch_shape_zyx: tuple[int, int, int] = (16, 64, 64)
    spacing_mm_zyx: tuple[float, float, float] = (3.0, 0.8, 0.8)
    hu_window: tuple[float, float] = (-175.0, 275.0)
    """HU are clipped to this window and scaled to [0, 1] before the model."""

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.hu_window
        return {**asdict(self), "scale": f"(clip(HU, {lo:g}, {hi:g}) - ({lo:g})) / {hi - lo:g}"}


INPUTS = InputContract()
PATCH_SHAPE = INPUTS.patch_shape_zyx
PATCH_SPACING_MM = INPUTS.spacing_mm_zyx
HU_WINDOW = INPUTS.hu_window

_HU = TypeVar("_HU", float, np.ndarray)


def hu_scale(hu: _HU) -> _HU:
    """HU on the model's input scale (HU_WINDOW to [0, 1], not clipped): for the thresholds in HU that
    the network reads, and inside `m2anet.data.hu_to_input`, which clips the CT first."""
    lo, hi = HU_WINDOW
    return (hu - lo) / (hi - lo)
