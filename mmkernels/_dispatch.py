"""Which implementation runs a call under backend ``auto`` (the op contract, point 3).

A *case* is ``(op, device kind, dtype, shape class)``. Each family keeps one table,
``mmkernels/<family>/dispatch_table.py``, generated from ``bench/results/`` by
``python -m bench.dispatch_table``: for each case, the family's paths ordered fastest first.
An op lists its paths with, for this call, ``None`` (it can run) or the reason it cannot
(the memory budget, the device, the mask...); :func:`choose` returns the first path of the
table's order that can run. ``"kernel"`` is the family's own kernels (C++ on CPU tensors,
Triton on CUDA); the other paths are built from PyTorch's own fast ops (cuBLAS GEMMs, SDPA,
varlen attention, FlexAttention, grouped_mm), each tested against the reference.

* ``mmkernels.backend("cpu" | "triton")`` forces the kernels, ``backend("reference")`` the
  reference; the table is consulted only under ``auto``.
* ``with mmkernels.use_path("blockwise"):`` forces a path for every op that has one of that
  name (a ``RuntimeError`` when it cannot run the call); the benchmarks time each path so.
* ``with mmkernels.explain() as log:`` records every choice made inside (``print(log)``), and
  the logger ``mmkernels.dispatch`` reports each at DEBUG level.
* ``with pretend_device("cuda-sm90"):`` makes CPU tensors look like another device kind to
  the table (tests of the choices).

The option ``memory_budget`` (:mod:`mmkernels.tuning`, bytes) bounds what a path may
allocate beyond O(inputs): an ``N x M`` block of logits, a dense attention mask. Paths that
would exceed it are not eligible.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Iterator, Mapping, NamedTuple

import torch

from . import _backend, _ext, tuning
from ._context import ContextStack

KERNEL = "kernel"
REFERENCE = "reference"
WILDCARD = "*"

#: device kinds the tables know, most specific first within a vendor
DEVICE_KINDS = ("cpu", "cuda-sm90", "cuda")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}

log = logging.getLogger("mmkernels.dispatch")


class NotForAuto(str):
    """A reason a path is not chosen under ``auto`` although it can run the call (it would lose
    the numerics rule there, say). ``use_path`` still runs it; the reason shows in ``explain()``."""


class PathUnavailable(RuntimeError):
    """A path forced by :func:`use_path` cannot run the call (the message says why)."""


def _check_budget(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"memory_budget must be a non-negative int (bytes), got {value!r}")
    return value


tuning.register_option(
    "memory_budget", 64 << 20, _check_budget,
    "bytes a path may allocate beyond O(inputs) (a block of N x M logits, a dense mask); "
    "paths that would need more are not chosen")


def memory_budget() -> int:
    """The option ``memory_budget`` in bytes (default 64 MiB)."""
    return tuning.option("memory_budget")


# ----------------------------------------------------------------------------- device kinds

_pretend: ContextStack[str] = ContextStack("mmkernels_pretend_device")


@contextlib.contextmanager
def pretend_device(kind: str) -> Iterator[None]:
    """Inside the block, the table sees every call as running on ``kind`` (one of
    ``DEVICE_KINDS``). Only the table lookup changes: paths still run on the real device."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {kind!r}; choose one of {DEVICE_KINDS}")
    with _pretend.pushed(kind):
        yield


def device_kind(device: torch.device) -> str:
    """``"cpu"``, ``"cuda-sm90"`` (compute capability 9.x: H100, H200) or ``"cuda"``."""
    if _pretend:
        return _pretend.top()
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "cuda-sm90" if major == 9 else "cuda"
    return "cpu"


def _kind_fallbacks(kind: str) -> tuple[str, ...]:
    if kind.startswith("cuda") and kind != "cuda":
        return (kind, "cuda", WILDCARD)
    return (kind, WILDCARD)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------- tables

@dataclass(frozen=True)
class Row:
    """One table row: the paths fastest first, and where that order was measured."""

    order: tuple[str, ...]
    source: str


def table(family: str) -> dict[tuple[str, str, str, str], Row]:
    """The family's table: ``(op, device kind, dtype, shape class) -> Row``."""
    module = importlib.import_module(f"mmkernels.{family}.dispatch_table")
    return {key: Row(tuple(order), source) for key, (order, source) in module.TABLE.items()}


def lookup(family: str, op: str, kind: str, dtype: str, shape_class: str) -> tuple[tuple, Row]:
    """The most specific row for the case (``"*"`` matches anything; device kinds fall back from
    ``cuda-sm90`` to ``cuda``). Returns the row's key and the row."""
    rows = table(family)
    for o in (op, WILDCARD):
        for k in _kind_fallbacks(kind):
            for c in (shape_class, WILDCARD):
                for d in (dtype, WILDCARD):
                    key = (o, k, d, c)
                    if key in rows:
                        return key, rows[key]
    raise LookupError(f"mmkernels.{family}.dispatch_table has no row for {op} (and no wildcard row)")


# ----------------------------------------------------------------------------- decisions

class Decision(NamedTuple):
    """What ran a call: ``path`` (``"kernel"``, ``"reference"`` or a PyTorch-op path),
    ``backend`` (``"cpu"``/``"triton"`` for the kernels, else ``None``) and why."""

    family: str
    op: str
    case: tuple
    path: str
    backend: str | None
    reason: str

    def __str__(self) -> str:
        kind, dtype, cls = self.case
        on = f" ({self.backend})" if self.backend and self.path == KERNEL else ""
        return f"{self.op} [{kind}, {dtype}, {cls}] -> {self.path}{on}: {self.reason}"


