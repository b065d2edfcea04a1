"""The INT8 Q/DQ placement A/B of 2026-11-29 (README, INT8 graph): the shipped m2anet_base's FP32 graph
quantized twice with percentile calibration on 128 nodes (what `--calib-method auto` keeps for it), once
with Q/DQ on the convolutions' inputs only (`quantize_static` as export/int8.py called it before) and once
as `quantize_int8` places them now (the skip input of each residual Add too), then both held to the int8
tier on 192 test nodes and benchmarked interleaved beside PyTorch eager FP32.

    python3 bench/results/cpu-2core-intel-xeon-amx-2026-11-29/int8-residual-qdq/run.py OUT
"""

import subprocess
import sys
from pathlib import Path

from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from m2anet.data import load_split
from m2anet.engines.base import run_cohort
from m2anet.engines.ort_backend import OrtBackend
from m2anet.engines.torch_backend import TorchBackend
from m2anet.export.int8 import CALIB_METHODS, TARGET_OPTIONS, Calibration, CalibrationReader, quantize_int8
from m2anet.export.onnx_export import export_fp32
from m2anet.io import sha256_file
from m2anet.manifest import write_manifest
from m2anet.model import create_model
from m2anet.parity import TIERS, compare
from m2anet.weights import training_record


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_fp32(create_model("m2anet_base", pretrained=True), out / "model.fp32.onnx")
    graphs = {
        "conv-inputs-only": out / "conv-inputs-only.int8.onnx",
        "residual-skip": out / "residual-skip.int8.onnx",
    }
    calib = load_split("calib", n=128)
    quantize_static(
        str(fp32), str(graphs["conv-inputs-only"]), CalibrationReader(calib, 8, lambda n: None),
        quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "ConvTranspose"], per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=CALIB_METHODS["percentile"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, **TARGET_OPTIONS["tensorrt"]},
    )  # fmt: skip
    quantize_int8(
        fp32, graphs["residual-skip"], Calibration("percentile", 128, target="tensorrt"), cohort=calib
    )
    write_manifest(
        out, {"artifacts": {p.name: {"sha256": sha256_file(p), "precision": "int8"} for p in graphs.values()}}
    )
    test = load_split("test", n=192)
    with TorchBackend("m2anet_base") as reference:
        want = run_cohort(reference, test, desc="torch fp32")
    for label, path in graphs.items():
        with OrtBackend(path) as backend:
            got = run_cohort(backend, test, desc=label)
        r = compare(want, got, test, float(training_record("m2anet_base")["threshold"]), TIERS["int8"])
        print(f"{label}: int8 tier {'passed' if r['passed'] else 'failed'}, {r['label_flips']} label flips, "
              f"largest probability change {r['prob_max_abs']:.4f}", flush=True)  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "m2anet.cli.bench", "--model", "m2anet_base", "--backend", "torch:cpu",
         *(f"ort:cpu:{p}" for p in graphs.values()), "--scenario", "all", "--batches", "1,8",
         "--duration", "6", "--min-queries", "5", "--warmup", "1", "--threads", "2", "--interleave",
         "--out", str(out / "bench")],
        check=True,
    )  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
