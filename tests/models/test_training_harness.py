"""The parity trainer (mmkernels.testing.training) and the reference-model interface helpers
(mmkernels.models.common): a faithful twin passes, an unfaithful one, a run whose loss does not
fall and a non-finite loss fail."""
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkernels.models import common
from mmkernels.testing.training import assert_parity, train_side_by_side


@dataclass
class ToyConfig:
    features: int = 12
    classes: int = 5
    hidden: int = 16
    skew: float = 0.0        # the mmkernels form's deviation (0: a faithful twin)
    poison: bool = False     # the mmkernels form returns NaN

    @classmethod
    def tiny(cls):
        return cls()


class ToyModel(nn.Module):
    """A two-layer classifier; the mmkernels form computes the same function another way."""

    def __init__(self, config: ToyConfig, impl: str = "mmkernels"):
        super().__init__()
        self.impl, self.cfg = common.check_impl(impl), config
        self.fc1 = nn.Linear(config.features, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.classes)
        self.shift = nn.Parameter(torch.full((1,), 0.5))   # softmax ignores it: no true gradient
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(self, x, y):
        self.steps += 1
        if self.impl == "plain":
            logits = self.fc2(torch.tanh(self.fc1(x))) + self.shift
            return F.cross_entropy(logits, y)
        h = torch.tanh(torch.addmm(self.fc1.bias, x, self.fc1.weight.t()))
        logits = (torch.addmm(self.fc2.bias, h, self.fc2.weight.t()) + self.shift) * (1.0 + self.cfg.skew)
        loss = -logits.log_softmax(-1).gather(1, y[:, None]).mean()
        return loss * float("nan") if self.cfg.poison else loss


def toy_batch(config: ToyConfig, batch_size: int, *, seed: int, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(config.classes, config.features, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, config.classes, (batch_size,), generator=g)
    x = centres[y] + 0.3 * torch.randn(batch_size, config.features, generator=g)
    return {"x": x.to(device=device, dtype=dtype), "y": y.to(device)}


TOY = types.SimpleNamespace(Config=ToyConfig, Model=ToyModel, synthetic_batch=toy_batch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_faithful_twin_passes(dtype):
    run = train_side_by_side(TOY, ToyConfig(), batch_size=32, steps=30, dtype=dtype, lr=1e-2)
    assert set(run.losses) == ({"truth", "mmkernels"} if dtype == torch.float64 else {"truth", "mmkernels", "plain"})
    assert run.losses["truth"].shape == (30,)
    assert int(run.states["mmkernels"]["steps"]) == 30
    assert run.grad_max["shift"].item() < 1e-9 * run.grad_max["fc2.bias"].max().item()
    assert_parity(run)


def test_entries_without_gradient_are_held_to_adamw_bound():
    """The softmax's shift has no true gradient: in float32 it drifts by rounding noise (passes);
    moved further than steps * lr, it fails."""
    run = train_side_by_side(TOY, ToyConfig(), batch_size=32, steps=30, dtype=torch.float32, lr=1e-2)
    assert_parity(run)
    run.states["mmkernels"]["shift"] = run.states["mmkernels"]["shift"] + 1.0
    with pytest.raises(AssertionError, match="entries without gradient moved"):
        assert_parity(run)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_an_unfaithful_twin_fails(dtype):
    run = train_side_by_side(TOY, ToyConfig(skew=1e-3), batch_size=32, steps=30, dtype=dtype, lr=1e-2)
    with pytest.raises(AssertionError, match="loss per step"):
        assert_parity(run)


def test_a_loss_that_does_not_fall_fails():
    run = train_side_by_side(TOY, ToyConfig(), batch_size=32, steps=10, dtype=torch.float64, lr=0.0)
    with pytest.raises(AssertionError, match="did not fall"):
        assert_parity(run)


def test_a_non_finite_loss_fails():
    with pytest.raises(AssertionError, match="non-finite loss"):
        train_side_by_side(TOY, ToyConfig(poison=True), batch_size=8, steps=2, dtype=torch.float64)


def test_interface_helpers():
    assert common.check_impl("plain") == "plain"
    with pytest.raises(ValueError, match="impl must be one of"):
        common.check_impl("fast")
    with pytest.raises(KeyError, match="unknown reference model"):
        common.load("gpt5")
    a = common.build(TOY, ToyConfig(), "plain", seed=3, dtype=torch.float64)
    b = common.build(TOY, ToyConfig(), "mmkernels", seed=3, dtype=torch.float64)
    assert a.fc1.weight.dtype == torch.float64 and b.steps.dtype == torch.int64
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
