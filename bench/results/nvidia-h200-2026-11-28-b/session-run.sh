#!/usr/bin/env bash
# One GPU call (second session of 2026-11-28): ci/gpu-train alone on the machine (issue 14: both configs
# from scratch, 14,000 nodes x 12 epochs), then, in whatever is left of 570 s, m2a-verify and m2a-bench of
# the paths the last ci/gpu-check did not verify (folded CUDA graphs, compiled bf16). Everything lands in $OUT.
set -u
export PYTHONUNBUFFERED=1
W=/tmp/w
mkdir -p "$W"
exec > >(tee "$OUT/run.log") 2>&1
echo "start $(date -u +%FT%TZ)"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv; nproc
  python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())'; } 2>&1 | tee "$W/machine.txt"
GPU_TRAIN_MINUTES=8.3 timeout 530 bash ci/gpu-train "$W/train"
echo "gpu-train exit $? at ${SECONDS}s"
for m in base small; do tr '\r' '\n' <"$W/train/m2anet_$m.log" | grep -v '^ *$' | grep -v 'step/s' | tail -16; done
tar -C "$W/train" --exclude=./site -cf - . | split -b 15M - "$OUT/gt.tar."
left=$((570 - SECONDS))
if ((left >= 80)); then
	specs=(torch:cuda:fp16@cuda_graphs=true torch:cuda:bf16@cuda_graphs=true torch-compile:cuda:bf16)
	timeout $((left / 2)) python3 ci/gpu_check.py verify "$W/check" m2anet_base 128 "${specs[@]}" >"$W/verify.log" 2>&1
	echo "verify exit $? at ${SECONDS}s"
	left=$((570 - SECONDS))
	((left > 30)) && timeout "$left" python3 -m m2anet.cli.bench --model m2anet_base --backend torch:cuda "${specs[@]}" \
		--scenario all --batches 1,32,256 --duration 0.5 --warmup 0.3 --min-queries 20 --out "$W/check/bench" >"$W/bench.log" 2>&1
	echo "bench exit $? at ${SECONDS}s"
	python3 ci/gpu_check.py summary "$W/check" >/dev/null 2>&1; cat "$W/check/summary.md" 2>/dev/null | head -30
	tar czf "$OUT/check.tgz" -C "$W" check verify.log bench.log machine.txt
fi
ls -la "$OUT"
echo "end at ${SECONDS}s"
