"""The plain-PyTorch references of every experts op, in one place (what tests and benchmarks
compare against); each is defined in its unit's ``reference.py``."""
from .grouped_mm.reference import modality_ffn_reference, modality_linear_reference
from .layer_norm.reference import modality_layer_norm_reference

__all__ = ["modality_ffn_reference", "modality_layer_norm_reference", "modality_linear_reference"]
