"""Contrastive family: CLIP symmetric InfoNCE and one-directional InfoNCE.

Every case times forward + backward (``loss.backward()``) with gradients for
both feature matrices and the learnable ``logit_scale``.

Providers of ``contrastive_loss``:

* ``mmkernels``: ``mmkernels.contrastive_loss`` (tiled; O(N*D) memory).
* ``reference``: eager PyTorch, computed exactly as OpenCLIP's ``ClipLoss``
  does on one process (two N x N logits matrices, two cross-entropies).
* ``open_clip``: ``open_clip.loss.ClipLoss()`` when ``import open_clip`` works.
* ``inf_cl``: ``inf_cl.cal_inf_loss`` in both directions, CUDA only (Triton),
  when importable. It computes in fp32 whatever the input dtype.

Providers of ``infonce_loss`` (N queries against M keys, positives on the
diagonal): ``mmkernels`` (``mmkernels.infonce_loss``) and ``reference``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import mm
from bench.cases.common import elem_size, missing
from bench.harness import Case, Provider

FAMILY = "contrastive"
LOGIT_SCALE = 1.0 / 0.07  # CLIP's initial temperature, as a learnable 0-dim tensor

# Shapes per (device kind, profile). GPU: bf16; CPU: fp32.
GPU_SIZES = {
    "full": {"N": [4096, 16384, 32768, 65536, 262144], "D": [512, 768, 1024]},
    "quick": {"N": [4096, 32768], "D": [768]},  # target: N=32768, D=768
    "pytest": {"N": [256, 1024], "D": [256]},
}
CPU_SIZES = {
    "full": {"N": [2048, 4096, 8192], "D": [512]},  # target: N=8192, D=512
    "quick": {"N": [1024, 4096], "D": [512]},
    "pytest": {"N": [128, 512], "D": [64]},
}
# infonce: N queries against M keys (ALBEF/BLIP queues, ImageBind); not in --quick
GPU_INFONCE = {"full": {"N": [4096], "M": [16384, 65536, 262144], "D": [768]}, "pytest": {"N": [256], "M": [1024], "D": [256]}}
CPU_INFONCE = {"full": {"N": [1024], "M": [4096, 16384], "D": [512]}, "pytest": {"N": [128], "M": [512], "D": [64]}}


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _unit_rows(n: int, d: int, g: torch.Generator, device: str, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, device=device).mul_(d**-0.5)
    if base is not None:  # correlate the positive pairs (cosine ~0.7), as trained embeddings are
        k = min(n, base.shape[0])
        x[:k].add_(base[:k])
    return F.normalize(x, dim=-1)


def _make_features(case: Case, names: tuple) -> dict:
    N, D = case.shape["N"], case.shape["D"]
    M = case.shape.get("M", N)
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    a = _unit_rows(N, D, g, case.device)
    b = _unit_rows(M, D, g, case.device, base=a)
    dt = case.torch_dtype
    return {
        names[0]: a.to(dt).requires_grad_(),
        names[1]: b.to(dt).requires_grad_(),
        "logit_scale": torch.tensor(LOGIT_SCALE, device=case.device, dtype=torch.float32, requires_grad=True),
    }


def make_clip_inputs(case: Case) -> dict:
    return _make_features(case, ("image_features", "text_features"))


def make_infonce_inputs(case: Case) -> dict:
    return _make_features(case, ("queries", "keys"))


# --------------------------------------------------------------------------
# Providers: contrastive_loss
# --------------------------------------------------------------------------


def clip_reference(image_features, text_features, logit_scale):
    """OpenCLIP ``ClipLoss`` on one process, in eager PyTorch."""
    labels = torch.arange(image_features.shape[0], device=image_features.device, dtype=torch.long)
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_mmkernels(image_features, text_features, logit_scale):
    import mmkernels

    return mmkernels.contrastive_loss(image_features, text_features, logit_scale)


_OPEN_CLIP_LOSS: dict = {}


def clip_open_clip(image_features, text_features, logit_scale):
    if "loss" not in _OPEN_CLIP_LOSS:
        from mmkernels.testing.peers import open_clip_loss

        _OPEN_CLIP_LOSS["loss"] = open_clip_loss().ClipLoss()
    return _OPEN_CLIP_LOSS["loss"](image_features, text_features, logit_scale)


def clip_inf_cl(image_features, text_features, logit_scale):
    # cal_inf_loss(q, k, scale=s) computes `s * q` and passes it to its kernels;
    # but it first wraps `s` in a GradientGather whose backward calls
    # dist.all_reduce, which raises without an initialised process group. On one
    # process that all_reduce is the identity, so scaling q here is the same
    # computation and gives logit_scale its gradient through autograd.
    from inf_cl import cal_inf_loss

    i2t = cal_inf_loss(logit_scale * image_features, text_features)
    t2i = cal_inf_loss(logit_scale * text_features, image_features)
    return (i2t + t2i) / 2


# --------------------------------------------------------------------------
# Providers: infonce_loss
# --------------------------------------------------------------------------


def infonce_reference(queries, keys, logit_scale):
    labels = torch.arange(queries.shape[0], device=queries.device, dtype=torch.long)
    return F.cross_entropy(logit_scale * queries @ keys.T, labels)


def infonce_mmkernels(queries, keys, logit_scale):
    import mmkernels

    return mmkernels.infonce_loss(queries, keys, logit_scale)


# --------------------------------------------------------------------------
# Availability checks and memory estimates
# --------------------------------------------------------------------------


def check_mmkernels(attr: str, case: Case) -> Optional[str]:
    return missing("mmkernels", attr)


def check_open_clip(case: Case) -> Optional[str]:
    """open_clip's loss.py, loaded without the package import (which needs torchvision)."""
    from mmkernels.testing.peers import open_clip_loss

    return None if open_clip_loss() is not None else "open_clip is not installed"


