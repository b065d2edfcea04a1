"""The aten operations one eager forward of m2anet dispatches, FP32 against autocast with the weights cast
once (as `TorchBackend` runs eager half precision): at batch 1 on a GPU each costs host time whether or not
it launches a kernel, and that host time is what eager single nodes measure (docs/gpu.md, Next).

    python3 tests/bench/eager_dispatch.py [--model m2anet_base]

Counted on the CPU under BF16 autocast, whose cast lists differ from CUDA's: the casts it adds are the
CPU's; the FP32 count is the same on either device.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m2anet.engines.torch_backend import cast_weights_once
from m2anet.model import PATCH_SHAPE, create_model


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m2anet_base")
    args = parser.parse_args()
    ct = torch.rand(1, 1, *PATCH_SHAPE)
    mask = (torch.rand(1, 1, *PATCH_SHAPE) > 0.9).float()
    fp32 = create_model(args.model, pretrained=True)
    half = cast_weights_once(create_model(args.model, pretrained=True), torch.bfloat16)
    with torch.inference_mode(), Count() as plain:
        fp32(ct, mask)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16), Count() as mixed:
        half(ct, mask)
    elementwise = sum(plain.ops[k] for k in ("mul", "add", "sub", "div"))
    print(f"{args.model}, batch 1: {plain.ops.total()} aten operations in FP32, {elementwise} elementwise")
    print(f"under autocast: {mixed.ops.total()}; added: {dict(mixed.ops - plain.ops)}")
    print("most frequent (FP32):", ", ".join(f"{k} {n}" for k, n in plain.ops.most_common(8)))


if __name__ == "__main__":
    main()
