"""The vision-language contrastive objectives of ALBEF, BLIP and BLIP-2 without materialising the
``N x M`` similarities: momentum-distilled soft targets, multiple positives by ids, the max over
query tokens, and hard-negative sampling for ITM."""
from .api import (blip2_itc_loss, itc_rows_loss, itm_hard_negatives, momentum_itc_loss,
                  sample_hard_negatives)

__all__ = ["blip2_itc_loss", "itc_rows_loss", "itm_hard_negatives", "momentum_itc_loss",
           "sample_hard_negatives"]
