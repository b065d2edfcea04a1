"""`manifest.json`: what was built from what, so a runtime can refuse an artifact it cannot trust.

One manifest per artifact folder. Each artifact entry carries its sha256 and size, precision,
I/O signature, the file it was derived from (with that file's hash), tool versions and, for a
TensorRT engine, the GPU and TensorRT version it was built for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m2anet.io import sha256_file, write_json

MANIFEST = "manifest.json"
SCHEMA = 1


class ArtifactError(ValueError):
    """An artifact is missing, corrupted or not described by its manifest."""


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
