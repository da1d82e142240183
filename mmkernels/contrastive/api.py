"""Contrastive losses users call: ``contrastive_loss``, ``infonce_loss``, ``ContrastiveLoss``.

Under backend ``auto`` each call runs the path the dispatch table orders first among those
that can run it (``paths.py``, ``dispatch_table.py``): the kernels, ``blockwise`` or
``materialized``. The kernels and ``blockwise`` never hold the ``[N, M]`` logits (beyond one
block within ``memory_budget``): the registered op ``mmkernels::contrastive_stats`` returns
per-row and per-column log-sum-exp, sums and positive logits (each relative to the row's or
column's max), and the loss is an O(N) expression of them. With label smoothing ``eps`` (as in
``torch.nn.functional.cross_entropy``) the cross-entropy of row ``i`` is
``lse_i - (1 - eps) * L[i, t_i] - eps * mean_j L[i, j]``, formed relative to the row max.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .. import _autocast, _backend, _dispatch
from .. import _validation as check
from . import paths, reference
from .epilogue import contrastive_loss_epilogue, cross_entropy
from .ops import contrastive_stats, stats_dtype

REDUCTIONS = ("mean", "sum", "none")


class ContrastiveStats(NamedTuple):
    """Top-1 retrieval accuracy computed in the loss's own pass (0-dim float32 tensors).

    A row (column) counts as correct when its positive logit equals the row's
    (column's) maximum; ties with the maximum count as correct.
    """
    i2t_accuracy: torch.Tensor
    t2i_accuracy: torch.Tensor


def _scalar_arg(value, like: torch.Tensor, name: str) -> torch.Tensor:
    """A user's ``logit_scale`` / ``logit_bias`` (a float, or a floating tensor of shape ``[]``
    or ``[1]``) as a 0-dim tensor on ``like``'s device, float32 (float64 for float64 features).

    A tensor keeps its autograd graph, so a learnable parameter receives its gradient.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a 0-dim tensor or have shape [1], got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        return value.reshape(()).to(device=like.device, dtype=stats_dtype(like.dtype))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    return torch.full((), float(value), dtype=stats_dtype(like.dtype), device=like.device)


