"""Registered ops of the experts family (namespace ``mmkernels``).

Tokens ``x [T, H_in]`` are routed to ``E`` per-modality weights by a :class:`~.routing.Routing`
(``perm [T]`` int32: slot -> token; ``offsets [E + 1]`` int32: the slots of expert ``e`` are
``offsets[e] .. offsets[e+1] - 1``). The kernels gather rows through ``perm`` and scatter the
results back, so outputs are in token order and no permuted copy of ``x`` is made.

``mmkernels::modality_linear_fwd(x, weight [E, H_out, H_in], bias [E, H_out] | None, perm,
offsets, backend)`` returns ``y [T, H_out]`` with ``y[t] = x[t] @ weight[e].T + bias[e]``.
Its backward, ``mmkernels::modality_linear_bwd(dy, x, weight, bias, perm, offsets, needs_dx,
needs_dw, backend)``, returns ``(dx | empty(0), dw | empty(0), db | empty(0))``: ``dx`` when
``needs_dx``, ``dw`` when ``needs_dw``, ``db`` when ``needs_dw`` and ``bias`` is given.

``mmkernels::modality_ffn_fwd(x, w_in [E, Fi, H_in], b_in, w_out [E, H_out, F], b_out, perm,
offsets, activation, backend)`` returns ``y [T, H_out]`` (token order) and the pre-activation
``h [T, Fi]`` and activation ``a [T, F]`` in *sorted* order (``Fi = 2F`` for ``swiglu``), which
the backward, ``mmkernels::modality_ffn_bwd``, reuses. ``h`` and ``a`` carry no gradient.

``backend`` is ``"cpu"`` (C++ in ``csrc/experts.cpp``) or ``"triton"``. Outputs and gradients
have the inputs' dtype; experts that own no token get zero weight and bias gradients.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext


def _kernels():
    from . import kernels  # imported lazily: triton is optional
    return kernels


def _unknown(op: str, backend: str):
    return ValueError(f"{op}: unknown backend {backend!r} (expected 'cpu' or 'triton')")


# ----------------------------------------------------------------------------- linear

@torch.library.custom_op("mmkernels::modality_linear_fwd", mutates_args=())
def modality_linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        perm: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "cpu":
        return _ext.C.experts_linear_fwd(x, perm, offsets, weight, bias)
    if backend == "triton":
        return _kernels().linear_fwd_triton(x, perm, offsets, weight, bias)
    raise _unknown("modality_linear_fwd", backend)


@modality_linear_fwd.register_fake
def _(x, weight, bias, perm, offsets, backend):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("mmkernels::modality_linear_bwd", mutates_args=())
def modality_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        perm: torch.Tensor, offsets: torch.Tensor, needs_dx: bool, needs_dw: bool,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # db comes with dw: the bias only feeds db, so it is not passed when dw is not wanted (the
    # primitives would otherwise disagree on db's shape: the C++ one returns it whenever bias is given)
    args = (dy, x, perm, offsets, weight, bias if needs_dw else None, needs_dx, needs_dw)
    if backend == "cpu":
        return tuple(_ext.C.experts_linear_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().linear_bwd_triton(*args))
    raise _unknown("modality_linear_bwd", backend)


@modality_linear_bwd.register_fake
def _(dy, x, weight, bias, perm, offsets, needs_dx, needs_dw, backend):
    e, h_out, h_in = weight.shape
    dx = x.new_empty(x.shape[0], h_in) if needs_dx else x.new_empty(0)
    dw = weight.new_empty(e, h_out, h_in) if needs_dw else weight.new_empty(0)
    db = weight.new_empty(e, h_out) if needs_dw and bias is not None else weight.new_empty(0)
    return dx, dw, db


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, perm, offsets, backend = inputs
    ctx.save_for_backward(x, weight, bias, perm, offsets)
    ctx.backend = backend


def _linear_backward(ctx, dy):
    x, weight, bias, perm, offsets = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    needs_dw = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
    if not (needs_dx or needs_dw):
        return None, None, None, None, None, None
    dx, dw, db = modality_linear_bwd(dy.contiguous(), x, weight, bias, perm, offsets, needs_dx, needs_dw,
                                     ctx.backend)
    return (dx if needs_dx else None,
            dw if ctx.needs_input_grad[1] else None,
            db if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None)


modality_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# ----------------------------------------------------------------------------- ffn

@torch.library.custom_op("mmkernels::modality_ffn_fwd", mutates_args=())
def modality_ffn_fwd(x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                     b_out: Optional[torch.Tensor], perm: torch.Tensor, offsets: torch.Tensor,
                     activation: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, perm, offsets, w_in, b_in, w_out, b_out, activation)
    if backend == "cpu":
        return tuple(_ext.C.experts_ffn_fwd(*args))
    if backend == "triton":
        return tuple(_kernels().ffn_fwd_triton(*args))
    raise _unknown("modality_ffn_fwd", backend)


@modality_ffn_fwd.register_fake
def _(x, w_in, b_in, w_out, b_out, perm, offsets, activation, backend):
    t = x.shape[0]
    return x.new_empty(t, w_out.shape[1]), x.new_empty(t, w_in.shape[1]), x.new_empty(t, w_out.shape[2])


@torch.library.custom_op("mmkernels::modality_ffn_bwd", mutates_args=())
def modality_ffn_bwd(dy: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor],
                     w_out: torch.Tensor, b_out: Optional[torch.Tensor], perm: torch.Tensor, offsets: torch.Tensor,
                     h: torch.Tensor, a: torch.Tensor, activation: str, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dy, x, perm, offsets, w_in, b_in, w_out, b_out, h, a, activation)
    if backend == "cpu":
        return tuple(_ext.C.experts_ffn_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().ffn_bwd_triton(*args))
    raise _unknown("modality_ffn_bwd", backend)


@modality_ffn_bwd.register_fake
def _(dy, x, w_in, b_in, w_out, b_out, perm, offsets, h, a, activation, backend):
    return (x.new_empty(x.shape),
            w_in.new_empty(w_in.shape),
            w_in.new_empty(w_in.shape[:2]) if b_in is not None else w_in.new_empty(0),
            w_out.new_empty(w_out.shape),
            w_out.new_empty(w_out.shape[:2]) if b_out is not None else w_out.new_empty(0))


def _ffn_setup_context(ctx, inputs, output):
    x, w_in, b_in, w_out, b_out, perm, offsets, activation, backend = inputs
    _, h, a = output
    ctx.save_for_backward(x, w_in, b_in, w_out, b_out, perm, offsets, h, a)
    ctx.activation, ctx.backend = activation, backend
    ctx.mark_non_differentiable(h, a)
    # h and a never get a gradient: without this autograd would fill a zero [T, Fi] and [T, F]
    # tensor for them on every backward (two memsets of 93 MB each at the VLMo FFN's size)
    ctx.set_materialize_grads(False)


def _ffn_backward(ctx, dy, _dh, _da):
    x, w_in, b_in, w_out, b_out, perm, offsets, h, a = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if dy is None or not any(needs[:5]):
        return (None,) * 9
    dx, dw_in, db_in, dw_out, db_out = modality_ffn_bwd(
        dy.contiguous(), x, w_in, b_in, w_out, b_out, perm, offsets, h, a, ctx.activation, ctx.backend)
    return (dx if needs[0] else None,
            dw_in if needs[1] else None,
            db_in if b_in is not None and needs[2] else None,
            dw_out if needs[3] else None,
            db_out if b_out is not None and needs[4] else None,
            None, None, None, None)


modality_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)
