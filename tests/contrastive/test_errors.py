"""Bad input to the contrastive ops raises a clear TypeError/ValueError before any kernel runs."""
from __future__ import annotations

import pytest
import torch

import mmkernels

from tests.contrastive.cases import features

IMG, TXT = features(8, 16, seed=1), features(8, 16, seed=2)


@pytest.mark.parametrize("fn", [mmkernels.contrastive_loss, mmkernels.infonce_loss])
@pytest.mark.parametrize("a,b,err,match", [
    (IMG[0], TXT, ValueError, "2 dimensions"),                          # wrong rank
    (IMG, TXT[None], ValueError, "2 dimensions|need at least"),        # infonce: [1, N, D] is one key of N tokens
    (IMG, TXT[:, :8], ValueError, "feature size"),                       # D mismatch
    (IMG, TXT.double(), TypeError, "dtype"),                              # mixed dtypes
    (IMG.long(), TXT.long(), TypeError, "float32, bfloat16"),             # integer features
    (IMG[:0], TXT[:0], ValueError, "empty"),                              # empty batch
    (IMG[:, :0], TXT[:, :0], ValueError, "empty"),                        # D = 0
    (IMG.numpy(), TXT, TypeError, "torch.Tensor"),
])
def test_bad_features(fn, a, b, err, match):
    with pytest.raises(err, match=match):
        fn(a, b, 10.0)


def test_rows_mismatch_symmetric():
    with pytest.raises(ValueError, match="rows"):
        mmkernels.contrastive_loss(IMG, TXT[:5], 10.0)


def test_mixed_devices():
    meta = TXT.to("meta")
    with pytest.raises(ValueError, match="device"):
        mmkernels.contrastive_loss(IMG, meta, 10.0)


@pytest.mark.parametrize("scale,err", [("10", TypeError), (torch.ones(2), ValueError),
                                       (torch.tensor(3), TypeError), (True, TypeError)])
def test_bad_logit_scale(scale, err):
    with pytest.raises(err):
        mmkernels.contrastive_loss(IMG, TXT, scale)


@pytest.mark.parametrize("kw,match", [(dict(reduction="avg"), "reduction"),
                                      (dict(label_smoothing=1.5), "label_smoothing"),
                                      (dict(label_smoothing=-0.1), "label_smoothing")])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        mmkernels.contrastive_loss(IMG, TXT, 10.0, **kw)
    with pytest.raises(ValueError, match=match):
        mmkernels.infonce_loss(IMG, TXT, 10.0, **kw)


@pytest.mark.parametrize("targets,err,match", [
    (torch.arange(8) + 1, ValueError, r"\[0, 8\)"),        # out of range high
    (torch.arange(8) - 1, ValueError, r"\[0, 8\)"),        # negative
    (torch.arange(8).int(), TypeError, "int64"),
    (torch.arange(7), ValueError, "entries"),
    (torch.arange(8)[None], ValueError, "1 dimensions"),
    (torch.arange(8).float(), TypeError, "int64"),
])
def test_bad_targets(targets, err, match):
    with pytest.raises(err, match=match):
        mmkernels.infonce_loss(IMG, TXT, 10.0, targets=targets)


def test_default_targets_need_enough_keys():
    with pytest.raises(ValueError, match="at least 8 keys"):
        mmkernels.infonce_loss(IMG, TXT[:5], 10.0)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown mmkernels backend"):
        with mmkernels.backend("cuda"):
            pass


def test_triton_rejects_float64():
    with mmkernels.backend("triton"), pytest.raises(TypeError, match="float64"):
        mmkernels.contrastive_loss(IMG.double(), TXT.double(), 10.0)
