"""ITC family: the contrastive objectives of ALBEF, BLIP and BLIP-2 and their ITM hard negatives.

Ops (dispatch family ``contrastive``):

* ``albef_itc`` (fwd+bwd; dispatch op ``itc_loss``): ALBEF / BLIP ITC with momentum distillation
  (``alpha`` = 0.4) and feature queues of ``K`` rows: the batch of ``B`` pairs against ``[feat_m;
  queue]`` in both directions. Gradients for the online features and ``logit_scale`` (1/0.07, a
  learnable 0-dim fp32 tensor); the momentum features and the queues (``[D, K]`` buffers as ALBEF
  keeps them, passed as ``queue.T``) are constants. Shape keys ``B``, ``K``, ``D``.
* ``blip2_itc`` (fwd+bwd; ``itc_loss``): BLIP-2's ITC (``Q`` query embeddings per image, the
  similarity is their max, label smoothing 0.1) as one rank of ``W`` computes it: the local batch
  of ``G / W`` pairs against the ``G`` gathered features (constants, as BLIP-2's
  ``concat_all_gather`` passes no gradient), targets ``arange(G / W)`` (rank 0). ``W = 1`` is one
  process holding the whole batch. Shape keys ``G``, ``W``, ``Q``, ``D``.
* ``itm_negatives`` (fwd, no grad; ``itc_negatives``): one ITM hard negative per image and per text
  of a batch of ``B`` (``Q`` image tokens), drawn from the softmax of the similarities with the
  positives excluded; every provider returns ``[2, B]`` int64 (negative text per image, negative
  image per text). Shape keys ``B``, ``Q``, ``D``.

Providers: ``mmkernels`` (backend auto: ``mmkernels.momentum_itc_loss``; for BLIP-2 the two
``mmkernels.infonce_loss`` directions of ``blip2_itc_loss`` with the gathered keys; and
``mmkernels.itm_hard_negatives``), ``mmkernels:kernel`` / ``mmkernels:blockwise`` /
``mmkernels:materialized`` (the same call with the path forced), and the code as the papers write
it (``mmkernels.contrastive.itc.reference``): ``reference`` (``momentum_itc_reference``,
``blip2_itc_reference``) and, for the negatives, ``as_written`` (BLIP-2's ``[B, B, Q]``
similarities, softmax weights with the positives zeroed, ``torch.multinomial``). The BLIP-2 forms
compute the similarities with BLIP-2's broadcasting ``matmul``, which copies the features to
``[B, B_global, Q, D]``; they are skipped where that would not fit the device.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import mm
from bench.cases.common import elem_size, first_line, missing
from bench.cases.contrastive import LOGIT_SCALE, _unit_rows
from bench.cases.siglip import grid, with_paths
from bench.harness import BASELINE, Case, Provider

FAMILY = "itc"
OP_ALBEF = "albef_itc"
OP_BLIP2 = "blip2_itc"
OP_NEGATIVES = "itm_negatives"
#: bench op -> the op of the contrastive dispatch table its mmkernels calls go through
DISPATCH_OPS = {OP_ALBEF: "itc_loss", OP_BLIP2: "itc_loss", OP_NEGATIVES: "itc_negatives"}
#: the paths ``mmkernels:<path>`` providers force, beside ``kernel``
PATHS = ("blockwise", "materialized")
ALPHA = 0.4  # ALBEF's distillation weight
LABEL_SMOOTHING = 0.1  # BLIP-2's
AS_WRITTEN = "as_written"  # the negatives' papers' code (draws, not a loss: no `reference` oracle)

# Shapes and dtypes per (device kind, profile). ALBEF pretrains with 64 pairs per GPU and a queue
# of 57,600 (D = 256); BLIP-2 with 32 queries, D = 256, global batches in the thousands on 8+ GPUs.
ALBEF_GPU = {
    "full": {"B": [64, 256], "K": [57600], "D": [256]},
    "quick": {"B": [64, 256], "K": [57600], "D": [256]},
    "pytest": {"B": [32], "K": [1024], "D": [64]},
}
ALBEF_CPU = {
    "full": {"B": [64, 256], "K": [57600], "D": [256]},
    "quick": {"B": [64], "K": [57600], "D": [256]},
    "pytest": {"B": [16], "K": [256], "D": [32]},
}
# (G, W) pairs: the global batch and the processes it is split over (local batch G / W)
BLIP2_GPU = {
    "full": {"GW": [(2048, 8), (8192, 8), (2048, 1)], "Q": [32], "D": [256]},
    "quick": {"GW": [(2048, 8), (8192, 8), (2048, 1)], "Q": [32], "D": [256]},
    "pytest": {"GW": [(256, 8), (64, 1)], "Q": [8], "D": [64]},
}
BLIP2_CPU = {
    "full": {"GW": [(512, 8), (2048, 8), (256, 1)], "Q": [32], "D": [256]},
    "quick": {"GW": [(512, 8), (256, 1)], "Q": [32], "D": [256]},
    "pytest": {"GW": [(64, 4), (16, 1)], "Q": [4], "D": [32]},
}
NEG_GPU = {
    "full": {"B": [256, 1024], "Q": [32], "D": [256]},
    "quick": {"B": [1024], "Q": [32], "D": [256]},
    "pytest": {"B": [64], "Q": [8], "D": [64]},
}
NEG_CPU = {
    "full": {"B": [256, 1024], "Q": [32], "D": [256]},
    "quick": {"B": [256], "Q": [32], "D": [256]},
    "pytest": {"B": [16], "Q": [4], "D": [32]},
}
GPU_DTYPES = {"full": ("bfloat16", "float32"), "quick": ("bfloat16", "float32"), "pytest": ("bfloat16", "float32")}
CPU_DTYPES = {"full": ("float32", "bfloat16"), "quick": ("float32", "bfloat16"), "pytest": ("float32",)}


# --------------------------------------------------------------------------
# Problem sizes
# --------------------------------------------------------------------------


def dispatch_dims(op: str, shape: dict) -> tuple:
    """``(n, m, d)`` of one direction's call as the dispatcher classifies it: ``n`` queries, ``m``
    keys, ``d`` the features times the token pairs."""
    if op == OP_ALBEF:
        return shape["B"], shape["B"] + shape["K"], shape["D"]
    if op == OP_BLIP2:
        return shape["G"] // shape["W"], shape["G"], shape["D"] * shape["Q"]
    return shape["B"], shape["B"], shape["D"] * shape["Q"]


def _local(case: Case) -> int:
    return case.shape["G"] // case.shape["W"]


# --------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------


def _near(x: torch.Tensor, g: torch.Generator, noise: float = 0.2) -> torch.Tensor:
    """Unit rows close to ``x``'s (a momentum encoder's features of the same pairs)."""
    d = x.shape[-1]
    return F.normalize(x + noise * d**-0.5 * torch.randn(x.shape, generator=g, device=x.device), dim=-1)


def _query_tokens(txt: torch.Tensor, q: int, g: torch.Generator) -> torch.Tensor:
    """``[n, q, D]`` unit rows, each query correlated with its text by a random weight in [0, 1)
    (so the max over queries picks one of them)."""
    n, d = txt.shape
    x = torch.randn(n, q, d, generator=g, device=txt.device).mul_(d**-0.5)
    w = torch.rand(n, q, 1, generator=g, device=txt.device)
    return F.normalize(x + w * txt[:, None, :], dim=-1)


def _scale(case: Case, requires_grad: bool) -> torch.Tensor:
    return torch.tensor(LOGIT_SCALE, device=case.device, dtype=torch.float32, requires_grad=requires_grad)


def make_albef_inputs(case: Case) -> dict:
    B, K, D = case.shape["B"], case.shape["K"], case.shape["D"]
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    img = _unit_rows(B, D, g, case.device)
    txt = _unit_rows(B, D, g, case.device, base=img)
    img_m, txt_m = _near(img, g), _near(txt, g)
    iq = _unit_rows(K, D, g, case.device)
    tq = _unit_rows(K, D, g, case.device, base=iq)  # earlier batches' momentum pairs
    dt = case.torch_dtype
    return {
        "image_feat": img.to(dt).requires_grad_(),
        "text_feat": txt.to(dt).requires_grad_(),
        "image_feat_m": img_m.to(dt),
        "text_feat_m": txt_m.to(dt),
        # the queues as ALBEF keeps them, [D, K] buffers, given to every provider as [K, D] views
        "image_queue": iq.to(dt).T.contiguous().T,
        "text_queue": tq.to(dt).T.contiguous().T,
        "logit_scale": _scale(case, True),
    }


def make_blip2_inputs(case: Case) -> dict:
    G, Q, D = case.shape["G"], case.shape["Q"], case.shape["D"]
    b = _local(case)
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    txt_all = _unit_rows(G, D, g, case.device)
    img_all = _query_tokens(txt_all, Q, g)
    dt = case.torch_dtype
    img_all, txt_all = img_all.to(dt), txt_all.to(dt)
    return {  # rank 0: the local rows are the first G / W of the gathered ones
        "image_feats": img_all[:b].clone().requires_grad_(),
        "text_feat": txt_all[:b].clone().requires_grad_(),
        "image_feats_all": img_all,
        "text_feat_all": txt_all,
        "logit_scale": _scale(case, True),
        "targets": torch.arange(b, device=case.device),
    }


def make_negatives_inputs(case: Case) -> dict:
    B, Q, D = case.shape["B"], case.shape["Q"], case.shape["D"]
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    txt = _unit_rows(B, D, g, case.device)
    img = _query_tokens(txt, Q, g)
    dt = case.torch_dtype
    return {"image_feats": img.to(dt), "text_feat": txt.to(dt), "logit_scale": _scale(case, False)}


# --------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------


def albef_mmkernels(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, logit_scale):
    import mmkernels

    return mmkernels.momentum_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, logit_scale,
                                       alpha=ALPHA, image_queue=image_queue, text_queue=text_queue)


def albef_reference(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, logit_scale):
    from mmkernels.contrastive.itc.reference import momentum_itc_reference

    return momentum_itc_reference(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue,
                                  1.0 / logit_scale, ALPHA)


def blip2_mmkernels(image_feats, text_feat, image_feats_all, text_feat_all, logit_scale, targets):
    """The two directions ``mmkernels.blip2_itc_loss`` computes on rank 0, with the gathered keys
    given (one process)."""
    import mmkernels

    i2t = mmkernels.infonce_loss(image_feats, text_feat_all, logit_scale, targets=targets,
                                 label_smoothing=LABEL_SMOOTHING)
    t2i = mmkernels.infonce_loss(text_feat, image_feats_all, logit_scale, targets=targets,
                                 label_smoothing=LABEL_SMOOTHING)
    return (i2t + t2i) / 2


def blip2_reference(image_feats, text_feat, image_feats_all, text_feat_all, logit_scale, targets):
    from mmkernels.contrastive.itc.reference import blip2_itc_reference

    return blip2_itc_reference(image_feats, text_feat, image_feats_all, text_feat_all, 1.0 / logit_scale, rank=0,
                               label_smoothing=LABEL_SMOOTHING)


def negatives_mmkernels(image_feats, text_feat, logit_scale):
    import mmkernels

    return torch.stack(mmkernels.itm_hard_negatives(image_feats, text_feat, logit_scale))


def blip2_similarities(image_feats, text_feat, image_feats_all, text_feat_all, temp):
    """``(sim_i2t, sim_t2i)`` as BLIP-2's ``forward`` computes them: ``[B, B_global, Q]`` products
    by broadcasting ``matmul``, max over the queries, divided by ``temp``."""
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)
    sim_i2t, _ = sim_q2t.max(-1)
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(-2)
    sim_t2i, _ = sim_t2q.max(-1)
    return sim_i2t / temp, sim_t2i / temp


def negatives_as_written(image_feats, text_feat, logit_scale):
    """BLIP-2's ITM negatives: its similarities, softmax weights with the positives zeroed, one
    ``torch.multinomial`` draw per row (``itm_negatives_reference``); ``[2, B]`` as the other
    providers return them."""
    from mmkernels.contrastive.itc.reference import itm_negatives_reference

    sim_i2t, sim_t2i = blip2_similarities(image_feats, text_feat, image_feats, text_feat, 1.0 / logit_scale)
    pos = torch.eye(image_feats.shape[0], dtype=torch.bool, device=image_feats.device)
    return torch.stack(itm_negatives_reference(sim_i2t, sim_t2i, pos, pos))


# --------------------------------------------------------------------------
# Availability checks
# --------------------------------------------------------------------------

#: what each dispatch op needs of the C++ extension and of the Triton kernels module
KERNEL_FUNCTIONS = {
    "itc_loss": (("itc_rows", "itc_grads"), ("itc_rows_triton", "itc_grads_triton")),
    "itc_negatives": (("itc_negatives",), ("itc_negatives_triton",)),
}
API = {OP_ALBEF: "momentum_itc_loss", OP_BLIP2: "infonce_loss", OP_NEGATIVES: "itm_hard_negatives"}


def kernel_missing(device: str, dispatch_op: str) -> Optional[str]:
    """Why the itc kernels of ``dispatch_op`` cannot be called on ``device`` although the
    dispatcher would offer them (their C++ functions not compiled in, their Triton module not
    importable), or None. Where the dispatcher itself knows the kernels are unavailable (no
    extension), None: a forced ``kernel`` path then raises ``PathUnavailable``."""
    cpp, triton_fns = KERNEL_FUNCTIONS[dispatch_op]
    if device.startswith("cuda"):
        try:
            from mmkernels.contrastive.itc import kernels
        except Exception as exc:
            return f"the itc Triton kernels are not importable ({first_line(exc)})"
        lacking = [n for n in triton_fns if not hasattr(kernels, n)]
        return f"mmkernels.contrastive.itc.kernels lacks {', '.join(lacking)}" if lacking else None
    from mmkernels import _ext

    if not _ext.available():
        return None
    lacking = [n for n in cpp if not hasattr(_ext.C, n)]
    if lacking:
        return f"the C++ kernels lack {', '.join(lacking)} (mmkernels/csrc/itc.cpp is not built into them)"
    return None


def _api_missing(case: Case) -> Optional[str]:
    return missing("mmkernels", API[case.op])


def auto_takes_kernel(case: Case) -> bool:
    """Whether backend ``auto`` would run the kernels for this case: the first path of the
    contrastive table's row for it that can run (the materialized path only within
    ``memory_budget``)."""
    from mmkernels import _dispatch
    from mmkernels.contrastive.paths import shape_class

    op = DISPATCH_OPS[case.op]
    n, m, d = dispatch_dims(case.op, case.shape)
    kind = _dispatch.device_kind(torch.device(case.device))
    _, row = _dispatch.lookup("contrastive", op, kind, _dispatch.dtype_name(case.torch_dtype), shape_class(n, m, d))
    materialized_fits = _materialized_bytes(case, one_direction=True) <= _dispatch.memory_budget()
    for path in row.order:
        if path == "kernel":
            return True
        if path == "blockwise" or (path == "materialized" and materialized_fits):
            return False
    return False


def check_auto(case: Case) -> Optional[str]:
    reason = _api_missing(case)
    if reason is None and auto_takes_kernel(case):
        why = kernel_missing(case.device, DISPATCH_OPS[case.op])
        if why:
            reason = f"backend auto runs the kernel path here, which cannot run: {why}"
    return reason


def check_kernel(case: Case) -> Optional[str]:
    return _api_missing(case) or kernel_missing(case.device, DISPATCH_OPS[case.op])


def check_path(case: Case) -> Optional[str]:
    return _api_missing(case)


# --------------------------------------------------------------------------
# Memory estimates (bytes beyond the inputs and their gradients)
# --------------------------------------------------------------------------


def _materialized_bytes(case: Case, one_direction: bool = False) -> int:
    """The ``N x M`` tensors of the materialized path (``itc.paths.materialized_bytes``), for one
    direction or both (held together until the backward)."""
    from mmkernels.contrastive.itc.paths import materialized_bytes

    n, m, _ = dispatch_dims(case.op, case.shape)
    tokens = case.shape.get("Q", 1)
    one = materialized_bytes(n, m, tokens, case.torch_dtype, teacher=case.op == OP_ALBEF)
    return one if one_direction else 2 * one


def _queue_copies(case: Case) -> int:
    """ALBEF's code and the materialized path concatenate ``[feat_m; queue]``, per modality (the
    tiled paths read the queues as they are)."""
    if case.op != OP_ALBEF:
        return 0
    B, K, D = case.shape["B"], case.shape["K"], case.shape["D"]
    return 2 * (B + K) * D * elem_size(case)


def est_tiled(case: Case) -> int:
    """One block of similarities (at most ``memory_budget``), fp32 gradient accumulators and row
    statistics: O((n + m) * D) beyond the inputs."""
    from mmkernels import _dispatch

    n, m, d = dispatch_dims(case.op, case.shape)
    return _dispatch.memory_budget() + 2 * (4 * (n + m) * d * 4 + 64 * (n + m))


def est_materialized(case: Case) -> int:
    return _materialized_bytes(case) + _queue_copies(case)


def est_albef_reference(case: Case) -> int:
    """Per direction the teacher logits, their softmax, the targets, the logits, the scaled
    logits, the log-softmax and its product with the targets, and the backward's gradients of
    those: about 8 ``[B, B + K]`` matrices, two directions, and the concatenated keys."""
    B, K = case.shape["B"], case.shape["K"]
    return 16 * B * (B + K) * elem_size(case) + _queue_copies(case)


def _broadcast_copy(case: Case) -> int:
    """BLIP-2's broadcasting ``matmul`` copies the token features to ``[n, m, Q, D]``."""
    n, m, _ = dispatch_dims(case.op, case.shape)
    return n * m * case.shape["Q"] * case.shape["D"] * elem_size(case)


