"""Plain-PyTorch cross-attention: the definition of "correct" for the cross_attention family.

``cross_attention_reference`` materialises the ``[B, H, Lq, Lk]`` scores, exactly what HF's eager
Q-Former attention computes, with two differences that every backend shares:

* a query row whose keys are all padding gets ``out = 0``, ``lse = -inf`` and zero gradient
  (never NaN, never HF's uniform average over padding);
* attention dropout uses the project's counter-based mask (:func:`dropout_keep_mask`), a pure
  function of ``(seed, b, h, i, j)`` (:func:`dropout_hash`), so forward and backward (and every
  backend) drop the same probabilities and a run is reproducible from the generator that drew
  the seed. Kept probabilities are scaled by ``1 / (1 - p)``; ``lse`` is that of the scores
  before dropout.
"""
from __future__ import annotations

import math

import torch

from .. import _validation as check
from ..attention.reference import compute_dtype  # noqa: F401 - softmax/lse dtype, shared

MAX_HEAD_DIM = 128
_MASK32 = 0xFFFFFFFF


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a hash drops its probability (``p`` in ``[0, 1)``)."""
    return min(int(math.floor(p * 2.0 ** 32)), _MASK32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of the dropout hash, on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def dropout_hash(seed: torch.Tensor, batch: int, heads: int, lq: int, lk: int) -> torch.Tensor:
    """The uint32 hash ``u`` of every ``(b, h, i, j)`` as int64 ``[B, H, Lq, Lk]``.

    All arithmetic on unsigned 32-bit words, wrapping::

        mix(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
        row     = (b * H + h) * Lq + i
        a       = mix(row * 0x9E3779B9 + s0)
        u       = mix(a + j * 0x85EBCA6B + s1)
        keep    = u >= threshold,  threshold = min(floor(p * 2**32), 2**32 - 1)

    with ``seed = (s0, s1)`` an int64 tensor ``[2]`` of values in ``[0, 2**31)``.
    """
    dev = seed.device
    s0, s1 = seed[0].to(torch.int64), seed[1].to(torch.int64)
    row = torch.arange(batch * heads * lq, device=dev, dtype=torch.int64).view(batch, heads, lq, 1)
    j = torch.arange(lk, device=dev, dtype=torch.int64).view(1, 1, 1, lk)
    a = _mix32(((row * 0x9E3779B9) + s0) & _MASK32)
    return _mix32((a + j * 0x85EBCA6B + s1) & _MASK32)


def dropout_keep_mask(seed: torch.Tensor, shape: tuple[int, int, int, int], p: float) -> torch.Tensor:
    """Bool ``[B, H, Lq, Lk]``: True where attention dropout keeps the probability."""
    b, h, lq, lk = shape
    return dropout_hash(seed, b, h, lq, lk) >= dropout_threshold(p)


def make_seed(device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw the dropout seed: int64 ``[2]`` on ``device``, values in ``[0, 2**31)``.

    Drawn with ``torch.randint`` on the device from ``generator`` (the device's default
    generator when ``None``), so no host synchronisation and CUDA-graph capture works.
    """
    return torch.randint(0, 2 ** 31, (2,), generator=generator, device=device, dtype=torch.int64)


def check_inputs(q, k, v, key_padding_mask, scale, dropout_p) -> float:
    """Validate ``q [B, H, Lq, D]``, ``k``/``v [B, H, Lk, D]``, the mask and dropout; return the scale.

    Raises ``TypeError``/``ValueError`` naming the argument (shared by every backend).
    """
    check.attention_qkv(q, k, v)
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if hk != h:
        raise ValueError(f"q has {h} heads but k/v have {hk}")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is larger than the supported {MAX_HEAD_DIM}")
    if key_padding_mask is not None:
        check.tensor(key_padding_mask, "key_padding_mask", 2)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = {(b, lk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        check.same_device(("q", q), ("key_padding_mask", key_padding_mask))
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return check.softmax_scale(scale, d)


def cross_attention_reference(q, k, v, key_padding_mask=None, *, scale=None, dropout_p=0.0, seed=None,
                              return_lse=False):
    """Softmax attention of ``q`` over ``k``/``v`` with key padding and attention dropout.

    Args:
        q: ``[B, H, Lq, D]`` float32/bfloat16/float16/float64 (any strides).
        k, v: ``[B, H, Lk, D]``, same dtype and device.
        key_padding_mask: bool ``[B, Lk]``, True = attend, or ``None``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        dropout_p: attention dropout probability in ``[0, 1)``.
        seed: int64 ``[2]`` (see :func:`make_seed`); needed when ``dropout_p > 0``.
        return_lse: also return ``lse [B, H, Lq]`` (float32; float64 for float64 inputs).

    Returns:
        ``out [B, H, Lq, D]`` in q's dtype (and ``lse``).
    """
    scale = check_inputs(q, k, v, key_padding_mask, scale, dropout_p)
    if dropout_p > 0 and seed is None:
        raise ValueError("dropout_p > 0 needs a seed")
    cdt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale               # [B, H, Lq, Lk]
    neg_inf = torch.full((), float("-inf"), dtype=cdt, device=q.device)
    if key_padding_mask is not None:
        scores = torch.where(key_padding_mask[:, None, None, :], scores, neg_inf)
    # The shift is a constant for autograd; rows that see nothing use 0 so no inf - inf appears.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    sees = torch.isfinite(row_max)
    shift = torch.where(sees, row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - shift)
    denom = e.sum(dim=-1, keepdim=True)
    safe_denom = torch.where(sees, denom, torch.ones_like(denom))
    p = e / safe_denom
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, tuple(scores.shape), dropout_p)
        p = torch.where(keep, p / (1.0 - dropout_p), torch.zeros_like(p))
    out = torch.matmul(p, vc).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(sees, shift + torch.log(safe_denom), neg_inf)[..., 0]
    return out, lse
