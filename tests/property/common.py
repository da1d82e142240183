"""The tiers and backends every property test is parametrised by, and the call that runs it."""
from __future__ import annotations

import pytest

from mmkernels.testing import property as prop

#: the quick parametrisation first (tests/conftest.py marks each backend's first case quick)
TIERS = [pytest.param("quick", id="quick"), pytest.param("ci", id="ci", marks=pytest.mark.slow)]

#: backends whose numerics are checked against the reference: the forced kernels and ``auto``
#: (the paths built from PyTorch's own ops); ``reference`` in the case's dtype is the eager
#: computation itself, so the 2x-eager rule could not fail on it
BACKENDS = ["cpu", "triton", "auto"]

#: backends of the properties that hold exactly (the samplers): every one, ``reference`` included
ALL_BACKENDS = ["reference", "cpu", "triton", "auto"]


def run(request, tier: str, check) -> int:
    """Draw and check cases of ``check(draw)`` for the running test; returns how many ran."""
    checked = prop.run_property(request.node.nodeid, tier, check)
    request.node.user_properties.append(("property_cases", checked))
    return checked


def magnitude(draw, name: str, dtype, lo: float = 1e-3, hi: float = 1e4) -> float:
    """A log-uniform magnitude in ``[lo, hi]``, ``hi`` lowered to what ``dtype`` holds with room
    (:func:`mmkernels.testing.property.safe_magnitude`)."""
    return draw.log_uniform(name, lo, min(hi, prop.safe_magnitude(dtype)))


def layouts(draw, names, ndim_of: dict) -> dict:
    """A drawn memory layout for each name (0-dim and 1-dim tensors stay contiguous)."""
    return {n: draw.layout(f"layout_{n}") for n in names if ndim_of.get(n, 2) >= 2}
