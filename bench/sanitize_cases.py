"""One small case of every Triton kernel, for compute-sanitizer (``bench/gpu_sanitize.sh``).

::

    python -m bench.sanitize_cases --list                 # the cases and the kernels found
    python -m bench.sanitize_cases --case attention,siglip
    python -m bench.sanitize_cases --all --json run.json  # every case, then the coverage check
    python -m bench.sanitize_cases --all --device cpu     # through Triton's interpreter
    python -m bench.sanitize_cases --all --jobs 8         # each case in its own process

Each case calls a public op forward and backward under ``mmkernels.backend("triton")`` (the
blockwise contrastive path under ``use_path("blockwise")``) on shapes that are not multiples
of any tile size, so every kernel's edge masks run. The shapes are small: under
compute-sanitizer a kernel runs many times slower and every Triton compile happens inside it.

The kernels are found by reading the sources: every ``@triton.jit`` function of ``mmkernels``
that no other jitted function names (calls, or passes to ``tl.reduce``) is a kernel; the rest
are device helpers. ``--all``
fails, naming them, when a kernel was never launched, so a new kernel cannot escape the
sanitizer without a case here. Launches are counted with
:func:`mmkernels.testing.launches.count_launches`.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "mmkernels"
_JIT_DECORATOR = re.compile(r"^\s*@triton\.jit\b", re.MULTILINE)

DTYPE = torch.bfloat16  # the training dtype: tensor-core dots, 16-bit loads and stores


# ----------------------------------------------------------------------------- the kernels

@dataclass(frozen=True)
class Kernels:
    """The jitted functions of ``mmkernels``: ``kernels`` (launched from the host) and
    ``helpers`` (called only from other jitted functions), each ``name -> "module.name"``."""

    kernels: dict[str, str]
    helpers: dict[str, str]


def _jit_classes() -> tuple[type, ...]:
    from triton.runtime.jit import JITFunction
    classes: list[type] = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # a triton without the interpreter
        pass
    return tuple(classes)


def _used(jit_fn) -> set[int]:
    """Ids of the objects ``jit_fn``'s body names (``helper``, ``module.helper``), resolved in
    its module's globals: the jitted functions it calls or passes on (a ``tl.reduce`` combine
    function)."""
    fn = jit_fn.fn
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    scope = fn.__globals__
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in scope:
            out.add(id(scope[node.id]))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in scope:
            obj = getattr(scope[node.value.id], node.attr, None)
            if obj is not None:
                out.add(id(obj))
    return out


def find_kernels() -> Kernels:
    """Every ``@triton.jit`` function under ``mmkernels/``, split into kernels and helpers.

    Raises ``RuntimeError`` when a module holds more ``@triton.jit`` decorators than jitted
    functions at its top level (a kernel made inside a function could not be counted).
    """
    classes = _jit_classes()
    found: dict[int, object] = {}
    problems = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        decorators = len(_JIT_DECORATOR.findall(path.read_text()))
        if not decorators:
            continue
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        module = importlib.import_module(name)
        own = [v for v in vars(module).values()
               if isinstance(v, classes) and getattr(v.fn, "__module__", None) == name]
        if len(own) != decorators:
            problems.append(f"{name}: {decorators} @triton.jit, {len(own)} jitted functions at top level")
        found.update((id(v), v) for v in own)
    if problems:
        raise RuntimeError("kernels the sanitizer cannot account for: " + "; ".join(problems))
    used: set[int] = set()
    for key, fn in found.items():
        used |= _used(fn) - {key}
    kernels, helpers = {}, {}
    for key, fn in found.items():
        qual = f"{fn.fn.__module__}.{fn.fn.__name__}"
        (helpers if key in used else kernels)[fn.fn.__name__] = qual
    if len(kernels) + len(helpers) != len(found):
        raise RuntimeError("two jitted functions share a name: launches are counted by name")
    by_qual = lambda d: dict(sorted(d.items(), key=lambda kv: kv[1]))  # noqa: E731
    return Kernels(by_qual(kernels), by_qual(helpers))


# ----------------------------------------------------------------------------- inputs

def _randn(*shape, device, dtype=DTYPE, seed: int, grad: bool = True, unit: bool = False) -> torch.Tensor:
    """Random normal (never zeros), drawn on the CPU for the same values on every device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if unit:
        x = torch.nn.functional.normalize(x, dim=-1)
    return x.to(device=device, dtype=dtype).requires_grad_(grad)


