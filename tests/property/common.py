"""The tiers and backends every property test is parametrised by, and the call that runs it."""
from __future__ import annotations

import pytest
import torch

from mmkernels.testing import property as prop

#: the quick parametrisation first (tests/conftest.py marks each backend's first case quick)
TIERS = [pytest.param("quick", id="quick"), pytest.param("ci", id="ci", marks=pytest.mark.slow)]

#: backends whose numerics are checked against the reference: the forced kernels and ``auto``
#: (the paths built from PyTorch's own ops); ``reference`` in the case's dtype is the eager
#: computation itself, so the 2x-eager rule could not fail on it
BACKENDS = ["cpu", "triton", "auto"]

#: backends of the properties that hold exactly (the samplers): every one, ``reference`` included
ALL_BACKENDS = ["reference", "cpu", "triton", "auto"]


def run(request, tier: str, check) -> int:
    """Draw and check cases of ``check(draw)`` for the running test; returns how many ran."""
    checked = prop.run_property(request.node.nodeid, tier, check)
    request.node.user_properties.append(("property_cases", checked))
    return checked


def magnitude(draw, name: str, dtype, lo: float = 1e-3, hi: float = 1e4) -> float:
    """A log-uniform magnitude in ``[lo, hi]``, ``hi`` lowered to what ``dtype`` holds with room
    (:func:`mmkernels.testing.property.safe_magnitude`)."""
    return draw.log_uniform(name, lo, min(hi, prop.safe_magnitude(dtype)))


def layouts(draw, names, ndim_of: dict) -> dict:
    """A drawn memory layout for each name (0-dim and 1-dim tensors stay contiguous)."""
    return {n: draw.layout(f"layout_{n}") for n in names if ndim_of.get(n, 2) >= 2}


def attention_allowance(fn, values: dict, cotangent, dtype, scale: float | None):
    """The ``attention`` bound of :data:`mmkernels.testing.numerics.NUMERICS_EXCEPTIONS`,
    ``{"attention": {"out": ..., "dq": ..., "dk": ..., "dv": ...}}``, as a callable for
    ``check_op``. Two roundings every fast attention carries, bounded from the case's values:

    * the scores ``s = scale q.k`` rounded in float32 (eager too, but in another order): each
      probability is off by a relative ``2 eps32 max|s|``, so ``out`` by at most
      ``2 eps32 max|s| max|v|`` and ``dv = P^T dO`` by ``2 eps32 max|s| max(P^T |dO|)``;
    * the backward's ``delta_i = sum_d dO_id O_id`` from O rounded to the dtype (FlashAttention's
      formula; eager sums ``P dP`` with the very ``dP`` it subtracts it from), and ``dP - delta``
      perturbed by the score rounding: ``dS_ij`` off by at most ``P_ij A_i`` with
      ``A_i = (2 eps + 6 eps32 max|s|) sum_d |dO_id| max|v|``, so ``dq_i`` by
      ``scale A_i (P |k|)_i`` and ``dk_j`` by ``scale (P^T (A |q|))_j``.

    ``P`` products come from the op's float64 reference (``fn`` with the same mask, dropout and
    scale). ``values``: float64 ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]``; ``cotangent``: dO.
    """
    def bounds():
        import mmkernels
        q, k, v = (values[n].to(torch.float64) for n in ("q", "k", "v"))
        g = (torch.ones_like(q) if cotangent is None else cotangent.to(torch.float64)).expand_as(q)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s_max = float((s * q @ kk.transpose(-1, -2)).abs().max()) if q.numel() and k.numel() else 0.0
        eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
        v_max = v.abs().max() if v.numel() else torch.zeros((), dtype=torch.float64)
        a = (2 * eps + 6 * eps32 * s_max) * g.abs().sum(-1, keepdim=True) * v_max
        with mmkernels.backend("reference"):
            p_abs_k = fn(q, k, k.abs())
            probe = v.clone().requires_grad_(True)
            fn(q, k, probe).backward(a * q.abs())
            probe_dv = v.clone().requires_grad_(True)
            fn(q, k, probe_dv).backward(g.abs())
        return {"attention": {"out": 2 * eps32 * s_max * float(v_max),
                              "dv": 2 * eps32 * s_max * float(probe_dv.grad.abs().max()),
                              "dq": float((s * a * p_abs_k).abs().max()),
                              "dk": float((s * probe.grad).abs().max())}}
    return bounds
