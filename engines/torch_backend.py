"""PyTorch eager, torch.compile and torch-tensorrt runners of the reference model."""

from __future__ import annotations

import json
import warnings
from importlib import resources
from typing import Any

import numpy as np
import torch

from m2anet.engines.base import INPUT_NAMES, Backend
from m2anet.model import PATCH_SHAPE, Heads, create_model
from m2anet.optional import lazy_import

TORCH_TRT_KEYWORDS: dict[str, Any] = json.loads(
    resources.files("m2anet.engines").joinpath("torch_tensorrt_compile.json").read_text()
)["versions"]
OPTIONAL_KEYWORDS = {"use_explicit_typing"}
"""Keywords that later releases dropped because what they asked for became the only behaviour."""
torch_tensorrt = lazy_import(
    "torch_tensorrt", "pip install 'm2anet[gpu]' (torch-tensorrt matching your torch)"
)

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    """Eager PyTorch; on CUDA optionally FP16/BF16 autocast, channels-last, torch.compile.

    On the CPU a batch of one falls into `aten::slow_conv3d_forward` instead of oneDNN (about
    3x slower per node than batch 2 on the reference machine); `pad_single=True` (default)
    runs a single node as a batch of two and drops the copy, so users are not left on it.
    """

    def __init__(
        self,
        model_name: str = "m2anet_base",
        device: str = "cpu",
        precision: str = "fp32",
        heads: Heads = "both",
        weights: str | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        channels_last: bool = False,
        pad_single: bool = True,
        tensorrt_batch: tuple[int, int, int] | None = None,
    ) -> None:
        """`tensorrt_batch=(min, opt, max)` compiles with torch-tensorrt's dynamo path instead."""
        if precision not in ("fp32", *_AUTOCAST):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
        if precision != "fp32" and not device.startswith("cuda"):
            raise ValueError(
                f"{precision} autocast is only offered on cuda: use precision='fp32' on {device}"
            )
        self.torch_device = torch.device(device)
        model = create_model(model_name, pretrained=weights is None, heads=heads, weights=weights)
        model = model.to(self.torch_device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        self.model = model
        self.forward = model
        if compile:
            mode = "reduce-overhead" if cuda_graphs else None  # CUDA graphs via inductor's cudagraph trees
            self.forward = torch.compile(model, mode=mode, dynamic=False)
        self.name = "torch-compile" if compile else "torch"
        self.autocast = _AUTOCAST.get(precision)
        if tensorrt_batch is not None:
            self.forward = _torch_tensorrt(model, tensorrt_batch, precision)
            self.name, self.max_batch, self.autocast = "torch-trt", tensorrt_batch[2], None
        self.precision, self.device = precision, str(self.torch_device)
        self.outputs = self.outputs[: 2 if heads == "both" else 1]
        self.channels_last = channels_last
        self.pad_single = pad_single and self.torch_device.type == "cpu"

    @torch.no_grad()
    def infer_torch(self, ct: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Tensors already on the backend's device go in without a copy."""
        single = self.pad_single and ct.shape[0] == 1
        if single:
            ct, mask = ct.expand(2, -1, -1, -1, -1), mask.expand(2, -1, -1, -1, -1)
        if self.channels_last:
            ct = ct.contiguous(memory_format=torch.channels_last_3d)
        dtype = self.autocast
        with (
            torch.autocast(self.torch_device.type, dtype=dtype, enabled=dtype is not None),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            out = self.forward(ct, mask)
        return tuple(o[:1].float() if single else o.float() for o in out)

    def _run(self, ct: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, ...]:
        dev = self.torch_device
        out = self.infer_torch(torch.from_numpy(ct).to(dev), torch.from_numpy(mask).to(dev))
        return tuple(o.cpu().numpy() for o in out)


def compile_keywords(version: str, wanted: dict[str, Any]) -> dict[str, Any]:
    """`wanted`, less the keywords this torch-tensorrt release does not take (`use_explicit_typing`
    went in 2.13, where every network is explicitly typed). `compile` swallows unknown keywords into
    **kwargs, so one left in would be ignored silently; the lists per release come from each
    release's sources (engines/torch_tensorrt_compile.json, checked by ci/trt-conformance)."""
    release = version.split("+")[0]
    known = TORCH_TRT_KEYWORDS.get(release)
    if known is None:
        raise RuntimeError(
            f"torch-tensorrt {version} is not a release this project was checked against "
            f"({', '.join(TORCH_TRT_KEYWORDS)}): pip install 'torch-tensorrt>=2.10,<2.15'"
        )
    accepted = set(known["torch_tensorrt.dynamo.compile"]["keyword_only"])
    missing = sorted(set(wanted) - accepted - OPTIONAL_KEYWORDS)
    if missing:
        raise RuntimeError(
            f"torch-tensorrt {version} has no compile keyword {', '.join(missing)}: upgrade it"
        )
    return {k: v for k, v in wanted.items() if k in accepted}


def _torch_tensorrt(model: torch.nn.Module, batch: tuple[int, int, int], precision: str) -> torch.nn.Module:
    """Compile with torch-tensorrt (dynamo IR), explicitly typed like every engine of this project:
    FP32 as exported, or FP16 through torch-tensorrt's autocast (it keeps reductions in FP32).
    Without `autocast_low_precision_type` the autocast is a no-op and the engine stays FP32."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"torch-trt offers fp32 or fp16, got {precision!r}")
    shape = (1, *PATCH_SHAPE)
    inputs = [
        torch_tensorrt.Input(
            min_shape=(batch[0], *shape),
            opt_shape=(batch[1], *shape),
            max_shape=(batch[2], *shape),
            dtype=torch.float32,
        )
        for _ in INPUT_NAMES
    ]
    half = precision == "fp16"
    wanted = {
        "use_explicit_typing": True,
        "enable_autocast": half,
        "autocast_low_precision_type": torch.float16 if half else None,
    }
    return torch_tensorrt.compile(
        model, ir="dynamo", inputs=inputs, **compile_keywords(torch_tensorrt.__version__, wanted)
    )
