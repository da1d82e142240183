"""attn_implementation="mmkernels" in HF transformers (mmkernels.integrations.hf_attention).

Tiny random models built from configs (nothing is downloaded) run with "mmkernels" and with
"sdpa" (or "eager" where sdpa cannot run): same logits on real tokens and same gradients of every
parameter, in float64 on the default backend (the C++ kernels on CPU tensors); one small float32
comparison runs the Triton kernels (through the interpreter without a GPU).
"""
import copy
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
pytest.importorskip("transformers.masking_utils")

import mmkernels  # noqa: E402
from mmkernels.integrations import hf_attention as hfa  # noqa: E402
from mmkernels.testing.numerics import assert_close  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

NAME = hfa.register_attention()
F64 = torch.float64
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
              num_channels=3)
IMAGE = 63                                     # the image placeholder token id


def model_class(name):
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {name}")
    return cls


def randomised(model, dtype=F64, seed=0):
    """``model`` in ``dtype``, eval mode, every parameter moved off its initial value (sharper attention)."""
    torch.manual_seed(seed)
    model = model.to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def pair(model, impl="sdpa"):
    """``(model on impl, a copy switched to mmkernels after it was built)``."""
    model.set_attn_implementation(impl)
    mine = copy.deepcopy(model)
    mine.set_attn_implementation(NAME)
    assert mine.config._attn_implementation == NAME
    return model, mine


def llama(dtype=F64, **over):
    cls = model_class("LlamaForCausalLM")
    return randomised(cls(transformers.LlamaConfig(**{**TEXT, **over})), dtype)


def llava():
    cls = model_class("LlavaForConditionalGeneration")
    config = transformers.LlavaConfig(
        vision_config=dict(VISION, model_type="clip_vision_model", patch_size=4, projection_dim=16),
        text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE, vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    return randomised(cls(config))


def gemma3(sliding_window=64):
    cls = model_class("Gemma3ForConditionalGeneration")
    text = dict(TEXT, model_type="gemma3_text", sliding_window=sliding_window,
                layer_types=["sliding_attention", "full_attention"])
    config = transformers.Gemma3Config(text_config=text, vision_config=dict(VISION, model_type="siglip_vision_model",
                                                                            patch_size=2),
                                       mm_tokens_per_image=4, image_token_id=IMAGE, boi_token_id=61, eoi_token_id=62)
    return randomised(cls(config))


def paligemma():
    cls = model_class("PaliGemmaForConditionalGeneration")
    config = transformers.PaliGemmaConfig(
        text_config=dict(TEXT, model_type="gemma"),
        vision_config=dict(VISION, model_type="siglip_vision_model", patch_size=2, projection_dim=32),
        image_token_id=IMAGE, projection_dim=32)
    return randomised(cls(config))


def padding(batch, seq, side):
    """HF's 2D attention mask (long ``[B, S]``, 1 = real token): on ``side``, row 1 loses 3 tokens and
    row 2 (if any) one; row 0 keeps all."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    if side == "right":
        mask[1, seq - 3:] = 0
        mask[2:, seq - 1:] = 0
    elif side == "left":
        mask[1, :3] = 0
        mask[2:, :1] = 0
    return mask


def run(model, inputs, real):
    """Logits on real tokens and the gradients of a fixed random weighting of them w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits[real]
    weights = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(1))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(mine, ref, dtype=F64, eager=None):
    assert_close(mine[0], ref[0], dtype, name="logits", eager=None if eager is None else eager[0])
    assert mine[1].keys() == ref[1].keys()
    for n in ref[1]:
        assert_close(mine[1][n], ref[1][n], dtype, name=f"grad of {n}", scale=10.0,
                     eager=None if eager is None else eager[1][n])


def kernel_ran(log) -> bool:
    return "kernel" in log.paths() and not any(p.startswith("hf_") for p in log.paths())


# ----------------------------------------------------------------------------- registration