def _check_options(label_smoothing: float, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")


def _check_pair(a: torch.Tensor, b: torch.Tensor, a_name: str, b_name: str) -> None:
    check.tensor(a, a_name, 2)
    check.tensor(b, b_name, 2)
    check.floating(a, a_name)
    check.floating(b, b_name)
    check.same_dtype((a_name, a), (b_name, b))
    check.same_device((a_name, a), (b_name, b))
    check.nonempty(a, a_name)
    check.nonempty(b, b_name)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{a_name} has feature size {a.shape[1]} but {b_name} has {b.shape[1]}")


def check_targets(targets, n: int, m: int, like: torch.Tensor, *, rows: str = "queries",
                  keys: str = "keys", lower: int = 0, hint: str = "pass targets") -> torch.Tensor:
    """``targets [N]`` int64 in ``[lower, M)`` on ``like``'s device, or the default ``arange(N)``
    (which needs ``M >= N``). ``rows`` / ``keys`` name the two sides in the messages; on CUDA the
    range check is an asynchronous device assert (no host sync)."""
    if targets is None:
        if m < n:
            raise ValueError(f"default targets arange({n}) need at least {n} {keys}, got {m}; {hint}")
        return torch.arange(n, device=like.device)
    check.tensor(targets, "targets", 1)
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must be int64, got {targets.dtype}")
    if targets.shape[0] != n:
        raise ValueError(f"targets has {targets.shape[0]} entries but {rows} has {n} rows")
    check.same_device((rows, like), ("targets", targets))
    check.index_range(targets, "targets", m, lower=lower)
    return targets


def _under_autocast(a: torch.Tensor, b: torch.Tensor):
    """Autocast's rule for ``CE(logit_scale * a @ b.T)``: the matmul's inputs in the autocast
    dtype, the loss in float32 (cross-entropy is an fp32 op under autocast). Returns the
    features to use and the loss dtype: outside autocast, the features as given and their
    dtype."""
    if _autocast.autocast_dtype(a) is None or a.dtype == torch.float64:
        return a, b, getattr(a, "dtype", None)
    a, b = _autocast.lower_precision(a, b)
    return a, b, torch.float32


def _choose(op: str, x: torch.Tensor, shape_class: str, eligible: dict) -> _dispatch.Decision:
    """``_dispatch.choose`` for this family (a forced backend's dtype error names the features)."""
    if _backend.current() != "auto":
        check.backend_for(x, "features")
    return _dispatch.choose("contrastive", op, x, shape_class, eligible)


def _fused_epilogue(which: str, x: torch.Tensor) -> bool:
    """Whether the loss comes from the statistics through the one-launch Triton epilogue: on the
    triton backend, and on the blockwise path where its arithmetic is Triton (CUDA)."""
    if which == "triton":
        return True
    return which == paths.BLOCKWISE and paths.default_arith(x.device, x.dtype) == "triton"


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                     logit_bias=None, *, label_smoothing: float = 0.0, reduction: str = "mean",
                     return_stats: bool = False, positive_ids=None, teacher_image_features=None,
                     teacher_text_features=None, alpha: float = 0.0):
    """Symmetric CLIP loss without the ``[N, N]`` logits: OpenCLIP ``ClipLoss`` on one process.

    Args:
        image_features: ``[N, D]`` float32/bfloat16/float16; row i pairs with row i of ``text_features``.
        text_features: ``[N, D]``, same dtype and device. Used as given (normalise beforehand).
        logit_scale: float or 0-dim tensor (a learnable one receives its gradient).
        logit_bias: None, a float, or a tensor of shape ``[]`` or ``[1]`` added to every logit
            (OpenCLIP's ``logit_bias``). It cancels inside each softmax, so the loss does not
            depend on it and its gradient is exactly 0; a non-finite bias gives a NaN loss.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        reduction: ``"mean"`` (default), ``"sum"``, or ``"none"`` (``[N]``, the mean of
            pair i's image-to-text and text-to-image terms).
        return_stats: also return ``ContrastiveStats(i2t_accuracy, t2i_accuracy)``.
        positive_ids: ``[N]`` int64 ids: image i and text j are a positive pair when their ids
            are equal (several captions of one image); the hard targets are uniform over them.
        teacher_image_features, teacher_text_features, alpha: momentum distillation (ALBEF,
            BLIP): the targets are ``alpha * softmax(teacher logits) + (1 - alpha) * hard
            targets`` in both directions, the teacher logits ``logit_scale * teacher_image @
            teacher_text.T`` (no gradient reaches the teacher).
        ``image_features`` may be ``[N, Q, D]`` token features (BLIP-2's query embeddings): the
        similarity is then the max over the ``Q`` tokens. These options run the two directions
        through :func:`mmkernels.contrastive.itc.itc_rows_loss` (``return_stats`` is not
        available with them).

    Returns:
        The loss in the features' dtype (0-dim, or ``[N]`` for ``"none"``), and the
        stats when asked. Under ``torch.autocast`` the features are cast to the autocast dtype
        and the loss comes back in float32, as autocast runs OpenCLIP's ``ClipLoss`` (a
        lower-precision matmul, an fp32 cross-entropy).

    ``loss = (CE(L, arange(N)) + CE(L.T, arange(N))) / 2`` with ``L = logit_scale *
    image_features @ text_features.T + logit_bias``; memory O(N * D) on the ``cpu``/``triton``
    backends.
    """
    if (positive_ids is not None or alpha != 0.0 or teacher_image_features is not None
            or teacher_text_features is not None
            or (isinstance(image_features, torch.Tensor) and image_features.dim() == 3)):
        return _itc_contrastive(image_features, text_features, logit_scale, logit_bias,
                                positive_ids, teacher_image_features, teacher_text_features, alpha,
                                label_smoothing, reduction, return_stats)
    image_features, text_features, loss_dtype = _under_autocast(image_features, text_features)
    _check_pair(image_features, text_features, "image_features", "text_features")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features has {image_features.shape[0]} rows but text_features has "
                         f"{text_features.shape[0]}; the symmetric loss needs one text per image "
                         "(use infonce_loss for rectangular problems)")
    _check_options(label_smoothing, reduction)
    scale = _scalar_arg(logit_scale, image_features, "logit_scale")
    bias = None if logit_bias is None else _scalar_arg(logit_bias, image_features, "logit_bias")
    n, d = image_features.shape
    decision = _choose(
        "contrastive_loss", image_features, paths.shape_class(n, n, d),
        paths.eligibility(image_features, text_features, symmetric=True, loss_dtype=loss_dtype))
    if decision.path in (_dispatch.REFERENCE, paths.MATERIALIZED):
        # the materialized path is the reference's computation, chosen where it is fastest
        out = paths.materialized_contrastive(
            image_features, text_features, scale, bias, label_smoothing=label_smoothing,
            reduction=reduction, return_stats=return_stats)
        return (out[0].to(loss_dtype), out[1]) if return_stats else out.to(loss_dtype)

    which = decision.backend if decision.path == _dispatch.KERNEL else decision.path
    targets = torch.arange(n, device=image_features.device)
    stats = contrastive_stats(image_features, text_features, scale, targets, True, which)
    if _fused_epilogue(which, image_features):
        loss, i2t, t2i = contrastive_loss_epilogue(*stats, n, float(label_smoothing), reduction,
                                                   loss_dtype, "triton")
    else:
        row_logsum, row_max, row_sum, pos, col_logsum, col_max, col_sum = stats
        per_pair = 0.5 * (cross_entropy(row_logsum, row_max, row_sum, pos, n, label_smoothing)
                          + cross_entropy(col_logsum, col_max, col_sum, pos, n, label_smoothing))
        loss = reference.reduce(per_pair, reduction)
        i2t = t2i = None
    if bias is not None:
        # A bias shifts every logit of a row (and of a column) alike: it cancels in each
        # cross-entropy, smoothed or not. bias * 0 gives it its exact gradient, 0, and makes
        # the loss NaN where the logits would be (an infinite or NaN bias).
        loss = loss + bias * 0
    loss = loss.to(loss_dtype)
    if not return_stats:
        return loss
    if i2t is None:
        _, row_max, _, pos, _, col_max, _ = stats
        with torch.no_grad():
            i2t = (pos >= row_max).to(torch.float32).mean()
            t2i = (pos >= col_max).to(torch.float32).mean()
    return loss, ContrastiveStats(i2t, t2i)


