import pytest
import torch

from m2anet.data import load_split


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def test_split():
    """The full synthetic test split (577 nodes), generated once per session."""
    return load_split("test")
