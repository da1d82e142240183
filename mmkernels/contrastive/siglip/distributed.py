"""SigLIP's sigmoid loss on many processes (``torch.distributed``), as OpenCLIP's ``SigLipLoss``.

Rank ``r``'s loss is its ``n`` images against its own texts (positives on the diagonal) plus,
as negatives only, every other rank's texts, divided by ``n``; the texts' gradients from every
rank's loss reach their owner. The four ``dist_impl`` of OpenCLIP give the same loss and
gradients and differ in how the texts travel:

* ``"shift"``: around the ring, one neighbour exchange per step, ``W - 1`` steps;
* ``"bidir"``: both ways at once, about ``W / 2`` steps;
* ``"gather"``: one ``all_gather`` (the ``[W n, D]`` texts held at once, one fused call);
* ``"reduce"``: one broadcast per rank (each a collective over all ranks).

``shift`` and ``bidir`` compute the current block while the next is in flight, and hold a fixed
number of blocks whatever the world size; their backward passes the blocks back with the sum of
the gradients every rank computed for them (``_distributed.ring_backward``).
"""
from __future__ import annotations

import torch

from ... import _dispatch, _distributed
from .. import paths as contrastive_paths
from ..api import _check_pair, _choose, _scalar_arg, _under_autocast
from ..ops import stats_dtype
from . import paths
from .api import siglip_rows_auto
from .ops import siglip_grads, siglip_rows

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def ring_steps(dist_impl: str, world_size: int) -> dict[int, int]:
    """``{direction: steps}`` of the neighbour exchanges: ``shift`` takes the ``W - 1`` previous
    ranks' blocks; ``bidir`` takes ``(W - 1) // 2`` from each side plus, for an even ``W``, one
    more from the previous rank (OpenCLIP's order)."""
    if dist_impl == "shift":
        return {1: world_size - 1}
    pairs, rest = divmod(world_size - 1, 2)
    return {1: pairs + rest, -1: pairs}


def _ring_backend(q: torch.Tensor, n: int, m: int) -> str:
    """The dispatch table's choice among the paths behind the registered ops (the kernels,
    ``blockwise``); ``blockwise`` where the reference is forced or nothing else runs."""
    eligible = {contrastive_paths.BLOCKWISE: None,
                paths.MATERIALIZED: "the ring computes block by block"}
    d = _choose("siglip_loss", q, contrastive_paths.shape_class(n, m, q.shape[1]), eligible)
    if d.path == _dispatch.REFERENCE:
        return contrastive_paths.BLOCKWISE
    return d.backend if d.path == _dispatch.KERNEL else d.path


class _RingSigLip(torch.autograd.Function):
    """Sum of every block's row losses ``[n]`` (float32) for this rank's images, the text blocks
    travelling between neighbours."""

    @staticmethod
    def forward(ctx, img, txt, scale, bias, ring: _distributed.Ring, steps: dict, which: str):
        n = img.shape[0]
        own_t = torch.arange(n, device=img.device)
        none_t = torch.full((n,), -1, dtype=torch.int64, device=img.device)
        total = [None]

        def visit(direction, step, block):
            rows = siglip_rows(img, block, scale, bias, own_t if step == 0 else none_t, which)
            total[0] = rows if total[0] is None else total[0] + rows
        last = _distributed.ring_forward(ring, txt, steps, visit)
        ctx.ring, ctx.steps, ctx.which = ring, steps, which
        ctx.save_for_backward(img, txt, scale, bias, *[last[d] for d in steps])
        return total[0]

    @staticmethod
    def backward(ctx, g_rows):
        img, txt, scale, bias, *lasts = ctx.saved_tensors
        ring, steps, which = ctx.ring, ctx.steps, ctx.which
        n = img.shape[0]
        own_t = torch.arange(n, device=img.device)
        none_t = torch.full((n,), -1, dtype=torch.int64, device=img.device)
        g_rows = g_rows.to(stats_dtype(img.dtype)).contiguous()
        sums = {"dq": torch.zeros(img.shape, dtype=torch.float32, device=img.device), "ds": 0.0,
                "db": 0.0}

        def block_grads(step, block):
            dq, dk, ds, db = siglip_grads(img, block, scale, bias, own_t if step == 0 else none_t,
                                          g_rows, which)
            sums["dq"].add_(dq)
            sums["ds"] = sums["ds"] + ds
            sums["db"] = sums["db"] + db
            return dk.float()

        back = _distributed.ring_backward(ring, dict(zip(steps, lasts)), steps,
                                          lambda d, t, block: (block_grads(t, block),))
        d_txt = block_grads(0, txt)
        if back is not None:
            d_txt = d_txt + back
        ds = torch.as_tensor(sums["ds"], dtype=scale.dtype, device=img.device)
        db = torch.as_tensor(sums["db"], dtype=bias.dtype, device=img.device)
        return (sums["dq"].to(img.dtype), d_txt.to(txt.dtype), ds, db, None, None, None)


