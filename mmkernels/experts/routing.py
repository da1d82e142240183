"""Routing of tokens to modality experts, and the input checks every experts op shares.

A :class:`Routing` describes the *sorted order* of ``T`` tokens: slot ``s`` holds token
``perm[s]``; expert ``e`` owns slots ``offsets[e] .. offsets[e+1]-1``; inside one expert,
tokens keep their original order (stable). Kernels gather and scatter rows through ``perm``;
no permuted copy of the activations is made. ``route`` sorts by ``modality_ids``;
``route_split`` is the position split (BEiT-3 ``split_position``) and gives exactly the
permutation ``route`` gives for the equivalent ids. No host synchronisation.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
from torch import nn

from .. import _storage
from .. import _validation as check

MAX_EXPERTS = 8
ID_DTYPES = (torch.int32, torch.int64)


class Routing(NamedTuple):
    perm: torch.Tensor     # [T] int32: slot -> token
    offsets: torch.Tensor  # [E + 1] int32: first slot of each expert, offsets[E] = T


def route_torch(ids: torch.Tensor, num_experts: int) -> Routing:
    """Stable sort of ``ids [T]`` (int, values in ``[0, E)``) with torch ops (no host sync)."""
    ids = ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.long(), torch.ones_like(ids, dtype=torch.int64))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    perm = torch.sort(ids, stable=True).indices.to(torch.int32)
    return Routing(perm, offsets)


def route(ids: torch.Tensor, num_experts: int, backend: str = "cpu") -> Routing:
    """Route ``ids [T]``: the Triton counting-sort kernel on the triton backend, torch otherwise."""
    if backend == "triton":
        from .routing_kernels import route_triton
        return Routing(*route_triton(ids.reshape(-1), num_experts))
    return route_torch(ids, num_experts)


def route_split(batch: int, seq: int, split_position: int, device, backend: str = "cpu") -> Routing:
    """Routing for ``x [batch, seq, H]`` where positions ``< split_position`` use expert 0.

    Arithmetic only (no sort, no ids tensor): slots ``0 .. batch*p - 1`` are the first ``p``
    positions of each sample in order, then the remaining positions. On the triton backend one
    kernel launch (``route_split_triton``), torch ops otherwise.
    """
    if backend == "triton":
        from .routing_kernels import route_split_triton
        return Routing(*route_split_triton(batch, seq, split_position, device))
    p = split_position
    pos = torch.arange(seq, device=device, dtype=torch.int32)
    base = torch.arange(batch, device=device, dtype=torch.int32)[:, None] * seq
    perm = torch.cat([(base + pos[:p]).reshape(-1), (base + pos[p:]).reshape(-1)])
    # fills take the values as arguments: torch.tensor([...], device="cuda") and `offsets[i] = v`
    # are host-to-device copies, which a captured CUDA graph cannot contain
    offsets = torch.empty(3, dtype=torch.int32, device=device)
    for i, v in enumerate((0, batch * p, batch * seq)):
        offsets.narrow(0, i, 1).fill_(v)
    return Routing(perm, offsets)


def split_ids(batch: int, seq: int, split_position: int, device) -> torch.Tensor:
    """The ``modality_ids [batch, seq]`` (int64) equivalent to a position split."""
    ids = torch.ones(batch, seq, dtype=torch.int64, device=device)
    ids[:, :split_position] = 0
    return ids


# ----------------------------------------------------------------------------- shared input checks

def check_x(x) -> torch.Tensor:
    """``x [..., H]``: a floating tensor of rank >= 1 with a non-empty feature dimension."""
    check.tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., H_in] (at least 1 dimension), got shape {tuple(x.shape)}")
    check.floating(x, "x")
    if x.shape[-1] == 0:
        raise ValueError(f"x has an empty feature dimension (shape {tuple(x.shape)})")
    return x


def check_param(t, name: str, ndim: int, x: torch.Tensor) -> torch.Tensor:
    """A weight or bias of rank ``ndim``: floating, non-empty, with x's dtype and device."""
    check.tensor(t, name, ndim)
    check.floating(t, name)
    check.same_dtype(("x", x), (name, t))
    check.same_device(("x", x), (name, t))
    check.nonempty(t, name)
    return t


def check_experts(e: int, name: str) -> None:
    """``e``, the leading dimension of parameter ``name``, lies in ``1..MAX_EXPERTS``."""
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"{name} must hold 1..{MAX_EXPERTS} experts (dim 0), got {e}")


def check_bias(b, name: str, e: int, width: int, x: torch.Tensor, of: str) -> None:
    """``b`` is ``None`` or a ``[e, width]`` parameter (``of`` names the weight it belongs to)."""
    if b is None:
        return
    check_param(b, name, 2, x)
    if tuple(b.shape) != (e, width):
        raise ValueError(f"{name} must have shape [E, {width}] = [{e}, {width}] to match {of}, "
                         f"got {tuple(b.shape)}")


