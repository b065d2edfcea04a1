"""What inductor's caches save a second process that opens the same `torch-compile` backend: each run is
a fresh process with the same cache folder, first empty, and times opening the backend and the first
call at batch 1 and at batch 2 (the two graphs a process compiles: batch 1, and one for every other
size), with the cache verdicts inductor counted.

    python3 tests/bench/compile_cache.py [--model m2anet_small] [--device cpu|cuda] [--runs 2]
                                         [--no-prepack | --aoti]

With freezing (TorchBackend's default) AOTAutograd's cache refuses every graph, and on the CPU the
FX-graph cache refuses oneDNN-packed weights; `--no-prepack` leaves the CPU's weights unpacked, as CUDA's
graphs hold them, to show what the FX-graph cache does there. `--aoti` opens `torch-compile@aoti=true`,
which builds an AOTInductor package when it opens and loads it in a later process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

BATCHES = (1, 2)


def child(model: str, device: str, cache: str, prepack: bool, aoti: bool) -> None:
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import config

    from m2anet.contract import PATCH_SHAPE
    from m2anet.engines.torch_backend import TorchBackend

    config.cpp.weight_prepack = prepack
    t0 = time.perf_counter()
    backend = TorchBackend(model, device=device, compile=True, cache_dir=cache, pad_single=False, aoti=aoti)
    seconds = {"open": round(time.perf_counter() - t0, 1)}
    for batch in BATCHES:
        ct = torch.rand(batch, 1, *PATCH_SHAPE, device=device)
        mask = (torch.rand(batch, 1, *PATCH_SHAPE, device=device) > 0.9).float()
        t0 = time.perf_counter()
        backend.infer_torch(ct, mask)
        seconds[batch] = round(time.perf_counter() - t0, 1)
    verdicts = {k: v for c in ("inductor", "aot_autograd") for k, v in counters[c].items() if "cache" in k}
    print(json.dumps({"seconds": seconds, "caches": verdicts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m2anet_small")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--runs", type=int, default=2)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument("--no-prepack", action="store_true")
    variant.add_argument("--aoti", action="store_true")
    parser.add_argument("--child", metavar="CACHE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model, args.device, args.child, not args.no_prepack, args.aoti)
    print(f"{args.model} on {args.device}, opening the backend and its first call per batch size, seconds\n")
    columns = ["open", *map(str, BATCHES)]
    print("| run | open | " + " | ".join(f"batch {b}" for b in BATCHES) + " | cache verdicts |")
    print("| --- |" + " ---: |" * len(columns) + " --- |")
    with tempfile.TemporaryDirectory() as cache:
        argv = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--child", cache]
        argv += ["--no-prepack"] * args.no_prepack + ["--aoti"] * args.aoti
        for run in range(1, args.runs + 1):
            out = subprocess.run(argv, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"run {run} failed: {out.stderr.strip().splitlines()[-1]}")
            r = json.loads(out.stdout.splitlines()[-1])
            caches = ", ".join(f"{k} {v}" for k, v in sorted(r["caches"].items())) or "-"
            print(f"| {run} | " + " | ".join(str(r["seconds"][c]) for c in columns) + f" | {caches} |")


if __name__ == "__main__":
    main()
