import pytest
import torch

from m2anet.cli import export as cli
from m2anet.data import load_split


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def test_split():
    """The full synthetic test split (577 nodes), generated once per session."""
    return load_split("test")


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    """One `m2a-export --precision all` of the small model, shared by the export and verify tests."""
    out = tmp_path_factory.mktemp("artifacts")
    args = ["--model", "m2anet_small", "--precision", "all", "--out", str(out), "--quiet"]
    assert cli.main([*args, "--parity-nodes", "24", "--calib-size", "32"]) == 0
    return out / "m2anet_small"
