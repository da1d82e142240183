"""MultimodalMask: builders against hand-written masks, to_dense against a brute-force loop,
tile_map never wrong against to_dense, and bad input with clear errors."""
from __future__ import annotations

import pytest
import torch

from mmkernels.attention import (BLOCKED, CAUSAL, FULL, SPAN, TILE_EMPTY, TILE_FULL, TILE_PARTIAL,
                                 MultimodalMask)


def dense(m: MultimodalMask) -> torch.Tensor:
    d = m.to_dense()
    b, sq, sk = m.shape
    assert d.shape == (b, 1, sq, sk) and d.dtype == torch.bool
    return d[:, 0]


def rows(*lines: str) -> torch.Tensor:
    """A hand-written mask: one string of 0/1 per query row."""
    return torch.tensor([[c == "1" for c in line.replace(" ", "")] for line in lines])


# ----------------------------------------------------------------------------- builders, by hand

def test_causal():
    m = MultimodalMask.causal(2, 4)
    assert m.shape == (2, 4, 4)
    want = rows("1000", "1100", "1110", "1111")
    assert torch.equal(dense(m), want.expand(2, 4, 4))


def test_key_padding():
    m = MultimodalMask.key_padding(torch.tensor([3, 1]), 4)
    assert torch.equal(dense(m)[0], rows("1110", "1110", "1110", "0000"))
    assert torch.equal(dense(m)[1], rows("1000", "0000", "0000", "0000"))
    # list input, and a zero length: nothing is visible
    assert not dense(MultimodalMask.key_padding([0], 3)).any()


def test_prefix_lm():
    m = MultimodalMask.prefix_lm(torch.tensor([2, 0]), torch.tensor([4, 3]), 5)
    assert torch.equal(dense(m)[0], rows("11000",
                                         "11000",
                                         "11100",
                                         "11110",
                                         "00000"))
    assert torch.equal(dense(m)[1], rows("10000",   # no prefix: plain causal over 3 tokens
                                         "11000",
                                         "11100",
                                         "00000",
                                         "00000"))


def test_blip2_itg_lavis_layout():
    # LAVIS Blip2Qformer ITG: queries see only queries; text sees all queries and causal text.
    # 2 queries, 3 text slots, sample 0 has 3 text tokens, sample 1 has 2.
    m = MultimodalMask.blip2(2, torch.tensor([3, 2]), 3, objective="itg")
    assert torch.equal(dense(m)[0], rows("11 000",
                                         "11 000",
                                         "11 100",
                                         "11 110",
                                         "11 111"))
    assert torch.equal(dense(m)[1], rows("11 000",
                                         "11 000",
                                         "11 100",
                                         "11 110",
                                         "00 000"))   # padding text attends nowhere
    assert m.q_mod.tolist()[0] == [0, 0, 1, 1, 1]


def test_blip2_itc_itm():
    itc = MultimodalMask.blip2(2, [2], 3, objective="itc")
    assert torch.equal(dense(itc)[0], rows("11 000",
                                           "11 000",
                                           "00 110",
                                           "00 110",
                                           "00 000"))
    itm = MultimodalMask.blip2(2, [2], 3, objective="itm")
    assert torch.equal(dense(itm)[0], rows("11 110",
                                           "11 110",
                                           "11 110",
                                           "11 110",
                                           "00 000"))


def test_instructblip():
    m = MultimodalMask.instructblip(3, torch.tensor([1, 2]), 2)
    assert torch.equal(dense(m)[0], rows("111 10", "111 10", "111 10", "111 10", "000 00"))
    assert torch.equal(dense(m)[1], rows("111 11", "111 11", "111 11", "111 11", "111 11"))


def test_beit3_captioning():
    m = MultimodalMask.beit3_captioning(2, [2], 3)
    assert torch.equal(dense(m)[0], rows("11 000",
                                         "11 000",
                                         "11 100",
                                         "11 110",
                                         "00 000"))


