"""Sizes of the ``train_clip`` case (``bench/cases/models.py``): one CLIP / SigLIP training step.

GPU: CLIP's large-batch regime with small towers (32 x 32 images in 8 x 8 patches, 32 text tokens
where CLIP has 77, widths 256-384), where the loss's ``[N, N]`` logits are a visible share of the step.
Memory in bf16, from the tensors autograd saves per sample (counted on the CPU) times the batch,
plus the plain loss's ``N x N`` logits and the backward's transients: the 256-wide towers at
N = 16384 need about 31 GiB, the 384-wide six-layer image tower about 42 GiB; both fit one H100.
CPU: the same model shrunk; the quick cases keep CLIP's large-batch regime (N = 4096, a few seconds
per step on one core), the full ones add N = 1024, where the loss is a small part of the step.
"""
#: the towers of the GPU cases (Config's defaults are these: 17 image tokens, 32 text tokens)
_GPU_SMALL = dict(image_size=32, patch_size=8, vision_width=256, vision_layers=4, vision_heads=4,
                  vocab_size=49408, context_length=32, text_width=256, text_layers=4, text_heads=4,
                  embed_dim=256)
_GPU_WIDE = {**_GPU_SMALL, "vision_width": 384, "vision_layers": 6, "vision_heads": 6}
_CPU_SMALL = dict(image_size=16, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                  vocab_size=4096, context_length=16, text_width=64, text_layers=2, text_heads=2,
                  embed_dim=64)
_CPU_WIDE = dict(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=4,
                 vocab_size=8192, context_length=32, text_width=128, text_layers=2, text_heads=4,
                 embed_dim=128)
_TINY = dict(image_size=8, patch_size=4, vision_width=16, vision_layers=1, vision_heads=1,
             vocab_size=48, context_length=8, text_width=16, text_layers=1, text_heads=1, embed_dim=8)

SIZES = {
    "cuda": {
        "full": [dict(batch=4096, **_GPU_SMALL, loss="clip"),
                 dict(batch=16384, **_GPU_SMALL, loss="clip"),
                 dict(batch=16384, **_GPU_SMALL, loss="siglip"),
                 dict(batch=16384, **_GPU_WIDE, loss="clip")],
        "quick": [dict(batch=16384, **_GPU_SMALL, loss="clip"),
                  dict(batch=16384, **_GPU_SMALL, loss="siglip")],
    },
    "cpu": {
        "full": [dict(batch=1024, **_CPU_SMALL, loss="clip"),
                 dict(batch=1024, **_CPU_SMALL, loss="siglip"),
                 dict(batch=4096, **_CPU_SMALL, loss="clip"),
                 dict(batch=4096, **_CPU_SMALL, loss="siglip"),
                 dict(batch=256, **_CPU_WIDE, loss="clip")],
        "quick": [dict(batch=4096, **_CPU_SMALL, loss="clip"),
                  dict(batch=4096, **_CPU_SMALL, loss="siglip")],
    },
    "pytest": [dict(batch=4, **_TINY, loss="clip"), dict(batch=4, **_TINY, loss="siglip")],
}

NOTE = ("ViT image tower + causal text tower, projections, L2 norm, then ClipLoss (loss=clip) or "
        "SigLipLoss (loss=siglip); mmkernels: multimodal_attention in both towers and the loss "
        "without N x N logits")
