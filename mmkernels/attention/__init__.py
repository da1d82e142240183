"""Multimodal masked attention: masks built from O(S) token metadata (issue 3)."""
from .mask import BLOCKED, CAUSAL, FULL, SPAN, TILE_EMPTY, TILE_FULL, TILE_PARTIAL, MultimodalMask
from .reference import multimodal_attention_reference

__all__ = ["BLOCKED", "FULL", "CAUSAL", "SPAN", "TILE_EMPTY", "TILE_FULL", "TILE_PARTIAL", "MultimodalMask",
           "multimodal_attention_reference"]