def check_inf_cl(case: Case) -> Optional[str]:
    if not case.device.startswith("cuda"):
        return "inf_cl runs Triton kernels on CUDA only"
    if case.shape["D"] % 256:
        return "inf_cl needs D divisible by its head_dim (256)"
    return missing("inf_cl")


def est_dense(directions: int, case: Case) -> int:
    """Eager logits: per direction the N x M logits, the log-softmax output kept
    for backward, and in backward its gradient and the logits' gradient (so up to
    3 N x M matrices per direction live at once), plus scaled feature copies."""
    N, D = case.shape["N"], case.shape["D"]
    M = case.shape.get("M", N)
    e = elem_size(case)
    return 3 * directions * N * M * e + 2 * (N + M) * D * e


def est_tiled(case: Case) -> int:
    """O((N+M)*D): fp32 gradient accumulators and per-row statistics."""
    N, D = case.shape["N"], case.shape["D"]
    M = case.shape.get("M", N)
    return 6 * (N + M) * D * 4 + 64 * (N + M)


def est_inf_cl(case: Case) -> int:
    """inf_cl upcasts q and k to fp32 in each direction and returns fp32 grads."""
    N, D = case.shape["N"], case.shape["D"]
    return 16 * N * D * 4 + 64 * N


CLIP_PROVIDERS = (
    Provider(
        "mmkernels",
        clip_mmkernels,
        check=functools.partial(check_mmkernels, "contrastive_loss"),
        mem_estimate=est_tiled,
        note="mmkernels.contrastive_loss",
    ),
    Provider(
        "reference",
        clip_reference,
        mem_estimate=functools.partial(est_dense, 2),
        note="eager PyTorch as OpenCLIP ClipLoss computes it on one process (materialises two N x N logits)",
    ),
    Provider(
        "open_clip",
        clip_open_clip,
        check=check_open_clip,
        mem_estimate=functools.partial(est_dense, 2),
        note="open_clip.loss.ClipLoss() (default arguments, one process)",
    ),
    Provider(
        "inf_cl",
        clip_inf_cl,
        check=check_inf_cl,
        mem_estimate=est_inf_cl,
        note="(inf_cl.cal_inf_loss(s*img, txt) + cal_inf_loss(s*txt, img)) / 2; computes in fp32 (casts bf16 inputs), head_dim 256",
    ),
)

