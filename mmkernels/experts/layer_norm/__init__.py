"""The per-modality LayerNorm: ``modality_layer_norm`` (one scale and shift per modality)."""
from .api import modality_layer_norm
from .reference import modality_layer_norm_reference

__all__ = ["modality_layer_norm", "modality_layer_norm_reference"]
