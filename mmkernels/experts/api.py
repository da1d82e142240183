"""Modality experts users call: ``modality_linear`` and ``modality_ffn``.

Every token goes through the weights of its modality (VLMo/BEiT-3 multiway FFN, CogVLM visual
expert): ``modality_ids`` gives each token's expert, or a Python int ``p`` splits every
sequence of ``x [B, S, H]`` by position (``< p``: expert 0, the rest: expert 1; BEiT-3's
``split_position``). On the ``cpu`` and ``triton`` backends the tokens are routed with a
counting sort on the device (no host synchronisation) and one grouped GEMM per layer gathers
and scatters the rows inside the kernel.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import _autocast, _backend, _storage
from .. import _validation as check
from . import activations, routing
from .ops import modality_ffn_fwd, modality_linear_fwd
from .reference import modality_ffn_reference, modality_linear_reference

MAX_EXPERTS = routing.MAX_EXPERTS
_ID_DTYPES = (torch.int32, torch.int64)


def _per_expert(t, name: str):
    """``t`` as one ``[E, ...]`` tensor: a tensor (or ``None``) as given; a list, tuple or
    ``nn.ParameterList`` of per-expert tensors stacked, without a copy when they lie back to
    back in one storage, gradients flowing to each."""
    if isinstance(t, (list, tuple, nn.ParameterList)):
        return _storage.stacked(t, name)
    return t


def _trains(w, b, e: int) -> list[bool]:
    """Per expert, whether its slice of weight ``w`` or bias ``b`` (each an ``[E, ...]`` tensor,
    a sequence of per-expert tensors, or ``None``) requires a gradient: the op's weight-gradient
    mask, so a frozen per-expert parameter costs no weight-gradient work."""
    def flags(t):
        if t is None:
            return [False] * e
        if isinstance(t, torch.Tensor):
            return [t.requires_grad] * e
        return [bool(p.requires_grad) for p in t]
    return [wf or bf for wf, bf in zip(flags(w), flags(b))]


def _check_x(x) -> torch.Tensor:
    check.tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x must have shape [..., H_in] (at least 1 dimension), got shape {tuple(x.shape)}")
    check.floating(x, "x")
    if x.shape[-1] == 0:
        raise ValueError(f"x has an empty feature dimension (shape {tuple(x.shape)})")
    return x


def _check_param(t, name: str, ndim: int, x: torch.Tensor) -> torch.Tensor:
    check.tensor(t, name, ndim)
    check.floating(t, name)
    check.same_dtype(("x", x), (name, t))
    check.same_device(("x", x), (name, t))
    check.nonempty(t, name)
    return t


def _check_experts(e: int, name: str) -> None:
    if not 1 <= e <= MAX_EXPERTS:
        raise ValueError(f"{name} must hold 1..{MAX_EXPERTS} experts (dim 0), got {e}")


def _check_bias(b, name: str, e: int, width: int, x: torch.Tensor, of: str) -> None:
    if b is None:
        return
    _check_param(b, name, 2, x)
    if tuple(b.shape) != (e, width):
        raise ValueError(f"{name} must have shape [E, {width}] = [{e}, {width}] to match {of}, "
                         f"got {tuple(b.shape)}")


def _check_ids(ids, x: torch.Tensor, num_experts: int):
    """Validate ``modality_ids``; return ``("ids", tensor)`` or ``("split", position)``."""
    if isinstance(ids, bool):
        raise TypeError("modality_ids must be an integer tensor or an int split position, got a bool")
    if not isinstance(ids, (int, torch.Tensor)) and isinstance(ids, numbers.Integral):
        ids = int(ids)  # numpy integers
    if isinstance(ids, int):
        if x.dim() != 3:
            raise ValueError("a split position (int modality_ids) needs x of shape [B, S, H_in], "
                             f"got shape {tuple(x.shape)}")
        if num_experts != 2:
            raise ValueError(f"a split position (int modality_ids) routes to 2 experts, but the weights "
                             f"hold {num_experts}; pass a modality_ids tensor")
        s = x.shape[1]
        if not 0 <= ids <= s:
            raise ValueError(f"split position (modality_ids) must lie in [0, {s}] (S = {s}), got {ids}")
        return "split", ids
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"modality_ids must be an integer tensor or an int split position, "
                        f"got {type(ids).__name__}")
    if ids.dtype == torch.bool:
        raise TypeError("modality_ids must be int32 or int64, got torch.bool (a mask is not an expert index; "
                        "use mask.long() for two experts)")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"modality_ids must be int32 or int64, got {ids.dtype}")
    if tuple(ids.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"modality_ids must have x's leading shape {tuple(x.shape[:-1])}, "
                         f"got {tuple(ids.shape)}")
    check.same_device(("x", x), ("modality_ids", ids))
    check.index_range(ids, "modality_ids", num_experts)
    return "ids", ids


def _resolve(x: torch.Tensor) -> str:
    which = _backend.resolve(x.device)
    if which == "triton" and x.dtype == torch.float64:
        raise TypeError("the triton backend takes float32, bfloat16 or float16 inputs, got float64 "
                        "(the cpu and reference backends take float64)")
    return which


def _dense_ids(kind: str, ids, x: torch.Tensor) -> torch.Tensor:
    if kind == "split":
        return routing.split_ids(x.shape[0], x.shape[1], ids, x.device)
    return ids


def _route(kind: str, ids, x: torch.Tensor, num_experts: int, which: str) -> routing.Routing:
    if kind == "split":
        return routing.route_split(x.shape[0], x.shape[1], ids, x.device, which)
    return routing.route(ids.reshape(-1), num_experts, which)


def modality_linear(x: torch.Tensor, modality_ids, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer with one weight per modality: ``y[t] = x[t] @ weight[e].T + bias[e]``, ``e = ids[t]``.

    Args:
        x: ``[..., H_in]`` float32/bfloat16/float16 (float64 on the cpu/reference backends);
            strided views accepted. Zero tokens give an empty output.
        modality_ids: an int32/int64 tensor of shape ``x.shape[:-1]`` with values in ``[0, E)``
            (CogVLM ``token_type_ids``), or a Python int split position ``p`` for
            ``x [B, S, H_in]``: positions ``< p`` use expert 0, the rest expert 1 (``E == 2``).
            Both forms give identical results.
        weight: ``[E, H_out, H_in]`` (``nn.Linear`` layout per expert), ``1 <= E <= 8``, x's dtype;
            or a sequence of ``E`` tensors ``[H_out, H_in]`` (a list, or the ``nn.ParameterList``
            of a module built with ``per_expert_parameters=True``), stacked without a copy when
            they lie back to back in one storage.
        bias: ``[E, H_out]`` (or ``E`` tensors ``[H_out]``) or ``None``.

    Returns:
        ``[..., H_out]`` in x's dtype; gradients flow to ``x``, ``weight`` and ``bias``.

    Under ``torch.autocast``, ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    first, as for ``nn.Linear`` (fp32 parameters with bf16/fp16 activations work, and the GEMM
    runs in the autocast dtype).

    Out-of-range ids raise ``ValueError`` on CPU; on CUDA the check is an asynchronous device
    assert (the op never synchronises with the host).
    """
    sources = weight, bias
    weight, bias = _per_expert(weight, "weight"), _per_expert(bias, "bias")
    x, weight, bias = _autocast.lower_precision(x, weight, bias)
    _check_x(x)
    _check_param(weight, "weight", 3, x)
    e, h_out, h_in = weight.shape
    _check_experts(e, "weight")
    if h_in != x.shape[-1]:
        raise ValueError(f"weight has input size H_in = {h_in} (shape [E, H_out, H_in] = {tuple(weight.shape)}) "
                         f"but x has {x.shape[-1]} features")
    _check_bias(bias, "bias", e, h_out, x, "weight")
    kind, ids = _check_ids(modality_ids, x, e)
    which = _resolve(x)
    if which == "reference":
        return modality_linear_reference(x, _dense_ids(kind, ids, x), weight, bias)
    perm, offsets = _route(kind, ids, x, e, which)
    y = modality_linear_fwd(x.reshape(-1, h_in), weight, bias, perm, offsets, _trains(*sources, e), which)
    return y.reshape(*x.shape[:-1], h_out)