INFONCE_PROVIDERS = (
    Provider(
        "mmkernels",
        infonce_mmkernels,
        check=functools.partial(check_mmkernels, "infonce_loss"),
        mem_estimate=est_tiled,
        note="mmkernels.infonce_loss (targets=None: positives on the diagonal)",
    ),
    Provider(
        "reference",
        infonce_reference,
        mem_estimate=functools.partial(est_dense, 1),
        note="F.cross_entropy(logit_scale * q @ k.T, arange(N))",
    ),
)


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def _grid(table: dict, profile: str, overrides: dict) -> Optional[dict]:
    if profile not in table:
        return None
    sizes = dict(table[profile])
    for k in sizes:
        if overrides.get(k):
            sizes[k] = list(overrides[k])
    return sizes


def clip_case(N: int, D: int, dtype: str, device: str) -> Case:
    return Case(
        family=FAMILY,
        op="contrastive_loss",
        shape={"N": N, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_clip_inputs,
        providers=CLIP_PROVIDERS,
        flops=8.0 * N * N * D,
        flops_formula="8*N^2*D",
        x="N",
    )


def infonce_case(N: int, M: int, D: int, dtype: str, device: str) -> Case:
    return Case(
        family=FAMILY,
        op="infonce_loss",
        shape={"N": N, "M": M, "D": D},
        dtype=dtype,
        device=device,
        make_inputs=make_infonce_inputs,
        providers=INFONCE_PROVIDERS,
        flops=8.0 * N * M * D,
        flops_formula="8*N*M*D",
        x="M",
    )


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    dtype = "bfloat16" if gpu else "float32"
    out = []
    clip = _grid(GPU_SIZES if gpu else CPU_SIZES, profile, overrides)
    ds = set()
    for D in clip["D"]:
        for N in clip["N"]:
            out.append(clip_case(N, D, dtype, device))
            ds.add(D)
    inf = _grid(GPU_INFONCE if gpu else CPU_INFONCE, profile, overrides)
    if inf is not None:
        for D in inf["D"]:
            for N in inf["N"]:
                for M in inf["M"]:
                    if M < N:  # positives on the diagonal need a key for every query
                        continue
                    out.append(infonce_case(N, M, D, dtype, device))
                    ds.add(D)
    # the torch.mm rate on this device, for "% of mm" (first, so it is never cut by a time budget)
    return mm.probes_for(device, profile, sorted(ds), dtype) + out


def notes(device: str, profile: str) -> list:
    def fmt(v):
        return "{" + ", ".join(map(str, v)) + "}"

    g = GPU_SIZES["full"]
    lines = [
        "contrastive: time is forward + backward of the loss (gradients for both feature matrices and logit_scale); "
        "inputs are random unit-norm rows (text correlated with image), logit_scale = 1/0.07 as a 0-dim fp32 tensor "
        "requiring grad.",
        "contrastive: effective throughput counts 8*N^2*D FLOPs (contrastive_loss) or 8*N*M*D (infonce_loss): the logits "
        "product in forward, its recomputation and the two gradient products in backward; % of mm compares it with the "
        "torch.mm rate of the same dtype and inner dimension on this device.",
    ]
    if not device.startswith("cuda"):
        c = CPU_SIZES.get(profile, CPU_SIZES["full"])
        lines.append(
            f"contrastive: CPU run in fp32 with N in {fmt(c['N'])}, D in {fmt(c['D'])}. The GPU sizes (N in {fmt(g['N'])}, "
            f"D in {fmt(g['D'])}, bf16) are GPU-only; the CPU target is fp32, N = 8192, D = 512 (the default CPU suite)."
        )
    else:
        lines.append(
            "contrastive: GPU run in bf16 (target case N = 32768, D = 768); inf_cl computes in fp32 whatever the input dtype."
        )
    return lines
