"""The vision-language contrastive objectives of ALBEF, BLIP and BLIP-2, materialised: the truth the
``itc`` unit's kernels are tested against, and the "as written" code its benchmarks time.

One direction of every objective is :func:`itc_rows_reference`: queries ``q [N, Q, D]`` against keys
``k [M, P, D]`` (``Q = P = 1`` for plain features), similarity ``S_ij = max_{a, b} q_ia . k_jb``
(BLIP-2's max over query tokens), logits ``L = scale * S``, and the cross-entropy of each row of
``L`` against the targets

    T_ij = (1 - eps) * (alpha * softmax_j(tscale * TS_ij) + (1 - alpha) * pos_ij / c_i) + eps / M

where ``TS`` is the same similarity of the teacher (momentum) features, ``pos_ij = (row_ids_i ==
col_ids_j)`` and ``c_i = sum_j pos_ij`` (a row without a positive gives NaN, as the papers' code
does, unless ``alpha == 1``: then the hard targets have no weight and are left out). ``eps`` is label smoothing as ``torch.nn.functional.cross_entropy`` applies it to
probability targets. The per-row loss is ``-sum_j T_ij log_softmax_j(L_ij)``.

The papers' forms (:func:`momentum_itc_reference`, :func:`blip2_itc_reference`,
:func:`itm_negatives_reference`) follow the published training code: ``[B, B + queue]`` (and
``[B, B_global, 32]``) tensors, ``torch.multinomial`` over softmax weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import random as itc_random


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` features as ``[N, 1, D]``; ``[N, T, D]`` as given."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def similarity_reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``S [N, M]``: ``max_{a, b} q[i, a] . k[j, b]`` for ``q [N, Q, D]`` (or ``[N, D]``) and
    ``k [M, P, D]`` (or ``[M, D]``), materialising ``[N, M, Q * P]``; ``max`` picks the first
    maximal ``(a, b)`` in ``a * P + b`` order and its autograd sends the gradient there."""
    q, k = as_tokens(q), as_tokens(k)
    n, qt, d = q.shape
    m, pt, _ = k.shape
    prod = (q.reshape(n * qt, d) @ k.reshape(m * pt, d).T).view(n, qt, m, pt)
    return prod.permute(0, 2, 1, 3).reshape(n, m, qt * pt).max(-1).values


