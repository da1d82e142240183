"""``torch.autocast`` for ops whose PyTorch counterparts autocast runs in lower precision.

A custom op registered with ``torch.library`` gets no autocast rule of its own: under
``torch.autocast`` it would see its inputs in whatever dtype they arrive, while the
``nn.Linear`` it replaces runs in the autocast dtype. In mixed-precision training (fp32
parameters, bf16/fp16 activations) that means a dtype-mismatch error, or a silent fp32 GEMM
where the model ran a bf16 one. The public functions of such ops call :func:`lower_precision`
first, so under autocast they cast exactly the tensors autocast casts for ``F.linear``.
"""
from __future__ import annotations

import torch

# The device types whose autocast state torch can report; others (meta, ...) are never cast.
_AUTOCAST_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps", "hpu")


def lower_precision(*args):
    """``args`` with their tensors cast to the autocast dtype when autocast is on for them.

    The device type is that of the first argument (``x`` of the op). When
    ``torch.autocast`` is enabled for it, every floating tensor on that device type other than
    float64 is cast to ``torch.get_autocast_dtype(device_type)`` (bf16 or fp16), the rule
    autocast applies to ``F.linear``. Anything else (``None``, ints, integer tensors, float64,
    tensors on another device) passes through unchanged, so the op's own checks still report
    bad input. Outside autocast every argument is returned as it is.

    The casts are differentiable: gradients reach fp32 parameters in fp32, as with
    ``nn.Linear`` under autocast.

    Returns:
        a tuple of the same length as ``args``.
    """
    dtype = autocast_dtype(args[0]) if args else None
    if dtype is None:
        return args
    device_type = args[0].device.type
    return tuple(a.to(dtype) if _eligible(a, device_type) else a for a in args)


def autocast_dtype(t) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs ``t``'s device type in, or ``None`` when it is off there
    (or ``t`` is not a tensor, or its device type has no autocast state, e.g. ``meta``)."""
    if not isinstance(t, torch.Tensor):
        return None
    device_type = t.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _eligible(a, device_type: str) -> bool:
    return (isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
            and a.device.type == device_type)


# The device types whose autocast runs ``layer_norm`` in float32 ("CUDA ops that can autocast to
# float32" in PyTorch's AMP documentation). CPU autocast leaves it in its input's dtype.
_FP32_NORM_DEVICE_TYPES = ("cuda",)


def norm_precision(*args):
    """``args`` with their tensors cast to float32 where autocast does that for ``F.layer_norm``.

    When ``torch.autocast`` is enabled for the first argument's device type and that device type
    runs ``layer_norm`` in float32 under autocast (CUDA), every bf16/fp16 tensor on it is cast to
    float32, so the op returns float32 as ``nn.LayerNorm`` does there. Otherwise (autocast off,
    or CPU autocast, which keeps ``layer_norm`` in its input's dtype) the arguments are returned
    as they are. The casts are differentiable.
    """
    if autocast_dtype(args[0] if args else None) is None:
        return args
    device_type = args[0].device.type
    if device_type not in _FP32_NORM_DEVICE_TYPES:
        return args
    return tuple(a.float() if _eligible(a, device_type) else a for a in args)
