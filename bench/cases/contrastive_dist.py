"""Distributed CLIP, one rank's work: OpenCLIP's local loss at world size W, on one device.

With ``ClipLoss(local_loss=True, gather_with_grad=True)`` each of W ranks computes, for its local
batch of n pairs against the features gathered from every rank (``[W*n, D]``),

    loss = (CE(s * img_local @ all_txt.T, t) + CE(s * txt_local @ all_img.T, t)) / 2,
    t = arange(n) + rank * n,

and the gathered features receive gradients (``torch.distributed.nn.all_gather``'s backward sends
them back to their ranks). Op ``clip_local_loss`` times that per-rank computation on one process,
without the collectives: the four feature tensors are leaves (the rank's block of the gathered
tensors holds the local rows' values) and all four, with ``logit_scale``, receive gradients.
Shape keys ``n`` (local batch), ``W`` (world size) and ``D``; ``rank`` = 1.

Providers:

* ``mmkernels``: ``(mmkernels.infonce_loss(img_local, all_txt, s, targets=t) +
  mmkernels.infonce_loss(txt_local, all_img, s, targets=t)) / 2`` (backend auto), and
  ``mmkernels:kernel`` / ``mmkernels:blockwise`` / ``mmkernels:materialized`` with the path forced.
* ``open_clip``: open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)``
  run as is, with its module's ``gather_features`` standing in for the all-gather by returning the
  gathered inputs (materialises two n x W*n logits).
* ``reference``: the formula above in eager PyTorch.

The figure of interest is the per-rank extra memory against open_clip's (the target: mmkernels at
most 2% of open_clip's at n = 4096, W = 8, D = 768).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import FORCED_PATHS, mm
from bench.cases.common import elem_size, missing
from bench.cases.contrastive import LOGIT_SCALE, _unit_rows
from bench.cases.siglip import grid, with_paths
from bench.harness import Case, Provider

FAMILY = "contrastive_dist"
OP = "clip_local_loss"
RANK = 1  # the rank whose work is timed (a non-zero offset of the targets)

# Shapes and dtypes per (device kind, profile). Target: n = 4096, W = 8, D = 768.
GPU_SIZES = {
    "full": {"n": [4096], "W": [8, 64], "D": [768]},
    "quick": {"n": [4096], "W": [8], "D": [768]},
    "pytest": {"n": [128], "W": [8, 64], "D": [256]},
}
CPU_SIZES = {
    "full": {"n": [512], "W": [8, 64], "D": [768]},
    "quick": {"n": [256], "W": [8, 64], "D": [768]},
    "pytest": {"n": [16], "W": [8, 64], "D": [64]},
}
GPU_DTYPES = {"full": ("bfloat16", "float32"), "quick": ("bfloat16", "float32"), "pytest": ("bfloat16", "float32")}
CPU_DTYPES = {"full": ("float32", "bfloat16"), "quick": ("float32", "bfloat16"), "pytest": ("float32",)}


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def make_inputs(case: Case) -> dict:
    n, W, D = case.shape["n"], case.shape["W"], case.shape["D"]
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    all_img = _unit_rows(W * n, D, g, case.device)
    all_txt = _unit_rows(W * n, D, g, case.device, base=all_img)  # every rank's pairs correlated
    mine = slice(RANK * n, (RANK + 1) * n)
    dt = case.torch_dtype
    return {
        "image_features": all_img[mine].to(dt).requires_grad_(),
        "text_features": all_txt[mine].to(dt).requires_grad_(),
        "all_image_features": all_img.to(dt).requires_grad_(),
        "all_text_features": all_txt.to(dt).requires_grad_(),
        "logit_scale": torch.tensor(LOGIT_SCALE, device=case.device, dtype=torch.float32, requires_grad=True),
        "targets": torch.arange(n, device=case.device) + RANK * n,  # built once, as cache_labels=True does
        "rank": RANK,
    }


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------


def local_reference(image_features, text_features, all_image_features, all_text_features, logit_scale,
                    targets, rank):
    """OpenCLIP's local loss written out (two n x W*n logits, two cross-entropies)."""
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + rank * n
    logits_per_image = logit_scale * image_features @ all_text_features.T
    logits_per_text = logit_scale * text_features @ all_image_features.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def local_mmkernels(image_features, text_features, all_image_features, all_text_features, logit_scale,
                    targets, rank):
    import mmkernels

    i2t = mmkernels.infonce_loss(image_features, all_text_features, logit_scale, targets=targets)
    t2i = mmkernels.infonce_loss(text_features, all_image_features, logit_scale, targets=targets)
    return (i2t + t2i) / 2


_LOSSES: dict = {}


def _open_clip_loss():
    from mmkernels.testing.peers import open_clip_loss

    return open_clip_loss()


