"""Latency and throughput benchmarks next to the hardware limit (m2a-bench)."""
