"""The case catalogues of the SigLIP loss (``siglip``) and of one rank's distributed CLIP loss
(``contrastive_dist``): sizes per profile, providers and forced paths, the formulas of the
eager providers against open_clip's losses, skips, and the CLI's report."""
import pytest
import torch
import torch.nn.functional as F

from bench import harness
from bench.cases import collect
from bench.cases import contrastive_dist as CD
from bench.cases import siglip as S
from mmkernels.testing.peers import open_clip_loss

needs_open_clip = pytest.mark.skipif(open_clip_loss() is None, reason="open_clip is not installed")


def _cases(module, device, profile):
    return [c for c in module.cases(device, profile) if c.family == module.FAMILY]


def _names(case):
    return [p.name for p in case.providers]


def test_siglip_cases_sizes_and_providers():
    """GPU: N from 1024 to 32768 at D = 768 in bf16 and fp32, --quick one real size (32768); CPU
    --quick small N; every case has auto, the kernel, blockwise and materialized paths forced, open_clip and the
    reference; FLOPs 8*N^2*D; an mm probe of each dtype at D."""
    full = _cases(S, "cuda", "full")
    assert {c.shape["N"] for c in full} == {1024, 4096, 16384, 32768}
    assert {c.shape["D"] for c in full} == {768}
    assert {c.dtype for c in full} == {"bfloat16", "float32"}
    quick = _cases(S, "cuda", "quick")
    assert {c.shape["N"] for c in quick} == {32768} and {c.dtype for c in quick} == {"bfloat16", "float32"}
    cpu = _cases(S, "cpu", "quick")
    assert max(c.shape["N"] for c in cpu) <= 4096 and {c.shape["D"] for c in cpu} == {768}
    assert max(c.shape["N"] for c in _cases(S, "cpu", "pytest")) <= 512
    c = full[0]
    assert c.op == "siglip_loss" and c.mode == "fwd+bwd"
    assert _names(c)[:4] == ["mmkernels", "mmkernels:kernel", "mmkernels:blockwise", "mmkernels:materialized"]
    assert {"open_clip", "reference"} <= set(_names(c))
    assert c.provider("mmkernels:materialized").mem_estimate is c.provider("open_clip").mem_estimate
    assert c.flops == 8.0 * c.shape["N"] ** 2 * 768
    probes = [p for p in S.cases("cuda", "quick") if p.rate_probe]
    assert {(p.dtype, p.shape["K"]) for p in probes} >= {("bfloat16", 768), ("float32", 768)}


def test_siglip_forced_paths_not_doubled(monkeypatch):
    """Where bench.cases.FORCED_PATHS names siglip_loss, collect adds the forced providers and the
    module does not add them again."""
    import bench.cases as BC

    monkeypatch.setitem(BC.FORCED_PATHS, "siglip_loss", ("blockwise",))
    case = next(c for c in collect(["siglip"], "cpu", "pytest") if c.op == "siglip_loss")
    names = _names(case)
    assert len(names) == len(set(names)) and "mmkernels:blockwise" in names


def test_siglip_inputs_random_and_learnable():
    case = S.siglip_case(64, 32, "float32", "cpu")
    x = case.make_inputs(case)
    for name in ("image_features", "text_features"):
        assert x[name].requires_grad and bool((x[name] != 0).all())
    assert x["logit_scale"].detach().item() == 10.0 and x["logit_bias"].detach().item() == -10.0
    assert x["logit_scale"].requires_grad and x["logit_bias"].requires_grad


