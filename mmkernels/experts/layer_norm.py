"""The per-modality LayerNorm: ``modality_layer_norm`` and ``MultiwayLayerNorm``.

VLMo normalises each modality with its own LayerNorm before its expert FFN (``norm2_text``,
``norm2_imag``, ``norm2_vl``) and BEiT-3 wraps its LayerNorms in torchscale's
``MultiwayNetwork`` (split by position, one LayerNorm per half, concatenate). Routed like the
experts' GEMMs (same routing, same ``modality_ids`` or split position), one kernel normalises
every token with its modality's scale and shift, so a multiway block needs no split and
concatenation at all.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import nn

from .. import _autocast
from .. import _validation as check
from .api import (_check_experts, _check_ids, _check_x, _dense_ids, _per_expert, _resolve, _route,
                  _trains)
from .norm_ops import modality_layer_norm_fwd
from .parameters import (ExpertModule, check_experts_list, check_num_experts, copy_experts_, expert_data,
                         expert_parameter, same_placement)
from .reference import modality_layer_norm_reference

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# apex's fused LayerNorms (torchscale imports FusedLayerNorm when apex is installed): same
# attributes and semantics as nn.LayerNorm
_FOREIGN_LAYER_NORMS = ("FusedLayerNorm", "MixedFusedLayerNorm")


def _check_norm_param(t, name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    check.tensor(t, name, 2)
    check.floating(t, name)
    check.same_device(("x", x), (name, t))
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but weight has {like.dtype}; they must agree")
    elif t.dtype != x.dtype and not (x.dtype in _LOW_PRECISION and t.dtype == torch.float32):
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; it must have x's dtype, or float32 "
                        "beside bfloat16/float16 x")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def modality_layer_norm(x: torch.Tensor, modality_ids, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        eps: float = 1e-5) -> torch.Tensor:
    """A LayerNorm with one scale and shift per modality: ``y[t] = norm(x[t]) * weight[e] + bias[e]``.

    ``norm`` subtracts each token's mean over its ``H`` features and divides by the square root
    of their (biased) variance plus ``eps``, as ``nn.LayerNorm(H)``; ``e = ids[t]``.

    Args:
        x: ``[..., H]`` float32/bfloat16/float16 (float64 on the cpu/reference backends).
        modality_ids: as in :func:`mmkernels.modality_linear`: an int tensor shaped
            ``x.shape[:-1]`` with values in ``[0, E)``, or an int split position for
            ``x [B, S, H]`` with two experts.
        weight: ``[E, H]``, ``1 <= E <= 8``, or a sequence of ``E`` tensors ``[H]``; x's dtype, or
            float32 beside bfloat16/float16 ``x``.
        bias: ``[E, H]`` (or ``E`` tensors ``[H]``) in weight's dtype, or ``None``.
        eps: added to the variance.

    Returns:
        ``[..., H]`` in x's dtype; gradients flow to ``x``, ``weight`` and ``bias``. The
        backward reuses the per-token mean and reciprocal standard deviation of the forward
        (``2 T`` floats).

    Under ``torch.autocast`` on CUDA, x, weight and bias are cast to float32 first and the
    result is float32, as autocast does for ``F.layer_norm`` there; CPU autocast leaves them.
    """
    sources = weight, bias
    weight, bias = _per_expert(weight, "weight"), _per_expert(bias, "bias")
    x, weight, bias = _autocast.norm_precision(x, weight, bias)
    _check_x(x)
    _check_norm_param(weight, "weight", x)
    check.nonempty(weight, "weight")
    e, h = weight.shape
    _check_experts(e, "weight")
    if h != x.shape[-1]:
        raise ValueError(f"weight has H = {h} features (shape [E, H] = {tuple(weight.shape)}) but x has "
                         f"{x.shape[-1]}")
    if bias is not None:
        _check_norm_param(bias, "bias", x, like=weight)
        if tuple(bias.shape) != (e, h):
            raise ValueError(f"bias must have shape [E, H] = [{e}, {h}] to match weight, got {tuple(bias.shape)}")
    eps = _check_eps(eps)
    kind, ids = _check_ids(modality_ids, x, e)
    which = _resolve(x)
    if which == "reference":
        return modality_layer_norm_reference(x, _dense_ids(kind, ids, x), weight, bias, eps)
    perm, offsets = _route(kind, ids, x, e, which)
    y, _, _ = modality_layer_norm_fwd(x.reshape(-1, h), weight, bias, perm, offsets, eps,
                                      _trains(*sources, e), which)
    return y.reshape(x.shape)


def is_layer_norm(m) -> bool:
    """An ``nn.LayerNorm``, or one of apex's fused LayerNorms (same attributes and semantics)."""
    return isinstance(m, nn.LayerNorm) or type(m).__name__ in _FOREIGN_LAYER_NORMS


