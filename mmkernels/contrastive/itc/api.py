"""The ALBEF / BLIP / BLIP-2 objectives users call, without the ``N x M`` similarities.

* :func:`itc_rows_loss`: one direction, the general form every other function builds on (soft
  targets from teacher features, positives by ids, max over tokens, label smoothing).
* :func:`momentum_itc_loss`: ALBEF / BLIP ITC with momentum distillation and feature queues.
* :func:`blip2_itc_loss`: BLIP-2's ITC (32 query embeddings, max over queries, label smoothing,
  features gathered from every rank, rank offsets).
* :func:`sample_hard_negatives`, :func:`itm_hard_negatives`: ITM negatives drawn from the
  softmax of the similarities with the positives excluded (Gumbel-max, no ``[B, B]`` weights,
  no host synchronisation).

``mmkernels.infonce_loss`` and ``mmkernels.contrastive_loss`` route here when given teacher
features, ``positive_ids`` or token features. Under backend ``auto`` each call runs the path the
contrastive dispatch table orders first (ops ``itc_loss``, ``itc_negatives``) among the kernels
(``mmkernels::itc_rows``), ``blockwise`` and ``materialized`` (``paths.py``).
"""
from __future__ import annotations

import torch

from ... import _dispatch, _distributed
from ... import _validation as check
from ..api import _check_options as _check_clip_options
from ..api import _choose, _scalar_arg, _under_autocast, check_targets
from ..paths import shape_class
from ..reference import reduce as reduce_rows
from . import paths, random as itc_random
from .ops import itc_negatives, itc_rows



# ----------------------------------------------------------------------------- checks

def check_features(x, name: str) -> torch.Tensor:
    """``x`` as ``[rows, tokens, D]``: ``[rows, D]`` features or ``[rows, tokens, D]`` token
    features (BLIP-2's query embeddings), floating, non-empty."""
    check.tensor(x, name)
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [rows, D] or [rows, tokens, D], got shape {tuple(x.shape)}")
    check.floating(x, name)
    check.nonempty(x, name)
    return x.unsqueeze(1) if x.dim() == 2 else x


def check_ids(ids, name: str, n: int, like: torch.Tensor) -> torch.Tensor:
    check.tensor(ids, name, 1)
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {ids.dtype}")
    if ids.shape[0] != n:
        raise ValueError(f"{name} has {ids.shape[0]} entries, expected {n}")
    check.same_device((name, ids), ("features", like))
    return ids


def _check_options(alpha: float, label_smoothing: float, reduction: str) -> None:
    _check_clip_options(label_smoothing, reduction)
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def _positive_ids(n: int, m: int, targets, positive_ids, key_ids, like: torch.Tensor):
    """``(row_ids [N], col_ids [M])``: from ``positive_ids`` / ``key_ids``, or from ``targets``
    (row i's positive is key ``targets[i]``; default ``arange(N)``)."""
    if positive_ids is not None or key_ids is not None:
        if targets is not None:
            raise ValueError("pass either targets or positive_ids / key_ids, not both")
        if positive_ids is None:
            raise ValueError("key_ids needs positive_ids (the ids of the queries)")
        rows = check_ids(positive_ids, "positive_ids", n, like)
        if key_ids is None:
            if m != n:
                raise ValueError(f"there are {m} keys but {n} queries: pass key_ids, the ids of the keys")
            key_ids = positive_ids
        return rows, check_ids(key_ids, "key_ids", m, like)
    targets = check_targets(targets, n, m, like, hint="pass targets or positive_ids")
    return targets, torch.arange(m, device=like.device)


# ----------------------------------------------------------------------------- one direction

def _rows(q, k, kq, scale, row_ids, col_ids, tq, tk, tscale, alpha: float, eps: float) -> torch.Tensor:
    """Per-row losses ``[N]`` on the path the dispatcher chooses (inputs checked, 3-D)."""
    n, m = q.shape[0], col_ids.shape[0]
    decision = _choose("itc_loss", q, shape_class(n, m, q.shape[2] * q.shape[1] * k.shape[1]),
                       paths.eligibility(q, k, teacher=alpha != 0.0, m=m))
    if decision.path in (_dispatch.REFERENCE, paths.MATERIALIZED):
        return paths.materialized_itc_rows(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, alpha, eps)
    which = decision.backend if decision.path == _dispatch.KERNEL else decision.path
    return itc_rows(q, k, kq, tq, tk, scale, tscale, row_ids, col_ids, float(alpha), float(eps), which)[0]


