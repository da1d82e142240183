"""Contrastive (CLIP/SigLIP-style InfoNCE) losses without materialising the N x M logits."""
from .api import ContrastiveLoss, ContrastiveStats, contrastive_loss, infonce_loss

__all__ = ["ContrastiveLoss", "ContrastiveStats", "contrastive_loss", "infonce_loss"]
