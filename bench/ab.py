"""Interleaved A/B timing: a comparison that a busy machine slows on both sides alike.

Timing all of A and then all of B lets a neighbour's job, a clock change or a cache that fills up
land on one side only: on a shared CI machine a ratio of about 0.3 (padded vs unpadded PyTorch
batch 1) was measured as 1.1 and 1.3 that way. Alternating the two in every round (A B, then B A,
so neither always goes first) spreads whatever the machine does over both, and the ratio of the
two medians ignores the rounds a burst of load hit hard.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


class Interleaved:
    """Two callables timed in alternating rounds; `round()` runs each once and records both times."""

    def __init__(
        self, a: Callable[[], object], b: Callable[[], object], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._calls = (a, b)
        self._clock = clock
        self.seconds: tuple[list[float], list[float]] = ([], [])

    def round(self) -> None:
        """A then B in even rounds, B then A in odd ones: the second call of a round may find warmer
        caches or a busier machine, and neither side should always get that."""
        order = (0, 1) if len(self.seconds[0]) % 2 == 0 else (1, 0)
        for side in order:
            start = self._clock()
            self._calls[side]()
            self.seconds[side].append(self._clock() - start)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.seconds[0]), statistics.median(self.seconds[1])

    def ratio(self) -> float:
        """median(A) / median(B): below 1 when A is faster."""
        a, b = self.medians()
        return a / b