def distributed_siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                            logit_scale, logit_bias=None, *, dist_impl: str = "bidir", group=None,
                            rank: int | None = None, world_size: int | None = None,
                            reduction: str = "mean") -> torch.Tensor:
    """OpenCLIP ``SigLipLoss(rank, world_size, dist_impl)`` on ``torch.distributed``, fused.

    Args:
        image_features, text_features: this rank's ``[n, D]`` rows (every rank the same ``n``).
        logit_scale, logit_bias: as in :func:`mmkernels.siglip_loss`.
        dist_impl: ``"bidir"``, ``"shift"``, ``"reduce"`` or ``"gather"`` (module docstring).
        group: the process group (default the world); ``rank``/``world_size`` when given must be
            this process's.
        reduction: ``"mean"`` (OpenCLIP's: the sum over this rank's ``n x W n`` terms over
            ``n``), ``"sum"``, or ``"none"`` (``[n]``, each image's sum over all texts).

    Returns this rank's loss; its backward gives this rank's features OpenCLIP's gradients.
    """
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
    from .api import _check_reduction, reduce_rows
    group, rank, world = _distributed.resolve(group, rank, world_size)
    image_features, text_features, loss_dtype = _under_autocast(image_features, text_features)
    _check_pair(image_features, text_features, "image_features", "text_features")
    _check_reduction(reduction)
    n = image_features.shape[0]
    if text_features.shape[0] != n:
        raise ValueError(f"image_features has {n} rows but text_features has "
                         f"{text_features.shape[0]}; each rank needs one text per image")
    _distributed.check_backend(image_features, group)
    _distributed.check_equal_rows(image_features, "image/text", group, world)
    scale = _scalar_arg(logit_scale, image_features, "logit_scale")
    bias = (torch.zeros_like(scale) if logit_bias is None
            else _scalar_arg(logit_bias, image_features, "logit_bias"))

    if dist_impl in ("shift", "bidir"):
        which = _ring_backend(image_features, n, world * n)
        rows = _RingSigLip.apply(image_features, text_features, scale, bias,
                                 _distributed.Ring(group, rank, world), ring_steps(dist_impl, world),
                                 which)
    elif dist_impl == "gather":
        all_txt = _distributed.all_gather(text_features, group, rank, world, "sum")
        targets = torch.arange(n, device=image_features.device) + rank * n
        if reduction != "none":
            total = siglip_rows_auto(image_features, all_txt, scale, bias, targets, total=True)
            return (total / n if reduction == "mean" else total).to(loss_dtype)
        rows = siglip_rows_auto(image_features, all_txt, scale, bias, targets)
    else:  # reduce: rank s's texts reach every rank in turn
        own_t = torch.arange(n, device=image_features.device)
        none_t = torch.full_like(own_t, -1)
        rows = None
        for src in range(world):
            block = _distributed.broadcast(text_features, src, group, rank)
            part = siglip_rows_auto(image_features, block, scale, bias,
                                    own_t if src == rank else none_t)
            rows = part if rows is None else rows + part
    return reduce_rows(rows, reduction, n).to(loss_dtype)
