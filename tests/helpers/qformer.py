"""Tiny random HF Q-Formers (BLIP-2, InstructBLIP) and the comparison helpers shared by
tests/models/test_qformer.py and tests/integrations/test_blip2.py. Nothing is downloaded."""
from __future__ import annotations

import torch

B, Q, T, LK = 2, 32, 8, 10         # batch, query tokens, text tokens, image tokens
WIDTH, IMAGE_WIDTH, VOCAB = 128, 96, 50
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=5e-5, rtol=5e-5)}

_SIZES = dict(hidden_size=WIDTH, num_attention_heads=2, intermediate_size=256, num_hidden_layers=4,
              cross_attention_frequency=2, encoder_hidden_size=IMAGE_WIDTH)


def blip2_config(impl="eager", **over):
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(**{**_SIZES, "use_qformer_text_input": True, "attn_implementation": impl, **over})


def instructblip_config(impl="eager", **over):
    from transformers import InstructBlipQFormerConfig

    return InstructBlipQFormerConfig(**{**_SIZES, "vocab_size": VOCAB, "max_position_embeddings": 64,
                                        "attn_implementation": impl, **over})


def _randomised(model, dtype):
    """``model`` in ``dtype``, eval mode, with non-trivial LayerNorm parameters and biases."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_blip2(dtype=torch.float64, impl="eager", seed=0, **over):
    """A random ``Blip2QFormerModel`` (4 layers, 2 of them cross-attending; text FFN)."""
    from transformers import Blip2QFormerModel

    torch.manual_seed(seed)
    return _randomised(Blip2QFormerModel(blip2_config(impl, **over)), dtype)


def make_instructblip(dtype=torch.float64, impl="eager", seed=0, **over):
    """A random ``InstructBlipQFormerModel`` of the same sizes, vocabulary ``VOCAB`` (pad id 0)."""
    from transformers import InstructBlipQFormerModel

    torch.manual_seed(seed)
    return _randomised(InstructBlipQFormerModel(instructblip_config(impl, **over)), dtype)


def make_inputs(dtype, s=Q + T, seed=1):
    """Query (+ text) embeddings ``[B, s, WIDTH]``, image features ``[B, LK, IMAGE_WIDTH]`` and an
    upstream gradient ``[B, s, WIDTH]``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, s, WIDTH, generator=g, dtype=dtype),
            torch.randn(B, LK, IMAGE_WIDTH, generator=g, dtype=dtype),
            torch.randn(B, s, WIDTH, generator=g, dtype=dtype))


def instruction(seed=2, padded=3):
    """Instruction ids ``[B, T]`` and the ``[B, Q + T]`` attention mask InstructBLIP builds (queries
    always attend); the second instruction is ``padded`` tokens shorter, padded with id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, Q + T, dtype=torch.long)
    if padded:
        ids[1, T - padded:] = 0
        mask[1, Q + T - padded:] = 0
    return ids, mask


def additive(keep: torch.Tensor, dtype) -> torch.Tensor:
    """HF eager's float mask: 0 where kept, finfo.min where masked."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def hf_fn(hf, **kw):
    """``(x, e) -> last_hidden_state`` of an HF BLIP-2 Q-Former called with ``x`` as its input."""
    return lambda x, e: hf(x, encoder_hidden_states=e, **kw).last_hidden_state


def run_grads(fn, model, x, e, up, rows=None):
    """Output of ``fn(x, e)`` and the gradients of ``(output * up).sum()`` w.r.t. x, e and every
    parameter of ``model`` (``rows`` zeroes output rows left out of the comparison)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    e = e.clone().requires_grad_()
    out = fn(x, e)
    if rows is not None:
        out = out * rows
    (out * up).sum().backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return out.detach(), x.grad, e.grad, grads


def assert_same(a, b, dtype):
    """Two ``run_grads`` results agree within ``TOL[dtype]``, parameter by parameter."""
    for name, t_a, t_b in zip(("output", "grad of x", "grad of e"), a[:3], b[:3]):
        if t_a is None or t_b is None:
            assert t_a is None and t_b is None, name
        else:
            torch.testing.assert_close(t_a, t_b, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    assert a[3].keys() == b[3].keys()
    for n in a[3]:
        if a[3][n] is None or b[3][n] is None:
            assert a[3][n] is None and b[3][n] is None, n
        else:
            torch.testing.assert_close(a[3][n], b[3][n], **TOL[dtype], msg=lambda m: f"{n}: {m}")


def assert_seeded_dropout(forward, x):
    """``forward(x)`` in training mode depends on the RNG seed only: the same seed gives the same
    output and gradient of ``x``, another seed another output; everything finite."""
    def run(seed):
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        out = forward(xx)
        out.square().sum().backward()
        return out.detach(), xx.grad

    a, ga = run(0)
    b, gb = run(0)
    c, _ = run(1)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all() and torch.isfinite(ga).all()
