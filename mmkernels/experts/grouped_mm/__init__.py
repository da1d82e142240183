"""The grouped GEMM of the modality experts: ``modality_linear`` and ``modality_ffn`` (one weight
set per modality, tokens gathered and scattered inside the kernel)."""
from .api import modality_ffn, modality_linear
from .reference import modality_ffn_reference, modality_linear_reference

__all__ = ["modality_ffn", "modality_ffn_reference", "modality_linear", "modality_linear_reference"]