def test_import_without_transformers():
    code = "import sys, mmkernels.integrations.hf_attention; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_register_is_idempotent_and_checks_names():
    from transformers import AttentionInterface

    assert hfa.register_attention() == NAME == "mmkernels"
    assert AttentionInterface()[NAME] is hfa._attention_function(True)
    assert mu.AttentionMaskInterface()[NAME] is hfa.attention_mask_function
    for bad in ("sdpa", "eager", "org/repo", "", 3):
        with pytest.raises(ValueError):
            hfa.register_attention(bad)
    AttentionInterface.register("mmk_test_taken", lambda *a, **k: None)
    try:
        with pytest.raises(ValueError, match="another library"):
            hfa.register_attention("mmk_test_taken")
    finally:
        del AttentionInterface._global_mapping["mmk_test_taken"]


def test_from_config_and_composite_submodels():
    model_class("LlamaForCausalLM")
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**TEXT), attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    ref, mine = pair(llava())
    for m in mine.modules():
        if isinstance(m, transformers.PreTrainedModel):
            assert m.config._attn_implementation == NAME, type(m).__name__


# ----------------------------------------------------------------------------- HF masks -> MultimodalMask

def dense_of(hf_mask, sq, sk, **kw):
    mask = hf_mask.multimodal(sq, sk, **kw)
    return torch.ones(hf_mask.batch, 1, sq, sk, dtype=torch.bool) if mask is None else mask.to_dense()


def both(mask_function, b, sq, sk, q_offset=0, kv_offset=0, attention_mask=None):
    kw = dict(batch_size=b, q_length=sq, kv_length=sk, q_offset=q_offset, kv_offset=kv_offset,
              mask_function=mask_function, attention_mask=attention_mask)
    ref = mu.sdpa_mask(**kw, allow_is_causal_skip=False)
    return hfa.attention_mask_function(**kw), ref


PAD = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
BLOCKS = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1], [-1, -1, 0, 0, -1, -1, 1, 1], [-1, 0, 0, -1, 1, 1, 1, 1]])
PACKED = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]])
POS = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])

MASK_CASES = {
    "causal_padding": lambda: (mu.causal_mask_function, 3, 8, 8, 0, 0, PAD),
    "bidirectional_padding": lambda: (mu.bidirectional_mask_function, 3, 8, 8, 0, 0, PAD),
    "bidirectional_cross": lambda: (mu.bidirectional_mask_function, 3, 5, 8, 0, 0, PAD),
    "decode_with_cache": lambda: (mu.causal_mask_function, 3, 2, 8, 6, 0, PAD),
    "static_cache": lambda: (mu.causal_mask_function, 3, 2, 10, torch.tensor(4), 0, PAD[:, :6]),
    "image_blocks": lambda: (mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(BLOCKS)), 3, 8, 8, 0, 0,
                             PAD),
    "image_blocks_inactive_window": lambda: (
        mu.and_masks(mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(BLOCKS)),
                     mu.sliding_window_overlay(8)), 3, 8, 8, 0, 0, PAD),
    "image_blocks_padding_inside": lambda: (mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(BLOCKS)), 3,
                                            8, 8, 0, 0, torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1]] * 3, dtype=torch.bool)),
    "packed_hf": lambda: (mu.and_masks(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, POS),
                                       mu.packed_sequence_mask_function(PACKED)), 1, 8, 8, 0, 0, None),
    "packed_bidirectional": lambda: (
        mu.and_masks(mu.remap_positions_for_packed_sequence(mu.bidirectional_mask_function, POS),
                     mu.packed_sequence_mask_function(PACKED)), 1, 8, 8, 0, 0, None),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_hf_masks_become_multimodal_masks(case):
    fn, b, sq, sk, q_off, kv_off, pad = MASK_CASES[case]()
    mine, ref = both(fn, b, sq, sk, q_off, kv_off, pad)
    assert isinstance(mine, hfa.HFMask), mine
    dense = dense_of(mine, sq, sk)
    if "blocks" in case:     # padded queries of a block may differ from HF's (their outputs are unused)
        rows = pad.expand(b, -1)[:, None, :, None].expand_as(ref)
        assert torch.equal(dense[rows], ref[rows])
        assert not torch.equal(dense, dense_of(both(mu.causal_mask_function, b, sq, sk, 0, 0, pad)[0], sq, sk))
    else:
        assert torch.equal(dense, ref)


