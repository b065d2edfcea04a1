"""One runtime interface over PyTorch, ONNX Runtime, TensorRT and Triton backends."""
