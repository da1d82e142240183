"""The benchmark cases under pytest-benchmark, plus checks of the harness.

``pytest bench/`` runs the same cases and providers as ``python -m bench``
(both read ``bench/cases/``), at small CPU sizes by default (profile
``pytest``). Environment variables pick others::

    pytest bench/ --benchmark-disable -q               # every case once: a smoke test
    pytest bench/ --benchmark-only --benchmark-save=X  # store timings (.benchmarks/)
    pytest bench/ --benchmark-only --benchmark-compare # compare with the last stored run
    BENCH_PROFILE=quick pytest bench/ --benchmark-only # the --quick sizes (CPU: N 1024/4096)
    BENCH_DEVICE=cuda BENCH_PROFILE=quick pytest bench/ --benchmark-only

Only relative numbers between commits on the same machine mean anything here;
the performance record is ``python -m bench`` on a GPU (bench/results/).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import harness, report
from bench.cases import FAMILIES, collect
from bench.cases import contrastive as C

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
PROFILE = os.environ.get("BENCH_PROFILE", "pytest")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
_DEVICE_OK = DEVICE == "cpu" or torch.cuda.is_available()
PAIRS = harness.plan(collect(list(FAMILIES), DEVICE, PROFILE)) if _DEVICE_OK else []


def _pair_id(pair) -> str:
    case, prov = pair
    return f"{case.id}-{prov.name}"


def _sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------
# The cases, timed by pytest-benchmark
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case,provider", PAIRS, ids=[_pair_id(p) for p in PAIRS])
def test_case(benchmark, case, provider):
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    leaves = harness.grad_leaves(inputs)
    step = harness.make_step(case, provider, inputs)

    def run():
        out = step()
        _sync()
        return out

    benchmark.group = case.id
    benchmark.extra_info.update(
        case=case.id, provider=provider.name, shape=dict(case.shape), dtype=case.dtype, device=case.device, mode=case.mode
    )
    out = benchmark.pedantic(run, setup=lambda: harness.clear_grads(leaves), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.isfinite(out).all()
    if case.mode == "fwd+bwd":
        for leaf in leaves:
            assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


# --------------------------------------------------------------------------
# Every provider computes the same function (so that the speedups compare
# like with like): loss and gradients against the reference in float64
# --------------------------------------------------------------------------

TOL = {"float32": (2e-4, 1e-5), "bfloat16": (3e-2, 3e-2), "float16": (5e-3, 5e-3)}
AGREE = [
    (c, p)
    for c, p in PAIRS
    if not c.rate_probe and p.name != "reference" and any(q.name == "reference" for q in c.providers)
    and c.family not in ("attention", "experts")  # non-tensor inputs: the families' own agreement tests below
]


@pytest.mark.parametrize("case,provider", AGREE, ids=[_pair_id(p) for p in AGREE])
def test_provider_agrees_with_reference(case, provider):
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    out = provider.fn(**inputs)
    out.backward()
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    ref = case.provider("reference").fn(**ref_inputs)
    ref.backward()
    rtol, atol = TOL[case.dtype]
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=rtol, atol=atol)
    for name, v in inputs.items():
        if v.requires_grad:
            torch.testing.assert_close(v.grad.double(), ref_inputs[name].grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


# --------------------------------------------------------------------------
# The harness itself
# --------------------------------------------------------------------------


def test_reference_is_openclip_formula():
    """The reference provider equals the symmetric InfoNCE written out by hand."""
    case = C.clip_case(64, 16, "float64", "cpu")
    x = case.make_inputs(case)
    img, txt, s = x["image_features"], x["text_features"], x["logit_scale"]
    logits = s * img @ txt.T
    lse_rows = torch.logsumexp(logits, dim=1)
    lse_cols = torch.logsumexp(logits, dim=0)
    diag = torch.diagonal(logits)
    expect = ((lse_rows - diag).mean() + (lse_cols - diag).mean()) / 2
    torch.testing.assert_close(C.clip_reference(img, txt, s), expect)


def test_cli_writes_json_md_png(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "run"
    rc = main(
        ["--profile", "pytest", "--device", "cpu", "--family", "contrastive", "--providers", "reference",
         "--size", "N=64,128", "--size", "D=32", "--no-isolate", "--out", str(out)]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    for key in ("device_name", "torch", "triton", "python", "git_commit", "date"):
        assert key in doc["env"]
    res = doc["results"]
    ran = [r for r in res if r["provider"] == "reference"]
    assert ran and all(r["status"] == "ok" and r["time_ms"] > 0 for r in ran)
    assert any(r["rate_probe"] and r["status"] == "ok" for r in res)
    skipped = [r for r in res if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)
    md = (out / "results.md").read_text()
    assert "| 64 | 32 | fp32 | reference |" in md and "GPU-only" in md
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_isolated_cpu_measurement_reports_memory():
    case = C.clip_case(512, 64, "float32", "cpu")
    rec = harness.measure_isolated(case, case.provider("reference"), harness.RunOptions(cpu_max_reps=3, timeout_s=300))
    assert rec["status"] == "ok", rec
    logits = 512 * 512 * 4
    # the reference holds at least two N x N logits-sized matrices at its peak
    assert 2 * logits <= rec["mem_extra_bytes"] <= 40 * logits, rec
    assert rec["mem_method"].startswith("rss")


def _oom(**_):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB")


def _huge(case):
    return 1 << 60


def test_skips_are_recorded_with_reasons():
    case = C.clip_case(64, 16, "float32", "cpu")
    opts = harness.RunOptions()
    rec = harness.measure(case, harness.Provider("oom", _oom), opts)
    assert (rec["status"], rec["reason"]) == ("skipped", "out of memory")
    rec = harness.measure(case, harness.Provider("big", C.clip_reference, mem_estimate=_huge), opts)
    assert rec["status"] == "skipped" and rec["reason"].startswith("estimated")


def test_report_ratios_and_markdown():
    case = C.clip_case(4096, 512, "float32", "cpu")

    def rec(provider, ms, mem):
        r = harness.base_record(case, case.provider(provider))
        r.update(status="ok", time_ms=ms, reps=3, mem_extra_bytes=mem, tflops=case.flops / (ms * 1e-3) / 1e12)
        return r

    base, ref = rec("mmkernels", 10.0, 4 * harness.MiB), rec("reference", 25.0, 400 * harness.MiB)
    speed, mem = report.ratios(ref, base)
    assert speed == pytest.approx(2.5) and mem == pytest.approx(100.0)
    env = {"device_name": "test", "argv": ["python -m bench"], "git_commit": "abc"}
    md = report.markdown(env, [base, ref], [])
    assert "2.50x / 100x" in md


class _FakeEvent:
    """CUDA event stand-in: host clock (enough to drive the CUDA code path on CPU tensors)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def _cpu_inputs_for_fake_cuda(case):
    import dataclasses

    return C.make_clip_inputs(dataclasses.replace(case, device="cpu"))