def test_position_ids_and_cu_seq_lens_give_documents():
    spec = hfa.attention_mask_function(1, 8, 8, mask_function=mu.causal_mask_function)
    ref = mu.sdpa_mask(1, 8, 8, mask_function=mu.and_masks(mu.causal_mask_function,
                                                            mu.packed_sequence_mask_function(PACKED)),
                       allow_is_causal_skip=False)
    assert torch.equal(dense_of(spec, 8, 8, position_ids=POS), ref)
    assert torch.equal(dense_of(spec, 8, 8, position_ids=POS + 5), ref)        # restarts at the row's minimum
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    assert torch.equal(dense_of(spec, 8, 8, cu_seq_lens_q=cu, cu_seq_lens_k=cu), ref)
    plain = mu.sdpa_mask(1, 8, 8, allow_is_causal_skip=False)
    assert torch.equal(dense_of(spec, 8, 8, position_ids=POS, packed_position_ids=False), plain)
    assert spec.multimodal(8, 8).kind == "causal"                           # the causal fast paths stay
    padded = hfa.attention_mask_function(3, 8, 8, mask_function=mu.causal_mask_function, attention_mask=PAD)
    assert torch.equal(dense_of(padded, 8, 8, position_ids=POS), mu.sdpa_mask(3, 8, 8, attention_mask=PAD,
                                                                              allow_is_causal_skip=False))


@pytest.mark.parametrize("case", ["active_window", "chunked", "model_function"])
def test_masks_without_o_s_form_fall_back_to_hf_dense_mask(case):
    fn = {"active_window": lambda: mu.sliding_window_causal_mask_function(3),
          "chunked": lambda: mu.chunked_causal_mask_function(4, torch.zeros(3, dtype=torch.long)),
          "model_function": lambda: mu.or_masks(mu.causal_mask_function, lambda b, h, q, kv: kv == 0)}[case]()
    mine, ref = both(fn, 3, 8, 8, attention_mask=PAD)
    assert isinstance(mine, torch.Tensor) and torch.equal(mine, ref)
    assert "no O(S) form" in getattr(mine, hfa._FALLBACK)


def test_split_image_block_is_an_error():
    blocks = torch.tensor([[0, 0, -1, 0, 0, -1, -1, -1]])
    with pytest.raises(ValueError, match="contiguous"):
        hfa.attention_mask_function(1, 8, 8, mask_function=mu.or_masks(mu.causal_mask_function,
                                                                       mu.blockwise_overlay(blocks)))
    with pytest.raises(ValueError, match="Sq=8, Sk=8"):
        hfa.attention_mask_function(1, 8, 8).multimodal(7, 8)
    q = torch.randn(1, 2, 8, 4, dtype=F64)
    with pytest.raises(TypeError, match="another attn_implementation"):
        hfa.attention_forward(torch.nn.Module(), q, q, q, {"full_attention": None})


# ----------------------------------------------------------------------------- whole models

@pytest.mark.parametrize("side", ["none", "right", "left"])
def test_llama_padding(side):
    ref, mine = pair(llama())
    ids = torch.randint(1, 64, (3, 11), generator=torch.Generator().manual_seed(2))
    mask = padding(3, 11, side)
    inputs = dict(input_ids=ids, attention_mask=mask)
    with mmkernels.explain() as log:
        got = run(mine, inputs, mask.bool())
    assert kernel_ran(log) or side == "none", str(log)
    assert_same(got, run(ref, inputs, mask.bool()))


@pytest.mark.parametrize("use_cache", [True, False])
def test_llama_packed_sequences_match_separate_samples(use_cache):
    ref, mine = pair(llama())
    lengths = (4, 3, 5)
    ids = torch.randint(1, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    got = run(mine, dict(input_ids=ids, position_ids=pos, use_cache=use_cache), 0)
    # the reference: each sample on its own through sdpa, gradients summed over the samples
    ref.zero_grad(set_to_none=True)
    logits = torch.cat([ref(input_ids=part).logits for part in ids.split(lengths, dim=1)], dim=1)[0]
    weights = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(1))
    (logits * weights).sum().backward()
    assert_same(got, (logits.detach(), {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}))


