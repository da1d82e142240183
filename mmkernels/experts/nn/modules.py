"""``nn.Module`` front ends of the experts family: ``MultiwayLinear``, ``MultiwayLayerNorm`` and
``MultiwayFFN``, routing every token by ``modality_ids`` (or an int split position).

``from_experts`` builds one from the per-expert modules of an existing model (VLMo/BEiT-3
multiway layers, CogVLM's expert MLPs, timm ``Mlp``) by copying their weights exactly; the
layouts it recognises are in :mod:`mmkernels.integrations.expert_layouts`.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import nn

from .. import activations
from ..grouped_mm.api import modality_ffn, modality_linear
from ..layer_norm.api import check_eps, modality_layer_norm
from .parameters import (ExpertModule, check_experts_list, check_num_experts, copy_experts_, expert_data,
                         expert_parameter, same_placement, set_requires_grad)
from .subln import modality_ffn_subln


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``nn.Linear.reset_parameters`` on one expert's ``weight [out, in]`` and ``bias [out]``."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound)


class MultiwayLinear(ExpertModule):
    """``nn.Linear`` with one weight per modality expert.

    Args:
        in_features, out_features: as ``nn.Linear``.
        num_experts: ``E``, 1..8 (2: text/image; 3: VLMo's text/image/vision-language).
        bias: learn ``bias [E, out_features]``.
        per_expert_parameters: hold each expert's weight and bias as a parameter of its own
            (``weight[e]``, ``bias[e]`` in ``nn.ParameterList`` s sharing one storage), so that
            one expert can be frozen; see ``mmkernels/experts/nn/parameters.py``.

    Parameters ``weight [E, out_features, in_features]`` and ``bias [E, out_features]`` (or
    their per-expert lists), each expert initialised as ``nn.Linear`` would be.

    ``forward(x [..., in_features], modality_ids) -> [..., out_features]``: ``modality_ids`` an
    int tensor shaped ``x.shape[:-1]`` with values in ``[0, E)``, or an int split position for
    ``x [B, S, in_features]`` (``E == 2``). See :func:`mmkernels.modality_linear`.
    """

    EXPERT_PARAMETERS = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, num_experts: int = 2, bias: bool = True,
                 device=None, dtype=None, per_expert_parameters: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.num_experts = check_num_experts(num_experts)
        self.per_expert_parameters = bool(per_expert_parameters)
        kw = dict(device=device, dtype=dtype)
        e, per = num_experts, self.per_expert_parameters
        self.weight = expert_parameter(e, (out_features, in_features), per, **kw)
        self.bias = expert_parameter(e, (out_features,), per, **kw) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for e in range(self.num_experts):
            _init_linear_(expert_data(self.weight, e), None if self.bias is None else expert_data(self.bias, e))

    def forward(self, x: torch.Tensor, modality_ids) -> torch.Tensor:
        return modality_linear(x, modality_ids, self.weight, self.bias)

    @classmethod
    def from_experts(cls, linears: Sequence[nn.Linear], per_expert_parameters: bool = False) -> "MultiwayLinear":
        """One ``MultiwayLinear`` holding exact copies of ``linears`` (expert ``e`` = ``linears[e]``).

        The ``nn.Linear`` s must agree in ``in_features``, ``out_features``, bias presence,
        dtype and device (e.g. CogVLM's ``language_expert_query_key_value`` and
        ``vision_expert_query_key_value``). ``requires_grad`` is copied: with
        ``per_expert_parameters=True`` per expert (a frozen language expert stays frozen, the
        visual one trains); otherwise the experts must agree, and a weight frozen in some
        experts only is refused.
        """
        linears = check_experts_list(linears, "nn.Linear")
        for i, lin in enumerate(linears):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"from_experts: expert {i} is a {type(lin).__name__}, not an nn.Linear")
        first = linears[0]
        for i, lin in enumerate(linears[1:], 1):
            if (lin.in_features, lin.out_features) != (first.in_features, first.out_features):
                raise ValueError(f"from_experts: expert {i} maps {lin.in_features} -> {lin.out_features} "
                                 f"features but expert 0 maps {first.in_features} -> {first.out_features}")
            if (lin.bias is None) != (first.bias is None):
                raise ValueError("from_experts: some experts have a bias and others do not")
        same_placement([lin.weight for lin in linears], "from_experts")
        parts = {"weight": list(enumerate(lin.weight for lin in linears))}
        if first.bias is not None:
            parts["bias"] = list(enumerate(lin.bias for lin in linears))
        w = first.weight
        module = cls(first.in_features, first.out_features, len(linears), bias=first.bias is not None,
                     device=w.device, dtype=w.dtype, per_expert_parameters=per_expert_parameters)
        copy_experts_(module, parts)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, bias={self.bias is not None}"
                + (", per_expert_parameters=True" if self.per_expert_parameters else ""))


class MultiwayLayerNorm(ExpertModule):
    """``nn.LayerNorm`` with one scale and shift per modality expert.

    Args:
        normalized_shape: ``H``, the features normalised (an int, or a one-element sequence).
        num_experts: ``E``, 1..8.
        eps: added to the variance.
        bias: learn ``bias [E, H]`` (``nn.LayerNorm(bias=False)`` when off).
        per_expert_parameters: hold each expert's scale and shift as parameters of their own
            (``nn.ParameterList`` s sharing one storage), so one expert can be frozen; see
            ``mmkernels/experts/nn/parameters.py``.

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
        self.eps = check_eps(eps)
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
        from ...integrations.expert_layouts import is_layer_norm
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


class MultiwayFFN(ExpertModule):
    """A two-layer MLP with one set of weights per modality expert (VLMo/BEiT-3 multiway FFN,
    CogVLM visual-expert MLP).

    Args:
        hidden_size: input width ``H``.
        intermediate_size: ``F``, the width after the activation.
        num_experts: ``E``, 1..8.
        activation: ``"gelu"`` (default), ``"gelu_tanh"``, ``"silu"``, ``"relu"`` or ``"swiglu"``
            (LLaMA/CogVLM: ``silu(gate) * up``, first layer of width ``2F``).
        bias: learn ``b_in`` and ``b_out``.
        out_features: output width (default ``hidden_size``).
        per_expert_parameters: hold each expert's weights and biases as parameters of their own
            (``w_in[e]`` ... in ``nn.ParameterList`` s sharing one storage each), so that one
            expert can be frozen; see ``mmkernels/experts/nn/parameters.py``.
        subln: a per-modality LayerNorm over the ``F`` activations before the second layer
            (``ffn_layernorm``, a :class:`MultiwayLayerNorm`; torchscale's ``subln=True``, which
            BEiT-3 uses), with epsilon ``subln_eps``. The FFN then runs as three routed ops
            (:func:`mmkernels.experts.nn.subln.modality_ffn_subln`) instead of the fused kernel.

    Parameters ``w_in [E, Fi, H]`` (``Fi = 2F`` for swiglu: gate rows, then up rows), ``b_in [E, Fi]``,
    ``w_out [E, out_features, F]``, ``b_out [E, out_features]`` (or their per-expert lists); each
    layer of each expert is initialised as ``nn.Linear`` would be.

    ``forward(x [..., H], modality_ids) -> [..., out_features]``, ``modality_ids`` an int tensor
    shaped ``x.shape[:-1]`` or an int split position (``x [B, S, H]``, two experts).
    """

    EXPERT_PARAMETERS = ("w_in", "b_in", "w_out", "b_out")

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int = 2, activation: str = "gelu",
                 bias: bool = True, out_features: int | None = None, device=None, dtype=None,
                 per_expert_parameters: bool = False, subln: bool = False, subln_eps: float = 1e-5):
        super().__init__()
        self.activation = activations.check_activation(activation)
        self.num_experts = check_num_experts(num_experts)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.out_features = hidden_size if out_features is None else out_features
        fi = 2 * intermediate_size if activation == "swiglu" else intermediate_size
        self.per_expert_parameters = bool(per_expert_parameters)
        kw = dict(device=device, dtype=dtype)
        e, per = num_experts, self.per_expert_parameters
        self.w_in = expert_parameter(e, (fi, hidden_size), per, **kw)
        self.b_in = expert_parameter(e, (fi,), per, **kw) if bias else None
        self.w_out = expert_parameter(e, (self.out_features, intermediate_size), per, **kw)
        self.b_out = expert_parameter(e, (self.out_features,), per, **kw) if bias else None
        self.ffn_layernorm = (MultiwayLayerNorm(intermediate_size, e, eps=subln_eps, per_expert_parameters=per, **kw)
                              if subln else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.ffn_layernorm is not None:
            self.ffn_layernorm.reset_parameters()
        f = self.intermediate_size
        blocks = 2 if self.activation == "swiglu" else 1
        for e in range(self.num_experts):
            for j in range(blocks):  # swiglu: gate and up are two nn.Linear(H, F)
                rows = slice(j * f, (j + 1) * f)
                _init_linear_(expert_data(self.w_in, e)[rows],
                              None if self.b_in is None else expert_data(self.b_in, e)[rows])
            _init_linear_(expert_data(self.w_out, e), None if self.b_out is None else expert_data(self.b_out, e))

    def forward(self, x: torch.Tensor, modality_ids) -> torch.Tensor:
        if self.ffn_layernorm is not None:
            norm = self.ffn_layernorm
            return modality_ffn_subln(x, modality_ids, self.w_in, self.b_in, norm.weight, norm.bias, self.w_out,
                                      self.b_out, self.activation, norm.eps)
        return modality_ffn(x, modality_ids, self.w_in, self.b_in, self.w_out, self.b_out, self.activation)

    @classmethod
    def from_experts(cls, experts: Sequence[nn.Module], activation: str | None = None,
                     per_expert_parameters: bool = False) -> "MultiwayFFN":
        """One ``MultiwayFFN`` holding exact copies of the per-expert MLPs (expert ``e`` = ``experts[e]``).

        Accepted layouts (all experts alike):

        * ``fc1``/``fc2`` ``nn.Linear`` s: torchscale ``FeedForwardNetwork`` (VLMo, BEiT-3), timm
          ``Mlp``; the activation is read from ``activation_fn``/``act_fn``/``act``
          (``F.gelu``, ``nn.GELU``, ``nn.SiLU``, ``nn.ReLU``, HF activations) unless given.
        * ``gate_proj``/``up_proj``/``down_proj`` (CogVLM, LLaMA MLP; timm ``SwiGLU``'s
          ``fc1_g``/``fc1_x``/``fc2``): ``activation = "swiglu"``, ``w_in`` = gate rows then up rows.

        Dropout is not part of the fused FFN (the copy matches the experts in eval mode). A
        LayerNorm between the two layers (torchscale ``subln=True``'s ``ffn_layernorm``, BEiT-3's
        default; timm ``Mlp(norm_layer=nn.LayerNorm)``'s ``norm``) becomes ``ffn_layernorm``
        (``subln``); any other normalisation there is refused.
        ``requires_grad`` is copied: with ``per_expert_parameters=True`` per expert (CogVLM's
        frozen language expert stays frozen while the visual expert trains; an expert's gate and
        up projections must agree); otherwise a layer must be frozen in every expert or in none.
        """
        from ...integrations.expert_layouts import unpack_mlp
        experts = check_experts_list(experts, "expert MLPs")
        if activation is not None:
            activations.check_activation(activation)
        unpacked = [unpack_mlp(m, i, activation) for i, m in enumerate(experts)]
        norms = [u[4] for u in unpacked]
        if any(n is None for n in norms) and any(n is not None for n in norms):
            raise ValueError("from_experts: some experts have a LayerNorm between their two layers and others do not")
        unpacked = [u[:4] for u in unpacked]
        layout, act, firsts, second = unpacked[0]
        for i, (lay, a, fs, sec) in enumerate(unpacked[1:], 1):
            if lay != layout:
                raise ValueError(f"from_experts: expert {i} has layout {lay} but expert 0 has {layout}")
            if a != act:
                raise ValueError(f"from_experts: expert {i} uses activation {a!r} but expert 0 uses {act!r}; "
                                 "pass activation= to choose one")
        swiglu = act == "swiglu"
        fc = [torch.cat([lin.weight for lin in fs]) for _, _, fs, _ in unpacked]
        bi = [None if any(lin.bias is None for lin in fs) else torch.cat([lin.bias for lin in fs])
              for _, _, fs, _ in unpacked]
        for i, (_, _, fs, _) in enumerate(unpacked):
            if any(lin.bias is None for lin in fs) and any(lin.bias is not None for lin in fs):
                raise ValueError(f"from_experts: expert {i}: gate and up projections disagree on having a bias")
        wo = [sec.weight for _, _, _, sec in unpacked]
        bo = [sec.bias for _, _, _, sec in unpacked]
        fi, hidden = fc[0].shape
        out_features, f = wo[0].shape
        for i in range(len(experts)):
            if fc[i].shape != fc[0].shape or wo[i].shape != wo[0].shape:
                raise ValueError(f"from_experts: expert {i} has first/second layer weights of shapes "
                                 f"{tuple(fc[i].shape)}/{tuple(wo[i].shape)} but expert 0 has "
                                 f"{tuple(fc[0].shape)}/{tuple(wo[0].shape)}")
            if (bi[i] is None) != (bi[0] is None) or (bo[i] is None) != (bo[0] is None):
                raise ValueError(f"from_experts: expert {i} and expert 0 differ in which layers have a bias")
        if swiglu and fi != 2 * f:
            raise ValueError(f"from_experts: a gated (swiglu) first layer must have twice the second layer's input "
                             f"width, got {fi} rows and {f}")
        if not swiglu and fi != f:
            raise ValueError(f"from_experts: the first layer has {fi} outputs but the second layer takes {f}")
        same_placement(fc + wo, "from_experts")
        parts = {"w_in": [(e, lin.weight) for e, (_, _, fs, _) in enumerate(unpacked) for lin in fs],
                 "w_out": [(e, sec.weight) for e, (_, _, _, sec) in enumerate(unpacked)]}
        if bi[0] is not None:
            parts["b_in"] = [(e, lin.bias) for e, (_, _, fs, _) in enumerate(unpacked) for lin in fs]
        if bo[0] is not None:
            parts["b_out"] = [(e, sec.bias) for e, (_, _, _, sec) in enumerate(unpacked)]
        w = fc[0]
        module = cls(hidden, f, len(experts), act, bias=True, out_features=out_features, device=w.device,
                     dtype=w.dtype, per_expert_parameters=per_expert_parameters)
        if bi[0] is None:
            module.b_in = None
        if bo[0] is None:
            module.b_out = None
        if norms[0] is not None:
            if tuple(norms[0].normalized_shape) != (f,):
                raise ValueError(f"from_experts: the LayerNorm between the layers normalises "
                                 f"{tuple(norms[0].normalized_shape)} features, but the activation has {f}")
            module.ffn_layernorm = MultiwayLayerNorm.from_experts(norms, per_expert_parameters=per_expert_parameters)
        with torch.no_grad():
            for name, stack in (("w_in", fc), ("w_out", wo), ("b_in", bi), ("b_out", bo)):
                if name in parts:
                    for e, t in enumerate(stack):
                        expert_data(getattr(module, name), e).copy_(t)
        set_requires_grad(module, parts)
        return module

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"out_features={self.out_features}, num_experts={self.num_experts}, "
                f"activation={self.activation!r}, bias={self.b_in is not None or self.b_out is not None}"
                + (", subln=True" if self.ffn_layernorm is not None else "")
                + (", per_expert_parameters=True" if self.per_expert_parameters else ""))