def itc_rows_loss(queries: torch.Tensor, keys: torch.Tensor, logit_scale, *, targets=None,
                  positive_ids=None, key_ids=None, teacher_queries=None, teacher_keys=None,
                  teacher_scale=None, alpha: float = 0.0, label_smoothing: float = 0.0,
                  reduction: str = "mean", key_queue=None, queue_snapshot: bool = True):
    """One direction of the ALBEF / BLIP / BLIP-2 objectives, never materialising ``N x M``.

    Args:
        queries: ``[N, D]``, or ``[N, Q, D]`` token features (e.g. BLIP-2's 32 query embeddings):
            float32/bfloat16/float16/float64.
        keys: ``[M, D]`` or ``[M, P, D]``, same dtype and device (e.g. ``[text; queue]``, or every
            rank's features). The similarity of query i and key j is the max over their token
            pairs of the dot products; its gradient goes to the maximal pair (the first on ties).
        logit_scale: float or 0-dim tensor (``1 / temp``; a learnable one receives its gradient).
        targets: ``[N]`` int64 index of each query's positive key (default ``arange(N)``).
        positive_ids, key_ids: ``[N]`` / ``[M]`` int64 ids instead of ``targets``: the positives
            of query i are the keys with its id, the hard target uniform over them (BLIP's
            retrieval ITC); ``key_ids`` defaults to ``positive_ids`` when ``M == N``. A query
            with no positive gives NaN, as the materialised code does.
        teacher_queries, teacher_keys: momentum features (same shapes as ``queries`` /
            ``keys``; ``teacher_keys`` defaults to ``keys``, as in ALBEF where the keys are
            momentum features already); needed when ``alpha > 0``. No gradient reaches them.
        teacher_scale: the teacher logits' scale (default ``logit_scale``, detached).
        alpha: distillation weight: the targets are ``alpha * softmax(teacher logits) + (1 -
            alpha) * hard targets``.
        label_smoothing: ``eps``; the targets become ``(1 - eps) * T + eps / M``, as
            ``torch.nn.functional.cross_entropy`` smooths probability targets.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N]``).
        key_queue: ``[K, D]`` (or ``[K, P, D]``) keys that continue ``keys`` without a copy (the
            keys are ``[keys; key_queue]``, ``M = len(keys) + K``; ``targets`` / ``key_ids``
            index and label them all), e.g. ALBEF's queue (``queue.T`` of a ``[D, K]`` buffer
            works as it is). It receives no gradient; with a queue the teacher keys are the keys
            (``teacher_keys`` must be None).
        queue_snapshot: when a backward will follow, keep a private copy of ``key_queue`` for it
            (default), so the queue may be updated in place before ``backward()``, as ALBEF and
            BLIP enqueue inside ``forward`` (their code copies the queue too, ``queue.clone()``).
            ``False`` reads the queue in place in the backward as well, saving ``K * D``
            elements: then the queue must not be written before ``backward()`` (autograd raises
            if it is).

    Returns the cross-entropy of ``logit_scale * S`` against the targets, in the queries' dtype
    (float32 under ``torch.autocast``, which casts the features to its dtype). Memory O((N + M)
    * D) beyond the inputs on every path but ``materialized`` / ``reference``.
    """
    _check_options(alpha, label_smoothing, reduction)
    queries, keys, loss_dtype = _under_autocast(queries, keys)
    q = check_features(queries, "queries")
    k = check_features(keys, "keys")
    check.same_dtype(("queries", q), ("keys", k))
    check.same_device(("queries", q), ("keys", k))
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"queries have feature size {q.shape[2]} but keys have {k.shape[2]}")
    kq = None
    if key_queue is not None and key_queue.shape[0] > 0:
        kq = check_features(_under_autocast(key_queue, keys)[0], "key_queue").detach()
        check.same_dtype(("keys", k), ("key_queue", kq))
        check.same_device(("keys", k), ("key_queue", kq))
        if kq.shape[1:] != k.shape[1:]:
            raise ValueError(f"key_queue has rows of shape {tuple(kq.shape[1:])} but keys have "
                             f"{tuple(k.shape[1:])}")
        if teacher_keys is not None and alpha != 0.0:
            raise ValueError("with key_queue the teacher keys are the keys: pass teacher_keys=None")
        if queue_snapshot and torch.is_grad_enabled() and (
                q.requires_grad or k.requires_grad
                or (isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad)):
            kq = kq.clone()
    n, m = q.shape[0], k.shape[0] + (0 if kq is None else kq.shape[0])
    row_ids, col_ids = _positive_ids(n, m, targets, positive_ids, key_ids, q)
    scale = _scalar_arg(logit_scale, q, "logit_scale")
    tq = tk = None
    if alpha != 0.0:
        if teacher_queries is None:
            raise ValueError("alpha > 0 distils from a teacher: pass teacher_queries (and "
                             "teacher_keys unless the keys are the teacher's)")
        tq = check_features(_under_autocast(teacher_queries, keys)[0], "teacher_queries")
        if tq.shape[0] != n:
            raise ValueError(f"teacher_queries has {tq.shape[0]} rows but queries has {n}")
        if teacher_keys is not None:
            tk = check_features(_under_autocast(teacher_keys, keys)[0], "teacher_keys")
            if tk.shape[0] != m:
                raise ValueError(f"teacher_keys has {tk.shape[0]} rows but keys has {m}")
        tkd = k if tk is None else tk
        check.same_dtype(("queries", q), ("teacher_queries", tq), ("teacher_keys", tkd))
        check.same_device(("queries", q), ("teacher_queries", tq), ("teacher_keys", tkd))
        if tq.shape[2] != tkd.shape[2]:
            raise ValueError(f"teacher_queries have feature size {tq.shape[2]} but the teacher "
                             f"keys have {tkd.shape[2]}")
        tq, tk = tq.detach(), None if tk is None else tk.detach()
    tscale = (scale if teacher_scale is None else _scalar_arg(teacher_scale, q, "teacher_scale")).detach()
    rows = _rows(q, k, kq, scale, row_ids, col_ids, tq, tk, tscale, float(alpha), float(label_smoothing))
    return reduce_rows(rows, reduction).to(loss_dtype)


