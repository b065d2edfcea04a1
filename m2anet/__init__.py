"""M2ANet reference model (a reconstruction), synthetic CT lymph-node cohort and trained weights."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2anet.classifier import NodeClassifier
    from m2anet.model import M2ANet, M2ANetConfig, create_model, list_models, model_stats

__all__ = ["M2ANet", "M2ANetConfig", "NodeClassifier", "create_model", "list_models", "model_stats"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """Loaded on first use: the model imports torch and `NodeClassifier` SimpleITK and the engines, and
    neither is needed by everything under `m2anet` (m2a-predict on ONNX Runtime needs no torch)."""
    if name == "NodeClassifier":
        from m2anet.classifier import NodeClassifier

        return NodeClassifier
    if name in __all__:
        from m2anet import model

        return getattr(model, name)
    raise AttributeError(f"module 'm2anet' has no attribute {name!r}")
