"""The classifier (DenseNet + optional CBAM + head) and its weights artifact."""

from cxrjax.models.classifier import ChestXrayClassifier, build_model, default_model_config
from cxrjax.models.heads import head_kernel_paths, l2_penalty

__all__ = [
    "ChestXrayClassifier",
    "build_model",
    "default_model_config",
    "head_kernel_paths",
    "l2_penalty",
]
