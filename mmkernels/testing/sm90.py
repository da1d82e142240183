"""Compile Triton kernels for the H100/H200 (sm_90a) on a machine without a GPU.

Usage::

    from mmkernels.testing import sm90
    rep = sm90.compile_sm90(my_kernel, signature={"x_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                            constexprs={"BLOCK": 128}, num_warps=4, num_stages=3,
                            divisible_by_16=["x_ptr", "n"])
    sm90.assert_sm90_ok(rep, tensor_cores=True)   # no spills, smem <= 227 KB, wgmma/HGMMA
    print(rep.summary())

``compile_sm90_many`` compiles a list of :class:`CompileJob` and returns one
:class:`Sm90Report` per job (its docstring says how, and how interpreter mode is handled).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import _settings
from .ttir_offsets import int32_offset_products

SMEM_LIMIT_BYTES = 232448  # 227 KB: the most one H100/H200 block can use
TARGET_ARCH = 90
# GPUTarget's third field is the warp size; the CUDA driver reports 32 (the NVIDIA
# backend takes the warp size from its options, so any value compiles the same).
TARGET_WARP_SIZE = 32


class Sm90ToolMissing(RuntimeError):
    """ptxas or cuobjdump (bundled with triton) could not be found."""


class Sm90CompileError(RuntimeError):
    """triton.compile or ptxas failed for a job."""


@dataclass
class CompileJob:
    kernel: Any  # JITFunction, InterpretedFunction, Autotuner/Heuristics wrapper or plain function
    signature: dict  # name -> "*bf16" | "i32" | "fp32" | "constexpr" | ...
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: Sequence[str] = ()
    options: dict = field(default_factory=dict)  # extra triton compile options
    label: str = ""


@dataclass
class Sm90Report:
    label: str
    kernel_name: str
    num_warps: int
    num_stages: int
    error: str | None = None
    shared_bytes: int = 0  # dynamic shared memory Triton asks for at launch (+ static from ptxas)
    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack_frame: int = 0  # bytes
    triton_version: str = ""
    ptx_wgmma: bool = False
    ptx_mma: bool = False
    sass_hgmma: bool = False
    sass_hmma: bool = False
    # the largest N of the PTX's ``cp.async.wait_group N``: how many groups of asynchronous
    # copies a wait leaves in flight (-1: no cp.async). 0 means every wait drains all copies,
    # so no load overlaps the next tile's math (a loop Triton could not software-pipeline).
    cp_async_pending: int = -1
    ptxas_log: str = field(default="", repr=False)
    ptx: str = field(default="", repr=False)
    ttir: str = field(default="", repr=False)
    sass: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tensor_cores(self) -> bool:
        return (self.ptx_wgmma or self.ptx_mma) and (self.sass_hgmma or self.sass_hmma)

    def summary(self) -> str:
        if self.error:
            first = self.error.strip().splitlines()[-1] if self.error.strip() else "?"
            return f"{self.label or self.kernel_name}: ERROR {first}"
        tc = "wgmma/HGMMA" if self.ptx_wgmma and self.sass_hgmma else (
            "mma/HMMA" if self.ptx_mma and self.sass_hmma else "none")
        return (f"{self.label or self.kernel_name}: warps={self.num_warps} stages={self.num_stages} "
                f"regs={self.registers} spill_st={self.spill_stores} spill_ld={self.spill_loads} "
                f"smem={self.shared_bytes} tensor_cores={tc} cp_async_pending={self.cp_async_pending}")


# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------


def _missing(name: str, env: str) -> Sm90ToolMissing:
    return Sm90ToolMissing(
        f"{name} not found: expected it in triton/backends/nvidia/bin/ (shipped with the triton "
        f"wheel for NVIDIA) or at ${env}. The sm_90 compile tier needs it; install the "
        f"triton wheel with its NVIDIA backend or point {env} at a CUDA toolkit's {name}.")


def _bundled(name: str) -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return p if p.exists() else None


def _tool(name: str, triton_path) -> str:
    """The path of tool ``name``: ``$TRITON_<NAME>_PATH`` when it exists, else ``triton_path()`` (Triton's own
    choice; None or an error when that Triton cannot say), else the copy in the triton wheel."""
    override = _settings.triton_tool_path(name)
    if override and os.path.exists(override):
        return override
    try:
        p = triton_path()
        if p and os.path.exists(p):
            return p
    except Exception:
        pass
    p = _bundled(name)
    if p is None:
        raise _missing(name, env)
    return str(p)


def _triton_ptxas() -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(TARGET_ARCH).path


def _triton_cuobjdump() -> str:
    from triton import knobs
    return knobs.nvidia.cuobjdump.path


def ptxas_path() -> str:
    """The ptxas Triton itself uses for sm_90 (Triton 3.9 picks its newer 'ptxas-blackwell')."""
    return _tool("ptxas", _triton_ptxas)


def cuobjdump_path() -> str:
    """The cuobjdump that reads the cubins' SASS."""
    return _tool("cuobjdump", _triton_cuobjdump)