def _scale(device, value: float = 1 / 0.07) -> torch.Tensor:
    return torch.tensor(value, device=device).requires_grad_(True)


def _ints(high: int, shape, device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g).to(device)


def _backward(out: torch.Tensor, *leaves: torch.Tensor) -> None:
    """Backpropagate a random weighting of ``out``, then check the output and every leaf's
    gradient are finite (a NaN often means a read of memory nothing wrote)."""
    g = torch.Generator().manual_seed(99)
    weight = torch.rand(out.shape, generator=g).to(device=out.device, dtype=out.dtype) + 0.5
    (out * weight).sum().backward()
    _finite(out, "output")
    for i, leaf in enumerate(leaves):
        if leaf.grad is None:
            raise AssertionError(f"input {i} got no gradient")
        _finite(leaf.grad, f"gradient {i}")


def _finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise AssertionError(f"{what} is not finite")


@contextlib.contextmanager
def _triton_blockwise(device: torch.device):
    """The blockwise contrastive path with its Triton arithmetic (its default on CUDA; on the
    CPU its arithmetic is torch ops unless asked for the interpreted kernels)."""
    from mmkernels.contrastive import paths
    original = paths.default_arith
    if device.type != "cuda":
        paths.default_arith = lambda device, dtype: "triton"
    try:
        yield
    finally:
        paths.default_arith = original


# ----------------------------------------------------------------------------- the cases
# Sizes: 29, 61, 97 and 131 rows, 72 features, 7 and 37 queries, 77, 197 and 202 tokens: none
# is a multiple of 16, so every tile loop ends in a ragged tile.

def case_contrastive(device):
    """CLIP loss (statistics with columns, finalize, the fused epilogue) with the one-grid
    backward (``grad_kernel``, 72 features in 3 chunks); a rectangular InfoNCE with targets
    (rows only) with the backward over row blocks (``block_grad_kernel``)."""
    import mmkernels
    from mmkernels import tuning
    img = _randn(97, 72, device=device, seed=1, unit=True)
    txt = _randn(97, 72, device=device, seed=2, unit=True)
    s = _scale(device)
    with mmkernels.backend("triton"), tuning.scope():
        tuning.set_option("contrastive.backward", "one_grid")
        loss = mmkernels.contrastive_loss(img, txt, s, label_smoothing=0.1, reduction="none")
        _backward(loss, img, txt, s)
    q = _randn(61, 72, device=device, seed=3, unit=True)
    k = _randn(131, 72, device=device, seed=4, unit=True)
    s2 = _scale(device)
    with mmkernels.backend("triton"), tuning.scope():
        tuning.set_option("contrastive.backward", "blocks")
        loss = mmkernels.infonce_loss(q, k, s2, targets=_ints(131, (61,), device, seed=5), reduction="none")
        _backward(loss, q, k, s2)


def case_contrastive_blockwise(device):
    """The blockwise path's light kernels over cuBLAS products in row blocks, the last ragged."""
    import mmkernels
    from mmkernels import tuning
    img = _randn(97, 72, device=device, seed=6, unit=True)
    txt = _randn(97, 72, device=device, seed=7, unit=True)
    s = _scale(device)
    with _triton_blockwise(device), tuning.scope(), mmkernels.use_path("blockwise"):
        tuning.set_option("memory_budget", 13 * 97 * 8)  # a dozen-odd rows a block, the last ragged
        loss = mmkernels.contrastive_loss(img, txt, s, reduction="none")
        _backward(loss, img, txt, s)


def case_siglip(device):
    """SigLIP's sigmoid loss with a learnable bias: rows, gradients, the scale/bias sum."""
    import mmkernels
    img = _randn(97, 72, device=device, seed=8, unit=True)
    txt = _randn(131, 72, device=device, seed=9, unit=True)
    s, b = _scale(device, 10.0), torch.tensor(-10.0, device=device).requires_grad_(True)
    with mmkernels.backend("triton"):
        loss = mmkernels.siglip_loss(img, txt, s, b, reduction="none")
    _backward(loss, img, txt, s, b)


