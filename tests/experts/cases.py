"""Inputs shared by the experts tests (tests/experts/)."""
from __future__ import annotations

import torch

import mmkernels
from mmkernels.experts import activations
from mmkernels.experts.reference import modality_ffn_reference, modality_linear_reference

ACTS = list(activations.ACTIVATIONS)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def make_ids(shape, e: int, layout: str = "random", seed: int = 0, dtype=torch.int64) -> torch.Tensor:
    """Modality ids of ``shape`` in ``[0, e)``. layout: ``random``; ``empty`` (expert 1 owns no
    token when e > 1); ``one`` (every token in the last expert); ``first`` (every token in expert 0)."""
    ids = torch.randint(0, e, tuple(shape), generator=gen(seed))
    if layout == "empty" and e > 1:
        ids[ids == 1] = 0
    elif layout == "one":
        ids.fill_(e - 1)
    elif layout == "first":
        ids.fill_(0)
    return ids.to(dtype)


def linear_params(e, h_in, h_out, bias=True, seed=10):
    w = randn(e, h_out, h_in, seed=seed, scale=h_in ** -0.5)
    b = randn(e, h_out, seed=seed + 1, scale=0.5) if bias else None
    return [w, b]


def ffn_params(e, h_in, f, h_out, activation="gelu", bias=True, seed=20):
    fi = 2 * f if activation == "swiglu" else f
    w_in = randn(e, fi, h_in, seed=seed, scale=h_in ** -0.5)
    b_in = randn(e, fi, seed=seed + 1, scale=0.5) if bias else None
    w_out = randn(e, h_out, f, seed=seed + 2, scale=f ** -0.5)
    b_out = randn(e, h_out, seed=seed + 3, scale=0.5) if bias else None
    return [w_in, b_in, w_out, b_out]


def leaf(t, dtype=None):
    if t is None:
        return None
    t = t.detach().clone() if dtype is None else t.detach().to(dtype).clone()
    return t.requires_grad_()


def run(kind: str, backend: str, x, ids, params, dy, activation="gelu", dtype=None):
    """Forward and backward of ``kind`` ("linear" | "ffn") on ``backend`` ("reference" calls the
    reference functions directly, with a dense ids tensor). Returns ``[y, dx, d<param>...]`` (None
    for absent parameters)."""
    x = leaf(x, dtype)
    ps = [leaf(p, dtype) for p in params]
    if backend == "reference":
        if not isinstance(ids, torch.Tensor):
            ids = mmkernels.experts.routing.split_ids(x.shape[0], x.shape[1], ids, x.device)
        if kind == "linear":
            y = modality_linear_reference(x, ids, *ps)
        else:
            y = modality_ffn_reference(x, ids, *ps, activation)
    else:
        with mmkernels.backend(backend):
            if kind == "linear":
                y = mmkernels.modality_linear(x, ids, *ps)
            else:
                y = mmkernels.modality_ffn(x, ids, *ps, activation)
    y.backward(dy.to(y.dtype))
    return [y, x.grad] + [None if p is None else p.grad for p in ps]


def names(kind: str):
    return ["y", "dx", "dweight", "dbias"] if kind == "linear" else ["y", "dx", "dw_in", "db_in", "dw_out", "db_out"]



def check_grads(label: str, kind: str, got, x, ids, params, dy, activation, dtype) -> None:
    """``got`` (what ``run`` returned in ``dtype``) against the reference in float64, under the
    eager rule ("eager" is the reference in ``dtype``); ``label`` names the backend or path."""
    from mmkernels.testing.numerics import assert_close
    ref = run(kind, "reference", x, ids, params, dy, activation, torch.float64)
    eager = run(kind, "reference", x, ids, params, dy, activation, dtype)
    for name, g, r, e in zip(names(kind), got, ref, eager):
        if r is None:
            assert g is None, name
            continue
        assert g is not None, f"{name}: no gradient"
        assert g.dtype == dtype, f"{name}: dtype {g.dtype}, expected {dtype}"
        assert torch.isfinite(g).all(), name
        assert_close(g, r, dtype, eager=e, name=f"{label} {kind} {name}")

def record_launches(monkeypatch):
    """Patch the weight-gradient launch and the grouped GEMM to record what runs:
    ``("wgrad", kind, E of the launch)`` and ``("mm", kind)``."""
    from mmkernels.experts.grouped_mm.kernels import launch as L  # the module the launchers call through
    seen = []
    real_wgrad, real_mm = L.launch_wgrad, L.launch_grouped_mm

    def wgrad(kind, a, x, dw, *args, **kw):
        seen.append(("wgrad", kind, dw.shape[0]))
        return real_wgrad(kind, a, x, dw, *args, **kw)

    def mm(kind, *args, **kw):
        seen.append(("mm", kind))
        return real_mm(kind, *args, **kw)

    monkeypatch.setattr(L, "launch_wgrad", wgrad)
    monkeypatch.setattr(L, "launch_grouped_mm", mm)
    return seen