def test_cuda_code_path_with_a_fake_device(monkeypatch):
    """The CUDA-only branch of measure() (events, peak memory, L2 flush), driven on
    CPU tensors with torch.cuda stubbed, so that CI without a GPU still runs it."""
    import dataclasses

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "empty_cache", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "mem_get_info", lambda *a, **k: (64 << 30, 80 << 30))
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda *a, **k: 1000)
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a, **k: 1000 + 5 * harness.MiB)
    monkeypatch.setattr(cuda, "Event", _FakeEvent)
    monkeypatch.setitem(harness._FLUSH, "cuda", torch.empty(1 << 20, dtype=torch.int8))
    case = dataclasses.replace(C.clip_case(256, 64, "float32", "cuda"), make_inputs=_cpu_inputs_for_fake_cuda)
    opts = harness.RunOptions(budget_ms=20, warmup_ms=5, min_reps=3, max_reps=8)
    rec = harness.measure(case, case.provider("reference"), opts)
    assert rec["status"] == "ok", rec
    assert 3 <= rec["reps"] <= 8 and rec["time_ms"] > 0
    grads = 2 * 256 * 64 * 4 + 4
    assert rec["grad_bytes"] == grads and rec["mem_extra_bytes"] == 5 * harness.MiB - grads
    assert rec["mem_method"] == "cuda max_memory_allocated"


# --------------------------------------------------------------------------
# The attention family
# --------------------------------------------------------------------------

from bench.cases import attention as A  # noqa: E402

ATTN_AGREE = [
    (c, p)
    for c, p in PAIRS
    if c.family == "attention" and c.op != A.OP_MASK and p.name != "reference"
]


def _attention_seen(inputs):
    mask = inputs["ctx"].mask
    if mask is None:
        return None
    return (A.visible_per_row(mask) > 0)[:, None, :, None]


