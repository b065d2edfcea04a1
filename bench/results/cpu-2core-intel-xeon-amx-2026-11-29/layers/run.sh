#!/usr/bin/env bash
# m2a-bench --layers on this 2-core CPU: m2anet_base's eager and frozen compiled PyTorch and its three
# ONNX Runtime graphs side by side at batch 8, each convolution against its own floor (layers.md,
# layers.png). ART: an m2a-export --out folder (exported here when it has no m2anet_base).
set -euo pipefail
cd "$(dirname "$0")"
art=${ART:-/tmp/artb}
[[ -f "$art/m2anet_base/manifest.json" ]] || m2a-export --model m2anet_base --precision all --threads 2 --out "$art" --quiet
m2a-bench --model m2anet_base --backend torch:cpu torch-compile:cpu "ort:cpu:$art/m2anet_base/model."{fp32,fp16,int8}.onnx \
	--scenario offline --batches 8 --duration 4 --warmup 1 --min-queries 5 --threads 2 --interleave --layers --out .
