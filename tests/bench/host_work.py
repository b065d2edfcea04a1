"""What NodeClassifier.predict_patches does on the host around a backend's call, per node, before and after
the eleventh session's change, in rotating rounds on the same arrays: the input checks (`np.isin` for the
binary mask before, two counts now) and the mask probabilities (float64 for every call before; float32,
and only when masks are asked for, now). On a GPU the forward of m2anet_base should take 0.08 ms per node
at batch 256 (issue 11's goal): host work of that order decides the classifier's speed.

    python3 tests/bench/host_work.py [--batches 1,24,256] [--out FILE.md]

The backend's outputs are a real m2anet_small forward on the CPU, made once per batch size.
"""

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import numpy as np

from m2anet.bench.scenarios import Inputs
from m2anet.engines import check_inputs, open_backend
from m2anet.metrics import sigmoid


def checks_before(ct: np.ndarray, mask: np.ndarray) -> None:
    """check_inputs as it was: the same checks, the binary mask by np.isin."""
    assert np.isfinite(ct).all() and np.isin(mask, (0.0, 1.0)).all()
    assert (mask.reshape(mask.shape[0], -1).max(axis=1) > 0).all()
    assert ct.min() >= 0.0 and ct.max() <= 1.0


def checks_now(ct: np.ndarray, mask: np.ndarray) -> None:
    check_inputs(ct, mask)
    assert ct.min() >= 0.0 and ct.max() <= 1.0


def medians(parts: dict[str, Callable[[], object]], rounds: int, n: int) -> dict[str, float]:
    """Microseconds per node of each part: the median of `rounds` rotating rounds."""
    times: dict[str, list[float]] = {k: [] for k in parts}
    names = list(parts)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            parts[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e6 / n for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,24,256")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args()
    rows = [
        "| batch | checks before | checks now | mask probabilities before (every call) "
        "| now (with masks only) | host work before | now, without masks | now, with masks |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    with open_backend("torch:cpu", model_name="m2anet_small") as backend:
        for n in map(int, args.batches.split(",")):
            ct, mask = Inputs().batches(n, 1)[0]
            seg = backend.infer(ct, mask)[1][:, 0]
            parts: dict[str, Callable[[], object]] = {
                "checks before": functools.partial(checks_before, ct, mask),
                "checks now": functools.partial(checks_now, ct, mask),
                "masks before": lambda seg=seg: sigmoid(seg).astype(np.float32),
                "masks now": functools.partial(sigmoid, seg, np.float32),
            }
            us = medians(parts, args.rounds, n)
            cells = [*us.values(), us["checks before"] + us["masks before"], us["checks now"]]
            cells.append(us["checks now"] + us["masks now"])
            rows.append(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    table = "µs per node on the host, median of rotating rounds\n\n" + "\n".join(rows) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
