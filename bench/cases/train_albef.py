"""Sizes of the ``train_albef`` case (``bench/cases/models.py``): one ALBEF pre-training step
without MLM (mmkernels/models/albef.py): ViT, text encoder, fusion encoder, momentum encoders,
ITC with momentum distillation against queues of 65536, ITM on 3 pairs per sample.

GPU: ALBEF-base (Config's defaults: ViT-B/16 at 256 pixels, 257 image tokens; 6 text and 6 fusion
layers 768 wide, 12 heads; 32 text tokens; embed 256; queue 65536). Memory in bf16, from the
bytes autograd saves per sample (counted on the CPU at these widths with fewer layers, then
extrapolated per layer): about 130 MB per sample in the plain form (a ViT layer about 7.5 MB, a
fusion layer about 5.7 MB: the K/V of the 3 images its pairs see, the scores), about 110 MB in
the mmkernels form; batch 256 holds about 34 GB (plain), plus the parameters and momentum copies
(about 1 GB), the ITC's ``[B, B + K]`` tensors (about 0.3 GB at 256) and the backward's
transients: it fits one H100's 80 GB.
CPU: the same structure at small widths, a step well under 2 s per form on 2 cores.
"""

_GPU = dict(image_size=256, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
            vocab_size=30522, text_len=32, text_width=768, text_layers=6, fusion_layers=6,
            text_heads=12, embed_dim=256, queue_size=65536)
_CPU_QUICK = dict(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=4,
                  vocab_size=1000, text_len=16, text_width=128, text_layers=2, fusion_layers=2,
                  text_heads=4, embed_dim=64, queue_size=16384)
_CPU_FULL = dict(image_size=64, patch_size=8, vision_width=192, vision_layers=2, vision_heads=4,
                 vocab_size=1000, text_len=24, text_width=192, text_layers=2, fusion_layers=2,
                 text_heads=4, embed_dim=128, queue_size=32768)
_TINY = dict(image_size=8, patch_size=4, vision_width=32, vision_layers=1, vision_heads=2,
             vocab_size=24, text_len=6, text_width=32, text_layers=1, fusion_layers=2,
             text_heads=2, mlp_ratio=2.0, embed_dim=16, queue_size=16, momentum=0.5)

SIZES = {
    "cuda": {"full": [dict(batch=64, **_GPU), dict(batch=128, **_GPU), dict(batch=256, **_GPU)],
             "quick": [dict(batch=128, **_GPU)]},
    "cpu": {"full": [dict(batch=32, **_CPU_QUICK), dict(batch=32, **_CPU_FULL)],
            "quick": [dict(batch=32, **_CPU_QUICK)]},
    "pytest": [dict(batch=4, **_TINY)],
}

NOTE = ("ALBEF without MLM: ViT + text encoder + fusion encoder, momentum encoders, ITC with "
        "momentum distillation and queues, ITM on hard negatives; mmkernels: multimodal_attention "
        "(key padding), momentum_itc_loss (queues read in place), itm_hard_negatives, "
        "cross_attention on one fused K/V GEMM gathered for the negative pairs")