class Explanation(list):
    """The decisions recorded inside :func:`explain`, one line each when printed."""

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self) if self else "(no mmkernels op ran)"

    def paths(self) -> list[str]:
        """The path of each decision, in order."""
        return [d.path for d in self]


_recorders: ContextStack[Explanation] = ContextStack("mmkernels_explain")
_forced_paths: ContextStack[str] = ContextStack("mmkernels_use_path")


@contextlib.contextmanager
def explain() -> Iterator[Explanation]:
    """Record which path each mmkernels op runs inside the block, and why::

        with mmkernels.explain() as log:
            loss = mmkernels.contrastive_loss(img, txt, scale)
        print(log)   # contrastive_loss [cuda-sm90, bfloat16, ...] -> blockwise: table row ...
    """
    with _recorders.pushed(Explanation()) as rec:
        yield rec


@contextlib.contextmanager
def use_path(name: str) -> Iterator[None]:
    """Force path ``name`` for every op inside the block that has a path of that name (under
    backend ``auto``); an op that has it but cannot run the call raises :class:`PathUnavailable`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"use_path needs a path name, got {name!r}")
    with _forced_paths.pushed(name):
        yield


def _record(decision: Decision) -> Decision:
    for rec in _recorders.values():
        rec.append(decision)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s", decision)
    return decision


def kernel_backend(device: torch.device, dtype: torch.dtype) -> tuple[str | None, str | None]:
    """The kernels' backend for ``auto`` on ``device``: ``("cpu"|"triton", None)``, or
    ``(None, why)`` when no kernel can run there."""
    if device.type == "cuda":
        if not _backend.TRITON_AVAILABLE:
            return None, "triton is not installed"
        if dtype == torch.float64:
            return None, "the triton kernels take float32, bfloat16 or float16"
        return "triton", None
    if device.type == "cpu":
        if _ext.available():
            return "cpu", None
        return None, f"the C++ kernels are unavailable ({_ext.LOAD_ERROR})"
    return None, f"no kernel runs on {device.type} tensors"


def choose(family: str, op: str, x: torch.Tensor, shape_class: str,
           paths: Mapping[str, str | None]) -> Decision:
    """The path that runs this call of ``op`` whose main input is ``x``.

    ``paths``: every PyTorch-op path of the op (not ``"kernel"``), mapped to ``None`` when it
    can run this call, else to the reason it cannot. Under a forced backend the answer is the
    kernels (or the reference); under ``auto``, a path forced by :func:`use_path`, else the
    first path of the table's order that can run (the kernels when available; the reference
    when nothing else can).
    """
    from . import _validation
    forced = _backend.current()
    if torch.compiler.is_compiling():
        # torch.compile cannot trace the table (a module import, the log): under auto the choice
        # runs once while tracing and is a constant of the graph; a forced backend traces as is
        if forced != "auto":
            which = _validation.backend_for(x)
            path = REFERENCE if which == "reference" else KERNEL
            return Decision(family, op, ("traced", "", shape_class), path,
                            None if path == REFERENCE else which, f"backend {forced!r} forced")
        path, backend = _choose_constant(family, op, x.device, x.dtype, shape_class,
                                         tuple(sorted(paths.items())))
        return Decision(family, op, ("traced", "", shape_class), path, backend,
                        "chosen while torch.compile traced")
    return _choose_eager(family, op, x, shape_class, paths, forced)


@torch.compiler.assume_constant_result
def _choose_constant(family: str, op: str, device: torch.device, dtype: torch.dtype, shape_class: str,
                     paths: tuple) -> tuple[str, str | None]:
    d = _choose_eager(family, op, torch.empty(0, device=device, dtype=dtype), shape_class, dict(paths),
                      _backend.current())
    return d.path, d.backend


def _choose_eager(family: str, op: str, x: torch.Tensor, shape_class: str,
                  paths: Mapping[str, str | None], forced: str) -> Decision:
    from . import _validation
    kind, dtype = device_kind(x.device), dtype_name(x.dtype)
    case = (kind, dtype, shape_class)
    if forced != "auto":
        which = _validation.backend_for(x)
        path = REFERENCE if which == "reference" else KERNEL
        return _record(Decision(family, op, case, path, None if path == REFERENCE else which,
                                f"backend {forced!r} forced"))
    kb, kb_why = kernel_backend(x.device, x.dtype)
    can = dict(paths)
    can[KERNEL] = kb_why
    if _forced_paths and _forced_paths.top() in can:
        name = _forced_paths.top()
        if can[name] is not None and not isinstance(can[name], NotForAuto):
            raise PathUnavailable(f"mmkernels: path {name!r} of {op} cannot run this call: {can[name]}")
        return _record(Decision(family, op, case, name, kb if name == KERNEL else None,
                                "use_path forced"))
    key, row = lookup(family, op, kind, dtype, shape_class)
    skipped = []
    for name in row.order:
        if name not in can:
            raise LookupError(f"mmkernels.{family}.dispatch_table names path {name!r}, "
                              f"which {op} does not have")
        if can[name] is None:
            why = f"table row {key[1:]}: {' > '.join(row.order)} ({row.source})"
            if skipped:
                why += "; skipped " + ", ".join(skipped)
            return _record(Decision(family, op, case, name, kb if name == KERNEL else None, why))
        skipped.append(f"{name} ({can[name]})")
    return _record(Decision(family, op, case, REFERENCE, None,
                            "no path of the table can run this call: " + "; ".join(skipped)))