def case_itc(device):
    """ALBEF momentum ITC with queues (rows, gradients), BLIP-2 ITC (max over queries) and the
    ITM hard negatives."""
    import mmkernels
    img = _randn(29, 72, device=device, seed=10, unit=True)
    txt = _randn(29, 72, device=device, seed=11, unit=True)
    img_m = _randn(29, 72, device=device, seed=12, unit=True, grad=False)
    txt_m = _randn(29, 72, device=device, seed=13, unit=True, grad=False)
    iq = _randn(67, 72, device=device, seed=14, unit=True, grad=False)
    tq = _randn(67, 72, device=device, seed=15, unit=True, grad=False)
    s = _scale(device)
    with mmkernels.backend("triton"):
        loss = mmkernels.momentum_itc_loss(img, txt, img_m, txt_m, s, alpha=0.4, image_queue=iq,
                                           text_queue=tq, reduction="none")
    _backward(loss, img, txt, s)
    feats = _randn(29, 7, 72, device=device, seed=16, unit=True)
    text = _randn(29, 72, device=device, seed=17, unit=True)
    s2 = _scale(device)
    with mmkernels.backend("triton"):
        loss = mmkernels.blip2_itc_loss(feats, text, s2, reduction="none")
    _backward(loss, feats, text, s2)
    gen = torch.Generator(device=device).manual_seed(18)
    with mmkernels.backend("triton"), torch.no_grad():
        neg_text, neg_image = mmkernels.itm_hard_negatives(feats, text, s2, generator=gen)
    if not (bool((neg_text != torch.arange(29, device=device)).all())
            and bool((neg_image != torch.arange(29, device=device)).all())):
        raise AssertionError("a hard negative is its own positive")


def _itg_mask(device):
    """BLIP-2's ITG mask over 32 queries and 170 text tokens (202 in all; the second sample
    has 101 text tokens): at 128 x 64 and 64 x 64 tiles it has empty, full and partial tiles."""
    import mmkernels
    mask = mmkernels.MultimodalMask.blip2(32, torch.tensor([170, 101]), 170, objective="itg").to(device)
    for bm, bn in ((128, 64), (64, 64)):
        classes = set(mask.tile_map(bm, bn).unique().tolist())
        if classes != {0, 1, 2}:
            raise AssertionError(f"the mask's {bm} x {bn} tile classes are {sorted(classes)}, "
                                 "not empty, full and partial")
    return mask


def case_attention(device):
    """Multimodal attention forward and backward under the ITG mask, grouped-query heads
    (2 query heads, 1 key/value head), head dim 72; the mask's tile map from its Triton kernel."""
    import mmkernels
    from mmkernels.attention.tile_kernel import tile_map_triton
    mask = _itg_mask(device)
    # the tile-map kernel: the attention launcher's own on CUDA; called here so that it also
    # runs (through the interpreter) where mask.tile_map takes torch ops
    for bm, bn in ((128, 64), (32, 64)):
        got = tile_map_triton(mask.metadata(), bm, bn)
        if not torch.equal(got.cpu(), mask.to("cpu").tile_map(bm, bn)):
            raise AssertionError(f"the Triton tile map at {bm} x {bn} differs from the torch one")
    q = _randn(2, 2, 202, 72, device=device, seed=20)
    k = _randn(2, 1, 202, 72, device=device, seed=21)
    v = _randn(2, 1, 202, 72, device=device, seed=22)
    with mmkernels.backend("triton"):
        out = mmkernels.multimodal_attention(q, k, v, mask=mask)
    _backward(out, q, k, v)


def case_cross_attention(device):
    """Q-Former cross-attention: 37 queries over 197 image tokens with key padding and dropout;
    then without either, its keys and values strided views from ``fused_kv_projection``."""
    import mmkernels
    q = _randn(2, 2, 37, 72, device=device, seed=30)
    k = _randn(2, 2, 197, 72, device=device, seed=31)
    v = _randn(2, 2, 197, 72, device=device, seed=32)
    keep = torch.ones(2, 197, dtype=torch.bool)
    keep[1, 150:] = False
    gen = torch.Generator(device=device).manual_seed(33)
    with mmkernels.backend("triton"):
        out = mmkernels.cross_attention(q, k, v, key_padding_mask=keep.to(device), dropout_p=0.1,
                                        generator=gen)
    _backward(out, q, k, v)
    image = _randn(2, 197, 120, device=device, seed=34)
    w = [(_randn(144, 120, device=device, seed=35 + 2 * i), _randn(144, 120, device=device, seed=36 + 2 * i))
         for i in range(2)]
    q2 = _randn(2, 2, 37, 72, device=device, seed=40)
    with mmkernels.backend("triton"):
        kv = mmkernels.fused_kv_projection(image, w, None, num_heads=2)
        out = mmkernels.cross_attention(q2, *kv[1])
    _backward(out, q2, image)


