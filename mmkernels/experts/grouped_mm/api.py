"""Modality experts users call: ``modality_linear`` and ``modality_ffn``.

Every token goes through the weights of its modality (VLMo/BEiT-3 multiway FFN, CogVLM visual
expert): ``modality_ids`` gives each token's expert, or a Python int ``p`` splits every
sequence of ``x [B, S, H]`` by position (``< p``: expert 0, the rest: expert 1; BEiT-3's
``split_position``). On the ``cpu`` and ``triton`` backends the tokens are routed with a
counting sort on the device (no host synchronisation) and one grouped GEMM per layer gathers
and scatters the rows inside the kernel. Under backend ``auto`` each call runs the path the
family's table ranks fastest for its case among those that can run it: the kernels,
``grouped_mm`` (PyTorch's grouped GEMM) or ``batched`` (strided batched GEMMs on the views of a
split position); see :mod:`.paths`.
"""
from __future__ import annotations

import torch

from ... import _autocast, _backend, _dispatch
from .. import activations
from ..routing import (check_bias, check_experts, check_ids, check_param, check_x, dense_ids, grad_flags,
                       per_expert, route_tokens, untouched_experts, without_untouched)
from . import paths
from .ops import modality_ffn_fwd, modality_linear_fwd
from .reference import modality_ffn_reference, modality_linear_reference


def _decide(op: str, x: torch.Tensor, kind: str, widths: dict[str, int]) -> tuple[str, str | None]:
    """``(path, kernel backend)`` for this call: under a forced backend the kernels (or the
    reference) as the backend says; under ``auto`` the dispatcher's choice among the kernels and
    the paths of :mod:`.paths` that can run the call."""
    tokens, h_in = x.numel() // x.shape[-1], x.shape[-1]
    cls = paths.shape_class(kind, tokens, h_in, next(iter(widths.values())))
    d = _dispatch.choose("experts", op, x, cls, paths.eligibility(kind, x, widths))
    return d.path, d.backend


def _routing_backend(x: torch.Tensor) -> str:
    """How the PyTorch-op paths sort tokens: the Triton counting sort on CUDA, torch ops otherwise."""
    return "triton" if x.device.type == "cuda" and _backend.TRITON_AVAILABLE else "cpu"