def check_tools() -> None:
    """Raise Sm90ToolMissing with a clear message if a tool is missing."""
    ptxas_path()
    cuobjdump_path()


# ---------------------------------------------------------------------------
# in-process compilation
# ---------------------------------------------------------------------------


def _python_fn(kernel):
    """The undecorated Python function under jit/interpreter/autotune wrappers."""
    f = kernel
    for _ in range(16):
        inner = getattr(f, "fn", None)
        if inner is None:
            break
        f = inner
    if not callable(f):
        raise TypeError(f"not a kernel: {kernel!r}")
    return f


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction
    f = kernel
    for _ in range(16):
        if isinstance(f, JITFunction):
            return f
        inner = getattr(f, "fn", None)
        if inner is None:
            break
        f = inner
    # a plain function, or an interpreter wrapper (TRITON_INTERPRET=1 at import):
    # build the JITFunction directly (triton.jit would wrap it for the
    # interpreter again).  Jitted helpers it calls must be JITFunctions too,
    # which is why interpreter mode compiles in a subprocess by default.
    return JITFunction(_python_fn(kernel))


def _parse_ptxas(log: str) -> dict:
    out = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack_frame": 0, "static_smem": 0}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        out["registers"] = int(m.group(1))
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        out["stack_frame"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    m = re.search(r"(\d+) bytes smem", log)
    if m:
        out["static_smem"] = int(m.group(1))
    return out


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, TARGET_WARP_SIZE)


def _attrs_for(jit_fn, divisible: Iterable[str]):
    """Divisibility hints in the ASTSource ``attrs`` format of Triton 3.3+."""
    names = list(jit_fn.arg_names)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}


def _compile_logging_ptxas(src, options: dict):
    """``triton.compile(src)`` for sm_90a and the ``ptxas -v`` log of the cubin it built.

    The log comes from Triton's own ptxas command (``knobs.nvidia.dump_ptxas_log``, which
    Triton prints; the compilation skips the cache so that ptxas runs). That command is what a
    GPU launch uses: Triton 3.9, for one, adds ``--regAllocOptLevel=2``, which moves the
    register count and the spills. The log is empty for a Triton without those knobs.
    """
    import contextlib
    import io

    import triton
    try:
        from triton import knobs
    except ImportError:
        knobs = None
    if knobs is None or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=_target(), options=options), ""
    out = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(out):
            compiled = triton.compile(src, target=_target(), options=options)
    return compiled, out.getvalue()


