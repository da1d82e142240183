"""The CLIP loss on many processes (``torch.distributed``): OpenCLIP ``ClipLoss``'s four modes and a
ring.

Every rank holds its ``n`` image and text rows; row ``i`` of rank ``r`` is global pair
``r * n + i``. With ``W`` ranks:

* ``local_loss=False``: each rank computes the loss of the whole ``W n x W n`` problem (the same
  number on every rank) from the gathered features, with the fused op (no logits are held).
  ``gather_with_grad=False`` gives this rank's features the gradient of their own rows and
  columns; ``True`` sums every rank's gradient through the gather's backward (``W`` times that).
* ``local_loss=True``: rank ``r``'s loss is its ``n`` images against all ``W n`` texts and its
  ``n`` texts against all images, targets ``r * n + i`` (two one-direction InfoNCE calls).
  ``gather_with_grad=True`` adds, through the gather's backward, the gradient other ranks' losses
  send to this rank's features as keys (OpenCLIP's only mode that scales); ``False`` keeps only
  the query gradient.
* ``ring=True`` (with ``local_loss`` and ``gather_with_grad``): the same loss and gradients,
  without ever holding the gathered features: the ``[img; txt]`` blocks of the other ranks pass
  from neighbour to neighbour while the current block is computed; the backward passes them back
  with the sum of the key gradients every rank computed for them. Per-rank memory is independent
  of the world size.

The retrieval accuracies are those of the global batch (an ``all_reduce`` of the counts).
"""
from __future__ import annotations

import torch

from .. import _dispatch, _distributed
from . import paths, reference
from .api import (ContrastiveStats, _check_options, _check_pair, _choose, _scalar_arg,
                  _under_autocast, contrastive_loss)
from .epilogue import cross_entropy, shift
from .ops import contrastive_grads, contrastive_stats, stats_dtype


def _kernel_which(q: torch.Tensor, op: str, n: int, m: int) -> str:
    """The backend of the statistics ops for a ring step: the dispatch table's choice among the
    paths that produce statistics (the kernels or ``blockwise``; ``blockwise``, plain torch ops,
    where the reference is forced or nothing else can run)."""
    eligible = {paths.BLOCKWISE: None, paths.MATERIALIZED: "the ring needs the statistics"}
    d = _choose(op, q, paths.shape_class(n, m, q.shape[1]), eligible)
    if d.path == _dispatch.REFERENCE:
        return paths.BLOCKWISE
    return d.backend if d.path == _dispatch.KERNEL else d.path


def _one_direction(q, k, scale, targets, *, label_smoothing: float, want_acc: bool):
    """Per-row cross-entropy ``[n]`` of ``scale * q @ k.T`` with ``targets``, and the number of
    rows whose target is a maximum (a float32 0-dim tensor, or None)."""
    n, m = q.shape[0], k.shape[0]
    eligible = paths.eligibility(q, k, symmetric=False)
    decision = _choose("infonce_loss", q, paths.shape_class(n, m, q.shape[1]), eligible)
    if decision.path in (_dispatch.REFERENCE, paths.MATERIALIZED):
        per_row = paths.materialized_infonce(q, k, scale, targets=targets,
                                             label_smoothing=label_smoothing, reduction="none")
        correct = None
        if want_acc:
            with torch.no_grad():
                logits = scale.to(q.dtype) * q @ k.T
                correct = reference.top1(logits, targets, 1) * n
        return per_row, correct
    which = decision.backend if decision.path == _dispatch.KERNEL else decision.path
    row_logsum, row_max, row_sum, pos, _, _, _ = contrastive_stats(q, k, scale, targets, False, which)
    per_row = cross_entropy(row_logsum, row_max, row_sum, pos, m, label_smoothing)
    correct = None
    if want_acc:
        with torch.no_grad():
            correct = (pos >= row_max).to(torch.float32).sum()
    return per_row, correct


