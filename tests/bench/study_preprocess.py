"""Benchmark: `prepare_study` (checks, measurements and patches of a whole study, before any backend runs)
against an earlier revision's, in interleaved rounds, and where the two give different outputs.

On a GPU a forward of m2anet_base takes about 0.1 ms per node; whole-study prediction
(`NodeClassifier.classify`, `m2a-predict`) spent about 8 ms per node here before the twelfth session.
The earlier revision's `m2anet/preprocess.py` is read from git and loaded beside the installed one,
so both run in this process on the same images:

    python3 tests/bench/study_preprocess.py --against b6fe3f8 [--rounds 9] [--out FILE.md]

Studies (`m2anet.data.make_study`, 24 nodes): the demo's 48 x 256 x 256 grid of 3.0 x 0.8 x 0.8 mm; a
chest CT's 120 x 512 x 512 matrix; and the first resampled onto an oblique 2.0 x 0.75 x 0.75 mm grid
and a 1.25 x 0.7 x 0.7 mm one (there lattice points fall half way between slices, where the nearest
slice is decided by round-off). "differences" compares every patch voxel, mask voxel and node
measurement exactly. Then `read_image` of the CT and label map of the second and fourth, written as
.nii.gz, is timed the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m2anet import preprocess
from m2anet.bench.ab import Interleaved
from m2anet.data import make_study, resample_study

ROOT = Path(__file__).resolve().parents[2]


def module_at(revision: str):
    """`m2anet/preprocess.py` as it was at `revision`, loaded as its own module."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:m2anet/preprocess.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "preprocess_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("preprocess_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def differences(before, now) -> str:
    """What the two prepared studies do not share exactly, or "none"."""
    found = []
    for name in ("ct", "mask"):
        old, new = getattr(before, name), getattr(now, name)
        if old.shape != new.shape or not np.array_equal(old, new):
            found.append(f"{name}: {np.count_nonzero(old != new) if old.shape == new.shape else 'shape'}")
    for old, new in zip(before.nodes, now.nodes, strict=True):
        old, new = dataclasses.asdict(old), dataclasses.asdict(new)
        found += [f"node {old['label']} {k}: {old[k]} -> {new[k]}" for k in old if old[k] != new[k]]
    if (before.classified, before.patch_origins) != (now.classified, now.patch_origins):
        found.append("classified nodes or patch origins")
    return "; ".join(found) or "none"


def read_all(module, paths: list[Path]) -> list:
    return [module.read_image(path) for path in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args()
    before = module_at(args.against)
    demo = make_study(seed=3, n_nodes=24)[:2]
    studies = {
        "48 x 256 x 256, 3.0 x 0.8 x 0.8 mm": demo,
        "120 x 512 x 512, 3.0 x 0.8 x 0.8 mm": make_study(seed=3, n_nodes=24, shape=(120, 512, 512))[:2],
        "oblique, 2.0 x 0.75 x 0.75 mm": resample_study(*demo, (0.75, 0.75, 2.0), 12.0),
        "1.25 x 0.7 x 0.7 mm": resample_study(*demo, (0.7, 0.7, 1.25)),
    }
    rows = [
        f"| study (24 nodes) | ms before ({args.against}) | ms now | ms per node before | now | speedup "
        "| differences |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, (ct, labels) in studies.items():
        changed = differences(before.prepare_study(ct, labels), preprocess.prepare_study(ct, labels))
        ab = Interleaved(
            functools.partial(before.prepare_study, ct, labels),
            functools.partial(preprocess.prepare_study, ct, labels),
        )
        for _ in range(args.rounds):
            ab.round()
        old, new = (m * 1e3 for m in ab.medians())
        rows.append(
            f"| {name} | {old:.0f} | {new:.0f} | {old / 24:.2f} | {new / 24:.2f} | {old / new:.2f}x "
            f"| {changed} |"
        )
        print(rows[-1], flush=True)
    rows += ["", "| read_image, CT and label map | ms before | ms now | speedup | same images |"]
    rows.append("| --- | ---: | ---: | ---: | --- |")
    folder = Path(tempfile.mkdtemp())
    for name in ("120 x 512 x 512, 3.0 x 0.8 x 0.8 mm", "1.25 x 0.7 x 0.7 mm"):
        paths = [folder / f"{len(rows)}-{role}.nii.gz" for role in ("ct", "nodes")]
        for image, path in zip(studies[name], paths, strict=True):
            sitk.WriteImage(image, str(path), useCompression=True)
        same = all(
            np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))
            for a, b in zip(read_all(before, paths), read_all(preprocess, paths), strict=True)
        )
        ab = Interleaved(*(functools.partial(read_all, m, paths) for m in (before, preprocess)))
        for _ in range(args.rounds):
            ab.round()
        old, new = (m * 1e3 for m in ab.medians())
        rows.append(
            f"| {name}, .nii.gz | {old:.0f} | {new:.0f} | {old / new:.2f}x | {'yes' if same else '**no**'} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(
            f"`python3 tests/bench/study_preprocess.py --against {args.against} --rounds {args.rounds}`, "
            f"medians of {args.rounds} interleaved rounds:\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