def check_ids(ids, x: torch.Tensor, num_experts: int):
    """Validate ``modality_ids``; return ``("ids", tensor)`` or ``("split", position)``.

    A tensor: int32/int64 of shape ``x.shape[:-1]`` with values in ``[0, num_experts)`` (on
    CUDA an asynchronous device assert). An int: a split position ``p`` in ``[0, S]`` for
    ``x [B, S, H]`` and two experts.
    """
    if isinstance(ids, bool):
        raise TypeError("modality_ids must be an integer tensor or an int split position, got a bool")
    if not isinstance(ids, (int, torch.Tensor)) and isinstance(ids, numbers.Integral):
        ids = int(ids)  # numpy integers
    if isinstance(ids, int):
        if x.dim() != 3:
            raise ValueError("a split position (int modality_ids) needs x of shape [B, S, H_in], "
                             f"got shape {tuple(x.shape)}")
        if num_experts != 2:
            raise ValueError(f"a split position (int modality_ids) routes to 2 experts, but the weights "
                             f"hold {num_experts}; pass a modality_ids tensor")
        s = x.shape[1]
        if not 0 <= ids <= s:
            raise ValueError(f"split position (modality_ids) must lie in [0, {s}] (S = {s}), got {ids}")
        return "split", ids
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"modality_ids must be an integer tensor or an int split position, "
                        f"got {type(ids).__name__}")
    if ids.dtype == torch.bool:
        raise TypeError("modality_ids must be int32 or int64, got torch.bool (a mask is not an expert index; "
                        "use mask.long() for two experts)")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"modality_ids must be int32 or int64, got {ids.dtype}")
    if tuple(ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"modality_ids must have x's leading shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(ids.shape)}")
    check.same_device(("x", x), ("modality_ids", ids))
    check.index_range(ids, "modality_ids", num_experts)
    return "ids", ids


# ----------------------------------------------------------------------------- per-expert weights

def untouched_experts(modality_ids, x) -> tuple[bool, ...]:
    """Per expert, whether it certainly receives no token, known without reading the device.

    A split position ``p`` of ``x [B, S, H]`` leaves expert 0 untouched when ``p == 0`` and
    expert 1 when ``p == S`` (torchscale's ``split_position`` 0 and -1): ``(p == 0, p == S)``.
    For an ids tensor the counts exist only on the device, so ``()``: every expert counts as
    touched (deciding would cost a host synchronisation and make the graph depend on data).
    """
    if isinstance(modality_ids, bool) or not isinstance(modality_ids, numbers.Integral) \
            or not isinstance(x, torch.Tensor) or x.dim() != 3:
        return ()
    p = int(modality_ids)
    return (p == 0, p == x.shape[1])


def without_untouched(t, untouched: tuple[bool, ...]):
    """``t`` with the tensors of the ``untouched`` experts detached, when ``t`` is a sequence of
    per-expert tensors (anything else as given). An expert that receives no token then gets no
    gradient (``.grad`` stays ``None``, as in a model that never calls it, so an optimiser
    neither decays nor moves it) and costs no weight-gradient work; an ``[E, ...]`` tensor
    cannot drop one expert and gets a zero slice."""
    if not any(untouched) or not isinstance(t, (list, tuple, nn.ParameterList)):
        return t
    return [p.detach() if i < len(untouched) and untouched[i] and isinstance(p, torch.Tensor) else p
            for i, p in enumerate(t)]


def per_expert(t, name: str):
    """``t`` as one ``[E, ...]`` tensor: a tensor (or ``None``) as given; a list, tuple or
    ``nn.ParameterList`` of per-expert tensors stacked, without a copy when they lie back to
    back in one storage, gradients flowing to each."""
    if isinstance(t, (list, tuple, nn.ParameterList)):
        return _storage.stacked(t, name)
    return t


def grad_flags(w, b, e: int) -> list[bool]:
    """Per expert, whether its slice of weight ``w`` or bias ``b`` (each an ``[E, ...]`` tensor,
    a sequence of per-expert tensors, or ``None``) requires a gradient: the op's weight-gradient
    mask, so a frozen (or untouched, detached) per-expert parameter costs no weight-gradient work."""
    def flags(t):
        if t is None:
            return [False] * e
        if isinstance(t, torch.Tensor):
            return [t.requires_grad] * e
        return [bool(p.requires_grad) for p in t]
    return [wf or bf for wf, bf in zip(flags(w), flags(b))]


def dense_ids(kind: str, ids, x: torch.Tensor) -> torch.Tensor:
    """The ids tensor of a checked ``(kind, ids)`` (``check_ids``), for the reference backend."""
    if kind == "split":
        return split_ids(x.shape[0], x.shape[1], ids, x.device)
    return ids


def route_tokens(kind: str, ids, x: torch.Tensor, num_experts: int, backend: str) -> Routing:
    """The :class:`Routing` of a checked ``(kind, ids)`` (``check_ids``) on ``backend``."""
    if kind == "split":
        return route_split(x.shape[0], x.shape[1], ids, x.device, backend)
    return route(ids.reshape(-1), num_experts, backend)


# ----------------------------------------------------------------------------- shared by the ops

def unknown_backend(op: str, backend: str) -> ValueError:
    """The error of a registered op called with a backend other than ``cpu`` or ``triton``."""
    return ValueError(f"{op}: unknown backend {backend!r} (expected 'cpu' or 'triton')")


def wanted_experts(mask, *needs: bool) -> list[bool]:
    """The weight-gradient mask a backward hands on: the forward's per-expert flags where
    autograd wants the layer's weight or bias gradient (``needs``), no flag otherwise; every
    flag if the forward's mask left every expert out although a gradient is wanted (a direct
    call of the op)."""
    if not any(needs):
        return [False] * len(mask)
    return list(mask) if any(mask) else [True] * len(mask)
