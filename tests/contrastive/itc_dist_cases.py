"""What each rank runs in the multi-process tests of the ALBEF / BLIP / BLIP-2 objectives, and the
single-process float64 values the ranks' results are compared with.

Every rank builds the same global inputs from one seed and takes its rows ``[rank * n, (rank +
1) * n)``. The features lie on a lattice of multiples of 1/8 (and the scale is 4), so every
similarity is exact in float32 whatever the order of the sums: the max over query tokens picks
the same token on every path and in float64 (one query token of one image per rank is a copy of
another, a tie the first token must win), and the hard-negative draws are identical.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmkernels
from mmkernels.contrastive.itc import random as itc_random
from mmkernels.contrastive.itc.reference import blip2_itc_reference, negatives_reference

from .cases import features
from .dist_cases import path_context

SCALE = 4.0
Q = 4
ALPHA = 0.4
BLIP2_SMOOTHING = 0.1  # blip2_itc_loss's default, BLIP-2's value
#: (local_loss, gather_with_grad)
MODES = [(False, False), (False, True), (True, False), (True, True)]
#: name: (positive ids by id, teacher)
VARIANTS = {"ids+teacher": (True, True), "ids": (True, False), "teacher": (False, True)}
NEG_SEED = 1234

# the single-tensor gather's name in newer torch (the older name is deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _lattice(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randint(-4, 5, shape, generator=g).to(torch.float32) / 8


def global_inputs(world: int, n: int, d: int) -> dict:
    """The whole batch: BLIP-2 query features ``tok [W n, Q, D]`` (with a tie on every rank),
    features ``img``, ``txt [W n, D]``, teacher features, ids with repeats across ranks."""
    g = torch.Generator().manual_seed(31)
    tok = _lattice(g, world * n, Q, d)
    for r in range(world):  # image 1 of every rank: query token 3 repeats token 1 exactly
        tok[r * n + 1, 3] = tok[r * n + 1, 1]
    return {"tok": tok, "img": _lattice(g, world * n, d), "txt": _lattice(g, world * n, d),
            "t_img": features(world * n, d, seed=32), "t_txt": features(world * n, d, seed=33),
            "ids": torch.arange(world * n) // 2}


def _rows(rank: int, n: int) -> slice:
    return slice(rank * n, (rank + 1) * n)


def _leaves(*xs):
    return [x.clone().requires_grad_(True) for x in xs] + [torch.tensor(SCALE, requires_grad=True)]


def _result(loss, leaves):
    loss.backward()
    return {"loss": loss.detach().clone(), "img": leaves[0].grad, "txt": leaves[1].grad,
            "scale": leaves[2].grad}


def _gather(x: torch.Tensor, world: int) -> torch.Tensor:
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous())
    return out


def itc_rank(rank: int, world: int, n: int, d: int, paths: list[str]) -> dict:
    """On every path: BLIP-2's ITC with and without the gathered gradient, ``ContrastiveLoss``
    with ids / a teacher in the four modes (and ``ring=True`` refusing ids), the ITM hard
    negatives against every rank's keys."""
    x = global_inputs(world, n, d)
    rows = _rows(rank, n)
    ids = x["ids"][rows].clone()
    out = {}
    for path in paths:
        with path_context(path):
            for gwg in (False, True):
                leaves = _leaves(x["tok"][rows], x["txt"][rows])
                loss = mmkernels.blip2_itc_loss(*leaves, gather_with_grad=gwg)
                out[(path, "blip2", gwg)] = _result(loss, leaves)
            for name, (with_ids, teacher) in VARIANTS.items():
                kw = dict(positive_ids=ids if with_ids else None)
                if teacher:
                    kw.update(teacher_image_features=x["t_img"][rows].clone(),
                              teacher_text_features=x["t_txt"][rows].clone(), alpha=ALPHA)
                for local, gwg in MODES:
                    leaves = _leaves(x["img"][rows], x["txt"][rows])
                    loss_fn = mmkernels.ContrastiveLoss(local, gwg, rank=rank, world_size=world)
                    out[(path, name, (local, gwg))] = _result(loss_fn(*leaves, **kw), leaves)
            leaves = _leaves(x["img"][rows], x["txt"][rows])
            try:
                mmkernels.ContrastiveLoss(True, True, rank=rank, world_size=world, ring=True)(
                    *leaves, positive_ids=ids)
                out[(path, "ring")] = None
            except ValueError as e:
                out[(path, "ring")] = str(e)

            tok, txt = x["tok"][rows].clone(), x["txt"][rows].clone()
            all_tok, all_txt, all_ids = _gather(tok, world), _gather(txt, world), _gather(ids, world)
            scale = torch.tensor(SCALE)
            gen = torch.Generator().manual_seed(NEG_SEED + rank)
            out[(path, "itm")] = mmkernels.itm_hard_negatives(
                tok, txt, scale, image_keys=all_tok, text_keys=all_txt, offset=rank * n, generator=gen)
            gen = torch.Generator().manual_seed(NEG_SEED + rank)
            out[(path, "itm ids")] = mmkernels.itm_hard_negatives(
                tok, txt, scale, image_keys=all_tok, text_keys=all_txt, ids=ids, key_ids=all_ids,
                generator=gen)
            targets = torch.arange(rank * n, rank * n + n)
            seed = torch.tensor(NEG_SEED + 7 * rank)
            out[(path, "seeded")] = (
                mmkernels.sample_hard_negatives(tok, all_txt, scale, targets=targets, seed=seed),
                mmkernels.sample_hard_negatives(txt, all_tok, scale, targets=targets, seed=seed))
    return out


# ----------------------------------------------------------------------------- float64 values

