#!/usr/bin/env bash
# Why m2a-bench --interleave: two identical backends (torch:cpu twice, so x torch fp32 should read 1.00)
# while two CPU burners start 25 s into each run and last 20 s. Back to back, the burst lands on the second
# backend; interleaved, on both alike. Writes sequential/ and interleaved/ beside this script.
set -u
here=$(realpath "$(dirname "$0")")
cd "$here/../../../.."
burn() { sleep 25; for _ in 1 2; do timeout 20 python3 -c 'while True: pass' & done; wait; }
for mode in sequential interleaved; do
	extra=()
	[[ $mode == interleaved ]] && extra=(--interleave)
	burn &
	burner=$!
	python3 -m m2anet.cli.bench --model m2anet_small --backend torch:cpu "torch:cpu@pad_single=true" \
		--scenario offline --batches 2 --duration 20 --warmup 1 --min-queries 3 --threads 2 \
		--matmul-size 512 --copy-mib 32 "${extra[@]}" --out "$here/$mode"
	wait "$burner"
done
