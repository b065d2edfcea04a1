"""On a GPU: eager FP16/BF16 with autocast casting FP32 weights on every call ("old") against weights
cast once ("new", what TorchBackend does), beside IEEE FP32, in rotating rounds (docs/gpu.md); then the
batch-1 kernels of eager and compiled FP16.

    python3 tests/bench/weight_cast_ab.py ab      one JSON line per precision, CUDA graphs and batch
    python3 tests/bench/weight_cast_ab.py prof    kernels per call at batch 1, the 10 slowest
"""

import json
import statistics
import sys
import time

import torch

from m2anet.bench.scenarios import Inputs
from m2anet.engines.torch_backend import _CAST_ONCE, TorchBackend

MODEL = "m2anet_base"
INPUTS = Inputs()


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ct, mask = INPUTS.batches(n, 1)[0]
    return torch.from_numpy(ct).cuda(), torch.from_numpy(mask).cuda()


def timed(backend: TorchBackend, ct: torch.Tensor, mask: torch.Tensor) -> tuple[float, tuple]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = backend.infer_torch(ct, mask)
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def ab() -> None:
    fp32 = {graphs: TorchBackend(MODEL, device="cuda", cuda_graphs=graphs) for graphs in (False, True)}
    for precision in ("fp16", "bf16"):
        for graphs in (False, True):
            new = TorchBackend(MODEL, device="cuda", precision=precision, cuda_graphs=graphs)
            old = TorchBackend(MODEL, device="cuda", precision=precision, cuda_graphs=graphs)
            for module in old.model.modules():
                if isinstance(module, _CAST_ONCE):
                    module.float()  # autocast casts them again on every call, as before
            sides = {"fp32": fp32[graphs], "old": old, "new": new}
            for n in (1, 32, 256):
                ct, mask = batch(n)
                for backend in sides.values():
                    for _ in range(3):
                        timed(backend, ct, mask)
                outs = timed(old, ct, mask)[1], timed(new, ct, mask)[1]
                same = all(torch.equal(x, y) for x, y in zip(*outs, strict=True))
                times: dict[str, list[float]] = {k: [] for k in sides}
                names = list(sides)
                for r in range(30 if n < 256 else 9):
                    for k in names[r % 3 :] + names[: r % 3]:
                        times[k].append(timed(sides[k], ct, mask)[0])
                ms = {k: statistics.median(v) * 1e3 / n for k, v in times.items()}
                row = {
                    "precision": precision,
                    "cuda_graphs": graphs,
                    "batch": n,
                    "bit_equal": same,
                    **{f"{k}_ms_per_node": round(v, 4) for k, v in ms.items()},
                    "new_vs_old": round(ms["old"] / ms["new"], 3),
                    "new_vs_fp32": round(ms["fp32"] / ms["new"], 3),
                    "old_vs_fp32": round(ms["fp32"] / ms["old"], 3),
                }
                print(json.dumps(row), flush=True)
            old.close()
            new.close()


def prof() -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, options in (("eager fp16", {}), ("compile fp16", {"compile": True, "cuda_graphs": False})):
        backend = TorchBackend(MODEL, device="cuda", precision="fp16", **options)
        ct, mask = batch(1)
        for _ in range(5):
            timed(backend, ct, mask)
        wall = statistics.median(timed(backend, ct, mask)[0] for _ in range(20)) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                backend.infer_torch(ct, mask)
            torch.cuda.synchronize()
        kernels = sorted(
            (e for e in p.key_averages() if e.self_device_time_total > 0),
            key=lambda e: e.self_device_time_total,
            reverse=True,
        )
        total = sum(e.self_device_time_total for e in kernels) / 5 / 1e3
        count = sum(e.count for e in kernels) // 5
        print(f"## {name} batch 1: wall {wall:.3f} ms, kernels {count}/call, kernel time {total:.3f} ms/call")
        for e in kernels[:10]:
            print(f"  {e.count // 5:3d} {e.self_device_time_total / 5 / 1e3:.4f} ms  {e.key[:110]}")


if __name__ == "__main__":
    {"ab": ab, "prof": prof}[sys.argv[1]]()
