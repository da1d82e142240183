"""Triton helpers shared by every family: launch-time facts and ``@triton.jit`` functions
(imported only where triton is installed)."""
from __future__ import annotations

import functools
import math
import operator
import re

import torch
import triton
import triton.language as tl

from . import _settings


@functools.lru_cache(maxsize=None)
def triton_at_least(major: int, minor: int = 0) -> bool:
    """Whether the installed Triton is version ``major.minor`` or newer (pre-releases count).

    Tile heuristics use it where a Triton release compiles a kernel differently enough to
    change which tiles fit in registers. Reads ``triton.__version__``; needs no GPU.
    """
    import triton
    m = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", "") or "")
    if m is None:
        return False
    return (int(m.group(1)), int(m.group(2))) >= (major, minor)


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # a triton without knobs
        return _settings.triton_interpret()


def _interpreted_scalar_index(self) -> int:
    """``operator.index`` of a tensor in Triton's interpreter: a scalar's handle holds a
    1-element numpy array, read with ``.item()`` (which, like ``int()``, refuses blocks)."""
    return int(self.handle.data.item())


def _interpreter_index_is_broken(interpreter) -> bool:
    """Whether the interpreter's ``tl.tensor.__index__`` fails (or warns) on a scalar.

    Triton versions whose ``_patch_lang_tensor`` sets ``__index__`` to ``int(handle.data)``
    convert a 1-element 1-D numpy array with ``int()``: NumPy deprecates that (< 2.3) and then
    refuses it ("only 0-dimensional arrays can be converted to Python scalars"), so every
    ``range(lo, hi, STEP)`` with a run-time bound fails in a kernel. The check runs the
    interpreter's own patch on a stand-in class and converts a scalar, with the deprecation
    turned into an error.
    """
    import types
    import warnings

    import numpy as np

    class _Scalar:
        handle = types.SimpleNamespace(data=np.array([3], dtype=np.int32))

    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(_Scalar, scope)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            return operator.index(_Scalar()) != 3
    except (TypeError, DeprecationWarning):
        return True
    finally:
        scope.restore()


def _fix_interpreter_scalar_index() -> None:
    """Make run-time loop bounds work in Triton's interpreter on every NumPy (see
    :func:`_interpreter_index_is_broken`).

    Where the interpreter's ``__index__`` is broken, its ``_patch_lang_tensor`` (which runs at
    the start of every interpreted launch and whose changes are undone after it) is wrapped to
    set ``__index__`` again, through ``.item()``, after the original. Versions with a working
    ``__index__``, an interpreter of another shape and compiled (GPU) launches are left alone.
    Idempotent.
    """
    try:
        from triton.runtime import interpreter
        original = interpreter._patch_lang_tensor
        interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    if getattr(original, "_mmkernels_scalar_index", False):
        return
    try:
        broken = _interpreter_index_is_broken(interpreter)
    except Exception:  # an interpreter this check does not understand: leave it as it is
        return
    if not broken:
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _interpreted_scalar_index)

    _patch_lang_tensor._mmkernels_scalar_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


# dtypes every Triton kernel takes, and their pointer types in a compile signature
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}

# softmax kernels work in the log2 domain: log2(e) is folded into the score scale on the host
LOG2E = 1.4426950408889634


