"""What the cross_attention family's two modules share: the family and op names, small tensor
helpers, and the probe of whether ``mmkernels.cross_attention`` runs on a device and dtype (the
``mmkernels`` checks of both the ``cross_attention`` and the ``qformer`` op use it).

``bench.cases.cross_attention`` (the ``cross_attention`` and ``kv_projection`` ops, the family's
``cases`` / ``notes`` / ``agree``) and ``bench.cases.qformer_step`` (the ``qformer`` op) import from
here; this module imports neither.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from bench.cases.common import first_line

FAMILY = "cross_attention"
OP_XATTN, OP_KV, OP_QFORMER = "cross_attention", "kv_projection", "qformer"


def _loss(out: torch.Tensor, dout: Optional[torch.Tensor]):
    if dout is None:
        return out
    return (out * dout).sum(dtype=torch.promote_types(out.dtype, torch.float32))


def split_kv(q: torch.Tensor, kv: torch.Tensor) -> tuple:
    """k, v ``[B, H, Lk, D]``: strided views of ``kv [B, Lk, 2*H*D]`` (K columns, then V)."""
    _b, h, _lq, d = q.shape
    b, lk, _w = kv.shape
    k = kv[..., : h * d].view(b, lk, h, d).transpose(1, 2)
    v = kv[..., h * d :].view(b, lk, h, d).transpose(1, 2)
    return k, v


def xattn_mmkernels(q, kv, dout=None):
    """``mmkernels.cross_attention`` on the strided k/v views: the ``cross_attention`` op's
    ``mmkernels`` provider, and what :func:`mmkernels_xattn_support` probes."""
    import mmkernels

    k, v = split_kv(q, kv)
    return _loss(mmkernels.cross_attention(q, k, v), dout)


@functools.lru_cache(maxsize=None)
def mmkernels_xattn_support(device: str, dtype: str) -> Optional[str]:
    """None when ``mmkernels.cross_attention`` runs forward + backward on ``device`` in ``dtype``."""
    try:
        import mmkernels
    except Exception as exc:
        return f"mmkernels not importable ({first_line(exc)})"
    if not hasattr(mmkernels, "cross_attention"):
        return "mmkernels.cross_attention does not exist yet"
    from bench.harness import DTYPES

    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(2, 2, 3, 16, generator=g, device=device).to(DTYPES[dtype]).requires_grad_()
        kv = torch.randn(2, 5, 64, generator=g, device=device).to(DTYPES[dtype]).requires_grad_()
        xattn_mmkernels(q, kv, torch.ones_like(q)).backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:
        from mmkernels import _backend

        try:
            which = _backend.resolve(torch.device(device))
        except Exception:
            which = "?"
        return (f"mmkernels.cross_attention does not run on {device} in {dtype} "
                f"(backend {which}: {first_line(exc)[:200]})")
    return None

