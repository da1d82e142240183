"""The case catalogue of the ALBEF / BLIP / BLIP-2 objectives (``bench/cases/itc.py``): sizes per
profile, providers and forced paths, every provider of a loss computing the same loss and
gradients, valid hard-negative draws, skips, the dispatch-table mapping and the CLI's report."""
import types

import pytest
import torch
import torch.nn.functional as F

from bench import dispatch_table as gen
from bench import harness
from bench.cases import itc as I
from mmkernels._dispatch import PathUnavailable

PATH_NAMES = ["mmkernels", "mmkernels:kernel", "mmkernels:blockwise", "mmkernels:materialized"]


def _cases(device, profile, op=None):
    return [c for c in I.cases(device, profile) if c.family == I.FAMILY and (op is None or c.op == op)]


def _names(case):
    return [p.name for p in case.providers]


def _runs(case, provider) -> bool:
    return harness.preflight(case, provider, harness.RunOptions()) is None


def test_gpu_profiles_are_the_papers_sizes():
    """ALBEF B = 64 and 256 with K = 57600, D = 256; BLIP-2 G = 2048 and 8192 over W = 8 and G = 2048
    on one process, Q = 32; negatives at B = 1024; bf16 and fp32 in both GPU profiles."""
    for profile in ("full", "quick"):
        albef = _cases("cuda", profile, I.OP_ALBEF)
        assert {(c.shape["B"], c.shape["K"], c.shape["D"]) for c in albef} == {(64, 57600, 256), (256, 57600, 256)}
        blip2 = _cases("cuda", profile, I.OP_BLIP2)
        assert {(c.shape["G"], c.shape["W"]) for c in blip2} == {(2048, 8), (8192, 8), (2048, 1)}
        assert {(c.shape["Q"], c.shape["D"]) for c in blip2} == {(32, 256)}
        neg = _cases("cuda", profile, I.OP_NEGATIVES)
        assert 1024 in {c.shape["B"] for c in neg} and {(c.shape["Q"], c.shape["D"]) for c in neg} == {(32, 256)}
        for group in (albef, blip2, neg):
            assert {c.dtype for c in group} == {"bfloat16", "float32"}


def test_cpu_and_pytest_profiles_are_smaller():
    quick = _cases("cpu", "quick")
    assert {c.op for c in quick} == {I.OP_ALBEF, I.OP_BLIP2, I.OP_NEGATIVES}
    assert {c.dtype for c in quick} == {"float32", "bfloat16"}
    assert {c.shape["B"] for c in quick if c.op == I.OP_ALBEF} == {64}
    assert all(c.shape["G"] <= 512 for c in quick if c.op == I.OP_BLIP2)
    assert any(c.shape["W"] == 1 for c in quick if c.op == I.OP_BLIP2)
    tiny = _cases("cpu", "pytest")
    assert {c.dtype for c in tiny} == {"float32"}
    assert all(c.shape.get("K", 0) <= 1024 and c.shape.get("G", 0) <= 256 and c.shape.get("B", 0) <= 64 for c in tiny)


def test_providers_modes_and_flops():
    albef = I.albef_case(64, 57600, 256, "bfloat16", "cuda")
    assert albef.mode == "fwd+bwd" and albef.x == "B"
    assert _names(albef) == PATH_NAMES + ["reference"]
    assert albef.flops == 12.0 * 64 * (64 + 57600) * 256
    blip2 = I.blip2_case(2048, 8, 32, 256, "bfloat16", "cuda")
    assert _names(blip2) == PATH_NAMES + ["reference"] and blip2.x == "G"
    assert blip2.flops == 8.0 * 256 * 2048 * 32 * 256
    neg = I.negatives_case(1024, 32, 256, "float32", "cuda")
    assert neg.mode == "fwd" and _names(neg) == PATH_NAMES + [I.AS_WRITTEN]
    assert neg.flops == 4.0 * 1024**2 * 32 * 256
    # the forced paths: the kernel's own check, the materialized path estimated as it allocates
    assert albef.provider("mmkernels:kernel").check is I.check_kernel
    assert albef.provider("mmkernels:blockwise").check is I.check_path
    assert albef.provider("mmkernels:materialized").mem_estimate is I.est_materialized
    probes = [p for p in I.cases("cuda", "quick") if p.rate_probe]
    assert {(p.dtype, p.shape["K"]) for p in probes} >= {("bfloat16", 256), ("float32", 256)}


