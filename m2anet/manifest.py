"""`manifest.json`: what was built from what, so a runtime can refuse an artifact it cannot trust.

One manifest per artifact folder. Each artifact entry carries its sha256 and size, precision,
I/O signature, the file it was derived from (with that file's hash), tool versions, its parity
result and, for a TensorRT engine, the GPU and TensorRT version it was built for. Builders write
it; runtimes, the classifier, Triton and the benchmarks only read it, through the checks here.

The manifest is sealed: `seal.sha256` hashes its canonical form (every other key, sorted, no
whitespace), so an accidental or careless edit (a threshold, a precision, a hash) makes every
reader refuse the folder. Anyone can recompute that hash; against a deliberate attacker the seal
also carries an Ed25519 signature (`m2a-export --sign KEYFILE`), which every read checks when
the environment names the trusted public key (M2ANET_TRUSTED_KEY). An environment variable
rather than a flag on each tool: the manifest is read at a dozen places (every backend opening
an artifact, the classifier, Triton, bench, verify), and a site's policy set once in the service's
environment reaches all of them, with no code path that could forget to pass a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from m2anet.io import is_plain_name, sha256_file, write_json
from m2anet.weights import shipped_weights

if TYPE_CHECKING:  # signing is optional: an offline GPU image without cryptography still reads manifests
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST = "manifest.json"
SCHEMA = 1
SEAL = "seal"
TRUSTED_KEY_ENV = "M2ANET_TRUSTED_KEY"
"""Path of the Ed25519 public key (PEM) whose signature every manifest read must carry."""
PRECISIONS = ("fp32", "fp16", "int8")
"""Precisions an artifact folder holds, each decided in its ONNX graph."""

Format = Literal["onnx", "plan"]


class ArtifactError(ValueError):
    """An artifact is missing, corrupted or not described by its manifest."""


def artifact_name(precision: str, fmt: Format) -> str:
    """The one file-name pattern of an artifact folder: model.fp16.onnx, model.int8.plan, ..."""
    return f"model.{precision}.{fmt}"


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes the seal hashes and the signature signs: every key but the seal, sorted, compact."""
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def key_id(key: Ed25519PublicKey) -> str:
    """sha256 of the raw public key: names a key in messages and in the seal."""
    from cryptography.hazmat.primitives import serialization

    return hashlib.sha256(
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).hexdigest()