@needs_open_clip
def test_siglip_reference_equals_open_clip_and_mmkernels_reference():
    """The eager formula is open_clip's SigLipLoss (one process) and mmkernels' float64 truth,
    loss and all four gradients."""
    from mmkernels.contrastive.siglip.reference import siglip_loss_reference

    case = S.siglip_case(48, 16, "float64", "cpu")
    outs = []
    for fn in (S.siglip_reference, S.siglip_open_clip, siglip_loss_reference):
        x = case.make_inputs(case)
        loss = fn(x["image_features"], x["text_features"], x["logit_scale"], x["logit_bias"])
        loss.backward()
        outs.append((loss.detach(), [x[k].grad for k in ("image_features", "text_features", "logit_scale", "logit_bias")]))
    for loss, grads in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0])
        for g, want in zip(grads, outs[0][1]):
            torch.testing.assert_close(g, want)


def test_siglip_chunked_peer_probed_by_name(monkeypatch):
    """No chunked SigLIP in the installed open_clip: no `chunked` provider, and the note says so; a
    loss module with one gets the peer."""
    import types

    real = S._open_clip_loss()
    if real is not None and S.chunked_name() is None:
        case = S.siglip_case(64, 32, "float32", "cpu")
        assert "chunked" not in _names(case)
        assert any("has no chunked SigLIP" in line for line in S.notes("cpu", "quick"))

    calls = []

    def chunked_siglip_loss(img, txt, scale, bias):
        calls.append(img.shape)
        return S.siglip_reference(img, txt, scale, bias)

    fake = types.SimpleNamespace(SigLipLoss=object, chunked_siglip_loss=chunked_siglip_loss)
    monkeypatch.setattr(S, "_open_clip_loss", lambda: fake)
    monkeypatch.setattr(S, "_PEERS", {})
    assert S.chunked_name() == "chunked_siglip_loss"
    case = S.siglip_case(64, 32, "float32", "cpu")
    assert "chunked" in _names(case)
    rec = harness.measure(case, case.provider("chunked"), harness.RunOptions(cpu_max_reps=3))
    assert rec["status"] == "ok" and calls


def test_siglip_skips_big_materialised_and_without_the_op(monkeypatch):
    import mmkernels

    opts = harness.RunOptions()
    huge = S.siglip_case(1 << 20, 768, "float32", "cpu")  # 4 TiB per N x N matrix
    names = ["open_clip", "reference"] + (["mmkernels:materialized"] if hasattr(mmkernels, "siglip_loss") else [])
    for name in names:
        assert harness.preflight(huge, huge.provider(name), opts).startswith("estimated")
    monkeypatch.delattr(mmkernels, "siglip_loss", raising=False)
    case = S.siglip_case(64, 32, "float32", "cpu")
    for name in ("mmkernels", "mmkernels:kernel", "mmkernels:blockwise", "mmkernels:materialized"):
        assert harness.preflight(case, case.provider(name), opts) == "mmkernels.siglip_loss does not exist yet"


def test_dist_cases_sizes_and_providers():
    """GPU: n = 4096 at W = 8 and 64, D = 768, bf16 and fp32 (--quick: W = 8); CPU --quick smaller n;
    providers auto, the infonce paths forced, open_clip and the reference; FLOPs 16*W*n^2*D."""
    full = _cases(CD, "cuda", "full")
    assert {(c.shape["n"], c.shape["W"], c.shape["D"]) for c in full} == {(4096, 8, 768), (4096, 64, 768)}
    assert {c.dtype for c in full} == {"bfloat16", "float32"}
    quick = _cases(CD, "cuda", "quick")
    assert {(c.shape["n"], c.shape["W"]) for c in quick} == {(4096, 8)}
    cpu = _cases(CD, "cpu", "quick")
    assert {c.shape["W"] for c in cpu} == {8, 64} and max(c.shape["n"] for c in cpu) < 4096
    c = full[0]
    assert c.op == "clip_local_loss" and c.x == "W"
    assert _names(c) == ["mmkernels", "mmkernels:kernel", "mmkernels:blockwise", "mmkernels:materialized",
                         "open_clip", "reference"]
    assert c.flops == 16.0 * c.shape["W"] * 4096 ** 2 * 768
    # the forced materialized path is estimated as the materialising peers are
    assert c.provider("mmkernels:materialized").mem_estimate is c.provider("open_clip").mem_estimate