def _itc_contrastive(image, text, logit_scale, logit_bias, positive_ids, teacher_image, teacher_text,
                     alpha, label_smoothing, reduction, return_stats):
    """:func:`contrastive_loss` with ids, a teacher or token features: its two directions as
    one-direction ``itc`` losses."""
    from .itc.api import itc_rows_loss
    if return_stats:
        raise ValueError("return_stats is not available with positive_ids, a teacher or token "
                         "features: compute the accuracies from the similarities")
    if alpha != 0.0 and (teacher_image is None or teacher_text is None):
        raise ValueError("alpha > 0 distils from a teacher: pass teacher_image_features and "
                         "teacher_text_features")
    for name, x in (("image_features", image), ("text_features", text)):
        check.tensor(x, name)
    if text.dim() != 2:
        raise ValueError(f"text_features must be [N, D], got shape {tuple(text.shape)}")
    if image.shape[0] != text.shape[0]:
        raise ValueError(f"image_features has {image.shape[0]} rows but text_features has "
                         f"{text.shape[0]}; the symmetric loss needs one text per image")
    _check_options(label_smoothing, reduction)
    common = dict(positive_ids=positive_ids, alpha=alpha, label_smoothing=label_smoothing,
                  reduction="none")
    i2t = itc_rows_loss(image, text, logit_scale, teacher_queries=teacher_image,
                        teacher_keys=teacher_text, **common)
    t2i = itc_rows_loss(text, image, logit_scale, teacher_queries=teacher_text,
                        teacher_keys=teacher_image, **common)
    loss = reference.reduce(0.5 * (i2t + t2i), reduction)
    if logit_bias is not None:
        loss = loss + _scalar_arg(logit_bias, image, "logit_bias") * 0
    return loss


