"""`m2a-bench`: per-node latency and throughput of every backend, next to the hardware's floor.

By default it benchmarks every backend that can run on this machine for the artifacts of
`--model` in `--artifacts` (exporting them first if missing), in the single, study and offline
scenarios, and writes bench.json (every sample), bench.md and two plots. Exit 0 when every
backend ran, 1 when one could not (named in the report), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from m2anet.bench import compare, env, floor, report, scenarios, targets
from m2anet.bench.scenarios import SCENARIOS, Inputs, Settings
from m2anet.bench.select import select
from m2anet.engines.spec import SPEC_HELP
from m2anet.export.manifest import ArtifactError, read_manifest
from m2anet.model import list_models, model_stats


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batches {text!r}: give sizes such as 1,8,32") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batches {text!r}: sizes must be >= 1")
    return values


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2a-bench", description=__doc__.splitlines()[0])
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
    ap.add_argument("--scenario", default="all", choices=[*SCENARIOS, "all"])
    ap.add_argument("--duration", type=float, default=5.0, help="minimum measured seconds per step")
    ap.add_argument("--min-queries", type=int, default=10, help="minimum measured queries (single, study)")
    ap.add_argument(
        "--warmup", type=float, default=1.0, help="minimum warm-up seconds per step (>= 2 queries)"
    )
    ap.add_argument("--batches", type=_batches, help="offline sweep (default: 1, 2, 4, ... the profile max)")
    ap.add_argument("--study-nodes", type=int, default=24, help="nodes of one study")
    ap.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--out", type=Path, help="report folder (default: ARTIFACTS/MODEL/bench)")
    ap.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    ap.add_argument("--select", action="store_true", help="record the fastest parity-passing artifact")
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two bench.json reports")
    ap.add_argument(
        "--threshold", type=float, default=0.10, help="--compare fails past this loss (0.10: 10%%)"
    )
    g = ap.add_argument_group("arithmetic floor")
    g.add_argument("--matmul-size", type=int, help="matrix size of the peak measurement")
    g.add_argument("--copy-mib", type=int, help="MiB copied for the bandwidth measurement")
    return ap


def _artifacts(args: argparse.Namespace) -> Path:
    """The model's artifact folder, exported first (with parity checks) when it has no manifest."""
    folder = args.artifacts / args.model
    if not (folder / "manifest.json").is_file():
        from m2anet.export import cli as export_cli

        print(f"m2a-bench: no artifacts in {folder}: running m2a-export first", file=sys.stderr)
        threads = ["--threads", str(args.threads)] if args.threads else []
        export_cli.main(["--model", args.model, "--precision", "all", "--out", str(args.artifacts), *threads])
        read_manifest(folder)  # raises with the fix when the export wrote nothing
    return folder


def _sweep(chosen: list[targets.Target], folder: Path) -> tuple[int, ...]:
    """1, 2, 4, ... up to the TensorRT profile maximum recorded by m2a-export (128 without one)."""
    folders = [t.artifact.parent for t in chosen if t.artifact is not None] or [folder]
    try:
        top = int(read_manifest(folders[0])["batch_profile"]["max"])
    except (ArtifactError, KeyError):
        top = 128
    return tuple(2**i for i in range(top.bit_length()))


def _describe(target: targets.Target, model: str) -> dict[str, Any]:
    """What the report needs to know of a target before it is opened (so a failure is still named)."""
    info: dict[str, Any] = {
        "backend": target.label,
        "spec": target.spec,
        "options": target.options,
        "model": target.options.get("model_name", model),
        "heads": target.options.get("heads", "both"),
        "artifact": None,
        "parity_passed": None,
        "device_kind": "cuda"
        if "cuda" in target.spec or target.spec.startswith(("trt", "ort:trt"))
        else "cpu",
        "steps": [],
        "error": None,
    }
    if target.artifact is not None:
        info["artifact"] = str(target.artifact)
        try:
            manifest = read_manifest(target.artifact.parent)
        except ArtifactError:
            return info
        info["model"], info["heads"] = manifest["model"]["name"], manifest["model"]["heads"]
        parity = manifest.get("artifacts", {}).get(target.artifact.name, {}).get("parity")
        info["parity_passed"] = None if parity is None else bool(parity.get("passed"))
    return info


