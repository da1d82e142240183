"""The ``models`` bench family (bench/cases/models.py): every reference model has a training-step
case in every profile, the GPU profiles hold the sizes the targets name, both forms run on the
case's shared tensors, and one step is measured end to end by the harness (time and memory)."""
import pytest
import torch

from bench import harness
from bench.cases import models as M
from mmkernels.models import common

PROFILES = [("cuda", "full"), ("cuda", "quick"), ("cpu", "full"), ("cpu", "quick"), ("cpu", "pytest")]


@pytest.mark.parametrize("device,profile", PROFILES)
def test_every_model_has_cases(device, profile):
    cases = M.cases(device, profile)
    assert {c.op for c in cases} == {M.op_name(m) for m in common.REFERENCE_MODELS}
    for c in cases:
        assert c.family == M.FAMILY and c.mode == "fwd+bwd" and c.shape["batch"] >= 1
        assert [p.name for p in c.providers] == ["mmkernels", "reference"]
        M.config_of(c)                                   # every shape key is a Config field
    if device == "cuda":
        assert {c.dtype for c in cases} <= {"bfloat16", "float16", "float32"}


def test_gpu_profiles_hold_the_target_sizes():
    """CLIP at batch 16k and the BLIP-2 stage-1 model: the two 1.2x targets."""
    for profile in ("full", "quick"):
        cases = M.cases("cuda", profile)
        assert any(c.op == "train_clip" and c.shape["batch"] >= 16384 for c in cases)
        assert any(c.op == "train_blip2" for c in cases)


def test_size_overrides_and_unknown_models():
    cases = M.cases("cpu", "pytest", {"batch": [3, 5]})
    assert {c.shape["batch"] for c in cases} == {3, 5}
    with pytest.raises(KeyError, match="unknown reference model"):
        common.load("nope")


@pytest.mark.parametrize("model", common.REFERENCE_MODELS)
def test_both_forms_run_on_the_shared_tensors(model):
    """The two providers compute the same loss from the same inputs, and the gradients land on the
    case's parameters (the harness clears them between repeats)."""
    case = next(c for c in M.cases("cpu", "pytest") if c.op == M.op_name(model))
    torch.manual_seed(case.seed)
    inputs = case.make_inputs(case)
    leaves = harness.grad_leaves(inputs)
    assert leaves and all(k.startswith(M.P_PARAM) for k, v in inputs.items() if any(v is t for t in leaves))
    # the forward updates state (ALBEF's momentum encoders and queues): each form starts from the same
    state = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor) and not v.requires_grad}
    losses = {}
    for p in case.providers:
        for k, v in state.items():
            inputs[k].copy_(v)
        harness.clear_grads(leaves)
        torch.manual_seed(0)
        loss = p.fn(**inputs)
        loss.backward()
        losses[p.name] = loss.item()
        assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves), p.name
    assert losses["mmkernels"] == pytest.approx(losses["reference"], rel=1e-4, abs=1e-5)


def test_one_step_measured_with_memory():
    """The harness measures a training step in a subprocess: time and peak memory for both forms."""
    case = next(c for c in M.cases("cpu", "pytest") if c.op == "train_clip")
    opts = harness.RunOptions(cpu_budget_ms=1.0, cpu_min_reps=1, cpu_max_reps=1, timeout_s=300)
    for p in case.providers:
        rec = harness.measure_isolated(case, p, opts)
        assert rec["status"] == "ok", rec.get("reason")
        assert rec["time_ms"] > 0 and rec["mem_peak_bytes"] > 0
