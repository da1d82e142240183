"""Modality-expert routing (VLMo/BEiT-3 multiway, CogVLM visual expert): ``routing`` (shared by
the units), ``grouped_mm`` (modality_linear, modality_ffn), ``layer_norm`` (modality_layer_norm)
and the ``nn`` modules built on them."""
from .activations import ACTIVATIONS
from .grouped_mm import modality_ffn, modality_ffn_reference, modality_linear, modality_linear_reference
from .layer_norm import modality_layer_norm, modality_layer_norm_reference
from .nn import MultiwayFFN, MultiwayLayerNorm, MultiwayLinear, modality_ffn_subln
from .routing import MAX_EXPERTS, Routing, route, route_split

__all__ = ["ACTIVATIONS", "MAX_EXPERTS", "MultiwayFFN", "MultiwayLayerNorm", "MultiwayLinear", "Routing",
           "modality_ffn", "modality_ffn_reference", "modality_ffn_subln", "modality_layer_norm",
           "modality_layer_norm_reference", "modality_linear", "modality_linear_reference", "route", "route_split"]