def test_inputs():
    case = I.albef_case(16, 64, 32, "float32", "cpu")
    x = case.make_inputs(case)
    assert [k for k, v in x.items() if v.requires_grad] == ["image_feat", "text_feat", "logit_scale"]
    assert x["image_queue"].shape == (64, 32) and x["image_feat_m"].shape == (16, 32)
    for k in ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        torch.testing.assert_close(x[k].detach().norm(dim=-1), torch.ones(x[k].shape[0]))
    assert x["logit_scale"].dtype == torch.float32 and x["logit_scale"].dim() == 0
    assert x["logit_scale"].item() == pytest.approx(1 / 0.07)

    case = I.blip2_case(64, 4, 8, 32, "float32", "cpu")
    x = case.make_inputs(case)
    assert x["image_feats"].shape == (16, 8, 32) and x["image_feats_all"].shape == (64, 8, 32)
    assert torch.equal(x["image_feats"].detach(), x["image_feats_all"][:16])  # rank 0's rows
    assert torch.equal(x["text_feat"].detach(), x["text_feat_all"][:16])
    assert not x["image_feats_all"].requires_grad and not x["text_feat_all"].requires_grad
    assert torch.equal(x["targets"], torch.arange(16))
    torch.testing.assert_close(x["image_feats_all"].norm(dim=-1), torch.ones(64, 8))

    case = I.negatives_case(16, 4, 32, "float32", "cpu")
    x = case.make_inputs(case)
    assert not any(v.requires_grad for v in x.values())


def _loss_and_grads(case, provider):
    torch.manual_seed(case.seed)
    x = case.make_inputs(case)
    loss = provider.fn(**x)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in x.items() if isinstance(v, torch.Tensor) and v.requires_grad}


