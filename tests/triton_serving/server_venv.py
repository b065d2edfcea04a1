"""Build (once) or reuse the virtual environment that runs a real Triton Inference Server here.

`nvidia-pytriton` bundles a real `tritonserver` and its Python backend stub; the stub is built
against Debian's Python 3.11 and fails at model load under another build of 3.11 (its standard
library differs), and pytriton pins numpy < 2. So the server gets its own venv, made from
`/usr/bin/python3.11`, outside the project's environment. It lives in the user cache under a name
that hashes the pins and the interpreter, so a changed pin builds a new one and an unchanged one is
reused; a marker written last says the build finished, and a lock keeps two test runs from building
it at once.

    python tests/triton/server_venv.py      # prints the venv's python; exit 2 with a reason if it cannot
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

BASE_PYTHON = Path("/usr/bin/python3.11")
PINS = ("nvidia-pytriton==0.7.0", "numpy==1.26.4", "onnxruntime==1.32.0")
"""pytriton 0.7.0 needs numpy < 2; onnxruntime 1.32 accepts numpy >= 1.21.6 and so runs beside it."""
READY = "m2anet-ready"


class VenvError(RuntimeError):
    """The server venv cannot be built here; the message says why in one line."""


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "m2anet"


def venv_path() -> Path:
    key = hashlib.sha256("\n".join([str(BASE_PYTHON), *PINS]).encode()).hexdigest()[:12]
    return cache_root() / f"triton-venv-{key}"


def ensure_venv(timeout_s: float = 900) -> Path:
    """The venv's python, building the venv first when no finished one is cached."""
    venv = venv_path()
    python = venv / "bin" / "python"
    if (venv / READY).is_file():
        return python
    if not BASE_PYTHON.is_file():
        raise VenvError(f"{BASE_PYTHON} is missing: the bundled tritonserver needs Debian's Python 3.11")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here, then finds the marker
        if (venv / READY).is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # an interrupted build leaves no marker
        steps = (
            [str(BASE_PYTHON), "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS],
        )
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise VenvError(f"building the Triton venv timed out after {timeout_s:.0f} s") from None
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
                raise VenvError(f"building the Triton venv failed ({' '.join(step[:4])} ...): {lines[-1]}")
        (venv / READY).write_text("\n".join(PINS) + "\n")
    return python


def main() -> int:
    try:
        print(ensure_venv())
    except VenvError as e:
        print(f"server_venv: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
