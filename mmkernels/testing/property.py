"""Randomized property tests: the seed, the time budget and the drawing helper.

Every test of ``tests/property/`` draws cases (shapes, options, dtypes, magnitudes, masks,
layouts) from one seed per test run and checks each drawn case. The seed is fresh on every run
(``os.urandom``) unless ``MMKERNELS_PROPERTY_SEED`` sets it; case ``i`` of a test depends only on
``(seed, the test's node id, i)``, so a failure replays exactly with::

    MMKERNELS_PROPERTY_SEED=<seed> MMKERNELS_PROPERTY_CASE=<i> python -m pytest "<node id>"

Each test draws cases until its tier's time budget (seconds, :data:`TIER_BUDGETS`) is spent,
at least one case; ``MMKERNELS_PROPERTY_BUDGET`` (seconds per test) overrides every tier's
budget. These three variables are read by the test tier only, never by the library.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

SEED_VARIABLE = "MMKERNELS_PROPERTY_SEED"
CASE_VARIABLE = "MMKERNELS_PROPERTY_CASE"
BUDGET_VARIABLE = "MMKERNELS_PROPERTY_BUDGET"

#: tier -> seconds of drawing per test (per op group and backend)
TIER_BUDGETS = {"quick": 0.75, "ci": 5.0}

#: fp16's largest value is 65504: magnitudes are drawn so that a computation's intermediates
#: (logits, scores, activations) stay below this, with room for sums of a few of them
_FP16_SAFE = 2.0 ** 13

_seed: int | None = None


def run_seed() -> int:
    """The seed of this test run: ``MMKERNELS_PROPERTY_SEED`` or, once per process, a fresh one."""
    global _seed
    if _seed is None:
        text = os.environ.get(SEED_VARIABLE, "").strip()
        _seed = int(text) if text else int.from_bytes(os.urandom(6), "little")
    return _seed


def seed_in_use() -> int | None:
    """The run's seed if a property test has drawn from it in this process, else None."""
    return _seed


def replay_case() -> int | None:
    """``MMKERNELS_PROPERTY_CASE``: run only this case index (with the run's seed), or None."""
    text = os.environ.get(CASE_VARIABLE, "").strip()
    return int(text) if text else None


def budget(tier: str) -> float:
    """Seconds a test of ``tier`` draws cases for (``MMKERNELS_PROPERTY_BUDGET`` overrides)."""
    text = os.environ.get(BUDGET_VARIABLE, "").strip()
    return float(text) if text else TIER_BUDGETS[tier]


def replay_command(node_id: str, index: int) -> str:
    """The shell command that runs case ``index`` of ``node_id`` again."""
    return f'{SEED_VARIABLE}={run_seed()} {CASE_VARIABLE}={index} python -m pytest "{node_id}"'


class Rejected(Exception):
    """A drawn case the dtype cannot represent (its float64 outputs overflow): not counted."""


