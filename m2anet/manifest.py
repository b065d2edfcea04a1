"""`manifest.json`: what was built from what, so a runtime can refuse an artifact it cannot trust.

One manifest per artifact folder. Each artifact entry carries its sha256 and size, precision,
I/O signature, the file it was derived from (with that file's hash), tool versions, its parity
result and, for a TensorRT engine, the GPU and TensorRT version it was built for. Builders write
it; runtimes, the classifier, Triton and the benchmarks only read it, through the checks here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from m2anet.io import sha256_file, write_json
from m2anet.weights import shipped_weights

MANIFEST = "manifest.json"
SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")
"""Precisions an artifact folder holds, each decided in its ONNX graph."""

Format = Literal["onnx", "plan"]


class ArtifactError(ValueError):
    """An artifact is missing, corrupted or not described by its manifest."""


def artifact_name(precision: str, fmt: Format) -> str:
    """The one file-name pattern of an artifact folder: model.fp16.onnx, model.int8.plan, ..."""
    return f"model.{precision}.{fmt}"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} not found: run m2a-export for this folder first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e.msg}): re-run m2a-export --force") from None
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA}: re-export")
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    write_json(path, {"schema": SCHEMA, **{k: v for k, v in manifest.items() if k != "schema"}})
    return path


def artifact_entry(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest entry of an artifact; with `verify`, its sha256 must match the file."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} not found: run m2a-export or check the path")
    entry = read_manifest(path.parent).get("artifacts", {}).get(path.name)
    if entry is None:
        raise ArtifactError(f"{path.name} is not listed in {path.parent / MANIFEST}: re-run m2a-export")
    if verify:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ArtifactError(
                f"{path} is corrupted or was replaced (sha256 {digest[:12]}..., manifest says "
                f"{entry['sha256'][:12]}...): re-run m2a-export --force"
            )
    return entry


def check_parity(name: str, entry: dict[str, Any], allow_parity_fail: bool) -> None:
    """Refuse an artifact whose export-time parity check failed or is missing."""
    parity = entry.get("parity")
    if allow_parity_fail or (isinstance(parity, dict) and parity.get("passed")):
        return
    why = "; ".join(parity.get("failures", [])) if isinstance(parity, dict) else "no parity check recorded"
    raise ArtifactError(
        f"{name} did not pass its {entry.get('precision')} parity check at export ({why}): re-export it, "
        "use another precision, or pass allow_parity_fail=True (--allow-parity-fail)"
    )


def verified_weights(model: dict[str, Any]) -> Path:
    """The weights the manifest's model entry names, or the shipped copy, whichever has the recorded
    hash: a folder copied from another machine names a path that does not exist there."""
    for candidate in (Path(model["weights"]), shipped_weights(model["name"])):
        if candidate.is_file() and sha256_file(candidate) == model["weights_sha256"]:
            return candidate
    raise ArtifactError(
        f"no weights with the manifest's sha256 {model['weights_sha256'][:12]}... ({model['weights']}): "
        "copy that file here or re-run m2a-export"
    )