def test_packed_causal_and_bidirectional():
    cu = torch.tensor([0, 2, 5])
    m = MultimodalMask.packed(cu)
    assert m.shape == (1, 5, 5)
    assert torch.equal(dense(m)[0], rows("10 000",
                                         "11 000",
                                         "00 100",
                                         "00 110",
                                         "00 111"))
    m = MultimodalMask.packed(cu, causal=False, seq_len=6)   # one padding token at the end
    assert torch.equal(dense(m)[0], rows("110000",
                                         "110000",
                                         "001110",
                                         "001110",
                                         "001110",
                                         "000000"))


def test_image_spans_in_causal():
    # text, image, image, text, image, image, image, text
    ids = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]])
    m = MultimodalMask.image_spans_in_causal(ids)
    assert torch.equal(dense(m)[0], rows("10000000",
                                         "11100000",
                                         "11100000",
                                         "11110000",
                                         "11111110",
                                         "11111110",
                                         "11111110",
                                         "11111111"))
    # another image id, and a custom modality numbering
    m2 = MultimodalMask.image_spans_in_causal(ids * 5 + 2, image_modality=7)
    assert torch.equal(dense(m2), dense(m))


def test_sq_ne_sk_itg_with_cached_query_keys():
    # BLIP-2 ITG decoding text queries over [query keys ; text keys]: queries are the last Sq keys.
    k_mod = torch.tensor([[0, 0, 1, 1, 1]])
    m = MultimodalMask(torch.tensor([[1, 1, 1]]), [[FULL, BLOCKED], [FULL, CAUSAL]], key_modality_ids=k_mod)
    assert m.shape == (1, 3, 5)
    assert m.q_pos.tolist() == [[2, 3, 4]]
    assert torch.equal(dense(m)[0], rows("11 100", "11 110", "11 111"))
    full = MultimodalMask.blip2(2, [3], 3, objective="itg")
    assert torch.equal(dense(m)[0], dense(full)[0, 2:])


def test_to_device_and_repr():
    m = MultimodalMask.blip2(4, [3, 5], 6, objective="itg")
    m2 = m.to("cpu")
    assert m2.shape == m.shape and torch.equal(m2.to_dense(), m.to_dense())
    assert m2.q_mod.dtype == torch.int32 and m2.rules.dtype == torch.int8
    mm = m.to("meta")
    assert mm.device.type == "meta" and mm.shape == m.shape
    assert "B=2" in repr(m)


# ----------------------------------------------------------------------------- brute force

def brute_force(q_mod, k_mod, q_seg, k_seg, q_pos, k_pos, q_run, k_run, rules):
    b, sq = q_mod.shape
    sk = k_mod.shape[1]
    out = torch.zeros(b, sq, sk, dtype=torch.bool)
    for bb in range(b):
        for i in range(sq):
            for j in range(sk):
                qs, ks = int(q_seg[bb, i]), int(k_seg[bb, j])
                if qs < 0 or qs != ks:
                    continue
                r = int(rules[int(q_mod[bb, i]), int(k_mod[bb, j])])
                causal = int(k_pos[bb, j]) <= int(q_pos[bb, i])
                same_run = int(q_run[bb, i]) == int(k_run[bb, j])
                out[bb, i, j] = (r == FULL or (r == CAUSAL and causal) or (r == SPAN and (causal or same_run)))
    return out


def python_runs(mod):
    """Run ids by a plain loop: a new run where the modality changes."""
    out = []
    for mrow in mod.tolist():
        r, row = 0, []
        for t in range(len(mrow)):
            if t and mrow[t] != mrow[t - 1]:
                r += 1
            row.append(r)
        out.append(row)
    return torch.tensor(out, dtype=torch.int32)


