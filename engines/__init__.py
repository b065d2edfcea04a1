"""One runtime interface over PyTorch, ONNX Runtime and TensorRT backends."""

from m2anet.engines.base import Backend, InputError, check_inputs
from m2anet.engines.spec import open_backend

__all__ = ["Backend", "InputError", "check_inputs", "open_backend"]
