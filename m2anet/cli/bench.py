"""`m2a-bench`: per-node latency and throughput of every backend, next to the hardware's floor.

By default it benchmarks every backend that can run on this machine for the artifacts of
`--model` in `--artifacts` (export them first with m2a-export), in the single, study and offline
scenarios, and writes bench.json (every sample), bench.md and two plots. Exit 0 when every
backend ran, 1 when one could not (named in the report), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from m2anet.bench import compare, report
from m2anet.bench.scenarios import SCENARIOS
from m2anet.bench.suite import (
    BenchOptions,
    BenchRun,
    ServerOptions,
    artifact_folder,
    run_bench,
    run_server_bench,
    server_markdown,
)
from m2anet.best import select_verified
from m2anet.cli.args import (
    INTERRUPTED,
    int_at_least,
    interruptible,
    make_parser,
    non_negative_float,
    output_dir,
    positive_float,
    positive_int,
)
from m2anet.engines import BackendSpec
from m2anet.engines.spec import SPEC_HELP
from m2anet.manifest import ArtifactError
from m2anet.model import list_models


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes such as 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1")
    return values


def parser() -> argparse.ArgumentParser:
    ap = make_parser("m2a-bench", __doc__)
    ap.add_argument(
        "--backend",
        action="extend",
        nargs="+",
        metavar="SPEC",
        help=f"{SPEC_HELP}; SPEC@key=value,... passes options, e.g. torch:cpu@pad_single=false "
        "(default: every backend that runs here)",
    )
    ap.add_argument("--model", default="m2anet_base", choices=list_models())
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="m2a-export's --out folder")
    ap.add_argument(
        "--scenario",
        default="all",
        choices=[*SCENARIOS, "all", "server"],
        help="server: MLPerf Server scenario (Poisson arrivals) instead of the latency/throughput suite",
    )
    ap.add_argument(
        "--duration", type=non_negative_float, default=5.0, help="minimum measured seconds per step"
    )
    ap.add_argument(
        "--min-queries", type=positive_int, default=10, help="minimum measured queries (single, study)"
    )
    ap.add_argument(
        "--warmup",
        type=non_negative_float,
        default=1.0,
        help="minimum warm-up seconds per step (>= 2 queries)",
    )
    ap.add_argument("--batches", type=_batches, help="offline sweep (default: 1, 2, 4, ... the profile max)")
    ap.add_argument("--study-nodes", type=positive_int, default=24, help="nodes of one study")
    ap.add_argument("--threads", type=positive_int, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="open every backend at once and measure each step on all of them in alternating slices, so "
        "their ratios hold on a machine whose speed drifts",
    )
    ap.add_argument(
        "--layers",
        action="store_true",
        help="after its steps, profile each PyTorch backend's convolutions, each against its own floor, at "
        "each offline batch size, or without the offline scenario each batch size that ran (layers.md)",
    )
    ap.add_argument("--out", type=output_dir, help="report folder (default: ARTIFACTS/MODEL/bench)")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    ap.add_argument(
        "--select",
        action="store_true",
        help="record in the artifact folder's manifest the fastest backend that passed its parity tier "
        "(PyTorch GPU paths are verified first)",
    )
    ap.add_argument(
        "--verify-nodes", type=int_at_least(2), default=192, help="--select: test nodes per PyTorch GPU path"
    )
    ap.add_argument(
        "--sign", type=Path, metavar="KEYFILE", help="--select: re-sign manifest.json with this Ed25519 key"
    )
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two bench.json reports")
    ap.add_argument(
        "--threshold",
        type=non_negative_float,
        default=0.10,
        help="--compare fails past this loss (0.10: 10%%)",
    )
    g = ap.add_argument_group("server scenario (as perf_analyzer loads a Triton server)")
    g.add_argument("--rate", type=positive_float, default=5.0, help="target queries/s (one node each)")
    g.add_argument("--clients", type=positive_int, default=4, help="concurrent clients, one backend each")
    g.add_argument(
        "--p99-ms", type=positive_float, help="search the highest rate whose p99 stays under this bound"
    )
    g.add_argument("--max-runs", type=positive_int, default=6, help="runs of the rate search at most")
    g.add_argument("--max-queries", type=positive_int, default=2000, help="queries of one run at most")
    g = ap.add_argument_group("arithmetic floor")
    g.add_argument("--matmul-size", type=positive_int, help="matrix size of the peak measurement")
    g.add_argument("--copy-mib", type=positive_int, help="MiB copied for the bandwidth measurement")
    return ap


def print_run(run: BenchRun, as_json: bool) -> None:
    if as_json:
        print(json.dumps(run.report, indent=2))
    else:
        print(report.markdown(run.report))
        print("written: " + ", ".join(str(p) for p in run.paths.values()))


def print_selection(selection: dict[str, Any], folder: Path, to_stderr: bool) -> None:
    for scenario, choice in selection.items():
        print(
            f"selected for {scenario}: {choice['backend']} ({choice['metric']} {choice['value']:.3f}"
            f", batch {choice['batch']}); recorded in {folder / 'manifest.json'}",
            file=sys.stderr if to_stderr else sys.stdout,
        )


@interruptible("m2a-bench")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = parser()
    args = ap.parse_args(argv)
    if args.layers and args.scenario == "server":
        ap.error("--layers profiles the latency/throughput suite, not --scenario server: drop one of them")
    if args.compare:
        old, new = args.compare  # nargs=2
        return compare.main(old, new, args.threshold)
    options = BenchOptions(
        model=args.model,
        artifacts=args.artifacts,
        backends=args.backend,
        scenario=args.scenario,
        duration_s=args.duration,
        min_queries=args.min_queries,
        warmup_s=args.warmup,
        batches=args.batches,
        study_nodes=args.study_nodes,
        threads=args.threads,
        interleave=args.interleave,
        layers=args.layers,
        out=args.out,
        matmul_size=args.matmul_size,
        copy_mib=args.copy_mib,
        command=argv,
    )
    if args.scenario == "server":
        load = ServerOptions(args.rate, args.clients, args.p99_ms, args.max_runs, args.max_queries)
        try:
            full, paths = run_server_bench(options, load)
        except (ValueError, ArtifactError, OSError) as e:
            print(f"m2a-bench: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(full, indent=2) if args.json else server_markdown(full))
        print("written: " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
        lost = any(b.get("error") for b in full["backends"])
        return 1 if lost else 0
    try:
        if args.select and args.backend and not any(BackendSpec.parse(b).artifact for b in args.backend):
            artifact_folder(options)  # the choice is recorded in its manifest: it must exist
        run = run_bench(options)
    except (ValueError, ArtifactError, OSError) as e:
        print(f"m2a-bench: error: {e}", file=sys.stderr)
        return 2
    if run.interrupted:
        steps = sum(len(b["steps"]) for b in run.report["backends"])
        print(
            f"m2a-bench: interrupted (Ctrl-C): the {steps} finished step(s) are in {run.paths['json']}",
            file=sys.stderr,
        )
        return INTERRUPTED
    print_run(run, args.json)
    if args.select:
        folders = dict.fromkeys(Path(r["artifact"]).parent for r in run.report["backends"] if r["artifact"])
        try:
            chosen = select_verified(run, list(folders) or [options.folder], args.verify_nodes, args.sign)
        except ArtifactError as e:
            print(f"m2a-bench: error: {e}", file=sys.stderr)
            return 2
        for folder, selection in chosen.items():
            print_selection(selection, folder, args.json)
    return 1 if run.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