@dataclass
class Draw:
    """The random choices of one case, deterministic in ``(seed, test_id, index)``.

    Every ``draw.<kind>(name, ...)`` records its value under ``name`` in :attr:`drawn`, which
    failure messages print. ``generator`` (a CPU ``torch.Generator``) makes the tensors.
    """

    seed: int
    test_id: str
    index: int
    drawn: dict = field(default_factory=dict)

    def __post_init__(self):
        self.rng = random.Random(f"{self.seed}:{self.test_id}:{self.index}")
        self.generator = torch.Generator().manual_seed(self.rng.getrandbits(62))

    def _keep(self, name: str, value):
        self.drawn[name] = value
        return value

    def note(self, name: str, value):
        """Record a value derived from the draws (for the failure message); returns it."""
        return self._keep(name, value)

    def choice(self, name: str, options: Sequence):
        return self._keep(name, self.rng.choice(list(options)))

    def flag(self, name: str, p: float = 0.5) -> bool:
        return self._keep(name, self.rng.random() < p)

    def uniform(self, name: str, lo: float, hi: float) -> float:
        return self._keep(name, self.rng.uniform(lo, hi))

    def integer(self, name: str, lo: int, hi: int) -> int:
        """An integer in ``[lo, hi]``, uniform."""
        return self._keep(name, self.rng.randint(lo, hi))

    def size(self, name: str, hi: int, lo: int = 1, tiles: Sequence[int] = (16, 32, 64)) -> int:
        """A size in ``[lo, hi]`` that favours the awkward ones: ``lo``, 1, odd sizes and tile
        boundaries (a multiple of a tile, one less, one more), else uniform."""
        special = [lo, lo + 1, hi] + [t + d for t in tiles for d in (-1, 0, 1)]
        special = [s for s in special if lo <= s <= hi]
        if self.rng.random() < 0.4 and special:
            value = self.rng.choice(special)
        else:
            value = self.rng.randint(lo, hi)
            if self.rng.random() < 0.5 and value % 2 == 0 and value + 1 <= hi:
                value += 1
        return self._keep(name, value)

    def log_uniform(self, name: str, lo: float, hi: float) -> float:
        """A magnitude drawn log-uniformly in ``[lo, hi]``."""
        return self._keep(name, math.exp(self.rng.uniform(math.log(lo), math.log(hi))))

    def dtype(self, name: str = "dtype", options: Sequence[torch.dtype] = (torch.float32, torch.bfloat16,
                                                                            torch.float16)) -> torch.dtype:
        return self._keep(name, self.rng.choice(list(options)))

    def randn(self, *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Normal values times ``scale``, rounded to ``dtype`` and returned in float64 (so the
        float64 reference sees exactly the values the dtype holds)."""
        x = torch.randn(*shape, generator=self.generator, dtype=torch.float64) * scale
        return x.to(dtype).to(torch.float64)

    def randint(self, lo: int, hi: int, shape) -> torch.Tensor:
        """int64 values in ``[lo, hi)``."""
        return torch.randint(lo, hi, tuple(shape), generator=self.generator)

    def layout(self, name: str, options=("contiguous", "padded", "swapped")) -> str:
        """How a tensor is laid out in memory, see :func:`laid_out`."""
        return self._keep(name, self.rng.choice(list(options)))


def safe_magnitude(dtype: torch.dtype) -> float:
    """The largest intermediate magnitude a case of ``dtype`` is drawn to reach: fp16 is kept
    below its maximum; bf16 and fp32 share fp32's exponent range and are bounded by the caller's
    own range of interest."""
    return _FP16_SAFE if dtype == torch.float16 else math.inf


def laid_out(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A leaf holding ``x``'s values (``requires_grad``) in ``layout`` and the view of it to pass.

    ``contiguous``: ``x`` itself. ``padded``: the last dimension is a slice of a buffer twice as
    wide (row stride > width). ``swapped``: the two leading non-batch dimensions are stored
    swapped (2-D: column-major; 3-D and more: dims 1 and 2 exchanged, as ``[B, S, H, D]``
    storage seen as ``[B, H, S, D]``). Returns ``(leaf, view)``: call ``view(leaf)`` to get the
    tensor to pass (differentiably), and ``view(leaf.grad)`` for the gradient of that tensor.
    """
    x = x.detach()
    if layout == "contiguous" or x.dim() == 0:
        return x.clone().requires_grad_(True), lambda t: t
    if layout == "padded":
        width = x.shape[-1]
        buf = torch.cat([x, torch.full_like(x, float("nan"))], dim=-1)
        return buf.requires_grad_(True), lambda t: t[..., :width]
    if layout == "swapped":
        a, b = (0, 1) if x.dim() <= 2 else (1, 2)
        if x.dim() == 1:
            return x.clone().requires_grad_(True), lambda t: t
        base = x.transpose(a, b).contiguous()
        return base.requires_grad_(True), lambda t: t.transpose(a, b)
    raise ValueError(f"unknown layout {layout!r}")


def cases(test_id: str, tier: str) -> Iterator[Draw]:
    """The draws of one test: case 0, 1, ... until the tier's budget is spent (at least one), or
    only the case ``MMKERNELS_PROPERTY_CASE`` names."""
    seed = run_seed()
    only = replay_case()
    if only is not None:
        yield Draw(seed, test_id, only)
        return
    deadline = time.monotonic() + budget(tier)
    index = 0
    while index == 0 or time.monotonic() < deadline:
        yield Draw(seed, test_id, index)
        index += 1


def run_property(test_id: str, tier: str, check: Callable[[Draw], None], *, max_rejected: int = 50) -> int:
    """Run ``check(draw)`` on the draws of ``test_id``; returns the number of cases checked.

    A ``check`` that raises :class:`Rejected` drew a case outside the dtype's range; it is
    redrawn (at most ``max_rejected`` times in a row). Any other exception fails the test with
    the seed, the case index, the drawn values and the command that replays the case.
    """
    checked = rejected = 0
    for draw in cases(test_id, tier):
        try:
            check(draw)
        except Rejected:
            rejected += 1
            if rejected > max_rejected:
                raise AssertionError(f"{test_id}: {rejected} draws in a row were rejected (seed {draw.seed}); "
                                     f"the generator's magnitudes do not fit the dtype")
            continue
        except Exception as exc:
            drawn = ", ".join(f"{k}={_show(v)}" for k, v in draw.drawn.items())
            raise AssertionError(f"property case failed: seed {draw.seed}, case {draw.index}\n"
                                 f"  drawn: {drawn}\n  {type(exc).__name__}: {exc}\n"
                                 f"  replay: {replay_command(test_id, draw.index)}") from exc
        rejected = 0
        checked += 1
    if checked == 0:
        raise AssertionError(f"{test_id}: no case was checked (seed {run_seed()})")
    return checked


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return repr(value)
