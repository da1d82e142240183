"""The compile subprocess of :mod:`mmkernels.testing.sm90`: jobs go out as JSON (kernels named by
module and qualified name), each worker compiles its share in-process without
``TRITON_INTERPRET`` and sends the reports back as JSON. Run as
``python -m mmkernels.testing._sm90_worker`` with the jobs on stdin."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from .sm90 import (CompileJob, Sm90Report, Sm90ToolMissing, _compile_in_process, _python_fn,
                   Sm90CompileError)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def _encode_value(v):
    try:
        import triton.language as tl
        if isinstance(v, tl.dtype):
            return {"__tl_dtype__": v.name}
    except ImportError:
        pass
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"constexpr value {v!r} cannot be sent to the compile subprocess; "
                    "use bool/int/float/str/tl.dtype")


def _decode_value(v):
    if isinstance(v, dict) and "__tl_dtype__" in v:
        import triton.language as tl
        name = v["__tl_dtype__"]
        return getattr(tl, _TL_NAMES.get(name, name))
    return v


_TL_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
             "i32": "int32", "i64": "int64", "i16": "int16", "i8": "int8", "u8": "uint8",
             "int1": "int1"}


def _locate(kernel) -> dict:
    f = _python_fn(kernel)
    qual = f.__qualname__
    if "<locals>" in qual:
        raise Sm90CompileError(
            f"kernel {qual} is defined inside a function; the compile subprocess can only "
            "re-import module-level kernels (or run without TRITON_INTERPRET)")
    mod = sys.modules.get(f.__module__)
    file = getattr(mod, "__file__", None)
    return {"module": f.__module__, "file": file, "qualname": qual}


def _job_to_json(job: CompileJob) -> dict:
    return {
        "where": _locate(job.kernel),
        "signature": dict(job.signature),
        "constexprs": {k: _encode_value(v) for k, v in job.constexprs.items()},
        "num_warps": job.num_warps, "num_stages": job.num_stages,
        "divisible_by_16": list(job.divisible_by_16),
        "options": {k: _encode_value(v) for k, v in job.options.items()},
        "label": job.label,
    }


def _import_kernel(where: dict):
    mod = None
    try:
        mod = importlib.import_module(where["module"])
    except Exception:
        if not where.get("file"):
            raise
    if mod is None or not _has_path(mod, where["qualname"]):
        spec = importlib.util.spec_from_file_location(f"_mmk_sm90_{abs(hash(where['file']))}",
                                                      where["file"])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    obj = mod
    for part in where["qualname"].split("."):
        obj = getattr(obj, part)
    return obj


def _has_path(mod, qualname: str) -> bool:
    obj = mod
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _report_to_json(rep: Sm90Report) -> dict:
    return dataclasses.asdict(rep)


def _worker_main() -> int:
    jobs = json.loads(sys.stdin.read())
    out = []
    for j in jobs:
        try:
            kernel = _import_kernel(j["where"])
            job = CompileJob(kernel=kernel, signature=j["signature"],
                             constexprs={k: _decode_value(v) for k, v in j["constexprs"].items()},
                             num_warps=j["num_warps"], num_stages=j["num_stages"],
                             divisible_by_16=j["divisible_by_16"],
                             options={k: _decode_value(v) for k, v in j["options"].items()},
                             label=j["label"])
            rep = _compile_in_process(job)
        except Sm90ToolMissing as e:
            out.append({"__tool_missing__": str(e)})
            continue
        except Exception:
            rep = Sm90Report(label=j.get("label", ""), kernel_name=j["where"]["qualname"],
                             num_warps=j["num_warps"], num_stages=j["num_stages"],
                             error=traceback.format_exc())
        out.append(_report_to_json(rep))
    sys.stdout.write("\n@@MMK_SM90_JSON@@\n" + json.dumps(out))
    return 0


def run_workers(jobs: list[CompileJob], workers: int, timeout: float | None) -> list[Sm90Report]:
    payloads = [_job_to_json(j) for j in jobs]
    workers = max(1, min(workers, len(jobs)))
    shards = [list(range(i, len(jobs), workers)) for i in range(workers)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT)] + [p for p in sys.path if p])
    marker = "\n@@MMK_SM90_JSON@@\n"
    results: list[Sm90Report | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="mmk_sm90_jobs_") as td:
        procs = []
        for w, shard in enumerate(shards):
            # files, not pipes: a worker never blocks on a full pipe while we wait on another
            inp = Path(td) / f"in{w}.json"
            inp.write_text(json.dumps([payloads[i] for i in shard]))
            out, err = Path(td) / f"out{w}.txt", Path(td) / f"err{w}.txt"
            with open(inp) as fi, open(out, "w") as fo, open(err, "w") as fe:
                p = subprocess.Popen([sys.executable, "-m", "mmkernels.testing._sm90_worker"],
                                     stdin=fi, stdout=fo, stderr=fe, env=env, cwd=str(_REPO_ROOT))
            procs.append((shard, p, out, err))
        for shard, p, out, err in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            stdout = out.read_text(errors="replace")
            if marker not in stdout:
                stderr = err.read_text(errors="replace")
                for i in shard:
                    results[i] = Sm90Report(
                        label=jobs[i].label, kernel_name=_locate(jobs[i].kernel)["qualname"],
                        num_warps=jobs[i].num_warps, num_stages=jobs[i].num_stages,
                        error=f"compile worker failed (rc={p.returncode}):\n{stderr[-4000:]}")
                continue
            data = json.loads(stdout.split(marker, 1)[1])
            for i, d in zip(shard, data):
                if "__tool_missing__" in d:
                    raise Sm90ToolMissing(d["__tool_missing__"])
                results[i] = Sm90Report(**d)
    return results  # type: ignore[return-value]


if __name__ == "__main__":
    sys.exit(_worker_main())
