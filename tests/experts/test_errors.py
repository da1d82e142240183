"""Bad input to modality_linear / modality_ffn raises a clear TypeError/ValueError before any kernel runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mmkernels
from mmkernels.experts import routing
from mmkernels.experts.grouped_mm import api

B, S, H, F_, HO, E = 2, 5, 8, 12, 6, 3


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)


X = _x(B, S, H)
IDS = torch.randint(0, E, (B, S), generator=torch.Generator().manual_seed(1))
W, BIAS = _x(E, HO, H), _x(E, HO)
W_IN, B_IN, W_OUT, B_OUT = _x(E, F_, H), _x(E, F_), _x(E, HO, F_), _x(E, HO)


@pytest.fixture(params=["reference", "cpu", "triton"])
def no_kernels(request, monkeypatch):
    """Run under each backend with the routing and the registered ops replaced by tripwires."""
    def tripwire(*args, **kwargs):
        raise AssertionError("a kernel or the routing ran before the input was validated")

    for name in ("modality_linear_fwd", "modality_ffn_fwd", "modality_linear_reference", "modality_ffn_reference"):
        monkeypatch.setattr(api, name, tripwire)
    monkeypatch.setattr(routing, "route", tripwire)
    monkeypatch.setattr(routing, "route_split", tripwire)
    with mmkernels.backend(request.param):
        yield request.param


def _linear(x=X, ids=IDS, weight=W, bias=BIAS):
    return mmkernels.modality_linear(x, ids, weight, bias)


def _ffn(x=X, ids=IDS, w_in=W_IN, b_in=B_IN, w_out=W_OUT, b_out=B_OUT, activation="gelu"):
    return mmkernels.modality_ffn(x, ids, w_in, b_in, w_out, b_out, activation)


LINEAR_CASES = {
    "x not a tensor": (dict(x=X.numpy()), TypeError, "x must be a torch.Tensor"),
    "x 0-dim": (dict(x=X[0, 0, 0], ids=IDS[0, 0]), ValueError, "x must have shape"),
    "x integer": (dict(x=X.long()), TypeError, "x must be float32"),
    "x no features": (dict(x=X[..., :0]), ValueError, "empty feature"),
    "weight rank": (dict(weight=W[0]), ValueError, "weight must have 3 dimensions"),
    "weight H_in": (dict(weight=W[..., :4]), ValueError, "H_in = 4"),
    "weight dtype": (dict(weight=W.half()), TypeError, "weight has dtype torch.float16"),
    "weight integer": (dict(weight=W.long()), TypeError, "weight must be float32"),
    "weight 9 experts": (dict(weight=_x(9, HO, H), bias=None), ValueError, "1..8"),
    "weight 0 experts": (dict(weight=W[:0], bias=None), ValueError, "weight is empty"),
    "weight not a tensor": (dict(weight=W.tolist()), TypeError, r"weight\[0\] must be a torch.Tensor, got list"),
    "weight a string": (dict(weight="W"), TypeError, "weight must be a torch.Tensor"),
    "bias rank": (dict(bias=BIAS[0]), ValueError, "bias must have 2 dimensions"),
    "bias H_out": (dict(bias=BIAS[:, :3]), ValueError, r"bias must have shape \[E, 6\]"),
    "bias experts": (dict(bias=BIAS[:2]), ValueError, r"bias must have shape"),
    "bias dtype": (dict(bias=BIAS.double()), TypeError, "bias has dtype"),
    "ids too large": (dict(ids=IDS + 1), ValueError, r"modality_ids must lie in \[0, 3\), found 3"),
    "ids negative": (dict(ids=IDS - 1), ValueError, r"modality_ids must lie in \[0, 3\), found -1"),
    "ids bool": (dict(ids=IDS > 0), TypeError, "torch.bool"),
    "ids float": (dict(ids=IDS.float()), TypeError, "int32 or int64"),
    "ids int16": (dict(ids=IDS.short()), TypeError, "int32 or int64"),
    "ids uint8": (dict(ids=IDS.to(torch.uint8)), TypeError, "int32 or int64"),
    "ids shape": (dict(ids=IDS[:, :3]), ValueError, "leading shape"),
    "ids flat": (dict(ids=IDS.reshape(-1)), ValueError, "leading shape"),
    "ids list": (dict(ids=IDS.tolist()), TypeError, "modality_ids must be an integer tensor"),
    "ids bool scalar": (dict(ids=True), TypeError, "bool"),
    "ids float scalar": (dict(ids=2.0), TypeError, "modality_ids must be an integer tensor"),
    "ids on meta": (dict(ids=IDS.to("meta")), ValueError, "device"),
    "weight on meta": (dict(weight=W.to("meta")), ValueError, "device"),
    "split with 3 experts": (dict(ids=2), ValueError, "2 experts"),
    "split x not 3-D": (dict(x=X[0], ids=2, weight=W[:2], bias=BIAS[:2]), ValueError, r"\[B, S, H_in\]"),
    "split negative": (dict(ids=-1, weight=W[:2], bias=BIAS[:2]), ValueError, r"split position .* \[0, 5\]"),
    "split past S": (dict(ids=S + 1, weight=W[:2], bias=BIAS[:2]), ValueError, r"split position .* \[0, 5\]"),
}


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_bad_linear_input(no_kernels, case):
    kw, err, match = LINEAR_CASES[case]
    with pytest.raises(err, match=match):
        _linear(**kw)


FFN_CASES = {
    "activation": (dict(activation="tanh"), ValueError, "activation must be one of"),
    "activation None": (dict(activation=None), ValueError, "activation must be one of"),
    "swiglu odd width": (dict(w_in=_x(E, 7, H), b_in=None, w_out=_x(E, HO, 3), activation="swiglu"),
                         ValueError, "even"),
    "swiglu w_out width": (dict(activation="swiglu", b_in=B_IN), ValueError, r"F = 6 \(half of w_in"),
    "w_out F": (dict(w_out=W_OUT[..., :5]), ValueError, r"F = 12"),
    "w_out experts": (dict(w_out=W_OUT[:2], b_out=B_OUT[:2]), ValueError, "w_in holds 3 experts but w_out holds 2"),
    "w_in H_in": (dict(w_in=W_IN[..., :4]), ValueError, "H_in = 4"),
    "w_in rank": (dict(w_in=W_IN[0]), ValueError, "w_in must have 3 dimensions"),
    "w_out rank": (dict(w_out=W_OUT[0]), ValueError, "w_out must have 3 dimensions"),
    "w_in 9 experts": (dict(w_in=_x(9, F_, H), w_out=_x(9, HO, F_), b_in=None, b_out=None), ValueError, "1..8"),
    "w_out dtype": (dict(w_out=W_OUT.bfloat16()), TypeError, "w_out has dtype"),
    "b_in shape": (dict(b_in=B_IN[:, :5]), ValueError, r"b_in must have shape \[E, 12\]"),
    "b_out shape": (dict(b_out=B_OUT[:, :5]), ValueError, r"b_out must have shape \[E, 6\]"),
    "b_out rank": (dict(b_out=B_OUT[0]), ValueError, "b_out must have 2 dimensions"),
    "b_in dtype": (dict(b_in=B_IN.half()), TypeError, "b_in has dtype"),
    "ids out of range": (dict(ids=IDS * 2), ValueError, r"modality_ids must lie in \[0, 3\)"),
    "ids bool": (dict(ids=IDS == 1), TypeError, "torch.bool"),
    "x dtype": (dict(x=X.half()), TypeError, "dtype"),
    "w_in on meta": (dict(w_in=W_IN.to("meta")), ValueError, "device"),
    "split with 3 experts": (dict(ids=1), ValueError, "2 experts"),
}


@pytest.mark.parametrize("case", sorted(FFN_CASES))
def test_bad_ffn_input(no_kernels, case):
    kw, err, match = FFN_CASES[case]
    with pytest.raises(err, match=match):
        _ffn(**kw)


def test_float64_on_triton_backend():
    with mmkernels.backend("triton"):
        with pytest.raises(TypeError, match="triton backend"):
            _linear(x=X.double(), weight=W.double(), bias=BIAS.double())
        with pytest.raises(TypeError, match="triton backend"):
            _ffn(x=X.double(), w_in=W_IN.double(), b_in=None, w_out=W_OUT.double(), b_out=None)


def test_cpu_backend_refuses_other_devices():
    with mmkernels.backend("cpu"):
        with pytest.raises(RuntimeError, match="cpu"):
            _linear(x=X.to("meta"), ids=IDS.to("meta"), weight=W.to("meta"), bias=BIAS.to("meta"))


def test_op_rejects_unknown_backend():
    perm, offsets = routing.route(IDS.reshape(-1), E)
    with pytest.raises(ValueError, match="unknown backend"):
        torch.ops.mmkernels.modality_linear_fwd(X.reshape(-1, H), W, BIAS, perm, offsets, [True] * E, "cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        torch.ops.mmkernels.modality_ffn_fwd(X.reshape(-1, H), W_IN, B_IN, W_OUT, B_OUT, perm, offsets, "gelu",
                                             [True] * E, [True] * E, "tpu")


def test_valid_but_awkward_input_works():
    """What the checks must let through: one expert, empty experts, int32 ids, split at 0 and S,
    1-D x (a single token), H_out = 1."""
    for backend in ("reference", "cpu"):
        with mmkernels.backend(backend):
            assert _linear(weight=W[:1], bias=BIAS[:1], ids=torch.zeros(B, S, dtype=torch.int64)).shape == (B, S, HO)
            assert _linear(ids=torch.zeros(B, S, dtype=torch.int32)).shape == (B, S, HO)
            for p in (0, S):
                assert _linear(ids=p, weight=W[:2], bias=BIAS[:2]).shape == (B, S, HO)
            assert _linear(x=X[0, 0], ids=IDS[0, 0]).shape == (HO,)
            assert torch.equal(_linear(ids=np.int64(2), weight=W[:2], bias=BIAS[:2]),
                               _linear(ids=2, weight=W[:2], bias=BIAS[:2]))
            assert _ffn(w_out=W_OUT[:, :1], b_out=B_OUT[:, :1]).shape == (B, S, 1)