LOSS_CASES = [c for c in _cases("cpu", "pytest") if c.op != I.OP_NEGATIVES]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.id)
def test_every_provider_computes_the_same_loss(case):
    """At the pytest profile every provider that runs gives the reference's loss and gradients;
    the reference is the papers' code (``mmkernels.contrastive.itc.reference``)."""
    want, want_grads = _loss_and_grads(case, case.provider("reference"))
    ran = []
    for p in case.providers:
        if p.name == "reference" or not _runs(case, p):
            continue
        try:
            loss, grads = _loss_and_grads(case, p)
        except PathUnavailable:
            continue
        ran.append(p.name)
        torch.testing.assert_close(loss, want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{p.name}: {m}")
        for k, g in want_grads.items():
            torch.testing.assert_close(grads[k], g, rtol=2e-4, atol=2e-6, msg=lambda m: f"{p.name}, grad of {k}: {m}")
    assert "mmkernels:blockwise" in ran and "mmkernels:materialized" in ran


def test_blip2_provider_is_blip2_itc_loss_on_one_process():
    """With W = 1 the two infonce_loss directions are what mmkernels.blip2_itc_loss computes on one
    process (its gathered keys are the local features, without gradient)."""
    import mmkernels

    case = I.blip2_case(16, 1, 4, 32, "float64", "cpu")
    x = case.make_inputs(case)
    got = I.blip2_mmkernels(**x)
    want = mmkernels.blip2_itc_loss(x["image_feats"], x["text_feat"], x["logit_scale"])
    torch.testing.assert_close(got, want)


def test_albef_reference_is_the_formula():
    """The as-written provider is ALBEF's ITC with temp = 1 / logit_scale (written out here)."""
    case = I.albef_case(8, 24, 16, "float64", "cpu")
    x = case.make_inputs(case)
    s = x["logit_scale"].double()
    t_all = torch.cat([x["text_feat_m"], x["text_queue"]])
    i_all = torch.cat([x["image_feat_m"], x["image_queue"]])
    hard = torch.eye(8, 32, dtype=torch.float64)
    ti = I.ALPHA * F.softmax(s * x["image_feat_m"] @ t_all.T, 1) + (1 - I.ALPHA) * hard
    tt = I.ALPHA * F.softmax(s * x["text_feat_m"] @ i_all.T, 1) + (1 - I.ALPHA) * hard
    want = (-(F.log_softmax(s * x["image_feat"] @ t_all.T, 1) * ti).sum(1).mean()
            - (F.log_softmax(s * x["text_feat"] @ i_all.T, 1) * tt).sum(1).mean()) / 2
    torch.testing.assert_close(I.albef_reference(**x), want)


NEG_CASES = _cases("cpu", "pytest", I.OP_NEGATIVES)


@pytest.mark.parametrize("case", NEG_CASES, ids=lambda c: c.id)
def test_negatives_are_valid_draws(case):
    """Every provider draws, for each image and each text, an index in range that is never its
    positive. With the texts shifted by one row (each image's correlated text is then a negative)
    and a very large logit scale, the draw is the hardest negative (the largest similarity, max
    over the queries, off the diagonal), the same for every provider."""
    B = case.shape["B"]
    torch.manual_seed(case.seed)
    x = case.make_inputs(case)
    sharp = dict(x, text_feat=x["text_feat"].roll(1, 0), logit_scale=torch.tensor(1e5))
    sims = torch.einsum("iqd,jd->ijq", sharp["image_feats"].double(), sharp["text_feat"].double()).amax(-1)
    off = sims.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
    hardest = (off.argmax(1), off.argmax(0))
    ran = []
    for p in case.providers:
        if not _runs(case, p):
            continue
        try:
            with torch.no_grad():
                draws = p.fn(**x)
                sharp_draws = p.fn(**sharp)
        except PathUnavailable:
            continue
        ran.append(p.name)
        for draw in (*draws, *sharp_draws):
            assert draw.shape == (B,) and draw.dtype == torch.int64
            assert bool(((draw >= 0) & (draw < B)).all()), p.name
            assert not bool((draw == torch.arange(B)).any()), f"{p.name} drew a positive"
        for got, want in zip(sharp_draws, hardest):
            assert torch.equal(got, want), f"{p.name}: {got} != hardest {want}"
    assert {"mmkernels:blockwise", "mmkernels:materialized", I.AS_WRITTEN} <= set(ran)


def test_skips_where_the_papers_code_cannot_fit():
    """BLIP-2's broadcast copies ([b, G, Q, D]) and ALBEF's [B, B + K] matrices are estimated, so
    sizes beyond memory skip before running."""
    opts = harness.RunOptions()
    big = I.blip2_case(1 << 16, 1, 32, 256, "float32", "cpu")
    assert harness.preflight(big, big.provider("reference"), opts).startswith("estimated")
    big = I.negatives_case(1 << 16, 32, 256, "float32", "cpu")
    assert harness.preflight(big, big.provider(I.AS_WRITTEN), opts).startswith("estimated")
    big = I.albef_case(1 << 16, 1 << 20, 256, "float32", "cpu")
    for name in ("reference", "mmkernels:materialized"):
        assert harness.preflight(big, big.provider(name), opts).startswith("estimated")
    # the estimate of the broadcast copy is what BLIP-2's matmul allocates
    case = I.blip2_case(2048, 8, 32, 256, "bfloat16", "cuda")
    assert I._broadcast_copy(case) == 256 * 2048 * 32 * 256 * 2


def test_kernel_without_its_functions_is_a_skip(monkeypatch):
    """An extension built without the itc functions: the kernel path skips and says why, and auto
    skips where the table would send it to the kernels; the other paths still run."""
    from mmkernels import _ext

    fake = types.SimpleNamespace()
    monkeypatch.setattr(_ext, "available", lambda: True)
    monkeypatch.setattr(_ext, "C", fake, raising=False)  # found before the module's lazy __getattr__
    case = I.albef_case(16, 64, 32, "float32", "cpu")
    opts = harness.RunOptions()
    reason = harness.preflight(case, case.provider("mmkernels:kernel"), opts)
    assert "lack itc_rows, itc_grads" in reason
    auto = harness.preflight(case, case.provider("mmkernels"), opts)
    assert (auto is None) != I.auto_takes_kernel(case)
    if auto is not None:
        assert auto.startswith("backend auto runs the kernel path")
    assert harness.preflight(case, case.provider("mmkernels:blockwise"), opts) is None
    neg = I.negatives_case(16, 4, 32, "float32", "cpu")
    assert "lack itc_negatives" in harness.preflight(neg, neg.provider("mmkernels:kernel"), opts)


def test_dispatch_table_maps_the_ops():
    """The generator ranks the paths of these ops under the contrastive table's itc ops, classed by
    one direction's queries x keys."""
    from mmkernels.contrastive.paths import shape_class

    assert gen.DISPATCHED[I.OP_ALBEF] == ("contrastive", "itc_loss")
    assert gen.DISPATCHED[I.OP_BLIP2] == ("contrastive", "itc_loss")
    assert gen.DISPATCHED[I.OP_NEGATIVES] == ("contrastive", "itc_negatives")
    assert gen.shape_class(I.OP_ALBEF, {"B": 64, "K": 57600, "D": 256}) == shape_class(64, 57664, 256)
    assert gen.shape_class(I.OP_BLIP2, {"G": 8192, "W": 8, "Q": 32, "D": 256}) == shape_class(1024, 8192, 256)
    assert gen.shape_class(I.OP_NEGATIVES, {"B": 1024, "Q": 32, "D": 256}) == shape_class(1024, 1024, 256)


def test_cli_reports_the_three_ops(bench_cli):
    doc, md, _ = bench_cli("--family", "itc", "--no-plot")
    res = [r for r in doc["results"] if not r["rate_probe"]]
    assert {r["op"] for r in res} == {I.OP_ALBEF, I.OP_BLIP2, I.OP_NEGATIVES}
    assert all(r["status"] in ("ok", "skipped") for r in res), [r for r in res if r["status"] == "error"]
    assert all(r["status"] == "ok" for r in res if r["provider"] in ("reference", I.AS_WRITTEN))
    assert "## albef_itc (fwd+bwd; FLOPs = 12*B*(B+K)*D)" in md
    assert "## blip2_itc (fwd+bwd; FLOPs = 8*(G/W)*G*Q*D)" in md
    assert "## itm_negatives (fwd; FLOPs = 4*B^2*Q*D)" in md