def merge_row_stats(a, b, count_a: int, count_b: int):
    """``(logsum, max, ssum)`` of the union of two column sets from each one's statistics
    (``ops.contrastive_stats``: relative to their own maxima; ``count_*`` columns each), moved
    to the shared max without forming a log-sum-exp."""
    (la, ma, sa), (lb, mb, sb) = a, b
    m = torch.maximum(ma, mb)
    s, da, db = shift(m), shift(ma), shift(mb)
    da, db = da - s, db - s
    return torch.logaddexp(la + da, lb + db), m, sa + count_a * da + sb + count_b * db


class _RingStats(torch.autograd.Function):
    """Row statistics of this rank's images against every rank's texts and of its texts against
    every rank's images, the blocks travelling around the ring (see ``_distributed.ring_forward``).

    Returns ``(logsum_i, max_i, sum_i, pos_i, logsum_t, max_t, sum_t, pos_t)``, each ``[n]``
    float32, as ``ops.contrastive_stats`` defines them (relative to the row max); the maxima are
    not differentiable.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, ring: _distributed.Ring, which: str):
        n = img.shape[0]
        sd = stats_dtype(img.dtype)
        targets = torch.arange(n, device=img.device)
        acc = {}

        def visit(direction, step, block):
            for side, (q, k) in (("i", (img, block[n:])), ("t", (txt, block[:n]))):
                ls, mx, sm, pos, _, _, _ = contrastive_stats(q, k, scale, targets, False, which)
                if step == 0:
                    acc[side] = [ls, mx, sm, pos]
                else:
                    a = acc[side]
                    a[0], a[1], a[2] = merge_row_stats(a[:3], (ls, mx, sm), step * n, n)
        last = _distributed.ring_forward(ring, torch.cat([img, txt]), {1: ring.size - 1}, visit,
                                         block_is_scratch=True)
        ctx.ring, ctx.which = ring, which
        ctx.save_for_backward(img, txt, scale, acc["i"][0], acc["i"][1], acc["t"][0],
                              acc["t"][1], last[1])
        ctx.mark_non_differentiable(acc["i"][1], acc["t"][1])
        ctx.set_materialize_grads(False)
        return (*[v.to(sd) for v in acc["i"]], *[v.to(sd) for v in acc["t"]])

    @staticmethod
    def backward(ctx, g_lse_i, _gm_i, g_sum_i, g_pos_i, g_lse_t, _gm_t, g_sum_t, g_pos_t):
        img, txt, scale, lse_i, max_i, lse_t, max_t, last = ctx.saved_tensors
        ring, which = ctx.ring, ctx.which
        n = img.shape[0]
        targets = torch.arange(n, device=img.device)
        empty = lse_i.new_empty(0)

        def filled(g):
            return torch.zeros_like(lse_i) if g is None else g.to(lse_i.dtype)
        g = {"i": (max_i, lse_i, filled(g_lse_i), filled(g_sum_i), filled(g_pos_i)),
             "t": (max_t, lse_t, filled(g_lse_t), filled(g_sum_t), filled(g_pos_t))}
        zeros = torch.zeros_like(lse_i)
        dq = {"i": torch.zeros(img.shape, dtype=torch.float32, device=img.device),
              "t": torch.zeros(txt.shape, dtype=torch.float32, device=txt.device)}
        dscale = torch.zeros((), dtype=lse_i.dtype, device=img.device)

        def block_grads(step, k_img, k_txt):
            """This rank's gradients for one block of keys: adds dq and dscale, returns the
            keys' gradients ``(d k_img, d k_txt)``."""
            nonlocal dscale
            dks = {}
            for side, (q, k) in (("i", (img, k_txt)), ("t", (txt, k_img))):
                mx, ls, gl, gs, gp = g[side]
                dq_s, dk_s, ds_s = contrastive_grads(q, k, scale, targets, mx, ls, empty, empty,
                                                     gl, gs, gp if step == 0 else zeros, empty,
                                                     empty, which)
                dq[side].add_(dq_s)
                dks[side] = dk_s.float()
                dscale = dscale + ds_s
            return dks["t"], dks["i"]

        back = _distributed.ring_backward(
            ring, {1: last}, {1: ring.size - 1},
            lambda d, t, block: block_grads(t, block[:n], block[n:]))
        d_img, d_txt = block_grads(0, img, txt)
        d_img = d_img.add_(dq["i"])
        d_txt = d_txt.add_(dq["t"])
        if back is not None:
            d_img.add_(back[:n])
            d_txt.add_(back[n:])
        return d_img.to(img.dtype), d_txt.to(txt.dtype), dscale.to(scale.dtype), None, None


