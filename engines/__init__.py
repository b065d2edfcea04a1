"""One runtime interface over PyTorch, ONNX Runtime, TensorRT and Triton backends."""

from m2anet.engines.base import Backend, InputError, check_inputs, run_cohort
from m2anet.engines.spec import BackendSpec, open_backend

__all__ = ["Backend", "BackendSpec", "InputError", "check_inputs", "open_backend", "run_cohort"]