def case_experts_linear(device):
    """A three-expert linear layer routed by an ids tensor (uneven counts): routing, grouped
    GEMM forward, its transpose for dx and the weight/bias gradient kernel."""
    import mmkernels
    x = _randn(2, 77, 88, device=device, seed=50)
    ids = _ints(3, (2, 77), device, seed=51)
    w = _randn(3, 100, 88, device=device, seed=52)
    b = _randn(3, 100, device=device, seed=53)
    with mmkernels.backend("triton"):
        out = mmkernels.modality_linear(x, ids, w, b)
    _backward(out, x, w, b)


def case_experts_ffn(device):
    """A two-expert SwiGLU FFN routed by a split position (the position-split routing kernel),
    the fused two-GEMM kernel forward and its backward."""
    import mmkernels
    x = _randn(2, 77, 88, device=device, seed=60)
    w_in = _randn(2, 240, 88, device=device, seed=61)
    b_in = _randn(2, 240, device=device, seed=62)
    w_out = _randn(2, 100, 120, device=device, seed=63)
    b_out = _randn(2, 100, device=device, seed=64)
    with mmkernels.backend("triton"):
        out = mmkernels.modality_ffn(x, 29, w_in, b_in, w_out, b_out, activation="swiglu")
    _backward(out, x, w_in, b_in, w_out, b_out)


def case_layer_norm(device):
    """A three-expert LayerNorm over 200 features, expert 1 without tokens: forward, backward
    and the per-expert weight/bias reduction."""
    import mmkernels
    x = _randn(2, 77, 200, device=device, seed=70)
    ids = _ints(2, (2, 77), device, seed=71) * 2  # experts 0 and 2
    w = _randn(3, 200, device=device, seed=72)
    b = _randn(3, 200, device=device, seed=73)
    with mmkernels.backend("triton"):
        out = mmkernels.modality_layer_norm(x, ids, w, b)
    _backward(out, x, w, b)


CASES: dict[str, Callable[[torch.device], None]] = {
    "contrastive": case_contrastive,
    "contrastive_blockwise": case_contrastive_blockwise,
    "siglip": case_siglip,
    "itc": case_itc,
    "attention": case_attention,
    "cross_attention": case_cross_attention,
    "experts_linear": case_experts_linear,
    "experts_ffn": case_experts_ffn,
    "layer_norm": case_layer_norm,
}


# ----------------------------------------------------------------------------- running

@dataclass
class CaseResult:
    name: str
    status: str  # "ok" | "error"
    seconds: float
    launches: dict[str, int]
    error: str = ""


def run_case(name: str, device: torch.device) -> CaseResult:
    """Run one case, counting its Triton launches; an exception becomes an ``error`` result."""
    from mmkernels.testing.launches import count_launches
    t0 = time.perf_counter()
    status, error = "ok", ""
    with count_launches() as count:
        try:
            CASES[name](device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:  # recorded, and the other cases still run
            status = "error"
            error = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return CaseResult(name, status, round(time.perf_counter() - t0, 2), dict(count.triton), error)


def summary(results: list[CaseResult], kernels: Kernels, device: torch.device, checked: bool) -> dict:
    """What the run did, as written to ``--json``: the cases, the launches per kernel and, when
    ``checked`` (every case ran), the kernels never launched."""
    import triton
    launched = Counter()
    for r in results:
        launched.update(r.launches)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (TRITON_INTERPRET=1)",
        "torch": torch.__version__, "triton": triton.__version__,
        "cases": [vars(r) for r in results],
        "kernels": kernels.kernels,
        "helpers": len(kernels.helpers),
        "launches": dict(sorted(launched.items())),
        "unknown_launches": sorted(set(launched) - set(kernels.kernels)),
    }
    if checked:
        out["never_launched"] = sorted(set(kernels.kernels) - set(launched))
    return out


def _write(path: str | None, data: dict) -> None:
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)


