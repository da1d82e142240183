"""Per-rank peak memory of the distributed CLIP loss: the ring holds a fixed number of blocks
whatever the world size; the gathered mode grows with it (which shows the probe would see a ring
that gathered).

From 3 ranks on, every buffer of the ring is in use (a block being computed while the next one
arrives, forward and backward); 2 ranks receive a single block and never fill the backward's
second block buffer nor all of its gradient sums, so their peak is lower, by at most three
``[2n, D]`` blocks, never higher.
"""
from __future__ import annotations

import pytest

from ..helpers.multiprocess import run_ranks
from . import dist_cases as dc

N, D = 128, 16384  # one rank's [N, D] float32 features: 8 MiB
LOCAL = N * D * 4
MiB = 2 ** 20


@pytest.mark.slow
def test_ring_peak_memory_does_not_grow_with_world_size(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    peaks = {}
    for world in (2, 3, 4):
        per_rank = run_ranks(world, dc.peak_extra, N, D)
        peaks[world] = {k: max(r[k] for r in per_rank) for k in ("ring", "gather")}
    report = {w: {k: round(v / MiB, 1) for k, v in p.items()} for w, p in peaks.items()}
    # the gathered features of 2 more ranks (images and texts) and their gradients: seen
    assert peaks[4]["gather"] - peaks[2]["gather"] >= 4 * LOCAL, report
    # the ring: equal within noise (a small fraction of one local feature tensor) ...
    assert abs(peaks[4]["ring"] - peaks[3]["ring"]) <= LOCAL // 4, report
    # ... and at 2 ranks at most three [2n, D] blocks lower
    assert -6 * LOCAL <= peaks[2]["ring"] - peaks[4]["ring"] <= LOCAL // 4, report
    assert peaks[4]["ring"] < peaks[4]["gather"], report