class MultiwayLayerNorm(ExpertModule):
    """``nn.LayerNorm`` with one scale and shift per modality expert.

    Args:
        normalized_shape: ``H``, the features normalised (an int, or a one-element sequence).
        num_experts: ``E``, 1..8.
        eps: added to the variance.
        bias: learn ``bias [E, H]`` (``nn.LayerNorm(bias=False)`` when off).
        per_expert_parameters: hold each expert's scale and shift as parameters of their own
            (``nn.ParameterList`` s sharing one storage), so one expert can be frozen; see
            ``mmkernels/experts/parameters.py``.

    Parameters ``weight [E, H]`` (ones) and ``bias [E, H]`` (zeros), or their per-expert lists.

    ``forward(x [..., H], modality_ids) -> [..., H]``; see :func:`modality_layer_norm`.
    """

    EXPERT_PARAMETERS = ("weight", "bias")

    def __init__(self, normalized_shape, num_experts: int = 2, eps: float = 1e-5, bias: bool = True,
                 device=None, dtype=None, per_expert_parameters: bool = False):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
        if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], numbers.Integral) \
                or shape[0] < 1:
            raise ValueError(f"normalized_shape must be one positive int (the last dimension), got {normalized_shape!r}")
        self.normalized_shape = (int(shape[0]),)
        self.num_experts = check_num_experts(num_experts)
        self.eps = _check_eps(eps)
        self.per_expert_parameters = bool(per_expert_parameters)
        kw = dict(device=device, dtype=dtype)
        self.weight = expert_parameter(num_experts, self.normalized_shape, self.per_expert_parameters, **kw)
        self.bias = expert_parameter(num_experts, self.normalized_shape, self.per_expert_parameters, **kw) \
            if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for e in range(self.num_experts):
            nn.init.ones_(expert_data(self.weight, e))
            if self.bias is not None:
                nn.init.zeros_(expert_data(self.bias, e))

    def forward(self, x: torch.Tensor, modality_ids) -> torch.Tensor:
        return modality_layer_norm(x, modality_ids, self.weight, self.bias, self.eps)

    @classmethod
    def from_experts(cls, norms: Sequence[nn.Module], per_expert_parameters: bool = False) -> "MultiwayLayerNorm":
        """One ``MultiwayLayerNorm`` holding exact copies of ``norms`` (expert ``e`` = ``norms[e]``):
        ``nn.LayerNorm`` s (or apex ``FusedLayerNorm`` s, which torchscale uses when installed),
        e.g. VLMo's ``[norm2_text, norm2_imag, norm2_vl]`` or the ``A`` and ``B`` of a torchscale
        ``MultiwayNetwork`` around a LayerNorm.

        They must agree in ``normalized_shape`` (one dimension), ``eps``, bias presence, dtype
        and device, and have a learnable scale (``elementwise_affine=True``). ``requires_grad`` is
        copied as by :meth:`MultiwayLinear.from_experts`.
        """
        norms = check_experts_list(norms, "LayerNorms")
        for i, ln in enumerate(norms):
            if not is_layer_norm(ln):
                raise TypeError(f"from_experts: expert {i} is a {type(ln).__name__}, not an nn.LayerNorm")
            if getattr(ln, "weight", None) is None:
                raise ValueError(f"from_experts: expert {i} has no learnable scale (elementwise_affine=False); "
                                 "a LayerNorm without one is the same for every modality: use nn.LayerNorm")
            if len(tuple(ln.normalized_shape)) != 1:
                raise ValueError(f"from_experts: expert {i} normalises over {tuple(ln.normalized_shape)}; only "
                                 "the last dimension (a one-element normalized_shape) is supported")
        first = norms[0]
        for i, ln in enumerate(norms[1:], 1):
            if tuple(ln.normalized_shape) != tuple(first.normalized_shape):
                raise ValueError(f"from_experts: expert {i} normalises {tuple(ln.normalized_shape)} features but "
                                 f"expert 0 {tuple(first.normalized_shape)}")
            if ln.eps != first.eps:
                raise ValueError(f"from_experts: expert {i} has eps={ln.eps} but expert 0 eps={first.eps}; one "
                                 "MultiwayLayerNorm has one eps")
            if (ln.bias is None) != (first.bias is None):
                raise ValueError("from_experts: some experts have a bias and others do not")
        same_placement([ln.weight for ln in norms], "from_experts")
        parts = {"weight": list(enumerate(ln.weight for ln in norms))}
        if first.bias is not None:
            parts["bias"] = list(enumerate(ln.bias for ln in norms))
        w = first.weight
        module = cls(tuple(first.normalized_shape), len(norms), eps=first.eps, bias=first.bias is not None,
                     device=w.device, dtype=w.dtype, per_expert_parameters=per_expert_parameters)
        copy_experts_(module, parts)
        return module

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, num_experts={self.num_experts}, eps={self.eps}, "
                f"bias={self.bias is not None}" + (", per_expert_parameters=True" if self.per_expert_parameters else ""))


__all__ = ["MultiwayLayerNorm", "modality_layer_norm"]
