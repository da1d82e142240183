"""Small models built on mmkernels' ops: the BLIP-2 Q-Former (loads HF ``Blip2QFormerModel`` weights)."""
from .qformer import QFormer

__all__ = ["QFormer"]