# ----------------------------------------------------------------------------- the papers' objectives

def momentum_itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                      text_feat_m: torch.Tensor, logit_scale, *, alpha: float,
                      image_queue: torch.Tensor | None = None, text_queue: torch.Tensor | None = None,
                      idx: torch.Tensor | None = None, idx_queue: torch.Tensor | None = None,
                      label_smoothing: float = 0.0, reduction: str = "mean", queue_snapshot: bool = True):
    """ALBEF / BLIP image-text contrastive loss with momentum distillation and feature queues.

    ``loss = (i2t + t2i) / 2`` with ``i2t`` the cross-entropy of ``logit_scale * image_feat @
    [text_feat_m; text_queue].T`` against ``alpha * softmax(logit_scale * image_feat_m @
    [text_feat_m; text_queue].T) + (1 - alpha) * hard targets`` (``t2i`` likewise), as ALBEF's
    and BLIP's ``forward`` compute it with ``logit_scale = 1 / temp``; the hard targets are the
    diagonal, or uniform over equal ids when ``idx`` is given (BLIP retrieval).

    Args:
        image_feat, text_feat: ``[B, D]`` online features (normalised); they receive gradients.
        image_feat_m, text_feat_m: ``[B, D]`` momentum features (no gradient).
        logit_scale: ``1 / temp``, float or 0-dim tensor (receives its gradient).
        alpha: distillation weight in ``[0, 1]``.
        image_queue, text_queue: ``[K, D]`` queues as rows (the papers store ``[D, K]``: pass
            ``queue.T``, used as it is: the queues are never copied or concatenated); None or
            ``K = 0`` for none.
        idx, idx_queue: ``[B]``, ``[K]`` int64 ids for multiple positives.
        label_smoothing, reduction: as in :func:`itc_rows_loss` (``"none"`` gives ``[B]``, the
            mean of each pair's two directions).
        queue_snapshot: as in :func:`itc_rows_loss`: by default the queues may be updated in
            place (ALBEF's ``_dequeue_and_enqueue`` in ``forward``) before ``backward()``.
    """
    b = image_feat.shape[0] if isinstance(image_feat, torch.Tensor) else 0
    k = 0 if text_queue is None else text_queue.shape[0]
    if (0 if image_queue is None else image_queue.shape[0]) != k:
        raise ValueError("image_queue and text_queue need the same number of rows")
    if idx is None:
        if idx_queue is not None:
            raise ValueError("idx_queue needs idx (the batch's ids)")
        kwargs = {"targets": None}
    else:
        queue_ids = idx_queue
        if queue_ids is None:
            if k:
                raise ValueError("with a queue and idx, pass idx_queue (the queue's ids)")
            queue_ids = idx.new_empty(0)
        kwargs = {"positive_ids": idx, "key_ids": torch.cat([idx, queue_ids], 0)}
    common = dict(alpha=alpha, label_smoothing=label_smoothing, reduction="none", queue_snapshot=queue_snapshot)
    i2t = itc_rows_loss(image_feat, text_feat_m.detach(), logit_scale, key_queue=text_queue,
                        teacher_queries=image_feat_m if alpha else None, **kwargs, **common)
    t2i = itc_rows_loss(text_feat, image_feat_m.detach(), logit_scale, key_queue=image_queue,
                        teacher_queries=text_feat_m if alpha else None, **kwargs, **common)
    return reduce_rows(0.5 * (i2t + t2i), reduction)


