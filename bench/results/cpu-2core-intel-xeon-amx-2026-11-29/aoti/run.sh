#!/usr/bin/env bash
# torch-compile:cpu (JIT, frozen) against its AOTInductor package and eager PyTorch, interleaved,
# m2anet_small, 2 threads (eleventh session). The package was built when the backend opened (its first
# build; m2a-bench opens every backend before measuring).
m2a-bench --model m2anet_small --backend torch-compile:cpu "torch-compile:cpu@aoti=true" torch:cpu \
	--scenario all --batches 8 --study-nodes 24 --duration 4 --min-queries 5 --warmup 1 --threads 2 \
	--interleave --out "${1:-aoti-bench}"
