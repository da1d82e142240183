"""Registered ops of the experts family (namespace ``mmkernels``).

Tokens ``x [T, H_in]`` are routed to ``E`` per-modality weights by a :class:`~mmkernels.experts.routing.Routing`
(``perm [T]`` int32: slot -> token; ``offsets [E + 1]`` int32: the slots of expert ``e`` are
``offsets[e] .. offsets[e+1] - 1``). The kernels gather rows through ``perm`` and scatter the
results back, so outputs are in token order and no permuted copy of ``x`` is made.

``mmkernels::modality_linear_fwd(x, weight [E, H_out, H_in], bias [E, H_out] | None, perm,
offsets, dw_experts, backend)`` returns ``y [T, H_out]`` with ``y[t] = x[t] @ weight[e].T +
bias[e]``. Its backward, ``mmkernels::modality_linear_bwd(dy, x, weight, bias, perm, offsets,
needs_dx, dw_experts, backend)``, returns ``(dx | empty(0), dw | empty(0), db | empty(0))``:
``dx`` when ``needs_dx``; ``dw`` (and ``db`` when ``bias`` is given) when any flag of
``dw_experts`` is set.

Weight-gradient masks (``dw_experts``, ``dw_in_experts``, ``dw_out_experts``, ``E`` bools): the
experts whose slice of that weight (or bias) may need a gradient. The forward ops take them only
to hand them to their backward, which keeps an expert's flag when autograd also wants that
weight's gradient; a gradient is then ``[E, ...]`` with zero slices for the experts left out,
whose weight-gradient GEMMs are skipped. The public functions set a flag per expert from
``requires_grad`` when a weight is given as per-expert tensors (a frozen expert costs no
weight-gradient work), and every flag for an ``[E, ...]`` tensor.

``mmkernels::modality_ffn_fwd(x, w_in [E, Fi, H_in], b_in, w_out [E, H_out, F], b_out, perm,
offsets, activation, dw_in_experts, dw_out_experts, backend)`` returns ``y [T, H_out]`` (token
order) and the pre-activation ``h [T, Fi]`` and activation ``a [T, F]`` in *sorted* order
(``Fi = 2F`` for ``swiglu``), which the backward, ``mmkernels::modality_ffn_bwd(dy, x, w_in, b_in,
w_out, b_out, perm, offsets, h, a, activation, needs_dx, dw_in_experts, dw_out_experts,
backend)``, reuses; ``h`` and ``a`` carry no gradient. It returns ``(dx, dw_in, db_in, dw_out,
db_out)``, each ``empty(0)`` when not wanted.

``backend`` is ``"cpu"`` (C++ in ``mmkernels/csrc/experts.cpp``) or ``"triton"`` (``kernels/``). Outputs and gradients
have the inputs' dtype; experts that own no token get zero weight and bias gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ..routing import unknown_backend, wanted_experts


def _kernels():
    from . import kernels  # imported lazily: triton is optional
    return kernels


# ----------------------------------------------------------------------------- linear

@torch.library.custom_op("mmkernels::modality_linear_fwd", mutates_args=())
def modality_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        perm: torch.Tensor, offsets: torch.Tensor, dw_experts: list[bool],
                        backend: str) -> torch.Tensor:
    if backend == "cpu":
        return _ext.C.experts_linear_fwd(x, perm, offsets, weight, bias)
    if backend == "triton":
        return _kernels().linear_fwd_triton(x, perm, offsets, weight, bias)
    raise unknown_backend("modality_linear_fwd", backend)


@modality_linear_fwd.register_fake
def _(x, weight, bias, perm, offsets, dw_experts, backend):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("mmkernels::modality_linear_bwd", mutates_args=())
def modality_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        perm: torch.Tensor, offsets: torch.Tensor, needs_dx: bool, dw_experts: list[bool],
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dy, x, perm, offsets, weight, bias, needs_dx, list(dw_experts))
    if backend == "cpu":
        return tuple(_ext.C.experts_linear_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().linear_bwd_triton(*args))
    raise unknown_backend("modality_linear_bwd", backend)


@modality_linear_bwd.register_fake
def _(dy, x, weight, bias, perm, offsets, needs_dx, dw_experts, backend):
    e, h_out, h_in = weight.shape
    needs_dw = any(dw_experts)
    dx = x.new_empty(x.shape[0], h_in) if needs_dx else x.new_empty(0)
    dw = weight.new_empty(e, h_out, h_in) if needs_dw else weight.new_empty(0)
    db = weight.new_empty(e, h_out) if needs_dw and bias is not None else weight.new_empty(0)
    return dx, dw, db


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, perm, offsets, dw_experts, backend = inputs
    ctx.save_for_backward(x, weight, bias, perm, offsets)
    ctx.dw_experts, ctx.backend = dw_experts, backend


def _linear_backward(ctx, dy):
    x, weight, bias, perm, offsets = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = wanted_experts(ctx.dw_experts, needs[1], bias is not None and needs[2])
    if not (needs[0] or any(mask)):
        return (None,) * 7
    dx, dw, db = modality_linear_bwd(dy.contiguous(), x, weight, bias, perm, offsets, needs[0], mask,
                                     ctx.backend)
    return (dx if needs[0] else None,
            dw if needs[1] else None,
            db if bias is not None and needs[2] else None,
            None, None, None, None)


modality_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------- ffn

@torch.library.custom_op("mmkernels::modality_ffn_fwd", mutates_args=())
def modality_ffn_fwd(x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                     b_out: Optional[torch.Tensor], perm: torch.Tensor, offsets: torch.Tensor,
                     activation: str, dw_in_experts: list[bool], dw_out_experts: list[bool],
                     backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, perm, offsets, w_in, b_in, w_out, b_out, activation)
    if backend == "cpu":
        return tuple(_ext.C.experts_ffn_fwd(*args))
    if backend == "triton":
        return tuple(_kernels().ffn_fwd_triton(*args))
    raise unknown_backend("modality_ffn_fwd", backend)


@modality_ffn_fwd.register_fake
def _(x, w_in, b_in, w_out, b_out, perm, offsets, activation, dw_in_experts, dw_out_experts, backend):
    t = x.shape[0]
    return x.new_empty(t, w_out.shape[1]), x.new_empty(t, w_in.shape[1]), x.new_empty(t, w_out.shape[2])


@torch.library.custom_op("mmkernels::modality_ffn_bwd", mutates_args=())
def modality_ffn_bwd(dy: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor],
                     w_out: torch.Tensor, b_out: Optional[torch.Tensor], perm: torch.Tensor, offsets: torch.Tensor,
                     h: torch.Tensor, a: torch.Tensor, activation: str, needs_dx: bool,
                     dw_in_experts: list[bool], dw_out_experts: list[bool], backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dy, x, perm, offsets, w_in, b_in, w_out, b_out, h, a, activation, needs_dx,
            list(dw_in_experts), list(dw_out_experts))
    if backend == "cpu":
        return tuple(_ext.C.experts_ffn_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().ffn_bwd_triton(*args))
    raise unknown_backend("modality_ffn_bwd", backend)


@modality_ffn_bwd.register_fake
def _(dy, x, w_in, b_in, w_out, b_out, perm, offsets, h, a, activation, needs_dx, dw_in_experts,
      dw_out_experts, backend):
    def grads(w, b, mask):
        if not any(mask):
            return w.new_empty(0), w.new_empty(0)
        return w.new_empty(w.shape), w.new_empty(w.shape[:2]) if b is not None else w.new_empty(0)
    dw_in, db_in = grads(w_in, b_in, dw_in_experts)
    dw_out, db_out = grads(w_out, b_out, dw_out_experts)
    return x.new_empty(x.shape) if needs_dx else x.new_empty(0), dw_in, db_in, dw_out, db_out


def _ffn_setup_context(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, perm, offsets, activation, dw_in_experts, dw_out_experts, backend = inputs
    _, h, a = output
    ctx.save_for_backward(x, w_in, b_in, w_out, b_out, perm, offsets, h, a)
    ctx.activation, ctx.backend = activation, backend
    ctx.masks = dw_in_experts, dw_out_experts
    ctx.mark_non_differentiable(h, a)
    # h and a never get a gradient: without this autograd would fill a zero [T, Fi] and [T, F]
    # tensor for them on every backward (two large memsets)
    ctx.set_materialize_grads(False)


def _ffn_backward(ctx, dy, _dh, _da):
    x, w_in, b_in, w_out, b_out, perm, offsets, h, a = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask_in = wanted_experts(ctx.masks[0], needs[1], b_in is not None and needs[2])
    mask_out = wanted_experts(ctx.masks[1], needs[3], b_out is not None and needs[4])
    if dy is None or not (needs[0] or any(mask_in) or any(mask_out)):
        return (None,) * 11
    dx, dw_in, db_in, dw_out, db_out = modality_ffn_bwd(
        dy.contiguous(), x, w_in, b_in, w_out, b_out, perm, offsets, h, a, ctx.activation, needs[0],
        mask_in, mask_out, ctx.backend)
    return (dx if needs[0] else None,
            dw_in if needs[1] else None,
            db_in if b_in is not None and needs[2] else None,
            dw_out if needs[3] else None,
            db_out if b_out is not None and needs[4] else None,
            None, None, None, None, None, None)


modality_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)