def infonce_loss(queries: torch.Tensor, keys: torch.Tensor, logit_scale, *, targets=None,
                 label_smoothing: float = 0.0, reduction: str = "mean", positive_ids=None,
                 key_ids=None, teacher_queries=None, teacher_keys=None, teacher_scale=None,
                 alpha: float = 0.0):
    """One-direction InfoNCE over a rectangular ``[N, M]`` similarity, never materialised.

    Args:
        queries: ``[N, D]`` float32/bfloat16/float16.
        keys: ``[M, D]``, same dtype and device (e.g. ``[text; queue]`` in ALBEF/BLIP/MoCo,
            or features gathered from all ranks).
        logit_scale: float or 0-dim tensor (a learnable one receives its gradient).
        targets: ``[N]`` int64 indices into ``keys`` (default ``arange(N)``, which needs
            ``M >= N``; offset by rank for OpenCLIP's local loss).
        label_smoothing: as in ``torch.nn.functional.cross_entropy`` (over the M classes).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``).

    ``positive_ids`` / ``key_ids`` (multiple positives by id), ``teacher_queries`` /
    ``teacher_keys`` / ``teacher_scale`` / ``alpha`` (momentum-distilled soft targets, ALBEF's
    queue form with ``keys = [text_m; queue]``) and ``[N, Q, D]`` / ``[M, P, D]`` token features
    (the max over tokens, BLIP-2) are those of :func:`mmkernels.contrastive.itc.itc_rows_loss`,
    which computes the loss when any of them is given.

    Returns ``CE(logit_scale * queries @ keys.T, targets)`` in the queries' dtype (under
    ``torch.autocast``: the features cast to the autocast dtype, the loss in float32).
    On CUDA the range check of ``targets`` is an asynchronous device assert (no host sync).
    """
    if (positive_ids is not None or key_ids is not None or alpha != 0.0
            or teacher_queries is not None or teacher_keys is not None
            or any(isinstance(x, torch.Tensor) and x.dim() == 3 for x in (queries, keys))):
        from .itc.api import itc_rows_loss
        return itc_rows_loss(queries, keys, logit_scale, targets=targets, positive_ids=positive_ids,
                             key_ids=key_ids, teacher_queries=teacher_queries,
                             teacher_keys=teacher_keys, teacher_scale=teacher_scale, alpha=alpha,
                             label_smoothing=label_smoothing, reduction=reduction)
    queries, keys, loss_dtype = _under_autocast(queries, keys)
    _check_pair(queries, keys, "queries", "keys")
    _check_options(label_smoothing, reduction)
    n, m = queries.shape[0], keys.shape[0]
    targets = check_targets(targets, n, m, queries)
    scale = _scalar_arg(logit_scale, queries, "logit_scale")
    decision = _choose(
        "infonce_loss", queries, paths.shape_class(n, m, queries.shape[1]),
        paths.eligibility(queries, keys, symmetric=False, loss_dtype=loss_dtype))
    if decision.path in (_dispatch.REFERENCE, paths.MATERIALIZED):
        return paths.materialized_infonce(
            queries, keys, scale, targets=targets, label_smoothing=label_smoothing,
            reduction=reduction).to(loss_dtype)
    which = decision.backend if decision.path == _dispatch.KERNEL else decision.path
    stats = contrastive_stats(queries, keys, scale, targets, False, which)
    if _fused_epilogue(which, queries):
        return contrastive_loss_epilogue(*stats, m, float(label_smoothing), reduction, loss_dtype,
                                         "triton")[0]
    row_logsum, row_max, row_sum, pos, _, _, _ = stats
    per_row = cross_entropy(row_logsum, row_max, row_sum, pos, m, label_smoothing)
    return reference.reduce(per_row, reduction).to(loss_dtype)


