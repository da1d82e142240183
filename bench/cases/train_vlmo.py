"""Sizes of the ``train_vlmo`` case of the ``models`` family (bench/cases/models.py): one training
step of the VLMo / BEiT-3 multiway transformer (mmkernels/models/vlmo.py), ITC + ITM.

A step encodes ``3 * batch`` rows of ``image tokens + text_len`` tokens (per pair: the unimodal
row under a block-diagonal mask, the matched and the mismatched fused rows).

GPU: VLMo-Base (ViT-B/16 at 224 pixels: 197 image tokens, 40 text tokens, width 768, 12 heads,
12 blocks of which the top 2 hold the VL expert). Memory of the plain form in bf16, per row and
block: about ``34 * S * W`` bytes of saved activations plus ``3 * H * S**2`` bytes for the
probabilities and the dense mask, with ``S = 237``: about 8 MB, so about 100 MB per row for 12
blocks; batch 128 (384 rows) holds about 38 GB, batch 64 about 19 GB, within one H100's 80 GB
with room for the transient gradients. The mmkernels form holds less (no ``S x S`` tensor, the
FFN keeps only its pre-activation).

CPU: a few blocks at small widths but VLMo's proportions (65 image and 24 text tokens, head
dim 64: the sequence longer than the head dim, as at 237 against 64), a step well under 2 s per
form on 2 cores.
"""

_BASE = dict(image_size=224, patch_size=16, channels=3, vocab_size=30522, text_len=40, width=768, heads=12,
             layers=12, vl_layers=2, mlp_ratio=4.0, embed_dim=768)
_CPU_QUICK = dict(image_size=128, patch_size=16, channels=3, vocab_size=1000, text_len=24, width=192, heads=3,
                  layers=4, vl_layers=1, mlp_ratio=4.0, embed_dim=128)
_CPU_FULL = dict(_CPU_QUICK, width=256, heads=4, embed_dim=256)
_TINY = dict(image_size=8, patch_size=4, channels=3, vocab_size=32, text_len=6, width=32, heads=2, layers=2,
             vl_layers=1, mlp_ratio=2.0, embed_dim=16)

SIZES = {
    "cuda": {"full": [dict(batch=64, **_BASE), dict(batch=128, **_BASE)],
             "quick": [dict(batch=64, **_BASE)]},
    "cpu": {"full": [dict(batch=8, **_CPU_QUICK), dict(batch=16, **_CPU_FULL)],
            "quick": [dict(batch=8, **_CPU_QUICK)]},
    "pytest": [dict(batch=4, **_TINY)],
}

NOTE = ("VLMo/BEiT-3 multiway transformer, ITC + ITM: 3 rows per pair (unimodal under a block-diagonal "
        "mask, matched, mismatched); split-position routing below the VL blocks, modality ids in them")
