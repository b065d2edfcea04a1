#!/usr/bin/env bash
# One GPU session: issue 14's training (both configs, generator version 3) beside ci/gpu-check's untimed
# steps, then gpu-check's timed steps alone on the machine; everything packed into $OUT.
set -u
export PYTHONUNBUFFERED=1
W=/tmp/w
mkdir -p "$W"
exec > >(tee "$OUT/run.log") 2>&1
echo "start $(date -u +%FT%TZ)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$W/install.log" 2>&1 || cat "$W/install.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep -i 'model name'; python3 -c 'import torch, numpy, scipy; print(torch.__version__, numpy.__version__, scipy.__version__)'; } >"$W/machine.txt" 2>&1
cat "$W/machine.txt"
train() { # MODEL N EPOCHS MAX_MINUTES
	taskset -c "4-$(($(nproc) - 1))" timeout 400 python3 -m m2anet.cli.train --model "$1" --device cuda --n-train "$2" \
		--epochs "$3" --max-minutes "$4" --out "$W/$1" >"$W/$1.log" 2>&1
	echo "$1 exit $? at ${SECONDS}s"
}
train m2anet_base 12000 8 5.0 &
p1=$!
train m2anet_small 12000 10 4.5 &
p2=$!
GPU_CHECK_STEPS="tests verify" GPU_CHECK_SECONDS=250 taskset -c 0-3 bash ci/gpu-check "$W/check" m2anet_base >/dev/null 2>&1
echo "check phase A exit $? at ${SECONDS}s"
wait "$p1" "$p2"
for m in base small; do tail -c 1500 "$W/m2anet_$m.log" | tr '\r' '\n' | grep -v '^train ' | tail -14; done
tar czf - -C "$W" m2anet_base m2anet_small m2anet_base.log m2anet_small.log machine.txt | split -b 15M - "$OUT/train.tgz.part-"
left=$((530 - SECONDS))
((left < 60)) && left=60
GPU_CHECK_STEPS="train profile bench" GPU_CHECK_SECONDS=$left timeout $((left + 40)) bash ci/gpu-check "$W/check" m2anet_base >/dev/null 2>&1
echo "check phase B exit $? at ${SECONDS}s"
cat "$W/check/steps.tsv" "$W/check/summary.md" 2>/dev/null | head -60
cp "$W/check/summary.md" "$OUT/" 2>/dev/null
tar czf "$OUT/check.tgz" --exclude=check/site -C "$W" check
ls -la "$OUT"
echo "end at ${SECONDS}s"
