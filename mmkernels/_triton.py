"""Launch-time facts shared by every family's Triton kernels (imported only where triton is)."""
from __future__ import annotations

import math
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # a triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``.

    fp32 uses tf32 on a GPU only when ``torch.backends.cuda.matmul.allow_tf32`` is set (the
    user's choice, as for ``torch.mm``), else exact "ieee"; always "ieee" under the interpreter.
    The value is ignored by ``tl.dot`` for 16-bit inputs.
    """
    if dtype != torch.float32:
        return "tf32"
    if interpreting():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must cast bf16 tiles to fp32 before ``tl.dot`` (interpreter only).

    Triton's interpreter stores bfloat16 as uint16 and its ``tl.dot`` multiplies the bit
    patterns (triton-lang/triton#11584); fp32 copies are exact. Never set on a GPU.
    """
    return dtype == torch.bfloat16 and interpreting()


def check_device(t: torch.Tensor) -> None:
    """Raise unless ``t`` is on CUDA, or on the CPU under the interpreter."""
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError("mmkernels triton backend: CPU tensors need TRITON_INTERPRET=1 "
                           f"(got tensors on {t.device})")


def stride_align(*tensors: torch.Tensor, extra: tuple[int, ...] = ()) -> int:
    """The largest power of two <= 16 dividing every batch/head/sequence stride of the 4-D
    ``tensors`` (and every int in ``extra``).

    Kernels take those strides divided by it and multiply back by the ``ALIGN`` constexpr, so
    Triton can prove 16-byte aligned rows (vector loads) even when ``D % 16 != 0``.
    """
    g = 0
    for t in tensors:
        for st in t.stride()[:3]:
            g = math.gcd(g, int(st))
    for e in extra:
        g = math.gcd(g, int(e))
    al = 16
    while al > 1 and g % al:
        al //= 2
    return al


def aligned_strides(t: torch.Tensor, align: int) -> tuple[int, int, int, int]:
    """``(stride_b, stride_h, stride_s) // align, stride_d`` of a 4-D ``t`` (see :func:`stride_align`)."""
    sb, sh, ss, sd = t.stride()
    return (sb // align, sh // align, ss // align, sd)
