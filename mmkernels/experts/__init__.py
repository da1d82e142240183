"""Modality-expert routing (VLMo/BEiT-3 multiway, CogVLM visual expert) as a grouped GEMM."""
from .activations import ACTIVATIONS
from .api import modality_ffn, modality_linear
from .layer_norm import MultiwayLayerNorm, modality_layer_norm
from .modules import MultiwayFFN, MultiwayLinear
from .reference import modality_ffn_reference, modality_layer_norm_reference, modality_linear_reference
from .routing import MAX_EXPERTS, Routing, route, route_split
from .subln import modality_ffn_subln

__all__ = ["ACTIVATIONS", "MAX_EXPERTS", "MultiwayFFN", "MultiwayLayerNorm", "MultiwayLinear", "Routing",
           "modality_ffn", "modality_ffn_reference", "modality_ffn_subln", "modality_layer_norm",
           "modality_layer_norm_reference", "modality_linear", "modality_linear_reference", "route", "route_split"]
