"""A benchmark run: every chosen backend through every chosen scenario, next to the hardware's floor.

The report is rebuilt and saved after each backend, so a run cut short keeps what it measured; Ctrl-C
ends the run cleanly with the steps finished so far saved (the interrupted backend's included).
The benchmarks measure; they never export: a folder without artifacts is an error that names the
`m2a-export` command to run.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
import sys
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from m2anet.bench import env, floor, layers, report, scenarios, targets
from m2anet.bench.scenarios import SCENARIOS, Inputs, Settings
from m2anet.bench.server_scenario import ServerSettings, find_max_rate, run_server
from m2anet.engines import Backend, BackendSpec
from m2anet.io import atomic_path, write_json
from m2anet.manifest import MANIFEST, ArtifactError, artifact_entry, read_manifest
from m2anet.model import model_stats


@dataclass
class BenchOptions:
    """What `m2a-bench` takes; every field has the command line's default."""

    model: str = "m2anet_base"
    artifacts: Path = Path("artifacts")
    backends: list[str] | None = None
    """Specs (`SPEC@key=value,...`); None: every backend that runs here on the model's artifacts."""
    scenario: str = "all"
    duration_s: float = 5.0
    min_queries: int = 10
    warmup_s: float = 1.0
    batches: tuple[int, ...] | None = None
    """Offline sweep; None: 1, 2, 4, ... up to the manifest's profile maximum."""
    study_nodes: int = 24
    threads: int | None = None
    interleave: bool = False
    """Measure the backends side by side, step by step, in alternating slices (`Settings.interleaved`)."""
    layers: bool = False
    """After its steps, profile each PyTorch backend's convolutions (layers.md) at each offline batch size
    (`layer_batches`)."""
    out: Path | None = None
    matmul_size: int | None = None
    copy_mib: int | None = None
    command: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.artifacts / self.model


@dataclass
class BenchRun:
    report: dict[str, Any]
    paths: dict[str, Path]
    failed: list[str]
    """Backends that could not run here (named in the report)."""
    interrupted: bool = False
    """Ctrl-C ended the run; the report holds the steps that finished."""


def artifact_folder(options: BenchOptions) -> Path:
    folder = options.folder
    if (folder / MANIFEST).is_file():
        return folder
    if (options.artifacts / MANIFEST).is_file():  # the model folder, as m2a-predict and m2a-triton take it
        raise ArtifactError(
            f"{options.artifacts} is one model's folder (it holds {MANIFEST}): m2a-bench takes the folder "
            f"above it, --artifacts {options.artifacts.parent} --model {options.artifacts.name}"
        )
    threads = f" --threads {options.threads}" if options.threads else ""
    raise ArtifactError(
        f"no artifacts in {folder}: run m2a-export --model {options.model} --precision all "
        f"--out {options.artifacts}{threads} first"
    )


def _sweep(chosen: list[BackendSpec], folder: Path) -> tuple[int, ...]:
    """1, 2, 4, ... up to the TensorRT profile maximum recorded by m2a-export (128 without one)."""
    folders = [t.artifact.parent for t in chosen if t.artifact is not None] or [folder]
    try:
        top = int(read_manifest(folders[0])["batch_profile"]["max"])
    except (ArtifactError, KeyError):
        top = 128
    return tuple(2**i for i in range(top.bit_length()))


def plan(options: BenchOptions) -> tuple[list[BackendSpec], Settings]:
    """The targets and settings of a run; ValueError or ArtifactError (one line each) on bad input."""
    if options.backends:
        chosen = [BackendSpec.parse(t) for t in options.backends]
        for target in chosen:  # a typo fails now, not as a report row after the others ran
            target.check()
            if target.artifact is not None:
                artifact_entry(target.artifact, verify=False)
        labels = [target.label for target in chosen]
        if twice := next((label for label in labels if labels.count(label) > 1), None):
            raise ValueError(f"backend {twice} is named twice: its rows would not be told apart; drop one")
    else:
        chosen = targets.discover(artifact_folder(options))
    settings = Settings(
        duration_s=options.duration_s,
        min_queries=options.min_queries,
        warmup_s=options.warmup_s,
        study_nodes=options.study_nodes,
        batches=options.batches or _sweep(chosen, options.folder),
        interleaved=options.interleave,
    )
    return chosen, settings


