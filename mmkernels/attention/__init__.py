"""Multimodal masked attention: masks from O(S) token metadata, tiles the mask hides are skipped."""
from .api import MultimodalSelfAttention, multimodal_attention
from .mask import BLOCKED, CAUSAL, FULL, SPAN, TILE_EMPTY, TILE_FULL, TILE_PARTIAL, MultimodalMask
from .reference import multimodal_attention_reference

__all__ = ["BLOCKED", "CAUSAL", "FULL", "SPAN", "TILE_EMPTY", "TILE_FULL", "TILE_PARTIAL",
           "MultimodalMask", "MultimodalSelfAttention", "multimodal_attention", "multimodal_attention_reference"]
