"""Plain-PyTorch SigLIP sigmoid loss: the definition of "correct" for this unit.

These materialise the ``[N, M]`` logits, as OpenCLIP's ``SigLipLoss`` does. Tests evaluate them
in float64 and compare every backend with them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def signs(n: int, m: int, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``z [n, m]``: +1 at ``(i, targets[i])``, -1 elsewhere; a row whose target is -1 has no
    positive (a negative-only block, as the other ranks' keys in distributed SigLIP)."""
    z = -torch.ones(n, m, dtype=dtype, device=targets.device)
    rows = torch.arange(n, device=targets.device)
    has = targets >= 0
    z[rows[has], targets[has]] = 1.0
    return z


def siglip_rows_reference(q: torch.Tensor, k: torch.Tensor, scale, bias, targets: torch.Tensor
                          ) -> torch.Tensor:
    """Per-row sigmoid loss ``[N]``: ``row_i = sum_j -log sigmoid(z_ij * (scale * q_i . k_j + bias))``.

    ``q [N, D]``, ``k [M, D]``, ``scale`` and ``bias`` floats or 0-dim tensors (``bias`` may be
    None: 0), ``targets [N]`` int64 in ``[-1, M)`` (see :func:`signs`).
    """
    logits = scale * q @ k.T
    if bias is not None:
        logits = logits + bias
    z = signs(q.shape[0], k.shape[0], targets, logits.dtype)
    return -F.logsigmoid(z * logits).sum(1)


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias=None, *,
                          targets=None, reduction="mean"):
    """SigLIP's loss: ``sum_i row_i / N`` for ``"mean"`` (OpenCLIP ``SigLipLoss`` on one process),
    ``sum_i row_i`` for ``"sum"``, the rows ``[N]`` for ``"none"``.

    ``targets`` defaults to ``arange(N)`` (image i's positive is text i).
    """
    n = image_features.shape[0]
    if targets is None:
        targets = torch.arange(n, device=image_features.device)
    rows = siglip_rows_reference(image_features, text_features, logit_scale, logit_bias, targets)
    if reduction == "mean":
        return rows.sum() / n
    if reduction == "sum":
        return rows.sum()
    return rows