def est_blip2_reference(case: Case) -> int:
    """The broadcast copy of one direction kept for its backward and the other's gradient copy
    (2 x ``[n, m, Q, D]``), plus the ``[n, m, Q]`` products, their max and its gradient."""
    n, m, _ = dispatch_dims(case.op, case.shape)
    return 2 * _broadcast_copy(case) + 8 * n * m * case.shape["Q"] * elem_size(case)


def est_negatives_as_written(case: Case) -> int:
    """One broadcast copy at a time (no autograd), the ``[B, B, Q]`` products and fp32 weights."""
    n, m, _ = dispatch_dims(case.op, case.shape)
    return _broadcast_copy(case) + 2 * n * m * case.shape["Q"] * elem_size(case) + 6 * n * m * 4


# --------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------


def _providers(op: str) -> tuple:
    if op == OP_ALBEF:
        return (
            Provider(BASELINE, albef_mmkernels, check=check_auto, mem_estimate=est_tiled,
                     note=f"mmkernels.momentum_itc_loss(img, txt, img_m, txt_m, s, alpha={ALPHA}, image_queue, "
                          "text_queue) (the queues read in place; backend auto)"),
            Provider("reference", albef_reference, mem_estimate=est_albef_reference,
                     note="momentum_itc_reference as ALBEF / BLIP write it: [B, B+K] logits, soft targets, "
                          "log_softmax * targets (temp = 1 / logit_scale)"),
        )
    if op == OP_BLIP2:
        return (
            Provider(BASELINE, blip2_mmkernels, check=check_auto, mem_estimate=est_tiled,
                     note="(mmkernels.infonce_loss(img [b,Q,D], txt_all, s, targets, label_smoothing=0.1) + "
                          "infonce_loss(txt, img_all [G,Q,D], ...)) / 2: blip2_itc_loss's directions, rank 0, "
                          "gathered keys given (backend auto)"),
            Provider("reference", blip2_reference, mem_estimate=est_blip2_reference,
                     note="blip2_itc_reference as BLIP-2 writes it: broadcasting matmul to [b, G, Q], max over "
                          "queries, cross_entropy(label_smoothing=0.1), rank 0"),
        )
    return (
        Provider(BASELINE, negatives_mmkernels, check=check_auto, mem_estimate=est_tiled,
                 note="mmkernels.itm_hard_negatives(img [B,Q,D], txt, s): Gumbel-max draws, no [B, B] weights "
                      "(backend auto)"),
        Provider(AS_WRITTEN, negatives_as_written, mem_estimate=est_negatives_as_written,
                 note="BLIP-2's ITM negatives: [B, B, Q] similarities by broadcasting matmul, max over queries, "
                      "softmax with the positives zeroed, torch.multinomial (itm_negatives_reference)"),
    )


