"""mmkernels: fused kernels for vision-language models, as drop-in PyTorch ops.

Public API::

    mmkernels.contrastive_loss(image_features, text_features, logit_scale, ...)
    mmkernels.infonce_loss(queries, keys, logit_scale, targets=None, ...)
    mmkernels.ContrastiveLoss(...)
    with mmkernels.backend("reference" | "cpu" | "triton" | "auto"): ...
"""
from ._backend import backend
from .contrastive import ContrastiveLoss, ContrastiveStats, contrastive_loss, infonce_loss

__version__ = "0.1.0"

__all__ = ["backend", "ContrastiveLoss", "ContrastiveStats", "contrastive_loss", "infonce_loss",
           "__version__"]
