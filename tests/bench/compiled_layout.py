"""What inductor makes of m2anet under torch-compile: graph inputs, BatchNorm, the layout of each
convolution's output and the kernels launched per call, read from the generated code.

    python3 tests/bench/compiled_layout.py [--model m2anet_base] [--batch 1] [--device cpu|cuda]

Both settings of `freezing` are compiled, as `TorchBackend` compiles them (`compiled`), under autocast
(BF16 on the CPU, FP16 on CUDA) with channels-last weights and inputs. On the CPU inductor's oneDNN weight
prepacking is turned off, so the convolutions stay the aten ones CUDA runs; the kernel counts are then the
CPU's fusion, not Triton's (docs/gpu.md, top).
"""

from __future__ import annotations

import argparse
import re

import torch
from torch._inductor import config
from torch._inductor.utils import run_and_get_code

from m2anet.contract import PATCH_SHAPE
from m2anet.engines.torch_backend import channels_last, compiled
from m2anet.model import create_model

LAUNCH = re.compile(r"^\s+(cpp_fused\w*\(|\w+\.run\(|extern_kernels\.\w+\()", re.M)
# torch 2.15 checks each output's dtype too (assert_tensor_metadata), earlier releases size and stride only
CONV_OUT = re.compile(
    r"assert_(?:size_stride|tensor_metadata)\(\w+, \([^)]*\), \(([^)]*)\), "
    r"(?:[\w.]+, )?'torch.ops.aten.convolution"
)


def inspect(model_name: str, batch: int, device: str, freezing: bool) -> dict[str, object]:
    model = create_model(model_name, pretrained=True).to(device, memory_format=torch.channels_last_3d)
    ct = channels_last(torch.rand(batch, 1, *PATCH_SHAPE, device=device))
    mask = channels_last((torch.rand(batch, 1, *PATCH_SHAPE, device=device) > 0.9).float())
    run = compiled(model, "default", freezing, dynamic=False)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.no_grad(), torch.autocast(device, dtype=dtype, cache_enabled=False):
        _, codes = run_and_get_code(run, ct, mask)
    return graph_facts("\n".join(codes))


def graph_facts(code: str) -> dict[str, object]:
    """What the generated code's `call` takes and launches (tests/test_torch_backends.py reads it too)."""
    call = code[code.index("def call(self, args):") :]
    strides = [s.split(", ") for s in CONV_OUT.findall(call)]
    return {
        "graph inputs": len(re.findall(r"arg\d+_\d+", call.splitlines()[1])),
        "BatchNorm in the graph": "batch_norm" in call,
        "NDHWC convolutions": f"{sum(s[1] == '1' for s in strides)} of {len(strides)}",
        "kernel launches": len(LAUNCH.findall(call)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m2anet_base")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    config.cpp.weight_prepack = False
    rows = {f: inspect(args.model, args.batch, args.device, f) for f in (False, True)}
    print(f"{args.model}, batch {args.batch}, {args.device}\n")
    print("| freezing | " + " | ".join(rows[True]) + " |")
    print("| --- |" + " ---: |" * len(rows[True]))
    for freezing, row in rows.items():
        print(f"| {freezing} | " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
