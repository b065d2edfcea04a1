"""M2ANet reference model (a reconstruction), synthetic CT lymph-node cohort and trained weights."""

from m2anet.model import M2ANet, M2ANetConfig, create_model, list_models, model_stats

__all__ = ["M2ANet", "M2ANetConfig", "create_model", "list_models", "model_stats"]
__version__ = "0.1.0"
