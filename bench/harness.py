"""The benchmark harness shared by every op family.

A family module (``bench/cases/<family>.py``) describes *what* to measure as a
list of :class:`Case` objects, each naming its :class:`Provider` s. This module
decides *how* to measure, the same way for every family:

* **Time** is the median over repeats of one call of the op, forward and
  backward (``loss.backward()``) for ``mode="fwd+bwd"`` cases. The inputs'
  ``.grad`` are set to ``None`` before each repeat (outside the timed region).
  On CUDA every repeat is timed with its own pair of CUDA events, after
  warm-up (which also absorbs Triton compilation and autotuning), with a
  256 MiB buffer written before each repeat to flush L2, and with no host
  synchronisation inside the timed region (one ``synchronize`` after all
  repeats). On CPU each repeat is timed with ``time.perf_counter``; fewer
  repeats at big sizes (a time budget per measurement, at least
  ``min_reps``).
* **Memory** is the *extra* memory of one call: the peak during one
  forward+backward minus what was already held before it (the inputs) minus
  the inputs' gradients that the backward produces. On CUDA the peak is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU
  each (case, provider) runs in its own subprocess, with glibc told to return
  every allocation of 64 KiB or more to the OS when it is freed
  (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows live tensors; the
  subprocess builds the inputs, runs one warm-up call, frees its gradients,
  resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), records RSS,
  runs one call and reads the peak (``VmHWM``; ``ru_maxrss`` where the reset is
  not possible).
* **Skips** are decided before running: a provider that is not importable or
  does not support the device or shape says why; a provider whose memory
  estimate exceeds the free memory of the device is skipped with the estimate;
  an out-of-memory error while running is recorded as ``skipped: out of
  memory``.

Run ``python -m bench --help`` for the CLI; ``bench/report.py`` writes the
JSON, Markdown and PNG outputs.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

import mmkernels
from mmkernels._dispatch import PathUnavailable

BASELINE = "mmkernels"  # the provider every peer is compared with
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024**3
MiB = 1024**2

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


# --------------------------------------------------------------------------
# What a family declares
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    """One implementation of an op.

    ``fn(**inputs)`` runs the op and returns its output (a scalar loss for
    ``fwd+bwd`` cases). ``check(case)`` returns a reason to skip (not
    importable, wrong device, unsupported shape) or ``None``.
    ``mem_estimate(case)`` estimates the extra bytes one call needs (beyond the
    inputs and their gradients), used to skip what cannot fit. All three must
    be module-level functions (or ``functools.partial`` of them) so that a
    case can be sent to a subprocess with pickle.
    """

    name: str
    fn: Callable[..., Any]
    check: Optional[Callable[["Case"], Optional[str]]] = None
    mem_estimate: Optional[Callable[["Case"], int]] = None
    note: str = ""


@dataclass(frozen=True)
class Case:
    """One op at one shape and dtype, with the providers to compare.

    ``make_inputs(case)`` returns a dict of keyword arguments for the
    providers; every floating leaf that should receive a gradient is created
    with ``requires_grad=True``. Inputs are drawn from a generator seeded from
    the case id, so every provider of a case sees the same data.
    """

    family: str
    op: str
    shape: dict
    dtype: str
    device: str
    make_inputs: Callable[["Case"], dict]
    providers: tuple
    mode: str = "fwd+bwd"  # or "fwd"
    flops: Optional[float] = None  # nominal FLOPs of one call, for effective throughput
    flops_formula: str = ""
    x: str = "N"  # the shape key on the plot's x axis
    rate_probe: bool = False  # a torch.mm probe whose rate other cases are compared with
    note: str = ""

    @property
    def id(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}[{dims},{DTYPE_SHORT.get(self.dtype, self.dtype)}]"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode()) & 0x7FFFFFFF

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"{self.id} has no provider {name!r}")


@dataclass
class RunOptions:
    budget_ms: float = 1000.0  # total timed work per measurement (CUDA)
    warmup_ms: float = 100.0  # warm-up after the first (compiling) call (CUDA)
    min_reps: int = 5
    max_reps: int = 100
    cpu_budget_ms: float = 3000.0
    cpu_min_reps: int = 3
    cpu_max_reps: int = 10
    flush_l2: bool = True
    isolate: bool = False  # one subprocess per measurement (always on for CPU memory numbers)
    timeout_s: float = 900.0  # per isolated measurement
    mem_headroom: float = 0.9  # skip when the estimate exceeds this share of free memory
    threads: Optional[int] = None  # torch intra-op threads (CPU); None: torch's default


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    neg = n < 0
    n = abs(float(n))
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            s = f"{n / size:.2f} {unit}"
            break
    else:
        s = f"{n:.0f} B"
    return "-" + s if neg else s


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def grad_leaves(inputs: dict) -> list:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def clear_grads(leaves: list) -> None:
    for t in leaves:
        t.grad = None


def _grad_bytes(leaves: list) -> int:
    return sum(tensor_bytes(t.grad) for t in leaves if t.grad is not None)


def input_bytes(inputs: dict) -> int:
    return sum(tensor_bytes(v) for v in inputs.values() if isinstance(v, torch.Tensor))


def free_memory(device: str) -> int:
    """Bytes that a new allocation could still get on ``device``."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency of the bench
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE"))


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def _short_error(exc: BaseException, limit: int = 300) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " ... " + lines[-1]
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dispatch_summary(decisions) -> list:
    """The paths mmkernels ops took in one call, one entry per distinct (op, path, backend):
    ``{"op", "path", "backend", "case": [device kind, dtype, shape class]}``."""
    seen, out = set(), []
    for d in decisions:
        key = (d.op, d.path, d.backend, d.case)
        if key not in seen:
            seen.add(key)
            out.append({"op": d.op, "path": d.path, "backend": d.backend, "case": list(d.case)})
    return out


