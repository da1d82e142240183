"""open_clip training on mmkernels' losses in one line: :func:`mmkernels_loss_for` turns an
open_clip ``ClipLoss`` / ``SigLipLoss`` (or open_clip_train's ``args``) into
:class:`mmkernels.ContrastiveLoss` / :class:`mmkernels.SigLipLoss` with the same settings, and
:func:`patch_create_loss` makes open_clip's ``create_loss(args)`` return them. open_clip is
imported only by :func:`patch_create_loss` when it is given no module.
"""
from __future__ import annotations

import functools
import importlib
import sys
import types
import warnings

from torch import nn

from ..contrastive import ContrastiveLoss, SigLipLoss

#: open_clip loss class -> the attributes carried over to the mmkernels loss
CARRIED = {
    "ClipLoss": ("local_loss", "gather_with_grad", "cache_labels", "rank", "world_size", "use_horovod"),
    "SigLipLoss": ("cache_labels", "rank", "world_size", "dist_impl"),
}

#: open_clip losses mmkernels has no drop-in for, and why
UNSUPPORTED = {
    "CoCaLoss": "CoCa's loss adds a captioning cross-entropy over the text decoder's logits",
    "DistillClipLoss": "the distillation loss adds a soft-target term over a teacher's [N, N] logits with the "
                       "teacher's own logit scale",
}

#: where open_clip's ``create_loss`` is looked up by training code (``open_clip_train.main`` binds
#: it at import time, so it is patched there too when already imported)
CREATE_LOSS_MODULES = ("open_clip", "open_clip.factory", "open_clip_train.main")

_PATCHED = "_mmkernels_create_loss"  # on a patched create_loss: the function it wraps


class UnsupportedLossError(ValueError):
    """An open_clip loss or setting that mmkernels has no drop-in for."""


def _is_args(obj) -> bool:
    return not isinstance(obj, nn.Module) and all(
        hasattr(obj, a) for a in ("local_loss", "gather_with_grad", "rank", "world_size"))


def _from_args(args, options: dict) -> nn.Module:
    """What open_clip's ``create_loss(args)`` builds, as the mmkernels loss."""
    if getattr(args, "distill", False):
        raise UnsupportedLossError(f"DistillClipLoss (args.distill): {UNSUPPORTED['DistillClipLoss']}; "
                                   "mmkernels has no drop-in for it")
    model = str(getattr(args, "model", "") or "")
    if "coca" in model.lower():
        raise UnsupportedLossError(f"CoCaLoss (args.model={model!r}): {UNSUPPORTED['CoCaLoss']}; mmkernels "
                                   "has no drop-in for it")
    if getattr(args, "horovod", False):
        raise UnsupportedLossError("args.horovod: horovod is not supported; mmkernels' losses run on "
                                   "torch.distributed (launch with torchrun)")
    if getattr(args, "siglip", False):
        return SigLipLoss(rank=args.rank, world_size=args.world_size,
                          dist_impl=getattr(args, "loss_dist_impl", None), **options)
    return ContrastiveLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                           rank=args.rank, world_size=args.world_size, **options)


def _from_loss(loss: nn.Module, options: dict) -> nn.Module:
    kind = type(loss).__name__
    if kind in UNSUPPORTED:
        raise UnsupportedLossError(f"open_clip {kind}: {UNSUPPORTED[kind]}; mmkernels has no drop-in for it")
    if kind not in CARRIED:
        raise TypeError(f"expected an open_clip ClipLoss or SigLipLoss (or open_clip_train's args), got "
                        f"{type(loss).__module__}.{kind}; a subclass may change the loss, so only these "
                        "two classes are converted")
    missing = [a for a in CARRIED[kind] if not hasattr(loss, a)]
    if missing:
        raise TypeError(f"{kind} lacks the attributes {missing} of open_clip's {kind}: not an open_clip loss")
    settings = {a: getattr(loss, a) for a in CARRIED[kind]}
    if kind == "SigLipLoss":
        return SigLipLoss(**settings, **options)
    if settings.pop("use_horovod"):
        raise UnsupportedLossError("ClipLoss(use_horovod=True): horovod is not supported; mmkernels' losses run "
                                   "on torch.distributed (launch with torchrun)")
    return ContrastiveLoss(**settings, **options)


