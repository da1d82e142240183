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

import importlib
import os
from typing import Optional

FAMILIES = {
    "contrastive": "bench.cases.contrastive",
    "mm": "bench.cases.mm",
    "attention": "bench.cases.attention",  # a time-limited full run records the others first
    "experts": "bench.cases.experts",  # after attention: added later, so the older families' runs are unchanged
    "cross_attention": "bench.cases.cross_attention",
}
PROFILES = ("full", "quick", "pytest")


def load(family: str):
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def collect(families, device: str, profile: str, overrides: Optional[dict] = None) -> list:
    """Every case of ``families`` for ``device`` and ``profile``, duplicates dropped."""
    seen, out = set(), []
    for fam in families:
        for case in load(fam).cases(device=device, profile=profile, overrides=overrides):
            if case.id not in seen:
                seen.add(case.id)
                out.append(case)
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
