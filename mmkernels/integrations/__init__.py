"""Drop-in patching of third-party models with mmkernels' ops.

``patch_blip2(model) -> unpatch``: HF transformers' BLIP-2 / InstructBLIP Q-Former attention on
:func:`mmkernels.cross_attention`, with one fused K/V GEMM for all cross-attention layers.
transformers is imported only when a patch function runs.
"""
from .transformers import is_patched, key_padding_from_hf_mask, patch_blip2, unpatch_blip2

__all__ = ["is_patched", "key_padding_from_hf_mask", "patch_blip2", "unpatch_blip2"]
