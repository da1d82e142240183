"""Drop-in patching of third-party models with mmkernels' ops.

``patch_blip2(model) -> unpatch``: HF transformers' BLIP-2 / InstructBLIP Q-Former attention on
:func:`mmkernels.cross_attention`, with one fused K/V GEMM for all cross-attention layers.
transformers is imported only when a patch function runs.

``patch_multiway(model) -> int``: torchscale's ``MultiwayNetwork`` s (BEiT-3, VLMo in torchscale)
around ``nn.Linear`` s, LayerNorms and FFNs on :class:`mmkernels.MultiwayLinear` /
:class:`mmkernels.MultiwayLayerNorm` / :class:`mmkernels.MultiwayFFN`, through
:class:`MultiwayAdapter` s whose state dicts keep torchscale's keys. Found by duck typing:
torchscale is never imported.

``apply_mmkernels(model) -> ApplyReport``: all of the above that applies to a loaded model, plus
HF decoders' attention on ``attn_implementation="mmkernels"``, in one call; ``report.undo()`` or
``unapply_mmkernels(model)`` restores it (:mod:`.hf_apply`).

``mmkernels_loss_for(loss_or_args)``, ``patch_create_loss()``: open_clip's ``ClipLoss`` /
``SigLipLoss`` (or the loss its ``create_loss(args)`` builds) on mmkernels' losses (:mod:`.open_clip`).
"""
from .torchscale import MultiwayAdapter, patch_multiway
from .transformers import is_patched, key_padding_from_hf_mask, patch_blip2, unpatch_blip2
from .hf_apply import ApplyReport, apply_mmkernels, unapply_mmkernels
from .open_clip import mmkernels_loss_for, patch_create_loss

__all__ = ["MultiwayAdapter", "is_patched", "key_padding_from_hf_mask", "patch_blip2", "patch_multiway",
           "unpatch_blip2", "ApplyReport", "apply_mmkernels", "unapply_mmkernels", "mmkernels_loss_for",
           "patch_create_loss"]
