"""A model that is not M2ANet, for the repository the test server serves: an identity on `image`."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc


def write_other_model(model_dir: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["score"])],
        "other",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 4])],
    )
    (model_dir / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph), model_dir / "1" / "model.onnx")
    config = mc.ModelConfig(name=model_dir.name, platform="onnxruntime_onnx", max_batch_size=8)
    config.input.add(name="image", data_type=mc.TYPE_FP32, dims=[4])
    config.output.add(name="score", data_type=mc.TYPE_FP32, dims=[4])
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