def describe(target: BackendSpec, model: str) -> dict[str, Any]:
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
        if target.kind == "trt" or (target.device or "").startswith(("cuda", "trt"))
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
        built = manifest.get("model", {})  # a folder written by hand may not say: --model then
        info["model"], info["heads"] = built.get("name", info["model"]), built.get("heads", info["heads"])
        parity = manifest.get("artifacts", {}).get(target.artifact.name, {}).get("parity")
        info["parity_passed"] = None if parity is None else bool(parity.get("passed"))
    return info


def _scenarios(options: BenchOptions) -> tuple[str, ...]:
    return SCENARIOS if options.scenario == "all" else (options.scenario,)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _opened(info: dict[str, Any], backend: Backend, t0: float) -> None:
    info.update(
        device=backend.device,
        device_kind="cuda" if scenarios.is_cuda(backend) else "cpu",
        precision=backend.precision,
        open_s=time.perf_counter() - t0,
    )


def layer_batches(chosen_scenarios: tuple[str, ...], settings: Settings) -> list[int]:
    """The offline sweep's batch sizes, or without it those of the steps that ran (1 for single nodes)."""
    if "offline" in chosen_scenarios:
        return list(settings.batches)
    return sorted({batch for _, batch in scenarios.plan(chosen_scenarios, settings)})


def profile_layers(
    backend: Backend, info: dict[str, Any], batches: list[int], inputs: Inputs, bar: tqdm
) -> None:
    """`layers.profile_layers` of an open backend at each of `batches`, into its report entry; a profile
    that fails is named there and costs nothing else."""
    reason = layers.not_profiled(backend)
    if reason is not None:
        info["layers_error"] = reason
        return
    info["layers"] = []
    try:
        for batch in batches:
            bar.set_description(f"layers {info['backend']} batch {batch}")
            info["layers"].append(layers.profile_layers(backend, *inputs.batches(batch, 1)[0]))
    except Exception as e:
        info["layers_error"] = _error(e)


def measure_targets(
    options: BenchOptions, chosen: list[BackendSpec], settings: Settings
) -> Generator[list[dict[str, Any]], None, None]:
    """Every target's description and steps, yielded after each target (or after each step when
    interleaved) so a report can be saved as the run goes. After Ctrl-C the targets still running come
    with `interrupted` set and their finished steps, and the run ends."""
    chosen_scenarios = _scenarios(options)
    steps = len(scenarios.plan(chosen_scenarios, settings))
    bar = tqdm(total=len(chosen) * steps, desc="m2a-bench", unit="step", file=sys.stderr)
    run = _interleaved if settings.interleaved else _one_by_one
    try:
        yield from run(options, chosen, settings, chosen_scenarios, Inputs(settings.pool), bar)
    finally:
        bar.close()


def _one_by_one(
    options: BenchOptions,
    chosen: list[BackendSpec],
    settings: Settings,
    chosen_scenarios: tuple[str, ...],
    inputs: Inputs,
    bar: tqdm,
) -> Generator[list[dict[str, Any]], None, None]:
    steps = scenarios.plan(chosen_scenarios, settings)
    results: list[dict[str, Any]] = []
    for target in chosen:
        info = describe(target, options.model)
        results.append(info)
        bar.set_description(target.label)
        done = bar.n
        try:
            t0 = time.perf_counter()
            with targets.open_target(target, options.model, options.threads) as backend:
                _opened(info, backend, t0)
                scenarios.run_backend(
                    backend, chosen_scenarios, settings, inputs, lambda *_: bar.update(1), info["steps"]
                )
                if options.layers:
                    profile_layers(backend, info, layer_batches(chosen_scenarios, settings), inputs, bar)
        except KeyboardInterrupt:
            info["interrupted"] = True
            yield results
            return
        except Exception as e:  # one backend that cannot run here must not cost the others' numbers
            info["error"], info["steps"] = _error(e), []
            bar.update(done + len(steps) - bar.n)
        yield results