def run(
    args: argparse.Namespace, chosen: list[targets.Target], settings: Settings
) -> Iterator[dict[str, Any]]:
    """Each target's description and steps, one target at a time, so a report can be saved after each."""
    chosen_scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    steps = scenarios.plan(chosen_scenarios, settings)
    inputs = Inputs(settings.pool)
    bar = tqdm(total=len(chosen) * len(steps), desc="m2a-bench", unit="step", file=sys.stderr)
    for target in chosen:
        info = _describe(target, args.model)
        bar.set_description(target.label)
        done = bar.n
        try:
            t0 = time.perf_counter()
            with target.open(args.model, args.threads) as backend:
                info.update(
                    device=backend.device,
                    device_kind="cuda" if scenarios.is_cuda(backend) else "cpu",
                    precision=backend.precision,
                    open_s=time.perf_counter() - t0,
                )
                info["steps"] = scenarios.run_backend(
                    backend, chosen_scenarios, settings, inputs, lambda *_: bar.update(1)
                )
        except Exception as e:  # one backend that cannot run here must not cost the others' numbers
            first = (str(e).strip().splitlines() or [""])[0]
            info["error"] = f"{type(e).__name__}: {first}"
            info["steps"] = []
            bar.update(done + len(steps) - bar.n)
        yield info
    bar.close()


def _floors(args: argparse.Namespace, chosen: list[targets.Target]) -> dict[str, floor.Peaks]:
    """Measured before the backends run, so a run cut short still saves a complete report."""
    kinds = dict.fromkeys(_describe(t, args.model)["device_kind"] for t in chosen)
    if not torch.cuda.is_available():
        kinds.pop("cuda", None)  # those targets fail to open and say so in the report
    copy_bytes = args.copy_mib << 20 if args.copy_mib else None
    return {k: floor.measure(k, args.matmul_size, copy_bytes) for k in kinds}


def _print_selection(
    full: dict[str, Any], results: list[dict[str, Any]], report_path: Path, to_stderr: bool
) -> None:
    folders = dict.fromkeys(Path(r["artifact"]).parent for r in results if r["artifact"])
    for f in folders:
        for scenario, choice in select(full, f, report_path).items():
            print(
                f"selected for {scenario}: {choice['backend']} ({choice['metric']} {choice['value']:.3f}"
                f", batch {choice['batch']}); recorded in {f / 'manifest.json'}",
                file=sys.stderr if to_stderr else sys.stdout,
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.compare:
        return compare.main(*args.compare, args.threshold)
    if args.duration < 0 or args.min_queries < 1 or args.study_nodes < 1 or (args.threads or 1) < 1:
        parser().error("--duration must be >= 0 and --min-queries, --study-nodes, --threads >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.artifacts / args.model
    try:
        chosen = (
            [targets.parse(t) for t in args.backend] if args.backend else targets.discover(_artifacts(args))
        )
        if args.select and not any(t.artifact for t in chosen):
            raise ValueError("--select needs artifact backends (ort:... or trt:...), not only torch")
        settings = Settings(
            duration_s=args.duration,
            min_queries=args.min_queries,
            warmup_s=args.warmup,
            study_nodes=args.study_nodes,
            batches=args.batches or _sweep(chosen, folder),
        )
    except (ValueError, ArtifactError, OSError) as e:
        print(f"m2a-bench: error: {e}", file=sys.stderr)
        return 2
    out = args.out or folder / "bench"
    floors, environment = _floors(args, chosen), env.capture(args.threads)
    command = shlex.join(["m2a-bench", *argv])
    results: list[dict[str, Any]] = []
    models: dict[str, dict[str, float]] = {}
    for info in run(args, chosen, settings):
        results.append(info)
        if not info["error"]:
            key = report.model_key(info["model"], info["heads"])
            models[key] = models.get(key) or model_stats(info["model"], info["heads"])
        full = report.build(environment, floors, models, results, asdict(settings), command)
        paths = report.write(full, out, plots=len(results) == len(chosen))
    if args.json:
        print(json.dumps(full, indent=2))
    else:
        print(report.markdown(full))
        print("written: " + ", ".join(str(p) for p in paths.values()))
    if args.select:
        _print_selection(full, results, paths["json"], args.json)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