def test_llama_cu_seq_lens_without_position_packing():
    name = hfa.register_attention("mmkernels_cu_test", packed_position_ids=False)
    model = llama()
    model.set_attn_implementation(name)
    ids = torch.randint(1, 64, (1, 7), generator=torch.Generator().manual_seed(4))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    with torch.no_grad():
        glued = model(input_ids=ids, position_ids=pos).logits[0, 4:]
        split = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits[0, 4:]
        alone = model(input_ids=ids[:, 4:]).logits[0]
    assert_close(split, alone, F64)
    assert (glued - alone).abs().max() > 1e-3          # without cu_seq_lens the documents see each other


@pytest.mark.parametrize("side", ["right", "left"])
def test_llava_padding(side):
    ref, mine = pair(llava())
    ids = torch.randint(1, 60, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = padding(2, 12, side)
    start = 4 if side == "left" else 1
    ids[:, start:start + 4] = IMAGE                     # 4 patches of an 8 x 8 image
    pixels = torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(6))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    with mmkernels.explain() as log:
        got = run(mine, inputs, mask.bool())
    assert kernel_ran(log), str(log)
    assert_same(got, run(ref, inputs, mask.bool()))


def gemma3_inputs(side):
    ids = torch.randint(1, 60, (2, 14), generator=torch.Generator().manual_seed(7))
    ids[:, 2:6] = IMAGE
    ids[:, 7:11] = IMAGE                                # two images of 4 tokens each per sample
    mask = padding(2, 14, side)
    if side == "left":
        ids = torch.roll(ids, 2, dims=1)
        mask[:, :2] = 0
    pixels = torch.randn(4, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(8))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=(ids == IMAGE).long())


@pytest.mark.parametrize("side", ["right", "left"])
def test_gemma3_bidirectional_images(side):
    ref, mine = pair(gemma3())
    inputs = gemma3_inputs(side)
    real = inputs["attention_mask"].bool()
    with mmkernels.explain() as log:
        got = run(mine, inputs, real)
    assert kernel_ran(log), str(log)
    assert_same(got, run(ref, inputs, real))
    causal_only = run(mine, {k: v for k, v in inputs.items() if k != "token_type_ids"}, real)
    assert (causal_only[0] - got[0]).abs().max() > 1e-3       # the image blocks changed the result


@pytest.mark.parametrize("side", ["right", "left"])
def test_paligemma_prefix(side):
    ref, mine = pair(paligemma())
    n_image, seq = 16, 24
    ids = torch.randint(1, 60, (2, seq), generator=torch.Generator().manual_seed(9))
    types = torch.zeros(2, seq, dtype=torch.long)
    mask = padding(2, seq, side)
    first = 3 if side == "left" else 0
    ids[:, first:first + n_image] = IMAGE
    types[:, first + n_image + 3:] = 1                  # suffix: causal; image + prompt prefix: bidirectional
    types[mask == 0] = 0                                # padding gets type 0, as the processor gives it
    pixels = torch.randn(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(10))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, token_type_ids=types)
    with mmkernels.explain() as log:
        got = run(mine, inputs, mask.bool())
    assert kernel_ran(log), str(log)
    assert_same(got, run(ref, inputs, mask.bool()))


def test_generate_with_left_padding_and_caches():
    ref, mine = pair(llama(eos_token_id=None, bos_token_id=None))
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(11))
    mask = padding(3, 9, "left")
    ids[mask == 0] = 0
    for cache in (None, "static"):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation=cache,
                  return_dict_in_generate=True, output_scores=True)
        with mmkernels.explain() as log:
            got = mine.generate(**kw)
        want = ref.generate(**kw)
        assert kernel_ran(log), str(log)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.scores, want.scores):
            assert_close(a, b, F64, name=f"scores ({cache} cache)")


# ----------------------------------------------------------------------------- fallbacks

def fallbacks(log):
    return [d for d in log if d.op == "hf_attention"]


def test_custom_4d_mask_falls_back_to_sdpa():
    ref, mine = pair(llama())
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(12))
    keep = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(13)) > 0.3
    keep = (keep & torch.ones(9, 9, dtype=torch.bool).tril()) | torch.eye(9, dtype=torch.bool)
    inputs = dict(input_ids=ids, attention_mask=keep)
    with mmkernels.explain() as log:
        got = run(mine, inputs, slice(None))
    assert [d.path for d in fallbacks(log)] == ["hf_sdpa", "hf_sdpa"]
    assert "custom mask" in fallbacks(log)[0].reason
    assert_same(got, run(ref, inputs, slice(None)))


