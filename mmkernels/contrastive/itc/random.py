"""The counter-based random numbers of the hard-negative sampler, in torch ops.

Every backend (torch here, C++ in ``csrc/itc.cpp``, Triton in ``kernels.py``) computes the same
32-bit hash of ``(seed, row, column)``, so a seed gives the same draws everywhere and no state
is kept between tiles. With ``fmix32`` MurmurHash3's 32-bit finaliser (``x ^= x >> 16;
x *= 0x85EBCA6B; x ^= x >> 13; x *= 0xC2B2AE35; x ^= x >> 16``, arithmetic mod 2**32):

    h(seed, i, j) = fmix32(fmix32(fmix32(seed) ^ i) ^ (j * 0x9E3779B9))
    u = ((h >> 9) + 0.5) * 2**-23            # float32: 24 significant bits, exact, in (0, 1)
    gumbel = -log(-log(u))                   # float32

``argmax_j (logit_ij + gumbel_ij)`` is then a draw from ``softmax_j(logit_ij)`` (the Gumbel-max
trick). The seed is a 0-dim int64 tensor in ``[0, 2**31)`` drawn from a torch generator.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser on int64 tensors holding uint32 values (the products wrap in
    int64; their low 32 bits are those of the uint32 product)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


def hash32(seed, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``h(seed, i, j)`` (int64 tensors of uint32 values, broadcast) for ``seed`` an int or a
    0-dim int64 tensor."""
    s = torch.as_tensor(seed, dtype=torch.int64, device=i.device) & MASK32
    row = fmix32((fmix32(s) ^ (i.to(torch.int64) & MASK32)))
    return fmix32(row ^ ((j.to(torch.int64) * GOLDEN) & MASK32))


def uniform(seed, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``u`` in (0, 1), float32: ``(h >> 9) + 0.5`` needs 24 significant bits, so it and ``u``
    are exact (``u <= 1 - 2**-24``) and the Gumbel noise is always finite."""
    return ((hash32(seed, i, j) >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def gumbel(seed, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise, float32, for entry ``(i, j)``."""
    return -torch.log(-torch.log(uniform(seed, i, j)))


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A 0-dim int64 seed in ``[0, 2**31)`` from ``generator`` (the default generator of
    ``device`` when None), made on ``device`` so that no host synchronisation is needed."""
    return torch.randint(0, 2 ** 31 - 1, (), generator=generator, device=device, dtype=torch.int64)
