"""FP32 ONNX export with the dynamo exporter, checked before anything is built from it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from m2anet.data import load_split
from m2anet.engines.base import INPUT_NAMES, OUTPUT_NAMES
from m2anet.io import atomic_path
from m2anet.model import M2ANet

OPSET = 20


class ExportError(RuntimeError):
    """The export produced a graph that fails its checks: nothing is written under the final name."""


def example_inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Real patches from the calibration split (not noise), so checks see realistic activations."""
    c = load_split("calib", n=batch, seed=None if seed == 0 else seed)
    return torch.from_numpy(c.ct), torch.from_numpy(c.mask)


def export_fp32(model: M2ANet, path: str | Path, max_batch: int = 1024) -> Path:
    """Export with only the batch dynamic, BatchNorm folded (exporter's optimizer), full check."""
    model = model.eval()
    ct, mask = example_inputs(2)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    outputs = OUTPUT_NAMES[: 2 if model.heads == "both" else 1]
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (axis naming, torchvision ops) is not actionable
        exporter_log.setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (ct, mask),
            dynamo=True,
            input_names=list(INPUT_NAMES),
            output_names=list(outputs),
            dynamic_shapes={"ct": {0: batch}, "mask": {0: batch}},
            opset_version=OPSET,
            optimize=True,
            external_data=False,
            verbose=False,
        )
        exporter_log.setLevel(level)
    if program is None:  # dynamo=True always returns one
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    proto = program.model_proto
    check_graph(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def check_graph(proto: onnx.ModelProto) -> None:
    """Full checker plus strict shape inference; BatchNorm must be folded away."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
    left = [n.name for n in proto.graph.node if n.op_type == "BatchNormalization"]
    if left:
        raise ExportError(f"BatchNormalization {left[0]} was not folded into its Conv")


def check_node_names(path: str | Path, names: list[str], flag: str) -> None:
    """ValueError naming the first of `names` that no node of the graph at `path` has: a typo would keep
    nothing in FP32 and still export."""
    if not names:
        return
    nodes = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]
    known = set(nodes)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"{flag} {unknown[0]!r}: {Path(path).name} has no node of that name (its {len(nodes)} are named "
            f"like {nodes[0]!r}): copy the names from it (a graph viewer such as Netron shows them; "
            "m2a-verify --diagnose prints the INT8 ones to keep)"
        )


def max_abs_diff(model: M2ANet, onnx_path: str | Path, batches: tuple[int, ...] = (1, 7)) -> dict[str, float]:
    """Largest |PyTorch - ONNX Runtime CPU| per output over real patches at each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst: dict[str, float] = {}
    for b in batches:
        ct, mask = example_inputs(b, seed=17)
        with torch.no_grad():
            ref = [t.numpy() for t in model.eval()(ct, mask)]
        got = session.run(None, {"ct": ct.numpy(), "mask": mask.numpy()})
        for out, r, g in zip(session.get_outputs(), ref, got, strict=True):
            worst[out.name] = max(worst.get(out.name, 0.0), float(np.abs(r - g).max()))
    return worst


def io_signature(path: str | Path) -> dict[str, list[dict]]:
    """Names, shapes (batch as 'batch') and dtypes of a graph's inputs and outputs."""
    proto = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        return [
            {
                "name": v.name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            }
            for v in values
        ]

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}
