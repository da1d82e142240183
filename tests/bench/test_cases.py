"""The case catalogues of the attention and experts families: their layouts and shapes, FLOP
counts, masks, skips, CLI reports and routing-overhead table."""
import pytest
import torch

from bench import harness, report
from bench.cases import attention as A
from bench.cases import experts as X


@pytest.mark.parametrize("kind,B,H,S,D", [r for r in A.PYTEST_CASES if r[0] != "full"], ids=lambda v: str(v))
def test_attention_mask_mod_and_visible_pairs_match_dense(kind, B, H, S, D):
    """The flex mask_mod (also used to count visible pairs) is the mask's to_dense(), element for
    element; visible_pairs (analytic) counts the dense mask."""
    mask = A.build_mask(kind, B, S)
    dense = mask.to_dense()[:, 0]
    b = torch.arange(B)[:, None, None]
    qi, ki = torch.arange(S)[None, :, None], torch.arange(S)[None, None, :]
    assert torch.equal(A.mask_mod_for(mask)(b, 0, qi, ki), dense)
    assert torch.equal(A.visible_per_row(mask, chunk_elems=B * S * 5), dense.sum(-1))
    A.visible_pairs.cache_clear()
    assert A.visible_pairs(kind, B, S) == int(dense.sum())


def test_attention_cases_cover_the_models():
    """The GPU suite has the models' layouts and shapes, each forward and forward + backward, plus the
    mask-construction op; --quick keeps a few; FLOPs count visible pairs only."""
    full = [c for c in A.cases("cuda", "full") if c.family == "attention"]
    shapes = {(c.shape["mask"], c.shape["B"], c.shape["H"], c.shape["S"], c.shape["D"]) for c in full}
    for want in [
        ("blip2_itg:32+32", 128, 12, 64, 64), ("blip2_itg:32+128", 128, 12, 160, 64),
        ("llava:576", 8, 32, 2048, 128), ("causal", 4, 16, 4096, 128), ("causal", 2, 16, 8192, 128),
    ]:
        assert want in shapes
    assert any(k.startswith("instructblip") for k, *_ in shapes)
    assert ("beit3_cap:197+64", 16, 64) in {(k, h, d) for k, _b, h, _s, d in shapes}
    assert any(k == "packed:500-3000" and b == 1 and s == 16384 for k, b, _h, s, _d in shapes)
    assert any(d == 88 for *_, d in shapes)
    for op in (A.OP_FWD, A.OP_BWD):
        assert {c.shape["mask"] for c in full if c.op == op} == {s[0] for s in shapes}
    assert all(c.dtype == "bfloat16" for c in full)
    c = next(c for c in full if c.op == A.OP_FWD and c.shape["mask"] == "causal" and c.shape["S"] == 4096)
    assert c.flops == 4 * (4 * 4096 * 4097 // 2) * 128 * 16
    cb = next(x for x in full if x.op == A.OP_BWD and x.shape == c.shape)
    assert cb.flops == 2.5 * c.flops and cb.mode == "fwd+bwd" and c.mode == "fwd"
    for dev in ("cuda", "cpu"):
        quick = {c.shape["mask"] for c in A.cases(dev, "quick") if c.family == "attention"}
        assert 2 <= len(quick) <= 3
    cpu = [c for c in A.cases("cpu", "full") if c.family == "attention"]
    assert max(c.shape["S"] for c in cpu) <= 1024 and all(c.dtype == "float32" for c in cpu)
    assert any(c.shape["mask"] == "causal" and c.shape["S"] == 1024 for c in cpu)


def test_attention_skips_without_the_op_and_flex_backward_on_cpu(monkeypatch):
    import mmkernels

    case = A.attention_case("causal", 1, 2, 32, 16, "float32", "cpu", "fwd", "pytest")
    monkeypatch.delattr(mmkernels, "multimodal_attention", raising=False)
    rec = harness.measure(case, case.provider("mmkernels"), harness.RunOptions())
    assert (rec["status"], rec["reason"]) == ("skipped", "mmkernels.multimodal_attention does not exist yet")
    bwd = A.attention_case("causal", 1, 2, 32, 16, "float32", "cpu", "fwd+bwd", "pytest")
    assert "NotImplementedError" in harness.preflight(bwd, bwd.provider("flex"), harness.RunOptions())
    blip = A.attention_case("blip2_itg:4+12", 2, 2, 16, 16, "float32", "cpu", "fwd", "pytest")
    assert "causal" in harness.preflight(blip, blip.provider("sdpa_flash"), harness.RunOptions())


def test_attention_cli_writes_report(bench_cli):
    doc, md, _ = bench_cli("--family", "attention", "--providers", "sdpa_flash,dense", "--size", "S=32", "--no-plot")
    res = doc["results"]
    ops = {(r["op"], r["mode"]) for r in res if r["status"] == "ok"}
    assert ops == {(A.OP_FWD, "fwd"), (A.OP_BWD, "fwd+bwd"), (A.OP_MASK, "fwd")}
    assert all(r["tflops"] and r["flops"] for r in res if r["status"] == "ok" and r["op"] != A.OP_MASK)
    assert "attention_fwd_bwd (fwd+bwd; FLOPs = 2.5*4*visible*D*H)" in md and "llava:10" in md


def test_experts_layouts():
    """Token counts per expert: VLMo text-first split, VL-FFN blocks of samples, BEiT-3 image-first split,
    CogVLM [BOS] + image + text with 1226 image tokens per sample."""
    assert X.expert_tokens("vlmo:40+197", 64) == [64 * 40, 64 * 197]
    assert X.split_position("vlmo:40+197") == 40 and X.split_position("beit3:197+64") == 197
    assert X.expert_tokens("beit3:197+64", 32) == [32 * 197, 32 * 64]
    assert X.expert_tokens("vlmo_vl:40+197", 64) == [32 * 40, 32 * 197, 32 * 237]
    assert X.num_experts("vlmo_vl:40+197") == 3 and X.split_position("vlmo_vl:40+197") is None
    ids = X.layout_ids("cogvlm:1226+300", 4)
    assert ids.shape == (4, 1526) and X.split_position("cogvlm:1226+300") is None
    assert ids[:, 0].eq(0).all() and ids[:, 1:1227].eq(1).all() and ids[:, 1227:].eq(0).all()
    ids = X.layout_ids("vlmo:40+197", 2)
    assert ids[:, :40].eq(0).all() and ids[:, 40:].eq(1).all()


def test_experts_cases_cover_the_models():
    """GPU suite: VLMo-base FFN (B=64, 40+197, 768/3072, 2 experts) and its 3-expert VL-FFN layers, BEiT-3
    large (1024/4096), CogVLM (B=4, 1226+300, H=4096) SwiGLU MLP 11008, QKV (H->3H) and dense (H->H);
    --quick = VLMo FFN + CogVLM MLP + VLMo's per-modality LayerNorm; FLOPs 3 x forward, swiglu three GEMMs;
    CPU in fp32."""
    full = [c for c in X.cases("cuda", "full") if c.family == "experts"]
    ffn = {(c.shape["layout"], c.shape["E"], c.shape["B"], c.shape["H"], c.shape["F"], c.shape["act"])
           for c in full if c.op == X.OP_FFN}
    assert ffn == {
        ("vlmo:40+197", 2, 64, 768, 3072, "gelu"), ("vlmo_vl:40+197", 3, 64, 768, 3072, "gelu"),
        ("beit3:197+64", 2, 32, 1024, 4096, "gelu"), ("cogvlm:1226+300", 2, 4, 4096, 11008, "swiglu"),
    }
    lin = {(c.shape["layout"], c.shape["B"], c.shape["Hin"], c.shape["Hout"]) for c in full if c.op == X.OP_LINEAR}
    assert lin == {("cogvlm:1226+300", 4, 4096, 12288), ("cogvlm:1226+300", 4, 4096, 4096)}
    assert all(c.dtype == "bfloat16" and c.mode == "fwd+bwd" for c in full)
    vlmo = next(c for c in full if c.shape["layout"] == "vlmo:40+197")
    T = 64 * 237
    assert vlmo.flops == 3 * 2 * T * 768 * 3072 * 2
    cog = next(c for c in full if c.op == X.OP_FFN and c.shape["act"] == "swiglu")
    assert cog.flops == 3 * 2 * (4 * 1526) * 4096 * 11008 * 3
    qkv = next(c for c in full if c.op == X.OP_LINEAR and c.shape["Hout"] == 12288)
    assert qkv.flops == 3 * 2 * (4 * 1526) * 4096 * 12288
    names = {p.name for p in vlmo.providers}
    assert {"mmkernels", "cogvlm", "torchscale", "grouped_mm", "dense", "reference"} <= names
    quick = [c for c in X.cases("cuda", "quick") if c.family == "experts"]
    assert {(c.op, c.shape["layout"]) for c in quick} == {(X.OP_FFN, "vlmo:40+197"), (X.OP_FFN, "cogvlm:1226+300"),
                                                          ("modality_layer_norm", "vlmo:40+197")}
    norms = {(c.shape["layout"], c.shape["E"], c.shape["B"], c.shape["H"])
             for c in full if c.op == "modality_layer_norm"}
    assert norms == {("vlmo:40+197", 2, 64, 768), ("vlmo_vl:40+197", 3, 64, 768), ("beit3:197+64", 2, 32, 1024)}
    assert all(c.flops is None for c in full if c.op == "modality_layer_norm")  # memory-bound: time / dense
    subln = {(c.shape["layout"], c.shape["B"], c.shape["H"], c.shape["F"]) for c in full if c.op == "modality_ffn_subln"}
    assert subln == {("beit3:197+64", 32, 1024, 4096)}
    for prof in ("full", "quick"):
        cpu = [c for c in X.cases("cpu", prof) if c.family == "experts"]
        assert cpu and all(c.dtype == "float32" for c in cpu)
        assert max(c.flops for c in cpu if c.flops) < 1e11  # a few minutes on 2 cores for the whole profile
    pyt = [c for c in X.cases("cpu", "pytest") if c.family == "experts"]
    assert {X.parse_layout(c.shape["layout"])[0] for c in pyt} == set(X.KINDS)
    assert max(c.shape["B"] * c.shape["S"] for c in pyt) <= 64


def test_experts_skips_without_the_op(monkeypatch):
    """Until mmkernels.modality_ffn / modality_linear exist, their rows are skips with a reason, not crashes;
    torchscale needs a split layout, mmkernels_ids only runs where mmkernels uses the split."""
    import mmkernels

    for attr in ("modality_ffn", "modality_linear"):
        monkeypatch.delattr(mmkernels, attr, raising=False)
    opts = harness.RunOptions()
    ffn = X.ffn_case("vlmo:5+11", 2, 64, 128, "gelu", True, "float32", "cpu")
    rec = harness.measure(ffn, ffn.provider("mmkernels"), opts)
    assert (rec["status"], rec["reason"]) == ("skipped", "mmkernels.modality_ffn does not exist yet")
    lin = X.linear_case("cogvlm:9+7", 2, 64, 64, False, "float32", "cpu")
    rec = harness.measure(lin, lin.provider("mmkernels"), opts)
    assert (rec["status"], rec["reason"]) == ("skipped", "mmkernels.modality_linear does not exist yet")
    assert "split" in harness.preflight(lin, lin.provider("torchscale"), opts)
    assert "ids tensor" in harness.preflight(lin, lin.provider("mmkernels_ids"), opts)
    assert harness.preflight(ffn, ffn.provider("torchscale"), opts) is None


def test_experts_grouped_mm_skip_reason(monkeypatch):
    X.grouped_mm_support.cache_clear()
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    try:
        case = X.ffn_case("vlmo:5+11", 2, 64, 128, "gelu", True, "float32", "cpu")
        assert "has no torch._grouped_mm" in harness.preflight(case, case.provider("grouped_mm"), harness.RunOptions())
    finally:
        X.grouped_mm_support.cache_clear()


@pytest.mark.slow
def test_experts_cli_writes_report(bench_cli):
    """The CLI runs the family at the pytest profile (mmkernels rows may be skips until the op lands) and
    the report has the routing-overhead table."""
    doc, md, _ = bench_cli("--family", "experts", "--providers", "mmkernels,cogvlm,torchscale,dense", "--size", "B=1",
                           "--no-plot")
    res = doc["results"]
    assert {r["op"] for r in res if r["status"] == "ok"} == {X.OP_FFN, X.OP_LINEAR, "modality_ffn_frozen",
                                                             "modality_layer_norm", "modality_ffn_subln"}
    assert all(r["status"] in ("ok", "skipped") for r in res), [r for r in res if r["status"] == "error"]
    assert all(r["tflops"] and r["flops"] for r in res if r["status"] == "ok" and r["op"] != "modality_layer_norm")
    assert "**modality_layer_norm: routing overhead**" in md
    assert all(r["reason"] for r in res if r["status"] == "skipped")
    assert "**modality_ffn: routing overhead**" in md and "cogvlm:9+7" in md
    assert "modality_ffn (fwd+bwd; FLOPs = 3*2*T*H*(Fi+F)" in md


def test_experts_routing_overhead_table():
    case = X.ffn_case("vlmo:40+197", 2, 768, 3072, "gelu", True, "float32", "cpu")

    def rec(provider, ms):
        r = harness.base_record(case, case.provider(provider))
        r.update(status="ok", time_ms=ms, reps=3)
        return r

    dense, cog, base = rec("dense", 10.0), rec("cogvlm", 25.0), rec("mmkernels", 12.5)
    assert report.overhead(cog, dense) == pytest.approx(2.5)
    md = report.markdown({"device_name": "test", "argv": ["python -m bench"]}, [base, cog, dense], [])
    row = next(ln for ln in md.splitlines() if ln.startswith("| vlmo:40+197") and "10.000" in ln)
    assert row.endswith("| 10.000 | 1.25x | 2.50x |")


def test_experts_frozen_case_freezes_expert_0():
    """modality_ffn_frozen: every provider leaves the frozen expert's weight gradients zero and
    trains the other; its FLOPs count the trained expert's weight gradients only."""
    from bench.cases import experts_frozen as XF

    case = XF.case("cogvlm:9+7", 2, 64, 96, "swiglu", False, "float32", "cpu")
    fwd = 2 * 2 * 16 * 64 * (192 + 96)
    trained = X.expert_tokens("cogvlm:9+7", 2)[1]
    assert case.flops == 2 * fwd + 2 * trained * 64 * (192 + 96)
    for provider in case.providers:
        if harness.preflight(case, provider, harness.RunOptions()):
            continue
        inputs = case.make_inputs(case)
        provider.fn(**inputs).backward()
        for name in ("w_in", "w_out"):
            g = inputs[name].grad
            assert bool((g[0] == 0).all()) and bool(g[1].abs().sum() > 0), (provider.name, name)