def _compile_in_process(job: CompileJob) -> Sm90Report:
    import triton
    from triton.compiler import ASTSource

    fn = _jit_function(job.kernel)
    name = getattr(fn, "__name__", "kernel")
    rep = Sm90Report(label=job.label, kernel_name=name, num_warps=job.num_warps,
                     num_stages=job.num_stages, triton_version=triton.__version__)
    try:
        arg_names = list(fn.arg_names)
        missing = [n for n in arg_names if n not in job.signature]
        if missing:
            raise ValueError(f"signature lacks {missing}")
        sig = {n: job.signature[n] for n in arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=dict(job.constexprs),
                        attrs=_attrs_for(fn, job.divisible_by_16))
        opts = {"num_warps": job.num_warps, "num_stages": job.num_stages, **job.options}
        compiled, rep.ptxas_log = _compile_logging_ptxas(src, opts)
        ptx = compiled.asm["ptx"]
        cubin = compiled.asm["cubin"]
        rep.ptx = ptx
        rep.ttir = compiled.asm.get("ttir", "")
        rep.shared_bytes = int(getattr(compiled.metadata, "shared", 0) or 0)
        with tempfile.TemporaryDirectory(prefix="mmk_sm90_") as td:
            if not re.search(r"Used \d+ registers", rep.ptxas_log):
                # no log from Triton: run ptxas on its PTX here (-lineinfo -v, Triton's defaults)
                ptx_file = Path(td) / "k.ptx"
                ptx_file.write_text(ptx)
                r = subprocess.run([ptxas_path(), "-lineinfo", "-v", "--gpu-name", "sm_90a",
                                    str(ptx_file), "-o", str(Path(td) / "v.cubin")],
                                   capture_output=True, text=True)
                rep.ptxas_log = r.stdout + r.stderr
                if r.returncode != 0:
                    raise Sm90CompileError(f"ptxas failed:\n{rep.ptxas_log}")
            cubin_file = Path(td) / "k.cubin"
            cubin_file.write_bytes(cubin)
            r = subprocess.run([cuobjdump_path(), "--dump-sass", str(cubin_file)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise Sm90CompileError(f"cuobjdump failed:\n{r.stdout}{r.stderr}")
            rep.sass = r.stdout
        p = _parse_ptxas(rep.ptxas_log)
        rep.registers = p["registers"]
        rep.spill_stores = p["spill_stores"]
        rep.spill_loads = p["spill_loads"]
        rep.stack_frame = p["stack_frame"]
        rep.shared_bytes += p["static_smem"]
        rep.ptx_wgmma = "wgmma" in ptx
        rep.ptx_mma = re.search(r"\bmma\.sync", ptx) is not None
        rep.sass_hgmma = "HGMMA" in rep.sass
        rep.sass_hmma = "HMMA" in rep.sass
        rep.cp_async_pending = cp_async_pending(ptx)
    except Sm90ToolMissing:
        raise
    except Exception:
        rep.error = traceback.format_exc()
    return rep


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def launch_signature(pointers: dict, ints: dict, constexprs: dict, floats: Sequence[str] = ()):
    """The ``(signature, constexprs, divisible_by_16)`` a launch would get from Triton's specialisation.

    ``pointers``: name -> pointer type (``"*bf16"``...), all taken as 16-byte aligned (torch
    allocations are); ``ints``: name -> the value a real launch passes (``== 1`` becomes a
    constexpr, a multiple of 16 gets the divisibility hint); ``floats``: fp32 scalars;
    ``constexprs``: the kernel's ``tl.constexpr`` values. Every family's ``compile_specs`` uses it.
    """
    sig = dict(pointers)
    constexprs = dict(constexprs)
    divisible = list(pointers)
    for name in floats:
        sig[name] = "fp32"
    for name, v in ints.items():
        if v == 1:
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                divisible.append(name)
    for name in constexprs:
        sig[name] = "constexpr"
    return sig, constexprs, divisible


def assert_jobs_specify_every_argument(jobs: Iterable[CompileJob]) -> None:
    """Each job's signature names every kernel argument, and every constexpr has a value."""
    for job in jobs:
        fn = _jit_function(job.kernel)
        assert set(job.signature) == set(fn.arg_names), job.label
        for name, ty in job.signature.items():
            if ty == "constexpr":
                assert name in job.constexprs, (job.label, name)


def compile_sm90_many(jobs: Sequence[CompileJob], *, workers: int = 1,
                      in_subprocess: bool | None = None,
                      timeout: float | None = None) -> list[Sm90Report]:
    """Compile every job for sm_90a; one report per job (errors in ``report.error``).

    ``in_subprocess=None`` chooses a subprocess when TRITON_INTERPRET is active
    or ``workers > 1``.  Raises Sm90ToolMissing if ptxas/cuobjdump are absent.

    How it works: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 128))``
    produces PTX and a cubin with Triton's bundled ptxas.  Registers and spills are
    read from the ``ptxas -v`` log of that very compilation (Triton's own ptxas
    command: its flags change between versions and change register allocation),
    and ``cuobjdump --dump-sass`` is run on the cubin to look for HGMMA/HMMA.  Both
    tools ship inside the triton wheel (``triton/backends/nvidia/bin``);
    ``TRITON_PTXAS_PATH`` and ``TRITON_CUOBJDUMP_PATH`` override them.

    Interpreter mode: with ``TRITON_INTERPRET=1`` set when the kernel's module was
    imported, ``@triton.jit`` returns an interpreter wrapper that cannot be
    compiled (nor can the jitted helpers it calls).  In that case (or when asked
    with ``in_subprocess=True`` / ``workers > 1``) the jobs run in a fresh Python
    process without ``TRITON_INTERPRET``, which re-imports the kernel by module and
    qualified name (so kernels must be module-level objects), and the reports come
    back as JSON (:mod:`mmkernels.testing._sm90_worker`).
    """
    jobs = list(jobs)
    if not jobs:
        return []
    check_tools()
    if in_subprocess is None:
        in_subprocess = _settings.triton_interpret() or workers > 1
    if in_subprocess:
        from ._sm90_worker import run_workers
        return run_workers(jobs, workers, timeout)
    return [_compile_in_process(j) for j in jobs]


def compile_sm90(kernel, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                 num_stages: int = 3, divisible_by_16: Sequence[str] = (),
                 options: dict | None = None, label: str = "",
                 in_subprocess: bool | None = None) -> Sm90Report:
    """Compile one kernel for sm_90a and return its report; raises on compile errors."""
    job = CompileJob(kernel=kernel, signature=signature, constexprs=dict(constexprs or {}),
                     num_warps=num_warps, num_stages=num_stages,
                     divisible_by_16=tuple(divisible_by_16), options=dict(options or {}),
                     label=label)
    (rep,) = compile_sm90_many([job], in_subprocess=in_subprocess)
    if rep.error:
        raise Sm90CompileError(f"{label or rep.kernel_name}: compile failed\n{rep.error}")
    return rep


# ---------------------------------------------------------------------------
# assertions
# ---------------------------------------------------------------------------


def assert_compiled(rep: Sm90Report) -> None:
    assert rep.error is None, f"{rep.label or rep.kernel_name}: compile failed\n{rep.error}"


def assert_no_spills(rep: Sm90Report) -> None:
    assert_compiled(rep)
    assert rep.spill_stores == 0 and rep.spill_loads == 0, (
        f"{rep.summary()}: register spills ({rep.spill_stores} B stored, {rep.spill_loads} B loaded)")


def assert_shared_within(rep: Sm90Report, limit: int = SMEM_LIMIT_BYTES) -> None:
    assert_compiled(rep)
    assert rep.shared_bytes <= limit, f"{rep.summary()}: shared memory {rep.shared_bytes} > {limit}"


def assert_tensor_cores(rep: Sm90Report, *, wgmma: bool = False) -> None:
    """PTX has wgmma (or mma.sync) and SASS has HGMMA (or HMMA); ``wgmma=True`` demands Hopper's."""
    assert_compiled(rep)
    if wgmma:
        assert rep.ptx_wgmma and rep.sass_hgmma, f"{rep.summary()}: no wgmma/HGMMA"
    else:
        assert rep.tensor_cores, f"{rep.summary()}: no tensor-core instructions"


def cp_async_pending(ptx: str) -> int:
    """The largest ``N`` of ``cp.async.wait_group N`` in ``ptx`` (-1 when it has none)."""
    waits = [int(n) for n in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)]
    return max(waits, default=-1)


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", re.M)


def mma_loop_sizes(sass: str) -> list[int]:
    """Instruction counts of the SASS loops that hold tensor-core instructions (HGMMA/HMMA).

    A loop is the span from a backward branch's target to the branch. In a GEMM main loop
    every instruction but the MMAs is issue overhead (addresses, masks, copies, waits): when it
    grows, the tensor cores wait for the schedulers, which no register or spill count shows.
    """
    ins = [(int(a, 16), text) for a, text in _SASS_LINE.findall(sass)]
    sizes = []
    for addr, text in ins:
        if "BRA" not in text:
            continue
        target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
        if not target or int(target.group(1), 16) >= addr:
            continue
        lo = int(target.group(1), 16)
        body = [t for a, t in ins if lo <= a <= addr]
        if any("HGMMA" in t or "HMMA" in t for t in body):
            sizes.append(len(body))
    return sizes


def assert_pipelined(rep: Sm90Report, min_pending: int = 1) -> None:
    """Some wait on asynchronous copies leaves ``min_pending`` groups in flight: the main loop's
    loads of later tiles overlap the current tile's math (Triton's software pipeline took it)."""
    assert_compiled(rep)
    assert rep.cp_async_pending >= min_pending, (
        f"{rep.summary()}: loads are not pipelined (cp.async.wait_group leaves at most "
        f"{rep.cp_async_pending} groups in flight, need {min_pending})")


def assert_int64_offsets(rep: Sm90Report) -> None:
    """Every address offset that grows with a tensor (row index times row stride, batch or head
    index times its stride, a grid coordinate times a stride) is multiplied in 64 bits.

    Reads the kernel's TTIR (:func:`mmkernels.testing.ttir_offsets.int32_offset_products`): a
    32-bit ``arith.muli`` of such factors that reaches a ``tt.addptr`` offset fails, naming the
    kernel, the TTIR operation and its source line. Past 2**31 elements such a product wraps.
    """
    assert_compiled(rep)
    assert rep.ttir, f"{rep.label or rep.kernel_name}: no TTIR in the report"
    found = int32_offset_products(rep.ttir)
    assert not found, (
        f"{rep.kernel_name} ({rep.label}): address offsets multiplied in int32 (they wrap past "
        f"2**31 elements; cast the index to tl.int64 before the multiply):\n"
        + "\n".join(f"  {f.ttir.strip()}  at {f.source}" for f in found))


def one_job_per_kernel(jobs: Iterable[CompileJob], keep=None) -> list[CompileJob]:
    """The first job of each kernel among ``jobs`` (``keep(job)`` False: passed over)."""
    out: dict[str, CompileJob] = {}
    for job in jobs:
        if keep is not None and not keep(job):
            continue
        f = _python_fn(job.kernel)
        out.setdefault(f"{f.__module__}.{f.__qualname__}", job)
    return list(out.values())


def assert_sm90_ok(rep: Sm90Report, *, tensor_cores: bool = False, wgmma: bool = False,
                   smem_limit: int = SMEM_LIMIT_BYTES) -> None:
    """Compiled, no spills, shared memory within the limit, and (optionally) tensor cores."""
    assert_compiled(rep)
    assert_no_spills(rep)
    assert_shared_within(rep, smem_limit)
    if tensor_cores or wgmma:
        assert_tensor_cores(rep, wgmma=wgmma)


def compile_reports(jobs: Sequence[CompileJob]) -> dict[str, Sm90Report]:
    """Compile a family's whole compile tier on every core: ``{job.label: report}``.

    Fails (never skips) with a clear message when ptxas/cuobjdump are missing.
    """
    check_tools()
    reps = compile_sm90_many(jobs, workers=max(1, os.cpu_count() or 1), in_subprocess=True)
    return {r.label: r for r in reps}
