"""Contrastive losses without materialising the N x M logits: CLIP's InfoNCE (one process or many,
``torch.distributed``) and SigLIP's sigmoid loss (``siglip/``)."""
from .api import ContrastiveLoss, ContrastiveStats, contrastive_loss, infonce_loss
from .distributed import distributed_contrastive_loss
from .siglip import SigLipLoss, siglip_loss
from .siglip.distributed import distributed_siglip_loss

__all__ = ["ContrastiveLoss", "ContrastiveStats", "SigLipLoss", "contrastive_loss",
           "distributed_contrastive_loss", "distributed_siglip_loss", "infonce_loss", "siglip_loss"]