def positives(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """``pos [N, M]`` bool: ``row_ids[i] == col_ids[j]``."""
    return row_ids[:, None] == col_ids[None, :]


def targets_reference(tlogits, pos, *, alpha: float, label_smoothing: float) -> torch.Tensor:
    """``T [N, M]`` of the module docstring from the teacher logits (``None`` when ``alpha == 0``)
    and the positive mask, in the teacher logits' (or the mask's float) dtype."""
    hard = pos.to(tlogits.dtype if tlogits is not None else torch.float64)
    hard = hard / hard.sum(1, keepdim=True)
    if alpha == 1.0:  # pure distillation: the hard targets (NaN for a row without positive) drop out
        t = F.softmax(tlogits, dim=1)
    else:
        t = hard if alpha == 0.0 else alpha * F.softmax(tlogits, dim=1) + (1.0 - alpha) * hard
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / t.shape[1]
    return t


def itc_rows_reference(q, k, scale, row_ids, col_ids, *, teacher_q=None, teacher_k=None,
                       teacher_scale=None, alpha: float = 0.0, label_smoothing: float = 0.0):
    """Per-row cross-entropies ``[N]`` of ``scale * S(q, k)`` against the targets of the module
    docstring, with autograd through ``q``, ``k`` and ``scale`` (the teacher terms are constants).

    ``teacher_k`` defaults to ``k`` and ``teacher_scale`` to ``scale`` (detached)."""
    logits = scale * similarity_reference(q, k)
    tlogits = None
    if alpha != 0.0:
        with torch.no_grad():
            tk = k if teacher_k is None else teacher_k
            ts = scale if teacher_scale is None else teacher_scale
            tlogits = (ts * similarity_reference(teacher_q, tk)).to(logits.dtype)
    t = targets_reference(tlogits, positives(row_ids, col_ids), alpha=alpha,
                          label_smoothing=label_smoothing).to(logits.dtype)
    return -(F.log_softmax(logits, dim=1) * t).sum(1)


def negatives_reference(q, k, scale, row_ids, col_ids, seed: int) -> torch.Tensor:
    """``[N]`` int64: for each row, ``argmax_j (L_ij + G_ij)`` over the non-positive ``j`` (the
    first on ties), ``G = itc_random.gumbel(seed, i, j)``; -1 for a row whose every key is a
    positive. This is a draw from ``softmax_j(L_ij)`` restricted to the negatives (Gumbel-max)."""
    with torch.no_grad():
        logits = (scale * similarity_reference(q, k)).to(torch.float32)
        n, m = logits.shape
        g = itc_random.gumbel(seed, torch.arange(n, device=logits.device)[:, None],
                              torch.arange(m, device=logits.device)[None, :])
        key = (logits + g).masked_fill(positives(row_ids, col_ids), float("-inf"))
        best = key.argmax(1)
        return torch.where(torch.isinf(key.max(1).values), torch.full_like(best, -1), best)


# ----------------------------------------------------------------------------- the papers' code

def momentum_itc_reference(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                           temp, alpha: float, idx=None, idx_queue=None):
    """ALBEF / BLIP ITC with momentum distillation and feature queues, as their code writes it.

    ``image_feat``, ``text_feat`` ``[B, D]`` (online, normalised), ``image_feat_m``,
    ``text_feat_m`` ``[B, D]`` (momentum), ``image_queue``, ``text_queue`` ``[K, D]`` (rows; the
    papers keep them as ``[D, K]``), ``temp`` the temperature (a tensor or float), ``idx`` /
    ``idx_queue`` ``[B]`` / ``[K]`` int64 ids (BLIP retrieval: uniform targets over equal ids),
    else one-hot targets on the diagonal (ALBEF, BLIP pretraining). Returns ``(loss_i2t +
    loss_t2i) / 2``, 0-dim.
    """
    with torch.no_grad():
        image_feat_all = torch.cat([image_feat_m, image_queue], 0)
        text_feat_all = torch.cat([text_feat_m, text_queue], 0)
        if idx is None:
            sim_targets = torch.zeros(image_feat.shape[0], text_feat_all.shape[0],
                                      dtype=image_feat.dtype, device=image_feat.device)
            sim_targets.fill_diagonal_(1)
        else:
            idx_all = torch.cat([idx, idx_queue], 0)
            pos_idx = torch.eq(idx[:, None], idx_all[None, :]).to(image_feat.dtype)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_i2t_m = image_feat_m @ text_feat_all.T / temp
        sim_t2i_m = text_feat_m @ image_feat_all.T / temp
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = image_feat @ text_feat_all.T / temp
    sim_t2i = text_feat @ image_feat_all.T / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def blip2_itc_reference(image_feats, text_feat, image_feats_all, text_feat_all, temp, rank: int,
                        label_smoothing: float = 0.1):
    """BLIP-2's ITC as its code writes it: ``image_feats [B, Q, D]`` (query embeddings),
    ``text_feat [B, D]``, and every rank's features gathered (``[B * W, Q, D]``, ``[B * W, D]``,
    no gradient through the gather); the similarity is the max over the ``Q`` queries, the
    targets ``rank * B + i``. Returns the 0-dim loss."""
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)
    sim_i2t, _ = sim_q2t.max(-1)
    sim_i2t = sim_i2t / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1),
                           image_feats_all.permute(0, 2, 1)).squeeze(-2)
    sim_t2i, _ = sim_t2q.max(-1)
    sim_t2i = sim_t2i / temp
    bs = image_feats.shape[0]
    targets = torch.arange(rank * bs, rank * bs + bs, device=image_feats.device)
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2


def itm_negatives_reference(sim_i2t, sim_t2i, pos_i2t, pos_t2i, generator=None):
    """ITM hard negatives as ALBEF/BLIP/BLIP-2 draw them: ``[B, B_global]`` softmax weights with
    the positives zeroed, one ``torch.multinomial`` draw per row. ``sim_*`` are the scaled
    similarities, ``pos_*`` bool masks. Returns ``(negative text per image, negative image per
    text)``, int64 ``[B]`` each."""
    with torch.no_grad():
        weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(pos_i2t, 0)
        weights_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(pos_t2i, 0)
        neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text, neg_image
