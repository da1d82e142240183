"""Triton side of the experts routing: the routing kernels, and the launch conventions every
experts kernel shares (input checks, the ALIGN of widths and row strides).

``route_triton(ids, E)`` and ``route_split_triton(B, S, p, device)`` both give ``perm [T]`` int32
(slot -> token) and ``offsets [E + 1]`` int32 (see ``routing``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import DTYPES, check_device
from .routing import MAX_EXPERTS

ROUTE_BLOCK = 1024  # tokens per step of the routing sort (one program, 8 warps)
ROUTE_WARPS = 8
SPLIT_BLOCK = 1024  # slots per program of the position split


@triton.jit
def _route_kernel(ids_ptr, perm_ptr, offsets_ptr, T,
                  E: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Stable counting sort of ``ids [T]`` into ``perm [T]`` and ``offsets [E + 1]`` (one program).

    A first pass sums a one-hot ``[BLOCK, E_PAD]`` of the ids into per-expert counts, whose
    exclusive cumsum is ``offsets``; a second pass ranks each token inside its expert with
    ``tl.cumsum`` of the one-hot and writes ``perm[slot] = token``. No atomics (deterministic).
    """
    experts = tl.arange(0, E_PAD)
    offs = tl.arange(0, BLOCK)
    counts = tl.zeros([E_PAD], tl.int32)
    for start in range(0, T, BLOCK):
        tok = start + offs
        ok = tok < T
        idv = tl.load(ids_ptr + tok, mask=ok, other=-1).to(tl.int32)
        onehot = (idv[:, None] == experts[None, :]).to(tl.int32)
        counts += tl.sum(onehot, 0)
    starts = tl.cumsum(counts, 0) - counts  # exclusive prefix sum: first slot of each expert
    tl.store(offsets_ptr + experts, starts, mask=experts < E)
    tl.store(offsets_ptr + E, tl.sum(counts, 0))
    running = starts
    for start in range(0, T, BLOCK):
        tok = start + offs
        ok = tok < T
        idv = tl.load(ids_ptr + tok, mask=ok, other=-1).to(tl.int32)
        onehot = (idv[:, None] == experts[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot  # earlier tokens of the same expert in this block
        slot = tl.sum(onehot * (rank + running[None, :]), 1)
        tl.store(perm_ptr + slot, tok, mask=ok)
        running += tl.sum(onehot, 0)


@triton.jit
def _route_split_kernel(perm_ptr, offsets_ptr, B, S, P, BLOCK: tl.constexpr):
    """``perm`` for ``x [B, S, H]`` split at position ``P``: slots ``0 .. B*P-1`` hold the first
    ``P`` positions of each sample in order, the rest the other ``S - P``; ``offsets = [0, B*P,
    B*S]`` (written by program 0)."""
    pid = tl.program_id(0)
    slots = pid * BLOCK + tl.arange(0, BLOCK)
    T = B * S
    n0 = B * P
    first = slots < n0
    rest = slots - n0
    p0 = tl.maximum(P, 1)  # divisors of the side a slot is not on may be 0
    p1 = tl.maximum(S - P, 1)
    sample = tl.where(first, slots // p0, rest // p1)
    pos = tl.where(first, slots % p0, P + rest % p1)
    tl.store(perm_ptr + slots, sample * S + pos, mask=slots < T)
    if pid == 0:
        which = tl.arange(0, 4)
        tl.store(offsets_ptr + which, tl.where(which == 0, 0, tl.where(which == 1, n0, T)),
                 mask=which < 3)


def align_of(*values: int) -> int:
    """The largest power of two <= 16 dividing every value (0 counts as divisible).

    Launchers pass widths and row strides divided by it and the kernels multiply back by the
    ``ALIGN`` constexpr, so Triton sees 16-byte aligned rows at widths such as 88 or 200.
    """
    al = 16
    while al > 1 and any(int(v) % al for v in values):
        al //= 2
    return al


def is_aligned(dtype: torch.dtype, align: int) -> bool:
    """Rows of ``align``-divisible widths are 16-byte aligned (vector loads, async copies)."""
    return align * dtype.itemsize >= 16


def check_launch(x: torch.Tensor, offsets: torch.Tensor) -> int:
    """The checks every experts launcher makes on its tokens ``x [T, H]`` (a device Triton can
    run on; float32/bfloat16/float16) and routing ``offsets [E + 1]``; returns ``E``."""
    check_device(x)
    if x.dtype not in DTYPES:
        raise TypeError(f"the triton experts kernels take float32/bfloat16/float16, got {x.dtype}")
    E = offsets.numel() - 1
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the triton experts kernels take 1..{MAX_EXPERTS} experts, got {E}")
    return E


def empty_of(ref: torch.Tensor) -> torch.Tensor:
    """``empty(0)`` with ``ref``'s dtype and device: a gradient that is not wanted."""
    return torch.empty(0, dtype=ref.dtype, device=ref.device)


def route_triton(ids: torch.Tensor, E: int):
    """Stable counting sort of ``ids [T]`` (int32/int64 in [0, E)).

    Returns ``(perm int32 [T], offsets int32 [E + 1])``; one program, no host sync.
    """
    check_device(ids)
    E = int(E)
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"route_triton takes 1..{MAX_EXPERTS} experts, got {E}")
    ids = ids.reshape(-1)
    T = ids.numel()
    dev = ids.device
    perm = torch.empty(T, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    if T == 0:
        offsets.zero_()
        return perm, offsets
    ids = ids.contiguous()
    # one BLOCK for every T: no recompilation per sequence length
    _route_kernel[(1,)](ids, perm, offsets, T, E=E, E_PAD=max(2, triton.next_power_of_2(E)),
                        BLOCK=ROUTE_BLOCK, num_warps=ROUTE_WARPS, num_stages=1)
    return perm, offsets


def route_split_triton(batch: int, seq: int, split_position: int, device):
    """``(perm int32 [batch * seq], offsets int32 [3])`` of the position split, computed as
    arithmetic in one launch."""
    device = torch.device(device)
    T = batch * seq
    if not 0 <= split_position <= seq:
        raise ValueError(f"split position must lie in [0, {seq}], got {split_position}")
    perm = torch.empty(T, dtype=torch.int32, device=device)
    offsets = torch.empty(3, dtype=torch.int32, device=device)
    check_device(perm)
    grid = (max(1, triton.cdiv(T, SPLIT_BLOCK)),)
    _route_split_kernel[grid](perm, offsets, batch, seq, split_position, BLOCK=SPLIT_BLOCK,
                              num_warps=4, num_stages=1)
    return perm, offsets


ROUTE_KINDS = ("route", "route_split")


def compile_specs(kind: str, E: int = 2, T: int = 4096):
    """``(kernel, signature, constexprs, divisible_by_16)`` of a routing launch for
    mmkernels.testing.sm90: ``"route"`` (int64 ids of ``T`` tokens, ``E`` experts) or
    ``"route_split"`` (VLMo-like: 64 samples of 237 tokens split at 40). Both run with
    ``ROUTE_WARPS`` / 4 warps and one stage."""
    from ..testing.sm90 import launch_signature
    if kind == "route":
        sig = {"ids_ptr": "*i64", "perm_ptr": "*i32", "offsets_ptr": "*i32"}
        constexprs = {"E": E, "E_PAD": max(2, triton.next_power_of_2(E)), "BLOCK": ROUTE_BLOCK}
        return (_route_kernel, *launch_signature(sig, {"T": T}, constexprs))
    if kind == "route_split":
        sig = {"perm_ptr": "*i32", "offsets_ptr": "*i32"}
        return (_route_split_kernel,
                *launch_signature(sig, {"B": 64, "S": 237, "P": 40}, {"BLOCK": SPLIT_BLOCK}))
    raise ValueError(f"unknown routing kernel kind {kind!r}; known: {ROUTE_KINDS}")