@contextlib.contextmanager
def gathered(mod, all_image_features, all_text_features):
    """``mod.gather_features`` returns the given gathered features inside the block (one process
    stands in for the all-gather with gradients); restored after it."""
    original = mod.gather_features

    def gather_features(*args, **kwargs):
        return all_image_features, all_text_features

    mod.gather_features = gather_features
    try:
        yield
    finally:
        mod.gather_features = original


def local_open_clip(image_features, text_features, all_image_features, all_text_features, logit_scale,
                    targets, rank):
    mod = _open_clip_loss()
    world = all_image_features.shape[0] // image_features.shape[0]
    key = (rank, world)
    if key not in _LOSSES:
        _LOSSES[key] = mod.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    with gathered(mod, all_image_features, all_text_features):
        return _LOSSES[key](image_features, text_features, logit_scale)


# --------------------------------------------------------------------------
# Availability checks and memory estimates
# --------------------------------------------------------------------------


def check_mmkernels(case: Case) -> Optional[str]:
    return missing("mmkernels", "infonce_loss")


def check_open_clip(case: Case) -> Optional[str]:
    mod = _open_clip_loss()
    if mod is None:
        return "open_clip is not installed (mmkernels.testing.peers.open_clip_loss() is None)"
    if not hasattr(mod, "gather_features"):
        return "open_clip's loss module has no gather_features to stand in for"
    return None


def est_dense(case: Case) -> int:
    """Per direction the n x W*n product (kept for logit_scale's gradient), the log-softmax output
    and, in backward, their gradients: about 3 n x W*n matrices per direction, two directions."""
    n, W, D = case.shape["n"], case.shape["W"], case.shape["D"]
    e = elem_size(case)
    return 6 * n * W * n * e + 2 * (n + W * n) * D * e


def est_tiled(case: Case) -> int:
    """O((n + W*n) * D): fp32 gradient accumulators of both directions and per-row statistics."""
    n, W, D = case.shape["n"], case.shape["W"], case.shape["D"]
    return 2 * (6 * (n + W * n) * D * 4 + 64 * (n + W * n))


PROVIDERS = (
    Provider("mmkernels", local_mmkernels, check=check_mmkernels, mem_estimate=est_tiled,
             note="(mmkernels.infonce_loss(img, all_txt, s, targets=t) + infonce_loss(txt, all_img, s, targets=t)) / 2, "
                  "t = arange(n) + rank*n (backend auto)"),
    Provider("open_clip", local_open_clip, check=check_open_clip, mem_estimate=est_dense,
             note="open_clip loss.ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size), its "
                  "gather_features returning the gathered inputs (one process; two n x W*n logits)"),
    Provider("reference", local_reference, mem_estimate=est_dense,
             note="(CE(s * img @ all_txt.T, t) + CE(s * txt @ all_img.T, t)) / 2 in eager PyTorch"),
)


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def local_case(n: int, W: int, D: int, dtype: str, device: str) -> Case:
    case = Case(
        family=FAMILY,
        op=OP,
        shape={"n": n, "W": W, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_inputs,
        providers=PROVIDERS,
        flops=16.0 * W * n * n * D,
        flops_formula="16*W*n^2*D",
        x="W",
    )
    return with_paths(case, FORCED_PATHS["infonce_loss"], {"materialized": est_dense})


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    sizes = grid(GPU_SIZES if gpu else CPU_SIZES, profile, overrides)
    if sizes is None:
        return []
    dtypes = (GPU_DTYPES if gpu else CPU_DTYPES)[profile]
    out = [local_case(n, W, D, dt, device)
           for dt in dtypes for D in sizes["D"] for n in sizes["n"] for W in sizes["W"] if W > RANK]
    probes = [p for dt in dtypes for p in mm.probes_for(device, profile, sorted(set(sizes["D"])), dt)]
    return probes + out


def notes(device: str, profile: str) -> list:
    lines = [
        "contrastive_dist: one rank's work in OpenCLIP's distributed CLIP loss (local_loss=True, gather_with_grad=True) "
        "at world size W on one device, no collectives: the local n pairs against the W*n gathered features, "
        "forward + backward with gradients for the local and the gathered features and logit_scale; FLOPs "
        "16*W*n^2*D (two directions of 8*n*(W*n)*D). Compare the extra memory with open_clip's (target at n = 4096, "
        "W = 8, D = 768: mmkernels at most 2% of open_clip's).",
    ]
    if device.startswith("cuda"):
        lines.append("contrastive_dist: GPU run at n = 4096, W in {8, 64}, D = 768, bf16 and fp32.")
    else:
        c = CPU_SIZES.get(profile, CPU_SIZES["full"])
        lines.append(f"contrastive_dist: CPU run at n = {c['n']}, W in {c['W']}, D = {c['D']}; the GPU cases use n = 4096 "
                     "(on CPU: --size n=4096 --size W=8).")
    return lines
