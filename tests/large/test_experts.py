"""Modality experts past 2**31 elements: ``x [T, H]`` with ``T * H > 2**31`` (bf16, E = 2).

Narrow outputs keep the FLOPs small (H -> 8 linear, H -> 8 -> 16 FFN); the LayerNorm is
elementwise. Each test runs the whole op on the big tensor, then checks rows at the start, the
middle and the end (whose flat offsets in ``x`` exceed 2**31 - 1) against the float64 reference
evaluated on those rows alone, and the weight gradients (sums over every token) against float64
sums that use ``x``'s period (``tests.large.memory.uniform``: rows repeat every 4099, so a read
of the wrong row changes the sums). The reference backend's input gradient would hold three
copies of ``x`` (its boolean-mask gathers); it computes the weight gradients only (the GEMMs) or
none (the LayerNorm).
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from mmkernels.experts import activations
from mmkernels.experts.reference import (modality_ffn_reference, modality_layer_norm_reference,
                                         modality_linear_reference)
from mmkernels.testing.numerics import assert_close
from tests.large.memory import INT32_MAX, PERIOD, fold_rows, probe_rows, require_memory, uniform

pytestmark = pytest.mark.slow

E = 2
H = 2048
T = (INT32_MAX + 1) // H + 4096  # x has 2**31 + 2**23 elements
X_BYTES = T * H * 2
BACKENDS = ("cpu", "reference")


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, E, (T,), generator=g)


def _x(requires_grad):
    return uniform(T, H, seed=0).requires_grad_(requires_grad)


def _weight_grad(x, ids, dy):
    """float64 ``dW[k] = sum_{t: ids[t] = k} dy[t]^T x[t]`` and ``db[k]`` for the periodic ``x``."""
    dw = torch.stack([fold_rows(dy * (ids == k)[:, None]).T @ x[:PERIOD].double() for k in range(E)])
    db = torch.stack([(dy.double() * (ids == k)[:, None]).sum(0) for k in range(E)])
    return dw, db


@pytest.mark.parametrize("backend", BACKENDS)
def test_modality_linear(backend):
    require_memory(int(2.6 * X_BYTES) if backend == "cpu" else int(2.3 * X_BYTES),
                   f"modality_linear over {T * H} elements")
    x_grad = backend == "cpu"
    x, ids = _x(x_grad), _ids()
    w = uniform(E, 8, H, seed=2, low=-0.05, high=0.05).requires_grad_()
    b = uniform(E, 8, seed=3).requires_grad_()
    dy = uniform(T, 8, seed=4)
    with mmkernels.backend(backend):
        y = mmkernels.modality_linear(x, ids, w, b)
        y.backward(dy)
    for rows in probe_rows(T, H):
        xs = x.detach()[rows].double().requires_grad_()
        ref = modality_linear_reference(xs, ids[rows], w.detach().double(), b.detach().double())
        assert_close(y[rows], ref, name=f"y[{rows.start}:{rows.stop}]")
        if x_grad:
            ref.backward(dy[rows].double())
            assert_close(x.grad[rows], xs.grad, name=f"dx[{rows.start}:{rows.stop}]")
    del y
    dw, db = _weight_grad(x.detach(), ids, dy)
    assert_close(w.grad, dw, name="dW")
    assert_close(b.grad, db, name="db")


def _ffn_weight_grads(x, ids, params, dy, activation):
    """float64 gradients of every FFN parameter: the whole op on the periodic ``x``, its hidden
    layer computed on the ``PERIOD`` distinct rows and gathered per token."""
    wi, bi, wo, bo = (p.detach().double().requires_grad_() for p in params)
    h_all = torch.einsum("ph,efh->epf", x[:PERIOD].double(), wi)  # [E, P, F]
    h = h_all[ids, torch.arange(T) % PERIOD] + bi[ids]
    a = activations.apply(activation, h)
    y = sum((ids == k)[:, None] * (a @ wo[k].T + bo[k]) for k in range(E))
    (y * dy.double()).sum().backward()
    return [p.grad for p in (wi, bi, wo, bo)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_modality_ffn(backend):
    require_memory(int(2.6 * X_BYTES) if backend == "cpu" else int(2.3 * X_BYTES),
                   f"modality_ffn over {T * H} elements")
    x_grad = backend == "cpu"
    x, ids = _x(x_grad), _ids()
    params = [uniform(E, 8, H, seed=2, low=-0.05, high=0.05), uniform(E, 8, seed=3),
              uniform(E, 16, 8, seed=5, low=-0.3, high=0.3), uniform(E, 16, seed=6)]
    for p in params:
        p.requires_grad_()
    dy = uniform(T, 16, seed=4)
    with mmkernels.backend(backend):
        y = mmkernels.modality_ffn(x, ids, *params, activation="gelu")
        y.backward(dy)
    for rows in probe_rows(T, H):
        xs = x.detach()[rows].double().requires_grad_()
        ref = modality_ffn_reference(xs, ids[rows], *(p.detach().double() for p in params), activation="gelu")
        assert_close(y[rows], ref, name=f"y[{rows.start}:{rows.stop}]")
        if x_grad:
            ref.backward(dy[rows].double())
            assert_close(x.grad[rows], xs.grad, name=f"dx[{rows.start}:{rows.stop}]")
    del y
    # sums over every token of terms rounded to bf16 (the hidden layer is kept in bf16): compared
    # relative to the largest entry, where the per-token roundings of a cancelling entry average out
    for p, ref, name in zip(params, _ffn_weight_grads(x.detach(), ids, params, dy, "gelu"),
                            ("dW_in", "db_in", "dW_out", "db_out")):
        top = ref.abs().max()
        assert_close(p.grad.double() / top, ref / top, torch.bfloat16, name=f"{name} / max|{name}|")


@pytest.mark.parametrize("backend", BACKENDS)
def test_modality_layer_norm(backend):
    """Forward, and on the cpu backend the weight and bias gradients under a gradient that is
    one row repeated (a stride-0 view). The reference backend's backward would hold more copies
    of ``x`` than fit beside it (and sums its bf16 gradients in bf16): forward only there."""
    require_memory(int(3.1 * X_BYTES), f"modality_layer_norm over {T * H} elements")
    backward = backend == "cpu"
    x, ids = _x(False), _ids()
    w = uniform(E, H, seed=2, low=0.5, high=1.5).requires_grad_(backward)
    b = uniform(E, H, seed=3).requires_grad_(backward)
    dy_row = uniform(H, seed=4)
    with mmkernels.backend(backend):
        y = mmkernels.modality_layer_norm(x, ids, w, b)
        if backward:
            y.backward(dy_row.expand(T, H))
    for rows in probe_rows(T, H):
        ref = modality_layer_norm_reference(x[rows].double(), ids[rows], w.detach().double(),
                                            b.detach().double())
        assert_close(y[rows], ref, name=f"y[{rows.start}:{rows.stop}]")
    del y
    if not backward:
        return
    # dW[k] = dy_row * sum of the normalised rows of expert k: x repeats every PERIOD rows
    xp = x[:PERIOD].double()
    xhat = (xp - xp.mean(1, keepdim=True)) / torch.sqrt(xp.var(1, unbiased=False, keepdim=True) + 1e-5)
    counts = torch.stack([fold_rows((ids == k).double()[:, None])[:, 0] for k in range(E)])  # [E, P]
    assert_close(w.grad, (counts @ xhat) * dy_row.double(), name="dW")
    assert_close(b.grad, counts.sum(1, keepdim=True) * dy_row.double(), name="db")
