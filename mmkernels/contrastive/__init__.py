"""Contrastive losses without materialising the N x M logits: CLIP's InfoNCE (one process or many,
``torch.distributed``), SigLIP's sigmoid loss (``siglip/``) and the ALBEF / BLIP / BLIP-2 objectives
(``itc/``)."""
from .api import ContrastiveLoss, ContrastiveStats, contrastive_loss, infonce_loss
from .distributed import distributed_contrastive_loss
from .itc import (blip2_itc_loss, itc_rows_loss, itm_hard_negatives, momentum_itc_loss,
                  sample_hard_negatives)
from .siglip import SigLipLoss, siglip_loss
from .siglip.distributed import distributed_siglip_loss

__all__ = ["ContrastiveLoss", "ContrastiveStats", "SigLipLoss", "blip2_itc_loss", "contrastive_loss",
           "distributed_contrastive_loss", "distributed_siglip_loss", "infonce_loss",
           "itc_rows_loss", "itm_hard_negatives", "momentum_itc_loss", "sample_hard_negatives",
           "siglip_loss"]
