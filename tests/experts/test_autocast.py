"""The experts ops under ``torch.autocast``: the drop-in contract of mixed-precision training.

A model trained with autocast keeps fp32 parameters and runs its ``nn.Linear`` layers in the
autocast dtype, so a multiway layer receives bf16/fp16 activations beside fp32 weights. The
fused modules must then behave as the per-expert ``nn.Linear`` s they replace: run in the
autocast dtype, return it, and give fp32 gradients to the fp32 parameters. CPU autocast runs
the same rule as CUDA autocast, so this is tested here on every backend (triton through the
interpreter).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import MultiwayFFN, MultiwayLinear
from mmkernels.testing.numerics import assert_close
from tests.experts.cases import randn
from tests.helpers.peer_models import LlamaMLP, TimmMlp
from tests.helpers.backends import require_backend

BACKENDS = ["reference", "cpu", "triton"]
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _require(backend):
    require_backend(backend, "experts", "experts_linear_fwd")


def _routed(experts, x, ids):
    """The model as written: every expert on every token, each token keeps its expert's row."""
    out = 0
    for e, expert in enumerate(experts):
        out = out + (ids == e).unsqueeze(-1) * expert(x)
    return out


def _rounded64(module, dtype):
    """A float64 copy of ``module`` whose parameters went through ``dtype`` first: what autocast
    computes on, evaluated exactly."""
    m = copy.deepcopy(module)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype))
    return m.double()


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _case(kind):
    """(per-expert modules, fused module, x, ids) at odd sizes with ragged experts."""
    torch.manual_seed(5)
    if kind == "linear":
        experts = nn.ModuleList([nn.Linear(24, 20) for _ in range(3)])
        fused = MultiwayLinear.from_experts(list(experts))
    elif kind == "gelu":
        experts = nn.ModuleList([TimmMlp(24, 40) for _ in range(2)])
        fused = MultiwayFFN.from_experts(list(experts))
    else:
        experts = nn.ModuleList([LlamaMLP(24, 36) for _ in range(2)])
        fused = MultiwayFFN.from_experts(list(experts))
        assert fused.activation == "swiglu"
    e = len(experts)
    ids = torch.randint(0, e, (2, 13), generator=torch.Generator().manual_seed(6))
    ids[1, :5] = e - 1
    return experts, fused, randn(2, 13, 24, seed=7, dtype=torch.float32), ids


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["linear", "gelu", "swiglu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_modules_follow_autocast_like_the_experts_they_replace(backend, kind, dtype):
    """fp32 parameters, fp32 input, autocast on: output and dx in the autocast dtype's precision,
    fp32 parameter gradients, all matching the per-expert nn modules under the same autocast."""
    _require(backend)
    experts, fused, x, ids = _case(kind)
    dy = randn(2, 13, experts[0](x).shape[-1], seed=8, dtype=torch.float32)

    ref = _rounded64(experts, dtype)
    xr = x.to(dtype).double().requires_grad_()
    _routed(ref, xr, ids).backward(dy.double())
    xe = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        eager = _routed(experts, xe, ids)
    assert eager.dtype == dtype
    eager.backward(dy.to(dtype))

    xf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype), mmkernels.backend(backend):
        y = fused(xf, ids)
    assert y.dtype == dtype, f"{backend}: autocast {dtype} gave a {y.dtype} output"
    y.backward(dy.to(dtype))
    assert xf.grad.dtype == torch.float32
    with torch.no_grad():
        r = _routed(ref, xr.detach(), ids)
    assert_close(y, r, dtype, eager=eager, scale=2.0, name=f"{backend} output")
    assert_close(xf.grad, xr.grad, dtype, eager=xe.grad, scale=2.0, name=f"{backend} dx")

    got, want, eag = _grads(fused), _grads(ref), _grads(experts)
    for name, g in got.items():
        assert g is not None and g.dtype == torch.float32, f"{name}: gradient {None if g is None else g.dtype}"
    if kind == "linear":
        pairs = {"weight": "weight", "bias": "bias"}
    elif kind == "gelu":
        pairs = {"w_in": "fc1.weight", "b_in": "fc1.bias", "w_out": "fc2.weight", "b_out": "fc2.bias"}
    else:
        pairs = {"w_out": "down_proj.weight"}
        for e in range(len(experts)):  # w_in[e] = [gate; up]
            cat = lambda gs: torch.cat([gs[f"{e}.gate_proj.weight"], gs[f"{e}.up_proj.weight"]])
            assert_close(got["w_in"][e], cat(want), dtype, eager=cat(eag), scale=2.0, name=f"w_in[{e}]")
    for fused_name, name in pairs.items():
        for e in range(len(experts)):
            assert_close(got[fused_name][e], want[f"{e}.{name}"], dtype, eager=eag[f"{e}.{name}"],
                         scale=2.0, name=f"{backend} {fused_name}[{e}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_activations_with_fp32_weights(backend):
    """The mixed case autocast training produces (a bf16 activation from the previous layer, fp32
    parameters) runs under autocast and is refused, with the dtype error, without it."""
    _require(backend)
    experts, fused, x, ids = _case("gelu")
    xb = x.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), mmkernels.backend(backend):
        y = fused(xb, ids)
        expected = _routed(experts, xb, ids)
    assert y.dtype == torch.bfloat16
    assert_close(y, _routed(_rounded64(experts, torch.bfloat16), xb.double(), ids), torch.bfloat16,
                 eager=expected, scale=2.0)
    with mmkernels.backend(backend), pytest.raises(TypeError, match="dtype"):
        fused(xb, ids)


def test_autocast_leaves_float64_and_disabled_regions_alone():
    """autocast casts neither float64 (as for nn.Linear) nor anything inside ``enabled=False``."""
    _require("cpu")
    experts, fused, x, ids = _case("linear")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.autocast("cpu", enabled=False):
            assert fused(x, ids).dtype == torch.float32
        fused64 = copy.deepcopy(fused).double()
        assert fused64(x.double(), ids).dtype == torch.float64


def test_split_position_form_under_autocast():
    """The int split position (BEiT-3, VLMo) takes the same cast as the ids form."""
    _require("cpu")
    experts, fused, x, _ = _case("gelu")
    ids = torch.zeros(2, 13, dtype=torch.int64)
    ids[:, 4:] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        by_position = fused(x, 4)
        by_ids = fused(x, ids)
    assert by_position.dtype == torch.bfloat16
    assert torch.equal(by_position, by_ids)


@pytest.mark.parametrize("op", ["linear", "ffn"])
def test_compiled_under_autocast(op):
    """``torch.compile(fullgraph=True)`` traces the cast: same dtype and values as eager."""
    _require("cpu")
    experts, fused, x, ids = _case("linear" if op == "linear" else "swiglu")
    if op == "linear":
        fn = lambda t: mmkernels.modality_linear(t, ids, fused.weight, fused.bias)
    else:
        fn = lambda t: mmkernels.modality_ffn(t, ids, fused.w_in, fused.b_in, fused.w_out, fused.b_out, "swiglu")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fn(x)
        got = compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
    assert compiled(x).dtype == torch.float32  # outside autocast the compiled graph does not cast
