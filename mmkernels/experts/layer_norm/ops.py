"""Registered ops of the per-modality LayerNorm (namespace ``mmkernels``).

Tokens ``x [T, H]`` are routed to ``E`` experts by a :class:`~mmkernels.experts.routing.Routing` (``perm [T]``
int32: slot -> token; ``offsets [E + 1]`` int32), as for the experts' GEMMs; each token is
normalised over its ``H`` features and scaled and shifted by its expert's ``weight [E, H]`` and
``bias [E, H]`` (VLMo's ``norm2_text`` / ``norm2_imag`` / ``norm2_vl``, BEiT-3's multiway
LayerNorms).

``mmkernels::modality_layer_norm_fwd(x, weight, bias | None, perm, offsets, eps, dw_experts,
backend)`` returns ``y [T, H]`` in x's dtype (token order) and the per-token ``mean [T]`` and
``rstd [T]`` (float32; float64 for float64 ``x``) its backward reuses.
``mmkernels::modality_layer_norm_bwd(dy, x, weight, bias, perm, offsets, mean, rstd, needs_dx,
dw_experts, backend)`` returns ``(dx | empty(0), dw | empty(0), db | empty(0))``: ``dx`` when
``needs_dx``; ``dw [E, H]`` (in weight's dtype) and ``db [E, H]`` (in bias's dtype, when a bias
is given) when any flag of ``dw_experts`` is set, with zero slices for the experts whose flag is
off (they get no work) and for experts with no tokens. The masks follow the rule of the GEMM
ops (``mmkernels/experts/grouped_mm/ops.py``).

``weight`` and ``bias`` have x's dtype, or float32 beside bfloat16/float16 ``x`` (fp32
LayerNorm parameters beside low-precision activations, which ``F.layer_norm`` also takes).
``backend`` is ``"cpu"`` (C++, ``mmkernels/csrc/experts_layer_norm.cpp``) or ``"triton"``
(``kernels.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ... import _ext
from ..routing import unknown_backend, wanted_experts


def _norm_kernels():
    from . import kernels  # imported lazily: triton is optional
    return kernels


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the saved ``mean`` and ``rstd``: float64 for float64 ``x``, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mmkernels::modality_layer_norm_fwd", mutates_args=())
def modality_layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            perm: torch.Tensor, offsets: torch.Tensor, eps: float, dw_experts: list[bool],
                            backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        return tuple(_ext.C.experts_layer_norm_fwd(x, perm, offsets, weight, bias, eps))
    if backend == "triton":
        return tuple(_norm_kernels().layer_norm_fwd_triton(x, perm, offsets, weight, bias, eps))
    raise unknown_backend("modality_layer_norm_fwd", backend)


@modality_layer_norm_fwd.register_fake
def _(x, weight, bias, perm, offsets, eps, dw_experts, backend):
    t = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(t, dtype=stats_dtype(x)), x.new_empty(t, dtype=stats_dtype(x))


@torch.library.custom_op("mmkernels::modality_layer_norm_bwd", mutates_args=())
def modality_layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            perm: torch.Tensor, offsets: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                            needs_dx: bool, dw_experts: list[bool], backend: str
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (dy, x, perm, offsets, weight, bias, mean, rstd, needs_dx, list(dw_experts))
    if backend == "cpu":
        return tuple(_ext.C.experts_layer_norm_bwd(*args))
    if backend == "triton":
        return tuple(_norm_kernels().layer_norm_bwd_triton(*args))
    raise unknown_backend("modality_layer_norm_bwd", backend)


@modality_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, perm, offsets, mean, rstd, needs_dx, dw_experts, backend):
    needs_dw = any(dw_experts)
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if needs_dw else weight.new_empty(0)
    db = bias.new_empty(bias.shape) if needs_dw and bias is not None else weight.new_empty(0)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, weight, bias, perm, offsets, eps, dw_experts, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, perm, offsets, mean, rstd)
    ctx.dw_experts, ctx.backend = dw_experts, backend
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero [T] gradients for mean and rstd


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, perm, offsets, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = wanted_experts(ctx.dw_experts, needs[1], bias is not None and needs[2])
    if dy is None or not (needs[0] or any(mask)):
        return (None,) * 8
    dx, dw, db = modality_layer_norm_bwd(dy.contiguous(), x, weight, bias, perm, offsets, mean, rstd,
                                         needs[0], mask, ctx.backend)
    return (dx if needs[0] else None,
            dw if needs[1] else None,
            db if bias is not None and needs[2] else None,
            None, None, None, None, None)


modality_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)
