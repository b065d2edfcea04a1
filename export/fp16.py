"""FP16 graph: FP32 inputs and outputs, FP16 on the volumes, FP32 from the first reduction on.

The converter is ONNX Runtime's (`onnxruntime.transformers.float16`), which copes with graph
outputs that are also consumed inside the graph. What runs in FP16 is decided by one rule:

* FP16: the nodes whose output is a volume (a 5-D tensor) and whose op is in `FP16_VOLUME_OPS`:
  the convolutions of encoder and decoder with their ReLUs and residual Adds, the pooling, and the
  soft-mask rings and attention maps (Mul, Concat, Slice). That is nearly all of the FLOPs.
* FP32: everything else. Every reduction of a volume (MatMul, ReduceSum, ReduceMean) and all that
  follows it: the masked-pooling sums and division, the token projections, the geometry features
  (ring masses, second moments and their invariants, Sqrt, standardisation), the token fusion
  (Tanh, Sigmoid, Softmax) and the head (Gemm, ReLU). On volumes, the ops outside the list (the
  attention Sigmoids, the ring-mixing ReduceSums) stay FP32 too.

The FP32 part is a few thousand FLOPs per node, and it is where FP16 would move the metastasis
probability: a 4096-voxel sum, a softmax, and the contour's variances, which subtract nearly equal
second moments. Node names change with every export, so the rule is applied to the shapes the
exported graph infers, not to a list of names; tests/test_fp16_precision.py checks the result.

The converter keeps the tensors between two FP32 nodes in FP16 (it casts every FP32 node's output
to FP16 and back before the next FP32 node reads it), which would round the pooled sums and every
step of the geometry features to FP16 after all; those Cast pairs are removed. Before ONNX Runtime
1.32 it also gave an FP16 tensor read by several FP32 nodes one Cast per reader, all writing the same
name, which the checker refuses (`... has been used as output names multiple times`); one is kept.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel

from m2anet.export.onnx_export import check_graph
from m2anet.io import atomic_path

FP16_VOLUME_OPS = frozenset(
    {"Conv", "ConvTranspose", "Relu", "Add", "AveragePool", "MaxPool", "Mul", "Concat", "Slice"}
)


def _fp32_nodes(proto: onnx.ModelProto) -> list[str]:
    """The nodes with a float output that the rule keeps in FP32, by name (what the converter takes)."""
    graph = onnx.shape_inference.infer_shapes(proto, strict_mode=True).graph
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*graph.value_info, *graph.input, *graph.output]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    keep = []
    for node in graph.node:
        float_ranks = [ranks[o] for o in node.output if o in ranks]
        if float_ranks and (node.op_type not in FP16_VOLUME_OPS or any(r != 5 for r in float_ranks)):
            if not node.name:
                raise ValueError(f"the FP32 graph has an unnamed {node.op_type} node: re-export it")
            keep.append(node.name)
    return keep


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _drop_duplicate_casts(proto: onnx.ModelProto) -> None:
    """Keep the first of identical Casts (same name, input, output and type), which ONNX Runtime's
    converter before 1.32 writes once per FP32 reader of a tensor: ONNX Runtime 1.30 is what the GPU
    image holds."""
    seen: set[bytes] = set()
    repeats = []
    for i, node in enumerate(proto.graph.node):
        if node.op_type == "Cast":
            key = node.SerializeToString(deterministic=True)
            if key in seen:
                repeats.append(i)
            seen.add(key)
    for i in reversed(repeats):
        del proto.graph.node[i]


def _drop_fp16_round_trips(model: OnnxModel) -> None:
    """Let each FP32 node and output read the FP32 tensor itself, not its FP32 -> FP16 -> FP32 copy."""
    producer = model.output_name_to_node()
    graph_outputs = set(model.get_graphs_output_names())
    for node in model.nodes():
        parent = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if (
            parent is not None
            and parent.op_type == "Cast"
            and _cast_to(parent) == onnx.TensorProto.FLOAT16
            and _cast_to(node) == onnx.TensorProto.FLOAT
        ):
            node.input[0] = parent.input[0]  # a float -> float Cast: it keeps a graph output's name
            if node.output[0] not in graph_outputs:
                model.replace_input_of_all_nodes(node.output[0], parent.input[0])
    model.prune_graph()  # the bypassed Casts, and the FP16 copies nothing reads any more


def convert_fp16(fp32_path: str | Path, path: str | Path, keep_fp32_nodes: list[str] | None = None) -> Path:
    source = onnx.load(str(fp32_path))
    proto = convert_float_to_float16(
        source,
        keep_io_types=True,
        op_block_list=DEFAULT_OP_BLOCK_LIST,  # ops the converter cannot run in FP16 at all
        node_block_list=_fp32_nodes(source) + (keep_fp32_nodes or []),
    )
    _drop_duplicate_casts(proto)
    model = OnnxModel(proto)
    _drop_fp16_round_trips(model)
    model.topological_sort()  # the converter appends its Casts out of order; the checker rejects that
    del model.model.graph.value_info[:]  # stale pre-conversion types; shape inference rebuilds them
    check_graph(model.model)
    with atomic_path(path) as tmp:
        onnx.save(model.model, str(tmp))
    return Path(path)
