"""GPU tier of the experts family (pytest -m gpu; skipped without CUDA).

The routing must live on the device: a captured CUDA graph replayed with *new* modality ids
(other token counts per expert) must give the eager results for those ids, and torch.compile
must run the Triton path without graph breaks.
"""
from __future__ import annotations

import pytest
import torch

import mmkernels
from tests.experts.cases import ACTS, ffn_params, make_ids, names, randn, run
from mmkernels import tuning
from mmkernels.experts.grouped_mm.kernels import configs as C
from mmkernels.testing.cuda_graph import capture, sync_free
from mmkernels.testing.numerics import assert_close

pytestmark = pytest.mark.gpu


def _leaves(ts, dtype):
    return [None if t is None else t.to("cuda", dtype).requires_grad_() for t in ts]


@pytest.mark.parametrize("chunk", ["auto", "256"])
@pytest.mark.parametrize("activation", ACTS)
def test_wide_tiles_match_the_reference(activation, chunk):
    """The compiled 16-bit tiles the GPU runs at real widths: 128 x 128 with the epilogue in
    four column slices for the activation launches (swiglu's forward pairing gate and up
    columns), 128 x 128 elsewhere, the 5-stage weight gradient, one program per dW tile (auto:
    these sizes need no chunks) or in chunks of 256 tokens summed with fp32 atomics. bf16,
    3 experts with ragged token counts, every gradient, against the float64 reference (the CPU
    tests interpret these tiles; this runs the sm_90 code)."""
    b, s, h, f = 3, 331, 256, 384
    dtype = torch.bfloat16
    for kind, n in (("ffn_fwd_in", f), ("ffn_bwd_dh", f)):
        cfg = C.heuristic_config(kind, dtype, "tf32", activation == "swiglu", n, True)
        assert (cfg.BLOCK_N, cfg.epilogue_split) == (128, 4), cfg
    x = randn(b, s, h, seed=61).cuda()
    ids = make_ids((b, s), 3, seed=62).cuda()
    params = [None if p is None else p.cuda() for p in ffn_params(3, h, f, h, activation, bias=True)]
    dy = randn(b, s, h, seed=63).cuda()
    with tuning.scope():
        tuning.set_option(C.WGRAD_CHUNK_OPTION, chunk)
        got = run("ffn", "triton", x, ids, params, dy, activation, dtype)
    ref = run("ffn", "reference", x, ids, params, dy, activation, torch.float64)
    eager = run("ffn", "reference", x, ids, params, dy, activation, dtype)
    for name, g, r, e in zip(names("ffn"), got, ref, eager):
        assert_close(g, r, dtype, eager=e, name=f"{activation} {name}")


def test_cuda_graph_replay_follows_new_modality_ids():
    b, s, h, f = 4, 300, 256, 512
    dtype = torch.bfloat16
    x = randn(b, s, h, seed=1).to("cuda", dtype).requires_grad_()
    params = _leaves(ffn_params(2, h, f, h, "gelu", bias=True), dtype)
    ids = make_ids((b, s), 2, seed=2).cuda()
    dy = randn(b, s, h, seed=3).to("cuda", dtype)
    leaves = [x] + params  # all four parameters present (bias=True)

    def step():
        y = mmkernels.modality_ffn(x, ids, *params, activation="gelu")
        return (y, *torch.autograd.grad(y, leaves, dy))

    graph, static_out = capture(step)

    for seed, layout in ((5, "random"), (6, "one"), (7, "empty")):
        new_ids = make_ids((b, s), 2, layout=layout, seed=seed).cuda()
        ids.copy_(new_ids)
        with torch.no_grad():
            x.copy_(randn(b, s, h, seed=seed + 10).to("cuda", dtype))
        graph.replay()
        torch.cuda.synchronize()
        expect = step()  # eager, same ids and inputs
        for name, got, ref in zip(["y", "dx", "dw_in", "db_in", "dw_out", "db_out"], static_out, expect):
            # the same kernels on the same data: equal up to accumulation order
            assert_close(got.float(), ref.double(), dtype, name=f"{layout} {name}")


@pytest.mark.parametrize("form", ["ids", "split"])
def test_torch_compile_triton_path_no_graph_break(form):
    """fullgraph=True through the routing kernels launched from Python (the counting sort for
    ids, the one-launch position split) and the registered ops."""
    b, s, h, f = 2, 200, 128, 256
    dtype = torch.bfloat16
    x = randn(b, s, h, seed=11).to("cuda", dtype).requires_grad_()
    params = _leaves(ffn_params(2, h, f, h, "swiglu", bias=False), dtype)
    ids = make_ids((b, s), 2, seed=12).cuda() if form == "ids" else 37

    def f_(x, ids, w_in, b_in, w_out, b_out):
        return mmkernels.modality_ffn(x, ids, w_in, b_in, w_out, b_out, activation="swiglu")

    compiled = torch.compile(f_, fullgraph=True)
    out = compiled(x, ids, *params)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in [x, params[0], params[2]]]
    for t in [x, params[0], params[2]]:
        t.grad = None
    ref = f_(x, ids, *params)
    ref.float().square().sum().backward()
    assert_close(out.float(), ref.double(), dtype, name="y")
    for g, t in zip(grads, [x, params[0], params[2]]):
        assert_close(g.float(), t.grad.double(), dtype, name="grad")


