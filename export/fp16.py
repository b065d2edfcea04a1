"""FP16 graph: FP32 inputs and outputs, FP16 convolutions, FP32 where parity needs it.

The converter is ONNX Runtime's (`onnxruntime.transformers.float16`), which copes with graph
outputs that are also consumed inside the graph. The masked-pooling sums and division
(MatMul, ReduceSum, Div), the softmaxes, the token fusion and the head (Gemm, Tanh, Sigmoid)
stay in FP32: they are a few thousand FLOPs per node, and a 4096-voxel sum or a softmax in
FP16 is where rounding would move the metastasis probability.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from m2anet.export.onnx_export import check_graph
from m2anet.io import atomic_path

FP32_OPS = ["MatMul", "ReduceSum", "ReduceMean", "Div", "Softmax", "Gemm", "Tanh", "Sigmoid"]


def convert_fp16(fp32_path: str | Path, path: str | Path, keep_fp32_nodes: list[str] | None = None) -> Path:
    proto = convert_float_to_float16(
        onnx.load(str(fp32_path)),
        keep_io_types=True,
        op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS,
        node_block_list=keep_fp32_nodes or [],
    )
    model = OnnxModel(proto)
    model.topological_sort()  # the converter appends its Casts out of order; the checker rejects that
    del model.model.graph.value_info[:]  # stale pre-conversion types; shape inference rebuilds them
    check_graph(model.model)
    with atomic_path(path) as tmp:
        onnx.save(model.model, str(tmp))
    return Path(path)
