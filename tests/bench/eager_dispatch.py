"""The aten operations one eager forward of m2anet dispatches, FP32 against autocast with the weights cast
once (as `TorchBackend` runs eager half precision): at batch 1 on a GPU each costs host time whether or not
it launches a kernel, and that host time is what eager single nodes measure (docs/gpu.md, Next).

    python3 tests/bench/eager_dispatch.py [--model m2anet_base] [--device cpu|cuda]

On the CPU, counted under BF16 autocast, whose cast lists differ from CUDA's: the casts it adds are the
CPU's; the FP32 count is the same on either device. With `--device cuda`, each eager CUDA backend as
`m2a-bench` opens it (IEEE FP32, FP16 and BF16 under CUDA's autocast, each with BatchNorm kept and folded),
one forward after a warm-up, as a Markdown table: what decides whether eager half precision can be as
fast as FP32 at batch 1.
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m2anet.contract import PATCH_SHAPE
from m2anet.engines import open_backend
from m2anet.engines.torch_backend import cast_weights_once
from m2anet.model import create_model


class Count(TorchDispatchMode):
    """Every aten operation by name, and by the model's top-level module that dispatched it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.by_module: collections.Counter[str] = collections.Counter()
        self.kernels: collections.Counter[str] = collections.Counter()  # by module, the operations not views
        self.inside = ["(M2ANet itself)"]
        self.hooks = []
        for name, module in model.named_children():
            self.hooks += [
                module.register_forward_pre_hook(lambda *_, name=name: self.inside.append(name) and None),
                module.register_forward_hook(lambda *_: self.inside.pop() and None),
            ]

    def __exit__(self, *exc: Any) -> None:
        """The hooks leave with the count: a model counted twice (or run afterwards) carries none."""
        for hook in self.hooks:
            hook.remove()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        self.by_module[self.inside[-1]] += 1
        self.kernels[self.inside[-1]] += not func.is_view
        return func(*args, **(kwargs or {}))


CUDA_SPECS = tuple(
    f"torch:cuda{precision}{fold}" for precision in ("", ":fp16", ":bf16") for fold in ("", "@fold_bn=true")
)


def on_cuda(model_name: str, ct: torch.Tensor, mask: torch.Tensor) -> None:
    print(f"{model_name}, batch 1, one eager forward on {torch.cuda.get_device_name()}\n")
    print("| backend | aten operations | not views | casts | BatchNorm operations |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ct, mask = ct.cuda(), mask.cuda()
    for spec in CUDA_SPECS:
        with open_backend(spec, model_name=model_name) as backend:
            backend.infer_torch(ct, mask)  # cuDNN's algorithm choice and lazy set-up are not the forward
            with Count(backend.model) as count:
                backend.infer_torch(ct, mask)
        row = (
            count.ops.total(),
            count.kernels.total(),
            count.ops["to"] + count.ops["_to_copy"],
            sum(n for op, n in count.ops.items() if "batch_norm" in op),
        )
        print(f"| `{spec}` | " + " | ".join(map(str, row)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="m2anet_base")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    ct = torch.rand(1, 1, *PATCH_SHAPE)
    mask = (torch.rand(1, 1, *PATCH_SHAPE) > 0.9).float()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda needs a CUDA GPU and a CUDA build of torch: run it on the GPU machine"
            )
        on_cuda(args.model, ct, mask)
        return
    fp32 = create_model(args.model, pretrained=True)
    half = cast_weights_once(create_model(args.model, pretrained=True), torch.bfloat16)
    with torch.inference_mode(), Count(fp32) as plain:
        fp32(ct, mask)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16), Count(half) as mixed:
        half(ct, mask)
    elementwise = sum(plain.ops[k] for k in ("mul", "add", "sub", "div"))
    print(f"{args.model}, batch 1: {plain.ops.total()} aten operations in FP32, {elementwise} elementwise")
    print(f"under autocast: {mixed.ops.total()}; added: {dict(mixed.ops - plain.ops)}")
    print("most frequent (FP32):", ", ".join(f"{k} {n}" for k, n in plain.ops.most_common(8)))
    print("by module (FP32):", ", ".join(f"{k} {n}" for k, n in plain.by_module.most_common()))
    print(
        f"not views (about a kernel each on a GPU): {plain.kernels.total()};",
        ", ".join(f"{k} {n}" for k, n in plain.kernels.most_common(4)),
    )


if __name__ == "__main__":
    main()