def _with_paths(case: Case) -> Case:
    """``case`` with ``mmkernels:kernel`` and ``mmkernels:<path>`` providers after ``mmkernels``,
    each with its own check (the kernel path skips where the kernels cannot run; the others
    need only the API) and memory estimate."""
    case = with_paths(case, PATHS, {"materialized": est_materialized})
    checks = {f"{BASELINE}:kernel": check_kernel, f"{BASELINE}:blockwise": check_path,
              f"{BASELINE}:materialized": check_path}
    return dataclasses.replace(case, providers=tuple(
        dataclasses.replace(p, check=checks[p.name]) if p.name in checks else p for p in case.providers))


def albef_case(B: int, K: int, D: int, dtype: str, device: str) -> Case:
    M = B + K
    case = Case(
        family=FAMILY, op=OP_ALBEF, shape={"B": B, "K": K, "D": D}, dtype=dtype, device=device,
        make_inputs=make_albef_inputs, providers=_providers(OP_ALBEF),
        # per direction: student and teacher logits (2 * 2*B*M*D) and the queries' gradient (2*B*M*D)
        flops=12.0 * B * M * D, flops_formula="12*B*(B+K)*D", x="B",
    )
    return _with_paths(case)


def blip2_case(G: int, W: int, Q: int, D: int, dtype: str, device: str) -> Case:
    b = G // W
    case = Case(
        family=FAMILY, op=OP_BLIP2, shape={"G": G, "W": W, "Q": Q, "D": D}, dtype=dtype, device=device,
        make_inputs=make_blip2_inputs, providers=_providers(OP_BLIP2),
        # per direction: the [b, G, Q] products (2*b*G*Q*D) and the local features' gradient (same)
        flops=8.0 * b * G * Q * D, flops_formula="8*(G/W)*G*Q*D", x="G",
    )
    return _with_paths(case)


