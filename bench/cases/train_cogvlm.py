"""Sizes of the ``train_cogvlm`` case of the ``models`` family (see ``bench/cases/models.py``):
one training step of the CogVLM decoder stack with its visual expert.

GPU sizes: CogVLM-like widths scaled to one H100 in bf16 (a LLaMA vocabulary, EVA-CLIP-E's
1792 image features, a few hundred image tokens per sequence). The plain form's peak is its
saved activations, about ``layers * B * heads * S^2`` attention probabilities plus the
routed copies of the activations, within about half of 80 GB at these sizes (estimated from
the shapes each op saves for backward); the mmkernels form keeps no ``S x S`` tensor.
CPU sizes: one step of either form well under 2 s on 2 cores.
"""

_GPU = dict(vocab_size=32000, image_feature_dim=1792)
_CPU = dict(layers=2, heads=4, kv_heads=4)

SIZES = {
    "cuda": {
        "full": [
            dict(batch=8, width=2048, layers=6, heads=16, kv_heads=16, mlp_hidden=5632, seq_len=2048,
                 min_image_tokens=256, max_image_tokens=576, **_GPU),
            dict(batch=4, width=1024, layers=8, heads=8, kv_heads=8, mlp_hidden=2816, seq_len=4096,
                 min_image_tokens=256, max_image_tokens=1024, **_GPU),
        ],
        "quick": [
            dict(batch=4, width=1024, layers=4, heads=8, kv_heads=8, mlp_hidden=2816, seq_len=2048,
                 min_image_tokens=256, max_image_tokens=576, **_GPU),
        ],
    },
    "cpu": {
        "full": [
            dict(batch=4, vocab_size=512, width=128, mlp_hidden=352, image_feature_dim=64, seq_len=256,
                 min_image_tokens=32, max_image_tokens=96, **_CPU),
            dict(batch=2, vocab_size=1024, width=256, mlp_hidden=688, image_feature_dim=128, seq_len=512,
                 min_image_tokens=64, max_image_tokens=192, **_CPU),
            dict(batch=1, vocab_size=1024, width=256, mlp_hidden=688, image_feature_dim=128, seq_len=1024,
                 min_image_tokens=128, max_image_tokens=384, **_CPU),
        ],
        "quick": [
            dict(batch=4, vocab_size=512, width=128, mlp_hidden=352, image_feature_dim=64, seq_len=256,
                 min_image_tokens=32, max_image_tokens=96, **_CPU),
        ],
    },
    "pytest": [
        dict(batch=2, vocab_size=24, width=32, layers=1, heads=2, kv_heads=2, mlp_hidden=48,
             image_feature_dim=16, seq_len=16, min_image_tokens=3, max_image_tokens=7),
    ],
}

NOTE = ("CogVLM decoder stack: visual-expert QKV/dense/SwiGLU MLP (modality_linear, modality_ffn vs "
        "boolean-index routing) and image-span attention (multimodal_attention vs eager with a dense "
        "mask), next-token loss on the text")
