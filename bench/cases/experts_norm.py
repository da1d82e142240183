"""Experts family, the per-modality LayerNorm: VLMo's ``norm2_text`` / ``norm2_imag`` / ``norm2_vl`` and
BEiT-3's multiway LayerNorms.

Op ``modality_layer_norm``: ``mmkernels.modality_layer_norm(x, route, weight [E, H], bias [E, H])``,
forward + backward of ``loss = sum(out * dout)``, gradients for x, weight and bias. Shape keys
``layout, E, B, S, H, bias``; the layouts are those of ``bench/cases/experts.py`` (``vlmo``,
``vlmo_vl``, ``beit3``, ``cogvlm``).

Providers:

* ``mmkernels``: the op with the split position on the two-way contiguous layouts, the ids
  tensor otherwise; ``mmkernels_ids``: with the ids tensor on a split layout.
* ``torchscale``: torchscale ``MultiwayNetwork`` around two LayerNorms (VLMo's blocks do the
  same with ``x[:, :p]`` / ``x[:, p:]``): split along the sequence, ``F.layer_norm`` per part,
  ``torch.cat``; the two-way contiguous layouts only.
* ``masked``: per expert a boolean mask, ``out[mask] = F.layer_norm(x[mask], ...)`` into
  ``torch.empty`` (how CogVLM routes its experts; the only peer for mixed layouts).
* ``dense``: the speed of light, one ``F.layer_norm`` over all tokens with expert 0's scale and
  shift (PyTorch's fused LayerNorm kernels).
* ``reference``: ``mmkernels.experts.reference.modality_layer_norm_reference`` (eager, masks).

No FLOPs: a LayerNorm is memory-bound; the routing-overhead table (time / dense) is the measure.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import experts as X
from bench.cases.common import elem_size, randn, trainable
from bench.harness import Case, Provider

OP = "modality_layer_norm"
EPS = 1e-6  # VLMo and BEiT-3 build their LayerNorms with eps = 1e-6 (timm's partial(nn.LayerNorm, eps=1e-6))


def make_inputs(case: Case) -> dict:
    s = case.shape
    B, H, E = s["B"], s["H"], s["E"]
    S = X.seq_len(s["layout"])
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed)
    # a residual stream: per-token offsets and spreads, so the statistics matter
    x = randn((B, S, H), g, dev).mul_(1 + randn((B, S, 1), g, dev).abs()).add_(randn((B, S, 1), g, dev))
    t = {
        "x": x,
        "weight": randn((E, H), g, dev, 0.2).add_(1.0),
        "bias": randn((E, H), g, dev, 0.1) if s["bias"] else None,
    }
    inputs = trainable(t, dt)
    inputs["dout"] = randn((B, S, H), g, dev).to(dt)
    inputs["ctx"] = X.ExpertsContext(s["layout"], X.layout_ids(s["layout"], B, dev))
    return inputs


def _pick(t: Optional[torch.Tensor], e: int) -> Optional[torch.Tensor]:
    return None if t is None else t[e]


def norm_mmkernels(x, weight, bias, ctx, dout=None, *, use_split=True):
    import mmkernels

    route = ctx.split if (use_split and ctx.split is not None) else ctx.ids
    return X._loss(mmkernels.modality_layer_norm(x, route, weight, bias, EPS), dout)


def norm_torchscale(x, weight, bias, ctx, dout=None):
    """torchscale ``MultiwayNetwork.forward`` (dim=1) around two LayerNorms."""
    p, H = ctx.split, x.shape[-1]
    parts = x.split([p, x.shape[1] - p], dim=1)
    outs = [F.layer_norm(part, (H,), weight[e], _pick(bias, e), EPS) for e, part in enumerate(parts)
            if part.shape[1]]
    return X._loss(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], dout)


def norm_masked(x, weight, bias, ctx, dout=None):
    """Per expert ``out[mask] = layer_norm_e(x[mask])`` into ``torch.empty`` (boolean gather + index_put)."""
    H = x.shape[-1]
    out = torch.empty_like(x)
    for e in range(ctx.E):
        mask = ctx.ids == e
        out[mask] = F.layer_norm(x[mask], (H,), weight[e], _pick(bias, e), EPS)
    return X._loss(out, dout)


def norm_dense(x, weight, bias, ctx, dout=None):
    return X._loss(F.layer_norm(x, (x.shape[-1],), weight[0], _pick(bias, 0), EPS), dout)


def norm_reference(x, weight, bias, ctx, dout=None):
    from mmkernels.experts.reference import modality_layer_norm_reference

    return X._loss(modality_layer_norm_reference(x, ctx.ids, weight, bias, EPS), dout)


def est(factor: float, case: Case) -> int:
    """``factor`` token-sized tensors ([T, H]: x, out, dout, their gradients, gathered copies)."""
    return int(factor * X._tokens(case) * case.shape["H"] * elem_size(case))


def providers() -> tuple:
    attr = "modality_layer_norm"
    return (
        Provider("mmkernels", norm_mmkernels, check=functools.partial(X.check_mmkernels, attr),
                 mem_estimate=functools.partial(est, 4),
                 note="mmkernels.modality_layer_norm(x, route, weight, bias, eps), route the split position on "
                      "vlmo/beit3 layouts, the ids tensor otherwise"),
        Provider("mmkernels_ids", functools.partial(norm_mmkernels, use_split=False),
                 check=functools.partial(X.check_mmkernels_ids, attr), mem_estimate=functools.partial(est, 4),
                 note="mmkernels.modality_layer_norm with the ids tensor on a split layout (general routing)"),
        Provider("torchscale", norm_torchscale, check=X.check_torchscale, mem_estimate=functools.partial(est, 6),
                 note="torchscale MultiwayNetwork around two LayerNorms: torch.split (dim 1), F.layer_norm per "
                      "part, torch.cat (VLMo's x[:, :p] / x[:, p:] blocks alike)"),
        Provider("masked", norm_masked, mem_estimate=functools.partial(est, 7),
                 note="per expert out[ids == e] = F.layer_norm(x[ids == e]) into torch.empty (boolean gather + "
                      "index_put, as CogVLM routes its experts)"),
        Provider("dense", norm_dense, mem_estimate=functools.partial(est, 4),
                 note="speed of light: one F.layer_norm over all tokens with expert 0's scale and shift"),
        Provider("reference", norm_reference,
                 check=functools.partial(X.check_reference, "modality_layer_norm_reference"),
                 mem_estimate=functools.partial(est, 7),
                 note="mmkernels.experts.reference.modality_layer_norm_reference(x, ids, weight, bias, eps)"),
    )


def case(layout: str, B: int, H: int, bias: bool, dtype: str, device: str) -> Case:
    S, E = X.seq_len(layout), X.num_experts(layout)
    return Case(
        family=X.FAMILY,
        op=OP,
        shape={"layout": layout, "E": E, "B": B, "S": S, "H": H, "bias": bool(bias)},
        dtype=dtype,
        device=device,
        make_inputs=make_inputs,
        providers=providers(),
        mode="fwd+bwd",
        x="B",
        note=f"tokens per expert {X.expert_tokens(layout, B)}, eps {EPS}",
    )
