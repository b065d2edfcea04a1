"""`m2a-bench --select` and `m2a-export --precision best`: the fastest way to run the model on this machine
among the clinically equivalent ones.

Every backend the report measured competes: the folder's artifacts, on their manifest's parity record,
and the PyTorch GPU paths, on an `m2a-verify` of their own passed against their precision's tier
(`parity`, run by m2anet.best: verification is an application above the benchmarks). A faster path that
changes diagnoses, was never verified, runs other weights or did not run is excluded, with the reason.
The choice, the whole ranking and the exclusions go into the manifest with the machine they were
measured on, since the ranking holds only there. PyTorch on the CPU is the FP32 reference the others are
verified against, not a candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m2anet.io import sha256_file
from m2anet.manifest import MANIFEST, ArtifactError, is_signed, read_manifest, write_manifest
from m2anet.weights import shipped_weights

CRITERIA = {
    "single": ("p90 latency ms", lambda s: s["latency_ms"]["p90"], False),  # MLPerf SingleStream's metric
    "study": ("mean study latency ms", lambda s: s["latency_ms"]["mean"], False),
    "offline": ("nodes/s", lambda s: s["nodes_per_s"], True),
}


def _failed(parity: dict[str, Any]) -> str:
    return "parity failed: " + "; ".join(parity.get("failures", []))


def exclusion(
    b: dict[str, Any], manifest: dict[str, Any], parity: dict[str, dict[str, Any]]
) -> tuple[str | None, dict[str, Any] | None]:
    """Why backend entry `b` of a report cannot be chosen for the folder of `manifest` (None if it can),
    and the parity record it competes on."""
    if b.get("error"):
        return b["error"], None
    if b.get("artifact"):
        record = manifest.get("artifacts", {}).get(Path(b["artifact"]).name, {}).get("parity")
        if not record:
            return "not verified (no parity result: re-run m2a-export)", None
        return (None if record.get("passed") else _failed(record)), record
    if b.get("device_kind") != "cuda":
        return "PyTorch on the CPU: the FP32 reference the candidates are verified against", None
    model = manifest["model"]
    ran, held = f"{b.get('model')}/{b.get('heads')}", f"{model['name']}/{model['heads']}"
    if ran != held:
        return f"runs {ran}, the folder holds {held}", None
    if sha256_file(shipped_weights(model["name"])) != model["weights_sha256"]:
        return f"runs the shipped {model['name']} weights, the folder was built from others", None
    record = parity.get(b["backend"])
    if record is None:
        return f"not verified: m2a-verify '{b['backend']}' must pass its tier first", None
    return (None if record.get("passed") else _failed(record)), record


def _candidates(
    report: dict[str, Any], folder: Path, scenario: str, parity: dict[str, dict[str, Any]]
) -> tuple[list[dict], list[dict]]:
    _, score, higher = CRITERIA[scenario]
    manifest = read_manifest(folder)
    ranked, excluded = [], []
    for b in report["backends"]:
        path = b.get("artifact")
        if path and Path(path).resolve().parent != folder.resolve():
            continue  # another folder's artifact
        name = Path(path).name if path else None
        reason, record = exclusion(b, manifest, parity)
        if reason is not None:
            excluded.append({"artifact": name, "backend": b["backend"], "reason": reason})
            continue
        steps = [s for s in b["steps"] if s["scenario"] == scenario]
        if steps:
            best = max(steps, key=score) if higher else min(steps, key=score)
            ranked.append(
                {
                    "artifact": name,
                    "backend": b["backend"],
                    "spec": b["spec"],
                    "options": b["options"],
                    "precision": b.get("precision"),
                    "tier": (record or {}).get("tier"),
                    "batch": best["batch"],
                    "value": score(best),
                    "ms_per_node": best["ms_per_node"],
                    "nodes_per_s": best["nodes_per_s"],
                    "latency_ms": best["latency_ms"],
                }
            )
    ranked.sort(key=lambda c: c["value"], reverse=higher)
    return ranked, excluded


def select(
    report: dict[str, Any],
    folder: Path,
    report_path: Path | None = None,
    parity: dict[str, dict[str, Any]] | None = None,
    sign: Path | None = None,
) -> dict[str, Any]:
    """Record the choice for every scenario the report measured; returns the selection written.
    `parity`: the verification of each PyTorch GPU path, by its report label. A signed manifest is
    re-signed with `sign`, and refused without it rather than left unsigned."""
    env = report["environment"]
    scenarios = dict.fromkeys(s["scenario"] for b in report["backends"] for s in b["steps"])
    selection = {}
    for scenario in scenarios:
        ranked, excluded = _candidates(report, folder, scenario, parity or {})
        if not ranked:
            continue
        metric, _, higher = CRITERIA[scenario]
        selection[scenario] = {
            **ranked[0],
            "metric": metric,
            "higher_is_better": higher,
            "why": f"{'highest' if higher else 'lowest'} {metric} of the {len(ranked)} backends that "
            f"passed their parity tier here ({len(excluded)} excluded, with reasons)",
            "runners_up": ranked[1:],
            "excluded": excluded,
            "machine": {"cpu": env["cpu"], "gpus": [g["name"] for g in env.get("gpus", [])]},
            "threads": env["threads"],
            "measured": env["date"],
            "report": None if report_path is None else str(report_path),
        }
    if selection:
        manifest = read_manifest(folder)
        if is_signed(manifest) and sign is None:
            raise ArtifactError(
                f"{folder / MANIFEST} is signed and recording the selection would drop the signature: "
                "pass --sign KEYFILE"
            )
        selection_all = {**manifest.get("selection", {}), **selection}
        write_manifest(folder, {**manifest, "selection": selection_all}, sign=sign)
    return selection
