"""apply_mmkernels: one call on tiny HF models built from configs (nothing downloaded) and on the
torchscale stand-in encoder.

Each model must compute, once patched, what it computed before (against the unpatched model in
float64, within twice the unpatched float32 model's own error), report what it switched and what
it left alone, actually run mmkernels' ops (``mmkernels.explain``), and after undo compute exactly
what it computed before, with no patch left behind.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mmkernels
from mmkernels.integrations import MultiwayAdapter, hf_apply
from mmkernels.integrations import transformers as integ
from mmkernels.integrations.transformers import ApplyReport, apply_mmkernels, unapply_mmkernels
from mmkernels.testing.numerics import assert_close
from tests.helpers.peer_models import TorchscaleEncoder

try:
    import transformers
except ImportError:  # the HF tests skip; the torchscale one runs
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

IMG = 63  # the image placeholder token of the LLaVA / BLIP-2 / Gemma 3 / PaliGemma configs
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8)  # 4 patches
GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64)


def _randomised(model):
    """Eval mode, float32, with LayerNorm / RMSNorm weights and biases away from their init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def make_llama():
    torch.manual_seed(0)
    return _randomised(transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)))


def make_llava():
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION),
                                   text_config=transformers.LlamaConfig(**LLAMA), image_token_index=IMG)
    torch.manual_seed(0)
    return _randomised(transformers.LlavaForConditionalGeneration(cfg))


def make_blip2():
    cfg = transformers.Blip2Config(
        vision_config=dict(VISION),
        qformer_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                            cross_attention_frequency=1, encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                         num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64),
        num_query_tokens=4, image_token_index=IMG)
    torch.manual_seed(0)
    return _randomised(transformers.Blip2ForConditionalGeneration(cfg))


def make_paligemma():
    cfg = transformers.PaliGemmaConfig(text_config=dict(model_type="gemma", **GEMMA), vision_config=dict(VISION),
                                       image_token_index=IMG, projection_dim=32)
    torch.manual_seed(0)
    return _randomised(transformers.PaliGemmaForConditionalGeneration(cfg))


def make_gemma3():
    cfg = transformers.Gemma3Config(text_config=dict(GEMMA, sliding_window=64), vision_config=dict(VISION),
                                    mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=61,
                                    eoi_token_index=62)
    torch.manual_seed(0)
    return _randomised(transformers.Gemma3ForConditionalGeneration(cfg))


def inputs(image_tokens: int = 0, at: int = 1, s: int = 10, pixels: bool = False):
    """``input_ids [2, s]`` (``image_tokens`` placeholders from position ``at``), the second row
    padded by 2 on the right, and pixels ``[2, 3, 16, 16]`` when the model takes images."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 60, (2, s), generator=g)
    ids[:, at:at + image_tokens] = IMG
    mask = torch.ones(2, s, dtype=torch.long)
    mask[1, -2:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if pixels:
        kw["pixel_values"] = torch.randn(2, 3, 16, 16, generator=g)
    return kw


def logits(model, kw, dtype=torch.float32):
    """The logits at the unpadded positions (HF leaves padded positions' outputs undefined)."""
    kw = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}
    out = model(**kw).logits
    return out[kw["attention_mask"].bool()]


def check_patched(make, kw, report_checks, ops=("multimodal_attention",)):
    """The patched model against the unpatched one (float64 reference, float32 eager), the report,
    mmkernels' ``ops`` in the forward (and no fallback of the HF attention function), and undo:
    exact outputs, no patch left."""
    model = make()
    ref = logits(copy.deepcopy(model).double(), kw, torch.float64)
    with torch.no_grad():
        before = logits(model, kw)
    impls = {id(m.config): m.config._attn_implementation for m in model.modules()
             if isinstance(m, transformers.PreTrainedModel)}
    report = apply_mmkernels(model, verbose=False)
    report_checks(report, model)
    with torch.no_grad(), mmkernels.explain() as log:
        after = logits(model, kw)
    assert {d.op for d in log} == set(ops), str(log)
    assert_close(after, ref, torch.float32, eager=before, name=f"{type(model).__name__} logits")
    report.undo()
    assert report.undone and hf_apply.applied_report(model) is None
    with torch.no_grad(), mmkernels.explain() as log:
        restored = logits(model, kw)
    assert not log, str(log)
    assert torch.equal(restored, before)
    assert impls == {id(m.config): m.config._attn_implementation for m in model.modules()
                     if isinstance(m, transformers.PreTrainedModel)}
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", integ._STATE, integ._PREV))
    return report


def components(entries):
    return " | ".join(f"{e.component}: {e.detail}" for e in entries)


