"""``nn.Module`` front ends of the experts family, the per-expert parameter layout they share,
and the sub-LN FFN (two routed GEMMs around a routed LayerNorm) ``MultiwayFFN(subln=True)`` runs."""
from .modules import MultiwayFFN, MultiwayLayerNorm, MultiwayLinear
from .subln import modality_ffn_subln

__all__ = ["MultiwayFFN", "MultiwayLayerNorm", "MultiwayLinear", "modality_ffn_subln"]
