"""The ALBEF / BLIP / BLIP-2 objectives on several processes (gloo over the loopback address):
BLIP-2's ITC with and without the gathered gradient, ``ContrastiveLoss`` with positive ids and a
momentum teacher in OpenCLIP's four modes, and the ITM hard negatives against every rank's
features, each rank against single-process float64 formulas (loss, the gradients of the rank's
features and of logit_scale) or the single-process reference draws."""
from __future__ import annotations

import pytest
import torch

from mmkernels import _ext
from mmkernels.testing.numerics import assert_close

from ..helpers.multiprocess import run_ranks
from . import itc_dist_cases as ic

N, D = 5, 16


def _paths():
    paths = ["blockwise", "reference"]
    if _ext.available() and hasattr(_ext.C, "itc_rows"):
        paths.insert(0, "auto")
    return paths


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def runs(request):
    """One run of the ranks per world size: every case on every path."""
    world = request.param
    return world, run_ranks(world, ic.itc_rank, N, D, _paths())


def _check(got: dict, want: dict, what: str) -> None:
    assert_close(got["loss"], want["loss"], torch.float32, name=f"{what}: loss")
    for key in ("img", "txt", "scale"):
        assert got[key] is not None, f"{what}: no gradient reached {key}"
        assert_close(got[key], want[key], torch.float32, name=f"{what}: d {key}")


@pytest.mark.parametrize("gwg", [False, True], ids=["gather", "gather_with_grad"])
def test_blip2_itc_equals_reference(runs, gwg):
    world, results = runs
    expected = ic.blip2_expected(world, N, D, gwg)
    for path in _paths():
        for rank in range(world):
            _check(results[rank][(path, "blip2", gwg)], expected[rank], f"{path} rank {rank}")


@pytest.mark.parametrize("mode", ic.MODES, ids=lambda m: "local{}-gwg{}".format(*map(int, m)))
@pytest.mark.parametrize("variant", list(ic.VARIANTS))
def test_contrastive_loss_ids_teacher_modes(runs, variant, mode):
    world, results = runs
    expected = ic.contrastive_expected(world, N, D, variant, mode)
    for path in _paths():
        for rank in range(world):
            _check(results[rank][(path, variant, mode)], expected[rank], f"{path} {variant} rank {rank}")


def test_ring_refuses_positive_ids(runs):
    world, results = runs
    for path in _paths():
        for rank in range(world):
            message = results[rank][(path, "ring")]
            assert message is not None, f"{path} rank {rank}: ring=True with positive_ids did not raise"
            assert "ring" in message


def test_itm_hard_negatives_are_negatives_in_range(runs):
    world, results = runs
    ids = ic.global_inputs(world, N, D)["ids"]
    for path in _paths():
        for rank in range(world):
            own = torch.arange(rank * N, rank * N + N)
            for key in ("itm", "seeded"):
                for neg in results[rank][(path, key)]:
                    assert neg.dtype == torch.int64 and neg.shape == (N,)
                    assert bool(((neg >= 0) & (neg < world * N)).all()), (path, key, rank, neg)
                    assert not bool((neg == own).any()), (path, key, rank, neg)
            for neg in results[rank][(path, "itm ids")]:
                assert bool(((neg >= 0) & (neg < world * N)).all()), (path, rank, neg)
                assert not bool((ids[neg] == ids[own]).any()), (path, rank, neg)


def test_itm_hard_negatives_equal_reference_draws(runs):
    world, results = runs
    for rank in range(world):
        seed = torch.tensor(ic.NEG_SEED + 7 * rank)
        want = {"seeded": ic.negatives_expected(world, N, D, rank, (seed, seed)),
                "itm": ic.negatives_expected(world, N, D, rank, ic.generator_seeds(rank)),
                "itm ids": ic.negatives_expected(world, N, D, rank, ic.generator_seeds(rank),
                                                 by_ids=True)}
        for path in _paths():
            for key, (text, image) in want.items():
                got_text, got_image = results[rank][(path, key)]
                assert torch.equal(got_text, text), (path, key, rank, got_text, text)
                assert torch.equal(got_image, image), (path, key, rank, got_image, image)
