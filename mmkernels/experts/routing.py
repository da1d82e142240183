"""Routing of tokens to modality experts: a stable counting sort, on the device, no host sync.

A :class:`Routing` describes the *sorted order* of ``T`` tokens: slot ``s`` holds token
``perm[s]``; expert ``e`` owns slots ``offsets[e] .. offsets[e+1]-1``; inside one expert,
tokens keep their original order (stable). Kernels gather input rows and scatter output rows
through ``perm``; no permuted copy of the activations is ever made.

``route(ids, E)`` sorts by ``modality_ids``; ``route_split(B, S, p)`` is the position-split
fast path (BEiT-3 ``split_position``, VLMo text-then-image): ``x`` viewed ``[B, S, H]``, positions
``< p`` are expert 0 and the rest expert 1. It gives exactly the permutation ``route`` would
give for the equivalent ids, so both forms produce identical results.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

MAX_EXPERTS = 8


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
        from .route_kernels import route_triton
        return Routing(*route_triton(ids.reshape(-1), num_experts))
    return route_torch(ids, num_experts)


def route_split(batch: int, seq: int, split_position: int, device, backend: str = "cpu") -> Routing:
    """Routing for ``x [batch, seq, H]`` where positions ``< split_position`` use expert 0.

    Arithmetic only (no sort, no ids tensor): slots ``0 .. batch*p - 1`` are the first ``p``
    positions of each sample in order, then the remaining positions. On the triton backend one
    kernel launch (``route_split_triton``), torch ops otherwise.
    """
    if backend == "triton":
        from .route_kernels import route_split_triton
        return Routing(*route_split_triton(batch, seq, split_position, device))
    p = split_position
    pos = torch.arange(seq, device=device, dtype=torch.int32)
    base = torch.arange(batch, device=device, dtype=torch.int32)[:, None] * seq
    perm = torch.cat([(base + pos[:p]).reshape(-1), (base + pos[p:]).reshape(-1)])
    # fill kernels take the values as arguments: torch.tensor([...], device="cuda") and
    # `offsets[i] = v` are host-to-device copies from pageable memory (seen in the H200 profile),
    # which a captured CUDA graph cannot contain
    offsets = torch.empty(3, dtype=torch.int32, device=device)
    for i, v in enumerate((0, batch * p, batch * seq)):
        offsets.narrow(0, i, 1).fill_(v)
    return Routing(perm, offsets)


def split_ids(batch: int, seq: int, split_position: int, device) -> torch.Tensor:
    """The ``modality_ids [batch, seq]`` (int64) equivalent to a position split."""
    ids = torch.ones(batch, seq, dtype=torch.int64, device=device)
    ids[:, :split_position] = 0
    return ids
