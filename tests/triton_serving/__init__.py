"""A real Triton Inference Server for the tests and the load benchmark (no project code runs in it)."""