def random_mask(g, b, sq, sk, nm, *, segments=True, positions=False, runs_of=3):
    """Random modality runs, rule table, sorted segments with padding, optionally random positions."""
    def runs(s):
        # modality ids in runs of random length, so SPAN has something to do
        lens = torch.randint(1, runs_of + 1, (s,), generator=g)
        vals = torch.randint(0, nm, (s,), generator=g)
        return vals.repeat_interleave(lens)[:s]
    k_mod = torch.stack([runs(sk) for _ in range(b)])
    rules = torch.randint(0, 4, (nm, nm), generator=g)
    kw = {}
    if segments:
        k_seg = torch.sort(torch.randint(0, 3, (b, sk), generator=g), dim=1).values
        pad = torch.rand(b, sk, generator=g) < 0.15
        k_seg = torch.where(pad, -1, k_seg)
        kw["key_segment_ids"] = k_seg
    if positions:
        kw["key_positions"] = torch.randint(-5, sk + 5, (b, sk), generator=g)
    if sq == sk:
        q_mod = k_mod
    else:
        q_mod = k_mod[:, sk - sq:] if sq < sk else torch.randint(0, nm, (b, sq), generator=g)
        if sq > sk:
            if segments:
                kw["segment_ids"] = torch.randint(-1, 3, (b, sq), generator=g)
            if positions:
                kw["positions"] = torch.randint(-5, sq + 5, (b, sq), generator=g)
    return MultimodalMask(q_mod, rules, key_modality_ids=k_mod, **kw)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sq,sk", [(9, 9), (5, 11), (11, 5), (1, 7)])
def test_to_dense_matches_brute_force(seed, sq, sk):
    g = torch.Generator().manual_seed(seed)
    m = random_mask(g, 2, sq, sk, nm=1 + seed % 4, segments=seed % 3 != 2, positions=seed % 2 == 1)
    assert torch.equal(m.k_run, python_runs(m.k_mod))
    if sq <= sk:
        assert torch.equal(m.q_run, m.k_run[:, sk - sq:])
        assert torch.equal(m.q_seg, m.k_seg[:, sk - sq:])
    want = brute_force(m.q_mod, m.k_mod, m.q_seg, m.k_seg, m.q_pos, m.k_pos, m.q_run, m.k_run, m.rules)
    assert torch.equal(dense(m), want)


def test_default_positions_queries_are_last_keys():
    m = MultimodalMask(torch.zeros(1, 3, dtype=torch.long), [[CAUSAL]],
                       key_modality_ids=torch.zeros(1, 5, dtype=torch.long))
    assert m.k_pos.tolist() == [[0, 1, 2, 3, 4]] and m.q_pos.tolist() == [[2, 3, 4]]
    assert m.q_pos.dtype == torch.int32


def test_segments_isolate_and_padding_is_never_seen():
    seg = torch.tensor([[0, 0, -1, 1, 1, -1]])
    m = MultimodalMask(torch.zeros(1, 6, dtype=torch.int64), [[FULL]], segment_ids=seg)
    d = dense(m)[0]
    assert not d[:, 2].any() and not d[:, 5].any() and not d[2].any() and not d[5].any()
    assert torch.equal(d[:2, :2], torch.ones(2, 2, dtype=torch.bool)) and not d[:2, 3:].any()


# ----------------------------------------------------------------------------- tile_map

