"""mmkernels: fused kernels for vision-language models, as drop-in PyTorch ops.

Public API::

    mmkernels.contrastive_loss(image_features, text_features, logit_scale, ...)
    mmkernels.infonce_loss(queries, keys, logit_scale, targets=None, ...)
    mmkernels.ContrastiveLoss(...)
    mmkernels.multimodal_attention(q, k, v, mask=mmkernels.MultimodalMask.blip2(...), ...)
    mmkernels.MultimodalSelfAttention(hidden_size, num_heads, ...)
    with mmkernels.backend("reference" | "cpu" | "triton" | "auto"): ...
"""
from ._backend import backend
from .attention import MultimodalMask, MultimodalSelfAttention, multimodal_attention
from .contrastive import ContrastiveLoss, ContrastiveStats, contrastive_loss, infonce_loss

__version__ = "0.1.0"

__all__ = ["backend", "ContrastiveLoss", "ContrastiveStats", "contrastive_loss", "infonce_loss",
           "MultimodalMask", "MultimodalSelfAttention", "multimodal_attention", "__version__"]
