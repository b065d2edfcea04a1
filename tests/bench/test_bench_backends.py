"""CI benchmarks (pytest-benchmark) of the backends on m2anet_small, gated on same-run ratios.

CI machines are shared and noisy, so no gate compares a time with a stored baseline: each divides
two times measured in this run, on the same input, with the same thread count. Rounds are few
and fixed so the suite stays well under two minutes on two cores; `ci/bench` saves the JSON.
GPU cases run where a CUDA GPU is present (TensorRT where the `small` export built a plan) and
are recorded, not gated.
"""

from __future__ import annotations

import pytest
import torch

from m2anet.data import load_split
from m2anet.engines import open_backend

ROUNDS = 5
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CPU = {
    "torch-eager": ("torch:cpu", {}),
    "torch-eager-unpadded": ("torch:cpu", {"pad_single": False}),
    "ort-fp32": ("ort:cpu:{}/model.fp32.onnx", {}),
    "ort-fp16": ("ort:cpu:{}/model.fp16.onnx", {}),
    "ort-int8": ("ort:cpu:{}/model.int8.onnx", {}),
}
GPU = {
    "torch-cuda-fp32": ("torch:cuda", {}),
    "torch-cuda-fp16": ("torch:cuda:fp16", {}),
    "trt-fp16": ("trt:{}/model.fp16.plan", {}),
}
CASES = [
    *((name, batch) for name in CPU for batch in (1, 4) if (name, batch) != ("torch-eager-unpadded", 4)),
    *(pytest.param(name, batch, marks=needs_gpu) for name in GPU for batch in (1, 32)),
]

GATES = [
    # (case, reference case, batch, highest allowed time ratio, what a failure means)
    ("ort-fp32", "torch-eager", 1, 1.0, "ONNX Runtime FP32 is no longer faster than PyTorch for one node"),
    ("ort-fp32", "torch-eager", 4, 2.0, "ONNX Runtime FP32 fell far behind eager PyTorch"),
    ("torch-eager", "torch-eager-unpadded", 1, 0.8, "pad_single no longer avoids aten::slow_conv3d_forward"),
    ("ort-fp16", "ort-fp32", 4, 3.0, "the FP16 graph runs far slower than FP32 on the CPU"),
    ("ort-int8", "ort-fp32", 4, 3.0, "the INT8 graph runs far slower than FP32 on the CPU"),
    ("torch-cuda-fp16", "torch-cuda-fp32", 32, 1.05, "FP16 channels-last is slower than IEEE FP32"),
]


@pytest.fixture(scope="module")
def patches():
    cohort = load_split("calib", n=32)
    return cohort.ct, cohort.mask


@pytest.fixture(scope="module")
def fastest():
    """Fastest round per (case, batch) of this run: on a shared machine the slower rounds measure the
    neighbours, so the minimum is the least disturbed estimate to take ratios of."""
    return {}


@pytest.fixture(scope="module")
def backends():
    """Opened once per module; the `small` export is asked for only by the artifact cases, so the
    torch cases run without it."""
    opened = {}

    def get(name, request):
        if name not in opened:
            spec, options = {**CPU, **GPU}[name]
            if spec.startswith("torch"):
                options = {"model_name": "m2anet_small", **options}
            else:
                small = request.getfixturevalue("small")
                spec = spec.format(small)
                if spec.startswith("ort"):
                    options = {"threads": torch.get_num_threads()}  # the same threads as torch
                elif not (small / "model.fp16.plan").is_file():
                    pytest.skip("the small export built no TensorRT plan here")
            opened[name] = open_backend(spec, **options)
        return opened[name]

    yield get
    for backend in opened.values():
        backend.close()


@pytest.mark.parametrize(("name", "batch"), CASES)
def test_latency(benchmark, request, backends, patches, fastest, name, batch):
    backend = backends(name, request)
    ct, mask = patches[0][:batch], patches[1][:batch]
    benchmark.group = f"m2anet_small batch {batch}"
    benchmark.extra_info.update(
        backend=repr(backend), precision=backend.precision, batch=batch, threads=torch.get_num_threads()
    )
    benchmark.pedantic(
        backend.infer, args=(ct, mask), kwargs={"check": False}, rounds=ROUNDS, warmup_rounds=1, iterations=1
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        fastest[name, batch] = benchmark.stats.stats.min


@pytest.mark.parametrize(("name", "reference", "batch", "limit", "meaning"), GATES)
def test_same_run_ratio(fastest, name, reference, batch, limit, meaning):
    if (name, batch) not in fastest or (reference, batch) not in fastest:
        pytest.skip("needs both benchmarks of this run (deselected, or --benchmark-disable)")
    ratio = fastest[name, batch] / fastest[reference, batch]
    assert ratio <= limit, f"{meaning}: {name} / {reference} at batch {batch} = {ratio:.2f} > {limit}"