def signing_key(path: str | Path) -> Ed25519PrivateKey:
    """An unencrypted Ed25519 private key in PEM (`openssl genpkey -algorithm ed25519 -out KEY`)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise ArtifactError(f"signing key {path}: {e.strerror}: give an Ed25519 private key in PEM") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ArtifactError(
            f"{path} is not an unencrypted Ed25519 private key in PEM: make one with "
            "openssl genpkey -algorithm ed25519 -out KEY.pem"
        )
    return key


def trusted_key() -> Ed25519PublicKey | None:
    """The public key M2ANET_TRUSTED_KEY names, or None when it is unset (the seal's hash only)."""
    path = os.environ.get(TRUSTED_KEY_ENV)
    if not path:
        return None
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise ArtifactError(
            f"{TRUSTED_KEY_ENV}={path}: {e.strerror}: point it to an Ed25519 public key (PEM)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise ArtifactError(
            f"{TRUSTED_KEY_ENV}={path} is not an Ed25519 public key in PEM: make it with "
            "openssl pkey -in KEY.pem -pubout -out KEY.pub.pem"
        )
    return key


def _check_seal(path: Path, manifest: dict[str, Any]) -> None:
    seal = manifest.get(SEAL)
    if not isinstance(seal, dict) or not isinstance(seal.get("sha256"), str):
        raise ArtifactError(
            f"{path} has no seal (written before manifests were sealed, or by hand): re-run m2a-export"
        )
    data = canonical(manifest)
    if hashlib.sha256(data).hexdigest() != seal["sha256"]:
        raise ArtifactError(
            f"{path} was edited after it was written (its content does not match its seal): "
            "restore it or re-run m2a-export"
        )
    key = trusted_key()
    if key is None:
        return
    signature = seal.get("ed25519")
    if not isinstance(signature, dict):
        raise ArtifactError(
            f"{path} is not signed and {TRUSTED_KEY_ENV} asks for signed manifests: "
            "re-run m2a-export --sign KEYFILE with the matching private key"
        )
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(base64.b64decode(signature["value"], validate=True), data)
    except (InvalidSignature, KeyError, TypeError, binascii.Error):
        raise ArtifactError(
            f"{path} has no valid signature of the key {key_id(key)[:12]}... that {TRUSTED_KEY_ENV} names "
            "(forged, edited, or signed with another key): re-run m2a-export --sign with that key"
        ) from None


def _check_names(path: Path, manifest: dict[str, Any]) -> None:
    """Artifact names and sources are file names inside the folder: readers join them to it."""
    artifacts = manifest.get("artifacts", {})
    if not isinstance(artifacts, dict):
        raise ArtifactError(f"{path}: 'artifacts' is not a mapping: re-run m2a-export")
    for name, entry in artifacts.items():
        source = entry.get("source") if isinstance(entry, dict) else None
        for value in (name, *([] if source is None else [source])):
            if not is_plain_name(value):
                raise ArtifactError(
                    f"{path} lists {value!r}, which is not a file name inside its folder: re-run m2a-export"
                )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest, refused (ArtifactError, one line) unless its seal, signature where one
    is required, schema and artifact names hold."""
    folder = Path(folder)
    path = folder / MANIFEST
    if folder.is_file():
        raise ArtifactError(f"{folder} is a file: give the m2a-export folder that holds it ({folder.parent})")
    if not path.is_file():
        below = sorted(str(m.parent) for m in folder.glob(f"*/{MANIFEST}")) if folder.is_dir() else []
        fix = f"pass {' or '.join(below)}" if below else "run m2a-export for this folder first"
        raise ArtifactError(f"{path} not found: {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise ArtifactError(f"{path} is not valid JSON ({why}): re-run m2a-export") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a manifest (a JSON object): re-run m2a-export")
    _check_seal(path, manifest)
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(
            f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA}: re-run m2a-export"
        )
    _check_names(path, manifest)
    return manifest


def is_signed(manifest: dict[str, Any]) -> bool:
    return isinstance(manifest.get(SEAL), dict) and "ed25519" in manifest[SEAL]


def write_manifest(folder: str | Path, manifest: dict[str, Any], sign: str | Path | None = None) -> Path:
    """Seal `manifest` (and sign it with the Ed25519 private key file `sign`) and write it atomically.
    Every writer goes through here, so every manifest on disk is sealed."""
    body = {"schema": SCHEMA, **{k: v for k, v in manifest.items() if k not in ("schema", SEAL)}}
    body = json.loads(json.dumps(body))  # what a reader will parse: tuples -> lists
    data = canonical(body)
    seal: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
    if sign is not None:
        key = signing_key(sign)
        seal["ed25519"] = {
            "key_sha256": key_id(key.public_key()),
            "value": base64.b64encode(key.sign(data)).decode(),
        }
    path = Path(folder) / MANIFEST
    write_json(path, {**body, SEAL: seal})
    return path


def artifact_entry(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest entry of an artifact; with `verify`, its sha256 must match the file."""
    path = Path(path)
    if path.is_dir():
        models = ", ".join(sorted(f.name for f in path.iterdir() if f.suffix in (".onnx", ".plan"))) or "none"
        raise ArtifactError(f"artifact {path} is a folder: name one of its model files (here: {models})")
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
    if parity is None:
        raise ArtifactError(
            f"{name} is not verified: its export stopped before the parity check; re-run the same "
            "m2a-export to finish it, or pass allow_parity_fail=True (--allow-parity-fail)"
        )
    why = "; ".join(parity.get("failures", [])) if isinstance(parity, dict) else "malformed parity record"
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
