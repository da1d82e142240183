"""mmkernels: fused kernels for vision-language models, as drop-in PyTorch ops.

Public API::

    mmkernels.contrastive_loss(image_features, text_features, logit_scale, ...)
    mmkernels.infonce_loss(queries, keys, logit_scale, targets=None, ...)
    mmkernels.ContrastiveLoss(local_loss, gather_with_grad, ..., ring=False)   # OpenCLIP ClipLoss, any world size
    mmkernels.siglip_loss(image_features, text_features, logit_scale, logit_bias=None, ...)
    mmkernels.SigLipLoss(rank=0, world_size=1, dist_impl=None)          # OpenCLIP SigLipLoss
    mmkernels.momentum_itc_loss(img, txt, img_m, txt_m, logit_scale, alpha=0.4, image_queue=...)  # ALBEF/BLIP
    mmkernels.blip2_itc_loss(image_feats, text_feat, logit_scale)       # BLIP-2 ITC, max over queries
    mmkernels.itm_hard_negatives(image_feats, text_feat, logit_scale)   # ITM negatives, no [B, B] weights
    mmkernels.multimodal_attention(q, k, v, mask=mmkernels.MultimodalMask.blip2(...), ...)
    mmkernels.MultimodalSelfAttention(hidden_size, num_heads, ...)
    mmkernels.cross_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, generator=None)
    mmkernels.fused_kv_projection(image_embeds, [(w_k, w_v), ...], [(b_k, b_v), ...], num_heads=H)
    mmkernels.share_kv_storage([(key_linear, value_linear), ...])   # the layers' K/V weights in one storage
    mmkernels.QFormer(config)            # the BLIP-2 Q-Former on these kernels; loads HF weights
    mmkernels.modality_linear(x, modality_ids, weight, bias=None)
    mmkernels.modality_ffn(x, modality_ids, w_in, b_in, w_out, b_out, activation="gelu")
    mmkernels.MultiwayLinear(in_features, out_features, num_experts=2, ...)
    mmkernels.MultiwayFFN(hidden_size, intermediate_size, num_experts=2, activation="gelu", ...)
    mmkernels.modality_layer_norm(x, modality_ids, weight, bias=None, eps=1e-5)
    mmkernels.modality_ffn_subln(x, modality_ids, w_in, b_in, norm_weight, norm_bias, w_out, b_out, ...)
    mmkernels.MultiwayLayerNorm(hidden_size, num_experts=2, eps=1e-5, ...)
    with mmkernels.backend("reference" | "cpu" | "triton" | "auto"): ...
    with mmkernels.explain() as log: ...     # which path each op ran under "auto", and why
    with mmkernels.use_path("sdpa"): ...     # force one path of the dispatch table
"""
from ._backend import backend
from ._dispatch import explain, use_path
from .attention import MultimodalMask, MultimodalSelfAttention, multimodal_attention
from .cross_attention import cross_attention, fused_kv_projection, share_kv_storage
from .contrastive import (ContrastiveLoss, ContrastiveStats, SigLipLoss, blip2_itc_loss,
                          contrastive_loss, distributed_contrastive_loss, distributed_siglip_loss,
                          infonce_loss, itc_rows_loss, itm_hard_negatives, momentum_itc_loss,
                          sample_hard_negatives, siglip_loss)
from .experts import (MultiwayFFN, MultiwayLayerNorm, MultiwayLinear, modality_ffn, modality_ffn_subln,
                      modality_layer_norm, modality_linear)
from .models import QFormer

__version__ = "0.1.0"

__all__ = ["backend", "explain", "use_path", "ContrastiveLoss", "ContrastiveStats", "contrastive_loss", "infonce_loss",
           "SigLipLoss", "siglip_loss", "distributed_contrastive_loss", "distributed_siglip_loss",
           "blip2_itc_loss", "itc_rows_loss", "itm_hard_negatives", "momentum_itc_loss",
           "sample_hard_negatives",
           "cross_attention", "fused_kv_projection", "share_kv_storage", "QFormer",
           "MultimodalMask", "MultimodalSelfAttention", "multimodal_attention",
           "MultiwayFFN", "MultiwayLayerNorm", "MultiwayLinear", "modality_ffn", "modality_ffn_subln",
           "modality_layer_norm",
           "modality_linear", "__version__"]