def blip2_itc_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, logit_scale, *,
                   label_smoothing: float = 0.1, group=None, gather_with_grad: bool = False,
                   reduction: str = "mean"):
    """BLIP-2's image-text contrastive loss (Q-Former stage 1), one process or many.

    ``image_feats [B, Q, D]`` (the normalised query embeddings), ``text_feat [B, D]``; the
    similarity of an image and a text is the max over the ``Q`` queries. With
    ``torch.distributed`` initialised, every rank's features are gathered (``group``, default
    the world) and rank ``r``'s targets are ``r * B + i``, as BLIP-2's code does; the gather
    passes no gradient (BLIP-2's ``concat_all_gather``) unless ``gather_with_grad``, which sums
    every rank's gradient into the local features. ``logit_scale = 1 / temp``. Returns ``(i2t +
    t2i) / 2`` (``"none"``: ``[B]``, each pair's mean of both directions).
    """
    img = check_features(image_feats, "image_feats")
    if isinstance(text_feat, torch.Tensor) and text_feat.dim() != 2:
        raise ValueError(f"text_feat must be [B, D], got shape {tuple(text_feat.shape)}")
    check_features(text_feat, "text_feat")
    if img.shape[0] != text_feat.shape[0]:
        raise ValueError(f"image_feats has {img.shape[0]} rows but text_feat has {text_feat.shape[0]}")
    b = img.shape[0]
    rank, world = 0, 1
    image_all, text_all = img, text_feat
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        group, rank, world = _distributed.resolve(group)
    if world > 1:
        _distributed.check_backend(img, group)
        _distributed.check_equal_rows(img, "image_feats", group, world)
        mode = "sum" if gather_with_grad else "none"
        image_all = _distributed.all_gather(img, group, rank, world, mode)
        text_all = _distributed.all_gather(text_feat, group, rank, world, mode)
    elif not gather_with_grad:
        image_all, text_all = img.detach(), text_feat.detach()
    targets = torch.arange(rank * b, rank * b + b, device=img.device)
    common = dict(targets=targets, label_smoothing=label_smoothing, reduction="none")
    i2t = itc_rows_loss(img, text_all, logit_scale, **common)
    t2i = itc_rows_loss(text_feat, image_all, logit_scale, **common)
    return reduce_rows(0.5 * (i2t + t2i), reduction)


# ----------------------------------------------------------------------------- ITM negatives