def modality_linear(x: torch.Tensor, modality_ids, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer with one weight per modality: ``y[t] = x[t] @ weight[e].T + bias[e]``, ``e = ids[t]``.

    Args:
        x: ``[..., H_in]`` float32/bfloat16/float16 (float64 on the cpu/reference backends);
            strided views accepted. Zero tokens give an empty output.
        modality_ids: an int32/int64 tensor of shape ``x.shape[:-1]`` with values in ``[0, E)``
            (CogVLM ``token_type_ids``), or a Python int split position ``p`` for
            ``x [B, S, H_in]``: positions ``< p`` use expert 0, the rest expert 1 (``E == 2``).
            Both forms give identical results on a forced backend; under ``auto`` the split
            form may run another path (``batched``), equal within the dtype's tolerance.
        weight: ``[E, H_out, H_in]`` (``nn.Linear`` layout per expert), ``1 <= E <= 8``, x's dtype;
            or a sequence of ``E`` tensors ``[H_out, H_in]`` (a list, or the ``nn.ParameterList``
            of a module built with ``per_expert_parameters=True``), stacked without a copy when
            they lie back to back in one storage.
        bias: ``[E, H_out]`` (or ``E`` tensors ``[H_out]``) or ``None``.

    Returns:
        ``[..., H_out]`` in x's dtype; gradients flow to ``x``, ``weight`` and ``bias``. With
        per-expert tensors and a split position that leaves an expert without tokens
        (``p == 0`` or ``p == S``), that expert's tensors get no gradient (``None``), as in a
        model that never calls it; with an ids tensor (counts known only on the device) or an
        ``[E, ...]`` tensor, an expert without tokens gets a zero gradient.

    Under ``torch.autocast``, ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    first, as for ``nn.Linear`` (fp32 parameters with bf16/fp16 activations work, and the GEMM
    runs in the autocast dtype).

    Out-of-range ids raise ``ValueError`` on CPU; on CUDA the check is an asynchronous device
    assert (the op never synchronises with the host).
    """
    skip = untouched_experts(modality_ids, x)
    sources = weight, bias = without_untouched(weight, skip), without_untouched(bias, skip)
    weight, bias = per_expert(weight, "weight"), per_expert(bias, "bias")
    x, weight, bias = _autocast.lower_precision(x, weight, bias)
    check_x(x)
    check_param(weight, "weight", 3, x)
    e, h_out, h_in = weight.shape
    check_experts(e, "weight")
    if h_in != x.shape[-1]:
        raise ValueError(f"weight has input size H_in = {h_in} (shape [E, H_out, H_in] = {tuple(weight.shape)}) "
                         f"but x has {x.shape[-1]} features")
    check_bias(bias, "bias", e, h_out, x, "weight")
    kind, ids = check_ids(modality_ids, x, e)
    path, which = _decide("modality_linear", x, kind, {"H_out": h_out, "H_in": h_in})
    if path == "reference":
        return modality_linear_reference(x, dense_ids(kind, ids, x), weight, bias)
    flags = grad_flags(*sources, e)
    if path == paths.BATCHED:
        return paths.linear_batched(x, weight, bias, ids, flags)
    if path == paths.GROUPED_MM:
        perm, offsets = route_tokens(kind, ids, x, e, _routing_backend(x))
        y = paths.linear_grouped_mm(x.reshape(-1, h_in), weight, bias, perm, offsets, flags)
        return y.reshape(*x.shape[:-1], h_out)
    perm, offsets = route_tokens(kind, ids, x, e, which)
    y = modality_linear_fwd(x.reshape(-1, h_in), weight, bias, perm, offsets, flags, which)
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
    :func:`modality_linear` (an expert a split position leaves without tokens then gets no
    gradient).

    Returns:
        ``[..., H_out]`` in x's dtype; gradients flow to x and every weight and bias. The
        backward reuses the pre-activation saved by the forward (``T x Fi`` elements); the
        kernel path also keeps the activation (``T x F``), the ``batched`` and ``grouped_mm``
        paths recompute it.

    Under ``torch.autocast`` the tensors are cast to the autocast dtype first, as for the
    ``nn.Linear`` layers this replaces.
    """
    activations.check_activation(activation)
    skip = untouched_experts(modality_ids, x)
    w_in, b_in, w_out, b_out = (without_untouched(t, skip) for t in (w_in, b_in, w_out, b_out))
    sources = (w_in, b_in), (w_out, b_out)
    w_in, b_in = per_expert(w_in, "w_in"), per_expert(b_in, "b_in")
    w_out, b_out = per_expert(w_out, "w_out"), per_expert(b_out, "b_out")
    x, w_in, b_in, w_out, b_out = _autocast.lower_precision(x, w_in, b_in, w_out, b_out)
    check_x(x)
    check_param(w_in, "w_in", 3, x)
    check_param(w_out, "w_out", 3, x)
    e, fi, h_in = w_in.shape
    check_experts(e, "w_in")
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
    check_bias(b_in, "b_in", e, fi, x, "w_in")
    check_bias(b_out, "b_out", e, h_out, x, "w_out")
    kind, ids = check_ids(modality_ids, x, e)
    path, which = _decide("modality_ffn", x, kind, {"Fi": fi, "H_in": h_in, "F": f, "H_out": h_out})
    if path == "reference":
        return modality_ffn_reference(x, dense_ids(kind, ids, x), w_in, b_in, w_out, b_out, activation)
    flags_in, flags_out = grad_flags(*sources[0], e), grad_flags(*sources[1], e)
    if path == paths.BATCHED:
        y, _ = paths.ffn_batched(x, w_in, b_in, w_out, b_out, ids, activation, flags_in, flags_out)
        return y
    if path == paths.GROUPED_MM:
        perm, offsets = route_tokens(kind, ids, x, e, _routing_backend(x))
        y, _ = paths.ffn_grouped_mm(x.reshape(-1, h_in), w_in, b_in, w_out, b_out, perm, offsets, activation,
                                    flags_in, flags_out)
        return y.reshape(*x.shape[:-1], h_out)
    perm, offsets = route_tokens(kind, ids, x, e, which)
    y, _, _ = modality_ffn_fwd(x.reshape(-1, h_in), w_in, b_in, w_out, b_out, perm, offsets, activation,
                               flags_in, flags_out, which)
    return y.reshape(*x.shape[:-1], h_out)