def test_cuda_graph_capture_of_the_split_form():
    """The position-split routing builds its permutation and offsets inside the capture (no host
    copies, which a graph cannot hold); replays follow new inputs."""
    b, s, h, f = 4, 200, 128, 256
    dtype = torch.bfloat16
    x = randn(b, s, h, seed=51).to("cuda", dtype).requires_grad_()
    params = _leaves(ffn_params(2, h, f, h, "gelu", bias=True), dtype)
    dy = randn(b, s, h, seed=52).to("cuda", dtype)
    leaves = [x] + params

    def step():
        y = mmkernels.modality_ffn(x, 37, *params, activation="gelu")
        return (y, *torch.autograd.grad(y, leaves, dy))

    graph, static_out = capture(step)
    with torch.no_grad():
        x.copy_(randn(b, s, h, seed=53).to("cuda", dtype))
    graph.replay()
    torch.cuda.synchronize()
    for got, ref in zip(static_out, step()):
        assert_close(got.float(), ref.double(), dtype)


def _sync_free_step(module, x, ids, dy, autocast=False):
    """``module(x, ids)`` forward and backward from fresh gradients, checked for host
    synchronisation (:func:`sync_free`), optionally under bf16 autocast; returns the output."""
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            y = module(x, ids)
        y.backward(dy)
        return y
    return sync_free(step)


def test_autocast_with_fp32_parameters_is_sync_free_and_matches_bf16_weights():
    """Mixed-precision training: fp32 parameters under ``torch.autocast("cuda", bfloat16)`` run
    the bf16 kernels (no host synchronisation, casts included) and give what the same module
    with bf16 weights gives, gradients returned to the fp32 parameters in fp32."""
    torch.manual_seed(61)
    fused = mmkernels.MultiwayFFN(256, 384, num_experts=2, activation="swiglu").cuda()
    low = mmkernels.MultiwayFFN(256, 384, num_experts=2, activation="swiglu").cuda().bfloat16()
    low.load_state_dict(fused.state_dict())
    ids = make_ids((3, 150), 2, seed=62).cuda()
    x = randn(3, 150, 256, seed=63).to("cuda", torch.float32).requires_grad_()
    xl = x.detach().bfloat16().requires_grad_()
    dy = randn(3, 150, 256, seed=64).to("cuda", torch.bfloat16)
    y = _sync_free_step(fused, x, ids, dy, autocast=True)
    y_low = low(xl, ids)
    y_low.backward(dy)
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32
    assert_close(y.float(), y_low.double(), torch.bfloat16, name="y")
    assert_close(x.grad, xl.grad.double(), torch.bfloat16, name="dx")
    for (name, p), q in zip(fused.named_parameters(), low.parameters()):
        assert p.grad.dtype == torch.float32, name
        assert_close(p.grad, q.grad.double(), torch.bfloat16, name=name)


def test_per_expert_parameters_with_a_frozen_expert_are_sync_free():
    """CogVLM-style training on the GPU: per-expert parameters (one storage, read in place), the
    language expert frozen; no host synchronisation, and the stacked layout's results."""
    torch.manual_seed(71)
    m = mmkernels.MultiwayFFN(256, 384, num_experts=2, activation="swiglu", bias=False,
                              per_expert_parameters=True).cuda().bfloat16()
    for p in (m.w_in[0], m.w_out[0]):
        p.requires_grad_(False)
    stacked = mmkernels.MultiwayFFN(256, 384, num_experts=2, activation="swiglu", bias=False).cuda().bfloat16()
    with torch.no_grad():
        stacked.w_in.copy_(torch.stack(list(m.w_in)))
        stacked.w_out.copy_(torch.stack(list(m.w_out)))
    ids = make_ids((3, 150), 2, seed=72).cuda()
    x = randn(3, 150, 256, seed=73).to("cuda", torch.bfloat16)
    dy = randn(3, 150, 256, seed=74).to("cuda", torch.bfloat16)
    y = _sync_free_step(m, x, ids, dy)
    y2 = stacked(x, ids)
    y2.backward(dy)
    assert torch.equal(y, y2)
    assert m.w_in[0].grad is None and m.w_out[0].grad is None
    # the weight gradient may sum token chunks with atomics: equal up to summation order
    assert_close(m.w_in[1].grad, stacked.w_in.grad[1].double(), torch.bfloat16, name="w_in[1]")
    assert_close(m.w_out[1].grad, stacked.w_out.grad[1].double(), torch.bfloat16, name="w_out[1]")


def test_expert_without_tokens_gets_no_gradient_without_host_sync():
    """Per-expert parameters and a split position that leaves expert 1 without tokens: no host
    synchronisation (the decision reads the Python int), and expert 1 gets no gradient."""
    torch.manual_seed(71)
    module = mmkernels.MultiwayFFN(256, 384, per_expert_parameters=True, subln=True).cuda().bfloat16()
    x = randn(4, 300, 256, seed=72).to("cuda", torch.bfloat16).requires_grad_()
    dy = randn(4, 300, 256, seed=73).to("cuda", torch.bfloat16)
    _sync_free_step(module, x, 300, dy)
    for name, p in module.named_parameters():
        assert (p.grad is None) == name.endswith(".1"), name
