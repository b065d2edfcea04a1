"""The one interface every deployment path implements, and the input checks they share.

A backend runs M2ANet on numpy arrays `ct`, `mask` of shape (B, 1, 16, 64, 64) float32 and
returns `(met_logit, seg_logit)` (or `(met_logit,)` for a classification-only artifact, or the
`outputs` a caller names) as float32 numpy arrays. Batches larger than the backend's `max_batch`
are split here, once, so no backend has to.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType

import numpy as np
from tqdm import tqdm

from m2anet.contract import PATCH_SHAPE
from m2anet.data import Cohort

OUTPUT_NAMES = ("met_logit", "seg_logit")
INPUT_NAMES = ("ct", "mask")


class InputError(ValueError):
    """Bad input to a backend: the message names the problem and the fix in one line."""


def check_inputs(ct: np.ndarray, mask: np.ndarray) -> None:
    for name, a in (("ct", ct), ("mask", mask)):
        if not isinstance(a, np.ndarray):
            raise InputError(f"{name} is a {type(a).__name__}: pass a numpy array")
        if a.ndim != 5 or a.shape[1:] != (1, *PATCH_SHAPE):
            raise InputError(
                f"{name} has shape {a.shape}: expected (B, 1, {', '.join(map(str, PATCH_SHAPE))}); "
                "crop patches with m2anet's preprocessing"
            )
        if a.dtype != np.float32:
            raise InputError(f"{name} has dtype {a.dtype}: convert it with .astype(np.float32)")
    if ct.shape[0] != mask.shape[0]:
        raise InputError(
            f"ct has {ct.shape[0]} patches but mask has {mask.shape[0]}: pass one mask per patch"
        )
    if ct.shape[0] == 0:
        raise InputError("empty batch: pass at least one patch")
    if not np.isfinite(ct).all():
        raise InputError("ct contains NaN or Inf: fix the CT volume or its resampling before inference")
    if np.count_nonzero(mask == 0.0) + np.count_nonzero(mask == 1.0) != mask.size:  # twice np.isin's speed
        raise InputError("mask is not binary: pass 0/1 values (threshold a soft mask at 0.5)")
    empty = np.flatnonzero(mask.reshape(mask.shape[0], -1).max(axis=1) == 0)
    if empty.size:
        raise InputError(f"mask of patch {int(empty[0])} is empty: each patch needs its node's contour")


class Backend(ABC):
    """Base of all runners: name, precision, device, max_batch, infer(), close()."""

    name: str
    precision: str
    device: str
    max_batch: int | None = None
    outputs: tuple[str, ...] = OUTPUT_NAMES

    def infer(
        self, ct: np.ndarray, mask: np.ndarray, *, check: bool = True, outputs: Sequence[str] | None = None
    ) -> tuple[np.ndarray, ...]:
        """Run a batch; `check=False` skips the input checks (stress tests, benchmarks). `outputs` names
        those of `self.outputs` to return, in that order (default: all). A caller that predicts no masks
        asks for `met_logit` alone: the 65,536 mask logits of a node (256 KiB in float32) are then
        neither copied back from a GPU nor sent over Triton's network."""
        wanted = self.outputs if outputs is None else tuple(outputs)
        if not wanted or any(name not in self.outputs for name in wanted):
            raise ValueError(f"outputs {list(wanted)}: choose among this backend's {list(self.outputs)}")
        if check:
            check_inputs(ct, mask)
        step = self.max_batch or ct.shape[0]
        if ct.shape[0] <= step:
            return self._run(ct, mask, wanted)
        parts = [self._run(ct[i : i + step], mask[i : i + step], wanted) for i in range(0, ct.shape[0], step)]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    @abstractmethod
    def _run(self, ct: np.ndarray, mask: np.ndarray, outputs: tuple[str, ...]) -> tuple[np.ndarray, ...]:
        """`outputs`, some of `self.outputs` in the order asked for."""

    def close(self) -> None:  # noqa: B027 - backends without resources need nothing here
        pass

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.precision} on {self.device}>"


def run_cohort(
    backend: Backend, cohort: Cohort, batch: int = 16, desc: str | None = None
) -> list[np.ndarray]:
    """Every output of `backend` over a labelled cohort, in order, with a progress bar: what parity
    checks compare."""
    outs: list[list[np.ndarray]] = []
    bar = tqdm(total=len(cohort), desc=desc or backend.name, unit="node", file=sys.stderr, leave=False)
    for i in range(0, len(cohort), batch):
        outs.append(list(backend.infer(cohort.ct[i : i + batch], cohort.mask[i : i + batch])))
        bar.update(min(batch, len(cohort) - i))
    bar.close()
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]
