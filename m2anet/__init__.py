"""M2ANet reference model (a reconstruction), synthetic CT lymph-node cohort and trained weights."""

from typing import TYPE_CHECKING

from m2anet.model import M2ANet, M2ANetConfig, create_model, list_models, model_stats

if TYPE_CHECKING:
    from m2anet.classifier import NodeClassifier

__all__ = ["M2ANet", "M2ANetConfig", "NodeClassifier", "create_model", "list_models", "model_stats"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`NodeClassifier` loads SimpleITK and the engines: only for callers that use it."""
    if name == "NodeClassifier":
        from m2anet.classifier import NodeClassifier

        return NodeClassifier
    raise AttributeError(f"module 'm2anet' has no attribute {name!r}")
