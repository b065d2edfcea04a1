"""The report: JSON with every sample, a Markdown table, and two PNG plots.

Each step gets its ratio to PyTorch eager FP32 on the same device (>1: faster) and its % of the
arithmetic floor, computed here from the raw numbers so a stored JSON can be re-rendered.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from m2anet.bench import layers
from m2anet.bench.floor import Peaks, floor_seconds, node_bytes, percent_of_floor
from m2anet.bench.targets import baseline_label
from m2anet.io import atomic_path, write_json

SCHEMA = 1


def model_key(name: str, heads: str) -> str:
    return f"{name}/{heads}"


def annotate(report: dict[str, Any]) -> None:
    """Add floor, % of floor and the ratios to torch eager FP32 to every step."""
    base = {
        (b["backend"], s["scenario"], s["batch"]): s
        for b in report["backends"]
        for s in b["steps"]
        if b["backend"] in (baseline_label("cpu"), baseline_label("cuda"))
    }
    for b in report["backends"]:
        peaks = report["floors"].get(b.get("device_kind", ""))
        model = report["models"].get(model_key(b.get("model", ""), b.get("heads", "")))
        for profiled in b.get("layers", []) if peaks else ():
            layers.annotate(profiled, Peaks(**peaks), b["precision"])
        for s in b["steps"]:
            s["floor_ms_per_node"] = s["pct_of_floor"] = None
            if peaks and model:
                p = Peaks(**peaks)
                floor_s = floor_seconds(
                    model["flops_per_node"],
                    node_bytes(s["batch"], model["params"], b["precision"]),
                    p.best_flops(b["precision"]),
                    p.bandwidth,
                )
                s["floor_ms_per_node"] = floor_s * 1e3
                s["pct_of_floor"] = percent_of_floor(floor_s * 1e3, s["ms_per_node"])
            ref = base.get((baseline_label(b["device_kind"]), s["scenario"], s["batch"]))
            s["vs_torch_fp32"] = None if ref is None else ref["ms_per_node"] / s["ms_per_node"]
            s["vs_torch_fp32_p50"] = (
                None if ref is None else ref["latency_ms"]["p50"] / s["latency_ms"]["p50"]
            )


def build(
    environment: dict[str, Any],
    floors: dict[str, Peaks],
    models: dict[str, dict[str, float]],
    backends: list[dict[str, Any]],
    settings: dict[str, Any],
    command: str,
) -> dict[str, Any]:
    report = {
        "schema": SCHEMA,
        "tool": "m2a-bench",
        "command": command,
        "environment": environment,
        "settings": settings,
        "floors": {k: asdict(v) for k, v in floors.items()},
        "models": models,
        "backends": backends,
    }
    annotate(report)
    return report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _notes(b: dict[str, Any], s: dict[str, Any]) -> str:
    notes = []
    if s["enqueued_ahead"]:
        notes.append(f"enqueued {s['queue_depth']} ahead")
    tel = s.get("telemetry") or {}
    if tel.get("throttled"):
        notes.append("THROTTLED: " + ", ".join(tel["throttle_reasons"]))
    if b.get("parity_passed") is False:
        notes.append("parity FAILED")
    elif b.get("artifact") and b.get("parity_passed") is None:
        notes.append("parity not verified")
    if b.get("interrupted"):
        notes.append("interrupted (Ctrl-C) during this backend: its later steps are missing")
    return "; ".join(notes)


def _gflops(peaks: dict[str, Any]) -> str:
    rates = ", ".join(f"{k} {v / 1e9:,.0f} GFLOP/s" for k, v in peaks["flops"].items())
    return (
        f"{rates}; copy {peaks['bandwidth'] / 1e9:,.1f} GB/s (matmul {peaks['matmul_size']}², measured here: "
        f"the fastest of {peaks.get('measurements', 1)}, before the first backend and after each, or after "
        "each step when interleaved)"
    )


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    git = env.get("git") or {}
    commit = git.get("commit", "unknown")[:10] + (" (with local changes)" if git.get("dirty") else "")
    machine = env["cpu"] + "".join(f" + {g['name']}" for g in env.get("gpus", []))
    lines = [
        "# m2a-bench",
        "",
        f"{env['date']} on {machine}; torch threads {env['threads']['torch']}, "
        f"ONNX Runtime threads {env['threads']['onnxruntime']}; commit {commit}.",
        "",
    ]
    for kind, peaks in report["floors"].items():
        lines.append(f"* {kind} peaks: {_gflops(peaks)}")
    for key, m in report["models"].items():
        lines.append(
            f"* {key}: {m['flops_per_node'] / 1e9:.2f} GFLOP/node, {m['params'] / 1e6:.2f} M parameters"
        )
    lines += [
        "",
        "ms/node and nodes/s come from the wall time of the measured queries; x torch fp32 is the speed "
        "relative to PyTorch eager FP32 on the same device (>1 is faster); % of floor is the arithmetic "
        "floor over the measured time.",
        "",
    ]
    settings = report.get("settings", {})
    if settings.get("interleaved"):
        lines += [
            "The backends were measured interleaved: every step in rounds of alternating slices (about "
            f"{settings['rounds']} per backend, fewer where one call outlasts a slice), so a machine that "
            "slowed down for a while slowed them all alike. With every backend open at once, torch's peak "
            "memory is not one backend's and is left out.",
            "",
        ]
    lines += [
        "| backend | precision | scenario | batch | ms/node | nodes/s | p50 ms | p99 ms | x torch fp32 "
        "| floor ms/node | % of floor | J/node | queries (warm-up) | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    split = []
    for b in report["backends"]:
        if b.get("error"):
            continue
        for s in b["steps"]:
            tel = s.get("telemetry") or {}
            lines.append(
                f"| {b['backend']} | {b['precision']} | {s['scenario']} | {s['batch']} "
                f"| {s['ms_per_node']:.3f} | {s['nodes_per_s']:.1f} | {s['latency_ms']['p50']:.3f} "
                f"| {s['latency_ms']['p99']:.3f} | {_fmt(s['vs_torch_fp32'], '.2f')} "
                f"| {_fmt(s['floor_ms_per_node'], '.3f')} | {_fmt(s['pct_of_floor'], '.1f')} "
                f"| {_fmt(tel.get('joules_per_node'), '.4f')} | {s['queries']} ({s['warmup_queries']}) "
                f"| {_notes(b, s)} |"
            )
            if s["device_ms"]:
                split.append((b, s))
    if split:
        lines += [
            "",
            "GPU time split by CUDA events (p50, ms per query), as trtexec reports it:",
            "",
            "| backend | scenario | batch | host-to-device | compute | device-to-host | peak torch MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for b, s in split:
            d, peak = s["device_ms"], _fmt(s["torch_peak_memory_mib"], ".0f")
            lines.append(
                f"| {b['backend']} | {s['scenario']} | {s['batch']} | {d['h2d']['p50']:.3f} "
                f"| {d['compute']['p50']:.3f} | {d['d2h']['p50']:.3f} | {peak} |"
            )
    sampled = [
        (b, s) for b in report["backends"] for s in b["steps"] if (s.get("telemetry") or {}).get("available")
    ]
    if sampled:
        lines += [
            "",
            "NVML telemetry during the measured queries (device memory is device-wide):",
            "",
            "| backend | scenario | batch | mean W | peak device MiB | SM MHz min-max | max °C | throttle |",
            "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
        ]
        for b, s in sampled:
            t = s["telemetry"]
            power, sm = t["power_w"] or {}, t["sm_clock_mhz"] or {}
            lines.append(
                f"| {b['backend']} | {s['scenario']} | {s['batch']} | {_fmt(power.get('mean'), '.0f')} "
                f"| {_fmt(t['memory_used_mib_peak'], '.0f')} "
                f"| {_fmt(sm.get('min'), '.0f')}-{_fmt(sm.get('max'), '.0f')} "
                f"| {_fmt(t['temperature_c_max'], 'd')} | {', '.join(t['throttle_reasons']) or 'none'} |"
            )
    errors = [b for b in report["backends"] if b.get("error")]
    if errors:
        lines += ["", "Not measured:", ""] + [f"* {b['backend']}: {b['error']}" for b in errors]
    return "\n".join(lines) + "\n"


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_latency(report: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    panels = [
        sc
        for sc in ("single", "study")
        if any(s["scenario"] == sc for b in report["backends"] for s in b["steps"])
    ]
    if not panels:
        return False
    width = max(6.0, 0.9 * len(report["backends"]) + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 5), squeeze=False)
    for ax, scenario in zip(axes[0], panels, strict=True):
        names, data = [], []
        for b in report["backends"]:
            for s in b["steps"]:
                if s["scenario"] == scenario:
                    names.append(b["backend"])
                    data.append([v * 1e-6 for v in s["samples_ns"]])
        ax.boxplot(data, whis=(1, 99))
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set(ylabel="latency per query (ms)", title=f"{scenario}: boxes p25-p75, whiskers p1-p99")
    _save(fig, path)
    return True


def plot_throughput(report: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt

    curves = [
        (b, [s for s in b["steps"] if s["scenario"] == "offline"])
        for b in report["backends"]
        if not b.get("error")
    ]
    curves = [(b, steps) for b, steps in curves if steps]
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    floors: dict[tuple[tuple[int, ...], tuple[float, ...]], list[str]] = {}
    for b, steps in curves:
        batches = [s["batch"] for s in steps]
        ax.plot(batches, [s["nodes_per_s"] for s in steps], "o-", label=b["backend"])
        if all(s["floor_ms_per_node"] for s in steps):
            curve = (tuple(batches), tuple(1e3 / s["floor_ms_per_node"] for s in steps))
            name = f"{b['device_kind']} {b['precision']}"
            if name not in floors.setdefault(curve, []):  # precisions with the same peak share one line
                floors[curve].append(name)
    for (xs, ys), names in floors.items():
        ax.plot(xs, ys, "--", lw=1, label="floor " + ", ".join(names))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({s["batch"] for _, steps in curves for s in steps})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set(xlabel="batch size", ylabel="nodes/s", title="offline throughput; dashed: arithmetic floor")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def write(report: dict[str, Any], folder: Path, plots: bool = True) -> dict[str, Path]:
    """bench.json and bench.md; with `plots`, latency.png and throughput.png too; layers.md and
    layers.png where backends were profiled layer by layer."""
    import matplotlib

    matplotlib.use("Agg")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "bench.json", "markdown": folder / "bench.md"}
    write_json(paths["json"], report)
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(markdown(report), encoding="utf-8")
    for name, plot in (("latency", plot_latency), ("throughput", plot_throughput)) if plots else ():
        if plot(report, folder / f"{name}.png"):
            paths[name] = folder / f"{name}.png"
    if any("layers" in b or "layers_error" in b for b in report["backends"]):
        paths["layers"] = folder / "layers.md"
        with atomic_path(paths["layers"]) as tmp:
            tmp.write_text(layers.report_markdown(report), encoding="utf-8")
        fig = layers.figure(report) if plots else None
        if fig is not None:
            _save(fig, folder / "layers.png")
            paths["layers_plot"] = folder / "layers.png"
    return paths
