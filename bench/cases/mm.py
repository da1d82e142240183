"""torch.mm rate probes: the matrix-product rate of the device the suite runs on.

Other families compare their effective throughput (nominal FLOPs / time) with
the rate of a plain ``torch.mm`` of the same dtype and inner dimension, timed
the same way on the same device (a GEMM-bound op cannot beat it by much).
"""

from __future__ import annotations

from typing import Optional

import torch

from bench.harness import Case, Provider

FAMILY = "mm"


def _torch_mm(a, b):
    return torch.mm(a, b)


def make_mm_inputs(case: Case) -> dict:
    M, K, N = case.shape["M"], case.shape["K"], case.shape["N"]
    g = torch.Generator(device=case.device).manual_seed(case.seed)
    # random data, never zeros: a product of zeros runs measurably faster
    a = torch.randn(M, K, generator=g, device=case.device).to(case.torch_dtype)
    b = torch.randn(K, N, generator=g, device=case.device).to(case.torch_dtype)
    return {"a": a, "b": b}


def probe(M: int, K: int, N: int, dtype: str, device: str) -> Case:
    return Case(
        family=FAMILY,
        op="mm",
        shape={"M": M, "K": K, "N": N},
        dtype=dtype,
        device=device,
        make_inputs=make_mm_inputs,
        providers=(Provider("torch.mm", _torch_mm),),
        mode="fwd",
        flops=2.0 * M * K * N,
        flops_formula="2*M*K*N",
        x="K",
        rate_probe=True,
    )


def probes_for(device: str, profile: str, ks, dtype: str) -> list:
    """Probes with inner dimension K for each K in ``ks`` (and, on GPU, the 8192^3 peak)."""
    if device.startswith("cuda"):
        mn = 8192
        out = [probe(mn, k, mn, dtype, device) for k in ks]
        if profile != "pytest":
            out.append(probe(8192, 8192, 8192, dtype, device))
        return out
    mn = {"pytest": 512, "quick": 2048}.get(profile, 4096)
    return [probe(mn, k, mn, dtype, device) for k in ks]


def cases(device: str, profile: str, overrides: Optional[dict] = None) -> list:
    overrides = overrides or {}
    if device.startswith("cuda"):
        ks = overrides.get("K") or overrides.get("D") or ([768] if profile == "quick" else [512, 768, 1024])
        return probes_for(device, profile, ks, "bfloat16")
    ks = overrides.get("K") or overrides.get("D") or ([64] if profile == "pytest" else [512])
    return probes_for(device, profile, ks, "float32")


def notes(device: str, profile: str) -> list:
    return []
