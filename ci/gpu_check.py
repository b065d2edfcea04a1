"""The Python steps of ci/gpu-check: parity of every PyTorch GPU path, a per-kernel profile, and the
summary table with the goals of issue 11. Nothing here imports SimpleITK or tritonclient.

    python3 ci/gpu_check.py backends                   the PyTorch GPU paths, one per line
    python3 ci/gpu_check.py verify OUT MODEL N SPEC... m2a-verify of each SPEC -> OUT/verify/
    python3 ci/gpu_check.py profile OUT MODEL BATCH    slowest CUDA kernels of FP32 and FP16 -> OUT/profile.md
    python3 ci/gpu_check.py summary OUT                OUT/summary.md from OUT/{bench,verify,train}
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

GOALS = {
    "single_p50_ms": 0.7,
    "pct_of_floor_256": 25.0,
    "half_vs_fp32": 1.0,
    "train_nodes_per_s": 800.0,
}
"""Issue 11's goals on an H100/H200, m2anet_base with both heads."""
BATCHES = (1, 32, 256)


def _name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", spec).strip("_")


def backends() -> list[str]:
    """The PyTorch GPU paths m2a-bench discovers on a GPU machine (bench/targets.py), as spec strings."""
    from m2anet.bench.targets import TORCH_CUDA
    from m2anet.engines import BackendSpec

    return [BackendSpec(spec, dict(opts)).label for spec, opts in TORCH_CUDA]


class _MemoBackend:
    """A backend whose outputs are kept per input, and which stays open: the CPU reference of every path."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.memo = backend, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def infer(self, ct: Any, mask: Any, *, check: bool = True) -> Any:
        key = hashlib.sha1(ct.tobytes() + mask.tobytes()).hexdigest() + str(ct.shape)
        if key not in self.memo:
            self.memo[key] = self.backend.infer(ct, mask, check=check)
        return self.memo[key]

    def __enter__(self) -> _MemoBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _memo_reference(open_backend: Any) -> Any:
    opened: dict[str, _MemoBackend] = {}

    def open_memo(spec: Any, **options: Any) -> Any:
        if spec != "torch:cpu":
            return open_backend(spec, **options)
        key = json.dumps(options, sort_keys=True, default=str)
        if key not in opened:
            opened[key] = _MemoBackend(open_backend(spec, **options))
        return opened[key]

    return open_memo


def verify_all(out: Path, model: str, n: int, specs: list[str]) -> int:
    """m2a-verify of each spec against PyTorch FP32 on the CPU, with stress inputs; verify.json, .md and
    .png per spec, and verify/summary.json rewritten after each, so a run cut short keeps what it did."""
    import m2anet.verify
    from m2anet.io import write_json
    from m2anet.verify import VerifyOptions, verify, write_report

    # the synthetic test nodes are generated on the CPU, seconds per hundred, and the CPU reference takes
    # as long again: both once for every path
    m2anet.verify.load_split = functools.cache(m2anet.verify.load_split)  # type: ignore[attr-defined]
    m2anet.verify.open_backend = _memo_reference(m2anet.verify.open_backend)  # type: ignore[attr-defined]
    results: dict[str, Any] = {}
    for spec in specs:
        t0 = time.perf_counter()
        try:
            v = verify(VerifyOptions(backend=spec, model=model, n=n))
        except Exception as e:  # one path that cannot run must not cost the others their verdict
            results[spec] = {"passed": False, "failures": [f"{type(e).__name__}: {e}".splitlines()[0]]}
        else:
            folder = out / "verify" / _name(spec)
            write_report(v, folder)
            r = v.report
            keep = ("passed", "tier", "precision", "failures", "label_flips", "prob_max_abs", "mask_dice")
            results[spec] = {k: r.get(k) for k in keep}
        results[spec]["seconds"] = round(time.perf_counter() - t0, 1)
        verdict = "PASS" if results[spec]["passed"] else "FAIL " + "; ".join(results[spec]["failures"])
        print(f"{spec}: {verdict} ({results[spec]['seconds']} s)", flush=True)
        write_json(out / "verify" / "summary.json", results)
    return 0 if all(r["passed"] for r in results.values()) else 1


def profile(out: Path, model: str, batch: int) -> int:
    """The 12 CUDA kernels with the most time in FP32, FP16 channels-last and FP16 NCDHW eager runs, as
    torch.profiler names them: where a half-precision layer loses to its FP32 twin."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from m2anet.bench.scenarios import Inputs
    from m2anet.engines import open_backend

    ct, mask = (torch.from_numpy(x).cuda() for x in Inputs().batches(batch, 1)[0])
    lines = [f"# Slowest CUDA kernels, {model}, batch {batch}, 5 calls after 3 warm-up calls", ""]
    for spec in ("torch:cuda", "torch:cuda:fp16", "torch:cuda:fp16@channels_last=false"):
        with open_backend(spec, model_name=model) as backend:
            for _ in range(3):
                backend.infer_torch(ct, mask)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    backend.infer_torch(ct, mask)
                torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in kernels)
        lines += [
            f"## {spec}: {total / 5 / 1e3:.3f} ms of kernels per call",
            "",
            "| kernel | calls | ms per call | share |",
            "| --- | ---: | ---: | ---: |",
        ]
        for e in kernels[:12]:
            name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
            share = 100 * e.self_device_time_total / total
            lines.append(
                f"| `{name}` | {e.count // 5} | {e.self_device_time_total / 5 / 1e3:.3f} | {share:.1f}% |"
            )
        lines.append("")
    (out / "profile.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_rows(bench: dict[str, Any] | None, verified: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backend of the bench report (or only verified, if the bench did not get to it)."""
    rows: dict[str, dict[str, Any]] = {}
    for b in (bench or {}).get("backends", []):
        offline = {s["batch"]: s for s in b["steps"] if s["scenario"] == "offline"}
        single = next((s for s in b["steps"] if s["scenario"] == "single"), None)
        rows[b["backend"]] = {
            "backend": b["backend"],
            "precision": b.get("precision"),
            "error": b.get("error"),
            "single_p50_ms": single["latency_ms"]["p50"] if single else None,
            "ms_per_node": {n: offline[n]["ms_per_node"] for n in offline},
            "pct_of_floor": {n: offline[n]["pct_of_floor"] for n in offline},
            "vs_fp32": {n: offline[n]["vs_torch_fp32"] for n in offline},
        }
    for spec, v in verified.items():
        row = rows.setdefault(
            spec, {"backend": spec, "precision": v.get("precision"), "error": "not benchmarked"}
        )
        row["verify"] = v
    return list(rows.values())


def _passing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("verify", {}).get("passed") and not r.get("error")]