def negatives_case(B: int, Q: int, D: int, dtype: str, device: str) -> Case:
    case = Case(
        family=FAMILY, op=OP_NEGATIVES, shape={"B": B, "Q": Q, "D": D}, dtype=dtype, device=device,
        make_inputs=make_negatives_inputs, providers=_providers(OP_NEGATIVES), mode="fwd",
        flops=4.0 * B * B * Q * D, flops_formula="4*B^2*Q*D", x="B",
    )
    return _with_paths(case)


def _blip2_pairs(table: dict, profile: str, overrides: dict) -> Optional[list]:
    """The profile's (G, W) pairs; ``--size G=...`` / ``W=...`` replace them by the product of the
    given lists (and the profile's values of the other key)."""
    if profile not in table:
        return None
    pairs = table[profile]["GW"]
    if overrides.get("G") or overrides.get("W"):
        gs = overrides.get("G") or sorted({g for g, _ in pairs})
        ws = overrides.get("W") or sorted({w for _, w in pairs}, reverse=True)
        pairs = [(g, w) for g in gs for w in ws]
    return [(g, w) for g, w in pairs if w >= 1 and g % w == 0]


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    gpu = device.startswith("cuda")
    dtypes = (GPU_DTYPES if gpu else CPU_DTYPES).get(profile)
    albef = grid(ALBEF_GPU if gpu else ALBEF_CPU, profile, overrides)
    pairs = _blip2_pairs(BLIP2_GPU if gpu else BLIP2_CPU, profile, overrides)
    blip2 = grid({p: {"Q": t["Q"], "D": t["D"]} for p, t in (BLIP2_GPU if gpu else BLIP2_CPU).items()}, profile,
                 overrides)
    neg = grid(NEG_GPU if gpu else NEG_CPU, profile, overrides)
    if dtypes is None or albef is None:
        return []
    out = []
    for dt in dtypes:
        out += [albef_case(B, K, D, dt, device) for D in albef["D"] for K in albef["K"] for B in albef["B"]]
        out += [blip2_case(G, W, Q, D, dt, device) for D in blip2["D"] for Q in blip2["Q"] for G, W in pairs]
        out += [negatives_case(B, Q, D, dt, device) for D in neg["D"] for Q in neg["Q"] for B in neg["B"]]
    ds = sorted({c.shape["D"] for c in out})
    probes = [p for dt in dtypes for p in mm.probes_for(device, profile, ds, dt)]
    return probes + out


