"""Sizes of the ``train_blip2`` case (``bench/cases/models.py``): one BLIP-2 stage-1 training step
(mmkernels/models/blip2.py): frozen ViT, Q-Former, ITC + ITM (3 rows per pair) + ITG.

GPU: BLIP-2's Q-Former (width 768, 12 heads, intermediate 3072, 12 layers with cross-attention
every other one, 32 queries, 32 text tokens, BERT's vocabulary) over 257 image tokens of a
ViT-L/14 geometry at 224 pixels (width 1024, 16 heads) cut to 4 blocks: the frozen encoder runs
without gradients and costs both forms the same, so a shallow one keeps the timing on what
differs. Memory of the plain form in bf16, from what autograd saves per sample: per Q-Former
layer about ``16 * W`` values for each of the 320 token rows a pair passes through (32 queries +
32 text for ITC, 3 x 64 for ITM, 64 for ITG) and the ``[H, S, S]`` probabilities, about 9 MB;
per cross-attention layer the K/V of 5 images (the plain form projects each pass's images) and
the ``[H, 32, 257]`` probabilities, about 7 MB: about 150 MB per pair, so batch 128 holds about
19 GB and batch 256 about 38 GB, plus the ``[B, T, vocab]`` LM logits (0.25 GB at 128) and the
backward's transients: both fit one H100's 80 GB. The mmkernels form holds less (one K/V
projection of the ``B`` images for every layer and objective, no ``S x S`` or ``B x B x Q``
tensors).

CPU: the same structure at small widths, a step well under 2 s per form on 2 cores.
"""

_GPU = dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=4, vision_heads=16,
            num_query_tokens=32, hidden_size=768, num_heads=12, intermediate_size=3072, num_layers=12,
            cross_attention_freq=2, vocab_size=30523, text_len=32, embed_dim=256)
_CPU_QUICK = dict(image_size=224, patch_size=14, vision_width=128, vision_layers=1, vision_heads=4,
                  num_query_tokens=32, hidden_size=128, num_heads=4, intermediate_size=512, num_layers=4,
                  cross_attention_freq=2, vocab_size=1000, text_len=16, embed_dim=64)
_CPU_FULL = dict(image_size=224, patch_size=14, vision_width=192, vision_layers=1, vision_heads=4,
                 num_query_tokens=32, hidden_size=256, num_heads=4, intermediate_size=1024, num_layers=4,
                 cross_attention_freq=2, vocab_size=1000, text_len=24, embed_dim=128)
_TINY = dict(image_size=8, patch_size=4, vision_width=16, vision_layers=1, vision_heads=2,
             num_query_tokens=4, hidden_size=16, num_heads=2, intermediate_size=32, num_layers=2,
             cross_attention_freq=2, vocab_size=32, text_len=8, embed_dim=8)

SIZES = {
    "cuda": {"full": [dict(batch=128, **_GPU), dict(batch=256, **_GPU)],
             "quick": [dict(batch=128, **_GPU)]},
    "cpu": {"full": [dict(batch=8, **_CPU_QUICK), dict(batch=8, **_CPU_FULL)],
            "quick": [dict(batch=8, **_CPU_QUICK)]},
    "pytest": [dict(batch=4, **_TINY)],
}

NOTE = ("BLIP-2 stage 1: frozen ViT, Q-Former, ITC + ITM (3 rows per pair, hard negatives) + ITG; "
        "mmkernels: blip2_itc_loss, itm_hard_negatives, multimodal_attention under the BLIP-2 masks, "
        "cross_attention on one fused K/V GEMM shared by the objectives")
