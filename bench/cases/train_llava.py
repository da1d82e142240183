"""Sizes of the ``train_llava`` case of the ``models`` family (see ``bench/cases/models.py``):
one training step of the LLaVA decoder on packed rows.

GPU sizes: LLaMA-like widths scaled to one H100 in bf16 (a LLaMA vocabulary, CLIP ViT-L's
1024 image features, LLaVA-1.5's 576 image tokens per sample, rows of 2048-4096 tokens). The
plain form's peak is its saved activations, about ``layers * B * heads * S^2`` attention
probabilities plus the decoder's activations, within about half of 80 GB at these sizes
(estimated from the shapes each op saves for backward); the mmkernels form keeps no ``S x S``
tensor. CPU sizes: one step of either form well under 2 s on 2 cores.
"""

_GPU = dict(vocab_size=32000, image_feature_dim=1024, image_tokens=576, min_text=64, max_text=512)
_CPU = dict(layers=2, heads=4, kv_heads=2)

SIZES = {
    "cuda": {
        "full": [
            dict(batch=2, width=2048, layers=8, heads=16, kv_heads=16, mlp_hidden=5504, seq_len=4096, **_GPU),
            dict(batch=8, width=1536, layers=8, heads=12, kv_heads=4, mlp_hidden=4096, seq_len=2048, **_GPU),
        ],
        "quick": [
            dict(batch=4, width=1024, layers=4, heads=8, kv_heads=8, mlp_hidden=2816, seq_len=2048, **_GPU),
        ],
    },
    "cpu": {
        "full": [
            dict(batch=4, vocab_size=512, width=128, mlp_hidden=352, image_feature_dim=64, image_tokens=32,
                 seq_len=256, min_text=16, max_text=64, **_CPU),
            dict(batch=2, vocab_size=1024, width=256, mlp_hidden=688, image_feature_dim=128, image_tokens=64,
                 seq_len=512, min_text=32, max_text=128, **_CPU),
            dict(batch=1, vocab_size=1024, width=256, mlp_hidden=688, image_feature_dim=128, image_tokens=64,
                 seq_len=1024, min_text=32, max_text=256, **_CPU),
        ],
        "quick": [
            dict(batch=4, vocab_size=512, width=128, mlp_hidden=352, image_feature_dim=64, image_tokens=32,
                 seq_len=256, min_text=16, max_text=64, **_CPU),
        ],
    },
    "pytest": [
        dict(batch=2, vocab_size=24, width=32, layers=1, heads=2, kv_heads=1, mlp_hidden=48,
             image_feature_dim=16, image_tokens=2, seq_len=20, min_text=2, max_text=6),
    ],
}

NOTE = ("LLaVA decoder on packed rows (several samples per row, positions restarting per sample): "
        "varlen attention (multimodal_attention, MultimodalMask.packed) vs eager with the dense "
        "block-diagonal causal mask, next-token loss per sample")