@needs_hf
def test_llama_outputs_gradients_and_undo():
    """LLaMA: the decoder's attention switched, logits and every parameter's gradient as before."""
    model = make_llama()
    kw = inputs()
    up = torch.randn(int(kw["attention_mask"].sum()), LLAMA["vocab_size"], generator=torch.Generator().manual_seed(4))

    def grads(m, dtype):
        m.zero_grad(set_to_none=True)
        out = logits(m, kw, dtype)
        (out * up.to(dtype)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads(copy.deepcopy(model).double(), torch.float64)
    eager = grads(model, torch.float32)
    report = apply_mmkernels(model, verbose=False)
    assert model.config._attn_implementation == "mmkernels"
    assert [e.component for e in report.patched] == ["attention of the model (LlamaForCausalLM)"]
    assert "sdpa -> mmkernels" in report.patched[0].detail
    with mmkernels.explain() as log:
        got = grads(model, torch.float32)
    assert {d.op for d in log} == {"multimodal_attention"}, str(log)
    assert_close(got[0], ref[0], torch.float32, eager=eager[0], name="logits")
    for n, g in got[1].items():
        assert_close(g, ref[1][n], torch.float32, eager=eager[1][n], name=f"d {n}")
    assert unapply_mmkernels(model) and not unapply_mmkernels(model)
    assert model.config._attn_implementation == "sdpa"
    again = grads(model, torch.float32)
    assert torch.equal(again[0], eager[0])
    assert all(torch.equal(again[1][n], eager[1][n]) for n in again[1])


@needs_hf
def test_llava_switches_the_language_model_only():
    def checks(report, model):
        assert model.model.language_model.config._attn_implementation == "mmkernels"
        assert model.model.vision_tower.config._attn_implementation == "sdpa"
        patched, skipped = components(report.patched), components(report.skipped)
        assert "attention of text_config (LlamaModel): sdpa -> mmkernels" in patched
        assert "attention of vision_config: vision encoder" in skipped and "SDPA" in skipped
        assert "Q-Former: the model holds no" in skipped and "multiway: the model holds no" in skipped

    check_patched(make_llava, inputs(image_tokens=4, pixels=True), checks)


@needs_hf
def test_blip2_patches_qformer_and_language_model():
    def checks(report, model):
        assert model.language_model.config._attn_implementation == "mmkernels"
        assert model.vision_model.config._attn_implementation == "sdpa"
        assert integ.is_patched(model)
        patched, skipped = components(report.patched), components(report.skipped)
        assert "attention of text_config (OPTForCausalLM): sdpa -> mmkernels" in patched
        assert "Q-Former qformer (Blip2QFormerModel)" in patched
        assert "attention of qformer_config: Q-Former" in skipped
        assert "attention of vision_config: vision encoder" in skipped

    check_patched(make_blip2, inputs(image_tokens=4, at=0, pixels=True), checks,
                  ops=("multimodal_attention", "cross_attention"))


@needs_hf
def test_paligemma_switches_the_gemma_decoder():
    def checks(report, model):
        assert model.model.language_model.config._attn_implementation == "mmkernels"
        assert model.model.vision_tower.config._attn_implementation == "sdpa"
        assert "attention of text_config (GemmaModel): sdpa -> mmkernels" in components(report.patched)

    check_patched(make_paligemma, inputs(image_tokens=4, at=0, pixels=True), checks)


@needs_hf
def test_gemma3_switches_the_gemma3_decoder():
    """Gemma 3 (sliding-window layers, the window wider than the sequence; bidirectional image
    tokens): the text model switched, the SigLIP tower left alone."""
    def checks(report, model):
        assert model.model.language_model.config._attn_implementation == "mmkernels"
        assert model.model.vision_tower.config._attn_implementation == "sdpa"
        assert "attention of text_config (Gemma3TextModel): sdpa -> mmkernels" in components(report.patched)

    kw = inputs(image_tokens=4, at=2, pixels=True)
    kw["token_type_ids"] = (kw["input_ids"] == IMG).long()
    check_patched(make_gemma3, kw, checks)


@needs_hf
def test_report_str_and_verbose_prints_once(capsys):
    model = make_llava()
    report = apply_mmkernels(model)
    printed = capsys.readouterr().out
    assert printed.count("mmkernels on LlavaForConditionalGeneration") == 1
    assert printed.strip() == str(report)
    lines = str(report).splitlines()
    assert lines[0] == "mmkernels on LlavaForConditionalGeneration: 1 patched, 3 left alone"
    assert lines[1].startswith("  patched  attention of text_config")
    assert all(line.startswith("  skipped  ") for line in lines[2:]) and len(lines) == 5
    assert apply_mmkernels(model, verbose=False) is report  # the same options: the patch in effect
    with pytest.raises(ValueError, match="already applied"):
        apply_mmkernels(model, qformer=False, verbose=False)
    report.undo()
    report.undo()
    assert str(report).splitlines()[0].endswith(": undone")
    assert capsys.readouterr().out == ""


@needs_hf
def test_explicit_sub_configs_and_flags():
    model = make_blip2()
    report = apply_mmkernels(model, attention=["text_config", "vision_config"], qformer=False, verbose=False)
    assert model.vision_model.config._attn_implementation == "mmkernels"
    assert model.language_model.config._attn_implementation == "mmkernels"
    assert not integ.is_patched(model)
    skipped = components(report.skipped)
    assert "attention of qformer_config: not named in attention=" in skipped and "Q-Former: qformer=False" in skipped
    report.undo()
    assert model.vision_model.config._attn_implementation == "sdpa"
    none = apply_mmkernels(model, attention=False, qformer=False, multiway=False, verbose=False)
    assert not none.patched and model.language_model.config._attn_implementation == "sdpa"
    assert [e.detail for e in none.skipped] == ["attention=False", "qformer=False", "multiway=False"]
    none.undo()
    with pytest.raises(ValueError, match="does not have.*'text_config'"):
        apply_mmkernels(model, attention="audio_config", verbose=False)
    with pytest.raises(TypeError, match="qformer must be a bool"):
        apply_mmkernels(model, qformer="yes", verbose=False)
    with pytest.raises(TypeError, match="nn.Module"):
        apply_mmkernels(object())
    assert hf_apply.applied_report(model) is None


@needs_hf
def test_error_leaves_the_model_unpatched(monkeypatch):
    """A step that fails after others succeeded: everything done is undone, the error propagates."""
    model = make_blip2()

    def boom(model, report):
        raise RuntimeError("multiway step failed")

    monkeypatch.setattr(hf_apply, "_patch_multiway", boom)
    with pytest.raises(RuntimeError, match="multiway step failed"):
        apply_mmkernels(model, verbose=False)
    assert not integ.is_patched(model)
    assert model.language_model.config._attn_implementation == "sdpa"
    assert hf_apply.applied_report(model) is None
    assert not any("forward" in m.__dict__ for m in model.modules())


@needs_hf
def test_attention_already_on_mmkernels_is_left_alone():
    from mmkernels.integrations.hf_attention import register_attention

    model = make_llama()
    model.set_attn_implementation(register_attention())
    report = apply_mmkernels(model, verbose=False)
    assert not report.patched
    assert "attention of the model (LlamaForCausalLM): already mmkernels" in components(report.skipped)
    report.undo()
    assert model.config._attn_implementation == "mmkernels"


def make_encoder():
    torch.manual_seed(0)
    model = TorchscaleEncoder(16, 2, 24, layers=1, layernorm_eps=1e-6).eval()
    with torch.no_grad():  # B's LayerNorms differ from A's
        for name, p in model.named_parameters():
            if "layer_norm" in name or "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.apply(lambda m: setattr(m, "split_position", 5) if hasattr(m, "split_position") else None)
    return model


def test_torchscale_multiway_patched_and_undone():
    """A non-HF model: multiway experts patched, attention and Q-Former reported as not applicable;
    undo puts the original MultiwayNetworks back, with the weights trained while patched."""
    model = make_encoder()
    originals = {n: m for n, m in model.named_modules() if type(m).__name__ == "MultiwayNetwork"}
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(5))
    ref = copy.deepcopy(model).double()(x.double())
    before = model(x).detach()
    report = apply_mmkernels(model, verbose=False)
    assert [e.detail for e in report.patched] == [
        "9 MultiwayNetworks (1 ffn, 4 layer_norm, 4 linear) on mmkernels' routed Multiway modules"]
    assert "attention: not a transformers PreTrainedModel" in components(report.skipped)
    assert sum(isinstance(m, MultiwayAdapter) for m in model.modules()) == 9
    after = model(x)
    assert_close(after, ref, torch.float32, eager=before, name="encoder output")

    clone = copy.deepcopy(model)  # carries its own report, acting on the copy
    assert unapply_mmkernels(clone)
    assert hf_apply.applied_report(model) is report
    assert torch.equal(clone(x), before)
    clone = copy.deepcopy(model).double()  # moved while patched: undo keeps the new dtype
    unapply_mmkernels(clone)
    assert all(p.dtype == torch.float64 for p in clone.parameters())
    assert_close(clone(x.double()), ref, torch.float64, name="float64 output after undo")

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    after.square().sum().backward()
    opt.step()
    trained = model.state_dict()
    trained_out = model(x).detach()
    report.undo()
    assert {n: m for n, m in model.named_modules() if type(m).__name__ == "MultiwayNetwork"} == originals
    assert not any(isinstance(m, MultiwayAdapter) for m in model.modules())
    state = model.state_dict()
    assert list(state) == list(trained) and all(torch.equal(state[k], trained[k]) for k in state)
    assert_close(model(x), trained_out.double(), torch.float32, name="trained output after undo")


def test_report_is_a_dataclass_with_entries():
    report = ApplyReport(model="X")
    assert str(report) == "mmkernels on X: 0 patched, 0 left alone"
    report.undo()
    assert report.undone
