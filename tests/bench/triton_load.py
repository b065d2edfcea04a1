"""Load test of a real Triton Inference Server, as a site would run perf_analyzer before go-live.

Exports m2anet_small (FP32), writes its Triton repository with m2a-triton, serves it from a real
tritonserver on loopback ports (tests/triton_serving), then:

1. searches the highest Poisson arrival rate whose p99 latency stays under `--p99-ms` with no
   request failed and no answer changed (each answer compared with ONNX Runtime run here on the
   same artifact);
2. at that rate, kills the server (SIGKILL) mid-run and restarts it: requests lost must be 0
   (sent = answered + failed, every failure reported), answers changed must be 0, and the
   clients must be answered again once it is back.

Bounded: at most `--max-runs` search runs of `--duration` seconds (`--max-queries` each) and one
fault run. Writes the JSON report to `--out`; exits 1 when a request was lost, an answer changed,
no rate held or the clients did not recover, 0 otherwise (also when it cannot run here: the reason
is printed and recorded). Not collected by pytest (no test_ prefix): `ci/bench` runs it.

    python3 tests/bench/triton_load.py --out bench-triton.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from m2anet import triton
from m2anet.bench.server_scenario import ServerSettings, find_max_rate, reference_answers, run_server
from m2anet.cli import export as export_cli
from m2anet.data import load_split
from m2anet.engines import open_backend

TESTS = Path(__file__).resolve().parents[1]


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs"


def summary(result) -> dict:
    return {
        "rate": result.settings.rate,
        "achieved_rate": round(result.achieved_rate, 3),
        "p50_ms": result.latency_ms and round(result.latency_ms["p50"], 1),
        "p99_ms": result.latency_ms and round(result.latency_ms["p99"], 1),
        "sent": result.sent,
        "answered": result.answered,
        "failed": result.failed,
        "retried": result.retried,
        "lost": result.sent - result.answered - result.failed,
        "changed": result.changed,
    }


def fault_run(server, spec, inputs, reference, settings, kill_at_s):
    """The Server scenario with the server killed at `kill_at_s` and restarted at once."""
    lines, out = [], {}
    thread = threading.Thread(
        target=lambda: out.setdefault(
            "result", run_server(lambda: open_backend(spec), inputs, settings, reference, lines.append)
        )
    )
    thread.start()
    try:
        time.sleep(kill_at_s)
        server.kill()
        killed = time.perf_counter()
        server.start()
        back = time.perf_counter()
    finally:
        thread.join()
    result = out["result"]
    recovered = [q for q in result.queries if q.arrival_s > back - result.t0 + 1.0]
    return result, {
        **summary(result),
        "killed_at_s": kill_at_s,
        "restart_s": round(back - killed, 1),
        "arrived_after_recovery": len(recovered),
        "answered_first_try_after_recovery": sum(
            q.status == "answered" and q.attempts == 1 for q in recovered
        ),
        "failure_lines": lines,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="triton_load.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-triton.json"))
    ap.add_argument("--p99-ms", type=float, default=1000.0, help="latency bound of the rate search")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds of arrivals per run")
    ap.add_argument("--max-runs", type=int, default=5)
    ap.add_argument("--max-queries", type=int, default=400)
    ap.add_argument("--no-fault", dest="fault", action="store_false", help="skip the kill-and-restart run")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(TESTS))  # the server helpers live beside the tests that use them
    from triton_serving.process import TritonProcess
    from triton_serving.server_venv import PINS, VenvError, ensure_venv

    load_before = round(os.getloadavg()[0], 2)
    report: dict = {
        "machine": machine(),
        "server": f"tritonserver from {PINS[0]}, ONNX Runtime CPU, 1 instance",
    }
    try:
        python = ensure_venv()
    except VenvError as e:
        report["skipped"] = str(e)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"triton_load: skipped: {e}", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory(prefix="m2a-triton-load-") as tmp:
        work = Path(tmp)
        export = ["--model", "m2anet_small", "--precision", "fp32", "--out", str(work), "--quiet"]
        if export_cli.main([*export, "--parity-nodes", "24"]) != 0:
            print("triton_load: error: m2a-export of m2anet_small failed", file=sys.stderr)
            return 1
        folder = work / "m2anet_small"
        triton.write_repository(folder, work / "repo", precision="fp32", fmt="onnx", name="m2anet")
        cohort = load_split("calib", n=8)
        inputs = [(cohort.ct[i : i + 1], cohort.mask[i : i + 1]) for i in range(len(cohort.ct))]
        with open_backend(f"ort:cpu:{folder / 'model.fp32.onnx'}") as local:
            reference = reference_answers(local, inputs)
        server = TritonProcess(python, work / "repo", work / "server")
        server.start()
        try:
            spec = server.url("m2anet")
            with open_backend(spec) as backend:  # one node at a time: the service time sets the first rate
                backend.infer(*inputs[0])
                times = []
                for ct, mask in inputs:
                    t0 = time.perf_counter()
                    backend.infer(ct, mask)
                    times.append(time.perf_counter() - t0)
            service_s = sorted(times)[len(times) // 2]
            settings = ServerSettings(
                rate=round(0.5 / service_s, 1),
                clients=args.clients,
                duration_s=args.duration,
                min_queries=50,
                max_queries=args.max_queries,
                max_duration_s=3 * args.duration,
            )
            report.update(
                model="m2anet_small fp32, 1 node per query",
                clients=args.clients,
                p99_ms_bound=args.p99_ms,
                single_request_ms=round(service_s * 1e3, 1),
            )
            search = find_max_rate(
                lambda: open_backend(spec),
                inputs,
                settings,
                args.p99_ms,
                max_runs=args.max_runs,
                reference=reference,
            )
            report["search"] = [summary(r) for r in search.runs]
            report["held"] = summary(search.best) if search.best else None
            ok = search.best is not None and all(
                r["lost"] == 0 and r["changed"] == 0 for r in report["search"]
            )
            if args.fault and search.best is not None:
                # at least one request a second, so the outage meets requests whatever rate held
                fault_settings = ServerSettings(
                    rate=max(search.best.settings.rate, 1.0),
                    clients=args.clients,
                    duration_s=20.0,
                    min_queries=1,
                    max_queries=args.max_queries,
                )
                _, fault = fault_run(server, spec, inputs, reference, fault_settings, kill_at_s=4.0)
                report["fault"] = fault
                ok = (
                    ok
                    and fault["lost"] == 0
                    and fault["changed"] == 0
                    and 0 < fault["answered_first_try_after_recovery"] == fault["arrived_after_recovery"]
                )
        finally:
            server.stop()
    report["passed"] = ok
    report["load_average_1m"] = [load_before, round(os.getloadavg()[0], 2)]  # other work on the machine
    args.out.write_text(json.dumps(report, indent=2))
    held, runs = report["held"] or {}, report["search"]
    line = (
        f"rate held {held.get('rate')}/s under p99 {args.p99_ms:.0f} ms (p99 {held.get('p99_ms')} ms); "
        f"lost {sum(r['lost'] for r in runs)}, changed {sum(r['changed'] for r in runs)}"
    )
    if "fault" in report:
        f = report["fault"]
        line += f"; server killed: {f['failed']} failed, {f['retried']} retried, "
        line += f"lost {f['lost']}, changed {f['changed']}"
    print(f"triton_load: {report['machine']}: {line}; wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
