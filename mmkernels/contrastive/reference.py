"""Plain-PyTorch contrastive losses: the definition of "correct".

These materialise the full ``[N, M]`` logits, exactly as OpenCLIP's
``ClipLoss`` and ALBEF/BLIP's ITC do. Tests evaluate them in float64 and
compare every backend with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reduce(per_item: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``"mean" | "sum" | "none"`` to a ``[N]`` vector of losses."""
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item


def top1(logits: torch.Tensor, targets: torch.Tensor, dim: int) -> torch.Tensor:
    """Fraction of rows (dim=1) or columns (dim=0) whose target logit is the largest.

    A tie with the maximum counts as correct. ``logits [N, M]``, ``targets``
    the target index of each row/column. Returns a 0-dim float32 tensor.
    """
    best = logits.amax(dim=dim)
    if dim == 1:
        pos = logits.gather(1, targets[:, None])[:, 0]
    else:
        pos = logits.gather(0, targets[None, :])[0]
    return (pos >= best).to(torch.float32).mean()


def contrastive_loss_reference(image_features, text_features, logit_scale, logit_bias=None, *,
                               label_smoothing=0.0, reduction="mean", return_stats=False):
    """Symmetric CLIP loss: ``(CE(L, arange) + CE(L.T, arange)) / 2``.

    ``image_features``, ``text_features``: ``[N, D]``; ``logit_scale``, ``logit_bias``: float or
    0-dim tensor; ``L = logit_scale * image_features @ text_features.T (+ logit_bias)``.
    ``reduction="none"`` gives ``[N]``: the mean of pair i's row and column terms.
    With ``return_stats`` also returns ``(i2t_accuracy, t2i_accuracy)``.
    """
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(logits.shape[0], device=logits.device)
    row = F.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    col = F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing, reduction="none")
    loss = reduce((row + col) / 2, reduction)
    if not return_stats:
        return loss
    with torch.no_grad():
        return loss, (top1(logits, labels, 1), top1(logits, labels, 0))


def infonce_loss_reference(queries, keys, logit_scale, *, targets=None,
                           label_smoothing=0.0, reduction="mean"):
    """One-direction InfoNCE: ``CE(logit_scale * queries @ keys.T, targets)``.

    ``queries [N, D]``, ``keys [M, D]``, ``targets [N]`` int64 (default ``arange(N)``).
    """
    logits = logit_scale * queries @ keys.T
    if targets is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
    per = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    return reduce(per, reduction)
