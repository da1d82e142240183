"""Recognition of the expert layouts of other libraries, for ``from_experts`` and the patches.

``unpack_mlp`` reads one expert MLP (torchscale ``FeedForwardNetwork``, timm ``Mlp``/``SwiGLU``,
HF/CogVLM/LLaMA ``gate_proj``/``up_proj``/``down_proj``) into its layers and activation;
``activation_name`` names a foreign activation function or module; ``is_layer_norm`` accepts
``nn.LayerNorm`` and apex's fused LayerNorms. No library is imported: classes are matched by
attribute or name.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.activations import ACTIVATIONS

# apex's fused LayerNorms (torchscale imports FusedLayerNorm when apex is installed): same
# attributes and semantics as nn.LayerNorm
FOREIGN_LAYER_NORMS = ("FusedLayerNorm", "MixedFusedLayerNorm")


def is_layer_norm(m) -> bool:
    """An ``nn.LayerNorm``, or one of apex's fused LayerNorms (same attributes and semantics)."""
    return isinstance(m, nn.LayerNorm) or type(m).__name__ in FOREIGN_LAYER_NORMS


class ExpertMLP(NamedTuple):
    """One expert MLP as :func:`unpack_mlp` reads it."""

    layout: str  # "fc1_fc2", "gate_up_down" or "timm_swiglu"
    activation: str  # one of ACTIVATIONS
    firsts: list  # the first layer's nn.Linear s (gate then up for swiglu)
    second: nn.Linear
    norm: nn.Module | None  # the LayerNorm between the layers (torchscale subln), or None


# activations of foreign modules: HF transformers' ACT2FN classes by name, config strings
HF_ACTIVATION_CLASSES = {
    "GELUActivation": "gelu", "GELU": "gelu",
    "PytorchGELUTanh": "gelu_tanh", "GELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
    "SiLUActivation": "silu", "SiLU": "silu", "Swish": "silu",
    "ReLU": "relu",
}
ACTIVATION_STRINGS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                       "gelu_new": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}


def activation_name(fn) -> str | None:
    """The activation name (one of ``ACTIVATIONS``) of a function/module as found on foreign MLPs, or None if unknown."""
    if isinstance(fn, str):
        return ACTIVATION_STRINGS.get(fn)
    if isinstance(fn, functools.partial):
        if fn.func in (F.gelu, torch.nn.functional.gelu) and not fn.args:
            approx = fn.keywords.get("approximate", "none")
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
        return None
    if fn in (F.gelu,):
        return "gelu"
    if fn in (F.relu, torch.relu):
        return "relu"
    if fn in (F.silu,):
        return "silu"
    if isinstance(fn, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(fn.approximate)
    if isinstance(fn, nn.ReLU):
        return "relu"
    if isinstance(fn, nn.SiLU):
        return "silu"
    if isinstance(fn, nn.Module):  # HF transformers' ACT2FN classes, by name (no import needed)
        return HF_ACTIVATION_CLASSES.get(type(fn).__name__)
    return None


def find_activation(module: nn.Module) -> tuple[bool, str | None]:
    """``(found, name)``: whether ``module`` has an activation attribute, and what it is (None: unknown)."""
    for attr in ("activation_fn", "act_fn", "act", "activation"):
        if hasattr(module, attr):
            return True, activation_name(getattr(module, attr))
    return False, None


def is_identity(m) -> bool:
    """No module in that place: ``None`` or an ``nn.Identity``."""
    return m is None or isinstance(m, nn.Identity)


def expert_linear(module: nn.Module, attr: str, index: int) -> nn.Linear:
    """The ``nn.Linear`` at ``module.<attr>`` of expert ``index`` (a TypeError otherwise)."""
    lin = getattr(module, attr)
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"from_experts: expert {index}.{attr} is a {type(lin).__name__}, not an nn.Linear")
    return lin


def unpack_mlp(module: nn.Module, index: int, activation: str | None) -> ExpertMLP:
    """The :class:`ExpertMLP` of expert ``index``, a foreign MLP module; ``activation`` (one of
    ``ACTIVATIONS``, or ``None`` to read it from the module) as ``MultiwayFFN.from_experts``
    takes it. Raises ValueError (TypeError for a non-Linear layer) on layouts it does not take."""
    if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
        layout, firsts, second = "gate_up_down", ["gate_proj", "up_proj"], "down_proj"
    elif all(hasattr(module, a) for a in ("fc1_g", "fc1_x", "fc2")):
        layout, firsts, second = "timm_swiglu", ["fc1_g", "fc1_x"], "fc2"
    elif hasattr(module, "fc1") and hasattr(module, "fc2"):
        layout, firsts, second = "fc1_fc2", ["fc1"], "fc2"
    else:
        raise ValueError(
            f"from_experts: expert {index} ({type(module).__name__}) has an unknown layout; expected an MLP "
            "with fc1/fc2 (VLMo/BEiT-3 torchscale FeedForwardNetwork, timm Mlp) or gate_proj/up_proj/down_proj "
            "(CogVLM/LLaMA MLP); build a MultiwayFFN and copy the weights by hand otherwise")
    if hasattr(module, "chunk_dim"):  # timm GluMlp: fc1 output chunked, gate in the *second* half
        raise ValueError(f"from_experts: expert {index} is a timm {type(module).__name__} (gated fc1 with the "
                         "gate in its second half), which MultiwayFFN does not take")
    norm = None
    for attr in ("ffn_layernorm", "norm"):  # torchscale subln=True (BEiT-3's default); timm Mlp(norm_layer=)
        m = getattr(module, attr, None)
        if is_identity(m):
            continue
        if not is_layer_norm(m):
            raise ValueError(f"from_experts: expert {index} has a {type(m).__name__} ({attr}) between its two "
                             "layers; only a LayerNorm (torchscale subln) is supported there")
        if norm is not None:
            raise ValueError(f"from_experts: expert {index} has two normalisation layers between its two layers")
        norm = m
    found, inferred = find_activation(module)
    if layout in ("gate_up_down", "timm_swiglu"):
        if activation is not None and activation != "swiglu":
            raise ValueError(f"from_experts: expert {index} is a gated MLP ({'/'.join(firsts)}); its activation "
                             f"can only be 'swiglu', got activation={activation!r}")
        if activation is None and inferred != "silu":
            raise ValueError(f"from_experts: expert {index} is a gated MLP whose activation "
                             f"({'unknown' if not found else inferred or 'unrecognised'}) is not SiLU; only "
                             "silu(gate) * up (swiglu) is supported (pass activation='swiglu' to force it)")
        act = "swiglu"
    else:
        act = activation if activation is not None else inferred
        if act is None:
            raise ValueError(f"from_experts: cannot tell the activation of expert {index} "
                             f"({type(module).__name__}); pass activation= one of {ACTIVATIONS}")
    lins = [expert_linear(module, a, index) for a in firsts]
    return ExpertMLP(layout, act, lins, expert_linear(module, second, index), norm)


__all__ = ["ExpertMLP", "activation_name", "is_layer_norm", "unpack_mlp"]