def block_d(D: int) -> int:
    """A head dimension ``D`` padded to the kernels' ``BLOCK_D``: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(D)))


def input_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    """The values of a kernel's ``INPUT_PRECISION`` constexpr a launcher can pass for ``dtype``
    (both for fp32, which may run exact or tf32; one for 16-bit inputs, where it is ignored)."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("tf32",)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (cached per device: no synchronisation);
    1 for a CPU device (the interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


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


@triton.jit
def scaled_strides(stride_b, stride_h, stride_s, ALIGN: tl.constexpr):
    """The batch/head/sequence strides of a tensor as int64, multiplied back by ``ALIGN``.

    Launchers pass those strides divided by ``ALIGN`` (:func:`aligned_strides`): multiplying by
    the constexpr lets Triton prove 16-byte aligned rows (vector loads) even when D % 16 != 0,
    and int64 keeps offsets of tensors over 2**31 elements exact.
    """
    return (tl.cast(stride_b, tl.int64) * ALIGN, tl.cast(stride_h, tl.int64) * ALIGN,
            tl.cast(stride_s, tl.int64) * ALIGN)


@triton.jit
def softmax_lse(m_i, l_i):
    """End of an online softmax in the log2 domain: ``(l_safe, lse)`` of the running max ``m_i``
    and sum ``l_i`` (fp32 ``[BLOCK_M]``); ``lse`` is natural-log, ``-inf`` for rows that saw no key
    (``l_i = 0``), and ``l_safe`` is ``l_i`` with those rows set to 1 (divide by it)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return l_safe, lse


@triton.jit
def block_range(pid, BLOCK: tl.constexpr, n):
    """Block ``pid`` of ``BLOCK`` indices along a dimension of length ``n``:
    ``(idx int32 [BLOCK], idx < n, idx int64)``."""
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    return idx, idx < n, idx.to(tl.int64)


@triton.jit
def head_dim_range(D: tl.constexpr, BLOCK_D: tl.constexpr):
    """The head-dim offsets of a tile padded to ``BLOCK_D``: ``(offs_d int32, offs_d < D,
    offs_d int64)``."""
    offs_d = tl.arange(0, BLOCK_D)
    return offs_d, offs_d < D, offs_d.to(tl.int64)


@triton.jit
def load_rows(base, rows64, stride_s, stride_d, offs_d64, msk, DOT_UPCAST: tl.constexpr):
    """The ``[len(rows64), BLOCK_D]`` tile of sequence rows ``rows64`` of one (b, h) slice at
    ``base`` (zeros outside ``msk``), in the input dtype or, with ``DOT_UPCAST``, fp32."""
    t = tl.load(base + rows64[:, None] * stride_s + offs_d64[None, :] * stride_d, mask=msk, other=0.0)
    if DOT_UPCAST:  # interpreter only: its tl.dot mishandles bfloat16
        t = t.to(tl.float32)
    return t


@triton.jit
def load_row_stats(m_ptr, l_ptr, idx, ok):
    """The saved softmax statistics of the rows at ``idx``: ``(m2, inv_l)`` fp32, where ``m2`` is
    the row max in the kernel's score domain and ``inv_l = 1 / l`` of the row sum
    ``l = sum exp2(s - m2)``, so a backward forms ``P = exp2(s - m2) * inv_l`` without rounding
    the max and the sum into one lse. Rows outside ``ok`` and rows that saw no key (``l = 0``)
    get ``m2 = +inf`` and ``inv_l = 0``: their P is 0."""
    m = tl.load(m_ptr + idx, mask=ok, other=0.0)
    l = tl.load(l_ptr + idx, mask=ok, other=0.0)
    seen = l > 0.0
    return tl.where(seen, m, float("inf")), tl.where(seen, 1.0 / tl.where(seen, l, 1.0), 0.0)


@triton.jit
def bwd_query_rows_stats(q_base, do_base, m_ptr, l_ptr, delta_ptr, row_base, rows64, row_ok, d_ok,
                         offs_d64, stride_qs, stride_qd, stride_dos, stride_dod, DOT_UPCAST: tl.constexpr):
    """What a flash-attention backward reads of one query block: ``(qd_msk [BLOCK_M, BLOCK_D],
    q, dO [BLOCK_M, BLOCK_D] (input dtype, fp32 with DOT_UPCAST), m2, inv_l, delta fp32
    [BLOCK_M])``, the row statistics as :func:`load_row_stats` gives them (``row_base + rows64``
    index the fp32 ``m``/``l``/``delta`` rows; rows past the end get ``P = 0``)."""
    qd_msk = row_ok[:, None] & d_ok[None, :]
    qt = tl.load(q_base + rows64[:, None] * stride_qs + offs_d64[None, :] * stride_qd,
                 mask=qd_msk, other=0.0)
    dot_ = tl.load(do_base + rows64[:, None] * stride_dos + offs_d64[None, :] * stride_dod,
                   mask=qd_msk, other=0.0)
    if DOT_UPCAST:
        qt = qt.to(tl.float32)
        dot_ = dot_.to(tl.float32)
    m2, inv_l = load_row_stats(m_ptr, l_ptr, row_base + rows64, row_ok)
    delta = tl.load(delta_ptr + row_base + rows64, mask=row_ok, other=0.0)
    return qd_msk, qt, dot_, m2, inv_l, delta


def aligned_strides(t: torch.Tensor, align: int) -> tuple[int, int, int, int]:
    """``(stride_b, stride_h, stride_s) // align, stride_d`` of a 4-D ``t`` (see :func:`stride_align`)."""
    sb, sh, ss, sd = t.stride()
    return (sb // align, sh // align, ss // align, sd)


# every module that launches Triton kernels imports this one before it defines them
if interpreting():
    _fix_interpreter_scalar_index()