def check_tile_map(m: MultimodalMask, bm: int, bn: int) -> torch.Tensor:
    """Assert that no tile is misclassified; return the map."""
    tiles = m.tile_map(bm, bn)
    b, sq, sk = m.shape
    tm, tn = -(-sq // bm), -(-sk // bn)
    assert tiles.shape == (b, tm, tn) and tiles.dtype == torch.int8
    assert ((tiles >= 0) & (tiles <= 2)).all()
    any_vis, all_vis = tile_visibility(m, bm, bn)
    assert not (any_vis & (tiles == TILE_EMPTY)).any(), "a tile marked empty has a visible element"
    assert (all_vis | (tiles != TILE_FULL)).all(), "a tile marked full has a masked element"
    return tiles


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (97, 97), (129, 129), (7, 129), (97, 33), (129, 7)])
def test_tile_map_never_wrong_random(seed, sq, sk):
    g = torch.Generator().manual_seed(100 * seed + sq + sk)
    m = random_mask(g, 2, sq, sk, nm=1 + seed % 4, segments=seed != 3, positions=seed == 2,
                    runs_of=max(1, sk // 6))
    # block size 1 is exact: every element is its own tile
    assert torch.equal(m.tile_map(1, 1), dense(m).to(torch.int8) * TILE_FULL)
    seen = set()
    for bm, bn in [(1, 1), (16, 16), (64, 64), (16, 64), (64, 16), (1, 16), (7, 5), (128, 128)]:
        seen.update(check_tile_map(m, bm, bn).unique().tolist())
    assert seen  # at least something was classified


# every builder, ragged lengths (also the Triton tile-map kernel's cases)
RAGGED_BUILDERS = [
    lambda: MultimodalMask.causal(2, 97),
    lambda: MultimodalMask.key_padding([97, 40, 1], 97),
    lambda: MultimodalMask.prefix_lm([10, 64], [97, 70], 97),
    lambda: MultimodalMask.blip2(32, [20, 65], 65, objective="itc"),
    lambda: MultimodalMask.blip2(32, [20, 65], 65, objective="itm"),
    lambda: MultimodalMask.blip2(32, [20, 65], 65, objective="itg"),
    lambda: MultimodalMask.instructblip(32, [5, 64], 64),
    lambda: MultimodalMask.beit3_captioning(50, [3, 79], 79),
    lambda: MultimodalMask.packed(torch.tensor([0, 17, 60, 129])),
    lambda: MultimodalMask.packed(torch.tensor([0, 50, 100]), causal=False, seq_len=129),
    lambda: MultimodalMask.image_spans_in_causal(
        torch.tensor([[0] * 5 + [1] * 40 + [0] * 20 + [1] * 30 + [0] * 34])),
]


@pytest.mark.parametrize("builder", RAGGED_BUILDERS)
@pytest.mark.parametrize("bm,bn", [(1, 1), (16, 16), (64, 64), (16, 32), (7, 13)])
def test_tile_map_never_wrong_builders(builder, bm, bn):
    check_tile_map(builder(), bm, bn)


def tile_visibility(m: MultimodalMask, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile ``[B, Tm, Tn]`` (bool): any / every in-bounds element visible, from the dense mask
    padded to whole tiles (padding counts as masked for "any", visible for "every")."""
    d = dense(m)
    b, sq, sk = m.shape
    tm, tn = -(-sq // bm), -(-sk // bn)
    pad_any = torch.zeros(b, tm * bm, tn * bn, dtype=torch.bool)
    pad_all = torch.ones(b, tm * bm, tn * bn, dtype=torch.bool)
    pad_any[:, :sq, :sk] = d
    pad_all[:, :sq, :sk] = d
    return pad_any.view(b, tm, bm, tn, bn).any(4).any(2), pad_all.view(b, tm, bm, tn, bn).all(4).all(2)


def exact_tile_map(m: MultimodalMask, bm: int, bn: int) -> torch.Tensor:
    """The exact classification, from the dense mask."""
    any_vis, all_vis = tile_visibility(m, bm, bn)
    return torch.where(all_vis, TILE_FULL, torch.where(any_vis, TILE_PARTIAL, TILE_EMPTY)).to(torch.int8)


@pytest.mark.parametrize("builder", [
    lambda: MultimodalMask.causal(2, 128),
    lambda: MultimodalMask.key_padding([128, 40, 1], 128),
    lambda: MultimodalMask.prefix_lm([32, 64], [128, 70], 128),
    lambda: MultimodalMask.blip2(32, [20, 64], 64, objective="itg"),
    lambda: MultimodalMask.blip2(32, [20, 64], 64, objective="itc"),
    lambda: MultimodalMask.instructblip(32, [5, 64], 64),
    lambda: MultimodalMask.beit3_captioning(64, [3, 64], 64),
    lambda: MultimodalMask.packed(torch.tensor([0, 17, 60, 128])),
    lambda: MultimodalMask.image_spans_in_causal(
        torch.tensor([[0] * 16 + [1] * 48 + [0] * 16 + [1] * 32 + [0] * 16])),
])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_tile_map_exact_for_builders(builder, block):
    # the kernels' speed depends on this: no tile of the builders' masks is left partial needlessly
    m = builder()
    assert torch.equal(m.tile_map(block, block), exact_tile_map(m, block, block))


def test_tile_map_exact_on_aligned_causal():
    t = MultimodalMask.causal(1, 64).tile_map(16, 16)[0]
    want = torch.tensor([[2, 0, 0, 0], [1, 2, 0, 0], [1, 1, 2, 0], [1, 1, 1, 2]], dtype=torch.int8)
    assert torch.equal(t, want)
    # block size 1: every tile is exactly empty or full
    m = MultimodalMask.blip2(3, [2, 4], 4, objective="itg")
    t1 = m.tile_map(1, 1)
    assert torch.equal(t1, dense(m).to(torch.int8) * TILE_FULL)


def test_tile_map_blip2_itg_regions():
    # 32 queries + 32 text, tiles of 32: [queries x queries] full, [queries x text] empty,
    # [text x queries] full (text fully present), [text x text] partial (causal)
    m = MultimodalMask.blip2(32, [32], 32, objective="itg")
    t = m.tile_map(32, 32)[0]
    assert t.tolist() == [[TILE_FULL, TILE_EMPTY], [TILE_FULL, TILE_PARTIAL]]
    # packed documents: off-diagonal document tiles are empty
    p = MultimodalMask.packed(torch.tensor([0, 32, 64]), causal=False)
    assert p.tile_map(32, 32)[0].tolist() == [[TILE_FULL, TILE_EMPTY], [TILE_EMPTY, TILE_FULL]]


def test_tile_map_ragged_last_tile_can_be_full():
    m = MultimodalMask(torch.zeros(1, 7, dtype=torch.int32), [[FULL]])
    assert m.tile_map(4, 4)[0].tolist() == [[TILE_FULL, TILE_FULL], [TILE_FULL, TILE_FULL]]


def test_tile_map_bad_blocks():
    m = MultimodalMask.causal(1, 8)
    with pytest.raises(ValueError, match="block_m"):
        m.tile_map(0, 16)
    with pytest.raises(TypeError, match="block_n"):
        m.tile_map(16, 16.0)


# ----------------------------------------------------------------------------- bad input

MOD = torch.zeros(2, 5, dtype=torch.int64)


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(modality_ids=MOD[0], rules=[[1]]), ValueError, "modality_ids must have 2 dimensions"),
    (dict(modality_ids=MOD.float(), rules=[[1]]), TypeError, "modality_ids must be an integer"),
    (dict(modality_ids=MOD.bool(), rules=[[1]]), TypeError, "modality_ids must be an integer"),
    (dict(modality_ids=MOD.numpy(), rules=[[1]]), TypeError, "torch.Tensor"),
    (dict(modality_ids=MOD[:, :0], rules=[[1]]), ValueError, "empty"),
    (dict(modality_ids=MOD, rules=[[1, 1]]), ValueError, "square"),
    (dict(modality_ids=MOD, rules=[1]), ValueError, "rules must have 2 dimensions"),
    (dict(modality_ids=MOD, rules=[[1.5]]), TypeError, "rules must be an integer"),
    (dict(modality_ids=MOD, rules=[[4]]), ValueError, "BLOCKED=0"),
    (dict(modality_ids=MOD + 1, rules=[[1]]), ValueError, r"modality_ids must lie in \[0, 1\)"),
    (dict(modality_ids=MOD - 1, rules=[[1]]), ValueError, "modality_ids must lie"),
    (dict(modality_ids=MOD, rules=[[1]], key_modality_ids=torch.ones(2, 3, dtype=torch.int64)),
     ValueError, "key_modality_ids must lie"),
    (dict(modality_ids=MOD, rules=[[1]], segment_ids=torch.zeros(3, 5, dtype=torch.int64)),
     ValueError, "segment_ids has batch size 3"),
    (dict(modality_ids=MOD, rules=[[1]], segment_ids=torch.zeros(2, 4, dtype=torch.int64)),
     ValueError, "segment_ids has length 4"),
    (dict(modality_ids=MOD, rules=[[1]], segment_ids=torch.full((2, 5), -2)), ValueError, ">= -1"),
    (dict(modality_ids=MOD, rules=[[1]], positions=torch.zeros(2, 5)), TypeError, "positions must be an integer"),
    (dict(modality_ids=MOD, rules=[[1]], key_modality_ids=torch.zeros(2, 7, dtype=torch.int64),
          key_positions=torch.zeros(2, 6, dtype=torch.int64)), ValueError, "key_positions has length 6"),
    (dict(modality_ids=MOD, rules=[[1]], key_modality_ids=torch.zeros(2, 7, dtype=torch.int64),
          segment_ids=torch.zeros(2, 5, dtype=torch.int64)), ValueError, "pass key_segment_ids"),
    (dict(modality_ids=MOD, rules=[[1]], key_modality_ids=torch.zeros(2, 7, dtype=torch.int64),
          positions=torch.zeros(2, 5, dtype=torch.int64)), ValueError, "pass key_positions"),
    (dict(modality_ids=MOD, rules=[[1]], key_modality_ids=torch.zeros(3, 5, dtype=torch.int64)),
     ValueError, "key_modality_ids has batch size 3"),
])
def test_bad_constructor_input(kwargs, err, match):
    kwargs = dict(kwargs)
    ids, rules = kwargs.pop("modality_ids"), kwargs.pop("rules")
    with pytest.raises(err, match=match):
        MultimodalMask(ids, rules, **kwargs)


def test_mixed_devices():
    with pytest.raises(ValueError, match="device"):
        MultimodalMask(MOD, [[1]], segment_ids=torch.zeros(2, 5, dtype=torch.int64, device="meta"))


@pytest.mark.parametrize("make,err,match", [
    (lambda: MultimodalMask.blip2(32, [3], 8, objective="itx"), ValueError, "objective"),
    (lambda: MultimodalMask.blip2(32, [-1], 8), ValueError, "non-negative"),
    (lambda: MultimodalMask.blip2(32, [], 8), ValueError, "empty"),
    (lambda: MultimodalMask.blip2(32, torch.tensor([[3]]), 8), ValueError, "1 dimensions"),
    (lambda: MultimodalMask.blip2(32, [3.0], 8), TypeError, "text_lengths"),
    (lambda: MultimodalMask.blip2(0, [0], 0), ValueError, "at least 1"),
    (lambda: MultimodalMask.causal(0, 8), ValueError, "batch"),
    (lambda: MultimodalMask.causal(1, 8.0), TypeError, "seq_len"),
    (lambda: MultimodalMask.key_padding(torch.tensor([1.0]), 8), TypeError, "lengths"),
    (lambda: MultimodalMask.prefix_lm([1, 2], [3], 8), ValueError, "prefix_lengths has 2"),
    (lambda: MultimodalMask.packed(torch.tensor([1, 4])), ValueError, "start at 0"),
    (lambda: MultimodalMask.packed(torch.tensor([0, 4, 2]), seq_len=4), ValueError, "non-decreasing"),
    (lambda: MultimodalMask.packed(torch.tensor([0])), ValueError, "at least 2"),
    (lambda: MultimodalMask.image_spans_in_causal(torch.zeros(4, dtype=torch.int64)), ValueError, "2 dimensions"),
])
def test_bad_builder_input(make, err, match):
    with pytest.raises(err, match=match):
        make()


# ----------------------------------------------------------------------------- GPU: no host sync

@pytest.mark.gpu
def test_cuda_builders_and_tile_map_do_not_synchronise():
    dev = torch.device("cuda")
    lengths = torch.tensor([20, 65], device=dev)
    cu = torch.tensor([0, 17, 60, 129], device=dev)
    ids = torch.tensor([[0] * 5 + [1] * 40 + [0] * 84], device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        masks = [MultimodalMask.blip2(32, lengths, 65, objective="itg"),
                 MultimodalMask.prefix_lm(lengths, lengths + 10, 97),
                 MultimodalMask.packed(cu, seq_len=129),
                 MultimodalMask.image_spans_in_causal(ids)]
        maps = [m.tile_map(64, 64) for m in masks]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for m, t in zip(masks, maps):
        cpu = m.to("cpu")
        assert torch.equal(t.cpu(), cpu.tile_map(64, 64))
        assert torch.equal(m.to_dense().cpu(), cpu.to_dense())