def _interleaved(
    options: BenchOptions,
    chosen: list[BackendSpec],
    settings: Settings,
    chosen_scenarios: tuple[str, ...],
    inputs: Inputs,
    bar: tqdm,
) -> Generator[list[dict[str, Any]], None, None]:
    """Every target open at once, each step measured on all of them in alternating slices
    (`scenarios.run_interleaved`); a target that fails loses its steps and leaves the rest."""
    steps = scenarios.plan(chosen_scenarios, settings)
    results = [describe(target, options.model) for target in chosen]
    with contextlib.ExitStack() as every:
        running: dict[int, Backend] = {}
        closers: dict[int, contextlib.ExitStack] = {}
        try:
            for i, target in enumerate(chosen):
                bar.set_description(f"opening {target.label}")
                t0 = time.perf_counter()
                closers[i] = every.enter_context(contextlib.ExitStack())
                try:
                    opened = targets.open_target(target, options.model, options.threads)
                    backend = closers[i].enter_context(opened)
                except Exception as e:
                    results[i]["error"] = _error(e)
                    bar.update(len(steps))
                    continue
                _opened(results[i], backend, t0)
                running[i] = backend
            for k, (scenario, batch) in enumerate(steps):
                bar.set_description(f"{scenario} batch {batch}")
                measured, failed = scenarios.run_interleaved(running, scenario, batch, settings, inputs)
                for i, step in measured.items():
                    results[i]["steps"].append(step)
                for i, error in failed.items():  # closed now, so its memory is not held from the others
                    results[i]["error"], results[i]["steps"] = _error(error), []
                    del running[i]
                    closers[i].close()
                bar.update(len(measured) + len(failed) * (len(steps) - k))
                yield results
            for i, backend in running.items() if options.layers else ():
                profile_layers(backend, results[i], layer_batches(chosen_scenarios, settings), inputs, bar)
                yield results
        except KeyboardInterrupt:
            for i in running:
                results[i]["interrupted"] = True
            yield results


def measure_floors(options: BenchOptions, chosen: list[BackendSpec]) -> dict[str, floor.Peaks]:
    """Measured before the backends run, so a run cut short still saves a complete report (and again
    after each backend, or each step when interleaved, by `run_bench`)."""
    kinds = dict.fromkeys(describe(t, options.model)["device_kind"] for t in chosen)
    if not torch.cuda.is_available():
        kinds.pop("cuda", None)  # those targets fail to open and say so in the report
    copy_bytes = options.copy_mib << 20 if options.copy_mib else None
    return {k: floor.measure(k, options.matmul_size, copy_bytes) for k in kinds}


