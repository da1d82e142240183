"""The contrastive losses on several processes (gloo over the loopback address): every OpenCLIP
ClipLoss mode, the ring and every SigLipLoss dist_impl against single-process float64 formulas,
per rank (loss, the gradients of the rank's features, of logit_scale and logit_bias), and against
OpenCLIP's own classes run on the same ranks where open_clip is installed."""
from __future__ import annotations

import pytest
import torch

from mmkernels import _backend, _ext
from mmkernels.testing.numerics import assert_close
from mmkernels.testing.peers import open_clip_loss

from ..helpers.multiprocess import run_ranks
from . import dist_cases as dc

N, D = 6, 16
HAVE_PEER = open_clip_loss() is not None


def _paths(world):
    paths = ["blockwise"]
    if _ext.available():
        paths.insert(0, "auto")
    if world == 2 and _backend.TRITON_AVAILABLE and _backend.TRITON_INTERPRET:
        paths.append("triton")
    return paths


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def runs(request):
    """One run of the ranks per world size: every CLIP mode and SigLIP dist_impl on every path."""
    world = request.param
    siglip_paths = [p for p in _paths(world) if p != "triton" or _triton_siglip()]
    ranks = run_ranks(world, dc.both_rank, N, D, _paths(world), siglip_paths, HAVE_PEER)
    return world, siglip_paths, ranks


@pytest.fixture
def clip_run(runs):
    world, _, ranks = runs
    return world, [r["clip"] for r in ranks]


@pytest.fixture
def siglip_run(runs):
    world, paths, ranks = runs
    return world, paths, [r["siglip"] for r in ranks]


def _triton_siglip() -> bool:
    try:
        from mmkernels.contrastive.siglip import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _check(got: dict, want: dict, what: str) -> None:
    assert_close(got["loss"], want["loss"], torch.float32, name=f"{what}: loss")
    for key in ("img", "txt", "scale", "bias"):
        g, w = got[key], want[key]
        if g is None:
            g = torch.zeros_like(w)
        assert_close(g, w, torch.float32, name=f"{what}: d {key}")


@pytest.mark.parametrize("mode", dc.CLIP_MODES, ids=lambda m: "local{}-gwg{}-ring{}".format(*map(int, m)))
def test_clip_modes_equal_open_clip_formulas(clip_run, mode):
    world, results = clip_run
    expected = dc.clip_expected(world, N, D, mode)
    for path in _paths(world):
        for rank in range(world):
            _check(results[rank][(path, mode)], expected[rank], f"{path} rank {rank}")


@pytest.mark.parametrize("mode", dc.CLIP_MODES[:4], ids=lambda m: "local{}-gwg{}".format(*map(int, m)))
def test_clip_modes_equal_open_clip_itself(clip_run, mode):
    if not HAVE_PEER:
        pytest.skip("open_clip is not installed")
    world, results = clip_run
    for rank in range(world):
        theirs = {k: (v.double() if v is not None else None) for k, v in results[rank][("open_clip", mode)].items()}
        _check(results[rank][(_paths(world)[0], mode)], theirs, f"rank {rank} vs open_clip")


def test_ring_equals_gather(clip_run):
    world, results = clip_run
    for path in _paths(world):
        for rank in range(world):
            ring = results[rank][(path, (True, True, True))]
            gather = {k: v.double() for k, v in results[rank][(path, (True, True, False))].items()}
            _check(ring, gather, f"{path} rank {rank}: ring vs gather")


def test_accuracy_is_the_global_batch(clip_run):
    world, results = clip_run
    i2t, t2i = dc.clip_expected_accuracy(world, N, D)
    for path in _paths(world):
        for mode in dc.CLIP_MODES:
            for rank in range(world):
                a, b = results[rank][(path, mode, "stats")]
                assert float(a) == pytest.approx(i2t) and float(b) == pytest.approx(t2i), (path, mode, rank)


@pytest.mark.parametrize("impl", dc.DIST_IMPLS)
def test_siglip_dist_impls_equal_open_clip_formulas(siglip_run, impl):
    world, paths, results = siglip_run
    expected = dc.siglip_expected(world, N, D)
    for path in paths:
        for rank in range(world):
            _check(results[rank][(path, impl)], expected[rank], f"{path} {impl} rank {rank}")
    if HAVE_PEER:
        for rank in range(world):
            theirs = {k: v.double() for k, v in results[rank][("open_clip", impl)].items()}
            _check(results[rank][(paths[0], impl)], theirs, f"{impl} rank {rank} vs open_clip")