@pytest.mark.parametrize("case,provider", ATTN_AGREE, ids=[_pair_id(p) for p in ATTN_AGREE])
def test_attention_provider_agrees_with_reference(case, provider):
    """Output (rows that see a key), loss and q/k/v gradients against the reference in float64."""
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    ref_inputs = {
        k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
    }
    rtol, atol = TOL[case.dtype]
    if case.mode == "fwd":
        with torch.no_grad():
            out = provider.fn(**inputs)
            ref = case.provider("reference").fn(**ref_inputs)
        seen = _attention_seen(inputs)
        if seen is not None:
            out, ref = torch.where(seen, out, 0), torch.where(seen, ref, 0)
        torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol)
        return
    out = provider.fn(**inputs)
    out.backward()
    ref = case.provider("reference").fn(**ref_inputs)
    ref.backward()
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=rtol, atol=atol * inputs["q"].numel() ** 0.5)
    for name in ("q", "k", "v"):
        torch.testing.assert_close(inputs[name].grad.double(), ref_inputs[name].grad, rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad of {name}: {m}")


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


def test_attention_cases_match_the_issue():
    """The GPU suite has the issue's layouts and shapes, each forward and forward + backward, plus the
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
    assert (rec["status"], rec["reason"]) == ("skipped", "mmkernels.multimodal_attention not available")
    bwd = A.attention_case("causal", 1, 2, 32, 16, "float32", "cpu", "fwd+bwd", "pytest")
    assert "NotImplementedError" in harness.preflight(bwd, bwd.provider("flex"), harness.RunOptions())
    blip = A.attention_case("blip2_itg:4+12", 2, 2, 16, 16, "float32", "cpu", "fwd", "pytest")
    assert "causal" in harness.preflight(blip, blip.provider("sdpa_flash"), harness.RunOptions())


def test_attention_cli_writes_report(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "run"
    rc = main(["--profile", "pytest", "--device", "cpu", "--family", "attention", "--providers", "sdpa_flash,dense",
               "--size", "S=32", "--no-isolate", "--no-plot", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    ops = {(r["op"], r["mode"]) for r in res if r["status"] == "ok"}
    assert ops == {(A.OP_FWD, "fwd"), (A.OP_BWD, "fwd+bwd"), (A.OP_MASK, "fwd")}
    assert all(r["tflops"] and r["flops"] for r in res if r["status"] == "ok" and r["op"] != A.OP_MASK)
    md = (out / "results.md").read_text()
    assert "attention_fwd_bwd (fwd+bwd; FLOPs = 2.5*4*visible*D*H)" in md and "llava:10" in md


# --------------------------------------------------------------------------
# The experts family
# --------------------------------------------------------------------------

from bench.cases import experts as X  # noqa: E402

EXPERTS_AGREE = [(c, p) for c, p in PAIRS if c.family == "experts"]
# max |provider - oracle| <= tol * max |oracle| per tensor (gradients of weights sum over many tokens)
EXPERTS_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def _experts_oracle(case, provider):
    """The provider that defines the function, evaluated in float64: mmkernels' reference where it
    imports (and is not the provider under test), else the boolean-mask loop (CogVLM's, or ``masked``
    for the LayerNorm), or torchscale's split (the sub-LN FFN, on a split layout)."""
    ref = case.provider("reference")
    if provider.name != "reference" and harness.preflight(case, ref, harness.RunOptions()) is None:
        return ref
    names = {p.name for p in case.providers}
    return case.provider(next(n for n in ("cogvlm", "masked", "torchscale") if n in names))


def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol} x max |oracle| {scale:.3g}"


@pytest.mark.parametrize("case,provider", EXPERTS_AGREE, ids=[_pair_id(p) for p in EXPERTS_AGREE])
def test_experts_provider_agrees_with_reference(case, provider):
    """Loss and the gradients of x, weights and biases against the reference in float64 (dense: against
    the reference with every token on expert 0, the one function it computes)."""
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)
    oracle = _experts_oracle(case, provider)
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    out = provider.fn(**inputs)
    out.backward()
    ref_inputs = {
        k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
        for k, v in inputs.items()
    }
    if provider.name == X.SPEED_OF_LIGHT:
        ref_inputs["ctx"] = inputs["ctx"].all_on_expert0()
    ref = oracle.fn(**ref_inputs)
    ref.backward()
    tol = EXPERTS_TOL[case.dtype]
    n = inputs["dout"].numel()
    assert abs(out.item() - ref.item()) <= tol * max(abs(ref.item()), n**0.5), (out.item(), ref.item(), oracle.name)
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.requires_grad:
            _close(v.grad, ref_inputs[name].grad, tol, f"grad of {name} (oracle {oracle.name})")


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


