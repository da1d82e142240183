"""Case catalogue: one module per op family.

A family module exposes

* ``cases(device, profile, overrides=None) -> list[bench.harness.Case]`` where
  ``profile`` is ``"full"``, ``"quick"`` or ``"pytest"`` (small CPU sizes for
  ``pytest bench/``) and ``overrides`` maps a shape key (``"N"``, ``"D"``, ...)
  to the list of values to use instead of the profile's;
* ``notes(device, profile) -> list[str]``: lines the report prints for it.

Add a family by writing its module and naming it in ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Optional

FAMILIES = {
    "contrastive": "bench.cases.contrastive",
    "mm": "bench.cases.mm",
    "attention": "bench.cases.attention",  # a time-limited full run records the others first
    "experts": "bench.cases.experts",  # after attention: added later, so the older families' runs are unchanged
    "cross_attention": "bench.cases.cross_attention",
    "siglip": "bench.cases.siglip",
    "contrastive_dist": "bench.cases.contrastive_dist",
    "itc": "bench.cases.itc",
    "models": "bench.cases.models",  # one training step of each reference model of mmkernels.models
}
PROFILES = ("full", "quick", "pytest")


def load(family: str):
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


#: the paths of the dispatch tables each bench op can be forced onto, beside ``kernel``:
#: ``mmkernels:<path>`` providers time them (``mmkernels`` itself is ``auto``)
FORCED_PATHS = {
    "contrastive_loss": ("blockwise", "materialized"),
    "infonce_loss": ("blockwise", "materialized"),
    "attention_fwd": ("sdpa", "varlen", "flex"),
    "attention_fwd_bwd": ("sdpa", "varlen", "flex"),
    "cross_attention": ("sdpa",),
    "qformer": (),  # its self-attention masks are multimodal: only the kernels are forced
    "modality_ffn": ("grouped_mm", "batched"),
    "modality_linear": ("grouped_mm", "batched"),
    "modality_ffn_frozen": ("grouped_mm", "batched"),
}


def forced_call(fn, path: str, **inputs):
    """``fn(**inputs)`` with mmkernels' path ``path`` forced. An op that has the path but cannot
    run the call raises ``PathUnavailable`` (the harness records a skip); a call in which no op
    has the path raises ``LookupError`` (an error: ``FORCED_PATHS`` is wrong)."""
    import mmkernels

    with mmkernels.use_path(path), mmkernels.explain() as log:
        out = fn(**inputs)
    if path not in log.paths():
        raise LookupError(f"no mmkernels op of this case has a path {path!r} (ran: {log.paths()})")
    return out


def with_forced_paths(case):
    """``case`` with ``mmkernels:kernel`` and ``mmkernels:<path>`` providers after ``mmkernels``
    (the same function under ``mmkernels.use_path``), for the ops of ``FORCED_PATHS``."""
    from bench.harness import BASELINE, Provider

    names = [p.name for p in case.providers]
    if case.op not in FORCED_PATHS or BASELINE not in names:
        return case
    i = names.index(BASELINE)
    base = case.providers[i]
    forced = tuple(
        Provider(f"{BASELINE}:{path}", functools.partial(forced_call, base.fn, path), base.check,
                 base.mem_estimate, note=f"mmkernels with the {path} path forced")
        for path in ("kernel", *FORCED_PATHS[case.op]))
    return dataclasses.replace(case, providers=case.providers[:i + 1] + forced + case.providers[i + 1:])


def collect(families, device: str, profile: str, overrides: Optional[dict] = None) -> list:
    """Every case of ``families`` for ``device`` and ``profile``, duplicates dropped, with the
    forced-path providers of ``with_forced_paths``."""
    seen, out = set(), []
    for fam in families:
        for case in load(fam).cases(device=device, profile=profile, overrides=overrides):
            if case.id not in seen:
                seen.add(case.id)
                out.append(with_forced_paths(case))
    return out


def notes(families, device: str, profile: str) -> list:
    lines = []
    for fam in families:
        fn = getattr(load(fam), "notes", None)
        if fn is not None:
            lines.extend(fn(device, profile))
    return lines


def pytest_plan() -> list:
    """The (case, provider) pairs the pytest entry points run (``pytest bench/`` times them,
    tests/bench/test_agreement.py checks them): every family's cases for ``BENCH_DEVICE``
    (default ``cpu``) at ``BENCH_PROFILE`` (default ``pytest``: small CPU sizes); none when
    ``BENCH_DEVICE`` names a GPU that is not there."""
    import torch

    from bench import harness

    device = os.environ.get("BENCH_DEVICE", "cpu")
    profile = os.environ.get("BENCH_PROFILE", "pytest")
    if device != "cpu" and not torch.cuda.is_available():
        return []
    return harness.plan(collect(list(FAMILIES), device, profile))


def pair_id(pair) -> str:
    """The pytest id of a (case, provider) pair: ``case-provider`` (pytest-benchmark compares runs
    by these names, so they stay stable)."""
    case, provider = pair
    return f"{case.id}-{provider.name}"
