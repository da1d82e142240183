"""The benchmark harness itself: the CLI's files, CPU and (faked) CUDA measurement, skips, the
report's ratios, and the GPU helper scripts' CPU modes."""
import pytest
import torch

from bench import harness, report
from bench.cases import contrastive as C


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


def test_cli_writes_json_md_png(bench_cli):
    doc, md, out = bench_cli("--family", "contrastive", "--providers", "reference", "--size", "N=64,128",
                             "--size", "D=32")
    for key in ("device_name", "torch", "triton", "python", "git_commit", "date"):
        assert key in doc["env"]
    res = doc["results"]
    ran = [r for r in res if r["provider"] == "reference"]
    assert ran and all(r["status"] == "ok" and r["time_ms"] > 0 for r in ran)
    assert any(r["rate_probe"] and r["status"] == "ok" for r in res)
    skipped = [r for r in res if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)
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


def test_tune_gpu_smoke(tmp_path, capsys):
    """bench.tune_gpu --smoke runs every sweep once on tiny shapes (interpreter on a CPU), so the
    script works the first time it runs on a GPU; ``--save`` writes a tuning file that loads."""
    from bench import tune_gpu
    from mmkernels import tuning
    if torch.cuda.is_available():
        pytest.skip("smoke mode is for machines without a GPU (on a GPU, run the real sweep)")
    out, saved = tmp_path / "tune.md", tmp_path / "tuned.json"
    assert tune_gpu.main(["--smoke", "--out", str(out), "--save", str(saved)]) == 0
    text = out.read_text()
    for title in ("one_pass", "two_pass", "forward kernel", "varying bwd_dkdv", "varying bwd_dq",
                  "cross_attention BLIP-2", "cross_attention CoCa pooler", "pairs per program",
                  "experts weight gradient", "token chunks", "ffn_bwd_dh tiles", "ffn_bwd_dx tiles",
                  "cuBLAS `torch.mm`", "CogVLM MLP swiglu", "ffn_fwd_in swiglu tiles",
                  "ffn_bwd_dh swiglu tiles"):
        assert title in text, title
    assert "error:" not in text, text
    # the fastest configs as a tuning file the experts launchers read
    with tuning.scope():
        tuning.reset()
        tuning.load(str(saved))
        kinds = {e["kind"] for e in tuning.to_dict()["configs"]}
        assert kinds == {"wgrad_ffn_in", "ffn_fwd_in", "ffn_fwd_out", "ffn_bwd_dh", "ffn_bwd_dx"}, kinds
        for kind in kinds:
            assert tuning.lookup("experts", kind, dtype=torch.bfloat16) is not None, kind
        assert "experts.wgrad_chunk" in tuning.to_dict()["options"]


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
