"""Where the GPU time of one mmkernels call goes: a kernel table per case (torch.profiler).

    python -m bench.profile_gpu [--out FILE]      # on a CUDA machine

For each case it warms up, then profiles a few forward+backward calls and prints the CUDA
kernels sorted by total device time, the number of kernel launches per call, and the wall time
per call against the summed kernel time (a wall time far above the kernel time means the call
is bound by host-side launches, not by the kernels). Use it to decide what to tune; the bench
suite remains the record of speed.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from mmkernels import tuning


def _contrastive(n: int, d: int, forward: str = "one_pass"):
    import mmkernels
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1)
    b = torch.nn.functional.normalize(a + 0.3 * torch.randn(n, d, device="cuda", generator=g), dim=-1)
    a = a.to(torch.bfloat16).requires_grad_()
    b = b.to(torch.bfloat16).requires_grad_()
    s = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)

    def step():
        mmkernels.contrastive_loss(a, b, s).backward()
    return _with_option("contrastive.forward", forward, step)


def _attention(layout: str, b: int, h: int, s: int, d: int):
    import mmkernels
    from mmkernels import MultimodalMask
    if layout == "causal":
        mask = MultimodalMask.causal(b, s, device="cuda")
    else:  # BLIP-2 ITG: 32 queries + (s - 32) text tokens
        mask = MultimodalMask.blip2(32, torch.full((b,), s - 32), s - 32, objective="itg").to("cuda")
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))

    def step():
        mmkernels.multimodal_attention(q, k, v, mask).sum().backward()
    return step


def _with_option(name: str, value: str | None, step):
    """``step`` run with the :mod:`mmkernels.tuning` option ``name`` set to ``value`` (None: as it is)."""

    def wrapped():
        with tuning.scope():
            if value is not None:
                tuning.set_option(name, value)
            step()
    return wrapped


def _experts_cogvlm_mlp():
    """CogVLM's visual-expert MLP, as the bench's cogvlm:1226+300 case: B=4 sequences of [BOS] +
    1226 image tokens (expert 1) + 299 text tokens, H 4096, swiglu F 11008, no biases, bf16."""
    import mmkernels
    from bench.cases.experts import layout_ids
    b, hdim, f = 4, 4096, 11008
    ids = layout_ids("cogvlm:1226+300", b, "cuda")
    x = torch.randn(b, ids.shape[1], hdim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w_in = (0.02 * torch.randn(2, 2 * f, hdim, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    w_out = (0.02 * torch.randn(2, hdim, f, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    dout = torch.randn_like(x)
    leaves = (x, w_in, w_out)

    def step():
        for p in leaves:
            p.grad = None
        y = mmkernels.modality_ffn(x, ids, w_in, None, w_out, None, activation="swiglu")
        (y * dout).sum(dtype=torch.float32).backward()
    return step


def _experts(wgrad_chunk: str | None = None):
    import mmkernels
    t, hdim, f = 64 * 237, 768, 3072
    x = torch.randn(64, 237, hdim, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w_in = (0.02 * torch.randn(2, f, hdim, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    w_out = (0.02 * torch.randn(2, hdim, f, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    b_in = torch.zeros(2, f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b_out = torch.zeros(2, hdim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(64, 237, hdim, device="cuda", dtype=torch.bfloat16)
    assert t == x.shape[0] * x.shape[1]
    leaves = (x, w_in, b_in, w_out, b_out)

    def step():  # as the bench times it: loss = sum(out * dout), gradients not accumulated
        for p in leaves:
            p.grad = None
        y = mmkernels.modality_ffn(x, 40, w_in, b_in, w_out, b_out)
        (y * dout).sum(dtype=torch.float32).backward()
    return _with_option("experts.wgrad_chunk", wgrad_chunk, step)


def _cross_attention(b: int, lk: int):
    import mmkernels
    q = torch.randn(b, 12, 32, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    kv = torch.randn(b, lk, 2, 12, 64, device="cuda", dtype=torch.bfloat16).requires_grad_()
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def step():
        mmkernels.cross_attention(q, k, v).sum().backward()
    return step


def _qformer(b: int):
    """A BLIP-2 Q-Former step (12 layers, 32 queries + 32 text tokens, 257 image tokens), bf16."""
    import mmkernels
    from types import SimpleNamespace
    cfg = SimpleNamespace(hidden_size=768, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
                          num_hidden_layers=12, cross_attention_frequency=2, encoder_hidden_size=1408,
                          layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          use_qformer_text_input=True)
    model = mmkernels.QFormer(cfg).to("cuda", torch.bfloat16)
    x = torch.randn(b, 64, 768, device="cuda", dtype=torch.bfloat16).requires_grad_()
    image = torch.randn(b, 257, 1408, device="cuda", dtype=torch.bfloat16).requires_grad_()

    def step():
        model(x, image, query_length=32).float().sum().backward()
    return step


CASES = {
    "contrastive N=4096 D=768": lambda: _contrastive(4096, 768),
    "contrastive N=32768 D=768": lambda: _contrastive(32768, 768),
    "contrastive N=32768 D=768 two-pass forward": lambda: _contrastive(32768, 768, "two_pass"),
    "attention blip2_itg B=128 H=12 S=160 D=64": lambda: _attention("blip2", 128, 12, 160, 64),
    "attention causal B=2 H=16 S=8192 D=128": lambda: _attention("causal", 2, 16, 8192, 128),
    "experts VLMo FFN B=64 40+197 768/3072 (wgrad chunks: auto)": _experts,
    "experts VLMo FFN, one wgrad program per dW tile (chunk 0)": lambda: _experts("0"),
    "experts CogVLM MLP B=4 1226+300 4096/11008 swiglu": _experts_cogvlm_mlp,
    "cross_attention BLIP-2 B=128 H=12 Lq=32 Lk=257 D=64": lambda: _cross_attention(128, 257),
    "qformer step B=128 32+32 tokens, 257 image tokens": lambda: _qformer(128),
}


def profile_case(name: str, make, calls: int = 3, top: int = 12) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    step = make()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(ev, "cuda_time_total", 0)
        if dev_us > 0 and ev.count > 0:
            rows.append((dev_us / calls, ev.count / calls, ev.key))
    rows.sort(reverse=True)
    kernel_ms = sum(r[0] for r in rows) / 1e3
    launches = sum(r[1] for r in rows)
    out = [f"## {name}",
           f"wall {wall_ms:.3f} ms/call | kernels {kernel_ms:.3f} ms/call | {launches:.0f} kernel launches/call",
           "| device us/call | launches/call | kernel |", "| ---: | ---: | --- |"]
    for us, n, key in rows[:top]:
        out.append(f"| {us:.1f} | {n:.0f} | {key[:110]} |")
    if wall_ms > 1.5 * kernel_ms:  # bound by the host: where does the Python time go?
        out += ["", f"Host-bound: Python functions by own time (cProfile, totals over {calls} calls):", "```"]
        out += _host_profile(step, calls)
        out += ["```"]
    return out + [""]


def _host_profile(step, calls: int, top: int = 15) -> list[str]:
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return [ln[:160] for ln in lines[start:start + top + 1]]


def selected_cases(case_args: list[str] | None) -> list[str]:
    """The names of ``CASES`` that contain one of the substrings given (``--case`` values, each
    possibly comma-separated, as gpu_check passes ``GPU_CHECK_FAMILIES``); all when none."""
    wanted = [c.strip() for arg in (case_args or []) for c in arg.split(",") if c.strip()]
    return [name for name in CASES if not wanted or any(c in name for c in wanted)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the tables to this file")
    ap.add_argument("--case", action="append", help="substring of a case name (default: all); "
                                                    "repeat it, or give several comma-separated")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu: no CUDA device", file=sys.stderr)
        return 1
    lines = [f"# mmkernels kernel profile: {torch.cuda.get_device_name()}", ""]
    for name in selected_cases(args.case):
        make = CASES[name]
        try:
            new = profile_case(name, make)
        except Exception as exc:  # one failing case must not hide the others
            new = [f"## {name}", f"error: {type(exc).__name__}: {exc}", ""]
        torch.cuda.empty_cache()
        lines += new
        print("\n".join(new), flush=True)
        if args.out:  # after every case: a run cut short by a time limit keeps what it profiled
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
