"""On a GPU: what the numpy path (`Backend.infer`, which NodeClassifier and m2a-predict take) costs over
tensors already on the device, staged through page-locked buffers (what TorchBackend does) or copied
straight from the numpy arrays (pageable memory, what it did before), in rotating rounds.

    python3 tests/bench/host_copies.py [--model m2anet_base] [--spec torch:cuda:fp16@cuda_graphs=true]

One JSON line per batch size: median ms per query of each path, and the outputs of the two numpy paths
compared bit for bit. m2a-bench's `single` is the device path plus page-locked copies timed apart.
"""

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from m2anet.bench.scenarios import Inputs
from m2anet.engines import BackendSpec
from m2anet.engines.torch_backend import TorchBackend


def pageable(backend: TorchBackend, ct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
    dev = backend.torch_device
    out = backend.infer_torch(torch.from_numpy(ct).to(dev), torch.from_numpy(mask).to(dev))
    return tuple(o.cpu().numpy() for o in out)


def measure(
    backend: TorchBackend, ct: np.ndarray, mask: np.ndarray, rounds: int
) -> tuple[dict[str, float], bool]:
    """Median ms per query of each path over `rounds` rotating rounds (the first three dropped), and
    whether the two numpy paths agree bit for bit."""
    dev_ct, dev_mask = (torch.from_numpy(a).to(backend.torch_device) for a in (ct, mask))
    paths: dict[str, Callable[[], object]] = {
        "device": lambda: backend.infer_torch(dev_ct, dev_mask),
        "pinned": lambda: backend.infer(ct, mask, check=False),
        "pageable": lambda: pageable(backend, ct, mask),
    }
    same = all(
        np.array_equal(a, b)
        for a, b in zip(backend.infer(ct, mask, check=False), pageable(backend, ct, mask), strict=True)
    )
    times: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(rounds):
        for k in names[r % 3 :] + names[: r % 3]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            paths[k]()
            torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v[3:]) * 1e3 for k, v in times.items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m2anet_base")
    parser.add_argument("--spec", default="torch:cuda:fp16@cuda_graphs=true")
    parser.add_argument("--batches", default="1,24,256")
    args = parser.parse_args()
    backend = BackendSpec.parse(args.spec).open(model_name=args.model)
    if not isinstance(backend, TorchBackend) or backend.torch_device.type != "cuda":
        raise SystemExit(f"{args.spec} is not a PyTorch CUDA backend: pass one, e.g. torch:cuda:fp16")
    for n in map(int, args.batches.split(",")):
        ms, same = measure(backend, *Inputs().batches(n, 1)[0], rounds=60 if n < 256 else 15)
        row = {
            "spec": args.spec,
            "batch": n,
            "bit_equal": same,
            **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
        }
        print(json.dumps({**row, "pageable_vs_pinned": round(ms["pageable"] / ms["pinned"], 3)}), flush=True)
    backend.close()


if __name__ == "__main__":
    main()
