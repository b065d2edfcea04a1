"""ONNX export, FP16 and INT8 graphs, TensorRT engine builds and their manifest (m2a-export)."""