def run(names: list[str], device: torch.device, json_path: str | None = None, *,
        check_coverage: bool = False, log=print) -> dict:
    """Run ``names`` in turn (the JSON rewritten after each), then the coverage check."""
    kernels = find_kernels()
    results: list[CaseResult] = []
    for name in names:
        log(f"case {name} ...", flush=True)
        r = run_case(name, device)
        results.append(r)
        log(f"case {name}: {r.status} in {r.seconds:.1f} s, "
            f"{sum(r.launches.values())} launches of {len(r.launches)} kernels", flush=True)
        if r.error:
            log(r.error, flush=True)
        _write(json_path, summary(results, kernels, device, checked=False))
    data = summary(results, kernels, device, checked=check_coverage)
    _write(json_path, data)
    return data


def run_parallel(names: list[str], device: torch.device, jobs: int, json_path: str | None = None, *,
                 check_coverage: bool = False, log=print) -> dict:
    """:func:`run` with each case in its own process, ``jobs`` at a time, merged into one summary.

    For the plain run before the sanitized ones: the processes compile their kernels into
    Triton's cache side by side, so the sanitized runs (one process each) load them instead.
    """
    kernels = find_kernels()
    results: dict[str, CaseResult] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent),
                                                                    os.environ.get("PYTHONPATH")])))

    def one(name: str, tmp: str) -> CaseResult:
        out = Path(tmp) / f"{name}.json"
        proc = subprocess.run([sys.executable, "-m", "bench.sanitize_cases", "--case", name,
                               "--device", device.type, "--json", str(out)],
                              capture_output=True, text=True, env=env)
        cases = json.loads(out.read_text()).get("cases", []) if out.exists() else []
        if cases:
            return CaseResult(**cases[0])
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        return CaseResult(name, "error", 0.0, {}, f"the case's process exited {proc.returncode}:\n{tail}")

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {pool.submit(one, name, tmp): name for name in names}
        for future in as_completed(futures):
            r = future.result()
            results[r.name] = r
            log(f"case {r.name}: {r.status} in {r.seconds:.1f} s, "
                f"{sum(r.launches.values())} launches of {len(r.launches)} kernels", flush=True)
            if r.error:
                log(r.error, flush=True)
    data = summary([results[n] for n in names], kernels, device, checked=check_coverage)
    _write(json_path, data)
    return data


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.sanitize_cases", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the cases and the kernels found")
    what.add_argument("--case", help="comma-separated case names")
    what.add_argument("--all", action="store_true", help="every case, then check every kernel was launched")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default cuda when available; cpu runs the kernels through TRITON_INTERPRET=1")
    p.add_argument("--json", help="write the run's summary here (rewritten after each case)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run the cases in this many processes at a time (compiles in parallel)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--device cpu needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read when mmkernels and triton are imported
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        message = "CUDA is not available to this process (torch.cuda.is_available() is False)"
        print(message, file=sys.stderr)
        _write(args.json, {"device": device_name, "error": message, "cases": []})
        return 2
    if args.list:
        kernels = find_kernels()
        print("cases:", " ".join(CASES))
        print(f"kernels ({len(kernels.kernels)}):")
        for name, qual in kernels.kernels.items():
            print(f"  {qual}")
        print(f"device helpers: {len(kernels.helpers)}")
        return 0
    names = list(CASES) if args.all else [n.strip() for n in args.case.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; the cases are {list(CASES)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.jobs > 1:
        data = run_parallel(names, device, args.jobs, args.json, check_coverage=args.all)
    else:
        data = run(names, device, args.json, check_coverage=args.all)
    failed = [c["name"] for c in data["cases"] if c["status"] != "ok"]
    rc = 0
    if failed:
        print(f"FAILED cases: {', '.join(failed)}")
        rc = 1
    if data.get("never_launched"):
        print(f"kernels never launched (add a case): {', '.join(data['never_launched'])}")
        rc = rc or 3
    if data["unknown_launches"]:
        print(f"launched but not found under mmkernels/: {', '.join(data['unknown_launches'])}")
    print(f"{len(names)} case(s) in {time.perf_counter() - t0:.1f} s; "
          f"{len(data['launches'])} of {len(data['kernels'])} kernels launched")
    return rc


if __name__ == "__main__":
    sys.exit(main())
