"""Latency statistics by nearest rank, as MLPerf LoadGen reports them.

Nearest rank (no interpolation) means every reported percentile is a latency that was actually
observed, so a p99 over 50 queries is the worst but one, not a value between two runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 99)


def percentile(samples: Sequence[float], p: float) -> float:
    """The smallest sample with at least `p` percent of the samples at or below it."""
    if not samples:
        raise ValueError("no samples: run at least one query")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    ordered = sorted(samples)
    return float(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)])


def summarize(samples: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """p50/p90/p99/max/min/mean of `samples` multiplied by `scale` (1e-6 turns ns into ms)."""
    out = {f"p{p}": percentile(samples, p) * scale for p in PERCENTILES}
    out["max"] = max(samples) * scale
    out["min"] = min(samples) * scale
    out["mean"] = sum(samples) / len(samples) * scale
    return out
