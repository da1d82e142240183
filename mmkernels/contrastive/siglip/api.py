"""The SigLIP sigmoid loss users call: ``siglip_loss`` and ``SigLipLoss``.

Under backend ``auto`` each call runs the path the dispatch table orders first among those that
can run it: the kernels (``mmkernels::siglip_rows``), ``blockwise`` or ``materialized``
(``paths.py``). The kernels and ``blockwise`` never hold the ``[N, M]`` logits (beyond one block
within ``memory_budget``).
"""
from __future__ import annotations

import torch
from torch import nn

from ... import _dispatch
from .. import paths as contrastive_paths
from ..api import _check_pair, _choose, _scalar_arg, _under_autocast, check_targets
from . import paths
from .ops import siglip_fused, siglip_rows

REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_targets(targets, n: int, m: int, like: torch.Tensor) -> torch.Tensor:
    """``targets [N]`` int64 in ``[-1, M)`` (default ``arange(N)``, which needs ``M >= N``)."""
    return check_targets(targets, n, m, like, rows="image_features", keys="text rows", lower=-1,
                         hint="pass targets (-1 for a row without a positive)")


def _wants_fused(*tensors: torch.Tensor) -> bool:
    """Whether a backward will follow (grad mode on, an input that requires grad): then a scalar
    loss takes its gradients from the forward's pass over the logits (``siglip_fused``)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def siglip_rows_auto(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     targets: torch.Tensor, *, total: bool = False) -> torch.Tensor:
    """Per-row sigmoid losses ``[N]`` (float32; float64 for float64 inputs; the features' dtype on
    the materialized path) on the path the dispatcher chooses, or with ``total`` their sum
    (0-dim; through ``siglip_fused`` when a backward will follow). Inputs already checked;
    ``scale`` and ``bias`` 0-dim tensors."""
    n, m, d = q.shape[0], k.shape[0], q.shape[1]
    decision = _choose("siglip_loss", q, contrastive_paths.shape_class(n, m, d),
                       paths.eligibility(q, k))
    if decision.path in (_dispatch.REFERENCE, paths.MATERIALIZED):
        rows = paths.materialized_siglip(q, k, scale, bias, targets)
        return rows.sum() if total else rows
    which = decision.backend if decision.path == _dispatch.KERNEL else decision.path
    if total and _wants_fused(q, k, scale, bias):
        return siglip_fused(q, k, scale, bias, targets, which)[0]
    rows = siglip_rows(q, k, scale, bias, targets, which)
    return rows.sum() if total else rows


def reduce_rows(rows: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """SigLIP's normalisation: ``sum / n`` for ``"mean"`` (n = image rows), ``sum``, or the rows."""
    if reduction == "mean":
        return rows.sum() / n
    if reduction == "sum":
        return rows.sum()
    return rows


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                logit_bias=None, *, targets=None, reduction: str = "mean") -> torch.Tensor:
    """SigLIP's sigmoid loss without the ``[N, M]`` logits: OpenCLIP ``SigLipLoss`` on one process.

    Args:
        image_features: ``[N, D]`` float32/bfloat16/float16 (float64 for gradcheck).
        text_features: ``[M, D]``, same dtype and device. Used as given (normalise beforehand).
        logit_scale: float or a tensor of shape ``[]`` or ``[1]`` (a learnable one receives its
            gradient). OpenCLIP passes ``exp(t)``: the multiplier itself, as here.
        logit_bias: None (0), a float, or a tensor of shape ``[]`` or ``[1]`` (learnable).
        targets: ``[N]`` int64: the text row paired with each image (default ``arange(N)``, which
            needs ``M >= N``); -1 gives a row no positive (all its logits are negatives).
        reduction: ``"mean"`` (default: the sum over all ``N x M`` terms divided by N, SigLIP's
            normalisation), ``"sum"``, or ``"none"`` (``[N]``, each image row's sum).

    ``loss = -sum_ij log sigmoid(z_ij * (logit_scale * x_i . y_j + logit_bias)) / N`` with
    ``z_ij = +1`` for ``j = targets[i]`` and -1 elsewhere. Returns the loss in the features'
    dtype; under ``torch.autocast`` the features are cast to the autocast dtype and the loss is
    float32.
    """
    image_features, text_features, loss_dtype = _under_autocast(image_features, text_features)
    _check_pair(image_features, text_features, "image_features", "text_features")
    _check_reduction(reduction)
    n, m = image_features.shape[0], text_features.shape[0]
    targets = _check_targets(targets, n, m, image_features)
    scale = _scalar_arg(logit_scale, image_features, "logit_scale")
    bias = (torch.zeros_like(scale) if logit_bias is None
            else _scalar_arg(logit_bias, image_features, "logit_bias"))
    if reduction == "none":
        rows = siglip_rows_auto(image_features, text_features, scale, bias, targets)
        return rows.to(loss_dtype)
    loss = siglip_rows_auto(image_features, text_features, scale, bias, targets, total=True)
    return (loss / n if reduction == "mean" else loss).to(loss_dtype)


class SigLipLoss(nn.Module):
    """Drop-in for OpenCLIP ``SigLipLoss``: the same constructor and ``forward``.

    ``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)``; ``forward(
    image_features, text_features, logit_scale, logit_bias=None, output_dict=False)`` returns the
    loss, or ``{"contrastive_loss": loss}``. With ``world_size > 1`` it runs on
    ``torch.distributed`` (``group``: the process group, default the world; its size and this
    process's rank in it must equal ``world_size`` and ``rank``) with every ``dist_impl`` of
    OpenCLIP (``"bidir"`` the default, ``"shift"``, ``"reduce"``, ``"gather"``): the same loss
    and gradients, each image's negatives being every rank's texts. ``"bidir"`` and ``"shift"``
    pass the text blocks between neighbours while the current block is computed, and send their
    gradients home the same way in the backward; no ``N x M`` logits are held on any path.
    ``cache_labels`` is accepted and has nothing to cache (there is no label matrix).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, group=None):
        super().__init__()
        from .distributed import DIST_IMPLS
        self.cache_labels = cache_labels
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict: bool = False):
        """``image_features``, ``text_features`` ``[N, D]`` (this rank's); ``logit_scale``,
        ``logit_bias`` as in :func:`siglip_loss`."""
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias)
        else:
            from .distributed import distributed_siglip_loss
            loss = distributed_siglip_loss(
                image_features, text_features, logit_scale, logit_bias, dist_impl=self.dist_impl,
                group=self.group, rank=self.rank, world_size=self.world_size)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}"