def modality_ffn(x: torch.Tensor, modality_ids, w_in: torch.Tensor, b_in: torch.Tensor | None,
                 w_out: torch.Tensor, b_out: torch.Tensor | None, activation: str = "gelu") -> torch.Tensor:
    """A two-layer MLP with one set of weights per modality (VLMo/BEiT-3 multiway FFN, CogVLM expert MLP).

    ``y[t] = act(x[t] @ w_in[e].T + b_in[e]) @ w_out[e].T + b_out[e]`` with ``e = ids[t]``.

    Args:
        x: ``[..., H_in]`` float32/bfloat16/float16 (float64 on the cpu/reference backends).
        modality_ids: as in :func:`modality_linear`: an int tensor shaped ``x.shape[:-1]``, or
            an int split position for ``x [B, S, H_in]`` with two experts.
        w_in: ``[E, Fi, H_in]``; ``Fi = F`` or, for ``swiglu``, ``Fi = 2F`` with rows ``0..F-1``
            the gate and ``F..2F-1`` the up projection (LLaMA ``gate_proj``/``up_proj`` stacked).
        b_in: ``[E, Fi]`` or ``None``.
        w_out: ``[E, H_out, F]``.
        b_out: ``[E, H_out]`` or ``None``.
        activation: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"``, ``"relu"`` or ``"swiglu"``
            (``silu(gate) * up``).

    Each weight and bias may also be a sequence of ``E`` per-expert tensors, as in
    :func:`modality_linear`.

    Returns:
        ``[..., H_out]`` in x's dtype; gradients flow to x and every weight and bias. The
        backward reuses the pre-activation saved by the forward (``T x Fi`` elements).

    Under ``torch.autocast`` the tensors are cast to the autocast dtype first, as for the
    ``nn.Linear`` layers this replaces.
    """
    activations.check_activation(activation)
    sources = (w_in, b_in), (w_out, b_out)
    w_in, b_in = _per_expert(w_in, "w_in"), _per_expert(b_in, "b_in")
    w_out, b_out = _per_expert(w_out, "w_out"), _per_expert(b_out, "b_out")
    x, w_in, b_in, w_out, b_out = _autocast.lower_precision(x, w_in, b_in, w_out, b_out)
    _check_x(x)
    _check_param(w_in, "w_in", 3, x)
    _check_param(w_out, "w_out", 3, x)
    e, fi, h_in = w_in.shape
    _check_experts(e, "w_in")
    if w_out.shape[0] != e:
        raise ValueError(f"w_in holds {e} experts but w_out holds {w_out.shape[0]}")
    if h_in != x.shape[-1]:
        raise ValueError(f"w_in has input size H_in = {h_in} (shape [E, Fi, H_in] = {tuple(w_in.shape)}) "
                         f"but x has {x.shape[-1]} features")
    if activation == "swiglu" and fi % 2:
        raise ValueError(f"swiglu needs an even first-layer width (w_in [E, 2F, H_in]: gate rows then up rows), "
                         f"got w_in.shape[1] = {fi}")
    f = activations.inner_width(activation, fi)
    h_out = w_out.shape[1]
    if w_out.shape[2] != f:
        what = f"half of w_in's {fi} rows (swiglu)" if activation == "swiglu" else "w_in.shape[1]"
        raise ValueError(f"w_out must have shape [E, H_out, F] with F = {f} ({what}), got {tuple(w_out.shape)}")
    _check_bias(b_in, "b_in", e, fi, x, "w_in")
    _check_bias(b_out, "b_out", e, h_out, x, "w_out")
    kind, ids = _check_ids(modality_ids, x, e)
    which = _resolve(x)
    if which == "reference":
        return modality_ffn_reference(x, _dense_ids(kind, ids, x), w_in, b_in, w_out, b_out, activation)
    perm, offsets = _route(kind, ids, x, e, which)
    y, _, _ = modality_ffn_fwd(x.reshape(-1, h_in), w_in, b_in, w_out, b_out, perm, offsets, activation,
                               _trains(*sources[0], e), _trains(*sources[1], e), which)
    return y.reshape(*x.shape[:-1], h_out)
