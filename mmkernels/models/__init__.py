"""Models built on mmkernels' ops.

* :class:`QFormer`: the BLIP-2 / InstructBLIP Q-Former, loads HF ``Blip2QFormerModel`` weights.
* The reference models ``clip``, ``albef``, ``blip2``, ``vlmo``, ``cogvlm`` and ``llava``: each a
  small model in a ``plain`` and an ``mmkernels`` form with the same parameters, trained side by
  side by the tests (``mmkernels.models.common`` gives their interface; load one with
  ``common.load(name)``, build it with ``common.build(name, config, impl)``).
"""
from .qformer import QFormer

__all__ = ["QFormer"]