def test_dist_inputs_are_one_ranks_block():
    case = CD.local_case(32, 8, 16, "float32", "cpu")
    x = case.make_inputs(case)
    n, r = 32, CD.RANK
    assert x["all_image_features"].shape == (8 * n, 16) and x["image_features"].shape == (n, 16)
    assert torch.equal(x["all_image_features"][r * n:(r + 1) * n], x["image_features"])
    assert torch.equal(x["all_text_features"][r * n:(r + 1) * n], x["text_features"])
    assert torch.equal(x["targets"], torch.arange(n) + r * n)
    leaves = harness.grad_leaves(x)
    assert len(leaves) == 5 and all(bool((t != 0).all()) for t in leaves)


def _dist_grads(fn, case):
    x = case.make_inputs(case)
    loss = fn(**x)
    loss.backward()
    names = ("image_features", "text_features", "all_image_features", "all_text_features", "logit_scale")
    return loss.detach(), {k: x[k].grad for k in names}


@needs_open_clip
def test_dist_open_clip_is_the_local_loss_formula():
    """open_clip's ClipLoss(local_loss=True, gather_with_grad=True) with the stand-in gather gives
    the reference's loss and gradients, every gathered row gets a gradient, and the module's
    gather_features is restored."""
    mod = open_clip_loss()
    original = mod.gather_features
    case = CD.local_case(8, 4, 16, "float64", "cpu")
    ref_loss, ref = _dist_grads(CD.local_reference, case)
    loss, got = _dist_grads(CD.local_open_clip, case)
    assert mod.gather_features is original
    torch.testing.assert_close(loss, ref_loss)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=lambda m: f"{k}: {m}")
    assert bool((ref["all_text_features"].abs().sum(1) > 0).all())
    # by hand: the rank's targets are offset by rank * n
    x = case.make_inputs(case)
    t = torch.arange(8) + CD.RANK * 8
    s = x["logit_scale"]
    want = (F.cross_entropy(s * x["image_features"] @ x["all_text_features"].T, t)
            + F.cross_entropy(s * x["text_features"] @ x["all_image_features"].T, t)) / 2
    torch.testing.assert_close(ref_loss, want.detach())


def test_dist_mmkernels_matches_reference():
    case = CD.local_case(16, 8, 32, "float64", "cpu")
    ref_loss, ref = _dist_grads(CD.local_reference, case)
    loss, got = _dist_grads(CD.local_mmkernels, case)
    torch.testing.assert_close(loss, ref_loss)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=lambda m: f"{k}: {m}")


def test_dist_skips_materialised_where_it_cannot_fit():
    big = CD.local_case(1 << 16, 64, 768, "float32", "cpu")  # two 64k x 4M logits
    opts = harness.RunOptions()
    for name in ("open_clip", "reference", "mmkernels:materialized"):
        assert harness.preflight(big, big.provider(name), opts).startswith("estimated")


def test_cli_reports_both_ops(bench_cli):
    doc, md, _ = bench_cli("--family", "siglip,contrastive_dist", "--providers", "reference,open_clip,mmkernels",
                           "--no-plot")
    res = [r for r in doc["results"] if not r["rate_probe"]]
    assert {r["op"] for r in res} == {"siglip_loss", "clip_local_loss"}
    assert all(r["status"] in ("ok", "skipped") for r in res), [r for r in res if r["status"] == "error"]
    assert all(r["status"] == "ok" for r in res if r["provider"] == "reference")
    assert "## siglip_loss (fwd+bwd; FLOPs = 8*N^2*D)" in md
    assert "## clip_local_loss (fwd+bwd; FLOPs = 16*W*n^2*D)" in md
    assert "**clip_local_loss** (fwd+bwd)" in md and "| 16 | 8 | 64 | fp32 |" in md