def _itc_distributed(img, txt, scale, bias, ids, t_img, t_txt, alpha, local_loss, gather_with_grad,
                     group, rank, world, label_smoothing, reduction, return_stats, loss_dtype):
    """The modes of :func:`distributed_contrastive_loss` with positive ids and / or a teacher:
    ids and teacher features gathered without gradient, the losses from the ``itc`` unit."""
    from .itc.api import check_ids, itc_rows_loss
    if return_stats:
        raise ValueError("return_stats is not available with positive_ids or a teacher")
    if alpha != 0.0 and (t_img is None or t_txt is None):
        raise ValueError("alpha > 0 distils from a teacher: pass teacher_image_features and "
                         "teacher_text_features")
    n = img.shape[0]
    gather = lambda x, grad="none": None if x is None else _distributed.all_gather(x, group, rank, world, grad)
    if ids is not None:
        check_ids(ids, "positive_ids", n, img)
    t_img = None if alpha == 0.0 else t_img.to(img.dtype).detach()
    t_txt = None if alpha == 0.0 else t_txt.to(img.dtype).detach()
    all_ids, all_t_img, all_t_txt = gather(ids), gather(t_img), gather(t_txt)
    targets = None if ids is not None else torch.arange(n, device=img.device) + rank * n
    if not local_loss:
        grad = "sum" if gather_with_grad else "local"
        loss = contrastive_loss(gather(img, grad), gather(txt, grad), scale, bias,
                                label_smoothing=label_smoothing, reduction=reduction,
                                positive_ids=(all_ids if ids is not None
                                              else torch.arange(world * n, device=img.device)),
                                teacher_image_features=all_t_img, teacher_text_features=all_t_txt,
                                alpha=alpha)
        return loss.to(loss_dtype)
    grad = "sum" if gather_with_grad else "none"
    all_img, all_txt = gather(img, grad), gather(txt, grad)
    common = dict(targets=targets, positive_ids=ids, key_ids=all_ids, alpha=alpha,
                  label_smoothing=label_smoothing, reduction="none")
    per_i = itc_rows_loss(img, all_txt, scale, teacher_queries=t_img, teacher_keys=all_t_txt, **common)
    per_t = itc_rows_loss(txt, all_img, scale, teacher_queries=t_txt, teacher_keys=all_t_img, **common)
    loss = reference.reduce(0.5 * (per_i + per_t), reduction)
    if bias is not None:
        loss = loss + bias * 0
    return loss.to(loss_dtype)


