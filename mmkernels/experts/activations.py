"""Activations of the expert FFN, in plain PyTorch (the definitions every backend matches).

``gelu`` (erf form), ``gelu_tanh`` (tanh approximation), ``silu``, ``relu`` act elementwise on
``h [..., F]``. ``swiglu`` takes ``h [..., 2F]`` whose first half is the gate and second half
the up projection (CogVLM / LLaMA MLP with ``gate_proj`` and ``up_proj`` concatenated) and
returns ``silu(gate) * up [..., F]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "swiglu")


def check_activation(name) -> str:
    """``name`` if it is one of ``ACTIVATIONS`` (a ValueError otherwise)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def inner_width(activation: str, fi: int) -> int:
    """Width F of the activation output for a first-layer output width ``fi``."""
    return fi // 2 if activation == "swiglu" else fi


def apply(activation: str, h: torch.Tensor) -> torch.Tensor:
    """``act(h)``: ``h [..., Fi]`` -> ``[..., F]`` (``F = Fi / 2`` for swiglu)."""
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
