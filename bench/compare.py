"""`m2a-bench --compare OLD.json NEW.json`: the change of every metric, and a gate on regressions.

Only steps present in both reports (same backend label, scenario and batch) are compared. The
p99 of a short run is mostly noise, so it is shown but does not gate.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from m2anet.bench.report import SCHEMA

METRICS = (
    # (name, path in the step, higher is better, gates)
    ("ms/node", ("ms_per_node",), False, True),
    ("nodes/s", ("nodes_per_s",), True, True),
    ("p50 ms", ("latency_ms", "p50"), False, True),
    ("p90 ms", ("latency_ms", "p90"), False, True),
    ("p99 ms", ("latency_ms", "p99"), False, False),
)


class ReportError(ValueError):
    """A file that is not an m2a-bench report."""


def load(path: str | Path) -> dict[str, Any]:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"cannot read {path}: {e}") from None
    if not isinstance(report, dict) or report.get("tool") != "m2a-bench" or report.get("schema") != SCHEMA:
        raise ReportError(f"{path} is not an m2a-bench report of schema {SCHEMA}")
    _steps(report, path)  # every step compared has every metric, as a positive number
    return report


def _steps(report: dict[str, Any], path: str | Path = "report") -> dict[tuple[str, str, int], dict[str, Any]]:
    """The measured steps by (backend, scenario, batch); ReportError on a report that lacks a field or
    holds a metric that is not a positive number (a hand-edited or truncated file)."""
    steps = {}
    try:
        for b in report["backends"]:
            if b.get("error"):
                continue
            for s in b["steps"]:
                key = (str(b["backend"]), str(s["scenario"]), int(s["batch"]))
                for name, where, _, _ in METRICS:
                    value = s
                    for part in where:
                        value = value[part]
                    if (
                        isinstance(value, bool)
                        or not isinstance(value, int | float)
                        or not 0 < value < math.inf
                    ):
                        raise ReportError(
                            f"{path}: {name} of {key[0]} {key[1]} batch {key[2]} is {value!r}, not a "
                            "positive number: re-run m2a-bench"
                        )
                steps[key] = s
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, ReportError):
            raise
        what = f"no field {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise ReportError(f"{path} is not a complete m2a-bench report ({what}): re-run m2a-bench") from None
    return steps


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> list[dict[str, Any]]:
    """One row per step and metric; `worse` is the relative loss (0.1 = 10% worse)."""
    rows = []
    before, after = _steps(old), _steps(new)
    for key in (k for k in before if k in after):
        for name, path, higher, gates in METRICS:
            a: Any = before[key]  # walked down `path` to the metric's number
            b: Any = after[key]
            for part in path:
                a, b = a[part], b[part]
            worse = (a - b) / a if higher else (b - a) / a
            rows.append(
                {
                    "backend": key[0],
                    "scenario": key[1],
                    "batch": key[2],
                    "metric": name,
                    "old": a,
                    "new": b,
                    "change": (b - a) / a,
                    "worse": worse,
                    "regression": gates and worse > threshold,
                }
            )
    return rows


def render(rows: list[dict[str, Any]], old: dict[str, Any], new: dict[str, Any], threshold: float) -> str:
    lines = [
        f"{'backend':<44} {'scenario':<8} {'batch':>5} {'metric':<8} {'old':>10} {'new':>10} {'change':>8}"
    ]
    for r in rows:
        flag = "  REGRESSION" if r["regression"] else ""
        lines.append(
            f"{r['backend']:<44} {r['scenario']:<8} {r['batch']:>5} {r['metric']:<8} "
            f"{r['old']:>10.3f} {r['new']:>10.3f} {r['change']:>+8.1%}{flag}"
        )
    only_old = sorted(set(_steps(old)) - set(_steps(new)))
    only_new = sorted(set(_steps(new)) - set(_steps(old)))
    lines += [f"only in the old report: {k[0]} {k[1]} batch {k[2]}" for k in only_old]
    lines += [f"only in the new report: {k[0]} {k[1]} batch {k[2]}" for k in only_new]
    bad = sum(r["regression"] for r in rows)
    lines.append(
        f"{bad} regression(s) worse than {threshold:.0%}"
        if bad
        else f"no regression worse than {threshold:.0%}"
    )
    return "\n".join(lines)


def main(old_path: str, new_path: str, threshold: float) -> int:
    """0: nothing regressed past the threshold; 1: something did; 2: a file is not a report."""
    try:
        old, new = load(old_path), load(new_path)
    except ReportError as e:
        print(f"m2a-bench: error: {e}", file=sys.stderr)
        return 2
    rows = compare(old, new, threshold)
    print(render(rows, old, new, threshold))
    return 1 if any(r["regression"] for r in rows) else 0
