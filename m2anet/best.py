"""`m2a-export --precision best`: export every precision, benchmark on this machine what passed its
parity tier, and record the fastest in the manifest.

The ranking holds only on the machine that measured it, so the choice is made where the
artifacts will run, after the export, from the same benchmarks `m2a-bench --select` uses.
"""

from __future__ import annotations

from typing import Any

from m2anet.bench.select import select
from m2anet.bench.suite import BenchOptions, BenchRun, run_bench
from m2anet.export.exporter import ExportOptions, ExportResult


def benchmark_and_select(export: ExportOptions, result: ExportResult) -> tuple[BenchRun, dict[str, Any]]:
    """Single-node latency of every artifact of the exported folder; the selection recorded."""
    threads = ["--threads", str(export.threads)] if export.threads else []
    command = ["--model", export.model, "--artifacts", str(export.out), "--select", "--scenario", "single"]
    run = run_bench(
        BenchOptions(
            model=export.model,
            artifacts=export.out,
            scenario="single",
            threads=export.threads,
            command=[*command, *threads],
        )
    )
    return run, select(run.report, result.folder, run.paths["json"], sign=export.sign)
