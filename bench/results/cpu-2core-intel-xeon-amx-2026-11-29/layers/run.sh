#!/usr/bin/env bash
# m2a-bench --layers on this 2-core CPU: eager and frozen compiled m2anet_base side by side at batch 8,
# each convolution against its own floor (layers.md, layers.png).
set -euo pipefail
cd "$(dirname "$0")"
m2a-bench --model m2anet_base --backend torch:cpu torch-compile:cpu --scenario offline --batches 8 \
	--duration 4 --warmup 1 --min-queries 5 --threads 2 --interleave --layers --out .
