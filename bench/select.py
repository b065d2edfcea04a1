"""`m2a-bench --select`: the fastest artifact on this machine among the clinically equivalent ones.

Only artifacts whose manifest records a passed parity tier compete: a faster graph that changes
diagnoses is not a candidate. The choice, its numbers and the runners-up go into the manifest,
with the machine they were measured on, since the ranking holds only there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from m2anet.manifest import MANIFEST, ArtifactError, is_signed, read_manifest, write_manifest

CRITERIA = {
    "single": ("p90 latency ms", lambda s: s["latency_ms"]["p90"], False),  # MLPerf SingleStream's metric
    "study": ("mean study latency ms", lambda s: s["latency_ms"]["mean"], False),
    "offline": ("nodes/s", lambda s: s["nodes_per_s"], True),
}


def _candidates(report: dict[str, Any], folder: Path, scenario: str) -> tuple[list[dict], list[dict]]:
    _, score, higher = CRITERIA[scenario]
    entries = read_manifest(folder).get("artifacts", {})
    ranked, excluded = [], []
    for b in report["backends"]:
        path = b.get("artifact")
        if not path or Path(path).resolve().parent != folder.resolve():
            continue
        name = Path(path).name
        parity = entries.get(name, {}).get("parity")
        if b.get("error"):
            excluded.append({"artifact": name, "backend": b["backend"], "reason": b["error"]})
        elif not parity or not parity.get("passed"):
            reason = (
                "not verified (no parity result: re-run m2a-export)"
                if not parity
                else "parity failed: " + "; ".join(parity.get("failures", []))
            )
            excluded.append({"artifact": name, "backend": b["backend"], "reason": reason})
        else:
            steps = [s for s in b["steps"] if s["scenario"] == scenario]
            if steps:
                best = max(steps, key=score) if higher else min(steps, key=score)
                ranked.append(
                    {
                        "artifact": name,
                        "backend": b["backend"],
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
    report: dict[str, Any], folder: Path, report_path: Path | None = None, sign: Path | None = None
) -> dict[str, Any]:
    """Record the choice for every scenario the report measured; returns the selection written.
    A signed manifest is re-signed with `sign`, and refused without it rather than left unsigned."""
    env = report["environment"]
    scenarios = dict.fromkeys(s["scenario"] for b in report["backends"] for s in b["steps"])
    selection = {}
    for scenario in scenarios:
        ranked, excluded = _candidates(report, folder, scenario)
        if not ranked:
            continue
        metric, _, higher = CRITERIA[scenario]
        selection[scenario] = {
            **ranked[0],
            "metric": metric,
            "higher_is_better": higher,
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