def path_label(rec: dict) -> str:
    """The paths of a record, ``"blockwise"`` or ``"op: path, op: path"``; ``""`` when no
    mmkernels op ran (or the record predates path recording)."""
    entries = rec.get("paths") or []
    names = []
    for e in entries:
        name = e["path"] + (f" ({e['backend']})" if e.get("backend") and e["path"] == "kernel" else "")
        names.append(name if len(entries) == 1 else f"{e['op']}: {name}")
    return ", ".join(dict.fromkeys(names))


def base_record(case: Case, provider: Provider) -> dict:
    return {
        "family": case.family,
        "op": case.op,
        "case": case.id,
        "provider": provider.name,
        "device": case.device,
        "dtype": case.dtype,
        "shape": dict(case.shape),
        "mode": case.mode,
        "x": case.x,
        "rate_probe": case.rate_probe,
        "flops": case.flops,
        "flops_formula": case.flops_formula,
        "status": None,
        "reason": None,
        "time_ms": None,
        "time_ms_min": None,
        "time_ms_max": None,
        "reps": None,
        "tflops": None,
        "mem_extra_bytes": None,
        "mem_peak_bytes": None,
        "mem_base_bytes": None,
        "grad_bytes": None,
        "input_bytes": None,
        "mem_method": None,
        "mem_estimate_bytes": None,
        "loss": None,
        "paths": None,
        "launches": None,
        "note": provider.note,
    }


def _skip(rec: dict, reason: str) -> dict:
    rec["status"] = "skipped"
    rec["reason"] = reason
    return rec


# --------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------


def make_step(case: Case, provider: Provider, inputs: dict) -> Callable[[], Any]:
    fn = provider.fn
    if case.mode == "fwd+bwd":

        def step():
            out = fn(**inputs)
            out.backward()
            return out

    else:

        def step():
            with torch.no_grad():
                return fn(**inputs)

    return step


def _scalar(out: Any) -> Optional[float]:
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        return float(out.detach().float().item())
    return None


_FLUSH: dict = {}