def notes(device: str, profile: str) -> list:
    lines = [
        f"itc: albef_itc is ALBEF / BLIP ITC with momentum distillation (alpha = {ALPHA}) against [feat_m; queue] "
        "(K queue rows), forward + backward with gradients for the online features and logit_scale (1/0.07); "
        "the momentum features and queues are constants.",
        "itc: blip2_itc is BLIP-2's ITC (max over Q queries, label smoothing 0.1) as rank 0 of W computes it: "
        "the local G/W pairs against the G gathered features (constants, as BLIP-2's concat_all_gather); W = 1 "
        "is one process holding the global batch. mmkernels runs the two infonce_loss directions of "
        "blip2_itc_loss.",
        "itc: itm_negatives draws one hard negative per image and per text (forward, no grad): mmkernels by "
        "Gumbel-max without [B, B] weights, as_written by BLIP-2's softmax + torch.multinomial; the draws "
        "differ by design (same distribution).",
        "itc: the BLIP-2 forms (reference, as_written) compute the similarities by BLIP-2's broadcasting matmul, "
        "which copies the features to [b, G, Q, D]: skipped where that does not fit.",
    ]
    if device.startswith("cuda"):
        lines.append("itc: GPU run at the papers' sizes (ALBEF B = 64 and 256, K = 57600, D = 256; BLIP-2 G = 2048 and "
                     "8192 on W = 8, and G = 2048 on one process, Q = 32, D = 256; negatives B = 1024), bf16 and fp32.")
    else:
        a, b, n = (t.get(profile, t["full"]) for t in (ALBEF_CPU, BLIP2_CPU, NEG_CPU))
        lines.append(f"itc: CPU run at ALBEF B in {a['B']}, K = {a['K']}; BLIP-2 (G, W) in {b['GW']}, Q = {b['Q']}; "
                     f"negatives B in {n['B']}; the GPU cases use the papers' sizes.")
    return lines