def run_bench(options: BenchOptions) -> BenchRun:
    """Measure, then write bench.json, bench.md and the plots to `options.out` (default
    ARTIFACTS/MODEL/bench); ValueError or ArtifactError before anything runs on bad input."""
    chosen, settings = plan(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    out = options.out or options.folder / "bench"
    floors, environment = measure_floors(options, chosen), env.capture(options.threads)
    command = shlex.join(["m2a-bench", *options.command])
    results: list[dict[str, Any]] = []
    models: dict[str, dict[str, float]] = {}
    full: dict[str, Any] = {}
    paths: dict[str, Path] = {}
    interrupted = False
    planned = len(scenarios.plan(_scenarios(options), settings))

    def build() -> dict[str, Any]:
        for info in results:
            key = report.model_key(info["model"], info["heads"])
            if not info["error"] and key not in models:
                models[key] = model_stats(info["model"], info["heads"])
        return report.build(environment, floors, models, results, asdict(settings), command)

    measured = measure_targets(options, chosen, settings)
    try:
        for results in measured:
            interrupted = any(r.get("interrupted") for r in results)
            if not interrupted:  # the peaks again, 0.1 s per rate (gpu-check is short of time); the best kept
                floors = {
                    k: f.fastest(floor.measure(k, f.matmul_size, f.copy_bytes, 0.1))
                    for k, f in floors.items()
                }
            finished = len(results) == len(chosen) and all(
                r["error"] or len(r["steps"]) == planned for r in results
            )
            full = build()
            paths = report.write(full, out, plots=finished and not interrupted)
    except KeyboardInterrupt:  # between two yields, while the peaks or the report were being made
        measured.close()
        interrupted = True
        for info in results:
            if not info["error"] and len(info["steps"]) < planned:
                info["interrupted"] = True
        full = build()
        paths = report.write(full, out, plots=False)
    return BenchRun(full, paths, [r["backend"] for r in results if r["error"]], interrupted)


@dataclass
class ServerOptions:
    """The Server scenario's load: `m2a-bench --scenario server`."""

    rate: float = 5.0
    clients: int = 4
    p99_ms: float | None = None
    """Search the highest rate whose p99 stays under this bound; None: one run at `rate`."""
    max_runs: int = 6
    max_queries: int = 2000


def run_server_bench(options: BenchOptions, load: ServerOptions) -> tuple[dict[str, Any], dict[str, Path]]:
    """The MLPerf Server scenario (Poisson arrivals, one node per query) on each target, as
    perf_analyzer would load a Triton server; writes server.json and server.md."""
    chosen, _ = plan(options)
    settings = ServerSettings(
        rate=load.rate,
        clients=load.clients,
        duration_s=options.duration_s,
        min_queries=options.min_queries,
        max_queries=load.max_queries,
    )
    inputs = Inputs().batches(1, 16)
    rows = []
    for target in chosen:
        info = describe(target, options.model)
        try:
            factory = functools.partial(targets.open_target, target, options.model, options.threads)
            if load.p99_ms is None:
                info["server"] = run_server(factory, inputs, settings).to_dict()
            else:
                search = find_max_rate(factory, inputs, settings, load.p99_ms, max_runs=load.max_runs)
                info["server"] = search.to_dict()
        except Exception as e:  # as in measure_targets: one backend that cannot run costs only its row
            info["error"] = _error(e)
        rows.append(info)
    full = {
        "schema": report.SCHEMA,
        "scenario": "server",
        "environment": env.capture(options.threads),
        "settings": {**asdict(settings), **asdict(load)},
        "command": shlex.join(["m2a-bench", *options.command]),
        "backends": rows,
    }
    out = options.out or options.folder / "bench"
    paths = {"json": out / "server.json", "markdown": out / "server.md"}
    write_json(paths["json"], full)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(server_markdown(full), encoding="utf-8")
    return full, paths


def server_markdown(full: dict[str, Any]) -> str:
    """One row per run: the rate asked and achieved, latency per node, and what was lost or changed."""
    lines = [
        "| backend | rate /s | achieved /s | p50 ms | p99 ms | sent | failed | lost | changed | held |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    bound = full["settings"]["p99_ms"]
    for b in full["backends"]:
        if b.get("error"):
            lines.append(f"| {b['backend']} | could not run: {b['error']} |")
            continue
        server = b["server"]
        for run in server.get("runs", [server]):
            lat, s = run["latency_per_node_ms"] or {"p50": float("nan"), "p99": float("nan")}, run["settings"]
            lost = run["sent"] - run["answered"] - run["failed"]
            held = run["failed"] == 0 and run["changed"] == 0 and run["latency_ms"] is not None
            held = "-" if bound is None else ("yes" if held and run["latency_ms"]["p99"] <= bound else "no")
            lines.append(
                f"| {b['backend']} | {s['rate']:g} | {run['achieved_rate']:.2f} | {lat['p50']:.1f} "
                f"| {lat['p99']:.1f} | {run['sent']} | {run['failed']} | {lost} "
                f"| {run['changed']} | {held} |"
            )
        if bound is not None:
            lines.append(
                f"\n{b['backend']}: highest rate held with p99 <= {bound:g} ms: {server['rate_held']}"
            )
    return "\n".join(lines) + "\n"
