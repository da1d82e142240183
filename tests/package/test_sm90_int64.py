"""The sm_90 tier's int64 address check (mmkernels.testing.sm90.assert_int64_offsets) can fail.

Tiny kernels of this module compute a row's address the ways the check must refuse (a row index
times a run-time row stride in int32; a grid coordinate times a batch stride in int32; the
product cast to int64 after the multiply) and the way it must accept (the index cast first).
Each is compiled for sm_90a with Triton's compiler on the CPU.
"""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mmkernels.testing import sm90  # noqa: E402


@triton.jit
def rows_times_stride_int32(x_ptr, y_ptr, T, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :]
    tl.store(y_ptr + rows, tl.sum(tl.load(ptrs, mask=rows[:, None] < T, other=0.0), 1), mask=rows < T)


@triton.jit
def batch_times_stride_int32(x_ptr, y_ptr, S, stride_xb, BLOCK: tl.constexpr):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + b * stride_xb + offs, mask=offs < S, other=0.0)
    tl.store(y_ptr + b * stride_xb + offs, v * 2, mask=offs < S)


@triton.jit
def cast_after_multiply(x_ptr, y_ptr, T, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ptrs = x_ptr + (rows[:, None] * stride_xm).to(tl.int64) + cols[None, :]
    tl.store(y_ptr + rows, tl.sum(tl.load(ptrs, mask=rows[:, None] < T, other=0.0), 1), mask=rows < T)


@triton.jit
def rows_times_stride_int64(x_ptr, y_ptr, T, stride_xm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    tl.store(y_ptr + rows, tl.sum(tl.load(ptrs, mask=rows[:, None] < T, other=0.0), 1), mask=rows < T)


ROW_SIG = {"x_ptr": "*bf16", "y_ptr": "*fp32", "T": "i32", "stride_xm": "i32",
           "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
ROW_CONST = {"BLOCK_M": 64, "BLOCK_N": 64}


def _jobs():
    return {
        "rows": sm90.CompileJob(rows_times_stride_int32, ROW_SIG, ROW_CONST, label="rows"),
        "batch": sm90.CompileJob(batch_times_stride_int32,
                                 {"x_ptr": "*bf16", "y_ptr": "*bf16", "S": "i32", "stride_xb": "i32",
                                  "BLOCK": "constexpr"}, {"BLOCK": 256}, label="batch"),
        "late_cast": sm90.CompileJob(cast_after_multiply, ROW_SIG, ROW_CONST, label="late_cast"),
        "int64": sm90.CompileJob(rows_times_stride_int64, ROW_SIG, ROW_CONST, label="int64"),
    }


@pytest.fixture(scope="module")
def reports():
    return sm90.compile_reports(list(_jobs().values()))


@pytest.mark.parametrize("label,kernel", [("rows", "rows_times_stride_int32"),
                                          ("batch", "batch_times_stride_int32"),
                                          ("late_cast", "cast_after_multiply")])
def test_int32_offsets_fail_naming_the_kernel(reports, label, kernel):
    with pytest.raises(AssertionError, match=kernel) as exc:
        sm90.assert_int64_offsets(reports[label])
    assert "arith.muli" in str(exc.value) and "test_sm90_int64.py:" in str(exc.value)


def test_int64_offsets_pass(reports):
    sm90.assert_int64_offsets(reports["int64"])


def test_one_job_per_kernel_keeps_the_first_and_honours_keep():
    jobs = list(_jobs().values())
    picked = sm90.one_job_per_kernel(jobs + jobs)
    assert [j.label for j in picked] == ["rows", "batch", "late_cast", "int64"]
    picked = sm90.one_job_per_kernel(jobs, keep=lambda j: j.label != "rows")
    assert [j.label for j in picked] == ["batch", "late_cast", "int64"]