def test_experts_cases_match_the_issue():
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
def test_experts_cli_writes_report(tmp_path):
    """The CLI runs the family at the pytest profile (mmkernels rows may be skips until the op lands) and
    the report has the routing-overhead table."""
    from bench.__main__ import main

    out = tmp_path / "run"
    rc = main(["--profile", "pytest", "--device", "cpu", "--family", "experts", "--providers",
               "mmkernels,cogvlm,torchscale,dense", "--size", "B=1", "--no-isolate", "--no-plot", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert {r["op"] for r in res if r["status"] == "ok"} == {X.OP_FFN, X.OP_LINEAR, "modality_ffn_frozen",
                                                             "modality_layer_norm", "modality_ffn_subln"}
    assert all(r["status"] in ("ok", "skipped") for r in res), [r for r in res if r["status"] == "error"]
    assert all(r["tflops"] and r["flops"] for r in res if r["status"] == "ok" and r["op"] != "modality_layer_norm")
    assert "**modality_layer_norm: routing overhead**" in (out / "results.md").read_text()
    assert all(r["reason"] for r in res if r["status"] == "skipped")
    md = (out / "results.md").read_text()
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


def test_tune_gpu_smoke(tmp_path, capsys):
    """bench.tune_gpu --smoke runs every sweep once on tiny shapes (interpreter on a CPU), so the
    script works the first time a GPU session runs it."""
    from bench import tune_gpu
    if torch.cuda.is_available():
        pytest.skip("smoke mode is for machines without a GPU (on a GPU, run the real sweep)")
    out, env_out = tmp_path / "tune.md", tmp_path / "tuned.env"
    assert tune_gpu.main(["--smoke", "--out", str(out), "--env-out", str(env_out)]) == 0
    text = out.read_text()
    for title in ("one_pass", "two_pass", "forward kernel", "varying bwd_dkdv", "varying bwd_dq",
                  "cross_attention BLIP-2", "cross_attention CoCa pooler", "pairs per program",
                  "experts weight gradient", "token chunks", "ffn_bwd_dh tiles", "ffn_bwd_dx tiles",
                  "cuBLAS `torch.mm`", "CogVLM MLP swiglu", "ffn_fwd_in swiglu tiles",
                  "ffn_bwd_dh swiglu tiles"):
        assert title in text, title
    assert "error:" not in text, text
    # the fastest configs as settings the experts launchers accept
    settings = dict(line.split("=", 1) for line in env_out.read_text().splitlines())
    assert set(settings) == {"MMKERNELS_EXPERTS_CONFIGS", "MMKERNELS_EXPERTS_WGRAD_CHUNK"}, settings
    from bench.harness import scoped_env
    from mmkernels.experts import kernels as K
    with scoped_env(K.CONFIGS_ENV, settings["MMKERNELS_EXPERTS_CONFIGS"]):
        tuned = K.config_overrides()
    assert set(tuned) == {"wgrad_ffn_in", "ffn_fwd_in", "ffn_fwd_out", "ffn_bwd_dh", "ffn_bwd_dx"}, tuned
    with scoped_env(K.WGRAD_CHUNK_ENV, settings["MMKERNELS_EXPERTS_WGRAD_CHUNK"]):
        K.wgrad_chunk_setting()


def test_profile_gpu_case_selection():
    """gpu_check passes GPU_CHECK_FAMILIES to bench.profile_gpu as ``--case``: the experts run
    profiles the VLMo FFN (chunked and not) and the CogVLM MLP, and nothing else."""
    from bench import profile_gpu
    experts = profile_gpu.selected_cases(["experts"])
    assert len(experts) == 3 and all(n.startswith("experts") for n in experts)
    assert any("CogVLM MLP" in n for n in experts)
    both = profile_gpu.selected_cases(["experts,contrastive"])
    assert set(experts) < set(both) and any(n.startswith("contrastive") for n in both)
    assert profile_gpu.selected_cases(None) == list(profile_gpu.CASES)


# ----------------------------------------------------------------------------- cross_attention: Q-Former step

from bench.cases import cross_attention as XA  # noqa: E402

QFORMER_AGREE = [(c, p) for c, p in PAIRS
                 if c.family == XA.FAMILY and c.op == XA.OP_QFORMER and p.name != XA.oracle_name(c)]


@pytest.mark.parametrize("case,provider", QFORMER_AGREE, ids=[_pair_id(p) for p in QFORMER_AGREE])
def test_qformer_provider_agrees_with_hf_eager(case, provider):
    """Each Q-Former provider (mmkernels.QFormer, patched HF, HF sdpa) against HF eager in float64
    (eval mode): output and the gradients of the inputs and every parameter."""
    reason = harness.preflight(case, provider, harness.RunOptions())
    if reason:
        pytest.skip(reason)
    XA.agree(case, provider.name)



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
