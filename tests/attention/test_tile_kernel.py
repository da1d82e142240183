"""The one-launch Triton tile map equals MultimodalMask.tile_map's torch version (interpreted on CPU)."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from mmkernels.attention import MultimodalMask  # noqa: E402
from mmkernels.attention.tile_kernel import tile_map_triton  # noqa: E402
from tests.attention.test_mask import RAGGED_BUILDERS, random_mask  # noqa: E402


def torch_tile_map(m: MultimodalMask, bm: int, bn: int) -> torch.Tensor:
    return MultimodalMask.tile_map(m, bm, bn)  # CPU masks: the torch implementation


@pytest.mark.parametrize("builder", RAGGED_BUILDERS)
@pytest.mark.parametrize("bm,bn", [(16, 16), (64, 32), (32, 128)])
def test_equals_torch_tile_map_builders(builder, bm, bn):
    m = builder()
    assert torch.equal(tile_map_triton(m.metadata(), bm, bn), torch_tile_map(m, bm, bn))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 129), (129, 7), (200, 300)])
def test_equals_torch_tile_map_random(seed, sq, sk):
    g = torch.Generator().manual_seed(7 * seed + sq + 3 * sk)
    m = random_mask(g, 3, sq, sk, nm=1 + seed % 5, segments=seed % 3 != 2, positions=seed % 2 == 0,
                    runs_of=max(1, sk // 5))
    blocks = [(16, 64), (64, 16), (128, 128)] + ([(1, 1), (2, 4)] if sq * sk <= 1000 else [])
    for bm, bn in blocks:
        got = tile_map_triton(m.metadata(), bm, bn)
        assert torch.equal(got, torch_tile_map(m, bm, bn)), (bm, bn)


@pytest.mark.slow
def test_many_key_tiles_span_several_programs():
    # more key tiles than one program's chunk (TN_CHUNK): the chunked grid and its edge
    m = MultimodalMask.prefix_lm([100, 700], [1000, 900], 1000)
    assert torch.equal(tile_map_triton(m.metadata(), 64, 16), torch_tile_map(m, 64, 16))


def test_bad_blocks_and_too_many_modalities():
    m = MultimodalMask.causal(1, 8)
    with pytest.raises(ValueError, match="power of two"):
        tile_map_triton(m.metadata(), 7, 16)
    big = MultimodalMask(torch.zeros(1, 8, dtype=torch.int64), torch.ones(32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="at most 31"):
        tile_map_triton(big.metadata(), 16, 16)