def _count_cuda_launches(step, leaves) -> Optional[int]:
    """Device activities (kernels, memsets, copies) of one call, counted by the profiler; None
    when the profiler cannot see the device."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    clear_grads(leaves)
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    except Exception:
        return None
    return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)


def _l2_flush_buffer(device: str) -> torch.Tensor:
    if device not in _FLUSH:
        # 256 MiB: several times the L2 of any current GPU (H100 50 MB, H200 60 MB)
        _FLUSH[device] = torch.empty(256 * MiB, dtype=torch.int8, device=device)
    return _FLUSH[device]


def _time_cuda(step, leaves, opts: RunOptions, device: str, est_ms: float) -> list:
    """Per-repeat CUDA-event times (ms); ``est_ms`` is one call's time after compilation."""
    flush = _l2_flush_buffer(device) if opts.flush_l2 else None
    est = max(est_ms, 1e-3)
    n_warm = int(min(max(math.ceil(opts.warmup_ms / est), 1), 50))
    for _ in range(n_warm):
        clear_grads(leaves)
        step()
    min_reps = opts.min_reps if est < 1000 else min(opts.min_reps, 3)  # fewer at big sizes
    n = int(min(max(math.ceil(opts.budget_ms / est), min_reps), opts.max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        clear_grads(leaves)  # host-side, outside the timed region
        if flush is not None:
            flush.zero_()
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _time_cpu(step, leaves, opts: RunOptions, est_ms: float) -> list:
    n = int(min(max(math.ceil(opts.cpu_budget_ms / max(est_ms, 1e-3)), opts.cpu_min_reps), opts.cpu_max_reps))
    times = []
    for _ in range(n):
        clear_grads(leaves)
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _mem_cuda(step, leaves, device: str) -> dict:
    """Extra memory of one call; also times it (``est_ms``) for planning the repeats."""
    clear_grads(leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = step()
    end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    est_ms = start.elapsed_time(end)
    del out
    grads = _grad_bytes(leaves)
    return {
        "mem_base_bytes": base,
        "mem_peak_bytes": peak,
        "grad_bytes": grads,
        "mem_extra_bytes": peak - base - grads,
        "mem_method": "cuda max_memory_allocated",
        "_est_ms": est_ms,
    }


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass


def _mem_rss(step, leaves) -> dict:
    clear_grads(leaves)
    gc.collect()
    _malloc_trim()
    reset = _reset_peak_rss()
    base_kib = _proc_status_kib("VmRSS")
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = step()
    del out
    peak_kib = _proc_status_kib("VmHWM") if reset else None
    method = "rss VmHWM (peak reset before the call)"
    if peak_kib is None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "rss ru_maxrss (no peak reset; includes the warm-up's peak)"
        if ru_before > peak_kib:
            peak_kib = ru_before
    if base_kib is None:
        return {"mem_method": "unavailable"}
    grads = _grad_bytes(leaves)
    base, peak = base_kib * 1024, peak_kib * 1024
    return {
        "mem_base_bytes": base,
        "mem_peak_bytes": peak,
        "grad_bytes": grads,
        "mem_extra_bytes": max(peak - base - grads, 0),
        "mem_method": method,
    }


def preflight(case: Case, provider: Provider, opts: RunOptions, rec: Optional[dict] = None) -> Optional[str]:
    """A reason not to run (device missing, provider unavailable, estimate over free memory), or None."""
    if case.device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA is not available"
    if provider.check is not None:
        try:
            reason = provider.check(case)
        except Exception as exc:  # a broken optional import is a skip, not a crash
            reason = f"not usable: {_short_error(exc)}"
        if reason:
            return reason
    if provider.mem_estimate is not None:
        est = int(provider.mem_estimate(case))
        if rec is not None:
            rec["mem_estimate_bytes"] = est
        free = free_memory(case.device)
        if est > opts.mem_headroom * free:
            return f"estimated {fmt_bytes(est)} > {opts.mem_headroom:.0%} of free {case.device} memory ({fmt_bytes(free)})"
    return None


def measure(case: Case, provider: Provider, opts: RunOptions, *, isolated: bool = False) -> dict:
    """Measure one (case, provider) in this process and return its record.

    On CPU, memory is measured only when ``isolated`` (one subprocess per
    measurement); in a shared process RSS says little about one call.
    """
    rec = base_record(case, provider)
    device = case.device
    reason = preflight(case, provider, opts, rec)
    if reason:
        return _skip(rec, reason)

    inputs = leaves = step = None
    try:
        torch.manual_seed(case.seed)
        inputs = case.make_inputs(case)
        leaves = grad_leaves(inputs)
        rec["input_bytes"] = input_bytes(inputs)
        step = make_step(case, provider, inputs)
        cuda = device.startswith("cuda")

        # first call: compilation / autotuning / lazy initialisation, and a check
        # that the output is finite
        clear_grads(leaves)
        t0 = time.perf_counter()
        with mmkernels.explain() as decisions:
            out = step()
        if cuda:
            torch.cuda.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3
        rec["paths"] = dispatch_summary(decisions)
        rec["loss"] = _scalar(out)
        del out
        if rec["loss"] is not None and not math.isfinite(rec["loss"]):
            rec["status"] = "error"
            rec["reason"] = f"non-finite output {rec['loss']}"
            return rec

        if cuda and provider.name.startswith(BASELINE):
            rec["launches"] = _count_cuda_launches(step, leaves)
        if cuda:
            mem = _mem_cuda(step, leaves, device)
            est = mem.pop("_est_ms")
            rec.update(mem)
            times = _time_cuda(step, leaves, opts, device, est)
        else:
            est = first_ms
            if isolated:
                t0 = time.perf_counter()
                rec.update(_mem_rss(step, leaves))
                est = (time.perf_counter() - t0) * 1e3
            times = _time_cpu(step, leaves, opts, est)
        rec["status"] = "ok"
        rec["time_ms"] = statistics.median(times)
        rec["time_ms_min"] = min(times)
        rec["time_ms_max"] = max(times)
        rec["reps"] = len(times)
        if case.flops:
            rec["tflops"] = case.flops / (rec["time_ms"] * 1e-3) / 1e12
        return rec
    except Exception as exc:
        if _is_oom(exc):
            return _skip(rec, "out of memory")
        if isinstance(exc, PathUnavailable):
            return _skip(rec, _short_error(exc))
        rec["status"] = "error"
        rec["reason"] = _short_error(exc)
        traceback.print_exc(file=sys.stderr)
        return rec
    finally:
        del inputs, leaves, step
        gc.collect()
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Isolated measurement (a subprocess per (case, provider))
# --------------------------------------------------------------------------

_RESULT_TAG = "@@BENCH_RESULT@@"


def measure_isolated(case: Case, provider: Provider, opts: RunOptions) -> dict:
    rec = base_record(case, provider)
    reason = preflight(case, provider, opts, rec)  # cheap; spares a subprocess for a skip
    if reason:
        return _skip(rec, reason)
    payload = pickle.dumps((case, provider.name, opts))
    env = dict(os.environ)
    # Every allocation of 64 KiB or more gets its own mmap and is unmapped on
    # free, so RSS follows live tensors (no heap reuse hiding growth).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.harness", "--worker"],
            input=payload,
            capture_output=True,
            cwd=REPO_ROOT,
            env=env,
            timeout=opts.timeout_s,
        )
    except subprocess.TimeoutExpired:
        rec = base_record(case, provider)
        rec["status"] = "error"
        rec["reason"] = f"timeout: over {opts.timeout_s:.0f} s"
        return rec
    out = proc.stdout.decode(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith(_RESULT_TAG):
            rec = json.loads(line[len(_RESULT_TAG):])
            if rec["status"] == "error":
                sys.stderr.write(proc.stderr.decode(errors="replace")[-4000:])
            return rec
    rec = base_record(case, provider)
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode < 0 and -proc.returncode == 9:
        return _skip(rec, "out of memory (worker killed by signal 9)")
    rec["status"] = "error"
    rec["reason"] = f"worker exited with {proc.returncode}: {err.splitlines()[-1] if err else 'no output'}"[:300]
    sys.stderr.write(err[-4000:] + "\n")
    return rec


def _worker_main() -> int:
    case, provider_name, opts = pickle.loads(sys.stdin.buffer.read())
    if opts.threads:
        torch.set_num_threads(opts.threads)
    rec = measure(case, case.provider(provider_name), opts, isolated=True)
    sys.stdout.write("\n" + _RESULT_TAG + json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------


def plan(cases: list, providers: Optional[list] = None) -> list:
    """(case, provider) pairs in run order, with duplicate case ids dropped."""
    seen, pairs = set(), []
    for case in cases:
        if case.id in seen:
            continue
        seen.add(case.id)
        for prov in case.providers:
            if providers and prov.name not in providers and not case.rate_probe:
                continue
            pairs.append((case, prov))
    return pairs


def progress_line(i: int, n: int, rec: dict) -> str:
    head = f"[{i:>{len(str(n))}}/{n}] {rec['case']:<40} {rec['provider']:<10}"
    if rec["status"] == "ok":
        s = f"{head} ok      {rec['time_ms']:>10.3f} ms  (x{rec['reps']})"
        if rec["mem_extra_bytes"] is not None:
            s += f"  extra {fmt_bytes(rec['mem_extra_bytes'])}"
        if rec["tflops"] is not None:
            s += f"  {rec['tflops']:.3g} TFLOP/s"
        if rec["loss"] is not None:
            s += f"  loss {rec['loss']:.5g}"
        return s
    return f"{head} {rec['status']:<7} {rec['reason']}"


def run(
    cases: list,
    opts: RunOptions,
    *,
    providers: Optional[list] = None,
    deadline: Optional[float] = None,
    on_result: Optional[Callable[[list], None]] = None,
    log: Callable[[str], None] = print,
) -> list:
    pairs = plan(cases, providers)
    results = []
    for i, (case, prov) in enumerate(pairs, 1):
        if deadline is not None and time.monotonic() > deadline:
            rec = _skip(base_record(case, prov), "time budget exhausted")
        elif opts.isolate:
            rec = measure_isolated(case, prov, opts)
        else:
            rec = measure(case, prov, opts)
        results.append(rec)
        log(progress_line(i, len(pairs), rec))
        if on_result is not None:
            on_result(results)
    return results


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    try:
        p = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else None
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_state() -> Optional[dict]:
    """Clocks, temperature and power as nvidia-smi reads them (None without it)."""
    fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit"
    try:
        p = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
    except Exception:
        return None
    if p.returncode != 0 or not p.stdout.strip():
        return None
    vals = [v.strip() for v in p.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), vals))


def _loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: str) -> dict:
    env: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "argv": ["python -m bench" if sys.argv and sys.argv[0].endswith("__main__.py") else sys.argv[0], *sys.argv[1:]] if sys.argv else [],
        "loadavg_start": _loadavg(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import numpy

        env["numpy"] = numpy.__version__
    except Exception:
        env["numpy"] = None
    commit = os.environ.get("BENCH_GIT_COMMIT") or _git("rev-parse", "HEAD")
    env["git_commit"] = commit or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    env["git_dirty"] = bool(status) if status is not None else None
    try:
        import mmkernels

        env["mmkernels"] = getattr(mmkernels, "__version__", "importable")
    except Exception as exc:
        env["mmkernels"] = f"not importable: {_short_error(exc, 160)}"
    try:
        from mmkernels import tuning

        env["tuning"] = tuning.to_dict()  # launch overrides in force (MMKERNELS_TUNING_FILE)
    except Exception as exc:
        env["tuning"] = f"unavailable: {_short_error(exc, 160)}"
    env["env_vars"] = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("MMKERNELS_", "TRITON_", "CUDA_VISIBLE", "OMP_NUM_THREADS"))
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device_name"] = props.name
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "total_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
            "state_start": gpu_state(),
        }
    else:
        env["device_name"] = f"{env['cpu']} ({os.cpu_count()} cores)"
    return env


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        # use the importable module (not this __main__ copy) so that pickled
        # cases and options resolve to the same classes
        from bench.harness import _worker_main as _canonical_worker_main

        sys.exit(_canonical_worker_main())
    print("bench.harness is a library; run `python -m bench`", file=sys.stderr)
    sys.exit(2)
