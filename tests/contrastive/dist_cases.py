"""What each rank runs in the multi-process tests, and the single-process float64 formulas of
OpenCLIP's ClipLoss / SigLipLoss the ranks' results are compared with.

Every rank derives the same global features from one seed and takes its rows
``[rank * n, (rank + 1) * n)``, so the test process can evaluate the whole problem.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.contrastive.siglip.reference import siglip_rows_reference
from mmkernels.testing.peers import open_clip_loss

from .cases import features

SCALE, BIAS = 9.0, -4.0
#: (local_loss, gather_with_grad, ring)
CLIP_MODES = [(False, False, False), (False, True, False), (True, False, False),
              (True, True, False), (True, True, True)]
DIST_IMPLS = ["bidir", "shift", "reduce", "gather"]


def global_features(world: int, n: int, d: int, dtype=torch.float32):
    """``(img, txt)`` of the whole batch ``[world * n, d]``."""
    return features(world * n, d, dtype, seed=11), features(world * n, d, dtype, seed=12)


def _leaves(rank, n, img, txt):
    rows = slice(rank * n, (rank + 1) * n)
    return (img[rows].clone().requires_grad_(True), txt[rows].clone().requires_grad_(True),
            torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True))


def _grads(loss, leaves):
    loss.backward()
    return {"loss": loss.detach().clone(), "img": leaves[0].grad, "txt": leaves[1].grad,
            "scale": leaves[2].grad, "bias": leaves[3].grad}


def path_context(path: str):
    """``auto`` (the dispatch), a forced path of the table, or a forced backend."""
    if path == "auto":
        return contextlib.nullcontext()
    if path in ("cpu", "triton", "reference"):
        return mmkernels.backend(path)
    return mmkernels.use_path(path)


def clip_rank(rank: int, world: int, n: int, d: int, paths: list[str], with_peer: bool):
    """Every ClipLoss mode on every path (and OpenCLIP's own ClipLoss where installed)."""
    img, txt = global_features(world, n, d)
    out = {}
    for path in paths:
        for mode in CLIP_MODES:
            local, gwg, ring = mode
            leaves = _leaves(rank, n, img, txt)
            with path_context(path):
                loss_fn = mmkernels.ContrastiveLoss(local, gwg, rank=rank, world_size=world, ring=ring)
                out[(path, mode)] = _grads(loss_fn(*leaves), leaves)
        with path_context(path):
            for mode in CLIP_MODES:
                leaves = _leaves(rank, n, img, txt)
                _, stats = mmkernels.distributed_contrastive_loss(
                    *leaves, local_loss=mode[0], gather_with_grad=mode[1], ring=mode[2],
                    return_stats=True)
                out[(path, mode, "stats")] = (stats.i2t_accuracy, stats.t2i_accuracy)
    peer = open_clip_loss() if with_peer else None
    if peer is not None:
        for mode in CLIP_MODES[:4]:
            leaves = _leaves(rank, n, img, txt)
            loss_fn = peer.ClipLoss(mode[0], mode[1], rank=rank, world_size=world)
            out[("open_clip", mode)] = _grads(loss_fn(*leaves), leaves)
    return out


def siglip_rank(rank: int, world: int, n: int, d: int, paths: list[str], with_peer: bool):
    """Every SigLipLoss dist_impl on every path (and OpenCLIP's own SigLipLoss where installed)."""
    img, txt = global_features(world, n, d)
    out = {}
    for path in paths:
        for impl in DIST_IMPLS:
            leaves = _leaves(rank, n, img, txt)
            with path_context(path):
                loss_fn = mmkernels.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
                out[(path, impl)] = _grads(loss_fn(*leaves), leaves)
    peer = open_clip_loss() if with_peer else None
    if peer is not None:
        for impl in DIST_IMPLS:
            leaves = _leaves(rank, n, img, txt)
            loss_fn = peer.SigLipLoss(rank=rank, world_size=world, dist_impl=impl)
            out[("open_clip", impl)] = _grads(loss_fn(*leaves), leaves)
    return out


def both_rank(rank: int, world: int, n: int, d: int, clip_paths: list[str],
              siglip_paths: list[str], with_peer: bool):
    """:func:`clip_rank` and :func:`siglip_rank` in one run of the ranks."""
    return {"clip": clip_rank(rank, world, n, d, clip_paths, with_peer),
            "siglip": siglip_rank(rank, world, n, d, siglip_paths, with_peer)}


# ----------------------------------------------------------------------------- float64 formulas

def _f64_leaves(world, n, d):
    img, txt = global_features(world, n, d)
    imgs = [img[r * n:(r + 1) * n].double().requires_grad_(True) for r in range(world)]
    txts = [txt[r * n:(r + 1) * n].double().requires_grad_(True) for r in range(world)]
    return imgs, txts


def _clip_terms(q, k, scale, targets):
    return F.cross_entropy(scale * q @ k.T, targets)


def clip_expected(world: int, n: int, d: int, mode) -> list[dict]:
    """Each rank's loss and gradients under OpenCLIP's ClipLoss(local_loss, gather_with_grad),
    in float64, in one process (the ring computes the local + gathered-gradient mode)."""
    local, gwg, _ = mode
    out = []
    for r in range(world):
        imgs, txts = _f64_leaves(world, n, d)
        scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        all_img, all_txt = torch.cat(imgs), torch.cat(txts)
        if not local:
            if gwg:
                keys_i, keys_t = all_img, all_txt
            else:  # only this rank's rows carry gradients
                keys_i = torch.cat([x if s == r else x.detach() for s, x in enumerate(imgs)])
                keys_t = torch.cat([x if s == r else x.detach() for s, x in enumerate(txts)])
            logits = scale * keys_i @ keys_t.T + bias
            labels = torch.arange(world * n)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            # with the gathered gradient, every rank's identical loss sends this rank its share
            weight = world if gwg else 1
            grads = torch.autograd.grad(loss * weight, [imgs[r], txts[r]], retain_graph=True)
            g_sb = torch.autograd.grad(loss, [scale, bias])
        else:
            labels = torch.arange(n) + r * n

            def rank_loss(s, detach_keys):
                ki = all_img.detach() if detach_keys else all_img
                kt = all_txt.detach() if detach_keys else all_txt
                return (F.cross_entropy(scale * imgs[s] @ kt.T + bias, torch.arange(n) + s * n)
                        + F.cross_entropy(scale * txts[s] @ ki.T + bias, torch.arange(n) + s * n)) / 2
            loss = rank_loss(r, not gwg)
            total = sum(rank_loss(s, False) for s in range(world)) if gwg else loss
            grads = torch.autograd.grad(total, [imgs[r], txts[r]], retain_graph=True)
            g_sb = torch.autograd.grad(loss, [scale, bias])
            del labels
        out.append({"loss": loss.detach(), "img": grads[0], "txt": grads[1],
                    "scale": g_sb[0], "bias": g_sb[1]})
    return out


def siglip_expected(world: int, n: int, d: int) -> list[dict]:
    """Each rank's loss and gradients under OpenCLIP's SigLipLoss (any dist_impl), float64."""
    out = []
    imgs, txts = _f64_leaves(world, n, d)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    own = torch.arange(n)
    none = torch.full((n,), -1)

    def rank_loss(r):
        return sum(siglip_rows_reference(imgs[r], txts[s], scale, bias, own if s == r else none).sum()
                   for s in range(world)) / n
    losses = [rank_loss(r) for r in range(world)]
    total = sum(losses)
    g_txt = torch.autograd.grad(total, txts, retain_graph=True)
    for r in range(world):
        g_img, g_s, g_b = torch.autograd.grad(losses[r], [imgs[r], scale, bias], retain_graph=True)
        out.append({"loss": losses[r].detach(), "img": g_img, "txt": g_txt[r], "scale": g_s,
                    "bias": g_b})
    return out


def clip_expected_accuracy(world: int, n: int, d: int) -> tuple[float, float]:
    """Top-1 accuracy of the global batch (images -> texts, texts -> images)."""
    img, txt = global_features(world, n, d)
    logits = SCALE * img.double() @ txt.double().T
    labels = torch.arange(world * n)
    i2t = (logits.gather(1, labels[:, None])[:, 0] >= logits.amax(1)).double().mean()
    t2i = (logits.gather(0, labels[None, :])[0] >= logits.amax(0)).double().mean()
    return float(i2t), float(t2i)


# ----------------------------------------------------------------------------- memory

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def peak_extra(rank: int, world: int, n: int, d: int) -> dict:
    """Peak resident growth (bytes) of one forward + backward of the local loss with gathered
    gradients, ``{"ring": ..., "gather": ...}``, each after a warm-up call; run with glibc
    returning every allocation of 64 KiB or more to the OS (``MALLOC_MMAP_THRESHOLD_``), so RSS
    follows live tensors."""
    import gc
    g = torch.Generator().manual_seed(100 + rank)
    img = torch.randn(n, d, generator=g)
    txt = torch.randn(n, d, generator=g)
    out = {}
    for name, ring in (("ring", True), ("gather", False)):
        loss_fn = mmkernels.ContrastiveLoss(True, True, rank=rank, world_size=world, ring=ring)

        def step():
            a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
            loss_fn(a, b, 5.0).backward()
        step()
        gc.collect()
        torch.distributed.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        step()
        out[name] = _status("VmHWM") - base
        torch.distributed.barrier()
    return out
