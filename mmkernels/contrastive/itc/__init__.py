"""The vision-language contrastive objectives of ALBEF, BLIP and BLIP-2 without materialising the
``N x M`` similarities: momentum-distilled soft targets, multiple positives by ids, the max over
query tokens, and hard-negative sampling for ITM."""