def distributed_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                                 logit_scale, logit_bias=None, *, local_loss: bool = False,
                                 gather_with_grad: bool = False, ring: bool = False, group=None,
                                 rank: int | None = None, world_size: int | None = None,
                                 label_smoothing: float = 0.0, reduction: str = "mean",
                                 return_stats: bool = False, positive_ids=None,
                                 teacher_image_features=None, teacher_text_features=None,
                                 alpha: float = 0.0):
    """OpenCLIP ``ClipLoss(local_loss, gather_with_grad)`` on ``torch.distributed``, fused.

    Args:
        image_features, text_features: this rank's ``[n, D]`` rows (float32/bfloat16/float16;
            every rank the same ``n``), row i of each a pair.
        logit_scale, logit_bias: as in :func:`mmkernels.contrastive_loss` (the bias cancels in
            every softmax: its gradient is 0).
        local_loss, gather_with_grad: OpenCLIP's modes (module docstring).
        ring: pass the blocks around the ranks instead of gathering them (needs ``local_loss``
            and ``gather_with_grad``: it computes exactly that mode).
        group: the process group (default the world); ``rank``/``world_size`` when given must be
            this process's.
        label_smoothing, reduction: as in :func:`mmkernels.contrastive_loss`; ``"none"`` gives
            ``[W n]`` pairs (global modes) or this rank's ``[n]`` (local modes).
        return_stats: also return ``ContrastiveStats`` of the global batch.
        positive_ids, teacher_image_features, teacher_text_features, alpha: this rank's ``[n]``
            ids and ``[n, D]`` momentum features, as in :func:`mmkernels.contrastive_loss`;
            they are gathered (no gradient) with the features, so the targets are those of the
            global batch, in every mode but ``ring`` (and without ``return_stats``).

    This rank's loss (the number OpenCLIP's ``ClipLoss`` returns on it), whose backward gives this
    rank's features exactly OpenCLIP's gradients.
    """
    group, rank, world = _distributed.resolve(group, rank, world_size)
    image_features, text_features, loss_dtype = _under_autocast(image_features, text_features)
    _check_pair(image_features, text_features, "image_features", "text_features")
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image_features has {image_features.shape[0]} rows but text_features has "
                         f"{text_features.shape[0]}; each rank needs one text per image")
    _check_options(label_smoothing, reduction)
    if ring and not (local_loss and gather_with_grad):
        raise ValueError("ring=True computes the local loss with gathered gradients: pass "
                         "local_loss=True and gather_with_grad=True")
    _distributed.check_backend(image_features, group)
    _distributed.check_equal_rows(image_features, "image/text", group, world)
    scale = _scalar_arg(logit_scale, image_features, "logit_scale")
    bias = None if logit_bias is None else _scalar_arg(logit_bias, image_features, "logit_bias")
    n = image_features.shape[0]
    if positive_ids is not None or alpha != 0.0:
        if ring:
            raise ValueError("ring=True does not take positive_ids or a teacher; use "
                             "ring=False (the gathered local loss computes the same)")
        return _itc_distributed(image_features, text_features, scale, bias, positive_ids,
                                teacher_image_features, teacher_text_features, alpha, local_loss,
                                gather_with_grad, group, rank, world, label_smoothing, reduction,
                                return_stats, loss_dtype)

    if not local_loss:
        grad = "sum" if gather_with_grad else "local"
        all_img = _distributed.all_gather(image_features, group, rank, world, grad)
        all_txt = _distributed.all_gather(text_features, group, rank, world, grad)
        return contrastive_loss(all_img, all_txt, scale, bias, label_smoothing=label_smoothing,
                                reduction=reduction, return_stats=return_stats)

    targets = torch.arange(n, device=image_features.device) + rank * n
    if ring:
        which = _kernel_which(image_features, "infonce_loss", n, world * n)
        lse_i, max_i, sum_i, pos_i, lse_t, max_t, sum_t, pos_t = _RingStats.apply(
            image_features, text_features, scale, _distributed.Ring(group, rank, world), which)
        per_i = cross_entropy(lse_i, max_i, sum_i, pos_i, world * n, label_smoothing)
        per_t = cross_entropy(lse_t, max_t, sum_t, pos_t, world * n, label_smoothing)
        if return_stats:
            with torch.no_grad():
                counts = torch.stack([(pos_i >= max_i).float().sum(), (pos_t >= max_t).float().sum()])
    else:
        grad = "sum" if gather_with_grad else "none"
        all_img = _distributed.all_gather(image_features, group, rank, world, grad)
        all_txt = _distributed.all_gather(text_features, group, rank, world, grad)
        per_i, c_i = _one_direction(image_features, all_txt, scale, targets,
                                    label_smoothing=label_smoothing, want_acc=return_stats)
        per_t, c_t = _one_direction(text_features, all_img, scale, targets,
                                    label_smoothing=label_smoothing, want_acc=return_stats)
        if return_stats:
            counts = torch.stack([c_i.float(), c_t.float()])
    loss = reference.reduce(0.5 * (per_i + per_t), reduction)
    if bias is not None:
        loss = loss + bias * 0  # cancels in each softmax: gradient 0, NaN where the logits would be
    loss = loss.to(loss_dtype)
    if not return_stats:
        return loss
    import torch.distributed as dist
    dist.all_reduce(counts, group=group)
    counts = counts / (world * n)
    return loss, ContrastiveStats(counts[0], counts[1])
