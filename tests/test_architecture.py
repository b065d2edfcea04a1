"""The layers contract (pyproject.toml, docs/architecture.md) holds, and it would catch an upward
import, at module top or inside a function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A --target install: lint-imports cannot see package-dir packages through the editable one."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            site,
            ROOT,
        ],
        check=True,
        capture_output=True,
    )
    return site


def lint(site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT, "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=site,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e '.[dev]')")
@pytest.mark.parametrize(
    ("module", "planted", "broken"),
    [
        ("engines/base.py", "from m2anet.bench import stats\n", "m2anet.engines.base -> m2anet.bench.stats"),
        (
            "engines/spec.py",
            "def _planted():\n    from m2anet.export import exporter\n",
            "m2anet.engines.spec -> m2anet.export.exporter",
        ),
        ("model.py", "from m2anet import verify\n", "m2anet.model -> m2anet.verify"),
    ],
)
def test_layers_hold_and_an_upward_import_breaks_them(site, tmp_path, module, planted, broken):
    assert lint(site).returncode == 0, lint(site).stdout[-2000:]
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    target = copy / "m2anet" / module
    target.write_text(target.read_text() + "\n" + planted)
    result = lint(copy)
    assert result.returncode != 0 and "BROKEN" in result.stdout
    assert broken in result.stdout
