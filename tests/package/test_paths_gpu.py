"""Every dispatch path forced on the device against the float64 reference, forward and backward,
with no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``), and ``auto`` on the
device's table rows. The ``gpu`` tests run on CUDA in bf16 (``bench/gpu_check.sh``); the same
checks run here on the CPU for the paths that serve CPU tensors, in float32, so the checks
themselves are tested where no GPU is lent.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import mmkernels
from mmkernels import MultimodalMask
from mmkernels.attention.reference import multimodal_attention_reference
from mmkernels.contrastive.reference import contrastive_loss_reference
from mmkernels.cross_attention.reference import cross_attention_reference
from mmkernels.experts.grouped_mm.reference import modality_ffn_reference
from mmkernels.testing.numerics import assert_close

CUDA = torch.cuda.is_available()


def _rand(*shape, device, dtype, seed, scale=1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)


@contextlib.contextmanager
def _no_sync(device):
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode(0)


def _check(run, reference, inputs: dict, path: str, device: str, *, backward: bool = True, scale=1.0):
    """``run(**inputs)`` with ``path`` forced against ``reference`` on float64 copies: the output
    and, with ``backward``, the gradient of every floating input."""
    with mmkernels.use_path(path):  # a first call compiles (FlexAttention, Triton): not checked for syncs
        run(**{k: v.detach().clone() for k, v in inputs.items()})
    leaves = {k: (v.detach().clone().requires_grad_(backward) if v.is_floating_point() else v)
              for k, v in inputs.items()}
    with mmkernels.use_path(path), mmkernels.explain() as log, _no_sync(device):
        out = run(**leaves)
        if backward:
            out.backward(torch.ones_like(out))
    assert log.paths() and set(log.paths()) == {path}, str(log)
    ref_in = {k: (v.detach().double().cpu().requires_grad_(backward) if v.is_floating_point() else v.cpu())
              for k, v in inputs.items()}
    ref = reference(**ref_in)
    assert_close(out, ref, scale=scale, name=f"{path} output")
    if backward:
        ref.backward(torch.ones_like(ref))
        for k, v in leaves.items():
            if v.is_floating_point():
                assert_close(v.grad, ref_in[k].grad, scale=scale, name=f"{path} grad of {k}")


def _contrastive(device, dtype):
    n, d = 384, 64
    x = {"a": _rand(n, d, device=device, dtype=dtype, seed=1, scale=d ** -0.5),
         "b": _rand(n, d, device=device, dtype=dtype, seed=2, scale=d ** -0.5)}
    return (lambda a, b: mmkernels.contrastive_loss(a, b, 10.0),
            lambda a, b: contrastive_loss_reference(a, b, 10.0), x)


def _attention(device, dtype, mask):
    b, h, s, d = (1 if mask == "packed" else 2), 4, 200, 64
    x = {n: _rand(b, h, s, d, device=device, dtype=dtype, seed=i) for i, n in enumerate("qkv")}
    masks = {"none": None, "causal": MultimodalMask.causal(b, s, device=device),
             "key_padding": MultimodalMask.key_padding(torch.tensor([s, s - 37], device=device), s),
             "packed": MultimodalMask.packed(torch.tensor([0, 60, 130, s - 10], device=device), seq_len=s),
             "blip2": MultimodalMask.blip2(32, torch.tensor([100, 168], device=device), s - 32, objective="itg")}
    m = masks[mask]
    return (lambda q, k, v: mmkernels.multimodal_attention(q, k, v, m),
            lambda q, k, v: multimodal_attention_reference(q, k, v, None if m is None else m.to("cpu")), x)


def _cross_attention(device, dtype):
    x = {"q": _rand(4, 4, 32, 64, device=device, dtype=dtype, seed=0),
         "k": _rand(4, 4, 257, 64, device=device, dtype=dtype, seed=1),
         "v": _rand(4, 4, 257, 64, device=device, dtype=dtype, seed=2)}
    pad = torch.arange(257, device=device)[None, :] < torch.tensor([257, 200, 1, 100], device=device)[:, None]
    return (lambda q, k, v: mmkernels.cross_attention(q, k, v, key_padding_mask=pad),
            lambda q, k, v: cross_attention_reference(q, k, v, pad.cpu()), x)


def _experts(device, dtype, split: bool):
    b, s, h, f = 2, 96, 64, 128
    x = {"x": _rand(b, s, h, device=device, dtype=dtype, seed=0),
         "w_in": _rand(2, f, h, device=device, dtype=dtype, seed=1, scale=h ** -0.5),
         "w_out": _rand(2, h, f, device=device, dtype=dtype, seed=2, scale=f ** -0.5)}
    ids = 40 if split else (torch.arange(b * s, device=device).reshape(b, s) * 7 % 3 == 0).long()
    dense = (torch.arange(s)[None, :].expand(b, s) >= 40).long() if split else ids.cpu()
    return (lambda x, w_in, w_out: mmkernels.modality_ffn(x, ids, w_in, None, w_out, None),
            lambda x, w_in, w_out: modality_ffn_reference(x, dense, w_in, None, w_out, None, "gelu"), x)


def _cases(device, dtype):
    """(id, path, builder) for every path; the CPU run keeps those that serve CPU tensors."""
    cases = [("contrastive", "blockwise", lambda: _contrastive(device, dtype)),
             ("contrastive", "kernel", lambda: _contrastive(device, dtype))]
    for mask in ("none", "causal", "key_padding"):
        cases.append((f"attention-{mask}", "sdpa", lambda m=mask: _attention(device, dtype, m)))
    for mask in ("causal", "packed", "blip2"):
        cases.append((f"attention-{mask}", "flex", lambda m=mask: _attention(device, dtype, m)))
    cases.append(("attention-packed", "varlen", lambda: _attention(device, dtype, "packed")))
    cases.append(("cross_attention", "sdpa", lambda: _cross_attention(device, dtype)))
    cases.append(("experts-split", "batched", lambda: _experts(device, dtype, True)))
    cases.append(("experts-ids", "grouped_mm", lambda: _experts(device, dtype, False)))
    return cases


CPU_CASES = [c for c in _cases("cpu", torch.float32)
             if (c[1], c[0].split("-")[0]) not in {("flex", "attention"), ("varlen", "attention"),
                                                   ("grouped_mm", "experts")}]


@pytest.mark.parametrize("name,path,build", CPU_CASES, ids=[f"{c[0]}-{c[1]}" for c in CPU_CASES])
def test_paths_on_cpu(name, path, build):
    run, ref, inputs = build()
    _check(run, ref, inputs, path, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("name,path,build", _cases("cuda", torch.bfloat16),
                         ids=[f"{c[0]}-{c[1]}" for c in _cases("cuda", torch.bfloat16)])
def test_paths_on_gpu(name, path, build):
    run, ref, inputs = build()
    _check(run, ref, inputs, path, "cuda", scale=2.0)


@pytest.mark.gpu
def test_auto_on_gpu_runs_a_table_path_without_sync():
    for name, _path, build in _cases("cuda", torch.bfloat16):
        run, ref, inputs = build()
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        run(**leaves).sum().backward()  # compiles what auto runs, outside the sync check
        leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        with mmkernels.explain() as log, _no_sync("cuda"):
            out = run(**leaves)
            out.backward(torch.ones_like(out))
        assert log.paths() and "reference" not in log.paths(), (name, str(log))
        assert torch.isfinite(out).all(), name