def _f64_leaves(world: int, n: int, x: torch.Tensor) -> list[torch.Tensor]:
    return [x[_rows(r, n)].double().requires_grad_(True) for r in range(world)]


def blip2_expected(world: int, n: int, d: int, gather_with_grad: bool) -> list[dict]:
    """Each rank's BLIP-2 loss (``blip2_itc_reference`` on the gathered features, float64) and the
    gradients of its features and scale: without the gathered gradient, those of its own loss
    with the gathered features constants; with it, the sum over ranks of each rank's loss
    gradient of this rank's rows (the scale's gradient is always the own loss's)."""
    x = global_inputs(world, n, d)
    toks, txts = _f64_leaves(world, n, x["tok"]), _f64_leaves(world, n, x["txt"])
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)

    def rank_loss(s: int, detach: bool):
        all_tok, all_txt = torch.cat(toks), torch.cat(txts)
        if detach:
            all_tok, all_txt = all_tok.detach(), all_txt.detach()
        return blip2_itc_reference(toks[s], txts[s], all_tok, all_txt, 1.0 / scale, s,
                                   label_smoothing=BLIP2_SMOOTHING)
    out = []
    for r in range(world):
        loss = rank_loss(r, detach=True)
        total = sum(rank_loss(s, detach=False) for s in range(world)) if gather_with_grad else loss
        g_tok, g_txt = torch.autograd.grad(total, [toks[r], txts[r]], retain_graph=True)
        (g_scale,) = torch.autograd.grad(loss, [scale])
        out.append({"loss": loss.detach(), "img": g_tok, "txt": g_txt, "scale": g_scale})
    return out


def _direction(q, k, tq, tk, scale, row_ids, col_ids, alpha: float) -> torch.Tensor:
    """Per-row cross-entropy ``[rows]`` of ``scale * q @ k.T`` against ``alpha * softmax(scale *
    tq @ tk.T) + (1 - alpha) * (uniform over the keys with the row's id)``."""
    pos = (row_ids[:, None] == col_ids[None, :]).double()
    targets = pos / pos.sum(1, keepdim=True)
    if alpha:
        targets = alpha * F.softmax(scale.detach() * tq @ tk.T, dim=1) + (1 - alpha) * targets
    return -(targets * F.log_softmax(scale * q @ k.T, dim=1)).sum(1)


def contrastive_expected(world: int, n: int, d: int, variant: str, mode) -> list[dict]:
    """Each rank's loss and gradients of ``ContrastiveLoss(local_loss, gather_with_grad)`` with
    ids / a teacher, float64 on one process. Without ids the positives are the diagonal of the
    global batch. Global modes: the symmetric loss over the gathered batch (every rank the same
    number), the gradient of this rank's rows (times ``W`` with the gathered gradient, as every
    rank's identical loss sends its share). Local modes: rank r's rows against every rank's keys
    (key ids and teacher keys gathered), and with the gathered gradient the sum of every rank's
    loss gradient of this rank's rows."""
    local, gwg = mode
    with_ids, teacher = VARIANTS[variant]
    alpha = ALPHA if teacher else 0.0
    x = global_inputs(world, n, d)
    ids = x["ids"] if with_ids else torch.arange(world * n)
    t_img, t_txt = x["t_img"].double(), x["t_txt"].double()
    out = []
    for r in range(world):
        imgs, txts = _f64_leaves(world, n, x["img"]), _f64_leaves(world, n, x["txt"])
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        all_img, all_txt = torch.cat(imgs), torch.cat(txts)
        if not local:
            loss = 0.5 * (_direction(all_img, all_txt, t_img, t_txt, scale, ids, ids, alpha)
                          + _direction(all_txt, all_img, t_txt, t_img, scale, ids, ids, alpha)).mean()
            total = loss * (world if gwg else 1)
        else:
            def rank_loss(s: int, detach: bool):
                rows = _rows(s, n)
                ki, kt = (all_img.detach(), all_txt.detach()) if detach else (all_img, all_txt)
                return 0.5 * (_direction(imgs[s], kt, t_img[rows], t_txt, scale, ids[rows], ids, alpha)
                              + _direction(txts[s], ki, t_txt[rows], t_img, scale, ids[rows], ids, alpha)
                              ).mean()
            loss = rank_loss(r, detach=not gwg)
            total = sum(rank_loss(s, False) for s in range(world)) if gwg else loss
        g_img, g_txt = torch.autograd.grad(total, [imgs[r], txts[r]], retain_graph=True)
        (g_scale,) = torch.autograd.grad(loss, [scale])
        out.append({"loss": loss.detach(), "img": g_img, "txt": g_txt, "scale": g_scale})
    return out


def negatives_expected(world: int, n: int, d: int, rank: int, seeds, *, by_ids: bool = False):
    """``(negative text per image, negative image per text)`` of rank ``rank`` from
    ``negatives_reference`` on one process: its rows against every rank's, positives the own pairs
    (or equal ids), the seeds ``(seed of the texts, seed of the images)``."""
    x = global_inputs(world, n, d)
    rows = _rows(rank, n)
    if by_ids:
        row_ids, col_ids = x["ids"][rows], x["ids"]
    else:
        row_ids, col_ids = torch.arange(rank * n, rank * n + n), torch.arange(world * n)
    return (negatives_reference(x["tok"][rows], x["txt"], SCALE, row_ids, col_ids, seeds[0]),
            negatives_reference(x["txt"][rows], x["tok"], SCALE, row_ids, col_ids, seeds[1]))


def generator_seeds(rank: int):
    """The two seeds ``itm_hard_negatives`` draws from the generator rank ``rank`` passes."""
    gen = torch.Generator().manual_seed(NEG_SEED + rank)
    return itc_random.draw_seed(gen, torch.device("cpu")), itc_random.draw_seed(gen, torch.device("cpu"))