def sample_hard_negatives(queries: torch.Tensor, keys: torch.Tensor, logit_scale, *, targets=None,
                          positive_ids=None, key_ids=None, generator: torch.Generator | None = None,
                          seed: torch.Tensor | None = None) -> torch.Tensor:
    """One negative key per query, drawn from ``softmax_j(logit_scale * S_ij)`` over the keys
    that are not the query's positives (LAVIS's ITM negatives), without the ``[N, M]`` weights.

    ``queries``, ``keys``, ``targets``, ``positive_ids``, ``key_ids`` as in
    :func:`itc_rows_loss` (the same similarity, max over tokens included). The draw is the
    Gumbel-max trick with counter-based noise (``random.py``): ``seed`` (a 0-dim int64 tensor in
    ``[0, 2**31)``) or one drawn from ``generator`` (default: the device's default generator) on
    the device, so there is no host synchronisation; a seed gives the same draws on every
    backend. Returns ``[N]`` int64 indices into ``keys``, -1 for a query whose every key is a
    positive. Not differentiable.
    """
    queries, keys, _ = _under_autocast(queries, keys)
    q = check_features(queries, "queries").detach()
    k = check_features(keys, "keys").detach()
    check.same_dtype(("queries", q), ("keys", k))
    check.same_device(("queries", q), ("keys", k))
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"queries have feature size {q.shape[2]} but keys have {k.shape[2]}")
    n, m = q.shape[0], k.shape[0]
    row_ids, col_ids = _positive_ids(n, m, targets, positive_ids, key_ids, q)
    scale = _scalar_arg(logit_scale, q, "logit_scale").detach()
    if seed is None:
        seed = itc_random.draw_seed(generator, q.device)
    else:
        check.tensor(seed, "seed", 0)
        if seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int64 tensor, got {seed.dtype}")
        seed = seed.to(q.device)
    eligible = paths.eligibility(q, k, teacher=False)
    decision = _choose("itc_negatives", q, shape_class(n, m, q.shape[2] * q.shape[1] * k.shape[1]),
                       eligible)
    if decision.path in (_dispatch.REFERENCE, paths.MATERIALIZED):
        from .reference import negatives_reference
        return negatives_reference(q, k, scale, row_ids, col_ids, seed)
    which = decision.backend if decision.path == _dispatch.KERNEL else decision.path
    with torch.no_grad():
        return itc_negatives(q, k, scale, row_ids, col_ids, seed, which)


def itm_hard_negatives(image_feats: torch.Tensor, text_feat: torch.Tensor, logit_scale, *,
                       image_keys: torch.Tensor | None = None, text_keys: torch.Tensor | None = None,
                       offset: int = 0, ids: torch.Tensor | None = None,
                       key_ids: torch.Tensor | None = None,
                       generator: torch.Generator | None = None):
    """ITM hard negatives of ALBEF / BLIP / BLIP-2: for each image a negative text, for each text
    a negative image, each drawn from the softmax of its similarities with its positives
    excluded (:func:`sample_hard_negatives`, both directions).

    ``image_feats [B, Q, D]`` or ``[B, D]``, ``text_feat [B, D]``: this rank's features;
    ``image_keys`` / ``text_keys``: the candidates (default the local batch; every rank's
    features gathered for BLIP-2), whose row ``offset + i`` pairs with local row ``i``; or
    ``ids`` / ``key_ids`` (``[B]`` / ``[len(keys)]``) for positives by id (BLIP). Returns
    ``(negative text index per image, negative image index per text)``, int64 ``[B]`` each,
    indices into ``text_keys`` / ``image_keys``.
    """
    text_keys = text_feat if text_keys is None else text_keys
    image_keys = image_feats if image_keys is None else image_keys
    b = image_feats.shape[0]
    if ids is None:
        if key_ids is not None:
            raise ValueError("key_ids needs ids (the local rows' ids)")
        targets = torch.arange(offset, offset + b, device=image_feats.device)
        kw = {"targets": targets}
    else:
        kw = {"positive_ids": ids, "key_ids": key_ids}
    neg_text = sample_hard_negatives(image_feats, text_keys, logit_scale, generator=generator, **kw)
    neg_image = sample_hard_negatives(text_feat, image_keys, logit_scale, generator=generator, **kw)
    return neg_text, neg_image
