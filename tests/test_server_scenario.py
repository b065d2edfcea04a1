"""The Server-scenario load generator on a local ONNX Runtime backend (its fault path against a
real Triton server is in test_triton_server.py)."""

import json

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from m2anet.bench.server_scenario import (
    ServerSettings,
    arrivals,
    find_max_rate,
    is_transient,
    reference_answers,
    run_server,
)
from m2anet.data import load_split
from m2anet.engines import open_backend

FAST = {"clients": 2, "duration_s": 1.0, "min_queries": 8, "drain_s": 60.0}


@pytest.fixture(scope="module")
def factory(small):
    return lambda: open_backend(f"ort:cpu:{small}/model.fp32.onnx", threads=1)


@pytest.fixture(scope="module")
def inputs():
    cohort = load_split("calib", n=3)
    return [(cohort.ct[i : i + 1], cohort.mask[i : i + 1]) for i in range(3)]


@pytest.fixture(scope="module")
def reference(factory, inputs):
    with factory() as backend:
        return reference_answers(backend, inputs)


def test_arrivals_are_poisson_at_the_rate_and_bounded():
    gaps = np.diff(
        arrivals(ServerSettings(rate=50.0, duration_s=1e6, max_queries=4000, max_duration_s=1e6)), prepend=0.0
    )
    assert len(gaps) == 4000  # max_queries caps a long run
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)  # exponential gaps: CV 1
    few = arrivals(ServerSettings(rate=1.0, duration_s=0.5, min_queries=10))
    assert len(few) == 10 and few[-1] > 0.5  # min_queries outlasts a short duration
    assert np.array_equal(few, arrivals(ServerSettings(rate=1.0, duration_s=0.5, min_queries=10)))
    capped = arrivals(ServerSettings(rate=1.0, duration_s=0.5, min_queries=1000, max_duration_s=5.0))
    assert 0 < len(capped) < 1000 and capped[-1] <= 5.0  # but not past max_duration_s


def test_every_query_is_answered_unchanged(factory, inputs, reference):
    settings = ServerSettings(rate=8.0, **FAST)
    lines = []
    result = run_server(factory, inputs, settings, reference, lines.append)
    assert result.sent == len(arrivals(settings)) == result.answered
    assert result.failed == result.changed == result.retried == 0 and not lines
    lat = result.latency_ms
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert result.latency_per_node_ms == lat and result.nodes_per_query == 1
    assert result.achieved_rate > 0 and result.held(lat["p99"]) and not result.held(lat["p99"] / 2)
    assert result.to_dict()["sent"] == result.sent and "queries" not in result.to_dict()


def test_latency_per_node_divides_by_the_nodes_of_a_query(factory, inputs):
    pairs = [(np.concatenate([c, c]), np.concatenate([m, m])) for c, m in inputs]
    result = run_server(factory, pairs, ServerSettings(rate=4.0, **FAST))
    assert result.nodes_per_query == 2 and result.answered == result.sent
    assert result.latency_per_node_ms["p99"] == pytest.approx(result.latency_ms["p99"] / 2)


def test_changed_answers_are_counted(factory, inputs, reference):
    wrong = [r + (1.0 if i == 1 else 0.0) for i, r in enumerate(reference)]
    result = run_server(factory, inputs, ServerSettings(rate=8.0, **FAST), wrong)
    uses = sum(q.input == 1 for q in result.queries)
    assert uses > 0 and result.changed == uses and result.answered == result.sent
    assert not result.held(1e9)


def test_errors_that_would_repeat_fail_once_each_and_are_reported(factory, inputs, reference):
    """A batch of the wrong patch size fails in ONNX Runtime: reported, counted, never retried."""
    ct, mask = inputs[1]
    bad = [inputs[0], (ct[:, :, :8], mask[:, :, :8]), inputs[2]]
    lines = []
    result = run_server(factory, bad, ServerSettings(rate=8.0, **FAST), reference, lines.append)
    failed = [q for q in result.queries if q.input == 1]
    assert failed and result.failed == len(failed) == len(lines) == len(result.failures)
    assert all(q.status == "failed" and q.attempts == 1 for q in failed)
    assert result.sent == result.answered + result.failed and result.changed == 0
    assert all(line.startswith("request ") and "\n" not in line for line in lines)


def test_only_unreachable_service_errors_are_transient():
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert is_transient(InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"))
    assert is_transient(InferenceServerException("unknown model: 'm2anet'", status="StatusCode.NOT_FOUND"))
    assert not is_transient(
        InferenceServerException("unexpected shape", status="StatusCode.INVALID_ARGUMENT")
    )
    assert not is_transient(ValueError("mask is not binary"))


def test_rate_search_doubles_while_held_then_halves_when_missed(factory, inputs, reference):
    settings = ServerSettings(rate=2.0, clients=1, duration_s=0.5, min_queries=3)
    held = find_max_rate(factory, inputs, settings, p99_ms=1e6, max_runs=3, reference=reference)
    assert [r.settings.rate for r in held.runs] == [2.0, 4.0, 8.0] and held.best is held.runs[-1]
    missed = find_max_rate(factory, inputs, settings, p99_ms=1e-3, max_runs=2, reference=reference)
    assert [r.settings.rate for r in missed.runs] == [2.0, 1.0] and missed.best is None
    assert missed.to_dict()["rate_held"] is None and held.to_dict()["rate_held"] == 8.0


def test_a_bad_setting_is_refused(inputs):
    with pytest.raises(ValueError, match="rate > 0"):
        run_server(
            lambda: pytest.fail("no backend is opened for a run that cannot start"),
            inputs,
            ServerSettings(rate=0.0),
        )


def test_m2a_bench_server_scenario_reports_rate_held_and_nothing_lost(small, tmp_path):
    from m2anet.cli import bench

    spec = f"ort:cpu:{small / 'model.fp32.onnx'}"
    argv = ["--scenario", "server", "--backend", spec, "--rate", "50", "--clients", "2", "--duration", "0.2"]
    argv += [
        "--min-queries",
        "4",
        "--max-queries",
        "6",
        "--p99-ms",
        "60000",
        "--max-runs",
        "2",
        "--threads",
        "1",
    ]
    assert bench.main([*argv, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "server.json").read_text())
    (row,) = report["backends"]
    assert row["server"]["rate_held"] is not None and len(row["server"]["runs"]) == 2
    for run in row["server"]["runs"]:
        assert run["sent"] == run["answered"] + run["failed"] and run["changed"] == 0
    assert "highest rate held" in (tmp_path / "server.md").read_text()
    with pytest.raises(SystemExit) as refused:
        bench.main(["--scenario", "server", "--backend", spec, "--rate", "0"])
    assert refused.value.code == 2
