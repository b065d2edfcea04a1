"""CI benchmarks (pytest-benchmark) of the backends on m2anet_small, gated on interleaved A/B ratios.

Only `ci/bench` runs this folder (pytest's norecursedirs keeps it out of the default run, which
must pass on a loaded machine). CI machines are shared and noisy, so no gate compares a time with
a stored baseline or an absolute rate: each gate times its two backends in alternating rounds on
the same input, on one thread (`m2anet.bench.ab.Interleaved`), and compares the medians, with a
limit well above the ratio measured on a busy 2-core machine (load 5: 0.60, 1.37, 0.24, 1.02 and
1.48 for the gates below, in order) and below what the regression it guards against would give.
`test_latency` records every backend alone, ungated; GPU cases run where a CUDA GPU is present
(TensorRT where the `small` export built a plan) and are recorded, not gated. Rounds are few and
fixed so the suite stays at a few minutes on two cores.
"""

from __future__ import annotations

import math

import pytest
import torch

from m2anet.bench import floor
from m2anet.bench.ab import Interleaved
from m2anet.data import load_split
from m2anet.engines import open_backend

ROUNDS = 5
AB_ROUNDS = 11
"""Odd, so each median is one measured round; 11 rounds of two m2anet_small inferences take seconds."""
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
    # (case, reference case, batch, highest allowed ratio of medians, what a failure means)
    ("ort-fp32", "torch-eager", 1, 1.0, "ONNX Runtime FP32 is no longer faster than PyTorch for one node"),
    ("ort-fp32", "torch-eager", 4, 2.0, "ONNX Runtime FP32 fell far behind eager PyTorch"),
    ("torch-eager", "torch-eager-unpadded", 1, 0.8, "pad_single no longer avoids aten::slow_conv3d_forward"),
    ("ort-fp16", "ort-fp32", 4, 3.0, "the FP16 graph runs far slower than FP32 on the CPU"),
    ("ort-int8", "ort-fp32", 4, 3.0, "the INT8 graph runs far slower than FP32 on the CPU"),
    pytest.param(
        *("torch-cuda-fp16", "torch-cuda-fp32", 32, 1.05, "FP16 channels-last is slower than IEEE FP32"),
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for every backend here. A parallel region waits for its slowest thread, so
    on a shared 2-core machine a neighbour holding one core stretched a 2-thread PyTorch inference
    from 0.3 to 1.7 s at random, on either side of a pair; one thread is slowed by its share only."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def patches():
    cohort = load_split("calib", n=32)
    return cohort.ct, cohort.mask


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
def test_latency(benchmark, request, backends, patches, name, batch):
    backend = backends(name, request)
    ct, mask = patches[0][:batch], patches[1][:batch]
    benchmark.group = f"m2anet_small batch {batch}"
    benchmark.extra_info.update(
        backend=repr(backend), precision=backend.precision, batch=batch, threads=torch.get_num_threads()
    )
    benchmark.pedantic(
        backend.infer, args=(ct, mask), kwargs={"check": False}, rounds=ROUNDS, warmup_rounds=1, iterations=1
    )


@pytest.mark.parametrize(("name", "reference", "batch", "limit", "meaning"), GATES)
def test_interleaved_ratio(benchmark, request, backends, patches, name, reference, batch, limit, meaning):
    """One benchmark round runs both backends once, in alternating order; the JSON keeps each side's
    times, their medians and the ratio next to the round times."""
    a, b = backends(name, request), backends(reference, request)
    ct, mask = patches[0][:batch], patches[1][:batch]
    for backend in (a, b):  # warm-up, outside the rounds
        backend.infer(ct, mask, check=False)
    pair = Interleaved(lambda: a.infer(ct, mask, check=False), lambda: b.infer(ct, mask, check=False))
    benchmark.group = f"A/B {name} vs {reference}, batch {batch}"
    benchmark.pedantic(pair.round, rounds=AB_ROUNDS, warmup_rounds=0, iterations=1)
    if benchmark.disabled:  # --benchmark-disable: one round, no gate
        return
    median_a, median_b = pair.medians()
    ratio = pair.ratio()
    benchmark.extra_info.update(
        a=name,
        b=reference,
        batch=batch,
        threads=torch.get_num_threads(),
        seconds_a=pair.seconds[0],
        seconds_b=pair.seconds[1],
        median_a_s=median_a,
        median_b_s=median_b,
        ratio_of_medians=ratio,
        limit=limit,
    )
    assert ratio <= limit, (
        f"{meaning}: median {name} / median {reference} at batch {batch} = {ratio:.2f} > {limit} "
        f"({AB_ROUNDS} interleaved rounds: {median_a * 1e3:.1f} ms vs {median_b * 1e3:.1f} ms)"
    )


def test_cpu_peaks(benchmark):
    """The arithmetic floor's matmul and copy rates, recorded; only a broken measurement fails."""
    peaks = benchmark.pedantic(floor.measure, args=("cpu",), rounds=1)
    benchmark.extra_info.update(flops=peaks.flops, bandwidth=peaks.bandwidth, skipped=peaks.skipped)
    assert all(math.isfinite(v) and v > 1e8 for v in [*peaks.flops.values(), peaks.bandwidth]), peaks
