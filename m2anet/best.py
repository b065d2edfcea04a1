"""`m2a-export --precision best` and `m2a-bench --select`: benchmark every backend that runs here, verify
the PyTorch GPU paths against their parity tiers, and record the fastest that passed in the manifest.

The ranking holds only on the machine that measured it, so the choice is made where the artifacts will
run, after the export, from the same benchmarks `m2a-bench` runs. Artifacts carry the parity result of
their export; a PyTorch path has none, so each one measured on the GPU is verified with m2a-verify before
it may be chosen. On a CPU-only machine the candidates are the folder's ONNX Runtime artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m2anet.bench.select import select
from m2anet.bench.suite import BenchOptions, BenchRun, run_bench
from m2anet.export.exporter import ExportOptions, ExportResult
from m2anet.verify import VerifyOptions, verify

PARITY_FIELDS = ("passed", "tier", "precision", "failures", "nodes", "label_flips", "prob_max_abs")


def verify_torch_paths(report: dict[str, Any], n: int | None = None) -> dict[str, dict[str, Any]]:
    """m2a-verify of every PyTorch GPU path that ran in `report`, on the first `n` test nodes (all: None),
    against its precision's tier; by report label. A path whose verification cannot run has failed."""
    results: dict[str, dict[str, Any]] = {}
    for b in report["backends"]:
        if b.get("error") or b.get("artifact") or b.get("device_kind") != "cuda":
            continue
        if not b["spec"].startswith("torch"):
            continue
        options = VerifyOptions(backend=b["backend"], model=b["model"], heads=b["heads"], n=n)
        try:
            r = verify(options).report
        except (ValueError, RuntimeError) as e:
            results[b["backend"]] = {"passed": False, "failures": [f"m2a-verify could not run: {e}"]}
            continue
        results[b["backend"]] = {k: r[k] for k in PARITY_FIELDS}
    return results


def select_verified(
    run: BenchRun, folders: list[Path], n: int | None = None, sign: Path | None = None
) -> dict[Path, dict[str, Any]]:
    """Verify the run's PyTorch GPU paths, then record the choice in each artifact folder's manifest
    (re-signed with `sign` where the manifest is signed)."""
    parity = verify_torch_paths(run.report, n)
    return {folder: select(run.report, folder, run.paths["json"], parity, sign) for folder in folders}


def benchmark_and_select(export: ExportOptions, result: ExportResult) -> tuple[BenchRun, dict[str, Any]]:
    """Single-node latency of every backend that runs here on the exported folder; the selection
    recorded, with the PyTorch GPU paths verified on the export's parity nodes."""
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
    return run, select_verified(run, [result.folder], export.parity_nodes, sign=export.sign)[result.folder]