def mmkernels_loss_for(args_or_loss, **options) -> nn.Module:
    """The mmkernels drop-in for an open_clip loss, with the same settings.

    Args:
        args_or_loss: an open_clip ``ClipLoss`` or ``SigLipLoss`` instance, or open_clip_train's
            parsed ``args`` (what ``open_clip.create_loss(args)`` reads: ``local_loss``,
            ``gather_with_grad``, ``rank``, ``world_size``, ``siglip``, ``loss_dist_impl``,
            ``horovod``, ``distill``, ``model``). An mmkernels loss is returned as it is.
        **options: extra keyword arguments of the mmkernels class: ``group`` (the process group),
            and for :class:`mmkernels.ContrastiveLoss` ``ring``, ``label_smoothing``, ``reduction``.

    Returns:
        :class:`mmkernels.ContrastiveLoss` for ``ClipLoss`` (``local_loss``, ``gather_with_grad``,
        ``cache_labels``, ``rank``, ``world_size`` carried over) or :class:`mmkernels.SigLipLoss`
        for ``SigLipLoss`` (``cache_labels``, ``rank``, ``world_size``, ``dist_impl``). Both take
        open_clip's ``forward(image_features, text_features, logit_scale, logit_bias,
        output_dict)`` and give its loss and gradients, on one process or on
        ``torch.distributed`` with the same ranks.

    Raises:
        UnsupportedLossError: ``CoCaLoss``, ``DistillClipLoss`` (or the args that select them:
            a CoCa ``model``, ``distill``), horovod.
        TypeError: anything else, including subclasses of open_clip's losses under other names.
    """
    if isinstance(args_or_loss, (ContrastiveLoss, SigLipLoss)):
        if options:
            raise ValueError("the loss is already an mmkernels loss; options apply only when converting")
        return args_or_loss
    if isinstance(args_or_loss, nn.Module):
        return _from_loss(args_or_loss, options)
    if _is_args(args_or_loss):
        return _from_args(args_or_loss, options)
    raise TypeError(f"expected an open_clip ClipLoss / SigLipLoss or open_clip_train's args, got "
                    f"{type(args_or_loss).__name__}")


def _wrap(original, strict: bool, options: dict):
    @functools.wraps(original)
    def create_loss(args):
        loss = original(args)
        try:
            return mmkernels_loss_for(loss, **options)
        except UnsupportedLossError as e:
            if strict:
                raise
            warnings.warn(f"open_clip's loss is kept: {e}", stacklevel=2)
            return loss
    setattr(create_loss, _PATCHED, original)
    return create_loss


def patch_create_loss(*modules: types.ModuleType, strict: bool = True, **options):
    """Make open_clip's ``create_loss(args)`` return the mmkernels loss (:func:`mmkernels_loss_for`
    of the loss it builds), so an unchanged training script trains on mmkernels.

    Args:
        *modules: the modules whose ``create_loss`` attribute to wrap. Default: those of
            :data:`CREATE_LOSS_MODULES` already imported, after importing ``open_clip`` (so
            ``open_clip_train.main``, imported afterwards, binds the wrapped function).
        strict: ``True`` (default) lets :class:`UnsupportedLossError` propagate from
            ``create_loss`` (a CoCa or distillation run fails loudly); ``False`` keeps open_clip's
            loss for those, with a warning.
        **options: passed to :func:`mmkernels_loss_for` (``group``, ``ring``, ...).

    Returns:
        ``unpatch()``, which puts the original ``create_loss`` back in each module where the
        wrapper is still in place. Patching a module twice wraps it once.

    Example (a launcher script, then ``torchrun launcher.py --model ViT-B-32 ...``)::

        from mmkernels.integrations.open_clip import patch_create_loss
        patch_create_loss()
        from open_clip_train.main import main
        main(sys.argv[1:])
    """
    if not modules:
        try:
            importlib.import_module("open_clip")
        except ImportError as e:
            raise ImportError(f"patch_create_loss needs open_clip (pip install open_clip_torch): {e}") from e
        modules = tuple(sys.modules[n] for n in CREATE_LOSS_MODULES if n in sys.modules)
    for m in modules:
        if not callable(getattr(m, "create_loss", None)):
            raise TypeError(f"{getattr(m, '__name__', m)!r} has no create_loss function to patch")
    done = []
    for m in modules:
        current = m.create_loss
        if getattr(current, _PATCHED, None) is None:
            m.create_loss = _wrap(current, strict, options)
            done.append((m, current, m.create_loss))

    def unpatch() -> None:
        for module, original, wrapper in done:
            if getattr(module, "create_loss", None) is wrapper:
                module.create_loss = original

    return unpatch


__all__ = ["CARRIED", "CREATE_LOSS_MODULES", "UNSUPPORTED", "UnsupportedLossError", "mmkernels_loss_for",
           "patch_create_loss"]
