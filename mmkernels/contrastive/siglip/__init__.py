"""SigLIP's sigmoid loss over ``N x M`` image-text logits, never materialised, on one process or
many (``torch.distributed``)."""
from .api import SigLipLoss, siglip_loss
from .reference import siglip_loss_reference

__all__ = ["SigLipLoss", "siglip_loss", "siglip_loss_reference"]
