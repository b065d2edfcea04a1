"""m2a-bench: statistics, the floor, telemetry, the report, --compare and --select.

The end-to-end run uses tiny durations (two measured queries per step): it checks that every
scenario runs and reports, not what the numbers are. Tests whose name contains `gpu` need a CUDA
GPU (and NVML) and skip without one; ci/gpu-check runs them.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from m2anet.bench import floor, layers, scenarios, suite, targets, telemetry
from m2anet.bench.ab import Interleaved
from m2anet.bench.stats import percentile, summarize
from m2anet.cli import bench as cli
from m2anet.engines import BackendSpec, environment
from m2anet.manifest import read_manifest, write_manifest
from m2anet.model import create_model, model_stats

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

STEP_KEYS = {
    "scenario": str,
    "batch": int,
    "queries": int,
    "nodes": int,
    "warmup_queries": int,
    "warmup_s": float,
    "wall_s": float,
    "timer": str,
    "enqueued_ahead": bool,
    "queue_depth": int,
    "latency_source": str,
    "samples_ns": list,
    "latency_ms": dict,
    "ms_per_node": float,
    "nodes_per_s": float,
    "floor_ms_per_node": float,
    "pct_of_floor": float,
}


# --- statistics and floor ---------------------------------------------------------------------
def test_percentiles_by_nearest_rank():
    samples = list(range(1, 101))
    random.Random(0).shuffle(samples)
    assert summarize(samples) == {"p50": 50, "p90": 90, "p99": 99, "max": 100, "min": 1, "mean": 50.5}
    assert [percentile([4, 1, 3, 2], p) for p in (25, 50, 90, 99, 100)] == [1, 2, 4, 4, 4]
    assert summarize([7])["p99"] == 7
    assert summarize([2_000_000, 4_000_000], scale=1e-6)["mean"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_floor_is_the_larger_of_compute_and_traffic():
    # the numbers: 16.3 GFLOP/node at 180 GFLOP/s is about 90 ms/node
    assert floor.floor_seconds(16.3e9, 1e6, 180e9, 20e9) == pytest.approx(0.0906, abs=1e-4)
    assert floor.floor_seconds(1e6, 1e9, 1e12, 1e10) == pytest.approx(0.1)  # bandwidth-bound
    assert floor.percent_of_floor(90.0, 128.0) == pytest.approx(70.3, abs=0.1)
    io = floor.IO_BYTES_PER_NODE
    assert io == 4 * (3 * 16 * 64 * 64 + 1)
    assert floor.node_bytes(1, 1e6, "fp16") == io + 2e6
    assert floor.node_bytes(4, 1e6, "int8") == io + 0.25e6
    peaks = floor.Peaks("cpu", {"fp32": 1e11, "fp16": 4e11, "int8": 8e11}, 2e10, 256, 1 << 20)
    assert peaks.best_flops("fp32") == 1e11
    assert peaks.best_flops("fp16") == 4e11
    assert peaks.best_flops("bf16") == 1e11  # no bf16 units measured: the FP32 peak bounds it
    assert peaks.best_flops("int8") == 8e11
    gpu = floor.Peaks("cuda", {"fp32": 5e13, "tf32": 4e14, "fp16": 9e14}, 4e12, 1, 1 << 20)
    assert gpu.best_flops("fp32") == 5e13  # IEEE FP32 everywhere: TF32's rate is not FP32's floor
    assert gpu.best_flops("tf32") == gpu.best_flops("bf16") == 4e14


def test_the_floor_keeps_the_fastest_measurement_of_each_rate():
    """A shared host measured at a slow moment must not give a floor that a backend beats."""
    slow = floor.Peaks("cpu", {"fp32": 0.7e11, "int8": 9e11}, 2e10, 256, 1 << 20)
    again = slow.fastest(floor.Peaks("cpu", {"fp32": 1.4e11, "int8": 8e11}, 1e10, 256, 1 << 20))
    assert again.flops == {"fp32": 1.4e11, "int8": 9e11} and again.bandwidth == 2e10
    assert again.measurements == 2 and slow.measurements == 1


def test_peaks_are_measured_on_this_cpu():
    """What was measured, not how fast: the rates themselves are benchmarks (ci/bench, test_cpu_peaks)."""
    peaks = floor.measure("cpu", matmul_size=128, copy_bytes=1 << 20, min_time_s=0.01)
    rates = [*peaks.flops.values(), peaks.bandwidth]
    assert "fp32" in peaks.flops and all(math.isfinite(r) and r > 0 for r in rates)
    assert (peaks.matmul_size, peaks.copy_bytes) == (128, 1 << 20)
    assert set(peaks.flops) | set(peaks.skipped) == set(floor.compute_types("cpu"))


def test_default_run_collects_no_timed_tests(request):
    """ci/test must pass on a loaded machine: timed tests live in tests/bench, which the default run
    does not enter (pytest's norecursedirs) and ci/bench names on its command line."""
    config, tests = request.config, request.config.rootpath / "tests"
    assert config.hook.pytest_ignore_collect(collection_path=tests / "bench", config=config)
    assert not config.hook.pytest_ignore_collect(collection_path=tests, config=config)
    assert "tests/bench" in (tests.parent / "ci" / "bench").read_text()


def test_interleaved_rounds_alternate_and_compare_medians():
    """A B, B A, A B ...: each side goes first in half the rounds; one slow round moves no median."""
    now, calls = [0.0], []

    def work(name, seconds):
        def run():
            calls.append(name)
            now[0] += seconds.pop(0)

        return run

    pair = Interleaved(
        work("a", [2.0, 2.0, 90.0, 2.0, 2.0]), work("b", [4.0, 4.0, 4.0, 4.0, 80.0]), lambda: now[0]
    )
    for _ in range(5):
        pair.round()
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert pair.seconds == ([2.0, 2.0, 90.0, 2.0, 2.0], [4.0, 4.0, 4.0, 4.0, 80.0])
    assert pair.medians() == (2.0, 4.0) and pair.ratio() == 0.5


# --- telemetry --------------------------------------------------------------------------------
@pytest.fixture
def fresh_nvml():
    environment.nvml_missing_reason.cache_clear()
    telemetry.say_nvml_missing.cache_clear()
    yield
    environment.nvml_missing_reason.cache_clear()
    telemetry.say_nvml_missing.cache_clear()


def test_nvml_failure_is_one_line_without_traceback(monkeypatch, capsys, fresh_nvml):
    def broken():
        raise telemetry.pynvml.NVMLError(telemetry.pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(telemetry.pynvml, "nvmlInit", broken)
    for _ in range(2):
        with telemetry.Telemetry("cuda") as tel:
            pass
        summary = tel.summary(nodes=10)
        assert summary["available"] is False and "Not Found" in summary["reason"]
    assert environment.driver_version() is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("m2a-bench: NVML unavailable")
    assert "Traceback" not in err


def test_nvml_here_fails_soft_or_works():
    code = (
        "from m2anet.bench.telemetry import Telemetry\nwith Telemetry('cuda') as t: pass\nprint(t.summary(1))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.stderr
    if not torch.cuda.is_available():
        assert run.stderr.count("NVML unavailable") == 1 and "'available': False" in run.stdout


def test_telemetry_summary_flags_throttling_and_energy():
    cap = telemetry.pynvml.nvmlClocksThrottleReasonSwPowerCap
    idle = telemetry.pynvml.nvmlClocksThrottleReasonGpuIdle
    samples = [
        telemetry.Sample(0.0, 100.0, 1 << 30, 1980, 2619, 50, idle),
        telemetry.Sample(1.0, 300.0, 2 << 30, 1410, 2619, 60, cap),
        telemetry.Sample(2.0, 100.0, 1 << 30, 1980, 2619, 55, 0),
    ]
    s = telemetry.summarize([samples], 2.0, energy_mj=None, nodes=100)
    assert s["energy_j"] == pytest.approx(400.0) and s["energy_source"] == "power samples"
    assert s["joules_per_node"] == pytest.approx(4.0)
    assert s["throttled"] and s["throttle_reasons"] == ["sw_power_cap"]
    assert s["clock_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert s["memory_used_mib_peak"] == 2048 and s["temperature_c_max"] == 60
    assert s["sm_clock_mhz"]["min"] == 1410
    counted = telemetry.summarize([samples[2:]], 2.0, energy_mj=5000.0, nodes=10)
    assert counted["energy_j"] == 5.0 and counted["energy_source"] == "counter"
    assert not counted["throttled"]
    # an interleaved run samples a backend in slices: power is integrated within each, not across the gap
    gap = [samples[:2], [telemetry.Sample(t, 100.0, None, None, None, None, 0) for t in (9.0, 10.0)]]
    assert telemetry.summarize(gap, 2.0, energy_mj=None, nodes=1)["energy_j"] == pytest.approx(300.0)


@needs_gpu
def test_gpu_telemetry_samples_a_busy_gpu(fresh_nvml):
    if environment.nvml_missing_reason():
        pytest.skip("NVML unavailable")
    a = torch.randn(4096, 4096, device="cuda")
    with telemetry.Telemetry("cuda", interval_s=0.01) as tel:
        for _ in range(50):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()
    s = tel.summary(nodes=50)
    assert s["available"] and s["samples"] >= 2
    assert s["power_w"]["max"] > 0 and s["memory_used_mib_peak"] > 0 and s["energy_j"] > 0


# --- scenarios --------------------------------------------------------------------------------
class FakeRunner:
    timer = "fake"

    def __init__(self):
        self.calls = 0

    def run(self, start, n):
        self.calls += n
        return [1_000_000] * n, None


def measure(runner, settings, min_queries):
    """A step measured in one go, as a backend alone runs it."""
    measurement = scenarios.Measurement(runner, settings, min_queries, ahead=1)
    measurement.advance(math.inf)
    return measurement.step()


def test_warm_up_is_excluded_and_counted_and_minimums_hold():
    settings = scenarios.Settings(duration_s=0.0, min_queries=5, warmup_s=0.0, warmup_queries=3)
    runner = FakeRunner()
    assert scenarios.warm_up(runner, settings)[0] == 3
    step = measure(runner, settings, settings.min_queries)
    assert step["queries"] == 5 and runner.calls == 8 and step["latency_ms"]["p50"] == 1.0
    timed = measure(FakeRunner(), scenarios.Settings(duration_s=0.05), 1)
    assert timed["wall_s"] >= 0.05 and timed["queries"] == len(timed["samples_ns"]) and timed["slices"] == 1
    plan = scenarios.plan(scenarios.SCENARIOS, scenarios.Settings(study_nodes=24, batches=(1, 8)))
    assert plan == [("single", 1), ("study", 24), ("offline", 1), ("offline", 8)]


class SleepyBackend:
    """A CPU backend whose every call takes `seconds`, logged by name in a shared log; it raises once the
    log holds more than `fail_after` calls."""

    device, precision = "cpu", "fp32"

    def __init__(self, name, seconds, log, fail_after=None):
        self.name, self.seconds, self.log, self.fail_after = name, seconds, log, fail_after

    def infer(self, ct, mask, check=True):
        self.log.append(self.name)
        if self.fail_after is not None and len(self.log) > self.fail_after:
            raise RuntimeError(f"{self.name} broke")
        time.sleep(self.seconds)


def test_interleaved_step_alternates_slices_and_isolates_a_failure():
    """Each backend warms up, then gets a slice of duration/rounds per round, in order, then in reverse
    ("ss": the slow one ends a round and starts the next); a slow backend's calls, longer than a slice,
    come one a slice. A backend that raises is named and the other's step completes."""
    log = []
    settings = scenarios.Settings(duration_s=0.12, min_queries=1, warmup_s=0, warmup_queries=1, rounds=4)
    fast, slow = SleepyBackend("f", 0.002, log), SleepyBackend("s", 0.04, log)
    steps, failed = scenarios.run_interleaved({0: fast, 1: slow}, "single", 1, settings, scenarios.Inputs(4))
    assert not failed and log[:2] == ["f", "s"]  # the warm-ups
    measured = "".join(log[2:])
    assert measured.startswith("f") and "ss" in measured and measured.count("s") == steps[1]["queries"]
    assert steps[1]["slices"] == steps[1]["queries"] >= 3  # one call a slice, until the duration is reached
    assert steps[0]["slices"] >= 3
    assert steps[0]["ms_per_node"] < steps[1]["ms_per_node"]
    assert steps[0]["torch_peak_memory_mib"] is None and steps[0]["telemetry"] is None

    log.clear()
    broken = SleepyBackend("b", 0.001, log, fail_after=3)
    steps, failed = scenarios.run_interleaved(
        {0: fast, 7: broken}, "single", 1, settings, scenarios.Inputs(4)
    )
    assert list(steps) == [0] and steps[0]["wall_s"] >= settings.duration_s
    assert list(failed) == [7] and str(failed[7]) == "b broke"


def test_rotating_batches_are_distinct_arrays():
    inputs = scenarios.Inputs(pool=4)
    batches = inputs.batches(3, 4)
    assert len(batches) == 4 and all(ct.shape == (3, 1, 16, 64, 64) for ct, _ in batches)
    assert len({ct.ctypes.data for ct, _ in batches}) == 4


@needs_gpu
def test_gpu_scenarios_split_copies_from_compute():
    from m2anet.engines.torch_backend import TorchBackend

    settings = scenarios.Settings(duration_s=0.0, min_queries=2, warmup_s=0.0, study_nodes=3, batches=(4,))
    with TorchBackend("m2anet_small", device="cuda") as backend:
        steps = scenarios.run_backend(backend, scenarios.SCENARIOS, settings, scenarios.Inputs(4))
    single, _, offline = steps
    assert single["timer"] == "cuda_events" and not single["enqueued_ahead"]
    assert offline["enqueued_ahead"] and offline["queries"] % settings.offline_depth == 0
    for s in steps:
        assert set(s["device_ms"]) == {"h2d", "compute", "d2h"} and s["device_ms"]["compute"]["p50"] > 0
        assert s["telemetry"] is not None and s["torch_peak_memory_mib"] > 0


@needs_gpu
def test_gpu_interleaved_steps_carry_their_own_telemetry():
    """Two CUDA backends in alternating slices: each step's CUDA events and NVML samples are its own
    backend's (telemetry spans only its slices), and torch's peak memory, shared by both, is left out."""
    from m2anet.engines.torch_backend import TorchBackend

    settings = scenarios.Settings(duration_s=0.2, min_queries=2, warmup_s=0.0, rounds=4)
    with (
        TorchBackend("m2anet_small", device="cuda") as fp32,
        TorchBackend("m2anet_small", device="cuda", precision="fp16") as fp16,
    ):
        steps, failed = scenarios.run_interleaved(
            {0: fp32, 1: fp16}, "offline", 4, settings, scenarios.Inputs(4)
        )
    assert not failed and set(steps) == {0, 1}
    for s in steps.values():
        assert (
            s["slices"] >= 2 and s["device_ms"]["compute"]["p50"] > 0 and s["torch_peak_memory_mib"] is None
        )
        tel = s["telemetry"]
        if tel["available"]:
            assert tel["samples"] >= 2 * s["slices"] and tel["seconds"] < s["wall_s"] + 0.05 * s["slices"]


# --- targets ----------------------------------------------------------------------------------
def test_backend_options_and_labels():
    t = BackendSpec.parse("torch:cpu@pad_single=false")
    assert t == BackendSpec("torch:cpu", {"pad_single": False}) and t.label == "torch:cpu@pad_single=false"
    t = BackendSpec.parse("torch-compile:cuda@cuda_graphs=true,channels_last=1")
    assert t.options == {"cuda_graphs": True, "channels_last": 1}
    t = BackendSpec.parse("ort:cpu:/somewhere/m2anet_small/model.fp32.onnx")
    assert t.label == "ort:cpu:m2anet_small/model.fp32.onnx" and t.artifact.name == "model.fp32.onnx"
    assert BackendSpec.parse("trt:a/m/model.fp16.plan").label == "trt:m/model.fp16.plan"
    # a bare file name was labelled ort:cpu:/model.fp32.onnx
    assert BackendSpec.parse("ort:cpu:model.fp32.onnx").label == "ort:cpu:model.fp32.onnx"
    with pytest.raises(ValueError, match="key=value"):
        BackendSpec.parse("torch:cpu@=1")


def test_the_gpu_paths_name_only_options_their_runners_take():
    """Checked here because on this machine none of them opens; a spec cannot override what it sets."""
    for spec, options in targets.TORCH_CUDA:
        BackendSpec(spec, dict(options)).check()
    BackendSpec.parse("trt:model.fp16.plan@cuda_graphs=true,max_graphs=4").check()
    with pytest.raises(ValueError, match="'torch:cpu' has no option 'device': torch takes model_name, "):
        BackendSpec.parse("torch:cpu@device=cuda").check()
    with pytest.raises(ValueError, match=r"no option 'cuda_graphs': ort takes threads$"):
        BackendSpec.parse("ort:cpu:model.fp32.onnx@cuda_graphs=true").check()


def test_an_artifact_folder_that_names_no_model_is_described_by_model(tmp_path):
    """Folders written by `write_manifest` alone (m2a-verify --diagnose's trials, a hand-made A/B) name
    their artifacts but not the model they were built from: the report takes --model's, not a KeyError."""
    write_manifest(tmp_path, {"artifacts": {"model.int8.onnx": {"sha256": "0" * 64, "precision": "int8"}}})
    info = suite.describe(BackendSpec.parse(f"ort:cpu:{tmp_path / 'model.int8.onnx'}"), "m2anet_base")
    assert (info["model"], info["heads"], info["parity_passed"]) == ("m2anet_base", "both", None)


# --- end to end on the CPU --------------------------------------------------------------------
def _check_schema(report):
    assert report["schema"] == 1 and report["tool"] == "m2a-bench"
    env = report["environment"]
    assert {"date", "cpu", "threads", "libraries", "git", "gpus"} <= set(env)
    assert env["threads"]["torch"] == 1 and env["threads"]["onnxruntime"] == 1
    assert report["floors"]["cpu"]["flops"]["fp32"] > 0 and report["floors"]["cpu"]["bandwidth"] > 0
    assert report["models"]["m2anet_small/both"]["flops_per_node"] > 1e9
    for b in report["backends"]:
        assert b["error"] is None, b["error"]
        assert {"backend", "spec", "options", "device", "device_kind", "precision", "model"} <= set(b)
        for s in b["steps"]:
            for key, kind in STEP_KEYS.items():
                assert isinstance(s[key], kind), (b["backend"], key, s[key])
            assert len(s["samples_ns"]) == s["queries"] >= 2 and s["warmup_queries"] >= 2
            assert s["nodes"] == s["queries"] * s["batch"]
            assert set(s["latency_ms"]) == {"p50", "p90", "p99", "max", "min", "mean"}
            assert s["timer"] == "perf_counter_ns" and s["device_ms"] is None and s["telemetry"] is None
            assert s["vs_torch_fp32"] > 0


def test_cpu_scenarios_end_to_end_then_select_and_compare(small, tmp_path, capsys):
    folder = tmp_path / "artifacts" / "m2anet_small"
    shutil.copytree(small, folder)  # --select writes the manifest: keep the shared fixture as it is
    out = tmp_path / "report"
    args = ["--model", "m2anet_small", "--artifacts", str(folder.parent), "--out", str(out)]
    args += [
        "--duration",
        "0",
        "--warmup",
        "0",
        "--min-queries",
        "2",
        "--batches",
        "1,2",
        "--study-nodes",
        "3",
    ]
    args += ["--threads", "1", "--matmul-size", "256", "--copy-mib", "8", "--select"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "bench.json").read_text())
    _check_schema(report)
    labels = [b["backend"] for b in report["backends"]]
    onnx = [f"ort:cpu:m2anet_small/model.{p}.onnx" for p in ("fp32", "fp16", "int8")]
    assert labels == ["torch:cpu", "torch:cpu@pad_single=false", *onnx]
    assert report["floors"]["cpu"]["measurements"] == 1 + len(labels)  # before the first, after each
    steps = {(b["backend"], s["scenario"], s["batch"]): s for b in report["backends"] for s in b["steps"]}
    assert set(steps) == {
        (lb, sc, n)
        for lb in labels
        for sc, n in (("single", 1), ("study", 3), ("offline", 1), ("offline", 2))
    }
    assert steps[("torch:cpu", "single", 1)]["vs_torch_fp32"] == 1.0

    md = (out / "bench.md").read_text()
    assert "| backend | precision | scenario | batch | ms/node | nodes/s |" in md and "% of floor" in md
    assert all(f"| {lb} |" in md for lb in labels) and md in printed
    for png in ("latency.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    selection = read_manifest(folder)["selection"]
    entries = read_manifest(folder)["artifacts"]
    assert set(selection) == {"single", "study", "offline"}
    for choice in selection.values():
        assert entries[choice["artifact"]]["parity"]["passed"]
        ranked = [choice, *choice["runners_up"]]
        assert len(ranked) + len(choice["excluded"]) == 5  # PyTorch on the CPU is the reference, excluded
        excluded = [e for e in choice["excluded"] if e["artifact"]]
        assert [e["backend"] for e in choice["excluded"] if not e["artifact"]] == labels[:2]
        assert all(not entries[e["artifact"]]["parity"]["passed"] for e in excluded)
        values = [c["value"] for c in ranked]
        assert values == sorted(values, reverse=choice["higher_is_better"])

    assert cli.main(["--compare", str(out / "bench.json"), str(out / "bench.json")]) == 0
    assert "no regression worse than 10%" in capsys.readouterr().out


def test_interleaved_run_measures_every_backend_in_slices(small, tmp_path, capsys):
    """--interleave opens PyTorch and ONNX Runtime side by side, measures each step on both in slices,
    says so in the report, and still names a backend that cannot open (exit 1) without losing the others."""
    onnx = small / "model.fp32.onnx"
    out = tmp_path / "report"
    broken = tmp_path / "broken"  # listed in its manifest, but not the file the manifest hashed
    broken.mkdir()
    shutil.copy(small / "manifest.json", broken)
    (broken / "model.fp16.onnx").write_bytes(b"not the exported graph")
    args = [
        "--model",
        "m2anet_small",
        "--backend",
        "torch:cpu",
        f"ort:cpu:{onnx}",
        f"ort:cpu:{broken}/model.fp16.onnx",
    ]
    args += ["--interleave", "--scenario", "offline", "--batches", "2", "--duration", "0.3", "--warmup", "0"]
    args += ["--layers"]
    args += [
        "--min-queries",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
        "--matmul-size",
        "128",
        "--copy-mib",
        "4",
    ]
    assert cli.main(args) == 1
    report = json.loads((out / "bench.json").read_text())
    _check_schema({**report, "backends": report["backends"][:2]})
    assert report["settings"]["interleaved"] and report["settings"]["rounds"] == 8
    torch_cpu, ort_cpu, failed = report["backends"]
    assert failed["error"] and not failed["steps"] and "corrupted or was replaced" in failed["error"]
    for b in (torch_cpu, ort_cpu):
        (step,) = b["steps"]
        assert step["slices"] >= 2 and step["wall_s"] >= 0.3 and step["torch_peak_memory_mib"] is None
    assert ort_cpu["steps"][0]["vs_torch_fp32"] > 0
    md = (out / "bench.md").read_text()
    assert "measured interleaved" in md and md in capsys.readouterr().out
    assert (out / "throughput.png").is_file()
    _check_layers(torch_cpu, ort_cpu, failed, (out / "layers.md").read_text())
    assert (out / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_layers(profiled, other, failed, md):
    """--layers: every convolution of the model found, each with its time and floor, and the FLOPs of all
    of them those of torch's counter for the whole network (convolutions are nearly all of it); the same
    rows from ONNX Runtime's profile of the exported graph."""
    (table,) = profiled["layers"]
    rows = table["rows"]
    model = create_model("m2anet_small", pretrained=False)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)]
    assert sum(len(r["layers"]) for r in rows) == len(convs) and len(rows) < len(convs)  # shared rows
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["pct_of_floor"] > 0 for r in rows), rows
    assert table["unmatched_conv_ms"] == 0 and table["rest_ms"] > 0
    assert sum(r["ms"] for r in rows) + table["rest_ms"] == pytest.approx(table["total_ms"])
    flops = model_stats("m2anet_small")["flops_per_node"] * table["batch"]
    assert 0.99 * flops <= sum(r["gflop"] for r in rows) * 1e9 <= flops
    assert "layers" not in failed and "layers_error" not in failed
    (table,) = other["layers"]  # ONNX Runtime's own per-node profile, the same rows
    assert [r["layers"] for r in table["rows"]] == [r["layers"] for r in rows]
    assert all(r["ms"] > 0 for r in table["rows"]) and table["unmatched_conv_ms"] == 0, table
    assert table["timer"] == "ONNX Runtime nodes" and table["rest_ms"] > 0
    assert md.count("| s1.0.0 | 1×16×64×64 → 8×16×64×64 |") == 2 and md.count("| everything else |") == 2


@needs_gpu
def test_gpu_layer_profile_attributes_every_convolution_of_a_cuda_graph():
    """On CUDA the kernels each convolution launched are its time; a backend that replays CUDA graphs is
    profiled with the same kernels launched one by one, so none is lost to the graph."""
    from m2anet.engines.torch_backend import TorchBackend

    ct, mask = scenarios.Inputs(4).batches(4, 1)[0]
    with TorchBackend("m2anet_small", device="cuda", precision="fp16", cuda_graphs=True) as backend:
        backend.infer(ct, mask)  # the graph captured first, as m2a-bench leaves it
        table = layers.profile_layers(backend, ct, mask)
        x, m = (torch.from_numpy(a).cuda() for a in (ct, mask))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            backend.infer_torch(x, m, replay=False)
        end.record()
        torch.cuda.synchronize()
    assert table["timer"] == "CUDA kernels" and table["unmatched_conv_ms"] == 0
    assert all(r["ms"] > 0 for r in table["rows"]) and table["rest_ms"] > 0
    # kernels on one stream take no longer than the forward they run in: none is counted twice
    assert table["total_ms"] <= 1.5 * start.elapsed_time(end) / 5


def test_a_single_node_is_profiled_as_the_pair_the_cpu_runs():
    from m2anet.engines.torch_backend import TorchBackend

    ct, mask = scenarios.Inputs(4).batches(1, 1)[0]
    with TorchBackend("m2anet_small") as backend:
        table = layers.profile_layers(backend, ct, mask, calls=1)
    assert (table["batch"], table["ran_as"], table["unmatched_conv_ms"]) == (1, 2, 0)
    assert all(r["ms"] > 0 and r["input"][0] == 2 for r in table["rows"])


def test_convolutions_are_found_in_the_operators_that_run_them():
    """The profiler names an operator without its overload: the input and weight are found by the schema
    that has as many arguments as the call, as eager PyTorch, inductor's cuDNN calls and a frozen CPU graph's
    oneDNN kernels (whose binary form takes the residual first) call them; ONNX Runtime's operators by the
    schemas it registers, its own (FusedConv) included."""
    assert layers._torch_conv_arguments("aten::convolution", 9) == (0, 1)
    assert layers._torch_conv_arguments("mkldnn::_convolution_pointwise", 10) == (0, 1)
    assert layers._torch_conv_arguments("mkldnn::_convolution_pointwise", 13) == (0, 2)
    assert layers._torch_conv_arguments("mkldnn::_convolution_pointwise_", 13) == (1, 2)
    assert layers._torch_conv_arguments("mkldnn::_convolution_transpose_pointwise", 11) == (0, 1)
    assert layers._torch_conv_arguments("aten::relu", 1) is None
    assert layers._torch_conv_arguments("aten::_convolution_double_backward", 13) is None
    assert layers._onnx_conv_arguments("Conv") == layers._onnx_conv_arguments("FusedConv") == (0, 1)
    assert layers._onnx_conv_arguments("QLinearConv") == (0, 3)  # x, x_scale, x_zero_point, w, ...
    assert layers._onnx_conv_arguments("Relu") is None


# --- --compare --------------------------------------------------------------------------------
def _report(ms, p99=None):
    step = {"scenario": "single", "batch": 1, "ms_per_node": ms, "nodes_per_s": 1e3 / ms}
    step["latency_ms"] = {"p50": ms, "p90": ms, "p99": p99 or ms}
    return {"schema": 1, "tool": "m2a-bench", "backends": [{"backend": "torch:cpu", "steps": [step]}]}


@pytest.mark.parametrize(
    ("old", "new", "extra", "code"),
    [
        (_report(10.0), _report(10.0), [], 0),
        (_report(10.0), _report(8.0), [], 0),  # faster is no regression
        (_report(10.0), _report(12.0), [], 1),
        (_report(10.0), _report(12.0), ["--threshold", "0.5"], 0),
        (_report(10.0), _report(10.0, p99=30.0), [], 0),  # a short run's p99 does not gate
        (_report(10.0), {"tool": "something else"}, [], 2),
    ],
)
def test_compare_exit_codes(tmp_path, capsys, old, new, extra, code):
    paths = []
    for name, r in (("old.json", old), ("new.json", new)):
        (tmp_path / name).write_text(json.dumps(r))
        paths.append(str(tmp_path / name))
    assert cli.main(["--compare", *paths, *extra]) == code
    out = capsys.readouterr()
    if code == 1:
        assert "REGRESSION" in out.out and "+20.0%" in out.out
    if code == 2:
        assert "not an m2a-bench report" in out.err


def test_compare_missing_file_is_bad_input(tmp_path, capsys):
    assert cli.main(["--compare", str(tmp_path / "nope.json"), str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize("scenario", ["offline", "server"])
def test_a_named_file_that_is_not_there_stops_the_run_before_it_starts(small, tmp_path, capsys, scenario):
    """Before, the other backends were measured first and the typo came back as a row of the report."""
    typo = small / "model.fp23.onnx"
    args = ["--backend", "torch:cpu", f"ort:cpu:{typo}", "--scenario", scenario, "--out", str(tmp_path / "r")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"m2a-bench: error: artifact {typo} not found: run m2a-export or check the path"], err
    assert not (tmp_path / "r").exists()


def test_a_backend_named_twice_is_refused_before_the_run(tmp_path, capsys):
    """Before, both ran and the report held two rows of the same label (--compare keys rows by it)."""
    args = ["--backend", "torch:cpu", "torch:cpu", "--model", "m2anet_small", "--out", str(tmp_path / "r")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "m2a-bench: error: backend torch:cpu is named twice: its rows would not be told apart; drop one"
    ]
    assert not (tmp_path / "r").exists()


def _broken(report, how):
    step = report["backends"][0]["steps"][0]
    if how == "KeyError":
        del step["latency_ms"]
    elif how == "TypeError":
        report["backends"][0]["steps"] = None
    elif how == "ZeroDivisionError":
        step["ms_per_node"] = 0.0
    elif how == "string metric":
        step["nodes_per_s"] = "fast"
    return report


@pytest.mark.parametrize(
    "how", ["KeyError", "TypeError", "ZeroDivisionError", "string metric", "UnicodeDecodeError"]
)
def test_compare_of_a_malformed_report_is_one_line(tmp_path, capsys, how):
    """Each of these raised the exception it is named after, with a traceback."""
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(_report(10.0)))
    if how == "UnicodeDecodeError":
        bad.write_bytes(b"\xff\xfe{" + json.dumps(_report(10.0)).encode())
    else:
        bad.write_text(json.dumps(_broken(_report(10.0), how)))
    for old, new in ((good, bad), (bad, good)):
        assert cli.main(["--compare", str(old), str(new)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("m2a-bench: error: ") and str(bad) in err[0], err


def test_ctrl_c_between_two_steps_keeps_the_finished_ones(tmp_path, monkeypatch):
    """Ctrl-C while the report of the first step is being written (between two steps of an interleaved
    run, outside the measurement): the run ends, and its report holds the finished step, the backend
    marked interrupted, without plots. Before, the interrupt escaped and no report was written."""
    from m2anet.bench import suite

    write, calls = suite.report.write, []

    def interrupted_once(full, out, plots):
        calls.append(plots)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return write(full, out, plots=plots)

    monkeypatch.setattr(suite.report, "write", interrupted_once)
    options = suite.BenchOptions(
        model="m2anet_small",
        backends=["torch:cpu"],
        scenario="offline",
        duration_s=0.0,
        min_queries=1,
        warmup_s=0.0,
        batches=(1, 2),
        threads=1,
        interleave=True,
        out=tmp_path,
        matmul_size=128,
        copy_mib=4,
    )
    run = suite.run_bench(options)
    assert run.interrupted and calls == [False, False]
    (backend,) = json.loads((tmp_path / "bench.json").read_text())["backends"]
    assert backend["interrupted"] and [s["batch"] for s in backend["steps"]] == [1]


def test_ctrl_c_ends_the_run_with_the_finished_steps_saved(tmp_path):
    """SIGINT once the first of three steps is done: exit 130, one line, and a bench.json holding the
    steps finished before it (before, a traceback and a report with nothing of the interrupted
    backend). On a loaded machine the signal may land a step later, so one or two steps are saved."""
    out = tmp_path / "report"
    args = ["--model", "m2anet_small", "--backend", "torch:cpu", "--scenario", "offline", "--out", str(out)]
    args += ["--batches", "1,2,4", "--duration", "5", "--min-queries", "1", "--warmup", "0", "--threads", "1"]
    args += ["--matmul-size", "128", "--copy-mib", "4"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2anet.cli.bench", *args],
        stderr=subprocess.PIPE,
        # a shell starts background jobs with SIGINT ignored, and a child would inherit that (as when
        # CI runs in the background): the command under test gets the terminal's default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = bytearray()

    def read() -> None:
        while chunk := proc.stderr.read1(4096):
            err.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 300
    while b"1/3" not in err and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the progress bar shows the first step done: the second has just begun
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    reader.join()
    lines = [line for line in err.decode().replace("\r", "\n").splitlines() if line.startswith("m2a-bench")]
    assert code == 130 and "Traceback" not in err.decode(), err.decode()[-2000:]
    (backend,) = json.loads((out / "bench.json").read_text())["backends"]
    steps = [(s["scenario"], s["batch"]) for s in backend["steps"]]
    assert backend["interrupted"] and steps in ([("offline", 1)], [("offline", 1), ("offline", 2)])
    assert lines[-1].startswith(f"m2a-bench: interrupted (Ctrl-C): the {len(steps)} finished step(s) are in")
