"""Few-query cross-attention (BLIP-2 Q-Former, CoCa pooler) and one K/V GEMM for all its layers."""
from .api import cross_attention
from .projection import fused_kv_projection, share_kv_storage
from .reference import cross_attention_reference, dropout_keep_mask, make_seed

__all__ = ["cross_attention", "cross_attention_reference", "dropout_keep_mask", "fused_kv_projection",
           "make_seed", "share_kv_storage"]