class ContrastiveLoss(nn.Module):
    """Drop-in for OpenCLIP ``ClipLoss``: the same constructor and ``forward``.

    ``ContrastiveLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
    world_size=1, use_horovod=False)`` replaces ``open_clip.loss.ClipLoss(...)`` with the same
    arguments; ``forward(image_features, text_features, logit_scale, logit_bias=None,
    output_dict=False)`` returns the loss, or ``{"contrastive_loss": loss}`` with
    ``output_dict=True``, as ``ClipLoss`` does (so ``loss(**model_out, output_dict=True)``
    works).

    ``world_size > 1`` runs on ``torch.distributed`` (``group``: the process group, default the
    world; its size and this process's rank in it must equal ``world_size`` and ``rank``) in
    every mode of ``local_loss`` x ``gather_with_grad``, with OpenCLIP's per-rank loss and
    gradients and no ``N x M`` logits (see :func:`mmkernels.contrastive.distributed.
    distributed_contrastive_loss`); ``ring=True`` computes the ``local_loss`` +
    ``gather_with_grad`` mode without gathering the features. ``cache_labels`` is accepted and
    has nothing to cache (no label tensor is built); horovod is not supported (use
    ``torch.distributed``). ``label_smoothing`` and ``reduction`` are those of
    :func:`contrastive_loss`.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 ring: bool = False, group=None, label_smoothing: float = 0.0, reduction: str = "mean"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True: horovod is not supported; mmkernels runs on "
                             "torch.distributed (NCCL on GPUs, gloo on CPUs): launch with torchrun "
                             "and keep use_horovod=False")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if ring and not (local_loss and gather_with_grad):
            raise ValueError("ring=True computes the local loss with gathered gradients: pass "
                             "local_loss=True and gather_with_grad=True")
        _check_options(label_smoothing, reduction)
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.use_horovod = False
        self.ring = bool(ring)
        self.group = group
        self.label_smoothing = label_smoothing
        self.reduction = reduction

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict: bool = False, *, positive_ids=None, teacher_image_features=None,
                teacher_text_features=None, alpha: float = 0.0):
        """``image_features``, ``text_features`` ``[N, D]`` (this rank's rows); ``logit_scale``
        and ``logit_bias`` as in :func:`contrastive_loss`; ``positive_ids`` and the teacher
        (``alpha > 0``) as there, this rank's rows (gathered across ranks)."""
        extra = dict(positive_ids=positive_ids, teacher_image_features=teacher_image_features,
                     teacher_text_features=teacher_text_features, alpha=alpha)
        if self.world_size == 1:
            loss = contrastive_loss(image_features, text_features, logit_scale, logit_bias,
                                    label_smoothing=self.label_smoothing, reduction=self.reduction,
                                    **extra)
        else:
            from .distributed import distributed_contrastive_loss
            loss = distributed_contrastive_loss(
                image_features, text_features, logit_scale, logit_bias, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, ring=self.ring, group=self.group,
                rank=self.rank, world_size=self.world_size, label_smoothing=self.label_smoothing,
                reduction=self.reduction, **extra)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        s = f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}"
        if self.world_size > 1:
            s = (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, "
                 f"ring={self.ring}, rank={self.rank}, world_size={self.world_size}, " + s)
        return s