def test_active_sliding_window_falls_back_per_layer():
    ref, mine = pair(gemma3(sliding_window=4))
    inputs = gemma3_inputs("right")
    real = inputs["attention_mask"].bool()
    with mmkernels.explain() as log:
        got = run(mine, inputs, real)
    assert [d.path for d in fallbacks(log)] == ["hf_sdpa"], str(log)          # the sliding layer only
    assert "sliding window of 4 tokens" in fallbacks(log)[0].reason
    assert "kernel" in log.paths()                                           # the full-attention layer
    assert_same(got, run(ref, inputs, real))


def test_dropout_in_training_falls_back_to_sdpa():
    ref, mine = pair(llama(attention_dropout=0.3))
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(14))
    mask = padding(2, 8, "right")
    inputs = dict(input_ids=ids, attention_mask=mask)
    results = []
    for model in (mine, ref):
        model.train()
        torch.manual_seed(15)
        with mmkernels.explain() as log:
            results.append(run(model, inputs, mask.bool()))
        if model is mine:
            assert [d.path for d in fallbacks(log)] == ["hf_sdpa", "hf_sdpa"]
            assert "dropout" in fallbacks(log)[0].reason
    assert_same(*results)


def test_softcap_falls_back_to_the_models_eager_attention():
    cls = model_class("Gemma2ForCausalLM")
    model = randomised(cls(transformers.Gemma2Config(**TEXT, attn_logit_softcapping=5.0, sliding_window=64)))
    ref, mine = pair(model, impl="eager")
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(16))
    mask = padding(2, 8, "right")
    inputs = dict(input_ids=ids, attention_mask=mask)
    with mmkernels.explain() as log:
        got = run(mine, inputs, mask.bool())
    assert {d.path for d in fallbacks(log)} == {"hf_eager"} and "softcap" in fallbacks(log)[0].reason
    assert_same(got, run(ref, inputs, mask.bool()))


# ----------------------------------------------------------------------------- Triton, GPU

def test_triton_backend_tiny_llama():
    ref64 = llama(num_hidden_layers=1)
    ref64.set_attn_implementation("sdpa")
    eager32 = copy.deepcopy(ref64).to(torch.float32)
    mine = copy.deepcopy(eager32)
    mine.set_attn_implementation(NAME)
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(17))
    mask = padding(2, 8, "right")
    inputs = dict(input_ids=ids, attention_mask=mask)
    with mmkernels.backend("triton"), mmkernels.explain() as log:
        got = run(mine, inputs, mask.bool())
    assert [d.backend for d in log] == ["triton"], str(log)
    assert_same(got, run(ref64, inputs, mask.bool()), torch.float32, eager=run(eager32, inputs, mask.bool()))


@pytest.mark.gpu
def test_cuda_no_host_sync():
    dev = "cuda"
    pad, blocks = PAD.to(dev), BLOCKS.to(dev)
    fn = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(blocks))
    gen = torch.Generator(dev).manual_seed(18)
    q = torch.randn(3, 4, 8, 16, device=dev, dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(3, 2, 8, 16, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = True
    with mmkernels.backend("triton"):
        hfa.attention_forward(module, q, k, v, hfa.attention_mask_function(3, 8, 8, mask_function=fn,
                                                                           attention_mask=pad, device=dev))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            hf_mask = hfa.attention_mask_function(3, 8, 8, mask_function=fn, attention_mask=pad, device=dev)
            out, _ = hfa.attention_forward(module, q, k, v, hf_mask)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    dense = mu.sdpa_mask(3, 8, 8, mask_function=fn, attention_mask=pad, allow_is_causal_skip=False, device=dev)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(2, 1),
                                                           v.double().repeat_interleave(2, 1), attn_mask=dense)
    real = pad[:, :, None, None].expand(3, 8, 4, 16)
    assert_close(out[real], ref.transpose(1, 2)[real], torch.bfloat16)
