"""Benchmark: peak RSS of `m2a-predict` on a 1,000-node study against a 10-node study of the same grid.

Memory must not grow with the number of nodes: `NodeClassifier` crops, infers and pastes one batch
at a time, so both studies should peak at the same few hundred MB (the volumes, the runtime and one
batch). Before, every node went to the backend in one batch (~26 MB per node) and 1,500 nodes were
OOM-killed at 18.9 GB. Fails (exit 1) when the ratio exceeds --max-ratio (1.5, the goal of issue 13).

The studies come from `m2anet.data.write_study` on one grid: 200 x 256 x 256 voxels of 3.0 x 0.8 x
0.8 mm (600 x 205 x 205 mm, the length of a chest-abdomen CT at 3 mm, a mediastinal field of view),
so the two runs differ only in their nodes. A real study has tens of contoured nodes; 1,000 (placed
without overlap in the mediastinum-like slab, which holds ~1,100 over this length) is the stress case
scanner software must survive. Each m2a-predict runs in its own process with --save-masks, on the
CPU backend the export gives (ONNX Runtime FP32 of m2anet_small), and its peak RSS comes from
wait4(2). Not part of ci/test: it takes a few minutes and measures memory.

    python tests/bench/predict_memory.py --out predict-memory.json [--artifacts FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from m2anet.data import write_study

SHAPE = (200, 256, 256)
PYTHON = (sys.executable, "-m")
"""The commands run in this interpreter's environment, not whichever m2a-* comes first on PATH."""


def export_small(folder: Path) -> Path:
    """An FP32 export of m2anet_small, the model the CI benchmarks run."""
    command = [
        *PYTHON,
        "m2anet.cli.export",
        "--model",
        "m2anet_small",
        "--precision",
        "fp32",
        "--out",
        str(folder),
    ]
    subprocess.run([*command, "--parity-nodes", "24", "--quiet"], check=True)
    return folder / "m2anet_small"


def peak_rss(command: list[str]) -> tuple[int, float, float]:
    """(exit status, peak RSS in MiB, wall seconds) of one process, from its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - t0  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--out", type=Path, default=Path("predict-memory.json"), help="JSON result")
    ap.add_argument(
        "--artifacts", type=Path, help="an m2a-export model folder (default: export m2anet_small)"
    )
    ap.add_argument("--nodes", type=int, nargs=2, default=(10, 1000), metavar=("FEW", "MANY"))
    ap.add_argument("--max-ratio", type=float, default=1.5)
    ap.add_argument(
        "--work",
        type=Path,
        help="keep the studies and outputs here, and reuse its studies (default: a temp folder)",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="m2a-predict-memory-") as tmp:
        work = args.work or Path(tmp)
        artifacts = args.artifacts or export_small(work / "artifacts")
        runs = []
        for n in args.nodes:
            t0 = time.perf_counter()
            folder = work / f"study-{n}"
            study = {"ct": folder / "ct.nii.gz", "nodes": folder / "nodes.nii.gz"}
            if not (folder / "truth.json").is_file():  # a --work folder keeps them for the next run
                study = write_study(folder, seed=13, n_nodes=n, shape=SHAPE)
            made_s = time.perf_counter() - t0
            out = work / f"out-{n}"
            command = [*PYTHON, "m2anet.cli.predict", str(study["ct"]), str(study["nodes"])]
            command += ["--artifacts", str(artifacts)]
            command += ["--precision", "fp32", "--save-masks", "--quiet", "--out", str(out)]
            code, rss, wall = peak_rss(command)
            if code != 0:
                print(f"predict-memory: m2a-predict on {n} nodes exited {code}", file=sys.stderr)
                return 2
            rows = json.loads((out / "nodes.json").read_text())["nodes"]
            runs.append(
                {
                    "nodes": n,
                    "classified": sum(r["status"] == "classified" for r in rows),
                    "peak_rss_mib": round(rss, 1),
                    "predict_wall_s": round(wall, 1),
                    "study_generation_s": round(made_s, 1),
                }
            )
            print(f"{n:>5} nodes: peak RSS {rss:,.0f} MiB, {wall:.0f} s", file=sys.stderr)
    ratio = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    result = {
        "benchmark": "m2a-predict peak RSS, many nodes vs few",
        "grid_zyx": list(SHAPE),
        "spacing_zyx_mm": [3.0, 0.8, 0.8],
        "artifacts": str(artifacts),
        "runs": runs,
        "ratio": round(ratio, 3),
        "max_ratio": args.max_ratio,
        "passed": ratio <= args.max_ratio,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ratio {ratio:.2f} (max {args.max_ratio}); written {args.out}", file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