def _best_at_256(rows: list[dict[str, Any]]) -> tuple[float, str] | None:
    """(% of floor, backend) of the passing path closest to its floor at batch 256."""
    floors = [
        (r["pct_of_floor"].get(256), r["backend"]) for r in _passing(rows) if r["pct_of_floor"].get(256)
    ]
    return max(floors, default=None)


def _slowest_layers(bench: dict[str, Any] | None, backend: str, count: int = 6) -> list[str]:
    """The convolutions that take most of `backend`'s forward at batch 256 (m2a-bench --layers), each with
    its share and how far it is from its own floor: where the 25% goal is won or lost."""
    entry = next((b for b in (bench or {}).get("backends", []) if b["backend"] == backend), {})
    table = next((t for t in entry.get("layers", []) if t["batch"] == 256), None)
    if table is None:
        return []
    total = table["total_ms"]
    lines = [
        f"## Where batch 256 goes: {backend}, {total:.2f} ms of kernels per forward",
        "",
        "| convolution(s) | ms | % of its floor | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in sorted(table["rows"], key=lambda r: r["ms"], reverse=True)[:count]:
        lines.append(
            f"| {', '.join(r['layers'])} | {r['ms']:.3f} | {_fmt(r.get('pct_of_floor'), '.1f')} "
            f"| {100 * r['ms'] / total:.1f}% |"
        )
    lines += [f"| everything else | {table['rest_ms']:.3f} | | {100 * table['rest_ms'] / total:.1f}% |", ""]
    return lines


def _goals(rows: list[dict[str, Any]], train: dict[str, Any] | None) -> list[str]:
    passing = _passing(rows)
    lines = ["| goal | measured | met |", "| --- | --- | --- |"]

    def goal(text: str, measured: str, met: bool | None) -> None:
        lines.append(f"| {text} | {measured} | {'-' if met is None else 'yes' if met else 'NO'} |")

    singles = [(r["single_p50_ms"], r["backend"]) for r in passing if r["single_p50_ms"] is not None]
    best = min(singles, default=None)
    goal(
        f"single-node p50 <= {GOALS['single_p50_ms']} ms (best passing path)",
        f"{best[0]:.3f} ms, {best[1]}" if best else "-",
        None if best is None else best[0] <= GOALS["single_p50_ms"],
    )
    top = _best_at_256(rows)
    goal(
        f"batch 256 >= {GOALS['pct_of_floor_256']:.0f}% of the floor (best passing path)",
        f"{top[0]:.1f}%, {top[1]}" if top else "-",
        None if top is None else top[0] >= GOALS["pct_of_floor_256"],
    )
    for r in rows:  # the verified paths: an A/B row the check only measures is in the table, not a goal
        if r.get("precision") in ("fp16", "bf16") and not r.get("error") and "verify" in r:
            ratios = [r["vs_fp32"].get(n) for n in BATCHES]
            shown = ", ".join(f"{_fmt(x, '.2f')}x" for x in ratios)
            known = [x for x in ratios if x is not None]
            goal(
                f"{r['backend']} >= {GOALS['half_vs_fp32']:.1f}x FP32 at batch 1, 32, 256",
                shown,
                None if len(known) < len(BATCHES) else min(known) >= GOALS["half_vs_fp32"],
            )
    verified = [r for r in rows if "verify" in r]
    failed = [r["backend"] for r in verified if not r["verify"].get("passed")]
    goal(
        "every GPU backend passes its parity tier",
        f"{len(verified) - len(failed)} of {len(verified)} pass"
        + (f" (failed: {', '.join(failed)})" if failed else ""),
        None if not verified else not failed,
    )
    rate = None if train is None else train.get("nodes_per_s")
    goal(
        f"training >= {GOALS['train_nodes_per_s']:.0f} nodes/s at batch 32",
        "-"
        if train is None
        else f"{rate} nodes/s ({train['model']}, batch {train['batch']}, {train['precision']})",
        None if rate is None else rate >= GOALS["train_nodes_per_s"],
    )
    return lines


def summary(out: Path) -> str:
    """OUT/summary.md: the backends table and the goals, from whatever steps finished."""
    bench = _load(out / "bench" / "bench.json")
    verified = _load(out / "verify" / "summary.json") or {}
    train = next((_load(p) for p in sorted((out / "train").glob("*.throughput.json"))), None)
    rows = summary_rows(bench, verified)
    machine = "unknown machine"
    if bench:
        env = bench["environment"]
        machine = ", ".join(g["name"] for g in env.get("gpus", [])) or env["cpu"]
        machine += (
            f"; torch {env['libraries'].get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}"
        )
        machine += f", driver {env.get('driver')}; {env['date']}"
    lines = [
        "# ci/gpu-check",
        "",
        f"{machine}. x FP32 is ms/node of `torch:cuda` (IEEE FP32) over the backend's at the same batch;"
        " % of floor at batch 256. Details: bench/bench.md, verify/*/verify.md, profile.md; each convolution"
        " against its own floor: bench/layers.md.",
        "",
        "| backend | precision | tier | p50 single ms | ms/node @32 | ms/node @256 | % of floor @256 "
        "| x FP32 @1 | x FP32 @32 | x FP32 @256 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        v = r.get("verify")
        tier = "not verified" if v is None else f"{v.get('tier') or '?'} {'pass' if v['passed'] else 'FAIL'}"
        if r.get("error"):
            lines.append(f"| {r['backend']} | {r.get('precision') or '-'} | {tier} | {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['backend']} | {r['precision']} | {tier} | {_fmt(r['single_p50_ms'], '.3f')} "
            f"| {_fmt(r['ms_per_node'].get(32), '.3f')} | {_fmt(r['ms_per_node'].get(256), '.3f')} "
            f"| {_fmt(r['pct_of_floor'].get(256), '.1f')} "
            + " ".join(f"| {_fmt(r['vs_fp32'].get(n), '.2f')}" for n in BATCHES)
            + " |"
        )
    lines += ["", "## Goals (issue 11)", "", *_goals(rows, train), ""]
    best = _best_at_256(rows)
    lines += _slowest_layers(bench, best[1]) if best else []
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "backends" and not args:
        print("\n".join(backends()))
        return 0
    if command == "verify" and len(args) >= 4:
        return verify_all(Path(args[0]), args[1], int(args[2]), args[3:])
    if command == "profile" and len(args) == 3:
        return profile(Path(args[0]), args[1], int(args[2]))
    if command == "summary" and len(args) == 1:
        print(summary(Path(args[0])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
