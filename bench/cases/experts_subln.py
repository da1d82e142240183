"""Experts family, the FFN with a LayerNorm between its layers: BEiT-3's multiway FFN as it runs
(torchscale builds ``FeedForwardNetwork`` with ``subln=True`` by default, and BEiT-3 keeps it).

Op ``modality_ffn_subln``: ``mmkernels.modality_ffn_subln(x, route, w_in, b_in, norm_weight,
norm_bias, w_out, b_out, activation, eps)``, forward + backward of ``loss = sum(out * dout)``,
gradients for x and every weight, bias and LayerNorm parameter. Shape keys as ``modality_ffn``
(``layout, E, B, S, H, F, act, bias``); the inputs are ``modality_ffn``'s plus ``norm_weight``
and ``norm_bias [E, F]``.

Providers:

* ``mmkernels``: the op (three routed ops: first layer, activation, per-modality LayerNorm,
  second layer), with the split position on split layouts, the ids tensor otherwise.
* ``torchscale``: ``MultiwayNetwork`` around two ``FeedForwardNetwork(subln=True)``: split along
  the sequence, per part ``fc2(LN(gelu(fc1(x).float()).type_as(x)))``, concatenate.
* ``dense``: the speed of light, one such FFN over all tokens with expert 0's weights.
* ``reference``: the same composition written with the reference functions (boolean masks).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from bench.cases import experts as X
from bench.cases.common import randn
from bench.harness import Case, Provider

OP = "modality_ffn_subln"
EPS = 1e-5  # torchscale's layernorm_eps default


def make_inputs(case: Case) -> dict:
    inputs = X.make_ffn_inputs(case)
    s = case.shape
    E, Fd = s["E"], s["F"]
    dev, dt = case.device, case.torch_dtype
    g = torch.Generator(device=dev).manual_seed(case.seed + 1)
    inputs["norm_weight"] = randn((E, Fd), g, dev, 0.2).add_(1.0).to(dt).requires_grad_()
    inputs["norm_bias"] = randn((E, Fd), g, dev, 0.1).to(dt).requires_grad_()
    return inputs


def _expert(x, w_in, b_in, nw, nb, w_out, b_out):
    """One torchscale ``FeedForwardNetwork(subln=True)``: the activation in float32, as it does."""
    h = F.linear(x, w_in, b_in)
    a = F.gelu(h.float()).type_as(h)
    return F.linear(F.layer_norm(a, (a.shape[-1],), nw, nb, EPS), w_out, b_out)


def _pick(t: Optional[torch.Tensor], e: int) -> Optional[torch.Tensor]:
    return None if t is None else t[e]


def subln_mmkernels(x, w_in, b_in, w_out, b_out, norm_weight, norm_bias, ctx, dout=None, *, use_split=True):
    import mmkernels

    route = ctx.split if (use_split and ctx.split is not None) else ctx.ids
    y = mmkernels.modality_ffn_subln(x, route, w_in, b_in, norm_weight, norm_bias, w_out, b_out,
                                     activation=ctx.activation, eps=EPS)
    return X._loss(y, dout)


def subln_torchscale(x, w_in, b_in, w_out, b_out, norm_weight, norm_bias, ctx, dout=None):
    p, S = ctx.split, x.shape[1]
    ps = [(w_in[e], _pick(b_in, e), norm_weight[e], norm_bias[e], w_out[e], _pick(b_out, e)) for e in range(2)]
    if p in (0, S):
        return X._loss(_expert(x, *ps[0 if p == S else 1]), dout)
    x1, x2 = x.split([p, S - p], dim=1)
    return X._loss(torch.cat([_expert(x1, *ps[0]), _expert(x2, *ps[1])], dim=1), dout)


def subln_dense(x, w_in, b_in, w_out, b_out, norm_weight, norm_bias, ctx, dout=None):
    return X._loss(_expert(x, w_in[0], _pick(b_in, 0), norm_weight[0], norm_bias[0], w_out[0], _pick(b_out, 0)),
                   dout)


def subln_reference(x, w_in, b_in, w_out, b_out, norm_weight, norm_bias, ctx, dout=None):
    from mmkernels.experts import activations
    from mmkernels.experts.reference import modality_layer_norm_reference, modality_linear_reference

    a = activations.apply(ctx.activation, modality_linear_reference(x, ctx.ids, w_in, b_in))
    n = modality_layer_norm_reference(a, ctx.ids, norm_weight, norm_bias, EPS)
    return X._loss(modality_linear_reference(n, ctx.ids, w_out, b_out), dout)


def providers() -> tuple:
    attr = "modality_ffn_subln"
    return (
        Provider("mmkernels", subln_mmkernels, check=functools.partial(X.check_mmkernels, attr),
                 mem_estimate=functools.partial(X.est_ffn, 5),
                 note="mmkernels.modality_ffn_subln(x, route, ...): modality_linear, activation, "
                      "modality_layer_norm, modality_linear (route: the split position on split layouts)"),
        Provider("torchscale", subln_torchscale, check=X.check_torchscale, mem_estimate=functools.partial(X.est_ffn, 7),
                 note="torchscale MultiwayNetwork around FeedForwardNetwork(subln=True): split, per part "
                      "fc2(LayerNorm(gelu(fc1(x).float()))), cat"),
        Provider("dense", subln_dense, mem_estimate=functools.partial(X.est_ffn, 5),
                 note="speed of light: one such FFN over all tokens with expert 0's weights"),
        Provider("reference", subln_reference, check=functools.partial(X.check_reference, "modality_layer_norm_reference"),
                 mem_estimate=functools.partial(X.est_ffn, 8),
                 note="the reference functions (boolean masks): linear, activation, LayerNorm, linear"),
    )


def case(layout: str, B: int, H: int, Fd: int, bias: bool, dtype: str, device: str) -> Case:
    S, E = X.seq_len(layout), X.num_experts(layout)
    return Case(
        family=X.FAMILY,
        op=OP,
        shape={"layout": layout, "E": E, "B": B, "S": S, "H": H, "F": Fd, "act": "gelu", "bias": bool(bias)},
        dtype=dtype,
        device=device,
        make_inputs=make_inputs,
        providers=providers(),
        mode="fwd+bwd",
        flops=X.ffn_flops(B * S, H, Fd, "gelu"),
        flops_formula="3*2*T*H*2F (the LayerNorm's work not counted), T=B*S",
        x="B",
        note=f"tokens per expert {X.expert_tokens(layout, B)}, LayerNorm eps {EPS}",
    )
